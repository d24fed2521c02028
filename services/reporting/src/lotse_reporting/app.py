"""App factory of the reporting service."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from fastapi import FastAPI
from lotse_contracts import topics
from lotse_contracts.city import Municipality
from lotse_runtime.app import ServiceRuntime, create_service_app

from lotse_reporting import api, consumers, dashboard, retention
from lotse_reporting.domain import Layout, Rules
from lotse_reporting.policy import POLICY
from lotse_reporting.publisher import Changes, KpiPublisher
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


def rules_for(city: Municipality, settings: ReportingSettings) -> Rules:
    """The checks' view of the city."""
    return Rules(
        bezirke=frozenset(city.bezirk_slugs),
        modules=frozenset(city.module_slugs),
        zone=city.zone(),
        completion_grace=timedelta(minutes=settings.completion_grace_minutes),
    )


def layout_for(city: Municipality, settings: ReportingSettings) -> Layout:
    """Which cells are published for the city."""
    return Layout(
        bezirke=tuple(city.bezirk_slugs),
        modules=tuple(city.module_slugs),
        k=settings.k_anonymity,
        zone=city.zone(),
    )


def create_app(
    settings: ReportingSettings | None = None, *, clock: Callable[[], datetime] | None = None
) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests)."""
    settings = settings or ReportingSettings()
    holder: dict[str, api.ReportingContext] = {}

    def wire(runtime: ServiceRuntime[Any]) -> None:
        changes = Changes()
        layout = layout_for(runtime.city, settings)
        context = api.ReportingContext(
            settings=settings,
            city=runtime.city,
            layout=layout,
            db=runtime.db,
            publisher=KpiPublisher(
                db=runtime.db,
                outbox=runtime.outbox,
                layout=layout,
                clock=runtime.clock,
                changes=changes,
            ),
            changes=changes,
        )
        holder["context"] = context
        runtime.add_consumer(
            consumers.CONSUMER,
            topics.DOMAIN_TOPICS,
            consumers.handlers(rules_for(runtime.city, settings)),
        )

        async def publish(_runtime: ServiceRuntime[Any]) -> None:
            await context.publisher.run_pass()

        runtime.add_job("kpis", settings.publish_interval_s, publish)
        retention.install(runtime)

    app = create_service_app(
        settings,
        title="Lotse reporting",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[api.router(), dashboard.router()],
        policy=POLICY,
        wire=wire,
        clock=clock,
        openapi_tags=TAGS,
    )
    app.state.reporting = holder["context"]
    return app
