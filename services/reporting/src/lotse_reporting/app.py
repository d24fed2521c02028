"""App factory of the reporting service."""

from __future__ import annotations

from fastapi import FastAPI
from lotse_runtime.app import create_service_app

from lotse_reporting.settings import ReportingSettings

DESCRIPTION = """
Anonymised key figures (Kennzahlen) per Stadtbezirk and month for the Jugendhilfeplanung
(youth-welfare planning) and dashboards.
"""


def create_app(settings: ReportingSettings | None = None) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests)."""
    return create_service_app(
        settings or ReportingSettings(),
        title="Lotse reporting",
        description=DESCRIPTION,
    )
