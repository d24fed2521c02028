"""App factory of the referrals service."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from lotse_runtime.app import ServiceRuntime, create_service_app
from lotse_runtime.migrations import create_schema

from lotse_referrals import operations as ops
from lotse_referrals import retention
from lotse_referrals.api import router
from lotse_referrals.catalogue import city_file_text, fingerprint, seed_catalogue
from lotse_referrals.consumers import wire_consumers
from lotse_referrals.context import Context
from lotse_referrals.domain import WorkingCalendar
from lotse_referrals.keyring import HttpKeyring, Keyring, service_headers
from lotse_referrals.policy import POLICY
from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import TABLES

DESCRIPTION = """
Offer catalogue of the Träger (independent provider agencies), referral lifecycle, partner
topics and escalation: the warm handover.

* **Catalogue**: which Träger offers which module in which Stadtbezirk (city district), with
  capacity and contact; loaded from the city configuration, editable here; suggestions for a
  family's Bezirk and module, free capacity first.
* **Referrals** follow the FHIR Task statuses: requested → received → accepted | rejected →
  in-progress → completed, cancelled by the requesting side (Familienbüro = district family
  office, Babylotse = baby pilot in a birth clinic, Bezirksteam = district coordination team)
  while open. Only the addressed Träger answers; it does so on its Kafka topic
  `lotse.partner.<traeger>.responses` (or here). A referral needs the family's consent to
  pass contact data to that Träger for that purpose (§ 65 SGB VIII).
* **Escalation**: a Träger that has not accepted or rejected within the configured number
  of working days (weekends and public holidays excluded) is escalated to the Bezirksteam.
"""

_log = logging.getLogger(__name__)

TAGS = [
    {"name": "catalogue", "description": "Offer catalogue: Träger, modules, suggestions."},
    {"name": "referrals", "description": "Create and follow referrals, lifecycle steps."},
    {"name": "bezirke", "description": "A Stadtbezirk's referrals, escalations and wishes."},
    {"name": "traeger", "description": "A Träger's own referrals."},
]


def _keyring_from(settings: ReferralsSettings) -> Keyring | None:
    if settings.keyring_url is None:
        _log.warning(
            "no keyring_url: referrals carry no disclosure, Träger get ids only "
            "(set LOTSE_REFERRALS_KEYRING_URL to the intake service)"
        )
        return None
    headers = service_headers(
        token_file=settings.keyring_token_file,
        dev_issuer_key=settings.dev_issuer_key_file() if settings.auth_jwks is None else None,
        audience=settings.auth_audience,
    )
    return HttpKeyring(settings.keyring_url, headers=headers, timeout_s=settings.keyring_timeout_s)


def _context(runtime: ServiceRuntime[ReferralsSettings], keyring: Keyring | None) -> Context:
    settings = runtime.settings
    return Context(
        settings=settings,
        city=runtime.city,
        calendar=WorkingCalendar.for_region(settings.holiday_country, runtime.city.state),
        keyring=keyring if keyring is not None else _keyring_from(settings),
        db=runtime.db,
        outbox=runtime.outbox,
        clock=runtime.clock,
    )


def _wire(runtime: ServiceRuntime[ReferralsSettings], ctx: Context) -> None:
    """Consumers, the city-file, escalation and placement jobs, retention."""
    wire_consumers(runtime, ctx)

    async def escalate(rt: ServiceRuntime[Any]) -> None:
        await ops.escalate_overdue(ctx, rt.clock())
        await ops.escalate_waiting_wishes(ctx, rt.clock())

    async def place_waiting(rt: ServiceRuntime[Any]) -> None:
        await ops.place_waiting_wishes(ctx, rt.clock())

    async def city_file(rt: ServiceRuntime[Any]) -> None:
        await ops.check_city_file(ctx, rt.clock())

    settings = runtime.settings
    # Per replica: each replica keeps the fingerprint of the file it last applied in memory
    # (reconciling is idempotent, as at start).
    runtime.add_job("catalogue", settings.catalogue_check_interval_s, city_file)
    runtime.add_job("escalation", settings.escalation_interval_s, escalate, once=True)
    runtime.add_job("placement", settings.placement_interval_s, place_waiting, once=True)
    retention.install(runtime)


def create_app(
    settings: ReferralsSettings | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    keyring: Keyring | None = None,
) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests). ``clock``
    and ``keyring`` replace the wall clock and the intake keyring (tests)."""
    settings = settings or ReferralsSettings()
    contexts: list[Context] = []

    def wire(runtime: ServiceRuntime[ReferralsSettings]) -> None:
        contexts.append(_context(runtime, keyring))
        _wire(runtime, contexts[0])

    app = create_service_app(
        settings,
        title="Lotse referrals",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[router],
        policy=POLICY,
        wire=wire,
        clock=clock,
        openapi_tags=TAGS,
    )
    ctx = contexts[0]
    app.state.referrals = ctx
    runtime: ServiceRuntime[ReferralsSettings] = app.state.runtime
    _seed_first(app, runtime, ctx, own_keyring=keyring is None)
    return app


def _seed_first(
    app: FastAPI, runtime: ServiceRuntime[ReferralsSettings], ctx: Context, *, own_keyring: bool
) -> None:
    """The catalogue must be in its tables before consumers, jobs and requests use it, so
    the schema is migrated (the runtime's start-up does it again, as a no-op) and seeded
    first; a keyring client the factory built is closed with the app."""
    started = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        await create_schema(runtime.db, TABLES, service=runtime.settings.service_name)
        await seed_catalogue(ctx, runtime.clock())
        # The file as seeded: the periodic check reconciles again only when it changes.
        ctx.city_fingerprint = fingerprint(city_file_text(runtime.settings.city)[0])
        try:
            async with started(application):
                yield
        finally:
            # Only a keyring client this factory built is this app's to close.
            if own_keyring and isinstance(ctx.keyring, HttpKeyring):
                await ctx.keyring.aclose()

    app.router.lifespan_context = lifespan
