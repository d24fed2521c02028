"""App factory of the delivery service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from lotse_runtime.app import Clock, create_service_app

from lotse_delivery.api import document_webhooks, router
from lotse_delivery.consumers import wire
from lotse_delivery.pinning import Resolver, system_resolver
from lotse_delivery.policy import POLICY
from lotse_delivery.settings import DeliveryRuntime, DeliverySettings
from lotse_delivery.tables import TABLES
from lotse_delivery.worker import DeliveryWorker, purge

DESCRIPTION = """
Webhooks for partners without Kafka. A Träger (provider agency) or a Bezirksteam (district
coordination team) subscribes an HTTPS endpoint to the events the subscription registry
gives its audience (the registry is the ceiling: types, fields, Bezirk, Träger). Each event
is posted as a CloudEvent (HTTP binding, binary mode unless structured is asked for),
signed per Standard Webhooks (`webhook-id` = CloudEvent id, `webhook-timestamp`,
`webhook-signature`), in order per case, retried with backoff, at least once: deduplicate
by `webhook-id`. A Träger answers its referrals by POSTing the referral-answer CloudEvent
to `/traeger/{slug}/answers`.
"""

TAGS = [
    {"name": "subscriptions", "description": "Your webhook subscriptions and delivery log."},
    {"name": "answers", "description": "Referral answers over HTTP (Träger only)."},
    {"name": "audit", "description": "Who changed which subscription (data-protection officer)."},
]


def create_app(
    settings: DeliverySettings | None = None,
    *,
    clock: Clock | None = None,
    resolver: Resolver = system_resolver,
) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests), as may the
    clock and the resolver of sink host names (tests answer with names they control)."""
    settings = settings or DeliverySettings()
    box = settings.secret_box()
    workers: list[DeliveryWorker] = []

    def _wire(runtime: DeliveryRuntime) -> None:
        wire(runtime)
        worker = DeliveryWorker(runtime, box, resolver=resolver)
        workers.append(worker)
        # Every replica delivers: rounds claim rows with leases (worker.py), so replicas
        # share the load instead of one standing by.
        runtime.add_job("deliver", runtime.settings.deliver_interval_s, worker.tick)
        runtime.add_job(
            "purge", runtime.settings.retention_interval_s, partial(purge, box=box), once=True
        )

    app = create_service_app(
        settings,
        title="Lotse delivery",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[router],
        policy=POLICY,
        wire=_wire,
        clock=clock,
        openapi_tags=TAGS,
    )
    document_webhooks(app)
    app.state.delivery_worker = workers[0]
    app.state.secret_box = box
    app.state.resolver = resolver
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(the_app: FastAPI) -> AsyncIterator[None]:
        async with inner(the_app):
            try:
                yield
            finally:
                # Before the runtime stops (jobs, database): end running rounds, close HTTP.
                await workers[0].close()

    app.router.lifespan_context = lifespan
    return app
