"""HTTP API: the published key figures (filter by Bezirk, period, figure) and the annual
report. Callers get aggregates only: every answer is built from ``reporting_kpi``, the cells
as published on the reporting stream, suppressed cells included as suppressed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from lotse_contracts.city import Municipality
from lotse_contracts.events.reporting import FIGURE_UNITS, KpiFigure
from lotse_runtime.db import Database
from lotse_runtime.identity import CallerDep
from sqlalchemy import func
from sqlmodel import col, select

from lotse_reporting import domain, report
from lotse_reporting.domain import STADT, Layout
from lotse_reporting.publisher import Changes, KpiPublisher
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.tables import BezirkPublic, FigurePublic, KpiPublic, ReportingKpi

PERIOD_PATTERN = r"^[0-9]{4}(-(0[1-9]|1[0-2]))?$"
DIMENSION_PATTERN = r"^[a-z_]+:[a-z0-9_-]+$"


@dataclass
class ReportingContext:
    """What routes and jobs of the reporting service share (kept on ``app.state``)."""

    settings: ReportingSettings
    city: Municipality
    layout: Layout
    db: Database
    publisher: KpiPublisher
    changes: Changes

    def area_name(self, slug: str) -> str:
        if slug == STADT:
            return f"Stadt {self.city.name} (gesamt)"
        return self.city.bezirk(slug).name

    def areas(self) -> list[BezirkPublic]:
        return [
            *(BezirkPublic(slug=b.slug, name=b.name) for b in self.city.stadtbezirke),
            BezirkPublic(slug=STADT, name=self.area_name(STADT)),
        ]


def context_of(request: Request) -> ReportingContext:
    """FastAPI dependency: the reporting context of the app serving this request."""
    context: ReportingContext = request.app.state.reporting
    return context


ContextDep = Annotated[ReportingContext, Depends(context_of)]


def invalid(field: str, reason: str, where: str = "query") -> RequestValidationError:
    """A 422 in the platform's shape (field and reason), for checks FastAPI cannot do."""
    return RequestValidationError([{"loc": (where, field), "msg": reason, "type": "value_error"}])


def check_area(context: ReportingContext, bezirk: str | None) -> None:
    if bezirk is not None and bezirk not in context.layout.areas:
        known = ", ".join(context.layout.areas)
        raise invalid("bezirk", f"unknown Stadtbezirk {bezirk!r}; known: {known}")


async def query_kpis(
    db: Database,
    *,
    bezirk: str | None = None,
    period: str | None = None,
    year: int | None = None,
    figure: KpiFigure | None = None,
    dimension: str | None = None,
    breakdowns: bool = True,
    limit: int | None = None,
    offset: int = 0,
) -> list[KpiPublic]:
    """Published cells matching the filters, ordered by Bezirk, period, figure, dimension."""
    statement = select(ReportingKpi)
    if bezirk is not None:
        statement = statement.where(col(ReportingKpi.bezirk) == bezirk)
    if period is not None:
        statement = statement.where(col(ReportingKpi.period) == period)
    if year is not None:
        statement = statement.where(col(ReportingKpi.period).like(f"{year}%"))
    if figure is not None:
        statement = statement.where(col(ReportingKpi.figure) == figure.value)
    if dimension is not None:
        statement = statement.where(col(ReportingKpi.dimension) == dimension)
    elif not breakdowns:
        statement = statement.where(col(ReportingKpi.dimension) == "")
    statement = statement.order_by(
        col(ReportingKpi.bezirk),
        col(ReportingKpi.period),
        col(ReportingKpi.figure),
        col(ReportingKpi.dimension),
    ).offset(offset)
    if limit is not None:
        statement = statement.limit(limit)
    async with db.transaction() as session:
        rows = list(await session.scalars(statement))
    return [KpiPublic.of(row) for row in rows]


async def years_with_figures(db: Database) -> list[int]:
    async with db.transaction() as session:
        periods = await session.scalars(select(func.substr(ReportingKpi.period, 1, 4)).distinct())
        return sorted({int(p) for p in periods})


async def annual_report(context: ReportingContext, year: int, bezirk: str, fmt: str) -> Response:
    """The annual report of ``year`` and ``bezirk`` as CSV or HTML."""
    check_area(context, bezirk)
    cells = await query_kpis(context.db, bezirk=bezirk, year=year)
    if not cells:
        raise invalid("year", f"no figures for {year} yet", where="path")
    if fmt == "csv":
        return Response(
            report.annual_csv(cells),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="lotse-{bezirk}-{year}.csv"'},
        )
    city_cells = cells if bezirk == STADT else await query_kpis(context.db, bezirk=STADT, year=year)
    document = report.annual_html(
        report.ReportContext(
            city=context.city.name,
            year=year,
            area=bezirk,
            area_name=context.area_name(bezirk),
            modules={m.slug: m.name for m in context.city.modules},
            reach_reference=context.city.reach_rate_reported,
            generated_at=max(c.computed_at for c in cells),
        ),
        cells,
        city_cells,
    )
    return HTMLResponse(document)


def router() -> APIRouter:
    routes = APIRouter(tags=["figures"])

    @routes.get("/kpis", response_model=list[KpiPublic], summary="Published key figures")
    async def list_kpis(
        caller: CallerDep,
        context: ContextDep,
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
        check_area(context, bezirk)
        if period is not None and year is not None and not period.startswith(str(year)):
            raise invalid("period", f"period {period} is not in year {year}")
        return await query_kpis(
            context.db,
            bezirk=bezirk,
            period=period,
            year=year,
            figure=figure,
            dimension=dimension,
            breakdowns=breakdowns,
            limit=limit,
            offset=offset,
        )

    @routes.get("/kpis/figures", response_model=list[FigurePublic], summary="What the figures mean")
    async def list_figures(caller: CallerDep, context: ContextDep) -> list[FigurePublic]:
        return [
            FigurePublic(
                figure=figure,
                unit=FIGURE_UNITS[figure],
                label=report.label(figure),
                description=report.FIGURE_LABELS[figure][1],
                dimensions=[
                    d
                    for d in domain.figure_dimensions(figure, context.layout.modules)
                    if d is not None
                ],
            )
            for figure in KpiFigure
        ]

    @routes.get("/kpis/bezirke", response_model=list[BezirkPublic], summary="Stadtbezirke")
    async def list_bezirke(caller: CallerDep, context: ContextDep) -> list[BezirkPublic]:
        return context.areas()

    reports = APIRouter(tags=["reports"])

    @reports.get(
        "/reports/annual/{year}.csv",
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}}},
        summary="Annual report as CSV",
    )
    async def annual_csv(
        caller: CallerDep,
        context: ContextDep,
        year: int,
        bezirk: Annotated[str, Query(description="Stadtbezirk slug or `stadt`.")] = STADT,
    ) -> Response:
        """Every published cell of a year and Stadtbezirk (months and year), one row each."""
        return await annual_report(context, year, bezirk, "csv")

    @reports.get(
        "/reports/annual/{year}.html", response_class=HTMLResponse, summary="Annual report (HTML)"
    )
    async def annual_html(
        caller: CallerDep,
        context: ContextDep,
        year: int,
        bezirk: Annotated[str, Query(description="Stadtbezirk slug or `stadt`.")] = STADT,
    ) -> Response:
        """The report a committee receives: tables and charts of a year and Stadtbezirk."""
        return await annual_report(context, year, bezirk, "html")

    routes.include_router(reports)
    return routes
