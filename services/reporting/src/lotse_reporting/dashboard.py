"""The dashboard: one HTML page with a little JavaScript (no build step), the figures of a
year as JSON, and a server-sent-event stream of newly published figures, so the page updates
live. It shows exactly the anonymised cells of the reporting stream; whether it needs a login
is a setting (``dashboard_public``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from lotse_contracts.events.reporting import FIGURE_UNITS, KpiFigure
from lotse_runtime.identity import current_caller
from sqlmodel import col, select

from lotse_reporting import report, store
from lotse_reporting.api import (
    ContextDep,
    ReportingContext,
    annual_report,
    context_of,
    years_with_figures,
)
from lotse_reporting.publisher import REVISION
from lotse_reporting.tables import ReportingKpi

#: Comment lines keep proxies from closing an idle stream.
KEEP_ALIVE_S = 15.0
#: Revisions count publication passes; anything larger is no revision (and no SQL integer).
MAX_REVISION = 2**62


async def dashboard_access(request: Request) -> None:
    """Open when the dashboard is public, else the caller must be authenticated."""
    if not context_of(request).settings.dashboard_public:
        await current_caller(request)


def _static(name: str) -> str:
    return (resources.files("lotse_reporting") / "static" / name).read_text(encoding="utf-8")


def _compact(row: ReportingKpi) -> dict[str, Any]:
    return {
        "b": row.bezirk,
        "p": row.period,
        "f": row.figure,
        "d": row.dimension or None,
        "v": row.value,
        "s": row.suppressed,
    }


async def _revision(context: ReportingContext) -> int:
    async with context.db.transaction() as session:
        return int(await store.get_state(session, REVISION) or 0)


async def _changed_since(context: ReportingContext, revision: int) -> list[ReportingKpi]:
    async with context.db.transaction() as session:
        return list(
            await session.scalars(
                select(ReportingKpi)
                .where(col(ReportingKpi.revision) > revision)
                .order_by(col(ReportingKpi.revision))
            )
        )


def router() -> APIRouter:
    routes = APIRouter(tags=["dashboard"], dependencies=[Depends(dashboard_access)])

    @routes.get("/dashboard", response_class=HTMLResponse, summary="Live dashboard page")
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("dashboard.html"))

    @routes.get("/dashboard/dashboard.js", summary="Dashboard script", include_in_schema=False)
    async def script() -> Response:
        return Response(_static("dashboard.js"), media_type="text/javascript; charset=utf-8")

    @routes.get("/dashboard/data", summary="Figures of one year for the dashboard")
    async def data(
        context: ContextDep,
        year: Annotated[int | None, Query(ge=2000, le=2100)] = None,
    ) -> dict[str, Any]:
        """All published cells of ``year`` (default: the newest with figures), compact."""
        revision = await _revision(context)
        years = await years_with_figures(context.db)
        chosen = year if year is not None else (years[-1] if years else None)
        cells: list[dict[str, Any]] = []
        if chosen is not None:
            async with context.db.transaction() as session:
                rows = await session.scalars(
                    select(ReportingKpi).where(col(ReportingKpi.period).like(f"{chosen}%"))
                )
                cells = [_compact(row) for row in rows]
        reference = context.city.reach_rate_reported
        return {
            "city": context.city.name,
            "k": context.layout.k,
            "reachReference": None if reference is None else round(100 * reference, 1),
            "areas": [a.model_dump() for a in context.areas()],
            "modules": {m.slug: m.name for m in context.city.modules},
            "figures": {
                figure.value: {
                    "label": report.label(figure),
                    "description": report.FIGURE_LABELS[figure][1],
                    "unit": FIGURE_UNITS[figure].value,
                }
                for figure in KpiFigure
            },
            "years": sorted({*years, *([chosen] if chosen is not None else [])}),
            "year": chosen,
            "revision": revision,
            "cells": cells,
        }

    @routes.get(
        "/dashboard/stream",
        summary="Newly published figures (server-sent events)",
        response_class=StreamingResponse,
        # What the stream really is, so clients (and schemathesis) do not expect JSON.
        responses={200: {"content": {"text/event-stream": {}}, "description": "Event stream"}},
    )
    async def stream(
        request: Request,
        context: ContextDep,
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

        async def events() -> AsyncIterator[str]:
            last = start if start is not None else await _revision(context)
            yield "retry: 2000\n\n"
            quiet = 0.0
            while not await request.is_disconnected():
                rows = await _changed_since(context, last)
                if rows:
                    last = max(row.revision for row in rows)
                    body = json.dumps({"revision": last, "cells": [_compact(r) for r in rows]})
                    yield f"event: kpis\nid: {last}\ndata: {body}\n\n"
                    quiet = 0.0
                elif quiet >= KEEP_ALIVE_S:
                    yield ": keep-alive\n\n"
                    quiet = 0.0
                await context.changes.wait(context.settings.dashboard_poll_s)
                quiet += context.settings.dashboard_poll_s

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @routes.get("/dashboard/annual/{year}.csv", summary="Annual report (CSV) from the dashboard")
    async def annual_csv(
        context: ContextDep, year: int, bezirk: Annotated[str, Query()] = "stadt"
    ) -> Response:
        return await annual_report(context, year, bezirk, "csv")

    @routes.get(
        "/dashboard/annual/{year}.html",
        response_class=HTMLResponse,
        summary="Annual report (HTML) from the dashboard",
    )
    async def annual_html(
        context: ContextDep, year: int, bezirk: Annotated[str, Query()] = "stadt"
    ) -> Response:
        return await annual_report(context, year, bezirk, "html")

    return routes
