"""App factory of the reporting service."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI
from lotse_contracts import topics
from lotse_runtime.app import ServiceRuntime, create_service_app

from lotse_reporting import api, consumers, operations, retention
from lotse_reporting.operations import Reporting
from lotse_reporting.policy import POLICY
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.tables import TABLES

DESCRIPTION = """
Anonymised key figures (Kennzahlen) per Stadtbezirk (city district) and month for the
Jugendhilfeplanung (youth-welfare planning), committees and dashboards: families registered,
welcome visits, reach rate, referrals, escalations. Consumes every domain event, publishes each
changed figure to the compacted topic `lotse.reporting.kpis` (cells behind fewer than k
families suppressed), serves a live dashboard (`/dashboard`) and the annual report. Callers
get aggregates only, never a case.
"""

TAGS = [
    {"name": "figures", "description": "Published key figures, filterable."},
    {"name": "reports", "description": "Annual report for a year and Stadtbezirk (CSV, HTML)."},
    {"name": "dashboard", "description": "Live dashboard page, its data and event stream."},
]


def wire(runtime: ServiceRuntime[ReportingSettings]) -> Reporting:
    """The service's parts on the runtime: the live consumer, the publication job and the
    retention job. Returns the reporting parts the routes use."""
    reporting = Reporting.of(runtime)
    runtime.add_consumer(
        consumers.CONSUMER,
        topics.DOMAIN_TOPICS,
        consumers.handlers(reporting.rules, on_applied=reporting.trigger.changed),
        prepare=operations.prepare_events,
    )

    async def publish(_runtime: ServiceRuntime[ReportingSettings]) -> None:
        await operations.publish_when_due(reporting)

    # The run waits for the trigger (no ticks while idle); the interval after each pass
    # gathers the next burst and spaces retries when a pass fails.
    runtime.add_job("kpis", runtime.settings.publish_debounce_s, publish)
    retention.install(runtime)
    return reporting


def create_app(
    settings: ReportingSettings | None = None, *, clock: Callable[[], datetime] | None = None
) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests)."""
    wired: list[Reporting] = []
    app = create_service_app(
        settings or ReportingSettings(),
        title="Lotse reporting",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[api.router, api.dashboard],
        policy=POLICY,
        wire=lambda runtime: wired.append(wire(runtime)),
        clock=clock,
        openapi_tags=TAGS,
    )
    app.state.reporting = wired[0]
    return app
