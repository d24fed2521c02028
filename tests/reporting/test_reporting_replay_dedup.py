"""The replay's duplicate check is exact whatever its Bloom filter says: a filter that answers
"maybe seen" for everything changes no outcome (each hit is confirmed against the inbox)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from aiokafka import ConsumerRecord
from lotse_reporting import domain
from lotse_reporting.replay_rebuild import SeenFilter
from lotse_reporting.tables import TABLES
from lotse_runtime.db import Database
from lotse_runtime.migrations import create_schema

from tests.reporting.replay_data import bench_events, consumer_record, new_rebuild


def _records() -> tuple[list[ConsumerRecord[bytes, bytes]], int]:
    """Bench records in 3 batches with some redelivered; how many redeliveries are handled
    events (the rest are skipped types)."""
    records = [consumer_record(event, offset) for offset, event in enumerate(bench_events(900, 5))]
    again = random.Random(5).sample(records, 60)
    handled = {m.event_type for m in domain.HANDLED}
    redelivered = sum(1 for r in again if dict(r.headers)["ce_type"].decode() in handled)
    return records + again, redelivered


async def _replay(tmp: Path, seen: SeenFilter) -> tuple[Counter[str], domain.Snapshot]:
    db = Database(f"sqlite+aiosqlite:///{tmp}")
    try:
        await create_schema(db, TABLES, service="reporting")
        counts: Counter[str] = Counter()
        rebuild = new_rebuild(counts)
        rebuild._applied = seen
        records, _ = _records()
        async with db.transaction() as session:
            for start in range(0, len(records), 330):
                await rebuild.apply_batch(session, records[start : start + 330])
        return counts, rebuild.snapshot
    finally:
        await db.dispose()


def test_a_filter_that_always_says_maybe_changes_nothing(tmp_path: Path) -> None:
    _, redelivered = _records()
    exact, snapshot = asyncio.run(_replay(tmp_path / "a.db", SeenFilter()))
    saturated = SeenFilter(bits=8)
    for n in range(50):
        saturated.add(("/x", str(n)))  # every bit set: every key "may" be there
    assert ("/never", "seen") in saturated
    noisy, noisy_snapshot = asyncio.run(_replay(tmp_path / "b.db", saturated))
    assert exact["duplicates"] == redelivered > 0
    assert noisy == exact
    assert noisy_snapshot.facts == snapshot.facts
    assert noisy_snapshot.cases == snapshot.cases
