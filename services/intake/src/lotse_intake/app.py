"""App factory of the intake service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from fastapi import FastAPI
from lotse_runtime.app import ServiceRuntime, create_service_app

from lotse_intake import retention
from lotse_intake.api import router
from lotse_intake.idempotency import forget_expired
from lotse_intake.keyring import Keyring
from lotse_intake.operations import IntakeContext, erase_expired
from lotse_intake.policy import POLICY
from lotse_intake.settings import IntakeSettings
from lotse_intake.tables import TABLES

DESCRIPTION = """
Registers families from birth clinics (Babylotsen — baby pilots who meet families on the
maternity ward) and from move-in notices of the citizens' office (families with children
under six), records consent and screening, and asks for a warm handover to a support module.

* **Stadtbezirk** (city district) of a family: derived from the postcode via the city's
  configuration; an explicit override is recorded as such. Each Stadtbezirk has a
  **Familienbüro** (family office) that offers every family a welcome visit.
* **Träger**: independent provider agencies running the support modules; contact data goes
  to one only with the family's consent (§ 65 SGB VIII).
* **Personal data** never leaves intake in clear: it is sealed with the family's own data
  key. Erasure destroys that key (crypto-shredding).
* Changing requests accept an `Idempotency-Key` header: a repeat returns the first answer.
* Refusals: HTTP 422 (or 409 / 410) with `errors: [{field, reason}]`.
"""

TAGS = [
    {"name": "cases", "description": "Register a family and read its case."},
    {"name": "consent", "description": "Consents as first-class data, with their history."},
    {"name": "screening", "description": "Needs assessment (special-category data)."},
    {"name": "handover", "description": "Warm handover requests to modules and Träger."},
    {"name": "erasure", "description": "Crypto-shredding of a family's data."},
    {"name": "keyring", "description": "Internal: data keys for authorised Lotse services."},
]


def housekeeping(
    context: IntakeContext,
) -> Callable[[ServiceRuntime[IntakeSettings]], Awaitable[None]]:
    """Forget expired Idempotency-Keys; erase families past the retention period."""
    settings = context.settings

    async def run(runtime: ServiceRuntime[IntakeSettings]) -> None:
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            await forget_expired(session, now - timedelta(hours=settings.idempotency_ttl_hours))
        if settings.retention_days is not None:
            await erase_expired(
                runtime, context.keyring, now - timedelta(days=settings.retention_days)
            )

    return run


def create_app(
    settings: IntakeSettings | None = None, *, clock: Callable[[], datetime] | None = None
) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests), and
    ``clock`` (aware UTC) lets tests control time."""
    settings = settings or IntakeSettings()
    secrets = settings.secrets()
    context = IntakeContext(
        settings=settings, secrets=secrets, keyring=Keyring(secrets.key_encryption_key)
    )

    def wire(runtime: ServiceRuntime[IntakeSettings]) -> None:
        runtime.add_job(
            "housekeeping",
            settings.housekeeping_interval_s,
            housekeeping(context),
            once=True,
        )
        retention.install(runtime)

    app = create_service_app(
        settings,
        title="Lotse intake",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[router],
        policy=POLICY,
        wire=wire,
        clock=clock,
        openapi_tags=TAGS,
    )
    app.state.intake = context
    return app
