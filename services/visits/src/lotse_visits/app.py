"""App factory of the visits service."""

from __future__ import annotations

from fastapi import FastAPI
from lotse_runtime.app import create_service_app

from lotse_visits.settings import VisitsSettings

DESCRIPTION = """
Welcome visits (Willkommensbesuche) of each Familienbüro (family office of one Stadtbezirk,
city district): scheduling, outcomes, overdue tracking.
"""


def create_app(settings: VisitsSettings | None = None) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests)."""
    return create_service_app(
        settings or VisitsSettings(),
        title="Lotse visits",
        description=DESCRIPTION,
    )
