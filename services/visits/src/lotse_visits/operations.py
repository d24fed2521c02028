"""The use cases of the visits service, one function each: load what the decision needs,
let ``domain`` decide (it returns the event, or raises a ``Refusal``/``Conflict``), save the
rows and put the event in the outbox, all in one transaction.

What staff do arrives through api.py, what intake reports through consumers.py, and the
overdue check runs as a job; none of these functions knows HTTP. A refused action changes
nothing: every check runs before the transaction commits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from lotse_contracts.city import UnknownBezirk
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import ConsentScope
from lotse_contracts.events.intake import (
    CasesMerged,
    ConsentChanged,
    FamilyErased,
    FamilyRegistered,
    welcome_visit_target,
)
from lotse_contracts.events.visits import (
    MissedFollowUp,
    TargetMissedReason,
    VisitCancelReason,
    VisitOverdue,
)
from lotse_contracts.personal import EncryptedBlock
from lotse_runtime import audit
from lotse_runtime.consumer import EventRejected
from lotse_runtime.identity import Caller, CaseScope, ensure_may_access_case, event_role
from lotse_runtime.refusal import Conflict, Refusal
from sqlalchemy.ext.asyncio import AsyncSession

from lotse_visits import domain, store
from lotse_visits.domain import CaseState, ConsentFact, Office, VisitStatus
from lotse_visits.policy import OFFICE_ROLES, PURPOSE
from lotse_visits.settings import VisitsRuntime
from lotse_visits.tables import (
    Calendar,
    CancelRequest,
    CasePublic,
    CompleteRequest,
    DeclineRequest,
    DueCase,
    FreeSlot,
    NewVisitRequest,
    NoShowRequest,
    RescheduleRequest,
    VisitDetails,
    VisitPublic,
    VisitsCase,
    VisitsVisit,
    WorkingWindow,
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Who acts, in which service, and the route their accesses are audited under."""

    runtime: VisitsRuntime
    caller: Caller
    path: str

    @property
    def full_view(self) -> bool:
        """Office roles see staff ids and the sealed personal block."""
        return self.caller.role in OFFICE_ROLES

    def audit(self, session: AsyncSession, action: audit.AuditAction, case_id: str) -> None:
        audit.record(
            session,
            service=self.runtime.service,
            caller=self.caller,
            action=action,
            case_id=case_id,
            purpose=PURPOSE,
            path=self.path,
        )

    def recorded(
        self, session: AsyncSession, event: EventModel, case_id: str, now: datetime
    ) -> None:
        """Publish what staff recorded (outbox) and audit the change, in its transaction."""
        self.runtime.outbox.add(session, event, time=now)
        self.audit(session, audit.AuditAction.change, case_id)


# -- loading -------------------------------------------------------------------------------------


def utc(moment: datetime) -> datetime:
    """Times leave the API in UTC; ``time_zone`` tells clients how to show them."""
    return moment.astimezone(UTC)


def _scope(case: VisitsCase | None) -> CaseScope | None:
    if case is None:
        return None
    return CaseScope(bezirk=case.bezirk, case_id=case.case_id, registered_by_clinic=case.clinic_id)


def _office_of(ctx: Context, bezirk: str) -> Office:
    """The office of a Stadtbezirk the caller may see; an unknown one is refused (404)."""
    ensure_may_access_case(ctx.caller, CaseScope(bezirk=bezirk), personal_data=False)
    try:
        return Office.of(ctx.runtime.city, bezirk)
    except UnknownBezirk as exc:
        raise Refusal("bezirk", str(exc), status=404) from None


async def _visit_for_action(
    session: AsyncSession, caller: Caller, visit_id: str
) -> tuple[VisitsVisit, VisitsCase]:
    """Check the caller may act on the visit, lock its office, and load visit and case as
    they are now (the policy admits office roles only)."""
    visit = await session.get(VisitsVisit, visit_id)
    case = await session.get(VisitsCase, visit.case_id) if visit is not None else None
    ensure_may_access_case(caller, _scope(case), personal_data=False)
    assert visit is not None
    assert case is not None
    await store.lock_office(session, visit.bezirk)
    fresh_visit = await store.fresh_visit(session, visit_id)
    fresh_case = await store.fresh_case(session, visit.case_id)
    assert fresh_visit is not None
    assert fresh_case is not None
    return fresh_visit, fresh_case


async def _case_for_action(session: AsyncSession, caller: Caller, case_id: str) -> VisitsCase:
    case = await session.get(VisitsCase, case_id)
    ensure_may_access_case(caller, _scope(case), personal_data=False)
    assert case is not None
    await store.lock_office(session, case.bezirk)
    fresh = await store.fresh_case(session, case_id)
    assert fresh is not None
    return fresh


async def _case_public(session: AsyncSession, case: VisitsCase, *, full: bool) -> CasePublic:
    visits = await store.visits_of_case(session, case.case_id)
    personal = EncryptedBlock.model_validate_json(case.personal) if full and case.personal else None
    return CasePublic(
        case_id=case.case_id,
        bezirk=case.bezirk,
        state=CaseState(case.state),
        channel=case.channel,
        registered_at=case.registered_at,
        reference_date=case.reference_date,
        target_date=case.target_date,
        children_count=case.children_count,
        preferred_language=case.preferred_language,
        welcome_visit_consent=await store.latest_consent_state(session, case.case_id),
        overdue_raised_at=case.overdue_raised_at,
        personal=personal,
        visits=[store.visit_public(v, full=full) for v in visits],
    )


# -- reading -------------------------------------------------------------------------------------


async def calendar(ctx: Context, bezirk: str, day: date | None) -> Calendar:
    """An office's calendar of one local day (default today): visits and free slots."""
    office = _office_of(ctx, bezirk)
    now = ctx.runtime.clock()
    day = day or office.local_date(now)
    start, end = office.start_of(day), office.start_of(day + timedelta(days=1))
    full = ctx.full_view
    async with ctx.runtime.db.transaction() as session:
        visits = await store.visits_of_office(session, bezirk, start, end)
        booked = await store.bookings(session, office, start, end)
    free = domain.free_slots(office, booked, day, not_before=now)
    if full:
        slots = [
            FreeSlot(staff_id=s.staff_id, starts_at=utc(s.starts_at), ends_at=utc(s.ends_at))
            for s in free
        ]
    else:
        # Without staff ids, a free time is listed once however many staff are free.
        times = sorted({(utc(s.starts_at), utc(s.ends_at)) for s in free})
        slots = [FreeSlot(staff_id=None, starts_at=a, ends_at=b) for a, b in times]
    return Calendar(
        bezirk=bezirk,
        familienbuero=office.slug,
        name=office.name,
        day=day,
        time_zone=office.zone.key,
        working_windows=[
            WorkingWindow(starts_at=utc(a), ends_at=utc(b)) for a, b in office.windows_on(day)
        ],
        staff_ids=list(office.staff_ids) if full else None,
        visits=[store.visit_public(v, full=full) for v in visits],
        free_slots=slots,
    )


async def due(ctx: Context, bezirk: str, limit: int) -> list[DueCase]:
    """Families of an office that still need an appointment, most urgent first: after a
    no-show with a letter, a cancellation for staff reasons, or when nothing was free
    within the scheduling horizon."""
    office = _office_of(ctx, bezirk)
    today = office.local_date(ctx.runtime.clock())
    async with ctx.runtime.db.transaction() as session:
        result = []
        for case in await store.due_cases(session, bezirk, limit):
            visits = await store.visits_of_case(session, case.case_id)
            result.append(
                DueCase(
                    case_id=case.case_id,
                    state=CaseState(case.state),
                    target_date=case.target_date,
                    overdue=case.target_date is not None and case.target_date < today,
                    overdue_raised_at=case.overdue_raised_at,
                    last_visit_status=VisitStatus(visits[-1].status) if visits else None,
                )
            )
    return result


async def visit_details(ctx: Context, visit_id: str) -> VisitDetails:
    """A visit with its case; reading the sealed personal block is audited."""
    full = ctx.full_view
    async with ctx.runtime.db.transaction() as session:
        visit = await session.get(VisitsVisit, visit_id)
        case = await session.get(VisitsCase, visit.case_id) if visit is not None else None
        ensure_may_access_case(ctx.caller, _scope(case), personal_data=full)
        assert visit is not None
        assert case is not None
        details = VisitDetails(
            visit=store.visit_public(visit, full=full),
            case=await _case_public(session, case, full=full),
        )
        if details.case.personal is not None:
            ctx.audit(session, audit.AuditAction.read, case.case_id)
    return details


async def case_details(ctx: Context, case_id: str) -> CasePublic:
    """A family's case with all its visits; reading the personal block is audited."""
    full = ctx.full_view
    async with ctx.runtime.db.transaction() as session:
        case = await session.get(VisitsCase, case_id)
        ensure_may_access_case(ctx.caller, _scope(case), personal_data=full)
        assert case is not None
        result = await _case_public(session, case, full=full)
        if result.personal is not None:
            ctx.audit(session, audit.AuditAction.read, case_id)
    return result


# -- what staff record ---------------------------------------------------------------------------


async def reschedule(ctx: Context, visit_id: str, change: RescheduleRequest) -> VisitPublic:
    runtime = ctx.runtime
    async with runtime.db.transaction() as session:
        visit, case = await _visit_for_action(session, ctx.caller, visit_id)
        now = runtime.clock()
        office = Office.of(runtime.city, visit.bezirk)
        booked = await store.bookings(session, office, change.starts_at, change.starts_at)
        event = domain.reschedule(
            office,
            visit,
            starts_at=change.starts_at,
            wanted=change.staff_id,
            by=change.rescheduled_by,
            booked=booked,
            now=now,
        )
        store.rescheduled(visit, case, event)
        ctx.recorded(session, event, case.case_id, now)
        return store.visit_public(visit, full=True)


async def no_show(ctx: Context, visit_id: str, report: NoShowRequest) -> VisitPublic:
    """The family was not there; with a new appointment offered, the next free slot."""
    runtime = ctx.runtime
    async with runtime.db.transaction() as session:
        visit, case = await _visit_for_action(session, ctx.caller, visit_id)
        now = runtime.clock()
        event = domain.no_show(visit, report.follow_up, now)
        store.missed(visit, case, event)
        ctx.recorded(session, event, case.case_id, now)
        if report.follow_up is MissedFollowUp.NEW_APPOINTMENT_OFFERED:
            follow = await store.propose(
                session, runtime, case, now=now, why_late=TargetMissedReason.FAMILY_UNREACHABLE
            )
            visit.follow_up_visit_id = follow.visit_id if follow is not None else None
        return store.visit_public(visit, full=True)


async def decline_visit(ctx: Context, visit_id: str, report: DeclineRequest) -> VisitPublic:
    runtime = ctx.runtime
    async with runtime.db.transaction() as session:
        visit, case = await _visit_for_action(session, ctx.caller, visit_id)
        now = runtime.clock()
        office = Office.of(runtime.city, case.bezirk)
        event = domain.decline(office, case, visit, report.declined_via, now)
        store.declined(case, visit, event)
        ctx.recorded(session, event, case.case_id, now)
        return store.visit_public(visit, full=True)


async def decline_case(ctx: Context, case_id: str, report: DeclineRequest) -> CasePublic:
    """A family without a scheduled visit does not want one."""
    runtime = ctx.runtime
    async with runtime.db.transaction() as session:
        case = await _case_for_action(session, ctx.caller, case_id)
        now = runtime.clock()
        office = Office.of(runtime.city, case.bezirk)
        event = domain.decline(office, case, None, report.declined_via, now)
        store.declined(case, None, event)
        ctx.recorded(session, event, case_id, now)
        return await _case_public(session, case, full=True)


async def cancel(ctx: Context, visit_id: str, order: CancelRequest) -> VisitPublic:
    # The policy admits Familienbüro staff only, whom the events name as familienbuero.
    runtime = ctx.runtime
    async with runtime.db.transaction() as session:
        visit, case = await _visit_for_action(session, ctx.caller, visit_id)
        now = runtime.clock()
        event = domain.cancel(visit, order.reason, event_role(ctx.caller.role), now)
        store.cancelled(visit, case, event)
        ctx.recorded(session, event, case.case_id, now)
        return store.visit_public(visit, full=True)


async def complete(ctx: Context, visit_id: str, outcome: CompleteRequest) -> VisitPublic:
    runtime = ctx.runtime
    async with runtime.db.transaction() as session:
        visit, case = await _visit_for_action(session, ctx.caller, visit_id)
        now = runtime.clock()
        office = Office.of(runtime.city, visit.bezirk)
        event = domain.complete(
            office, runtime.city, visit, outcome, reference=case.reference_date, now=now
        )
        store.completed(visit, case, event, now)
        ctx.recorded(session, event, case.case_id, now)
        return store.visit_public(visit, full=True)


async def new_visit(ctx: Context, case_id: str, wish: NewVisitRequest) -> VisitPublic:
    """A new visit for a family without one: the first free slot, or the one staff chose."""
    runtime = ctx.runtime
    domain.check_chosen_slot(wish.starts_at, wish.staff_id)
    async with runtime.db.transaction() as session:
        case = await _case_for_action(session, ctx.caller, case_id)
        now = runtime.clock()
        office = Office.of(runtime.city, case.bezirk)
        consent = await store.consent_in_force(session, case_id)
        why = domain.new_visit_miss_reason(
            CaseState(case.state), case.open_visit_id is not None, consent
        )
        case.state = CaseState.ACTIVE.value
        if wish.starts_at is None:
            visit = await store.propose(
                session, runtime, case, now=now, why_late=why, setting=wish.setting
            )
            if visit is None:
                raise Conflict(
                    "starts_at",
                    f"{office.name} has no free slot in the next "
                    f"{runtime.settings.scheduling_horizon_days} days",
                )
        else:
            domain.check_appointment(office, wish.starts_at, now)
            booked = await store.bookings(session, office, wish.starts_at, wish.starts_at)
            staff_id = domain.staff_for(office, wish.starts_at, booked, wanted=wish.staff_id)
            visit = store.book(
                session,
                runtime,
                case,
                office,
                domain.Slot(staff_id, wish.starts_at, wish.starts_at + office.visit_length),
                now=now,
                attempt=await store.next_attempt(session, case_id),
                automatic=False,
                why_late=why,
                setting=wish.setting,
            )
        ctx.audit(session, audit.AuditAction.change, case_id)
        return store.visit_public(visit, full=True)


# -- what intake reports -------------------------------------------------------------------------
#
# Intake events can arrive twice or out of order (a consent withdrawal may overtake the
# registration, an erasure may come first of all). Each use case stores what it learnt per
# case and decides from the stored whole, so that each family gets at most one automatic
# welcome-visit proposal, and none without consent.


async def _case_or_placeholder(
    session: AsyncSession, case_id: str, bezirk: str, *, state: CaseState, now: datetime
) -> tuple[VisitsCase, bool]:
    """Lock the office and load the case; an unknown case is added in ``state`` (a
    placeholder for a registration that has not arrived yet). True when it is new."""
    case = await store.locked_case(session, case_id, bezirk)
    if case is not None:
        return case, False
    case = VisitsCase(case_id=case_id, bezirk=bezirk, state=state.value, updated_at=now)
    session.add(case)
    return case, True


async def register_family(
    runtime: VisitsRuntime, session: AsyncSession, data: FamilyRegistered
) -> None:
    """A family was registered: file its case with its target date, schedule its visit
    when consent is in force (a second registration only adds its consents)."""
    try:
        office = Office.of(runtime.city, data.bezirk)
    except UnknownBezirk as exc:
        raise EventRejected(f"bezirk: {exc}") from None
    now = runtime.clock()
    case, new_case = await _case_or_placeholder(
        session, data.case_id, data.bezirk, state=CaseState.AWAITING_REGISTRATION, now=now
    )
    if case.state == CaseState.ERASED.value:
        _log.info("registration of an erased case ignored", extra={"case": data.case_id})
        return
    facts = await store.record_consents(
        session,
        data.case_id,
        [
            ConsentFact(c.consent_id, c.state, c.at)
            for c in data.consents
            if c.scope is ConsentScope.WELCOME_VISIT
        ],
        new_case=new_case,
    )
    if case.state != CaseState.AWAITING_REGISTRATION.value:
        # Registered before: one welcome visit per family, so only consents count.
        await store.apply_consent(session, runtime, case, facts, now=now)
        return
    reference = domain.reference_date(
        data.channel, data.registered_at, data.days_since_birth_at_registration, office.zone
    )
    # The registration decides the Bezirk (an early consent change may have filed the case
    # elsewhere; locked_case locked both offices then).
    case.bezirk = data.bezirk
    case.channel = data.channel.value
    case.clinic_id = data.clinic_id
    case.registered_at = data.registered_at
    case.reference_date = reference
    # The same rule intake used for visit_target_date, unless this service overrides the
    # city's target (visit_target_days).
    case.target_date = welcome_visit_target(
        data.channel,
        data.registered_at.astimezone(office.zone).date(),
        data.days_since_birth_at_registration,
        store.target_days(runtime),
    )
    case.intake_target_date = data.visit_target_date
    case.children_count = data.children_count
    case.preferred_language = data.preferred_language
    case.personal = data.personal.model_dump_json()
    case.state = CaseState.WITHOUT_CONSENT.value
    await store.apply_consent(session, runtime, case, facts, now=now, new_case=new_case)


async def change_consent(
    runtime: VisitsRuntime, session: AsyncSession, data: ConsentChanged
) -> None:
    """A welcome-visit consent was given or withdrawn: schedule or cancel accordingly; a
    change that overtook the registration is remembered for when that arrives."""
    if data.scope is not ConsentScope.WELCOME_VISIT:
        return  # Träger contact and screening use are the referrals' business
    now = runtime.clock()
    case, new_case = await _case_or_placeholder(
        session, data.case_id, data.bezirk, state=CaseState.AWAITING_REGISTRATION, now=now
    )
    if case.state == CaseState.ERASED.value:
        return
    facts = await store.record_consents(
        session,
        data.case_id,
        [ConsentFact(data.consent_id, data.state, data.changed_at)],
        new_case=new_case,
    )
    await store.apply_consent(session, runtime, case, facts, now=now)


async def erase_family(runtime: VisitsRuntime, session: AsyncSession, data: FamilyErased) -> None:
    """The family's data was erased: cancel its open visit, keep a pseudonymous tombstone
    (which keeps a late registration from scheduling anything)."""
    now = runtime.clock()
    runtime.db.forget_after_commit(session)
    case, _ = await _case_or_placeholder(
        session, data.case_id, data.bezirk, state=CaseState.ERASED, now=now
    )
    await store.cancel_open_visit(
        session, runtime, case, reason=VisitCancelReason.CASE_ERASED, now=now
    )
    store.purge(case)
    case.state = CaseState.ERASED.value
    case.erased_at = data.erased_at
    case.updated_at = now
    await store.forget_consents_and_outcomes(session, data.case_id)


async def merge_cases(runtime: VisitsRuntime, session: AsyncSession, data: CasesMerged) -> None:
    """Two cases were one family: it is visited once, as the survivor. The merged case's
    open visit is cancelled (reason ``duplicate``) and the case closed (merged before its
    registration arrived: a closed tombstone); the survivor keeps or gets its own visit
    from its consents (intake carried the merged case's over to it, as ``consent-changed``
    of the survivor). A family already visited under the merged case is not visited again:
    the survivor's open visit is cancelled too."""
    now = runtime.clock()
    merged, _ = await _case_or_placeholder(
        session, data.merged_case_id, data.merged_bezirk, state=CaseState.CLOSED, now=now
    )
    if merged.state == CaseState.ERASED.value:
        return
    visited = merged.state == CaseState.VISITED.value
    await store.cancel_open_visit(
        session, runtime, merged, reason=VisitCancelReason.DUPLICATE, now=now
    )
    merged.state = CaseState.CLOSED.value
    merged.updated_at = now
    merged.personal = None
    survivor = await store.locked_case(session, data.surviving_case_id, data.bezirk)
    if visited and survivor is not None and survivor.state == CaseState.ACTIVE.value:
        await store.cancel_open_visit(
            session, runtime, survivor, reason=VisitCancelReason.DUPLICATE, now=now
        )
        survivor.state = CaseState.VISITED.value
        survivor.updated_at = now
    await session.flush()


# -- what the service notices itself -------------------------------------------------------------


async def check_overdue(runtime: VisitsRuntime) -> None:
    """Raise "visit overdue" once for every due case whose target date has passed.

    Runs periodically. The conditional update marks a case as reported and publishes in one
    transaction, so a case is reported exactly once however often the check runs, and never
    after its visit was completed in the meantime.
    """
    now = runtime.clock()
    today = now.astimezone(runtime.city.zone()).date()
    batch = runtime.settings.overdue_batch_size
    skipped: set[str] = set()
    while True:
        async with runtime.db.transaction() as session:
            cases = await store.overdue_candidates(session, today, batch, skipped)
            for case in cases:
                try:
                    office = Office.of(runtime.city, case.bezirk)
                except UnknownBezirk:
                    _log.error(
                        "case of a Bezirk the city no longer has", extra={"case": case.case_id}
                    )
                    skipped.add(case.case_id)
                    continue
                if not await store.mark_overdue(session, case.case_id, now):
                    continue  # completed, declined or reported meanwhile
                runtime.outbox.add(
                    session, overdue_event(case, office, today=today, now=now), time=now
                )
        if len(cases) < batch:
            return


def overdue_event(case: VisitsCase, office: Office, *, today: date, now: datetime) -> VisitOverdue:
    assert case.target_date is not None
    return VisitOverdue(
        case_id=case.case_id,
        bezirk=case.bezirk,
        familienbuero=office.slug,
        visit_id=case.open_visit_id,
        target_date=case.target_date,
        days_overdue=domain.days_overdue(case.target_date, today),
        detected_at=now,
    )
