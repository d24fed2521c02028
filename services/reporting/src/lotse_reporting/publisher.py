"""Publishing the key figures: recompute the years that events made dirty, compare with what
the reporting stream says, and publish each changed cell as ``kpi-updated`` through the
outbox, in the same transaction that records it in ``reporting_kpi``."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Callable
from datetime import UTC, datetime

from lotse_contracts.events.reporting import KpiUpdated
from lotse_runtime.db import Database
from lotse_runtime.outbox import Outbox
from sqlalchemy import text

from lotse_reporting import domain, store
from lotse_reporting.domain import Cell, Layout
from lotse_reporting.tables import ReportingKpi

REVISION = "kpi_revision"
HORIZON = "horizon"
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


class KpiPublisher:
    """Turns facts into published figures."""

    def __init__(
        self,
        *,
        db: Database,
        outbox: Outbox,
        layout: Layout,
        clock: Callable[[], datetime],
        changes: Changes | None = None,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.layout = layout
        self.clock = clock
        self.changes = changes
        self.published = 0
        self.passes = 0

    async def run_pass(self, *, all_years: bool = False, republish: bool = False) -> int:
        """Recompute what is dirty (or every year) and publish the changes; returns how many
        cells were published."""
        async with self.db.transaction() as session:
            dirty = await store.dirty_years(session)
            newest = await store.horizon(session)
            known = await store.get_state(session, HORIZON)
            oldest = await store.oldest_year(session)
        if newest is None or oldest is None:
            if dirty:
                async with self.db.transaction() as session:
                    await store.clear_dirty(session, dirty)
            return 0
        starts = list(dirty)
        if all_years:
            starts.append(oldest)
        if known != newest:
            # New months appear at the horizon (and a year may have been left incomplete).
            starts.append(domain.year_of(known) if known else oldest)
        if not starts:
            return 0
        published = 0
        # Later years follow too: an escalation's state carries over into them.
        for year in range(max(min(starts), oldest), domain.year_of(newest) + 1):
            published += await self._publish_year(year, newest, republish=republish)
        async with self.db.transaction() as session:
            await store.clear_dirty(session, dirty)
            await store.set_state(session, HORIZON, newest)
        self.passes += 1
        self.published += published
        if published and self.changes is not None:
            self.changes.notify()
        return published

    async def _publish_year(self, year: int, newest: str, *, republish: bool) -> int:
        async with self.db.transaction() as session:
            if self.db.is_postgres:
                # Replicas take turns; the second then finds nothing changed.
                await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            inputs = await store.load_year(session, year, newest)
            # Pure and CPU-bound: off the event loop, so consumers and streams keep going.
            cells = await asyncio.to_thread(domain.compute_year, inputs, self.layout)
            before = await store.published_cells(session, year)
            changed = cells if republish else domain.changed_cells(cells, before)
            if not changed:
                return 0
            revision = int(await store.get_state(session, REVISION) or 0) + 1
            now = self.clock().astimezone(UTC)
            await store.upsert(session, ReportingKpi, [_row(c, now, revision) for c in changed])
            for cell in changed:
                self.outbox.add(session, _event(cell, now))
            await store.set_state(session, REVISION, str(revision))
            return len(changed)


def _row(cell: Cell, now: datetime, revision: int) -> dict[str, object]:
    return {
        "bezirk": cell.bezirk,
        "period": cell.period,
        "figure": cell.figure.value,
        "dimension": cell.dimension or "",
        "value": cell.value,
        "suppressed": cell.suppressed,
        "unit": cell.unit.value,
        "computed_at": now,
        "revision": revision,
    }


def _event(cell: Cell, now: datetime) -> KpiUpdated:
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
