"""The use cases of reporting, one function each, in the shape load → decide → save (+ outbox).

- :func:`apply_event` (the live consumer) and :func:`replay_events` (the replay): load the
  rows of the families the events name (``store``), let :func:`lotse_reporting.domain.apply`
  decide, store what changed, add the difference of those families' shares to the cells and
  mark the years whose cells changed.
- :func:`publish_figures` (the publication job, run by :class:`PublishTrigger`, and the
  replay at its end): read each dirty year's cells, derive and protect its figures
  (``domain.year_cells``), record the changed ones in ``reporting_kpi`` and write them as
  ``kpi-updated`` to the outbox in one insert, in one transaction.
- The reads of the API and the dashboard (:func:`list_kpis`, :func:`annual_report`,
  :func:`dashboard_data`, ...): published cells only, never a fact.

Nothing here knows HTTP: a refusal is a :class:`~lotse_runtime.refusal.Refusal`, an impossible
event a :class:`~lotse_reporting.domain.ImpossibleEvent`; api.py and consumers.py answer them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from lotse_contracts.events.base import EventModel
from lotse_contracts.events.reporting import KpiFigure, KpiUpdated
from lotse_contracts.figures import FIGURES
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.db import Database
from lotse_runtime.refusal import Refusal
from lotse_runtime.telemetry import inject_headers
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from lotse_reporting import domain, report, store
from lotse_reporting.domain import STADT, Cell, CellKey, Layout, Rules
from lotse_reporting.records import KpiRecords
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.store import KpiFilter
from lotse_reporting.tables import BezirkPublic, FigurePublic, KpiPublic, ReportingKpi

_LOCK_KEY = zlib.crc32(b"lotse-reporting-kpis")


class Changes:
    """Tells waiting dashboard streams that figures were published (in this process)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Return after the next notification, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)


class PublishTrigger:
    """When the publisher runs: soon after an event applied here has committed (a short
    debounce, so a burst goes into one pass), once at start (what a stopped replica left
    dirty), and otherwise only every ``interval_s`` as a safety net (marks left by a replica
    that stopped before its pass). The job waits for :meth:`wait` in between, so an idle
    service neither ticks nor queries."""

    def __init__(
        self, interval_s: float, debounce_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.debounce_s = debounce_s
        self._clock = clock
        self._pending_since: float | None = None
        self._last_change = -interval_s
        self._last_pass = -interval_s
        self._wake = asyncio.Event()

    def changed(self) -> None:
        """An event applied here has committed."""
        self._last_change = self._clock()
        if self._pending_since is None:
            self._pending_since = self._last_change
        self._wake.set()

    def due(self) -> float | None:
        """The start time of a pass to run now, or None."""
        if self._wait_s() is not None:
            return None
        return self._clock()

    def _wait_s(self) -> float | None:
        """How long until a pass is due (None: due now)."""
        now = self._clock()
        pending = self._pending_since
        if pending is not None:
            left = pending + self.debounce_s - now
        else:
            left = self._last_pass + self.interval_s - now
        return None if left <= 0 else left

    async def wait(self) -> float:
        """Sleep until a pass is due; its start time. Woken early by :meth:`changed`."""
        while (left := self._wait_s()) is not None:
            if self._pending_since is not None:
                await asyncio.sleep(left)  # the debounce: a burst goes into one pass
                continue
            self._wake.clear()
            # asyncio.timeout, not wait_for: wait_for may swallow a cancellation that
            # coincides with the wake-up, and the job would outlive the app's shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wake.wait()
        return self._clock()

    def passed(self, started: float) -> None:
        """A pass that began at ``started`` saw every change committed before it."""
        self._last_pass = started
        if self._pending_since is not None and self._pending_since <= started:
            # A change committed while the pass ran is published by the next one.
            self._pending_since = self._last_change if self._last_change > started else None


@dataclass
class Reporting:
    """The reporting service's own parts next to its runtime (kept on ``app.state``): the
    city's rules and layout, the in-process change signal, and publication counters."""

    runtime: ServiceRuntime[ReportingSettings]
    rules: Rules
    layout: Layout
    changes: Changes = field(default_factory=Changes)
    trigger: PublishTrigger = field(default_factory=lambda: PublishTrigger(1.0, 0.15))
    published: int = 0
    """Cells published by this process."""
    seen: dict[int, YearSeen] = field(default_factory=dict)
    """Per year, the sums the last pass computed from: the next pass recomputes only the
    clusters of figures whose sums changed since."""
    on_stream: dict[int, dict[CellKey, tuple[float | None, bool]]] = field(default_factory=dict)
    """Per year, every cell's published value and suppression as this process last read or
    published them: a pass compares its cells with these instead of reading the year's
    published cells again."""
    revision_seen: int = -1
    """The publication revision after this process's last pass (``seen`` and ``on_stream``
    hold while no other process published)."""
    passes: int = 0
    """Publication passes that found something to recompute."""

    @classmethod
    def of(cls, runtime: ServiceRuntime[ReportingSettings]) -> Reporting:
        city, settings = runtime.city, runtime.settings
        rules = Rules(
            bezirke=frozenset(city.bezirk_slugs),
            modules=frozenset(city.module_slugs),
            zone=city.zone(),
            completion_grace=timedelta(minutes=settings.completion_grace_minutes),
        )
        layout = Layout(
            bezirke=tuple(city.bezirk_slugs),
            modules=tuple(city.module_slugs),
            k=settings.k_anonymity,
            zone=city.zone(),
        )
        trigger = PublishTrigger(settings.publish_interval_s, settings.publish_debounce_s)
        return cls(runtime=runtime, rules=rules, layout=layout, trigger=trigger)

    @property
    def settings(self) -> ReportingSettings:
        return self.runtime.settings

    @property
    def db(self) -> Database:
        return self.runtime.db

    def area_name(self, slug: str) -> str:
        if slug == STADT:
            return f"Stadt {self.runtime.city.name} (gesamt)"
        return self.runtime.city.bezirk(slug).name


# --- applying events -------------------------------------------------------------------------


#: The rows of the families a batch's events need, read by :func:`prepare_events`.
_PREPARED = "lotse_reporting_prepared"


async def prepare_events(session: AsyncSession, events: list[EventModel]) -> None:
    """The live consumer's batch, before its first event: the rows of every family whose
    event needs its own family's rows only, in one query, each family apart (a query per
    event was 3.4 reads per family, bench/statements.py)."""
    families = {family for event in events if (family := _own_family(domain.needs_of(event)))}
    if families:
        session.info[_PREPARED] = await store.load_families_apart(session, families)


async def apply_event(session: AsyncSession, event: EventModel, rules: Rules) -> None:
    """One event, in the delivery's transaction (the inbox entry is in the same one).
    Raises :class:`domain.ImpossibleEvent` before anything is stored."""
    needs = domain.needs_of(event)
    snapshot = _prepared_snapshot(session, needs)
    if snapshot is None:
        # Rows this event reads or writes may be any prepared family's: read afresh, with
        # what the batch's events changed so far written first.
        session.info.pop(_PREPARED, None)
        await store.save_rows_now(session)
        snapshot = await store.load_snapshot(session, needs)
    before = domain.shares_of(snapshot, needs.families, rules.zone)
    domain.apply(event, snapshot, rules)
    await _store_changes(session, snapshot, before, rules, at_commit=True)
    # Its rows are taken for the commit: the family's next event in the batch starts with
    # nothing touched.
    snapshot.reset_touched()


def _own_family(needs: domain.Needs) -> str | None:
    """The one family whose rows are all an event needs (what the live consumer's events
    nearly all are), else None."""
    if len(needs.families) != 1:
        return None
    if not (needs.case_ids <= needs.families and needs.consent_case_ids <= needs.families):
        return None
    return next(iter(needs.families))


def _prepared_snapshot(session: AsyncSession, needs: domain.Needs) -> domain.Snapshot | None:
    prepared: dict[str, domain.Snapshot] | None = session.info.get(_PREPARED)
    family = _own_family(needs)
    if prepared is None or family is None or family not in prepared:
        return None
    snapshot = prepared[family]
    # As loaded for this event alone: the years of the families it asks for, no others.
    snapshot.fact_years.clear()
    store.note_fact_years(snapshot, needs)
    return snapshot


async def replay_events(
    session: AsyncSession, events: Sequence[EventModel], rules: Rules
) -> list[str | None]:
    """A batch of events in order, in one transaction; per event, None when applied or the
    reason it was impossible (an impossible event changes nothing, the others go on)."""
    needs = domain.Needs()
    for event in events:
        needs.merge(domain.needs_of(event))
    needs.fact_years_of.clear()  # dirty years follow from the changed cells
    snapshot = await store.load_snapshot(session, needs)
    before = domain.shares_of(snapshot, needs.families, rules.zone)
    outcomes: list[str | None] = []
    for event in events:
        try:
            domain.apply(event, snapshot, rules)
        except domain.ImpossibleEvent as exc:
            outcomes.append(exc.reason)
        else:
            outcomes.append(None)
    await _store_changes(session, snapshot, before, rules)
    return outcomes


async def _store_changes(
    session: AsyncSession,
    snapshot: domain.Snapshot,
    before: dict[str, domain.Shares],
    rules: Rules,
    *,
    at_commit: bool = False,
) -> None:
    """Store the touched rows, add the difference of the families' shares to the cells and
    mark the years whose cells changed, all in the caller's transaction (``at_commit``: the
    rows, cells and marks once for all events of the transaction, when it commits)."""
    touched = {c for c in snapshot.touched_cases}
    touched |= {case_id for case_id, _ in snapshot.touched_consents}
    touched |= {snapshot.facts[key].case_id for key in snapshot.touched_facts}
    touched |= {snapshot.referrals[key].case_id for key in snapshot.touched_referrals}
    touched &= set(before)
    after = domain.shares_of(snapshot, touched, rules.zone)
    deltas = domain.cell_deltas({c: before[c] for c in touched}, after)
    years = {domain.year_of(key[1]) for key in deltas}
    carrying = {domain.year_of(key[1]) for key in deltas if key[2] == domain.STOCK_DELTA}
    if at_commit:
        store.save_snapshot_at_commit(session, snapshot)
        store.add_to_cells_at_commit(session, deltas, years, carrying)
        return
    await store.save_snapshot(session, snapshot)
    await store.add_to_cells(session, deltas)
    await store.mark_dirty(session, years, carrying)


# --- publishing the figures ------------------------------------------------------------------


async def publish_when_due(reporting: Reporting) -> int:
    """One run of the publication job: wait until :class:`PublishTrigger` says a pass is due,
    then run it."""
    started = await reporting.trigger.wait()
    published = await publish_figures(reporting)
    reporting.trigger.passed(started)
    return published


async def publish_figures(
    reporting: Reporting, *, all_years: bool = False, republish: bool = False
) -> int:
    """Recompute what is dirty (or every year) and publish the changes; returns how many
    cells were published."""
    plan = await plan_pass(reporting, all_years=all_years)
    published = await publish_planned(reporting, plan, republish=republish)
    await finish_pass(reporting, plan, published)
    return published


@dataclass
class PassPlan:
    """What a publication pass read before it publishes: the dirty marks it may clear when
    it is done (year → version), the years it recomputes and the newest month; ``newest``
    moves on when a year's transaction finds a newer month under the replicas' lock."""

    marks: dict[int, int]
    years: list[int]
    newest: str | None


async def plan_pass(reporting: Reporting, *, all_years: bool = False) -> PassPlan:
    """The first step of :func:`publish_figures`: read the dirty marks and the horizon."""
    async with reporting.db.transaction() as session:
        marks = await store.dirty_marks(session)
        newest, oldest, known = await store.bounds(session)
    dirty = {year: version for year, (version, _) in marks.items()}
    if newest is None or oldest is None:
        return PassPlan(dirty, [], None)
    years = set(dirty)
    # Only the open-escalation stock carries over into later years.
    carried = [year for year, (_, carries) in marks.items() if carries]
    if all_years:
        carried.append(oldest)
    if known != newest:
        # New months appear at the horizon (and a year may have been left incomplete).
        carried.append(domain.year_of(known) if known else oldest)
    last = domain.year_of(newest)
    if carried:
        years |= set(range(max(min(carried), oldest), last + 1))
    return PassPlan(dirty, sorted(y for y in years if oldest <= y <= last), newest)


async def publish_planned(reporting: Reporting, plan: PassPlan, *, republish: bool = False) -> int:
    """The second step: recompute and publish the planned years, each in a transaction of
    its own under the replicas' lock."""
    if plan.newest is None:
        return 0
    published = 0
    for year in plan.years:
        count, plan.newest = await _publish_year(reporting, year, plan.newest, republish=republish)
        published += count
    return published


async def finish_pass(reporting: Reporting, plan: PassPlan, published: int) -> None:
    """The last step: clear the marks the plan read (those changed since stay) and record the
    horizon the figures now reach."""
    if not plan.marks and not plan.years:
        return
    async with reporting.db.transaction() as session:
        await store.clear_dirty(session, plan.marks)
        if plan.newest is not None:
            await store.set_state(session, store.HORIZON, plan.newest)
    if plan.newest is None:
        return
    reporting.passes += 1
    reporting.published += published
    if published:
        reporting.changes.notify()


@dataclass
class YearSeen:
    """A year's sums as the last committed pass of this process computed its cells from."""

    horizon: str
    cells: dict[CellKey, domain.Accumulated]
    stock: dict[tuple[str, str], domain.Accumulated]


async def _publish_year(
    reporting: Reporting, year: int, newest: str, *, republish: bool
) -> tuple[int, str]:
    """Recompute and publish ``year``; returns how many cells were published and the newest
    month the figures were computed up to."""
    runtime = reporting.runtime
    async with runtime.db.transaction() as session:
        if runtime.db.is_postgres:
            # Replicas take turns; the second then finds nothing changed.
            await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        # The newest month as it is now, under the lock: another replica may have published
        # with a newer one since this pass read it, and figures cut off at the older month
        # would replace its figures (a month it suppressed to protect a newer one included).
        newest = max(newest, await store.horizon(session) or newest)
        accumulated, stock = await store.year_cells(session, year)
        revision = await store.revision(session)
        if revision != reporting.revision_seen:
            # Another process published since this one's last pass: what is published may
            # stem from sums this process never saw, so every year is computed in full and
            # compared with the published cells as they are now.
            reporting.seen.clear()
            reporting.on_stream.clear()
        seen = reporting.seen.get(year)
        figures: frozenset[KpiFigure] | None = None
        if seen is not None and seen.horizon == newest and not republish:
            # Only clusters whose sums changed (here or in another replica) can change.
            changed = domain.changed_figures(seen.cells, accumulated)
            if seen.stock != stock:
                changed.add(domain.STOCK_DELTA)
            figures = domain.clusters_of(changed, reporting.layout)
        changed_cells: list[Cell] = []
        before = reporting.on_stream.get(year)
        if figures is None or figures:
            # Pure and CPU-bound: off the event loop, so consumers and streams keep going.
            cells = await asyncio.to_thread(
                domain.year_cells, year, newest, reporting.layout, accumulated, stock, figures
            )
            if before is None:
                # Every figure, though this pass may compute a few: the next passes compare
                # with this copy (each reading thousands of rows costs more than computing).
                before = await store.published_cells(session, year)
            changed_cells = cells if republish else domain.changed_cells(cells, before)
            if changed_cells:
                now = runtime.clock().astimezone(UTC)
                revision += 1
                await store.save_cells(session, changed_cells, now, revision)
                add_kpi_events(runtime, session, changed_cells, now)
    # Committed: what this pass computed from and published is what the next one builds on.
    if before is not None:
        before.update({cell.key: (cell.value, cell.suppressed) for cell in changed_cells})
        reporting.on_stream[year] = before
    reporting.seen[year] = YearSeen(newest, accumulated, stock)
    reporting.revision_seen = revision
    return len(changed_cells), newest


def add_kpi_events(
    runtime: ServiceRuntime[ReportingSettings],
    session: AsyncSession,
    cells: Sequence[Cell],
    now: datetime,
) -> None:
    """The ``kpi-updated`` events of ``cells`` through the outbox (one INSERT at commit, the
    relay woken on commit and, on PostgreSQL, in the other replicas), with the trace context
    of this pass. Built from plain values (:class:`~lotse_reporting.records.KpiRecords`, the
    contract's bytes): a model, CloudEvent and record per cell cost more than the pass's
    computing. Where the registry routes audience copies of them, each goes the event's way
    (``Outbox.add_cloudevent``), so the outbox makes the copies."""
    outbox = runtime.outbox
    if KpiUpdated.event_type in runtime.registry.routed_types():
        for cell in cells:
            cloudevent = kpi_updated(cell, now).to_cloudevent(
                source=outbox.source, schema_base=outbox.schema_base
            )
            outbox.add_cloudevent(session, cloudevent, KpiUpdated.topic)
        return
    records = KpiRecords(
        source=outbox.source,
        schema_base=outbox.schema_base,
        now=now,
        extra_headers=inject_headers(),
    )
    topic = outbox.topic_prefix + KpiUpdated.topic
    outbox.add_records(session, (records.outbox_row(cell, topic) for cell in cells))


def kpi_updated(cell: Cell, now: datetime) -> KpiUpdated:
    """The contract model of a published cell (the replay's plain-value records are held to it)."""
    return KpiUpdated(
        bezirk=cell.bezirk,
        period=cell.period,
        figure=cell.figure,
        dimension=cell.dimension,
        value=cell.value,
        suppressed=cell.suppressed,
        unit=cell.unit,
        computed_at=now,
    )


# --- reading the published figures -----------------------------------------------------------


def _check_area(reporting: Reporting, bezirk: str | None) -> None:
    if bezirk is not None and bezirk not in reporting.layout.areas:
        known = ", ".join(reporting.layout.areas)
        raise Refusal("query.bezirk", f"unknown Stadtbezirk {bezirk!r}; known: {known}")


async def list_kpis(reporting: Reporting, wanted: KpiFilter) -> list[KpiPublic]:
    """Published cells matching the filter (a Bezirk of the city, a period of the year)."""
    _check_area(reporting, wanted.bezirk)
    period, year = wanted.period, wanted.year
    if period is not None and year is not None and not period.startswith(str(year)):
        raise Refusal("query.period", f"period {period} is not in year {year}")
    async with reporting.db.transaction() as session:
        rows = await store.query_kpis(session, wanted)
    return [KpiPublic.of(row) for row in rows]


def figures(reporting: Reporting) -> list[FigurePublic]:
    """The figures' declaration (:mod:`lotse_contracts.figures`), with their breakdowns in
    this city."""
    return [
        FigurePublic(
            figure=definition.figure,
            unit=definition.unit,
            label=definition.label,
            description=definition.description,
            accumulates=definition.accumulates,
            attribution=definition.attribution,
            suppression=definition.suppression,
            dimensions=[
                d
                for d in domain.figure_dimensions(definition.figure, reporting.layout.modules)
                if d is not None
            ],
        )
        for definition in FIGURES
    ]


def areas(reporting: Reporting) -> list[BezirkPublic]:
    """The Stadtbezirke and the whole city."""
    return [
        *(BezirkPublic(slug=b.slug, name=b.name) for b in reporting.runtime.city.stadtbezirke),
        BezirkPublic(slug=STADT, name=reporting.area_name(STADT)),
    ]


@dataclass(frozen=True)
class AnnualReport:
    """An annual report as text, ready to be sent."""

    format: Literal["csv", "html"]
    text: str
    filename: str


async def annual_report(
    reporting: Reporting, year: int, bezirk: str, fmt: Literal["csv", "html"]
) -> AnnualReport:
    """The annual report of ``year`` and ``bezirk`` as CSV or HTML."""
    _check_area(reporting, bezirk)
    async with reporting.db.transaction() as session:
        rows = await store.query_kpis(session, KpiFilter(bezirk=bezirk, year=year))
        city_rows = rows
        if bezirk != STADT and fmt == "html":
            city_rows = await store.query_kpis(session, KpiFilter(bezirk=STADT, year=year))
    if not rows:
        raise Refusal("path.year", f"no figures for {year} yet")
    cells = [KpiPublic.of(row) for row in rows]
    filename = f"lotse-{bezirk}-{year}.{fmt}"
    if fmt == "csv":
        return AnnualReport("csv", report.annual_csv(cells), filename)
    city = reporting.runtime.city
    context = report.ReportContext(
        city=city.name,
        year=year,
        area=bezirk,
        area_name=reporting.area_name(bezirk),
        modules={m.slug: m.name for m in city.modules},
        reach_reference=city.reach_rate_reported,
        generated_at=max(c.computed_at for c in cells),
    )
    city_cells = [KpiPublic.of(row) for row in city_rows]
    return AnnualReport("html", report.annual_html(context, cells, city_cells), filename)


def compact(row: ReportingKpi) -> dict[str, Any]:
    """A published cell as the dashboard's script reads it."""
    return {
        "b": row.bezirk,
        "p": row.period,
        "f": row.figure,
        "d": row.dimension or None,
        "v": row.value,
        "s": row.suppressed,
    }


async def dashboard_data(reporting: Reporting, year: int | None) -> dict[str, Any]:
    """All published cells of ``year`` (default: the newest with figures), compact, with
    what the page needs to label them."""
    async with reporting.db.transaction() as session:
        revision = await store.revision(session)
        years = await store.years_with_figures(session)
        chosen = year if year is not None else (years[-1] if years else None)
        rows = [] if chosen is None else await store.query_kpis(session, KpiFilter(year=chosen))
    city = reporting.runtime.city
    reference = city.reach_rate_reported
    return {
        "city": city.name,
        "k": reporting.layout.k,
        "reachReference": None if reference is None else round(100 * reference, 1),
        "areas": [a.model_dump() for a in areas(reporting)],
        "modules": {m.slug: m.name for m in city.modules},
        "figures": {
            definition.figure.value: {
                "label": definition.label,
                "description": definition.description,
                "unit": definition.unit.value,
                "accumulates": definition.accumulates.value,
            }
            for definition in FIGURES
        },
        "years": sorted({*years, *([chosen] if chosen is not None else [])}),
        "year": chosen,
        "revision": revision,
        "cells": [compact(row) for row in rows],
    }


async def current_revision(reporting: Reporting) -> int:
    async with reporting.db.transaction() as session:
        return await store.revision(session)


async def published_since(reporting: Reporting, revision: int) -> tuple[int, list[dict[str, Any]]]:
    """The cells published after ``revision`` (compact) and the newest revision among them
    (``revision`` itself when there are none)."""
    async with reporting.db.transaction() as session:
        rows = await store.published_since(session, revision)
    if not rows:
        return revision, []
    return max(row.revision for row in rows), [compact(row) for row in rows]
