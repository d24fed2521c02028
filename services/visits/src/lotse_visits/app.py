"""App factory of the visits service."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from lotse_runtime.app import Clock, ServiceRuntime, create_service_app

from lotse_visits import retention
from lotse_visits.api import visits_router
from lotse_visits.consumers import wire
from lotse_visits.domain import Conflict, Refusal
from lotse_visits.policy import POLICY
from lotse_visits.settings import VisitsSettings
from lotse_visits.tables import TABLES


def _wire(runtime: ServiceRuntime[Any]) -> None:
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


def _refused(_request: Request, exc: Exception) -> JSONResponse:
    """409 or 422 in the shape of the platform's validation errors: field and reason."""
    assert isinstance(exc, Refusal)
    return JSONResponse(
        {
            "detail": f"{exc.field}: {exc.reason}",
            "errors": [{"field": exc.field, "reason": exc.reason}],
        },
        status_code=409 if isinstance(exc, Conflict) else 422,
    )


def create_app(settings: VisitsSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests), and
    ``clock`` (aware UTC now) lets tests move time."""
    app = create_service_app(
        settings or VisitsSettings(),
        title="Lotse visits",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[visits_router()],
        policy=POLICY,
        wire=_wire,
        clock=clock,
        openapi_tags=TAGS,
    )
    app.add_exception_handler(Refusal, _refused)
    return app
