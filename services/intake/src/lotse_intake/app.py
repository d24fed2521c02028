"""App factory of the intake service."""

from __future__ import annotations

from fastapi import FastAPI
from lotse_runtime.app import create_service_app

from lotse_intake.settings import IntakeSettings

DESCRIPTION = """
Registers families from birth clinics (Babylotsen — baby pilots who meet families on the
maternity ward) and from move-in notices, records consent and screening, and asks for a warm
handover.
"""


def create_app(settings: IntakeSettings | None = None) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests)."""
    return create_service_app(
        settings or IntakeSettings(),
        title="Lotse intake",
        description=DESCRIPTION,
    )
