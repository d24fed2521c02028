"""What the runtime's guarantees cost: outbox relay and consumer wrapper against raw aiokafka.

Measured side by side in one run on the same broker with the same records (binary-mode
CloudEvents of a real contract event, ~700 bytes):

  raw produce     aiokafka, acks=all, send in a loop and await all
  raw consume     aiokafka, one consumer group, until all N are read
  outbox relay    N events added in transactions of 100, then the relay drains them
                  (read rows, publish acks=all in order, mark sent)
  consumer        the consumer wrapper applies the N events: envelope + schema validation,
                  inbox claim and one effect row per event in one transaction, commit offsets

Usage:  uv run --frozen python bench/runtime_throughput.py [--events N] [--database URL]
Starts the embedded broker unless LOTSE_KAFKA_BOOTSTRAP is set; SQLite file by default.
Prints a JSON document and writes it to bench/results/runtime_throughput.json (``--output``
elsewhere). Rates follow the machine's load; the CPU time per event of raw consume and of the
wrapper (this process, in the same run) much less: ``consumer_wrapper_per_cpu_s`` is the rate
with a core to itself. Raw consume and the wrapper are timed alike: the same fetch size, the
clock started once the first batch is in, and only the records after it counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.visits import VisitScheduled
from lotse_runtime.consumer import BATCH_SIZE, Delivery, EventConsumer
from lotse_runtime.db import Database, insert_at_commit
from lotse_runtime.kafka import KafkaConfig, TopicSpec, ensure_topics
from lotse_runtime.logging import configure_logging
from lotse_runtime.migrations import create_schema
from lotse_runtime.outbox import Outbox, OutboxRelay
from lotse_tooling.embedded import EmbeddedBroker
from sqlalchemy import Table
from sqlmodel import Field, SQLModel

RESULTS = Path(__file__).parent / "results" / "runtime_throughput.json"


class BenchEffect(SQLModel, table=True):
    """One row per applied event, keyed by the entity's id like the services' own tables (an
    autoincrement key would cost a statement per row: SQLite cannot return generated keys of
    a multi-row INSERT in order)."""

    __tablename__ = "bench_effect"

    visit_id: str = Field(primary_key=True)


_EFFECT: Table = BenchEffect.__table__  # type: ignore[attr-defined]


def event(n: int) -> VisitScheduled:
    return VisitScheduled.example().model_copy(
        update={
            "case_id": str(uuid.uuid4()),
            "visit_id": str(uuid.uuid4()),
            "staff_id": f"staff-{n}",
        }
    )


async def raw_produce(kafka: KafkaConfig, topic: str, n: int) -> tuple[float, int]:
    records = [to_kafka_binary(event(i).to_cloudevent()) for i in range(n)]
    size = sum(len(r.value or b"") + sum(len(k) + len(v) for k, v in r.headers) for r in records)
    producer = kafka.producer()
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [
            await producer.send(topic, value=r.value, key=r.key, headers=r.headers) for r in records
        ]
        await asyncio.gather(*futures)
        return time.perf_counter() - started, size // n
    finally:
        await producer.stop()


async def raw_consume(kafka: KafkaConfig, topic: str, n: int) -> tuple[float, float, int]:
    """Seconds, CPU seconds and records counted from the first fetch to the last record, as
    the wrapper is measured: same fetch size, clock started once the first batch is in."""
    consumer: AIOKafkaConsumer = kafka.consumer(topic, group_id=f"bench-raw-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        seen = first = 0
        started: float | None = None
        cpu = 0.0
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=BATCH_SIZE)
            seen += sum(len(records) for records in batch.values())
            if batch and started is None:
                started, cpu = time.perf_counter(), time.process_time()
                first = seen
        assert started is not None
        return time.perf_counter() - started, time.process_time() - cpu, n - first
    finally:
        await consumer.stop()


async def outbox_relay(db: Database, kafka: KafkaConfig, topic_prefix: str, n: int) -> float:
    outbox = Outbox(source="/lotse/visits", topic_prefix=topic_prefix)  # domain topic only
    for start in range(0, n, 100):
        async with db.transaction() as session:
            for i in range(start, min(start + 100, n)):
                outbox.add(session, event(i))
    relay = OutboxRelay(db, kafka, service="visits", batch_size=500)
    try:
        started = time.perf_counter()
        await relay.drain(timeout_s=600)
        return time.perf_counter() - started
    finally:
        await relay.stop()


async def consumer_wrapper(
    db: Database, kafka: KafkaConfig, topic: str, dlq: str, n: int, *, orm_effect: bool = False
) -> tuple[float, float, int]:
    """Seconds from the first applied batch to the last event, this process's CPU seconds in
    that time (the wrapper, its Kafka client and the SQLite thread: nothing else runs), and
    how many events were applied in it: the first batch's are not, as the clock starts once
    it is in (as raw consume's starts once its first batch is in).

    The effect row goes in as the runtime's append-only rows do (one INSERT per transaction
    at commit); with ``orm_effect`` the handler adds an ORM object instead, to show what that
    costs a handler (SQLModel construction and the unit of work's flush)."""

    async def apply(delivery: Delivery) -> None:
        data = delivery.data
        assert isinstance(data, VisitScheduled)
        if orm_effect:
            delivery.session.add(BenchEffect(visit_id=data.visit_id))
        else:
            insert_at_commit(delivery.session, _EFFECT, {"visit_id": data.visit_id})

    consumer = EventConsumer(
        name="bench",
        service="visits",
        topics=[topic],
        handlers={VisitScheduled.event_type: apply},
        db=db,
        outbox=Outbox(source="/lotse/visits"),
        kafka=kafka,
        group_id=f"bench-wrapper-{uuid.uuid4().hex}",
        dead_letter_topic=dlq,
    )
    await consumer.start()
    try:
        started: float | None = None
        cpu = 0.0
        first = 0
        while consumer.processed < n:
            if started is None and consumer.processed > 0:
                started, cpu = time.perf_counter(), time.process_time()
                first = consumer.processed
            await asyncio.sleep(0.005)
        assert started is not None
        return time.perf_counter() - started, time.process_time() - cpu, n - first
    finally:
        await consumer.stop()


async def run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    kafka = KafkaConfig(bootstrap=bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=500)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    raw_topic, domain, dlq = prefix + "raw", prefix + "lotse.visits", prefix + "lotse.dlq.visits"
    await ensure_topics(kafka, [TopicSpec(t, partitions=3) for t in (raw_topic, domain, dlq)])
    tmp = tempfile.mkdtemp(prefix="lotse-bench-")
    url = args.database or f"sqlite+aiosqlite:///{tmp}/bench.db"
    db = Database(url)
    await create_schema(db, [BenchEffect])
    n = args.events
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        produce_s, record_bytes = await raw_produce(kafka, raw_topic, n)
        consume_s, consume_cpu_s, consume_n = await raw_consume(kafka, raw_topic, n)
        relay_s = await outbox_relay(db, kafka, prefix, n)
        wrapper_s, wrapper_cpu_s, wrapper_n = await consumer_wrapper(
            db, kafka, domain, dlq, n, orm_effect=args.orm_effect
        )
    finally:
        await db.dispose()

    def rate(seconds: float) -> float:
        return round(n / seconds, 1)

    return {
        "benchmark": "runtime_throughput",
        "events": n,
        "record_bytes": record_bytes,
        "database": Database(url).dialect,
        "broker": "external" if os.environ.get("LOTSE_KAFKA_BOOTSTRAP") else "embedded tansu",
        "raw_produce_per_s": rate(produce_s),
        "raw_consume_per_s": round(consume_n / consume_s, 1),
        "outbox_relay_per_s": rate(relay_s),
        "consumer_wrapper_per_s": round(wrapper_n / wrapper_s, 1),
        "effect_row": "orm object" if args.orm_effect else "insert at commit",
        "relay_vs_raw_produce": round(produce_s / relay_s, 3),
        "wrapper_vs_raw_consume": round(wrapper_n / wrapper_s / (consume_n / consume_s), 3),
        # On a machine shared with other work the rates above follow the load; CPU time per
        # event does much less: what the wrapper would do with one core to itself.
        "raw_consume_cpu_us_per_event": round(consume_cpu_s * 1e6 / consume_n, 1),
        "consumer_wrapper_cpu_us_per_event": round(wrapper_cpu_s * 1e6 / wrapper_n, 1),
        "consumer_wrapper_per_cpu_s": round(wrapper_n / wrapper_cpu_s, 1)
        if wrapper_cpu_s
        else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m_at_start": load_at_start,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--database", default=None, help="SQLAlchemy URL (default SQLite file)")
    parser.add_argument(
        "--orm-effect", action="store_true", help="the handler adds its row as an ORM object"
    )
    parser.add_argument(
        "--output", default=str(RESULTS), help=f"where to write (default {RESULTS})"
    )
    args = parser.parse_args()
    configure_logging("bench", "WARNING", stream=sys.stderr)
    external = os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
    broker = None if external else EmbeddedBroker()
    bootstrap = external or broker.start()  # type: ignore[union-attr]
    try:
        result = asyncio.run(run(args, bootstrap))
    finally:
        if broker is not None:
            broker.stop()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
