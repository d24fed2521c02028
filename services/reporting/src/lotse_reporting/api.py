"""HTTP API: the published key figures (filter by Bezirk, period, figure), the annual report,
and the dashboard (one HTML page with a little JavaScript, no build step; the figures of a
year as JSON; a server-sent-event stream of newly published figures so the page updates
live). Callers get aggregates only: every answer is built from ``reporting_kpi``, the cells
as published on the reporting stream, suppressed cells included as suppressed. Whether the
dashboard needs a login is a setting (``dashboard_public``).

Each route reads its parameters and calls one function of :mod:`lotse_reporting.operations`;
refusals are raised there and answered by the runtime."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from lotse_contracts.events.reporting import KpiFigure
from lotse_runtime.app import runtime_of
from lotse_runtime.identity import CallerDep, current_caller

from lotse_reporting import operations
from lotse_reporting.domain import STADT
from lotse_reporting.operations import AnnualReport, Reporting
from lotse_reporting.store import KpiFilter
from lotse_reporting.tables import BezirkPublic, FigurePublic, KpiPublic

PERIOD_PATTERN = r"^[0-9]{4}(-(0[1-9]|1[0-2]))?$"
DIMENSION_PATTERN = r"^[a-z_]+:[a-z0-9_-]+$"
#: Comment lines keep proxies from closing an idle stream.
KEEP_ALIVE_S = 15.0
#: Revisions count publication passes; anything larger is no revision (and no SQL integer).
MAX_REVISION = 2**62


async def reporting_of(request: Request) -> Reporting:
    """FastAPI dependency: the reporting parts of the app serving this request."""
    reporting: Reporting = request.app.state.reporting
    return reporting


ReportingDep = Annotated[Reporting, Depends(reporting_of)]
Area = Annotated[str, Query(description="Stadtbezirk slug or `stadt`.")]


async def dashboard_access(request: Request) -> None:
    """Open when the dashboard is public, else the caller must be authenticated."""
    if not runtime_of(request).settings.dashboard_public:
        await current_caller(request)


router = APIRouter()
"""The figures and the annual report."""
dashboard = APIRouter(tags=["dashboard"], dependencies=[Depends(dashboard_access)])
"""The dashboard page, its data and its stream."""


def _sent(annual: AnnualReport) -> Response:
    if annual.format == "html":
        return HTMLResponse(annual.text)
    return Response(
        annual.text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{annual.filename}"'},
    )


# --- figures and reports ---------------------------------------------------------------------


@router.get(
    "/kpis", response_model=list[KpiPublic], summary="Published key figures", tags=["figures"]
)
async def list_kpis(
    caller: CallerDep,
    reporting: ReportingDep,
    bezirk: Annotated[
        str | None, Query(description="Stadtbezirk slug, or `stadt` for the whole city.")
    ] = None,
    period: Annotated[
        str | None, Query(pattern=PERIOD_PATTERN, description="`YYYY-MM` or `YYYY`.")
    ] = None,
    year: Annotated[
        int | None,
        Query(ge=2000, le=2100, description="All periods of a year (months and the year)."),
    ] = None,
    figure: Annotated[KpiFigure | None, Query(description="Which key figure.")] = None,
    dimension: Annotated[
        str | None,
        Query(pattern=DIMENSION_PATTERN, description="Breakdown, e.g. `module:elternschule`."),
    ] = None,
    breakdowns: Annotated[
        bool, Query(description="Include breakdowns (module, status, consent scope).")
    ] = True,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    # Bounded: a larger offset is no page, and no SQL integer either.
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> list[KpiPublic]:
    """Anonymised key figures per Stadtbezirk (or city) and period. Any authenticated
    caller may read them; a suppressed cell has no value."""
    wanted = KpiFilter(bezirk, period, year, figure, dimension, breakdowns, limit, offset)
    return await operations.list_kpis(reporting, wanted)


@router.get(
    "/kpis/figures",
    response_model=list[FigurePublic],
    summary="What the figures mean",
    tags=["figures"],
)
async def list_figures(caller: CallerDep, reporting: ReportingDep) -> list[FigurePublic]:
    return operations.figures(reporting)


@router.get(
    "/kpis/bezirke", response_model=list[BezirkPublic], summary="Stadtbezirke", tags=["figures"]
)
async def list_bezirke(caller: CallerDep, reporting: ReportingDep) -> list[BezirkPublic]:
    return operations.areas(reporting)


@router.get(
    "/reports/annual/{year}.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
    summary="Annual report as CSV",
    tags=["reports"],
)
async def annual_csv(
    caller: CallerDep, reporting: ReportingDep, year: int, bezirk: Area = STADT
) -> Response:
    """Every published cell of a year and Stadtbezirk (months and year), one row each."""
    return _sent(await operations.annual_report(reporting, year, bezirk, "csv"))


@router.get(
    "/reports/annual/{year}.html",
    response_class=HTMLResponse,
    summary="Annual report (HTML)",
    tags=["reports"],
)
async def annual_html(
    caller: CallerDep, reporting: ReportingDep, year: int, bezirk: Area = STADT
) -> Response:
    """The report a committee receives: tables and charts of a year and Stadtbezirk."""
    return _sent(await operations.annual_report(reporting, year, bezirk, "html"))


# --- dashboard -------------------------------------------------------------------------------


def _static(name: str) -> str:
    return (resources.files("lotse_reporting") / "static" / name).read_text(encoding="utf-8")


@dashboard.get("/dashboard", response_class=HTMLResponse, summary="Live dashboard page")
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse(_static("dashboard.html"))


@dashboard.get("/dashboard/dashboard.js", summary="Dashboard script", include_in_schema=False)
async def dashboard_script() -> Response:
    return Response(_static("dashboard.js"), media_type="text/javascript; charset=utf-8")


@dashboard.get("/dashboard/data", summary="Figures of one year for the dashboard")
async def dashboard_data(
    reporting: ReportingDep, year: Annotated[int | None, Query(ge=2000, le=2100)] = None
) -> dict[str, Any]:
    """All published cells of ``year`` (default: the newest with figures), compact."""
    return await operations.dashboard_data(reporting, year)


@dashboard.get(
    "/dashboard/stream",
    summary="Newly published figures (server-sent events)",
    response_class=StreamingResponse,
    # What the stream really is, so clients (and schemathesis) do not expect JSON.
    responses={200: {"content": {"text/event-stream": {}}, "description": "Event stream"}},
)
async def dashboard_stream(
    request: Request,
    reporting: ReportingDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_REVISION)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Each event ``kpis`` carries the cells published since the last one; its id is the
    publication revision, so a reconnecting browser resumes where it stopped."""
    start = after
    # A browser sends back the id it got; anything else (e.g. "²", which isdigit() takes
    # for a digit) is ignored rather than parsed.
    if last_event_id is not None and last_event_id.isascii() and last_event_id.isdigit():
        start = min(int(last_event_id), MAX_REVISION)
    return StreamingResponse(
        _published_events(request, reporting, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _published_events(
    request: Request, reporting: Reporting, start: int | None
) -> AsyncIterator[str]:
    """Server-sent events: the cells published after ``start`` (default: from now on)."""
    last = start if start is not None else await operations.current_revision(reporting)
    poll_s = reporting.settings.dashboard_poll_s
    yield "retry: 2000\n\n"
    quiet = 0.0
    while not await request.is_disconnected():
        newest, cells = await operations.published_since(reporting, last)
        if cells:
            last = newest
            body = json.dumps({"revision": last, "cells": cells})
            yield f"event: kpis\nid: {last}\ndata: {body}\n\n"
            quiet = 0.0
        elif quiet >= KEEP_ALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await reporting.changes.wait(poll_s)
        quiet += poll_s


@dashboard.get("/dashboard/annual/{year}.csv", summary="Annual report (CSV) from the dashboard")
async def dashboard_annual_csv(
    reporting: ReportingDep, year: int, bezirk: Annotated[str, Query()] = STADT
) -> Response:
    return _sent(await operations.annual_report(reporting, year, bezirk, "csv"))


@dashboard.get(
    "/dashboard/annual/{year}.html",
    response_class=HTMLResponse,
    summary="Annual report (HTML) from the dashboard",
)
async def dashboard_annual_html(
    reporting: ReportingDep, year: int, bezirk: Annotated[str, Query()] = STADT
) -> Response:
    return _sent(await operations.annual_report(reporting, year, bezirk, "html"))
