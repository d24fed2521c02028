"""App factory of the intake service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from lotse_contracts.events.intake import ErasureReason
from lotse_runtime.app import ServiceRuntime, create_service_app
from sqlalchemy import select
from sqlmodel import col

from lotse_intake import retention
from lotse_intake.api import router
from lotse_intake.domain import Refusal
from lotse_intake.idempotency import forget_expired
from lotse_intake.keyring import Keyring
from lotse_intake.operations import IntakeContext, erase_case, load_case
from lotse_intake.policy import POLICY
from lotse_intake.settings import IntakeSettings
from lotse_intake.tables import TABLES, IntakeCase

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

#: Families erased per housekeeping transaction (keeps each transaction short).
_RETENTION_BATCH = 100


async def _refused(_request: Request, exc: Exception) -> Response:
    """A domain refusal, in the shape of the runtime's validation errors."""
    assert isinstance(exc, Refusal)
    detail = "invalid request" if exc.status == 422 else exc.reason
    return JSONResponse(
        {"detail": detail, "errors": [{"field": exc.field, "reason": exc.reason}]},
        status_code=exc.status,
    )


def housekeeping(
    context: IntakeContext,
) -> Callable[[ServiceRuntime[Any]], Awaitable[None]]:
    """Forget expired Idempotency-Keys; erase families past the retention period."""
    settings = context.settings

    async def run(runtime: ServiceRuntime[Any]) -> None:
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            await forget_expired(session, now - timedelta(hours=settings.idempotency_ttl_hours))
        if settings.retention_days is None:
            return
        cutoff = now - timedelta(days=settings.retention_days)
        while True:
            async with runtime.db.transaction() as session:
                expired = list(
                    (
                        await session.execute(
                            select(col(IntakeCase.case_id))
                            .where(
                                col(IntakeCase.erased_at).is_(None),
                                col(IntakeCase.registered_at) < cutoff,
                            )
                            .limit(_RETENTION_BATCH)
                        )
                    ).scalars()
                )
                for case_id in expired:
                    case = await load_case(session, case_id, for_update=True)
                    if case is not None and case.erased_at is None:
                        await erase_case(
                            session,
                            runtime,
                            context.keyring,
                            case,
                            reason=ErasureReason.RETENTION_EXPIRED,
                            caller=None,
                            path="job:retention",
                        )
            if len(expired) < _RETENTION_BATCH:
                return

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

    def wire(runtime: ServiceRuntime[Any]) -> None:
        runtime.add_job("housekeeping", settings.housekeeping_interval_s, housekeeping(context))
        retention.install(runtime)

    app = create_service_app(
        settings,
        title="Lotse intake",
        description=DESCRIPTION,
        tables=TABLES,
        routers=[router()],
        policy=POLICY,
        wire=wire,
        clock=clock,
        openapi_tags=TAGS,
    )
    app.state.intake = context
    app.add_exception_handler(Refusal, _refused)
    return app
