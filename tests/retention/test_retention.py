"""Retention: every service's purge job, on both databases, with a clock the test sets.

Each test builds the real service app (its tables migrated, its jobs registered exactly as
in production), stores rows of each data class just older and just younger than their
retention, runs the service's ``retention`` job once and looks at what is left. Kafka is not
needed: the purge works on the service database alone.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from lotse_intake.app import create_app as create_intake
from lotse_intake.settings import IntakeSettings
from lotse_intake.tables import TABLES as INTAKE_TABLES
from lotse_intake.tables import IntakeCase, IntakeConsent, IntakeConsentChange
from lotse_referrals.app import create_app as create_referrals
from lotse_referrals.keyring import StaticKeyring
from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import TABLES as REFERRALS_TABLES
from lotse_referrals.tables import Case, ConsentRecord, Referral, ReferralStep
from lotse_reporting.app import create_app as create_reporting
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.tables import TABLES as REPORTING_TABLES
from lotse_reporting.tables import ReportingFact, ReportingKpi
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.audit import AuditEntry
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.migrations import create_schema
from lotse_runtime.outbox import OutboxMessage
from lotse_runtime.retention import RetentionFailed, purge, rule
from lotse_visits.app import create_app as create_visits
from lotse_visits.retention import rules as visits_rules
from lotse_visits.settings import VisitsSettings
from lotse_visits.tables import TABLES as VISITS_TABLES
from lotse_visits.tables import VisitsCase, VisitsConsent, VisitsVisit
from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

#: The test's "now": the retention job measures age by the runtime's clock, never the wall's.
NOW = datetime(2029, 6, 1, 10, 0, tzinfo=UTC)
#: Nowhere near anything the services would touch: the app is built, never started.
NO_BROKER = "127.0.0.1:9"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def old(days_kept: int) -> datetime:
    """A moment one day past a retention of ``days_kept`` days."""
    return NOW - timedelta(days=days_kept + 1)


def young(days_kept: int) -> datetime:
    """A moment one day short of it."""
    return NOW - timedelta(days=days_kept - 1)


def _secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def _common(database_url: str) -> dict[str, Any]:
    return {"kafka_bootstrap": NO_BROKER, "database_url": database_url, "topic_prefix": "r."}


def runtime_of(app: FastAPI) -> ServiceRuntime[Any]:
    runtime: ServiceRuntime[Any] = app.state.runtime
    return runtime


@asynccontextmanager
async def service(
    app: FastAPI, clock: Clock, tables: Sequence[type[SQLModel]]
) -> AsyncIterator[ServiceRuntime[Any]]:
    runtime = runtime_of(app)
    assert runtime.clock is clock
    await create_schema(runtime.db, tables, service=runtime.service)
    try:
        yield runtime
    finally:
        await runtime.db.dispose()


async def store(runtime: ServiceRuntime[Any], *rows: SQLModel) -> None:
    async with runtime.db.transaction() as session:
        session.add_all(rows)


async def ids(runtime: ServiceRuntime[Any], model: type[SQLModel], column: str) -> set[Any]:
    async with runtime.db.transaction() as session:
        return set((await session.execute(select(getattr(model, column)))).scalars())


async def count(runtime: ServiceRuntime[Any], model: type[SQLModel]) -> int:
    async with runtime.db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def run_retention(runtime: ServiceRuntime[Any]) -> None:
    job = next(j for j in runtime.jobs if j.name == "retention")
    await job.run_once(runtime)
    assert job.last_error is None, job.last_error


def inbox(event_id: str, at: datetime) -> InboxEntry:
    return InboxEntry(
        consumer="main",
        source="/lotse/intake",
        event_id=event_id,
        event_type="de.lotse.intake.family-registered.v1",
        topic="r.lotse.intake",
        partition=0,
        offset=0,
        processed_at=at,
    )


def outbox(event_id: str, *, created: datetime, sent: datetime | None) -> OutboxMessage:
    return OutboxMessage(
        topic="r.lotse.visits",
        record_key=str(uuid.uuid4()),
        value=b"{}",
        headers="[]",
        event_id=event_id,
        event_type="de.lotse.visits.visit-scheduled.v1",
        created_at=created,
        sent_at=sent,
    )


def audit(purpose: str, at: datetime) -> AuditEntry:
    return AuditEntry(at=at, service="test", action="read", case_id="c", purpose=purpose)


async def check_runtime_classes(runtime: ServiceRuntime[Any]) -> None:
    """Store runtime rows around the defaults (inbox 90 days, sent outbox 7, audit log 3650),
    run the job, and check old inbox entries, old *sent* outbox rows and old audit entries
    go, everything else stays."""
    await store(
        runtime,
        inbox("inbox-old", old(90)),
        inbox("inbox-young", young(90)),
        outbox("sent-old", created=old(7), sent=old(7)),
        outbox("sent-young", created=old(7), sent=young(7)),
        outbox("unsent-old", created=old(400), sent=None),
        audit("audit-old", old(3650)),
        audit("audit-young", young(3650)),
        audit("audit-today", datetime.now(UTC)),
    )
    await run_retention(runtime)
    assert await ids(runtime, InboxEntry, "event_id") == {"inbox-young"}
    assert await ids(runtime, OutboxMessage, "event_id") == {"sent-young", "unsent-old"}
    assert await ids(runtime, AuditEntry, "purpose") == {"audit-young", "audit-today"}


# -- visits ------------------------------------------------------------------------------------


def visits_case(case_id: str, *, erased_at: datetime | None = None) -> VisitsCase:
    return VisitsCase(
        case_id=case_id, bezirk="hoerde", state="closed", erased_at=erased_at, updated_at=NOW
    )


def visit(visit_id: str, case_id: str, *, closed_at: datetime | None) -> VisitsVisit:
    starts = (closed_at or NOW) - timedelta(hours=1)
    return VisitsVisit(
        visit_id=visit_id,
        case_id=case_id,
        bezirk="hoerde",
        familienbuero="familienbuero-hoerde",
        staff_id="fb-1",
        starts_at=starts,
        ends_at=starts + timedelta(hours=1),
        setting="home",
        status="completed" if closed_at else "scheduled",
        attempt=1,
        target_date=date(2025, 3, 17),
        target_missed=False,
        proposed_automatically=True,
        scheduled_at=starts - timedelta(days=5),
        closed_at=closed_at,
    )


async def test_visits_purges_finished_visits_and_erased_cases(database_url: str) -> None:
    clock = Clock()
    settings = VisitsSettings(**_common(database_url))
    assert settings.retention_finished_visit_days == 1095
    async with service(create_visits(settings, clock=clock), clock, VISITS_TABLES) as runtime:
        await store(
            runtime,
            visits_case("live"),
            visits_case("erased-old", erased_at=old(1095)),
            visits_case("erased-young", erased_at=young(1095)),
            VisitsConsent(consent_id="k-old", case_id="erased-old", state="given", at=old(2000)),
            VisitsConsent(consent_id="k-young", case_id="erased-young", state="given", at=NOW),
            visit("finished-old", "live", closed_at=old(1095)),
            visit("finished-young", "live", closed_at=young(1095)),
            # Open visits never expire, however far back they were booked.
            visit("open-old", "live", closed_at=None),
            visit("of-erased", "erased-old", closed_at=None),
        )
        await run_retention(runtime)
        assert await ids(runtime, VisitsVisit, "visit_id") == {"finished-young", "open-old"}
        assert await ids(runtime, VisitsCase, "case_id") == {"live", "erased-young"}
        assert await ids(runtime, VisitsConsent, "consent_id") == {"k-young"}
        await check_runtime_classes(runtime)


# -- referrals ---------------------------------------------------------------------------------


def referral(referral_id: str, status: str, updated_at: datetime) -> Referral:
    return Referral(
        referral_id=referral_id,
        case_id="live",
        bezirk="hoerde",
        traeger="hebammenzentrum-dortmund",
        module="familienhebamme",
        status=status,
        origin="handover",
        consent_ref=str(uuid.uuid4()),
        requested_by_role="familienbuero",
        requested_at=updated_at - timedelta(days=30),
        answer_due_by=date(2025, 4, 22),
        updated_at=updated_at,
    )


def step(referral_id: str) -> ReferralStep:
    return ReferralStep(
        referral_id=referral_id,
        step="received",
        actor_role="traeger",
        occurred_at=NOW,
        recorded_at=NOW,
    )


async def test_referrals_purges_closed_referrals_with_steps(database_url: str) -> None:
    clock = Clock()
    settings = ReferralsSettings(**_common(database_url), retention_closed_referral_days=365)
    app = create_referrals(settings, clock=clock, keyring=StaticKeyring())
    async with service(app, clock, REFERRALS_TABLES) as runtime:
        await store(
            runtime,
            referral("completed-old", "completed", old(365)),
            referral("cancelled-old", "cancelled", old(365)),
            referral("rejected-young", "rejected", young(365)),
            # Still running: kept however old its last change.
            referral("accepted-old", "accepted", old(3000)),
            *(
                step(r)
                for r in ("completed-old", "cancelled-old", "rejected-young", "accepted-old")
            ),
            Case(case_id="live", bezirk="hoerde", registered_at=old(3000)),
            Case(
                case_id="erased-old", bezirk="hoerde", registered_at=old(3000), erased_at=old(1095)
            ),
            ConsentRecord(
                consent_id="k-old",
                case_id="erased-old",
                scope="welcome_visit",
                state="given",
                changed_at=NOW,
            ),
        )
        await run_retention(runtime)
        assert await ids(runtime, Referral, "referral_id") == {"rejected-young", "accepted-old"}
        assert await ids(runtime, ReferralStep, "referral_id") == {"rejected-young", "accepted-old"}
        assert await ids(runtime, Case, "case_id") == {"live"}
        assert await count(runtime, ConsentRecord) == 0
        await check_runtime_classes(runtime)


# -- intake ------------------------------------------------------------------------------------


def intake_case(case_id: str, *, erased_at: datetime | None) -> IntakeCase:
    return IntakeCase(
        case_id=case_id,
        channel="clinic",
        bezirk="hoerde",
        bezirk_source="address",
        registered_at=old(5000),
        registered_by_role="babylotse",
        registered_by_subject="bl-7",
        children_count=1,
        visit_target_date=date(2015, 3, 17),
        key_id=f"fk-{case_id}",
        erased_at=erased_at,
    )


def consent_with_history(case_id: str) -> list[SQLModel]:
    consent_id = f"consent-{case_id}"
    return [
        IntakeConsent(
            consent_id=consent_id,
            case_id=case_id,
            scope="welcome_visit",
            state="given",
            given_at=old(5000),
        ),
        IntakeConsentChange(
            consent_id=consent_id,
            case_id=case_id,
            state="given",
            at=old(5000),
            recorded_at=old(5000),
            recorded_by_role="babylotse",
            recorded_by_subject="bl-7",
        ),
    ]


async def test_intake_purges_erased_family_tombstones(database_url: str) -> None:
    clock = Clock()
    settings = IntakeSettings(
        **_common(database_url), key_encryption_key=_secret(), match_key_secret=_secret()
    )
    assert settings.retention_erased_case_days == 1095
    async with service(create_intake(settings, clock=clock), clock, INTAKE_TABLES) as runtime:
        await store(
            runtime,
            # A live family is never purged by age (erasure by retention_days is the
            # housekeeping job's, and leaves a tombstone first).
            intake_case("live", erased_at=None),
            intake_case("erased-old", erased_at=old(1095)),
            intake_case("erased-young", erased_at=young(1095)),
            *consent_with_history("live"),
            *consent_with_history("erased-old"),
            *consent_with_history("erased-young"),
        )
        await run_retention(runtime)
        left = {"live", "erased-young"}
        assert await ids(runtime, IntakeCase, "case_id") == left
        assert await ids(runtime, IntakeConsent, "case_id") == left
        assert await ids(runtime, IntakeConsentChange, "case_id") == left
        await check_runtime_classes(runtime)


# -- reporting ---------------------------------------------------------------------------------


async def test_reporting_keeps_its_aggregates(database_url: str) -> None:
    clock = Clock()
    settings = ReportingSettings(**_common(database_url))
    async with service(create_reporting(settings, clock=clock), clock, REPORTING_TABLES) as runtime:
        await store(
            runtime,
            ReportingKpi(
                bezirk="hoerde",
                period="2019-03",
                figure="families_registered",
                dimension="",
                value=42.0,
                suppressed=False,
                unit="families",
                computed_at=old(4000),
                revision=1,
            ),
            ReportingFact(
                kind="registered",
                ref="c-1",
                case_id="c-1",
                bezirk="hoerde",
                month="2019-03",
                at=old(4000),
            ),
        )
        await check_runtime_classes(runtime)
        assert await count(runtime, ReportingKpi) == 1
        assert await count(runtime, ReportingFact) == 1


# -- the mechanics -----------------------------------------------------------------------------


async def test_a_class_without_retention_is_kept_and_clock_moves_the_cutoff(
    sqlite_url: str,
) -> None:
    """``keep=None`` keeps a class for good; moving the clock forward makes rows expire."""
    clock = Clock()
    settings = VisitsSettings(**_common(sqlite_url), retention_finished_visit_days=None)
    async with service(create_visits(settings, clock=clock), clock, VISITS_TABLES) as runtime:
        await store(
            runtime,
            visits_case("live"),
            visit("ancient", "live", closed_at=old(20_000)),
            inbox("recent", NOW),
        )
        await run_retention(runtime)
        assert await ids(runtime, VisitsVisit, "visit_id") == {"ancient"}
        assert await count(runtime, InboxEntry) == 1
        clock.now = NOW + timedelta(days=91)
        await run_retention(runtime)
        assert await count(runtime, InboxEntry) == 0


async def test_purge_reports_counts_per_class(sqlite_url: str) -> None:
    clock = Clock()
    settings = VisitsSettings(**_common(sqlite_url))
    async with service(create_visits(settings, clock=clock), clock, VISITS_TABLES) as runtime:
        await store(
            runtime,
            visits_case("erased", erased_at=old(1095)),
            visit("v", "erased", closed_at=None),
        )
        report = await purge(runtime.db, visits_rules(settings), NOW)
        assert report.deleted == {"finished visits": 0, "erased family records": 1}
        assert await count(runtime, VisitsVisit) == 0


async def test_recent_audit_entries_cannot_be_deleted_at_all(database_url: str) -> None:
    """Retention opens the audit log only for entries older than a year (by the database's
    own clock): a recent entry resists a plain DELETE, whatever the service's clock says."""
    clock = Clock()
    settings = ReportingSettings(**_common(database_url))
    app = create_reporting(settings, clock=clock)
    async with service(app, clock, REPORTING_TABLES) as runtime:
        await store(runtime, audit("recent", datetime.now(UTC) - timedelta(days=300)))
        with pytest.raises(DBAPIError, match="append-only"):
            async with runtime.db.transaction() as session:
                await session.execute(delete(AuditEntry))
        assert await count(runtime, AuditEntry) == 1
    with pytest.raises(ValidationError):
        ReportingSettings(**_common(database_url), retention_audit_days=100)


async def test_a_failing_class_does_not_keep_the_others_from_their_purge(sqlite_url: str) -> None:
    """A rule that would delete recent audit entries is refused by the triggers; the purge
    still applies the next rule and then reports the failure (the job records it)."""
    clock = Clock()
    settings = ReportingSettings(**_common(sqlite_url))
    app = create_reporting(settings, clock=clock)
    async with service(app, clock, REPORTING_TABLES) as runtime:
        await store(runtime, audit("recent", datetime.now(UTC)), inbox("old", old(90)))
        too_eager = rule("audit log", AuditEntry, "at", timedelta(days=1))
        inbox_rule = rule("inbox entries", InboxEntry, "processed_at", timedelta(days=90))
        with pytest.raises(RetentionFailed, match="audit log"):
            await purge(runtime.db, [too_eager, inbox_rule], NOW + timedelta(days=30))
        assert await count(runtime, AuditEntry) == 1
        assert await count(runtime, InboxEntry) == 0
