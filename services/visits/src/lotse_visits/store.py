"""Data access of the visits service, for the use cases in operations.py: office locks,
loading cases, visits, bookings and consents, writing what an event says into the rows,
automatic proposals and system cancellations with the events they publish through the
outbox (always in the caller's transaction), and the API views of the rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from lotse_contracts.events.common import ConsentState, Role
from lotse_contracts.events.visits import (
    TargetMissedReason,
    VisitCancelled,
    VisitCancelReason,
    VisitCompleted,
    VisitDeclined,
    VisitMissed,
    VisitRescheduled,
    VisitScheduled,
    VisitSetting,
    VisitTopic,
)
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_visits import domain
from lotse_visits.domain import Booking, CaseState, ConsentFact, Office, VisitStatus
from lotse_visits.settings import VisitsRuntime
from lotse_visits.tables import (
    Outcome,
    VisitPublic,
    VisitsCase,
    VisitsConsent,
    VisitsOffice,
    VisitsVisit,
)

#: How many days of bookings one scheduling query reads before it looks further ahead.
SEARCH_CHUNK = timedelta(days=14)


def target_days(runtime: VisitsRuntime) -> int:
    configured = runtime.settings.visit_target_days
    return configured if configured is not None else runtime.city.welcome_visit_target_days


# -- locking and loading -------------------------------------------------------------------------


async def lock_office(session: AsyncSession, bezirk: str) -> None:
    """Serialise calendar changes of one office until the transaction ends.

    PostgreSQL locks the office's row; SQLite takes its single write lock here, early,
    instead of upgrading a read lock later (which can deadlock). Once per office and
    transaction: a consumer's batch schedules many families of one office, and the lock
    holds until the end anyway. (Not remembered inside a savepoint, whose rollback would
    release the row lock on PostgreSQL.)
    """
    nested = session.in_nested_transaction()
    locked: set[str] = session.info.setdefault(_LOCKED_OFFICES, set())
    if bezirk in locked and not nested:
        return
    result = await session.execute(_BUMP_OFFICE, {"office": bezirk})
    if not nested:
        locked.add(bezirk)
    if result.rowcount:  # type: ignore[attr-defined]
        return
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    await session.execute(
        insert(VisitsOffice)
        .values(bezirk=bezirk, bookings_changed=0)
        .on_conflict_do_nothing(index_elements=["bezirk"])
    )
    await session.execute(_BUMP_OFFICE, {"office": bezirk})


#: The offices this transaction has locked (in ``session.info``; a session is one transaction).
_LOCKED_OFFICES = "lotse_visits_locked_offices"

# Built once, the statements every scheduled family runs: building the expressions cost
# about as much as running them.
_BUMP_OFFICE = (
    update(VisitsOffice)
    .where(col(VisitsOffice.bezirk) == bindparam("office"))
    .values(bookings_changed=col(VisitsOffice.bookings_changed) + 1)
)
_BOOKINGS = select(
    col(VisitsVisit.visit_id),
    col(VisitsVisit.staff_id),
    col(VisitsVisit.starts_at),
    col(VisitsVisit.ends_at),
).where(
    col(VisitsVisit.bezirk) == bindparam("office"),
    col(VisitsVisit.status) == VisitStatus.SCHEDULED.value,
    col(VisitsVisit.starts_at) > bindparam("after"),
    col(VisitsVisit.starts_at) < bindparam("before"),
)
_LATEST_ATTEMPT = select(func.max(VisitsVisit.attempt)).where(
    col(VisitsVisit.case_id) == bindparam("case_id")
)


async def fresh_case(session: AsyncSession, case_id: str) -> VisitsCase | None:
    """The case as committed now (after a lock), not a copy cached in the session."""
    return await session.get(VisitsCase, case_id, populate_existing=True)


async def fresh_visit(session: AsyncSession, visit_id: str) -> VisitsVisit | None:
    return await session.get(VisitsVisit, visit_id, populate_existing=True)


async def locked_case(session: AsyncSession, case_id: str, bezirk: str) -> VisitsCase | None:
    """Lock the office of ``bezirk`` (the event's) and load the case; a case filed under
    another office (an early consent change may have guessed differently) locks that too."""
    await lock_office(session, bezirk)
    case = await fresh_case(session, case_id)
    if case is not None and case.bezirk != bezirk:
        await lock_office(session, case.bezirk)
        # PostgreSQL: the first read preceded that office's lock, whose holder may have
        # changed the case since. SQLite: the first lock took the database's only write
        # lock, so nothing can have changed and the row read stands.
        if session.get_bind().dialect.name != "sqlite":
            case = await fresh_case(session, case_id)
    return case


async def bookings(
    session: AsyncSession, office: Office, start: datetime, end: datetime
) -> list[Booking]:
    """Scheduled visits of the office that touch [start, end], travel buffer included."""
    reach = office.visit_length + office.travel_buffer
    rows = await session.execute(
        _BOOKINGS, {"office": office.bezirk, "after": start - reach, "before": end + reach}
    )
    return [Booking(v, s, a, e) for v, s, a, e in rows.all()]


async def visits_of_case(session: AsyncSession, case_id: str) -> list[VisitsVisit]:
    rows = await session.execute(
        select(VisitsVisit)
        .where(col(VisitsVisit.case_id) == case_id)
        .order_by(col(VisitsVisit.attempt))
    )
    return list(rows.scalars())


async def visits_of_office(
    session: AsyncSession, bezirk: str, start: datetime, end: datetime
) -> list[VisitsVisit]:
    """Every visit of the office starting in [start, end), by time and staff member."""
    rows = await session.execute(
        select(VisitsVisit)
        .where(
            col(VisitsVisit.bezirk) == bezirk,
            col(VisitsVisit.starts_at) >= start,
            col(VisitsVisit.starts_at) < end,
        )
        .order_by(col(VisitsVisit.starts_at), col(VisitsVisit.staff_id))
    )
    return list(rows.scalars())


async def due_cases(session: AsyncSession, bezirk: str, limit: int) -> list[VisitsCase]:
    """Active cases of the office without an appointment, earliest target first."""
    rows = await session.execute(
        select(VisitsCase)
        .where(
            col(VisitsCase.bezirk) == bezirk,
            col(VisitsCase.state) == CaseState.ACTIVE.value,
            col(VisitsCase.open_visit_id).is_(None),
        )
        .order_by(col(VisitsCase.target_date), col(VisitsCase.case_id))
        .limit(limit)
    )
    return list(rows.scalars())


async def overdue_candidates(
    session: AsyncSession, today: date, limit: int, skipped: set[str]
) -> list[VisitsCase]:
    """Active cases past their target date not yet reported, earliest target first."""
    query = (
        select(VisitsCase)
        .where(
            col(VisitsCase.state) == CaseState.ACTIVE.value,
            col(VisitsCase.overdue_raised_at).is_(None),
            col(VisitsCase.target_date) < today,
        )
        .order_by(col(VisitsCase.target_date))
        .limit(limit)
    )
    if skipped:
        query = query.where(col(VisitsCase.case_id).not_in(skipped))
    return list((await session.execute(query)).scalars())


async def mark_overdue(session: AsyncSession, case_id: str, now: datetime) -> bool:
    """Mark a case as reported overdue, if it still is due and unreported."""
    marked = await session.execute(
        update(VisitsCase)
        .where(
            col(VisitsCase.case_id) == case_id,
            col(VisitsCase.state) == CaseState.ACTIVE.value,
            col(VisitsCase.overdue_raised_at).is_(None),
        )
        .values(overdue_raised_at=now)
    )
    return bool(marked.rowcount)  # type: ignore[attr-defined]


async def next_attempt(session: AsyncSession, case_id: str) -> int:
    found = await session.execute(_LATEST_ATTEMPT, {"case_id": case_id})
    latest = found.scalar()
    return 1 if latest is None else int(latest) + 1


# -- consent -------------------------------------------------------------------------------------


async def record_consents(
    session: AsyncSession, case_id: str, incoming: Iterable[ConsentFact], *, new_case: bool
) -> list[ConsentFact]:
    """Keep, per consent, the newer of what is known and what came in (by the time the
    family spoke); returns all that is now known of the case's welcome-visit consents.
    ``new_case`` says nothing can be stored yet, which saves a query per event."""
    rows: dict[str, VisitsConsent] = {}
    if not new_case:
        found = await session.execute(
            select(VisitsConsent).where(col(VisitsConsent.case_id) == case_id)
        )
        rows = {row.consent_id: row for row in found.scalars()}
    for fact in incoming:
        row = rows.get(fact.consent_id)
        known = (
            None if row is None else ConsentFact(row.consent_id, ConsentState(row.state), row.at)
        )
        if not domain.supersedes(fact, known):
            continue
        if row is None:
            row = VisitsConsent(consent_id=fact.consent_id, case_id=case_id, state="", at=fact.at)
            session.add(row)
            rows[fact.consent_id] = row
        row.state, row.at = fact.state.value, fact.at
    return [ConsentFact(r.consent_id, ConsentState(r.state), r.at) for r in rows.values()]


async def consent_facts(session: AsyncSession, case_id: str) -> list[ConsentFact]:
    rows = await session.execute(select(VisitsConsent).where(col(VisitsConsent.case_id) == case_id))
    return [ConsentFact(r.consent_id, ConsentState(r.state), r.at) for r in rows.scalars()]


async def consent_in_force(session: AsyncSession, case_id: str) -> bool:
    return domain.visit_consent_in_force(await consent_facts(session, case_id))


async def latest_consent_state(session: AsyncSession, case_id: str) -> ConsentState | None:
    facts = await consent_facts(session, case_id)
    if not facts:
        return None
    return ConsentState.GIVEN if domain.visit_consent_in_force(facts) else ConsentState.WITHDRAWN


# -- changing the calendar -----------------------------------------------------------------------


def scheduled_event(visit: VisitsVisit) -> VisitScheduled:
    return VisitScheduled(
        **domain.keys_of(visit),
        staff_id=visit.staff_id,
        starts_at=visit.starts_at,
        ends_at=visit.ends_at,
        setting=VisitSetting(visit.setting),
        target_date=visit.target_date,
        target_missed=visit.target_missed,
        target_missed_reason=(
            TargetMissedReason(visit.target_missed_reason) if visit.target_missed_reason else None
        ),
        proposed_automatically=visit.proposed_automatically,
        scheduled_at=visit.scheduled_at,
    )


def book(
    session: AsyncSession,
    runtime: VisitsRuntime,
    case: VisitsCase,
    office: Office,
    slot: domain.Slot,
    *,
    now: datetime,
    attempt: int,
    automatic: bool,
    why_late: TargetMissedReason,
    setting: VisitSetting = VisitSetting.HOME,
) -> VisitsVisit:
    """Put a visit into the calendar and publish "visit scheduled". The office must be
    locked and ``slot`` checked against its bookings."""
    assert case.target_date is not None, "only registered cases get visits"
    missed, reason = domain.target_verdict(office, slot.starts_at, case.target_date, why_late)
    visit = VisitsVisit(
        visit_id=str(uuid.uuid4()),
        case_id=case.case_id,
        bezirk=office.bezirk,
        familienbuero=office.slug,
        staff_id=slot.staff_id,
        # Stored and published in UTC; the office's time zone is for people only.
        starts_at=slot.starts_at.astimezone(UTC),
        ends_at=slot.ends_at.astimezone(UTC),
        setting=setting.value,
        status=VisitStatus.SCHEDULED.value,
        attempt=attempt,
        target_date=case.target_date,
        target_missed=missed,
        target_missed_reason=reason.value if reason else None,
        proposed_automatically=automatic,
        scheduled_at=now,
    )
    session.add(visit)
    case.open_visit_id = visit.visit_id
    case.updated_at = now
    runtime.outbox.add(session, scheduled_event(visit), time=now)
    return visit


async def propose(
    session: AsyncSession,
    runtime: VisitsRuntime,
    case: VisitsCase,
    *,
    now: datetime,
    why_late: TargetMissedReason | None = None,
    setting: VisitSetting = VisitSetting.HOME,
    attempt: int | None = None,
) -> VisitsVisit | None:
    """Schedule the case's next visit in the first free slot, target or not.

    The office must be locked. Looks ahead chunk by chunk, so a quiet office reads a
    fortnight of bookings, a full one more. Returns None when nothing is free within the
    scheduling horizon (the case stays due, and the overdue check will report it).
    """
    settings = runtime.settings
    office = Office.of(runtime.city, case.bezirk)
    assert case.target_date is not None
    assert case.registered_at is not None
    earliest = domain.earliest_proposal(
        now, case.registered_at, settings.proposal_lead_days, office.zone
    )
    horizon = earliest + timedelta(days=settings.scheduling_horizon_days)
    start = earliest
    while start < horizon:
        end = min(start + SEARCH_CHUNK, horizon)
        slot = domain.first_free_slot(
            office, await bookings(session, office, start, end), start, end
        )
        if slot is not None:
            return book(
                session,
                runtime,
                case,
                office,
                slot,
                now=now,
                attempt=attempt or await next_attempt(session, case.case_id),
                automatic=True,
                why_late=why_late
                or domain.proposal_miss_reason(office, earliest, case.target_date),
                setting=setting,
            )
        start = end
    return None


def cancelled_event(visit: VisitsVisit, *, role: Role) -> VisitCancelled:
    assert visit.cancel_reason is not None
    assert visit.closed_at is not None
    return VisitCancelled(
        **domain.keys_of(visit),
        reason=VisitCancelReason(visit.cancel_reason),
        cancelled_by_role=role,
        cancelled_at=visit.closed_at,
    )


async def cancel_open_visit(
    session: AsyncSession,
    runtime: VisitsRuntime,
    case: VisitsCase,
    *,
    reason: VisitCancelReason,
    now: datetime,
) -> VisitsVisit | None:
    """Cancel the case's scheduled visit, if any, on the system's behalf."""
    if case.open_visit_id is None:
        return None
    visit = await fresh_visit(session, case.open_visit_id)
    case.open_visit_id = None
    if visit is None or visit.status != VisitStatus.SCHEDULED.value:
        return None
    visit.status = VisitStatus.CANCELLED.value
    visit.cancel_reason = reason.value
    visit.cancelled_by_role = Role.SYSTEM.value
    visit.closed_at = now
    runtime.outbox.add(session, cancelled_event(visit, role=Role.SYSTEM), time=now)
    return visit


async def apply_consent(
    session: AsyncSession,
    runtime: VisitsRuntime,
    case: VisitsCase,
    facts: Iterable[ConsentFact],
    *,
    now: datetime,
    new_case: bool = False,
) -> None:
    """Bring the case in line with its consents: schedule, cancel, purge."""
    consent = domain.visit_consent_in_force(facts)
    state, reaction = domain.reconcile(CaseState(case.state), consent)
    case.state = state.value
    case.updated_at = now
    if reaction is domain.Reaction.SCHEDULE:
        await propose(session, runtime, case, now=now, attempt=1 if new_case else None)
    elif reaction is domain.Reaction.CANCEL:
        await cancel_open_visit(
            session, runtime, case, reason=VisitCancelReason.CONSENT_WITHDRAWN, now=now
        )
    if not consent:
        # Without a welcome-visit consent there is no purpose left for contact data here.
        case.personal = None


# -- what an event of staff changes in the rows ------------------------------------------------


def _close(case: VisitsCase, state: CaseState, now: datetime) -> None:
    case.open_visit_id = None
    case.state = state.value
    case.updated_at = now


def rescheduled(visit: VisitsVisit, case: VisitsCase, event: VisitRescheduled) -> None:
    visit.staff_id = event.staff_id
    visit.starts_at = event.starts_at
    visit.ends_at = event.ends_at
    visit.target_missed = event.target_missed
    reason = event.target_missed_reason
    visit.target_missed_reason = reason.value if reason else None
    visit.reschedule_count += 1
    case.updated_at = event.rescheduled_at


def missed(visit: VisitsVisit, case: VisitsCase, event: VisitMissed) -> None:
    visit.status = VisitStatus.MISSED.value
    visit.missed_follow_up = event.follow_up.value
    visit.closed_at = event.recorded_at
    _close(case, domain.state_after_missed(event.follow_up), event.recorded_at)


def declined(case: VisitsCase, visit: VisitsVisit | None, event: VisitDeclined) -> None:
    if visit is not None:
        visit.status = VisitStatus.DECLINED.value
        visit.declined_via = event.declined_via.value
        visit.closed_at = event.declined_at
    _close(case, CaseState.DECLINED, event.declined_at)


def cancelled(visit: VisitsVisit, case: VisitsCase, event: VisitCancelled) -> None:
    visit.status = VisitStatus.CANCELLED.value
    visit.cancel_reason = event.reason.value
    visit.cancelled_by_role = event.cancelled_by_role.value
    visit.closed_at = event.cancelled_at
    _close(case, domain.state_after_cancel(event.reason), event.cancelled_at)


def completed(visit: VisitsVisit, case: VisitsCase, event: VisitCompleted, now: datetime) -> None:
    visit.status = VisitStatus.COMPLETED.value
    visit.closed_at = event.completed_at
    visit.setting = event.setting.value
    visit.informed_about_offers = event.informed_about_offers
    visit.topics = ",".join(t.value for t in event.topics)
    visit.needs_noted = event.needs_noted
    visit.referral_wished_module = event.referral_wished_module
    _close(case, CaseState.VISITED, now)


# -- erasure -------------------------------------------------------------------------------------


def purge(case: VisitsCase) -> None:
    """Drop everything of an erased case that could single the family out."""
    case.personal = None
    case.clinic_id = None
    case.registered_at = None
    case.reference_date = None
    case.intake_target_date = None
    case.children_count = None
    case.preferred_language = None


async def forget_consents_and_outcomes(session: AsyncSession, case_id: str) -> None:
    """Delete an erased family's consents and what was said in its visits; when and whether
    a visit took place stays, pseudonymous, for the calendar and the figures."""
    await session.execute(delete(VisitsConsent).where(col(VisitsConsent.case_id) == case_id))
    await session.execute(
        update(VisitsVisit)
        .where(col(VisitsVisit.case_id) == case_id)
        .values(topics=None, needs_noted=None, referral_wished_module=None)
    )


# -- views ---------------------------------------------------------------------------------------


def visit_public(visit: VisitsVisit, *, full: bool) -> VisitPublic:
    """The API view of a visit; ``full`` includes the staff member (Familienbüro only)."""
    outcome = None
    if visit.status == VisitStatus.COMPLETED.value:
        outcome = Outcome(
            informed_about_offers=bool(visit.informed_about_offers),
            topics=[VisitTopic(t) for t in (visit.topics or "").split(",") if t],
            needs_noted=bool(visit.needs_noted),
            referral_wished_module=visit.referral_wished_module,
        )
    return VisitPublic.model_validate(
        {
            **visit.model_dump(exclude={"topics", "informed_about_offers", "needs_noted"}),
            "staff_id": visit.staff_id if full else None,
            "outcome": outcome,
        }
    )
