"""Two reporting instances in one consumer group on one PostgreSQL database (production runs
two): each applies the partitions it is assigned; publication passes take turns under an
advisory lock and read the shared cells, so every change of a cell is published once, and
the reporting stream ends, per cell, at the figure computed from all facts at once."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.intake import CasesMerged
from lotse_contracts.events.reporting import KpiFigure
from lotse_reporting import operations, store
from lotse_reporting.app import create_app
from lotse_reporting.operations import Reporting
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.store import KpiFilter
from lotse_runtime.testing import without_broker

from tests.conftest import Broker
from tests.reporting.builders import Family, at, publish, random_city, to_records
from tests.reporting.conftest import (
    reporting_of,
    runtime_of,
    settings_for,
    settle,
    wait_ready,
    wait_until,
)
from tests.reporting.test_reporting_domain import figures, run
from tests.support import _read

pytestmark = pytest.mark.integration

BEZIRKE = ["hoerde", "eving", "brackel", "mengede"]


def applied_by(client: TestClient) -> int:
    """Records this instance's live consumer applied (or refused): each record once over
    both instances, whatever was delivered twice."""
    consumer = runtime_of(client).consumers[0]
    return consumer.processed + consumer.dead_lettered + consumer.skipped


def test_two_replicas_publish_every_change_once_and_end_at_the_truth(
    broker: Broker, topics: str, postgres_url: str
) -> None:
    events = random_city(random.Random(5), 150, BEZIRKE, at("2025-01-06").date())
    records = to_records(events, topics)
    settings = settings_for(broker, topics, postgres_url)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        wait_ready(one)
        wait_ready(two)
        publish(broker.bootstrap, records)
        # Applied, not handled: a record one instance applied and the other got again after
        # a rebalance (its offset not yet committed) counts as a duplicate there, so the
        # handled counts can add up to every record while some are not yet applied at all.
        wait_until(
            lambda: applied_by(one) + applied_by(two) >= len(records), 120.0, "records applied"
        )
        settle(one, 0, 120.0)
        settle(two, 0, 120.0)
        applied = [client.app.state.runtime.consumers[0].processed for client in (one, two)]  # type: ignore[attr-defined]
        published = reporting_of(one).published + reporting_of(two).published
    # Both instances worked: the group split the partitions between them.
    assert all(applied), applied
    stream = _read(broker.bootstrap, topics + "lotse.reporting.kpis", published, 60.0)
    assert len(stream) == published
    history: dict[str, list[dict[str, Any]]] = {}
    for record in stream:  # one key stays in one partition, in order
        history.setdefault((record.key or b"").decode(), []).append(
            json.loads(record.value or b"{}")
        )
    # No state of a cell was published twice (by the two instances, or by one twice).
    for key, values in history.items():
        states = [(v.get("value"), v["suppressed"]) for v in values]
        assert all(a != b for a, b in itertools.pairwise(states)), key
    # The last value of every cell is the figure computed from all facts at once.
    snapshot = run(events)
    years = {int(key.split("/")[1][:4]) for key in history}
    expected = {
        "/".join(part for part in cell.key if part): (cell.value, cell.suppressed)
        for year in years
        for cell in figures(snapshot, year).values()
    }
    latest = {
        key: (values[-1].get("value"), values[-1]["suppressed"]) for key, values in history.items()
    }
    assert latest == expected
    assert sum(1 for value, hidden in latest.values() if value and not hidden) > 20


# --- two replicas' passes interleaved step by step, on one database --------------------------


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[tuple[Reporting, Reporting]]:
    """Two reporting instances on one database, without a broker; their publication jobs
    have run their pass at start (on nothing) and wait, so the test drives every pass."""
    settings = ReportingSettings(
        database_url=database_url,
        kafka_bootstrap="127.0.0.1:1",  # nothing listens: no broker is needed
        publish_interval_s=3600,
        publish_debounce_s=10,
    )
    async with AsyncExitStack() as stack:
        found: list[Reporting] = []
        for _ in range(2):
            app = create_app(settings)
            runtime = await stack.enter_async_context(without_broker(app))
            job = next(job for job in runtime.jobs if job.name == "kpis")
            for _ in range(200):
                if job.runs:
                    break
                await asyncio.sleep(0.05)
            assert job.runs, "the publication job's first pass did not run"
            found.append(app.state.reporting)
        yield found[0], found[1]


async def _apply(reporting: Reporting, events: Sequence[EventModel]) -> None:
    """Apply ``events`` in one transaction, as the live consumer applies a batch."""
    async with reporting.db.transaction() as session:
        for event in events:
            await operations.apply_event(session, event, reporting.rules)


async def _registered(reporting: Reporting, bezirk: str, period: str) -> float | None:
    async with reporting.db.transaction() as session:
        rows = await store.query_kpis(
            session,
            KpiFilter(
                bezirk=bezirk,
                period=period,
                figure=KpiFigure.FAMILIES_REGISTERED,
                breakdowns=False,
            ),
        )
    assert len(rows) == 1, rows
    return rows[0].value


async def test_a_change_after_another_replicas_pass_is_not_cleared_by_an_older_read(
    replicas: tuple[Reporting, Reporting],
) -> None:
    """A pass clears only the dirty marks it read. Replica A reads the mark of 2025, replica
    B reads it too, publishes and clears it; then a sixth family is applied (a new mark of
    2025), and only then A clears what it read. The sixth family's mark must survive A's
    clear, so the next pass publishes it: when a cleared mark was deleted, the new one
    started again at the version A had read, A deleted it, and the cell stayed at 5 for good
    (the stale cells of issue 19's CI run)."""
    one, two = replicas
    day = at("2025-03-03")
    await _apply(one, [Family(bezirk="hoerde").registered(day) for _ in range(5)])
    seen_by_one = await operations.plan_pass(one)
    seen_by_two = await operations.plan_pass(two)
    assert seen_by_one.years == seen_by_two.years == [2025]
    published = await operations.publish_planned(two, seen_by_two)
    assert published > 0
    assert await operations.publish_planned(one, seen_by_one) == 0  # two published it all
    await operations.finish_pass(two, seen_by_two, published)
    assert await _registered(one, "hoerde", "2025-03") == 5
    await _apply(two, [Family(bezirk="hoerde").registered(day)])
    await operations.finish_pass(one, seen_by_one, 0)
    # The next pass (the trigger of the replica that applied it) publishes the sixth family.
    await operations.publish_figures(two)
    assert await _registered(one, "hoerde", "2025-03") == 6
    async with one.db.transaction() as session:
        assert await store.dirty_years(session) == {}


async def test_a_cell_moved_and_moved_back_by_the_other_replica_is_not_left_stale(
    replicas: tuple[Reporting, Reporting],
) -> None:
    """A replica compares its cells with its own copy of what is published only while no
    other process published: here replica B publishes a sixth family, then that family is
    merged into another (counted nowhere), and replica A, whose copy still says 5, must
    compare with the 6 on the stream and publish 5 again."""
    one, two = replicas
    day = at("2025-03-03")
    families = [Family(bezirk="hoerde") for _ in range(5)]
    await _apply(one, [family.registered(day) for family in families])
    assert await operations.publish_figures(one) > 0
    twin = Family(bezirk="hoerde")
    await _apply(two, [twin.registered(day)])
    assert await operations.publish_figures(two) > 0
    assert await _registered(one, "hoerde", "2025-03") == 6
    merged = CasesMerged.example().model_copy(
        update={
            "merged_case_id": twin.case_id,
            "case_id": families[0].case_id,
            "bezirk": "hoerde",
        }
    )
    await _apply(one, [merged])
    assert await operations.publish_figures(one) > 0
    assert await _registered(one, "hoerde", "2025-03") == 5


async def test_a_pass_planned_before_a_new_month_publishes_with_the_newest_month(
    replicas: tuple[Reporting, Reporting],
) -> None:
    """Replica A plans its pass over 2025 while March is the newest month; two families of
    April are applied, replica B plans, publishes 2025 up to April (April suppressed, and
    March with it, so April cannot be worked out from the year's total) and records April as
    the horizon. Only then A publishes its plan: it must compute with the newest month as it
    is under the replicas' lock. With the month it read before it would put March back on
    the stream unsuppressed after B's figures (telling April from the total), and nothing
    would mark 2025 dirty again."""
    one, two = replicas
    await _apply(one, [Family(bezirk="hoerde").registered(at("2025-03-03")) for _ in range(5)])
    assert await operations.publish_figures(one) > 0
    await _apply(one, [Family(bezirk="hoerde").registered(at("2025-03-04"))])
    seen_by_one = await operations.plan_pass(one)
    assert (seen_by_one.years, seen_by_one.newest) == ([2025], "2025-03")
    # Two families in April: below k, so April is suppressed and, to keep it from being
    # worked out from the year's total, another month of the year with it.
    await _apply(two, [Family(bezirk="hoerde").registered(at("2025-04-07")) for _ in range(2)])
    seen_by_two = await operations.plan_pass(two)
    assert seen_by_two.newest == "2025-04"
    published = await operations.publish_planned(two, seen_by_two)
    assert published > 0
    await operations.finish_pass(two, seen_by_two, published)
    stream_after_two = await _published(one)
    assert await operations.publish_planned(one, seen_by_one) == 0
    await operations.finish_pass(one, seen_by_one, 0)
    assert await _published(one) == stream_after_two
    # Nothing is left for a later pass: what B published is the truth up to April.
    assert await operations.publish_figures(one) == 0


async def _published(reporting: Reporting) -> dict[tuple[str, str, str, str], Any]:
    async with reporting.db.transaction() as session:
        rows = await store.query_kpis(session, KpiFilter(breakdowns=True))
    return {(r.bezirk, r.period, r.figure, r.dimension): (r.value, r.suppressed) for r in rows}
