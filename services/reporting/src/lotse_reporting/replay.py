"""Rebuild the projections by replaying the domain topics from offset 0.

    python -m lotse_reporting.replay [--keep] [--republish-all] [--batch-size N]
                                     [--workers N] [--quiet]

Settings come from the environment like the service's (``LOTSE_REPORTING_*``, ``LOTSE_*``).
Stop the service first (scale it to zero): the replay writes the same tables.

What it does:

1. Drops the projected facts and the live consumer's inbox entries (``--keep`` keeps both: a
   second pass over the topics then changes nothing, which shows the exactly-once effects).
2. Reads every partition of ``lotse.intake``, ``lotse.visits`` and ``lotse.referrals`` from
   the beginning with its own assignment (no consumer group, so the service's committed
   offsets are untouched) until it has caught up. Each record gets the live consumer's
   verdict (:mod:`lotse_reporting.replay_input`: a short cut that only accepts, the live
   consumer's own calls for everything else) and each event the live consumer's rules
   (``domain.apply``); inbox entries are written under the live consumer's name, so
   redelivered copies are applied once and the service, once restarted, skips what the
   replay applied.
   From empty projections (the default) the rows the checks read back stay in memory and
   everything goes to the database in one transaction
   (:mod:`lotse_reporting.replay_rebuild`): the inbox entries and the facts no check reads
   of each fetch, then the other rows, the cells summed from the stored rows
   (:mod:`lotse_reporting.replay_cells`), the changed figures and their outbox rows. With
   ``--keep`` each fetch is applied in a transaction of its own against the stored rows, as
   before.
   Into SQLite, a rebuild from empty projections may be shared by ``--workers`` processes
   (default: one; two on two cores took a 200,000-event replay from ~23 to ~19 s and
   together hold ~240 MB more): each reads every record and applies those of its
   families (:class:`Shard`, by record key), a shard's own process into a SQLite file of its
   own whose rows this process copies into its transaction, and the shards' cells are
   added up. A shard's verdicts are one process's only while no event reaches into another
   family (:class:`~lotse_reporting.replay_rebuild.ShardWitness`); where one does, the
   rebuild is rolled back and done by this process alone. On PostgreSQL one process does
   it all: the shards' SQLite rows would be converted one by one on their way there.
3. Publishes the cells whose value differs from what the reporting stream says
   (``--republish-all``: every cell) through the outbox, and sends the outbox rows
   (:mod:`lotse_reporting.replay_send`).

Events the live consumer dead-lettered are rejected again by the same rules and counted by
verdict kind or reason, not dead-lettered a second time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import pickle
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from lotse_contracts import topics
from lotse_runtime.app import ServiceRuntime, build_runtime
from lotse_runtime.db import Database
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.migrations import create_schema
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_reporting import domain, operations, store
from lotse_reporting.consumers import CONSUMER
from lotse_reporting.domain import Accumulated, CellKey
from lotse_reporting.operations import Reporting
from lotse_reporting.replay_cells import merge_cells
from lotse_reporting.replay_input import Decoded, Decoder, Skipped
from lotse_reporting.replay_rebuild import (
    Rebuild,
    ShardsOverlap,
    ShardWitness,
    collector_off,
    copy_shard,
    horizon,
    publish,
    sqlite_cache,
    write_cells,
)
from lotse_reporting.replay_send import can_send, send_unsent
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.tables import TABLES

_log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
"""Called with (records read so far, records expected in all, if known)."""


@dataclass
class ReplayStats:
    """What a replay did."""

    records: int = 0
    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    """Known events the projections do not use."""
    invalid: Counter[str] = field(default_factory=Counter)
    """Records the live consumer dead-letters as invalid, by its verdict kind (envelope,
    type, schema)."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Impossible events by reason."""
    consume_s: float = 0.0
    """Reading, checking and applying every record (and writing the inbox entries)."""
    build_s: float = 0.0
    """Writing the projections' rows and the cells (a replay into empty projections)."""
    publish_s: float = 0.0
    """Deriving, recording and publishing the changed figures, until the relay sent them."""
    cells_published: int = 0
    processes: int = 1
    """Processes that applied the records (``Shard``)."""
    consume_cpu_s: float = 0.0
    """CPU seconds of the replay process (all its threads) per phase: unlike the wall-clock
    times, they hardly change with what else the machine runs (a shard's own process:
    ``shards_cpu_s``)."""
    build_cpu_s: float = 0.0
    publish_cpu_s: float = 0.0
    shards_cpu_s: float = 0.0
    """CPU seconds of the shards' own processes (``Shard``), start-up included."""
    rss_mb: dict[str, float] = field(default_factory=dict)
    """Resident memory of the replay process when each phase began and its peak (``peak``)."""

    @classmethod
    def of(cls, counts: Counter[str]) -> ReplayStats:
        stats = cls(
            records=counts["records"],
            applied=counts["applied"],
            duplicates=counts["duplicates"],
            skipped=counts["skipped"],
        )
        for key, count in counts.items():
            kind, _, reason = key.partition(":")
            if kind == "invalid":
                stats.invalid[reason] += count
            elif kind == "rejected":
                stats.rejected[reason] += count
        return stats

    @property
    def total_s(self) -> float:
        return self.consume_s + self.build_s + self.publish_s

    @property
    def events_per_s(self) -> float:
        return self.records / self.consume_s if self.consume_s else 0.0

    def summary(self) -> dict[str, Any]:
        total = self.total_s
        return {
            "records": self.records,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "invalid": sum(self.invalid.values()),
            "invalid_by_kind": dict(self.invalid.most_common()),
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected.most_common(20)),
            "consume_s": round(self.consume_s, 3),
            "events_per_s": round(self.events_per_s, 1),
            "build_s": round(self.build_s, 3),
            "publish_s": round(self.publish_s, 3),
            "cells_published": self.cells_published,
            "processes": self.processes,
            "total_s": round(total, 3),
            "consume_cpu_s": round(self.consume_cpu_s, 3),
            "build_cpu_s": round(self.build_cpu_s, 3),
            "publish_cpu_s": round(self.publish_cpu_s, 3),
            "shards_cpu_s": round(self.shards_cpu_s, 3),
            "cpu_us_per_record": round(
                1e6
                * (self.consume_cpu_s + self.build_cpu_s + self.publish_cpu_s + self.shards_cpu_s)
                / self.records,
                1,
            )
            if self.records
            else 0.0,
            "end_to_end_events_per_s": round(self.records / total, 1) if total else 0.0,
            "rss_mb": dict(self.rss_mb),
        }


_INBOX_CONSUMER = f"reporting.{CONSUMER}"

#: The replay consumer's fetch sizes (per partition, per fetch).
REPLAY_PARTITION_FETCH_BYTES = 1024 * 1024
REPLAY_FETCH_BYTES = 4 * 1024 * 1024


def resident_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MB. From ``/proc/self/status``:
    ``ru_maxrss`` would also count the parent's peak when it started this process (the
    address space it replaced on exec), so a bench holding a million events would inflate it."""
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    found["now" if name == "VmRSS" else "peak"] = round(
                        int(value.split()[0]) / 1024, 1
                    )
    except OSError:
        import resource

        found["peak"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return found


@dataclass
class _Lap:
    """Wall-clock and CPU time since it was made."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


class Replayer:
    """Applies batches of Kafka records to projections that already hold rows (``--keep``),
    as the live consumer would: per batch, the rows the events need are loaded, and the
    inbox says which events were applied before."""

    def __init__(
        self, db: Database, decoder: Decoder, rules: domain.Rules, counts: Counter[str]
    ) -> None:
        self.db = db
        self.decoder = decoder
        self.rules = rules
        self.counts = counts

    def _parse(self, record: ConsumerRecord[Any, Any]) -> Decoded | None:
        outcome = self.decoder.decode(record.value, record.headers or ())
        if isinstance(outcome, Decoded):
            return outcome
        if outcome is Skipped.SKIPPED:
            self.counts["skipped"] += 1
        else:
            self.counts[f"invalid:{outcome.value}"] += 1
        return None

    async def apply_batch(self, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Apply records (in partition order) in one transaction, inbox entries included."""
        self.counts["records"] += len(records)
        parsed = [
            (record, found) for record in records if (found := self._parse(record)) is not None
        ]
        if not parsed:
            return
        async with self.db.transaction() as session:
            seen = await _already_applied(session, [event for _, event in parsed])
            fresh = []
            for record, event in parsed:
                if event.dedup_key in seen:
                    self.counts["duplicates"] += 1
                    continue
                seen.add(event.dedup_key)
                fresh.append((record, event))
            outcomes = await operations.replay_events(
                session, [event.data for _, event in fresh], self.rules
            )
            now = datetime.now(UTC)
            inbox: list[dict[str, Any]] = []
            for (record, event), rejected in zip(fresh, outcomes, strict=True):
                if rejected is not None:
                    self.counts[f"rejected:{_reason_kind(rejected)}"] += 1
                    continue
                self.counts["applied"] += 1
                inbox.append(_inbox_entry(record, event, now))
            if inbox:
                await session.execute(insert(InboxEntry), inbox)


def _inbox_entry(record: ConsumerRecord[Any, Any], event: Decoded, now: datetime) -> dict[str, Any]:
    """The live consumer's inbox entry for an applied event."""
    return {
        "consumer": _INBOX_CONSUMER,
        "source": event.source,
        "event_id": event.id,
        "event_type": event.type,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "processed_at": now,
    }


def _reason_kind(reason: str) -> str:
    """What a rejection was about (the field or event before the colon), without values."""
    return reason.split(":", 1)[0]


async def _already_applied(
    session: AsyncSession, events: Sequence[Decoded]
) -> set[tuple[str, str]]:
    """The (source, id) pairs of these events that the inbox already holds."""
    by_source: dict[str, set[str]] = {}
    for event in events:
        by_source.setdefault(event.source, set()).add(event.id)
    found: set[tuple[str, str]] = set()
    for source, ids in by_source.items():
        # Consumer, source and id together: the inbox's primary key, so a lookup, not a scan.
        for chunk in store.chunks(sorted(ids)):
            rows = await session.execute(
                select(col(InboxEntry.event_id)).where(
                    col(InboxEntry.consumer) == _INBOX_CONSUMER,
                    col(InboxEntry.source) == source,
                    col(InboxEntry.event_id).in_(chunk),
                )
            )
            found |= {(source, event_id) for (event_id,) in rows}
    return found


async def drop(db: Database) -> None:
    """Forget the projected facts and which events the live consumer applied."""
    async with db.transaction() as session:
        await store.drop_facts(session)
        await session.execute(delete(InboxEntry).where(col(InboxEntry.consumer) == _INBOX_CONSUMER))


#: Families fall into this many buckets by their record key; each shard holds a range.
SHARD_BUCKETS = 64

#: The share of the families the coordinating process applies, against 1 for each shard's
#: own process: that one first starts an interpreter and loads the service (~2.5 s of a
#: 200,000-event rebuild's ~12 s consume phase on a 2-core machine), so with equal shares
#: the coordinator waited for it.
COORDINATOR_WEIGHT = 1.25


@dataclass(frozen=True)
class Shard:
    """One of ``count`` processes that share a rebuild: it applies the records whose key
    falls into its range of buckets. A record's key is its event's subject, the family it
    concerns (the case id; a merge: the merged case), so every event of a family, and every
    redelivered copy of one, lands in the same shard, and each shard's rows are its
    families' alone (:class:`~lotse_reporting.replay_rebuild.ShardsOverlap` if not).
    Records without a key go to shard 0, the coordinator's."""

    index: int
    count: int
    low: int
    high: int

    @classmethod
    def split(cls, count: int) -> list[Shard]:
        weights = [COORDINATOR_WEIGHT] + [1.0] * (count - 1)
        total, bounds, reached = sum(weights), [0], 0.0
        for weight in weights:
            reached += weight
            bounds.append(round(SHARD_BUCKETS * reached / total))
        return [cls(i, count, bounds[i], bounds[i + 1]) for i in range(count)]

    def take(self, records: list[ConsumerRecord[Any, Any]]) -> list[ConsumerRecord[Any, Any]]:
        low, high, buckets = self.low, self.high, SHARD_BUCKETS
        return [
            r
            for r in records
            if low <= (0 if r.key is None else zlib.crc32(r.key) % buckets) < high
        ]


class ShardFailed(RuntimeError):
    """A shard's process did not finish its part."""


@dataclass
class ShardProcess:
    """A shard replayed by a process of its own into a SQLite file of its own: its rows are
    then copied into the rebuild's transaction (``replay_rebuild.copy_shard``)."""

    shard: Shard
    path: Path
    process: BaseProcess

    @classmethod
    def start(
        cls,
        settings: ReportingSettings,
        shard: Shard,
        directory: Path,
        batch_size: int,
        idle_timeout_s: float,
    ) -> ShardProcess:
        path = directory / f"shard-{shard.index}.sqlite"
        # spawn: a fresh interpreter, not a fork of this process's loop, threads and pool.
        process = multiprocessing.get_context("spawn").Process(
            target=_shard_main,
            args=(settings, shard, str(path), batch_size, idle_timeout_s),
            name=f"replay-shard-{shard.index}",
            daemon=True,
        )
        process.start()
        return cls(shard, path, process)

    async def finished(self) -> dict[str, Any]:
        """Wait for the process; what it counted and its memory (``ShardFailed`` if it
        failed: the rebuild's transaction then rolls back)."""
        await asyncio.to_thread(self.process.join)
        if self.process.exitcode != 0:
            raise ShardFailed(
                f"replay shard {self.shard.index} exited with {self.process.exitcode}"
            )
        result: dict[str, Any] = json.loads(self.path.with_suffix(".json").read_text())
        return result

    def cells(self) -> dict[CellKey, Accumulated]:
        """The cells of the shard's families (written by its process, read by this one)."""
        found: dict[CellKey, Accumulated] = pickle.loads(
            self.path.with_suffix(".cells").read_bytes()
        )
        return found

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


def _shard_main(
    settings: ReportingSettings, shard: Shard, path: str, batch_size: int, idle_timeout_s: float
) -> None:
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(_replay_shard(settings, shard, path, batch_size, idle_timeout_s))
    Path(path).with_suffix(".json").write_text(json.dumps(result))


async def _replay_shard(
    settings: ReportingSettings, shard: Shard, path: str, batch_size: int, idle_timeout_s: float
) -> dict[str, Any]:
    """A shard's part of a rebuild: its records applied as :class:`Rebuild` applies them, its
    rows written into a new SQLite file at ``path``."""
    own = settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{path}"})
    runtime = build_runtime(own)
    try:
        await create_schema(runtime.db, TABLES, service=settings.service_name)
        reporting = Reporting.of(runtime)
        counts: Counter[str] = Counter()
        decoder = Decoder(domain.HANDLED, max_bytes=settings.max_event_bytes)
        witness = ShardWitness()
        rebuild = Rebuild(
            decoder,
            reporting.rules,
            inbox_consumer=_INBOX_CONSUMER,
            counts=counts,
            witness=witness,
        )
        with collector_off():
            async with runtime.db.transaction() as session, sqlite_cache(session):

                async def handle(records: list[ConsumerRecord[Any, Any]]) -> None:
                    await rebuild.apply_batch(session, records)

                await read_from_start(
                    runtime.kafka,
                    [settings.topic(t) for t in topics.DOMAIN_TOPICS],
                    handle,
                    batch_size=batch_size,
                    idle_timeout_s=idle_timeout_s,
                    shard=shard,
                )
                cells = await rebuild.stored_cells(session)
        Path(path).with_suffix(".cells").write_bytes(pickle.dumps(cells))
        return {
            "counts": dict(counts),
            # All of the process's CPU, its start-up included.
            "cpu_s": time.process_time(),
            "foreign": witness.foreign,
            "refs": sorted(witness.refs),
            "rss_mb": resident_mb(),
        }
    finally:
        await runtime.relay.stop()
        await runtime.db.dispose()
        runtime.telemetry.shutdown()


def replay_consumer(kafka: KafkaConfig, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer without a group: it assigns partitions itself and commits nothing."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "client_id": f"{kafka.client_id}-replay",
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # Small fetches: what aiokafka has fetched ahead sits in memory next to the
        # projections (64 MB buffers cost about as much resident memory as 100k families),
        # and a fetch of a few MB still brings thousands of records per round trip. A
        # partition's fetch holds at least the largest record allowed.
        "max_partition_fetch_bytes": max(kafka.max_record_bytes, REPLAY_PARTITION_FETCH_BYTES),
        "fetch_max_bytes": max(kafka.max_record_bytes, REPLAY_FETCH_BYTES),
        "request_timeout_ms": kafka.request_timeout_ms,
        **kafka.extra,
        **overrides,
    }
    return AIOKafkaConsumer(**options)


async def read_from_start(
    kafka: KafkaConfig,
    topic_names: Sequence[str],
    handle: Callable[[list[ConsumerRecord[Any, Any]]], Any],
    *,
    batch_size: int,
    idle_timeout_s: float = 3.0,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> int:
    """Read every partition of the topics from the beginning until caught up; ``handle`` gets
    the records of each fetch in partition order (``shard``: only that shard's). Returns how
    many records were read (all of them, whatever the shard).

    Caught up means: a fetch came back empty and every partition's position has reached its
    high watermark (end offsets are not trusted: the embedded broker reports them wrongly),
    or nothing arrived for ``idle_timeout_s``.
    """
    consumer = replay_consumer(kafka)
    await consumer.start()
    try:
        partitions: list[TopicPartition] = []
        for topic in topic_names:
            ids = consumer.partitions_for_topic(topic)
            if ids is None:
                await consumer.topics()  # fetches the cluster's metadata
                ids = consumer.partitions_for_topic(topic)
            partitions.extend(TopicPartition(topic, p) for p in sorted(ids or ()))
        if not partitions:
            return 0
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        begin = await consumer.beginning_offsets(partitions)
        positions = dict(begin)
        read = 0
        last_data = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=250, max_records=batch_size)
            records = [r for tp in sorted(batches, key=str) for r in batches[tp]]
            if records:
                for tp, found in batches.items():
                    positions[tp] = found[-1].offset + 1
                read += len(records)
                mine = records if shard is None else shard.take(records)
                result = handle(mine)
                if asyncio.iscoroutine(result):
                    await result
                last_data = time.monotonic()
            expected = _expected(consumer, partitions, begin)
            if progress is not None:
                progress(read, expected)
            if records:
                continue
            caught_up = all(
                (high := consumer.highwater(tp)) is not None and positions[tp] >= high
                for tp in partitions
            )
            if caught_up or time.monotonic() - last_data > idle_timeout_s:
                return read
    finally:
        await consumer.stop()


def _expected(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    begin: dict[TopicPartition, int],
) -> int | None:
    total = 0
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is None:
            return None
        total += high - begin.get(tp, 0)
    return total


async def replay(
    settings: ReportingSettings,
    *,
    keep: bool = False,
    republish_all: bool = False,
    batch_size: int | None = None,
    idle_timeout_s: float = 3.0,
    progress: Progress | None = None,
    clock: Callable[[], datetime] | None = None,
    workers: int = 1,
) -> ReplayStats:
    """Rebuild the projections from the domain topics and publish what changed.

    ``workers``: processes that share a rebuild from empty projections into SQLite, each
    applying the families of its :class:`Shard` (the others only read the topics past
    them); with ``keep`` or on PostgreSQL one process does it all."""
    # The service's own runtime (large relay batches: a replay publishes a lot), without its
    # consumer and jobs: the replay reads the topics itself.
    runtime = build_runtime(settings.model_copy(update={"relay_batch_size": 5000}), clock=clock)
    db = runtime.db
    try:
        await create_schema(db, TABLES, service=settings.service_name)
        reporting = Reporting.of(runtime)
        decoder = Decoder(domain.HANDLED, max_bytes=settings.max_event_bytes)
        topic_names = [settings.topic(t) for t in topics.DOMAIN_TOPICS]
        size = batch_size or settings.replay_batch_size
        counts: Counter[str] = Counter()
        timings: dict[str, tuple[float, float]] = {}
        rss: dict[str, float] = {"consume": resident_mb()["now"]}
        # A rebuild, its publication included, runs without the collector's own passes
        # (:func:`replay_rebuild.collector_off`).
        with contextlib.ExitStack() as paused:
            given = (
                runtime,
                reporting,
                decoder,
                counts,
                timings,
                topic_names,
                size,
                idle_timeout_s,
                progress,
                republish_all,
            )
            shards = 1
            if keep:
                published = await _replay_kept(*given)
            else:
                paused.enter_context(collector_off())
                shards = 1 if db.is_postgres else max(1, workers)
                try:
                    published = await _rebuild(*given, rss, settings=settings, shards=shards)
                except ShardsOverlap as exc:
                    _log.warning("replay shards overlap (%s): rebuilt by one process", exc)
                    # The figures are the second attempt's; the first's time is lost.
                    shards = 1
                    counts.clear()
                    timings.clear()
                    published = await _rebuild(*given, rss, settings=settings)
            lap = _Lap()
            if can_send(runtime.kafka):
                await send_unsent(db, runtime.kafka)
            await runtime.relay.drain(timeout_s=600)
            sending = lap.since()
        stats = ReplayStats.of(counts)
        stats.consume_s, stats.consume_cpu_s = timings["consume"]
        stats.build_s, stats.build_cpu_s = timings.get("build", (0.0, 0.0))
        stats.publish_s = timings["publish"][0] + sending[0]
        stats.publish_cpu_s = timings["publish"][1] + sending[1]
        stats.cells_published = published
        stats.shards_cpu_s = timings.get("shards", (0.0, 0.0))[1]
        stats.processes = shards
        stats.rss_mb = {**rss, "end": resident_mb()["now"], "peak": resident_mb()["peak"]}
        return stats
    finally:
        await runtime.relay.stop()
        await db.dispose()
        runtime.telemetry.shutdown()


async def _rebuild(
    runtime: ServiceRuntime[ReportingSettings],
    reporting: Reporting,
    decoder: Decoder,
    counts: Counter[str],
    timings: dict[str, tuple[float, float]],
    topic_names: list[str],
    batch_size: int,
    idle_timeout_s: float,
    progress: Progress | None,
    republish_all: bool,
    rss: dict[str, float],
    *,
    settings: ReportingSettings,
    shards: int = 1,
) -> int:
    """From empty projections, in memory and in one transaction (:mod:`replay_rebuild`).
    With ``shards`` > 1 this process applies shard 0 and a process per other shard its
    own; their rows are copied into this transaction before the cells are summed."""
    db = runtime.db
    await drop(db)
    own, *rest = Shard.split(shards)
    witness = ShardWitness() if rest else None
    rebuild = Rebuild(
        decoder,
        reporting.rules,
        inbox_consumer=_INBOX_CONSUMER,
        counts=counts,
        witness=witness,
    )
    lap = _Lap()
    with contextlib.ExitStack() as cleanup:
        others: list[ShardProcess] = []
        if rest:
            directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="replay-")))
            for shard in rest:
                started = ShardProcess.start(settings, shard, directory, batch_size, idle_timeout_s)
                cleanup.callback(started.stop)
                others.append(started)
        async with db.transaction() as session, sqlite_cache(session):

            async def handle(records: list[ConsumerRecord[Any, Any]]) -> None:
                await rebuild.apply_batch(session, records)

            await read_from_start(
                runtime.kafka,
                topic_names,
                handle,
                batch_size=batch_size,
                idle_timeout_s=idle_timeout_s,
                progress=progress,
                shard=own if others else None,
            )
            if not others:
                timings["consume"] = lap.since()
                rss["build"] = resident_mb()["now"]
                lap = _Lap()
            # The shards' processes may still be at work: this one's rows and cells meanwhile
            # (its families' alone until the others' rows are copied in).
            cells = await rebuild.stored_cells(session)
            finished = [await other.finished() for other in others]
            if others:
                timings["consume"] = lap.since()
                rss["build"] = resident_mb()["now"]
                lap = _Lap()
            timings["shards"] = (0.0, sum(result["cpu_s"] for result in finished))
            if witness is not None:
                _ensure_apart(witness, finished)
            for other, result in zip(others, finished, strict=True):
                await copy_shard(session, other.path)
                cells = merge_cells(cells, other.cells())
                counts.update(result["counts"])
                rss[f"shard_{other.shard.index}_peak"] = result["rss_mb"]["peak"]
            await write_cells(session, cells)
            span = await horizon(session)
            timings["build"] = lap.since()
            rss["publish"] = resident_mb()["now"]
            lap = _Lap()
            published = await publish(
                runtime,
                session,
                reporting.layout,
                cells,
                span,
                republish=republish_all,
            )
    timings["publish"] = lap.since()
    return published


def _ensure_apart(own: ShardWitness, others: list[dict[str, Any]]) -> None:
    """:class:`ShardsOverlap` unless every shard judged its records alone (see
    :class:`ShardWitness`)."""
    foreign = own.foreign + sum(result["foreign"] for result in others)
    if foreign:
        raise ShardsOverlap(f"{foreign} records whose key is not their event's subject")
    refs = set(own.refs)
    for result in others:
        theirs = set(result["refs"])
        if not refs.isdisjoint(theirs):
            raise ShardsOverlap("a visit or referral is named in two shards")
        refs |= theirs


async def _replay_kept(
    runtime: ServiceRuntime[ReportingSettings],
    reporting: Reporting,
    decoder: Decoder,
    counts: Counter[str],
    timings: dict[str, tuple[float, float]],
    topic_names: list[str],
    batch_size: int,
    idle_timeout_s: float,
    progress: Progress | None,
    republish_all: bool,
) -> int:
    """Over projections that keep their rows: batch by batch, as the live consumer."""
    replayer = Replayer(runtime.db, decoder, reporting.rules, counts)
    lap = _Lap()
    await read_from_start(
        runtime.kafka,
        topic_names,
        replayer.apply_batch,
        batch_size=batch_size,
        idle_timeout_s=idle_timeout_s,
        progress=progress,
    )
    timings["consume"] = lap.since()
    lap = _Lap()
    published = await operations.publish_figures(reporting, all_years=True, republish=republish_all)
    timings["publish"] = lap.since()
    return published


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lotse_reporting.replay",
        description="Rebuild the reporting projections from the domain topics (offset 0).",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep facts and inbox: only events not applied yet change anything",
    )
    parser.add_argument(
        "--republish-all",
        action="store_true",
        help="publish every cell again, not only the changed ones",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="events per transaction")
    parser.add_argument(
        "--idle-timeout", type=float, default=3.0, help="seconds without records = caught up"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing a rebuild into SQLite: faster with a core each, but each "
        "holds its own interpreter and page cache (see docs/performance.md)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = ReportingSettings()

    console = Console(stderr=True)
    bar = RichProgress(
        TextColumn("replaying domain topics"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]} events/s"),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    )
    started = time.perf_counter()
    with bar:
        task = bar.add_task("replay", total=None, rate="–")

        def progress(done: int, expected: int | None) -> None:
            elapsed = time.perf_counter() - started
            rate = f"{done / elapsed:,.0f}" if elapsed > 0 else "–"
            bar.update(task, completed=done, total=expected, rate=rate)

        stats = asyncio.run(
            replay(
                settings,
                keep=args.keep,
                republish_all=args.republish_all,
                batch_size=args.batch_size,
                idle_timeout_s=args.idle_timeout,
                progress=progress,
                workers=args.workers,
            )
        )
    print(json.dumps(stats.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
