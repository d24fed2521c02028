"""A year of Dortmund's welcome visits, scheduled by the visits service from real broker events.

What it does, in one run on one broker:

  families    ≈ 5,500 births (clinic channel) + 1,500 move-ins, spread over the Stadtbezirke
              by population share and over the year by registration date; each a real
              "family registered" CloudEvent with a sealed personal block (~1.2 kB)
  burst       all of them produced onto lotse.intake at once; the visits service (its own
              process, SQLite file unless --database) consumes, schedules and publishes
              "visit scheduled" through its outbox; a reader on lotse.visits takes the time
              per family: families/s, and p50/p99 from produce to "visit scheduled" (in a
              burst that is mostly queueing behind the families produced before)
  paced       a further --paced families at --rate per second: the latency of one family
              when the service is not behind (the real load is ~20 families a working day)
  raw         the same number of the same records produced and consumed with plain aiokafka
              on the same broker (produce + consume concurrently, like the service path):
              what the broker and client alone can do, and the service's share of it
  checks      every family got exactly one visit, none outside working times, no staff
              member double-booked (travel buffer included), share of target dates met

Usage:  uv run --frozen python bench/visits_year.py [--births N] [--move-ins N] [--database URL]
Starts the embedded broker (Tansu) unless LOTSE_KAFKA_BOOTSTRAP is set. Prints a JSON document
and writes it to bench/results/visits_year.json (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from lotse_contracts.city import Municipality, load_city
from lotse_contracts.cloudevents import KafkaRecord, to_kafka_binary
from lotse_contracts.events.common import Consent, ConsentScope, ConsentState
from lotse_contracts.events.intake import BezirkSource, Channel, FamilyRegistered
from lotse_contracts.events.visits import VisitScheduled
from lotse_contracts.personal import PersonalData, new_data_key, seal
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig, TopicSpec, ensure_topics, platform_topics
from lotse_tooling.embedded import EmbeddedBroker
from sqlalchemy import text

RESULTS = Path(__file__).parent / "results" / "visits_year.json"
CLINICS = ["klinikum-nord", "st-josefs-hospital-hoerde", "klinikum-mitte", "knappschaft-brackel"]


# -- the year's families ------------------------------------------------------------------------


def families(
    city: Municipality, births: int, move_ins: int, year: int, seed: int
) -> list[FamilyRegistered]:
    """Registrations of one year, in registration order."""
    rng = random.Random(seed)
    bezirke = city.stadtbezirke
    weights = [b.population_share for b in bezirke]
    start = datetime(year, 1, 1, 6, 0, tzinfo=UTC)
    total = births + move_ins
    channels = [Channel.CLINIC] * births + [Channel.MOVE_IN] * move_ins
    rng.shuffle(channels)
    events = []
    for i, channel in enumerate(channels):
        # Registrations during the day, spread evenly over the year.
        day = start + timedelta(days=365 * i / total)
        registered_at = day.replace(hour=rng.randint(6, 17), minute=rng.randint(0, 59))
        bezirk = rng.choices(bezirke, weights)[0]
        case_id = str(uuid.uuid4())
        age = rng.randint(1, 4) if channel is Channel.CLINIC else rng.randint(30, 6 * 365 - 1)
        born = registered_at.date() - timedelta(days=age)
        personal = PersonalData(
            family_name=f"Familie {i}",
            parent_given_names=["Elif", "Jonas"],
            child_given_names=["Mira"],
            child_birth_dates=[born],
            street="Musterweg",
            house_number=str(rng.randint(1, 200)),
            postcode=rng.choice(bezirk.postcodes or bezirk.shared_postcodes),
            city=city.name,
            phone="+49 231 555 0100",
        )
        events.append(
            FamilyRegistered(
                case_id=case_id,
                bezirk=bezirk.slug,
                bezirk_source=BezirkSource.ADDRESS,
                channel=channel,
                clinic_id=rng.choice(CLINICS) if channel is Channel.CLINIC else None,
                registered_at=registered_at,
                visit_target_date=registered_at.date()
                + timedelta(days=city.welcome_visit_target_days),
                days_since_birth_at_registration=age,
                children_count=1,
                preferred_language="de",
                consents=[
                    Consent(
                        consent_id=str(uuid.uuid4()),
                        scope=ConsentScope.WELCOME_VISIT,
                        state=ConsentState.GIVEN,
                        at=registered_at,
                    )
                ],
                personal=seal(
                    personal, key=new_data_key(), kid=f"bench-{case_id[:8]}", case_id=case_id
                ),
            )
        )
    return events


def records(events: list[FamilyRegistered]) -> list[KafkaRecord]:
    return [to_kafka_binary(e.to_cloudevent(source="/lotse/intake")) for e in events]


def record_bytes(batch: list[KafkaRecord]) -> int:
    size = sum(len(r.value or b"") + sum(len(k) + len(v) for k, v in r.headers) for r in batch)
    return size // max(1, len(batch))


# -- the service, in a process of its own -------------------------------------------------------


def serve(
    settings: dict[str, Any], clock_iso: str, ready: MpEvent, stop: MpEvent, out: Any
) -> None:
    """Run the visits service until ``stop`` (entry point of the service process).

    The service is found the way ``lotse up`` finds it (entry point ``lotse.services``) and
    configured through its environment, so the benchmark imports nothing of it.
    """
    # The result document owns stdout; the service logs to stderr.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ.update({f"LOTSE_VISITS_{k.upper()}": str(v) for k, v in settings.items()})
    create_app = entry_points(group="lotse.services")["visits"].load()
    fixed = datetime.fromisoformat(clock_iso)

    async def main() -> None:
        # The clock stands at New Year: every family is scheduled from its own registration
        # on, as it would have been on the day.
        app = create_app(clock=lambda: fixed)
        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            await runtime.kafka_started.wait()
            await runtime.consumers[0].wait_assigned(60)
            ready.set()
            await asyncio.to_thread(stop.wait)
            consumer = runtime.consumers[0]
            await runtime.relay.drain(timeout_s=30)
            out.put(
                {
                    "processed": consumer.processed,
                    "duplicates": consumer.duplicates,
                    "dead_lettered": consumer.dead_lettered,
                    "published": runtime.relay.published,
                }
            )

    asyncio.run(main())


# -- measuring ----------------------------------------------------------------------------------


async def assigned_consumer(kafka: KafkaConfig, topic: str) -> AIOKafkaConsumer:
    # A short fetch wait: the reader is the stopwatch and must not add latency of its own.
    consumer = kafka.consumer(
        topic, group_id=f"bench-reader-{uuid.uuid4().hex[:8]}", fetch_max_wait_ms=10
    )
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=200)
    return consumer


async def produce_and_time(
    kafka: KafkaConfig,
    topic: str,
    batch: list[KafkaRecord],
    reader: AIOKafkaConsumer,
    *,
    want_type: str | None,
    rate: float | None = None,
) -> tuple[dict[bytes, float], dict[bytes, float], float]:
    """Produce ``batch`` (at ``rate`` per second, or all at once) while ``reader`` collects
    the answers: send times and receive times per key, and the seconds until all acks."""
    sent: dict[bytes, float] = {}
    received: dict[bytes, float] = {}
    expected = {r.key for r in batch if r.key is not None}

    async def read() -> None:
        while not expected <= received.keys():
            batches = await reader.getmany(timeout_ms=200, max_records=2000)
            now = time.perf_counter()
            for messages in batches.values():
                for message in messages:
                    if message.key is None or message.key in received:
                        continue
                    headers = dict(message.headers or ())
                    if want_type is None or headers.get("ce_type") == want_type.encode():
                        received[message.key] = now

    producer = kafka.producer()
    await producer.start()
    reading = asyncio.create_task(read())
    try:
        started = time.perf_counter()
        futures = []
        for i, record in enumerate(batch):
            if rate is not None:
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            assert record.key is not None
            sent[record.key] = time.perf_counter()
            futures.append(
                await producer.send(
                    topic, value=record.value, key=record.key, headers=record.headers
                )
            )
        await asyncio.gather(*futures)
        acked = time.perf_counter() - started
        await asyncio.wait_for(reading, timeout=1800)
    finally:
        reading.cancel()
        await producer.stop()
    return sent, received, acked


def latencies_ms(sent: dict[bytes, float], received: dict[bytes, float]) -> dict[str, float]:
    values = sorted((received[k] - sent[k]) * 1000 for k in sent)
    cut = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(cut[49], 1),
        "p90": round(cut[89], 1),
        "p99": round(cut[98], 1),
        "max": round(values[-1], 1),
    }


async def check_calendar(
    url: str, city: Municipality, year_events: list[FamilyRegistered]
) -> dict[str, Any]:
    """Every family one visit, inside working times, nobody double-booked (read with plain
    SQL and checked against the city configuration, not with the service's own rules)."""
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT case_id, bezirk, staff_id, starts_at, ends_at, attempt, "
                        "target_missed FROM visits_visit"
                    )
                )
            ).all()
    finally:
        await db.dispose()
    zone = city.zone()

    def aware(value: Any) -> datetime:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    visits = [
        (case, bezirk, staff, aware(start), aware(end), attempt, bool(missed))
        for case, bezirk, staff, start, end, attempt, missed in rows
    ]
    per_case = Counter(v[0] for v in visits)
    outside = 0
    by_staff: dict[str, list[tuple[datetime, datetime]]] = {}
    for _case, bezirk, staff, start, end, _attempt, _missed in visits:
        office = city.bezirk(bezirk).familienbuero
        local_start, local_end = start.astimezone(zone), end.astimezone(zone)
        if not any(
            w.weekday == local_start.weekday()
            and w.start <= local_start.time()
            and local_end.time() <= w.end
            and local_end.date() == local_start.date()
            for w in office.visit_hours
        ):
            outside += 1
        by_staff.setdefault(staff, []).append((start, end))
    double = 0
    for staff, times in by_staff.items():
        bezirk = next(v[1] for v in visits if v[2] == staff)
        buffer = timedelta(minutes=city.bezirk(bezirk).familienbuero.travel_buffer_minutes)
        times.sort()
        for (_, before_end), (after_start, _) in itertools.pairwise(times):
            if after_start < before_end + buffer:
                double += 1
    year_cases = {e.case_id for e in year_events}
    first = {v[0]: v for v in visits if v[5] == 1}
    missed = sum(1 for case in year_cases if case in first and first[case][6])
    waits = [
        (first[e.case_id][3].astimezone(zone).date() - e.registered_at.astimezone(zone).date()).days
        for e in year_events
        if e.case_id in first
    ]
    return {
        "visits": len(visits),
        "families_with_one_visit": sum(1 for n in per_case.values() if n == 1),
        "families_with_more": sum(1 for n in per_case.values() if n > 1),
        "families_without": len(year_cases - per_case.keys()),
        "outside_working_times": outside,
        "double_bookings": double,
        "target_met_share": round(1 - missed / max(1, len(year_cases)), 4),
        "days_registration_to_visit_median": statistics.median(waits) if waits else None,
    }


async def run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    city = load_city("dortmund")
    kafka = KafkaConfig(bootstrap=bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=500)
    prefix = f"benchv{uuid.uuid4().hex[:6]}."
    raw_topic = prefix + "raw.intake"
    registry = load_registry(city)
    await ensure_topics(
        kafka,
        [*platform_topics(registry, prefix=prefix, partitions=3), TopicSpec(raw_topic, 3)],
    )
    year = families(city, args.births, args.move_ins, args.year, args.seed)
    paced = families(city, args.paced, 0, args.year, args.seed + 1) if args.paced else []
    year_records, paced_records = records(year), records(paced)
    n = len(year_records)

    tmp = tempfile.mkdtemp(prefix="lotse-bench-visits-")
    url = args.database or f"sqlite+aiosqlite:///{tmp}/visits.db"
    settings = {
        "kafka_bootstrap": bootstrap,
        "database_url": url,
        "topic_prefix": prefix,
        "create_topics": False,
        "consumer_session_timeout_ms": 6000,
        "consumer_heartbeat_interval_ms": 500,
        "relay_poll_interval_s": 0.05,
        "log_level": "WARNING",
        "data_dir": tmp,
    }
    spawn = multiprocessing.get_context("spawn")
    ready, stop, out = spawn.Event(), spawn.Event(), spawn.Queue()
    clock = datetime(args.year, 1, 1, 0, 0, tzinfo=UTC).isoformat()
    service = spawn.Process(
        target=serve, args=(settings, clock, ready, stop, out), name="visits-service"
    )
    service.start()
    try:
        started = time.monotonic()
        while not ready.wait(0.2):
            if not service.is_alive() or time.monotonic() - started > 120:
                raise RuntimeError("the visits service did not become ready")
        reader = await assigned_consumer(kafka, prefix + "lotse.visits")
        try:
            burst_started = time.perf_counter()
            sent, received, burst_acked = await produce_and_time(
                kafka,
                prefix + "lotse.intake",
                year_records,
                reader,
                want_type=VisitScheduled.event_type,
            )
            burst_s = max(received.values()) - burst_started
            burst_latency = latencies_ms(sent, received)
            paced_latency = None
            if paced_records:
                sent_p, received_p, _ = await produce_and_time(
                    kafka,
                    prefix + "lotse.intake",
                    paced_records,
                    reader,
                    want_type=VisitScheduled.event_type,
                    rate=args.rate,
                )
                paced_latency = latencies_ms(sent_p, received_p)
        finally:
            await reader.stop()
    finally:
        stop.set()
        stats = out.get(timeout=60) if service.is_alive() else {}
        service.join(60)
        if service.is_alive():
            service.terminate()

    # Raw aiokafka on the same broker: the same records, produced and consumed concurrently.
    raw_reader = await assigned_consumer(kafka, raw_topic)
    try:
        raw_started = time.perf_counter()
        _, raw_received, raw_acked = await produce_and_time(
            kafka, raw_topic, year_records, raw_reader, want_type=None
        )
        raw_s = max(raw_received.values()) - raw_started
    finally:
        await raw_reader.stop()

    checks = await check_calendar(url, city, year)
    shutil.rmtree(tmp, ignore_errors=True)
    service_rate = n / burst_s
    raw_rate = n / raw_s
    return {
        "benchmark": "visits_year",
        "city": city.name,
        "families": n,
        "births": args.births,
        "move_ins": args.move_ins,
        "record_bytes": record_bytes(year_records),
        "database": Database(url).dialect,
        "broker": "external" if os.environ.get("LOTSE_KAFKA_BOOTSTRAP") else "embedded tansu",
        "burst": {
            "families_per_s": round(service_rate, 1),
            "seconds": round(burst_s, 2),
            "produce_acked_s": round(burst_acked, 2),
            "latency_ms": burst_latency,
        },
        "paced": (
            {"families": len(paced_records), "rate_per_s": args.rate, "latency_ms": paced_latency}
            if paced_records
            else None
        ),
        "raw_aiokafka": {
            "produce_consume_per_s": round(raw_rate, 1),
            "seconds": round(raw_s, 3),
            "produce_acked_s": round(raw_acked, 3),
            "produce_per_s": round(n / raw_acked, 1),
        },
        "service_vs_raw": round(service_rate / raw_rate, 4),
        "service": stats,
        "checks": checks,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--births", type=int, default=5500)
    parser.add_argument("--move-ins", type=int, default=1500)
    parser.add_argument("--paced", type=int, default=200, help="families sent at --rate")
    parser.add_argument("--rate", type=float, default=20.0, help="paced families per second")
    parser.add_argument("--year", type=int, default=2025)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--database", default=None, help="SQLAlchemy URL (default SQLite file)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    external = os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
    broker = None if external else EmbeddedBroker()
    bootstrap = external or broker.start()  # type: ignore[union-attr]
    try:
        result = asyncio.run(run(args, bootstrap))
    finally:
        if broker is not None:
            broker.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
