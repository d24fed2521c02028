"""App factory of the visits service."""

from __future__ import annotations

from fastapi import FastAPI
from lotse_runtime.app import Clock, create_service_app

from lotse_visits import retention
from lotse_visits.api import router
from lotse_visits.consumers import wire
from lotse_visits.policy import POLICY
from lotse_visits.settings import VisitsRuntime, VisitsSettings
from lotse_visits.tables import TABLES


def _wire(runtime: VisitsRuntime) -> None:
    wire(runtime)
    retention.install(runtime)


DESCRIPTION = """
Welcome visits (Willkommensbesuche) of each Familienbüro (family office of one Stadtbezirk,
city district): scheduling, outcomes, overdue tracking.

Every family registered by intake with a welcome-visit consent gets a visit proposed
automatically, inside its office's working times and staff capacity, by its target date
(birth or move-in plus the configured days) where possible, else in the first free slot,
flagged. Staff reschedule, record no-shows, declines, cancellations and outcomes; each is an
event on `lotse.visits` and the Bezirk's feed. A case without a visit by its target date is
reported once as overdue.
"""

TAGS = [
    {"name": "visits", "description": "Calendar, visit details and what staff record."},
    {"name": "audit", "description": "Who accessed which case (data-protection officer)."},
]


def create_app(settings: VisitsSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests), and
    ``clock`` (aware UTC now) lets tests move time."""
    return create_service_app(
        settings or VisitsSettings(),
        title="Lotse visits",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[router],
        policy=POLICY,
        wire=_wire,
        clock=clock,
        openapi_tags=TAGS,
    )
