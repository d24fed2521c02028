"""Rebuild by replay: the projections dropped and rebuilt from offset 0 give identical figures,
redelivered events have no second effect, and the CLI does the same from the environment."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from fastapi.testclient import TestClient
from lotse_contracts.cloudevents import from_kafka
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.reporting import KpiUpdated
from lotse_contracts.topics import DOMAIN_TOPICS
from lotse_reporting.app import create_app
from lotse_reporting.replay import replay
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.tables import FACT_TABLES, ReportingKpi
from lotse_runtime.db import Database
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import func, select
from sqlmodel import SQLModel, col

from tests.conftest import Broker
from tests.hardening.test_poison import poison_for
from tests.reporting.builders import Family, Published, at, new_id, publish, random_city, to_records
from tests.reporting.conftest import reporting_of, runtime_of, settings_for, settle, wait_ready

pytestmark = pytest.mark.integration

BEZIRKE = ["hoerde", "eving", "brackel", "innenstadt-nord", "mengede"]


def poison(prefix: str, seed: int) -> tuple[list[Published], Counter[str]]:
    """Malformed records of the hardening tests' corpus on every domain topic (not the
    oversized ones: this service's limit is higher), and the verdict kinds they deserve."""
    rng = random.Random(seed)
    records: list[Published] = []
    kinds: Counter[str] = Counter()
    for topic in DOMAIN_TOPICS:
        for bad in poison_for(topic, 9, rng):
            if bad.kind == "oversized":
                continue
            records.append(Published(prefix + topic, bad.key, bad.value, bad.headers))
            (stage,) = bad.stages
            kinds[stage] += 1
    return records, kinds


def dataset(prefix: str, seed: int = 11) -> tuple[list[Published], int, int]:
    """Random families, a few impossible events, a few redelivered records.

    Returns the records, how many are redeliveries and how many impossible."""
    rng = random.Random(seed)
    events = random_city(rng, 120, BEZIRKE, at("2024-11-04").date())
    ghost = Family(bezirk="atlantis")
    family = Family(bezirk="hoerde")
    visit = new_id()
    impossible: list[EventModel] = [
        ghost.registered(at("2025-01-03")),
        family.scheduled(visit, at("2025-01-10"), at("2025-01-20")),
        family.completed(visit, at("2025-01-08"), at("2025-01-08", 11), 9),
    ]
    records = to_records(events + impossible, prefix)
    again = rng.sample(records, 15)
    return records + again, len(again), 2


async def snapshot(url: str) -> tuple[dict[Any, Any], dict[str, list[Any]], int]:
    """The published cells, every projected fact row, and the inbox size."""
    db = Database(url)
    try:
        async with db.transaction() as session:
            cells = {
                (r.bezirk, r.period, r.figure, r.dimension): (r.value, r.suppressed)
                for r in await session.scalars(select(ReportingKpi))
            }
            facts: dict[str, list[Any]] = {}
            for model in FACT_TABLES:
                rows = await session.execute(select(model))
                facts[str(getattr(model, "__tablename__", model))] = sorted(
                    (
                        tuple(sorted(plain.items()))
                        for plain in (_plain(row[0]) for row in rows)
                        if not _empty_cell(plain)
                    ),
                    key=repr,
                )
            inbox = await session.scalar(
                select(func.count())
                .select_from(InboxEntry)
                .where(col(InboxEntry.consumer) == "reporting.main")
            )
        return cells, facts, int(inbox or 0)
    finally:
        await db.dispose()


def _empty_cell(row: dict[str, Any]) -> bool:
    """A cell every family has left again (live, one event at a time) holds zeros; a replay
    in batches may never write it. Both mean the same sums."""
    sums = [row.get(name) for name in ("families", "value", "hits", "weight", "count")]
    return "dimension" in row and all(not v for v in sums)


def _plain(row: SQLModel) -> dict[str, Any]:
    data = row.model_dump()
    # SQLite hands back times without a zone; compare the instants.
    return {
        k: (v.replace(tzinfo=None) if hasattr(v, "tzinfo") and v is not None else v)
        for k, v in data.items()
    }


def test_replay_rebuilds_identical_figures_and_facts(
    broker: Broker, topics: str, database_url: str
) -> None:
    records, redelivered, impossible = dataset(topics)
    malformed, invalid = poison(topics, 23)
    records = records[:200] + malformed + records[200:]
    settings = settings_for(broker, topics, database_url)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        publish(broker.bootstrap, records)
        # Each malformed record leaves the batch path for the one-by-one path and its dead
        # letter: slower than the rest, so more time on a busy machine.
        settle(client, len(records), timeout_s=180)
        consumer = runtime_of(client).consumers[0]
        assert consumer.duplicates == redelivered
        assert consumer.dead_lettered == impossible + len(malformed)
        applied_live = consumer.processed
        assert reporting_of(client).published > 0
    cells, facts, inbox = asyncio.run(snapshot(database_url))
    assert inbox == applied_live
    assert sum(1 for v, s in cells.values() if v and not s) > 100

    stats = asyncio.run(replay(settings, idle_timeout_s=2.0))
    assert stats.records == len(records)
    assert stats.applied == applied_live
    assert stats.duplicates == redelivered
    assert sum(stats.rejected.values()) == impossible
    assert stats.rejected == {"bezirk": 1, "visit-completed": 1}
    assert stats.invalid == invalid  # by verdict kind, none dead-lettered again
    assert stats.cells_published == 0  # nothing differs from what the stream says
    assert asyncio.run(snapshot(database_url)) == (cells, facts, inbox)

    # Read everything again without dropping: every event is a redelivery now.
    again = asyncio.run(replay(settings, keep=True, idle_timeout_s=2.0))
    assert again.applied == 0
    assert again.duplicates == applied_live + redelivered
    assert again.cells_published == 0
    assert asyncio.run(snapshot(database_url)) == (cells, facts, inbox)


def test_the_replay_cli_rebuilds_a_lost_database(
    broker: Broker, topics: str, tmp_path: Path
) -> None:
    records, _, _ = dataset(topics, seed=5)
    live_url = f"sqlite+aiosqlite:///{tmp_path / 'live.db'}"
    with TestClient(create_app(settings_for(broker, topics, live_url))) as client:
        wait_ready(client)
        publish(broker.bootstrap, records)
        settle(client, len(records))
    live_cells, live_facts, _ = asyncio.run(snapshot(live_url))

    fresh_url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    env = {
        **os.environ,
        "LOTSE_KAFKA_BOOTSTRAP": broker.bootstrap,
        "LOTSE_TOPIC_PREFIX": topics,
        "LOTSE_REPORTING_DATABASE_URL": fresh_url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "lotse_reporting.replay", "--idle-timeout", "2", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["records"] == len(records)
    assert summary["processes"] == 2  # --workers 2: a shard's process of its own
    assert summary["cells_published"] == len(live_cells)  # a new database: all of them
    assert "replaying domain topics" in done.stderr  # the progress bar
    fresh_cells, fresh_facts, _ = asyncio.run(snapshot(fresh_url))
    assert fresh_cells == live_cells
    assert fresh_facts == live_facts

    # What the replay published went through its outbox, all of it sent, and arrived as
    # contract records on the partition the live relay's producer would have chosen.
    sent, unsent = asyncio.run(outbox_ids(fresh_url))
    assert len(sent) == summary["cells_published"]
    assert not unsent
    arrived = asyncio.run(kpi_records(broker.bootstrap, topics + KpiUpdated.topic))
    replayed = [r for r in arrived if dict(r.headers)["ce_id"].decode() in sent]
    assert len(replayed) == len(sent)
    partitioner = DefaultPartitioner()
    validator = jsonschema.Draft202012Validator(json.loads(KPI_SCHEMA.read_text()))
    for record in arrived:
        partitions = list(range(2))
        assert record.partition == partitioner(record.key, partitions, partitions)
    for record in replayed[::5]:
        validator.validate(json.loads(record.value))
        event = from_kafka(record.value, list(record.headers))
        assert KpiUpdated.model_validate(event.data).cell() == event.subject == record.key.decode()


KPI_SCHEMA = (
    Path(__file__).resolve().parents[2] / "contracts" / "schemas" / f"{KpiUpdated.event_type}.json"
)


async def outbox_ids(url: str) -> tuple[set[str], set[str]]:
    """The event ids of the outbox rows, sent and unsent."""
    db = Database(url)
    try:
        async with db.transaction() as session:
            rows = await session.execute(
                select(col(OutboxMessage.event_id), col(OutboxMessage.sent_at))
            )
            pairs = rows.all()
        return {i for i, at in pairs if at is not None}, {i for i, at in pairs if at is None}
    finally:
        await db.dispose()


async def kpi_records(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the topic (read until nothing more comes)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(2)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[ConsumerRecord[bytes, bytes]] = []
        while True:
            batch = await consumer.getmany(timeout_ms=2000, max_records=10_000)
            if not batch:
                return found
            for records in batch.values():
                found.extend(records)
    finally:
        await consumer.stop()


def test_replay_of_empty_topics_publishes_nothing(
    broker: Broker, topics: str, sqlite_url: str
) -> None:
    settings: ReportingSettings = settings_for(broker, topics, sqlite_url)
    stats = asyncio.run(replay(settings, idle_timeout_s=1.0))
    assert stats.records == 0
    assert stats.cells_published == 0
