"""HTTP API of the visits service: an office's calendar, a visit's and a case's details, and
what staff record about a visit (reschedule, no-show, declined, cancelled, completed).

Who may do what: Familienbüro staff act on and read the visits of their own Stadtbezirk;
the Bezirksteam (district coordination team) reads them without staff ids or personal data,
and so do, for a single case, the Babylotse (baby pilot) of the clinic that registered the
family and the data-protection officer; other Lotse services may do everything. A refused
action changes nothing: every check runs before the transaction commits, and the answer
names the field and the reason. The roles of each route are declared in policy.py and
enforced by the runtime; the routes check the case's Stadtbezirk or clinic themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from lotse_contracts.city import UnknownBezirk
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.visits import (
    MissedFollowUp,
    TargetMissedReason,
    VisitCompleted,
    VisitDeclined,
    VisitMissed,
    VisitRescheduled,
    VisitSetting,
)
from lotse_contracts.personal import EncryptedBlock
from lotse_runtime import audit
from lotse_runtime.app import ServiceRuntime, runtime_of
from lotse_runtime.identity import (
    Caller,
    CallerDep,
    CaseScope,
    Role,
    ensure_may_access_case,
)
from lotse_runtime.inputs import CALENDAR_DAY, CalendarDay
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_visits import domain, store
from lotse_visits.domain import CaseState, Conflict, Office, VisitStatus
from lotse_visits.policy import OFFICE_ROLES, PURPOSE
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

VisitId = Annotated[str, Path(description="Id of the visit.")]
CaseId = Annotated[str, Path(description="Pseudonymous case id.")]

REFUSALS: dict[int | str, dict[str, object]] = {
    403: {"description": "Not permitted (also for unknown ids)."},
    409: {"description": "The visit's state does not allow this; the reason names the field."},
    422: {"description": "A value cannot be accepted; the reason names the field."},
}


def utc(moment: datetime) -> datetime:
    """Times leave the API in UTC; ``time_zone`` tells clients how to show them."""
    return moment.astimezone(UTC)


def _full_view(caller: Caller) -> bool:
    return caller.role in OFFICE_ROLES


def _scope(case: VisitsCase | None) -> CaseScope | None:
    if case is None:
        return None
    return CaseScope(bezirk=case.bezirk, case_id=case.case_id, registered_by_clinic=case.clinic_id)


def _acting_role(caller: Caller) -> EventRole:
    return EventRole.FAMILIENBUERO if caller.role is Role.familienbuero else EventRole.SYSTEM


def _audit(
    session: AsyncSession,
    runtime: ServiceRuntime[Any],
    caller: Caller,
    action: audit.AuditAction,
    case_id: str,
    request: Request,
) -> None:
    route = request.scope.get("route")
    audit.record(
        session,
        service=runtime.service,
        caller=caller,
        action=action,
        case_id=case_id,
        purpose=PURPOSE,
        path=getattr(route, "path", request.url.path),
    )


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


def visits_router() -> APIRouter:
    router = APIRouter(tags=["visits"])

    # -- reading ---------------------------------------------------------------------------------

    @router.get(
        "/offices/{bezirk}/calendar",
        response_model=Calendar,
        summary="A Familienbüro's calendar of one day",
        responses={403: REFUSALS[403], 404: {"description": "No such Stadtbezirk."}},
    )
    async def calendar(
        request: Request,
        caller: CallerDep,
        bezirk: Annotated[str, Path(description="Stadtbezirk slug, e.g. hoerde.")],
        day: Annotated[
            CalendarDay | None,
            Query(description=f"Local day (YYYY-MM-DD); default today. {CALENDAR_DAY.text}."),
        ] = None,
    ) -> Calendar:
        runtime = runtime_of(request)
        ensure_may_access_case(caller, CaseScope(bezirk=bezirk), personal_data=False)
        try:
            office = Office.of(runtime.city, bezirk)
        except UnknownBezirk as exc:
            raise HTTPException(404, detail=str(exc)) from None
        now = runtime.clock()
        day = day or office.local_date(now)
        start, end = office.start_of(day), office.start_of(day + timedelta(days=1))
        full = _full_view(caller)
        async with runtime.db.transaction() as session:
            rows = await session.execute(
                select(VisitsVisit)
                .where(
                    col(VisitsVisit.bezirk) == bezirk,
                    col(VisitsVisit.starts_at) >= start,
                    col(VisitsVisit.starts_at) < end,
                )
                .order_by(col(VisitsVisit.starts_at), col(VisitsVisit.staff_id))
            )
            visits = list(rows.scalars())
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

    @router.get(
        "/offices/{bezirk}/due",
        response_model=list[DueCase],
        summary="Families of an office that still need an appointment, most urgent first",
        responses={403: REFUSALS[403], 404: {"description": "No such Stadtbezirk."}},
    )
    async def due(
        request: Request,
        caller: CallerDep,
        bezirk: Annotated[str, Path(description="Stadtbezirk slug, e.g. hoerde.")],
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> list[DueCase]:
        runtime = runtime_of(request)
        ensure_may_access_case(caller, CaseScope(bezirk=bezirk), personal_data=False)
        try:
            office = Office.of(runtime.city, bezirk)
        except UnknownBezirk as exc:
            raise HTTPException(404, detail=str(exc)) from None
        today = office.local_date(runtime.clock())
        async with runtime.db.transaction() as session:
            # Due, but without an appointment: after a no-show with a letter, a cancellation
            # for staff reasons, or when nothing was free within the scheduling horizon.
            cases = list(
                (
                    await session.execute(
                        select(VisitsCase)
                        .where(
                            col(VisitsCase.bezirk) == bezirk,
                            col(VisitsCase.state) == CaseState.ACTIVE.value,
                            col(VisitsCase.open_visit_id).is_(None),
                        )
                        .order_by(col(VisitsCase.target_date), col(VisitsCase.case_id))
                        .limit(limit)
                    )
                ).scalars()
            )
            result = []
            for case in cases:
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

    @router.get(
        "/visits/{visit_id}",
        response_model=VisitDetails,
        summary="A visit with its case (sealed personal data for the Familienbüro only)",
        responses={403: REFUSALS[403]},
    )
    async def visit_details(request: Request, caller: CallerDep, visit_id: VisitId) -> VisitDetails:
        runtime = runtime_of(request)
        full = _full_view(caller)
        async with runtime.db.transaction() as session:
            visit = await session.get(VisitsVisit, visit_id)
            case = await session.get(VisitsCase, visit.case_id) if visit is not None else None
            ensure_may_access_case(caller, _scope(case), personal_data=full)
            assert visit is not None
            assert case is not None
            details = VisitDetails(
                visit=store.visit_public(visit, full=full),
                case=await _case_public(session, case, full=full),
            )
            if details.case.personal is not None:
                _audit(session, runtime, caller, audit.AuditAction.read, case.case_id, request)
        return details

    @router.get(
        "/cases/{case_id}",
        response_model=CasePublic,
        summary="A family's welcome-visit case with all its visits",
        responses={403: REFUSALS[403]},
    )
    async def case_details(request: Request, caller: CallerDep, case_id: CaseId) -> CasePublic:
        runtime = runtime_of(request)
        full = _full_view(caller)
        async with runtime.db.transaction() as session:
            case = await session.get(VisitsCase, case_id)
            ensure_may_access_case(caller, _scope(case), personal_data=full)
            assert case is not None
            result = await _case_public(session, case, full=full)
            if result.personal is not None:
                _audit(session, runtime, caller, audit.AuditAction.read, case_id, request)
        return result

    # -- acting ----------------------------------------------------------------------------------

    @router.post(
        "/visits/{visit_id}/reschedule",
        response_model=VisitPublic,
        summary="Move a scheduled visit to another time (and staff member)",
        responses=REFUSALS,
    )
    async def reschedule(
        request: Request, caller: CallerDep, visit_id: VisitId, body: RescheduleRequest
    ) -> VisitPublic:
        runtime = runtime_of(request)
        async with runtime.db.transaction() as session:
            visit, case = await _visit_for_action(session, caller, visit_id)
            now = runtime.clock()
            office = Office.of(runtime.city, visit.bezirk)
            domain.check_open(VisitStatus(visit.status), "reschedule")
            domain.check_appointment(office, body.starts_at, now)
            booked = await store.bookings(session, office, body.starts_at, body.starts_at)
            staff_id = domain.staff_for(
                office,
                body.starts_at,
                booked,
                wanted=body.staff_id,
                preferred=visit.staff_id,
                ignore_visit=visit.visit_id,
            )
            if staff_id == visit.staff_id and body.starts_at == visit.starts_at:
                raise Conflict("starts_at", "is the visit's current appointment")
            missed, reason = domain.target_verdict(
                office,
                body.starts_at,
                visit.target_date,
                domain.reschedule_miss_reason(body.rescheduled_by),
            )
            previous = visit.starts_at
            visit.staff_id = staff_id
            visit.starts_at = body.starts_at.astimezone(UTC)
            visit.ends_at = visit.starts_at + office.visit_length
            visit.target_missed = missed
            visit.target_missed_reason = reason.value if reason else None
            visit.reschedule_count += 1
            case.updated_at = now
            runtime.outbox.add(
                session,
                VisitRescheduled(
                    visit_id=visit.visit_id,
                    case_id=visit.case_id,
                    bezirk=visit.bezirk,
                    familienbuero=visit.familienbuero,
                    staff_id=staff_id,
                    previous_starts_at=previous,
                    starts_at=visit.starts_at,
                    ends_at=visit.ends_at,
                    target_date=visit.target_date,
                    target_missed=missed,
                    target_missed_reason=reason,
                    rescheduled_by=body.rescheduled_by,
                    rescheduled_at=now,
                ),
                time=now,
            )
            _audit(session, runtime, caller, audit.AuditAction.change, case.case_id, request)
            return store.visit_public(visit, full=True)

    @router.post(
        "/visits/{visit_id}/no-show",
        response_model=VisitPublic,
        summary="Record that the family was not there; optionally offer the next free slot",
        responses=REFUSALS,
    )
    async def no_show(
        request: Request, caller: CallerDep, visit_id: VisitId, body: NoShowRequest
    ) -> VisitPublic:
        runtime = runtime_of(request)
        async with runtime.db.transaction() as session:
            visit, case = await _visit_for_action(session, caller, visit_id)
            now = runtime.clock()
            domain.check_open(VisitStatus(visit.status), "no_show")
            domain.check_no_show(visit.starts_at, now)
            visit.status = VisitStatus.MISSED.value
            visit.missed_follow_up = body.follow_up.value
            visit.closed_at = now
            case.open_visit_id = None
            case.state = domain.state_after_missed(body.follow_up).value
            case.updated_at = now
            runtime.outbox.add(
                session,
                VisitMissed(
                    visit_id=visit.visit_id,
                    case_id=visit.case_id,
                    bezirk=visit.bezirk,
                    familienbuero=visit.familienbuero,
                    scheduled_for=visit.starts_at,
                    attempt=visit.attempt,
                    follow_up=body.follow_up,
                    recorded_at=now,
                ),
                time=now,
            )
            if body.follow_up is MissedFollowUp.NEW_APPOINTMENT_OFFERED:
                follow = await store.propose(
                    session,
                    runtime,
                    case,
                    now=now,
                    why_late=TargetMissedReason.FAMILY_UNREACHABLE,
                )
                visit.follow_up_visit_id = follow.visit_id if follow is not None else None
            _audit(session, runtime, caller, audit.AuditAction.change, case.case_id, request)
            return store.visit_public(visit, full=True)

    @router.post(
        "/visits/{visit_id}/decline",
        response_model=VisitPublic,
        summary="Record that the family does not want the visit",
        responses=REFUSALS,
    )
    async def decline(
        request: Request, caller: CallerDep, visit_id: VisitId, body: DeclineRequest
    ) -> VisitPublic:
        runtime = runtime_of(request)
        async with runtime.db.transaction() as session:
            visit, case = await _visit_for_action(session, caller, visit_id)
            now = runtime.clock()
            domain.check_open(VisitStatus(visit.status), "decline")
            visit.status = VisitStatus.DECLINED.value
            visit.declined_via = body.declined_via.value
            visit.closed_at = now
            _declined(session, runtime, case, visit, body, now)
            _audit(session, runtime, caller, audit.AuditAction.change, case.case_id, request)
            return store.visit_public(visit, full=True)

    @router.post(
        "/cases/{case_id}/decline",
        response_model=CasePublic,
        summary="Record that a family without a scheduled visit does not want one",
        responses=REFUSALS,
    )
    async def decline_case(
        request: Request, caller: CallerDep, case_id: CaseId, body: DeclineRequest
    ) -> CasePublic:
        runtime = runtime_of(request)
        async with runtime.db.transaction() as session:
            case = await _case_for_action(session, caller, case_id)
            now = runtime.clock()
            if case.open_visit_id is not None:
                raise Conflict(
                    "case_id",
                    f"the family has a scheduled visit; decline it: "
                    f"POST /visits/{case.open_visit_id}/decline",
                )
            if case.state not in (CaseState.ACTIVE.value, CaseState.NOT_REACHED.value):
                raise Conflict("case_id", f"the case is {case.state}; no visit is due")
            _declined(session, runtime, case, None, body, now)
            _audit(session, runtime, caller, audit.AuditAction.change, case_id, request)
            return await _case_public(session, case, full=True)

    @router.post(
        "/visits/{visit_id}/cancel",
        response_model=VisitPublic,
        summary="Cancel a scheduled visit (the Familienbüro's decision)",
        responses=REFUSALS,
    )
    async def cancel(
        request: Request, caller: CallerDep, visit_id: VisitId, body: CancelRequest
    ) -> VisitPublic:
        runtime = runtime_of(request)
        async with runtime.db.transaction() as session:
            visit, case = await _visit_for_action(session, caller, visit_id)
            now = runtime.clock()
            domain.check_open(VisitStatus(visit.status), "cancel")
            domain.check_staff_cancel_reason(body.reason)
            role = _acting_role(caller)
            visit.status = VisitStatus.CANCELLED.value
            visit.cancel_reason = body.reason.value
            visit.cancelled_by_role = role.value
            visit.closed_at = now
            case.open_visit_id = None
            case.state = domain.state_after_cancel(body.reason).value
            case.updated_at = now
            runtime.outbox.add(session, store.cancelled_event(visit, role=role), time=now)
            _audit(session, runtime, caller, audit.AuditAction.change, case.case_id, request)
            return store.visit_public(visit, full=True)

    @router.post(
        "/visits/{visit_id}/complete",
        response_model=VisitPublic,
        summary="Record that the visit took place, with its outcome",
        responses=REFUSALS,
    )
    async def complete(
        request: Request, caller: CallerDep, visit_id: VisitId, body: CompleteRequest
    ) -> VisitPublic:
        runtime = runtime_of(request)
        async with runtime.db.transaction() as session:
            visit, case = await _visit_for_action(session, caller, visit_id)
            now = runtime.clock()
            office = Office.of(runtime.city, visit.bezirk)
            domain.check_open(VisitStatus(visit.status), "complete")
            completed_at = body.completed_at or now
            domain.check_completion(visit.starts_at, completed_at, now)
            domain.check_module(runtime.city, body.referral_wished_module)
            topics = list(dict.fromkeys(body.topics))  # once each, in the order given
            setting = body.setting or VisitSetting(visit.setting)
            visit.status = VisitStatus.COMPLETED.value
            visit.closed_at = completed_at
            visit.setting = setting.value
            visit.informed_about_offers = body.informed_about_offers
            visit.topics = ",".join(t.value for t in topics)
            visit.needs_noted = body.needs_noted
            visit.referral_wished_module = body.referral_wished_module
            case.open_visit_id = None
            case.state = CaseState.VISITED.value
            case.updated_at = now
            reference = case.reference_date or office.local_date(visit.starts_at)
            runtime.outbox.add(
                session,
                VisitCompleted(
                    visit_id=visit.visit_id,
                    case_id=visit.case_id,
                    bezirk=visit.bezirk,
                    familienbuero=visit.familienbuero,
                    staff_id=visit.staff_id,
                    scheduled_for=visit.starts_at,
                    completed_at=completed_at,
                    setting=setting,
                    informed_about_offers=body.informed_about_offers,
                    topics=topics,
                    needs_noted=body.needs_noted,
                    referral_wished_module=body.referral_wished_module,
                    days_since_reference=domain.days_since_reference(
                        office, visit.starts_at, reference
                    ),
                ),
                time=now,
            )
            _audit(session, runtime, caller, audit.AuditAction.change, case.case_id, request)
            return store.visit_public(visit, full=True)

    @router.post(
        "/cases/{case_id}/visits",
        response_model=VisitPublic,
        status_code=201,
        summary="Arrange a new visit for a family without one (first free slot, or a chosen one)",
        responses=REFUSALS,
    )
    async def new_visit(
        request: Request, caller: CallerDep, case_id: CaseId, body: NewVisitRequest
    ) -> VisitPublic:
        runtime = runtime_of(request)
        if body.starts_at is None and body.staff_id is not None:
            raise domain.Invalid("staff_id", "name a staff member only together with starts_at")
        async with runtime.db.transaction() as session:
            case = await _case_for_action(session, caller, case_id)
            now = runtime.clock()
            office = Office.of(runtime.city, case.bezirk)
            state = CaseState(case.state)
            consent = await store.consent_in_force(session, case_id)
            domain.check_new_visit(state, case.open_visit_id is not None, consent)
            why = {
                CaseState.DECLINED: TargetMissedReason.FAMILY_REQUEST,
                CaseState.NOT_REACHED: TargetMissedReason.FAMILY_UNREACHABLE,
            }.get(state, TargetMissedReason.NO_CAPACITY)
            case.state = CaseState.ACTIVE.value
            if body.starts_at is None:
                visit = await store.propose(
                    session, runtime, case, now=now, why_late=why, setting=body.setting
                )
                if visit is None:
                    raise Conflict(
                        "starts_at",
                        f"{office.name} has no free slot in the next "
                        f"{store.settings_of(runtime).scheduling_horizon_days} days",
                    )
            else:
                domain.check_appointment(office, body.starts_at, now)
                booked = await store.bookings(session, office, body.starts_at, body.starts_at)
                staff_id = domain.staff_for(office, body.starts_at, booked, wanted=body.staff_id)
                visit = store.book(
                    session,
                    runtime,
                    case,
                    office,
                    domain.Slot(staff_id, body.starts_at, body.starts_at + office.visit_length),
                    now=now,
                    attempt=await store.next_attempt(session, case_id),
                    automatic=False,
                    why_late=why,
                    setting=body.setting,
                )
            _audit(session, runtime, caller, audit.AuditAction.change, case_id, request)
            return store.visit_public(visit, full=True)

    return router


def _declined(
    session: AsyncSession,
    runtime: ServiceRuntime[Any],
    case: VisitsCase,
    visit: VisitsVisit | None,
    body: DeclineRequest,
    now: datetime,
) -> None:
    case.open_visit_id = None
    case.state = CaseState.DECLINED.value
    case.updated_at = now
    runtime.outbox.add(
        session,
        VisitDeclined(
            visit_id=visit.visit_id if visit is not None else None,
            case_id=case.case_id,
            bezirk=case.bezirk,
            familienbuero=Office.of(runtime.city, case.bezirk).slug,
            declined_via=body.declined_via,
            declined_at=now,
        ),
        time=now,
    )
