"""HTTP API of the visits service: an office's calendar, a visit's and a case's details, and
what staff record about a visit (reschedule, no-show, declined, cancelled, completed).

Who may do what: Familienbüro staff act on and read the visits of their own Stadtbezirk;
the Bezirksteam (district coordination team) reads them without staff ids or personal data,
and so do, for a single case, the Babylotse (baby pilot) of the clinic that registered the
family and the data-protection officer; other Lotse services may do everything. The roles of
each route are declared in policy.py and enforced by the runtime; the use cases in
operations.py check the case's Stadtbezirk or clinic. Each route only hands its inputs to its
use case; refusals are answered by the runtime (field and reason, 409 or 422).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from lotse_runtime.app import ServiceRuntime, current_runtime
from lotse_runtime.identity import CallerDep
from lotse_runtime.inputs import CALENDAR_DAY, CalendarDay

from lotse_visits import operations
from lotse_visits.operations import Context
from lotse_visits.settings import VisitsSettings
from lotse_visits.tables import (
    Calendar,
    CancelRequest,
    CasePublic,
    CompleteRequest,
    DeclineRequest,
    DueCase,
    NewVisitRequest,
    NoShowRequest,
    RescheduleRequest,
    VisitDetails,
    VisitPublic,
)

VisitId = Annotated[str, Path(description="Id of the visit.")]
CaseId = Annotated[str, Path(description="Pseudonymous case id.")]
Bezirk = Annotated[str, Path(description="Stadtbezirk slug, e.g. hoerde.")]

REFUSALS: dict[int | str, dict[str, object]] = {
    403: {"description": "Not permitted (also for unknown ids)."},
    409: {"description": "The visit's state does not allow this; the reason names the field."},
    422: {"description": "A value cannot be accepted; the reason names the field."},
}
NO_OFFICE: dict[int | str, dict[str, object]] = {
    403: REFUSALS[403],
    404: {"description": "No such Stadtbezirk."},
}

VisitsRuntimeDep = Annotated[ServiceRuntime[VisitsSettings], Depends(current_runtime)]


async def context(request: Request, runtime: VisitsRuntimeDep, caller: CallerDep) -> Context:
    """The use cases' context: runtime, caller, and the route audit entries name."""
    route = request.scope.get("route")
    return Context(runtime=runtime, caller=caller, path=getattr(route, "path", request.url.path))


ContextDep = Annotated[Context, Depends(context)]

router = APIRouter(tags=["visits"])

# -- reading -------------------------------------------------------------------------------------


@router.get(
    "/offices/{bezirk}/calendar",
    response_model=Calendar,
    summary="A Familienbüro's calendar of one day",
    responses=NO_OFFICE,
)
async def calendar(
    ctx: ContextDep,
    bezirk: Bezirk,
    day: Annotated[
        CalendarDay | None,
        Query(description=f"Local day (YYYY-MM-DD); default today. {CALENDAR_DAY.text}."),
    ] = None,
) -> Calendar:
    return await operations.calendar(ctx, bezirk, day)


@router.get(
    "/offices/{bezirk}/due",
    response_model=list[DueCase],
    summary="Families of an office that still need an appointment, most urgent first",
    responses=NO_OFFICE,
)
async def due(
    ctx: ContextDep, bezirk: Bezirk, limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> list[DueCase]:
    return await operations.due(ctx, bezirk, limit)


@router.get(
    "/visits/{visit_id}",
    response_model=VisitDetails,
    summary="A visit with its case (sealed personal data for the Familienbüro only)",
    responses={403: REFUSALS[403]},
)
async def visit_details(ctx: ContextDep, visit_id: VisitId) -> VisitDetails:
    return await operations.visit_details(ctx, visit_id)


@router.get(
    "/cases/{case_id}",
    response_model=CasePublic,
    summary="A family's welcome-visit case with all its visits",
    responses={403: REFUSALS[403]},
)
async def case_details(ctx: ContextDep, case_id: CaseId) -> CasePublic:
    return await operations.case_details(ctx, case_id)


# -- acting --------------------------------------------------------------------------------------


@router.post(
    "/visits/{visit_id}/reschedule",
    response_model=VisitPublic,
    summary="Move a scheduled visit to another time (and staff member)",
    responses=REFUSALS,
)
async def reschedule(ctx: ContextDep, visit_id: VisitId, body: RescheduleRequest) -> VisitPublic:
    return await operations.reschedule(ctx, visit_id, body)


@router.post(
    "/visits/{visit_id}/no-show",
    response_model=VisitPublic,
    summary="Record that the family was not there; optionally offer the next free slot",
    responses=REFUSALS,
)
async def no_show(ctx: ContextDep, visit_id: VisitId, body: NoShowRequest) -> VisitPublic:
    return await operations.no_show(ctx, visit_id, body)


@router.post(
    "/visits/{visit_id}/decline",
    response_model=VisitPublic,
    summary="Record that the family does not want the visit",
    responses=REFUSALS,
)
async def decline(ctx: ContextDep, visit_id: VisitId, body: DeclineRequest) -> VisitPublic:
    return await operations.decline_visit(ctx, visit_id, body)


@router.post(
    "/cases/{case_id}/decline",
    response_model=CasePublic,
    summary="Record that a family without a scheduled visit does not want one",
    responses=REFUSALS,
)
async def decline_case(ctx: ContextDep, case_id: CaseId, body: DeclineRequest) -> CasePublic:
    return await operations.decline_case(ctx, case_id, body)


@router.post(
    "/visits/{visit_id}/cancel",
    response_model=VisitPublic,
    summary="Cancel a scheduled visit (the Familienbüro's decision)",
    responses=REFUSALS,
)
async def cancel(ctx: ContextDep, visit_id: VisitId, body: CancelRequest) -> VisitPublic:
    return await operations.cancel(ctx, visit_id, body)


@router.post(
    "/visits/{visit_id}/complete",
    response_model=VisitPublic,
    summary="Record that the visit took place, with its outcome",
    responses=REFUSALS,
)
async def complete(ctx: ContextDep, visit_id: VisitId, body: CompleteRequest) -> VisitPublic:
    return await operations.complete(ctx, visit_id, body)


@router.post(
    "/cases/{case_id}/visits",
    response_model=VisitPublic,
    status_code=201,
    summary="Arrange a new visit for a family without one (first free slot, or a chosen one)",
    responses=REFUSALS,
)
async def new_visit(ctx: ContextDep, case_id: CaseId, body: NewVisitRequest) -> VisitPublic:
    return await operations.new_visit(ctx, case_id, body)
