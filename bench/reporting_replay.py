"""How fast the reporting projections rebuild by replay, next to raw aiokafka on the same topics.

One run, one broker, the same records:

  produce        N realistic domain events (binary-mode CloudEvents of the real contract models,
                 personal data sealed per family) of Dortmund-shaped families onto
                 lotse.intake / lotse.visits / lotse.referrals (3 partitions each, keyed by case)
  raw consume    aiokafka, partitions assigned and read from the beginning until all N are in:
                 the ceiling for any consumer of these topics; and the same with confluent-kafka
  plain peer     bench/reporting_peer.py: confluent-kafka + json + a dict of counts + one
                 SQLite transaction (the hand-written reference)
  replay         ``python -m lotse_reporting.replay`` in a child process against a fresh
                 database: envelope + schema validation, inbox, facts, each family's share
                 added to the cells, then every year's cells protected and published through
                 the outbox
  shared         the same replay into another fresh SQLite database with ``--workers 2``
                 (``--shared-workers``): its families shared with a process of its own

The ratios of the replay *end to end* (consume and publish) to raw aiokafka and to the plain
peer are the figures that matter; peak RSS is the replay process's own
(``getrusage(RUSAGE_CHILDREN)``), the bench process's is reported alongside.

Usage:  uv run --frozen python bench/reporting_replay.py [--events N] [--database URL]
Starts the embedded broker unless LOTSE_KAFKA_BOOTSTRAP is set; SQLite file by default.
Prints a JSON document and writes it to bench/results/reporting_replay.json (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import reporting_peer
from aiokafka import AIOKafkaConsumer, TopicPartition
from lotse_contracts import topics as topic_names
from lotse_contracts.city import load_city
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import Consent, ConsentScope, ConsentState, Role
from lotse_contracts.events.intake import (
    BezirkSource,
    Channel,
    ConsentChanged,
    FamilyRegistered,
    HandoverRequested,
    Indicator,
    NeedsAssessed,
    Screening,
    SupportNeed,
)
from lotse_contracts.events.referrals import (
    CompletionOutcome,
    ReferralAccepted,
    ReferralCancelled,
    ReferralCancelReason,
    ReferralCompleted,
    ReferralEscalated,
    ReferralFirstContact,
    ReferralInProgress,
    ReferralOrigin,
    ReferralReceived,
    ReferralRejected,
    ReferralRequested,
    ReferralStatus,
    RejectionReason,
)
from lotse_contracts.events.visits import (
    DeclineChannel,
    MissedFollowUp,
    RescheduleInitiator,
    VisitCancelled,
    VisitCancelReason,
    VisitCompleted,
    VisitDeclined,
    VisitMissed,
    VisitOverdue,
    VisitRescheduled,
    VisitScheduled,
    VisitTopic,
)
from lotse_contracts.personal import PersonalData, new_data_key, seal
from lotse_runtime.kafka import KafkaConfig, TopicSpec, ensure_topics
from lotse_tooling.embedded import EmbeddedBroker

RESULTS = Path(__file__).parent / "results" / "reporting_replay.json"
BERLIN = ZoneInfo("Europe/Berlin")
CITY = load_city("dortmund")
FIRST_YEAR, YEARS = 2016, 10


class City:
    """Dortmund-shaped families: Bezirke by population share, modules and Träger per Bezirk."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.bezirke = [b.slug for b in CITY.stadtbezirke]
        self.weights = [b.population_share for b in CITY.stadtbezirke]
        self.offers = {
            b: [(t.slug, m) for t in CITY.traeger for m in t.modules if t.serves(b)]
            for b in self.bezirke
        }

    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def family(self, n: int) -> list[EventModel]:
        """One family's events in the order each service would publish them."""
        rng = self.rng
        case_id = self.uid()
        bezirk = rng.choices(self.bezirke, self.weights)[0]
        clinic = rng.random() < 0.78
        year = FIRST_YEAR + rng.randrange(YEARS)
        day = date(year, 1, 1) + timedelta(days=rng.randrange(365))
        registered = datetime(
            day.year, day.month, day.day, rng.randrange(8, 17), rng.randrange(60), tzinfo=BERLIN
        )
        born = rng.randrange(1, 6) if clinic else rng.randrange(30, 5 * 365)
        key = new_data_key()
        kid = f"kid-{case_id[:8]}"
        consents = (
            [
                Consent(
                    consent_id=self.uid(),
                    scope=ConsentScope.WELCOME_VISIT,
                    state=ConsentState.GIVEN,
                    at=registered,
                )
            ]
            if rng.random() < 0.92
            else []
        )
        offer = rng.choice(self.offers[bezirk])
        if rng.random() < 0.45:
            consents.append(
                Consent(
                    consent_id=self.uid(),
                    scope=ConsentScope.TRAEGER_CONTACT,
                    traeger=offer[0],
                    purpose=offer[1],
                    state=ConsentState.GIVEN,
                    at=registered,
                )
            )
        personal = PersonalData(
            family_name=f"Familie-{n}",
            parent_given_names=["Aylin"],
            child_given_names=["Noah"],
            child_birth_dates=[(registered - timedelta(days=born)).date()],
            street="Hauptstraße",
            house_number=str(rng.randrange(1, 200)),
            postcode="44135",
            city="Dortmund",
            phone="+49 231 555 0100",
        )
        intake: list[EventModel] = [
            FamilyRegistered(
                case_id=case_id,
                bezirk=bezirk,
                bezirk_source=BezirkSource.ADDRESS,
                channel=Channel.CLINIC if clinic else Channel.MOVE_IN,
                clinic_id="klinikum-dortmund-mitte" if clinic else None,
                registered_at=registered,
                visit_target_date=(registered + timedelta(days=14)).date(),
                days_since_birth_at_registration=born,
                children_count=1 if clinic else rng.randrange(1, 4),
                preferred_language=rng.choice(["de", "de", "de", "tr", "ar", "pl"]),
                consents=consents,
                personal=seal(personal, key=key, kid=kid, case_id=case_id),
            )
        ]
        if clinic and rng.random() < 0.7:
            intake.append(
                NeedsAssessed(
                    case_id=case_id,
                    bezirk=bezirk,
                    assessed_at=registered + timedelta(minutes=40),
                    screening=seal(
                        Screening(
                            support_need=rng.choice(list(SupportNeed)),
                            indicators=rng.sample(list(Indicator), rng.randrange(0, 3)),
                        ),
                        key=key,
                        kid=kid,
                        case_id=case_id,
                    ),
                )
            )
        if rng.random() < 0.12:
            intake.append(
                ConsentChanged(
                    case_id=case_id,
                    bezirk=bezirk,
                    consent_id=self.uid(),
                    scope=ConsentScope.SCREENING_DATA_USE,
                    state=ConsentState.GIVEN,
                    changed_at=registered + timedelta(days=3),
                    changed_by_role=Role.FAMILIENBUERO,
                )
            )
        visits = self._visits(case_id, bezirk, registered, born)
        referrals = self._referrals(case_id, bezirk, registered, offer, intake, consents)
        return intake + visits + referrals

    def _visits(
        self, case_id: str, bezirk: str, registered: datetime, born: int
    ) -> list[EventModel]:
        rng = self.rng
        office = f"familienbuero-{bezirk}"
        out: list[EventModel] = []
        if rng.random() < 0.06:
            out.append(
                VisitDeclined(
                    case_id=case_id,
                    bezirk=bezirk,
                    familienbuero=office,
                    declined_via=rng.choice(list(DeclineChannel)),
                    declined_at=registered + timedelta(days=2),
                )
            )
            return out
        visit_id = self.uid()
        made = registered + timedelta(minutes=5)
        target = (registered + timedelta(days=14)).date()
        starts = datetime.combine(
            registered.date() + timedelta(days=rng.randrange(3, 18)),
            datetime.min.time().replace(hour=rng.choice([9, 10, 11, 13, 14])),
            tzinfo=BERLIN,
        )
        out.append(
            VisitScheduled(
                visit_id=visit_id,
                case_id=case_id,
                bezirk=bezirk,
                familienbuero=office,
                staff_id=f"st-{rng.randrange(10000):04d}",
                starts_at=starts,
                ends_at=starts + timedelta(hours=1),
                target_date=target,
                target_missed=starts.date() > target,
                scheduled_at=made,
            )
        )
        if rng.random() < 0.25:
            new = starts + timedelta(days=rng.randrange(1, 8))
            out.append(
                VisitRescheduled(
                    visit_id=visit_id,
                    case_id=case_id,
                    bezirk=bezirk,
                    familienbuero=office,
                    staff_id=f"st-{rng.randrange(10000):04d}",
                    previous_starts_at=starts,
                    starts_at=new,
                    ends_at=new + timedelta(hours=1),
                    target_date=target,
                    target_missed=new.date() > target,
                    rescheduled_by=rng.choice(list(RescheduleInitiator)),
                    rescheduled_at=made + timedelta(days=1),
                )
            )
            starts = new
        if rng.random() < 0.10:
            out.append(
                VisitMissed(
                    visit_id=visit_id,
                    case_id=case_id,
                    bezirk=bezirk,
                    familienbuero=office,
                    scheduled_for=starts,
                    attempt=1,
                    follow_up=MissedFollowUp.NEW_APPOINTMENT_OFFERED,
                    recorded_at=starts + timedelta(minutes=45),
                )
            )
            starts = starts + timedelta(days=7)
        if starts.date() > target and rng.random() < 0.8:
            out.append(
                VisitOverdue(
                    case_id=case_id,
                    bezirk=bezirk,
                    familienbuero=office,
                    visit_id=visit_id,
                    target_date=target,
                    days_overdue=1,
                    detected_at=datetime.combine(
                        target + timedelta(days=1), datetime.min.time(), tzinfo=BERLIN
                    ),
                )
            )
        roll = rng.random()
        if roll < 0.88:
            out.append(
                VisitCompleted(
                    visit_id=visit_id,
                    case_id=case_id,
                    bezirk=bezirk,
                    familienbuero=office,
                    staff_id=f"st-{rng.randrange(10000):04d}",
                    scheduled_for=starts,
                    completed_at=starts + timedelta(minutes=rng.randrange(40, 80)),
                    informed_about_offers=True,
                    topics=rng.sample(list(VisitTopic), 3),
                    needs_noted=rng.random() < 0.3,
                    days_since_reference=born + (starts.date() - registered.date()).days,
                )
            )
        elif roll < 0.92:
            out.append(
                VisitCancelled(
                    visit_id=visit_id,
                    case_id=case_id,
                    bezirk=bezirk,
                    familienbuero=office,
                    reason=rng.choice(list(VisitCancelReason)),
                    cancelled_at=starts - timedelta(days=1),
                )
            )
        return out

    def _referrals(
        self,
        case_id: str,
        bezirk: str,
        registered: datetime,
        offer: tuple[str, str],
        intake: list[EventModel],
        consents: list[Consent],
    ) -> list[EventModel]:
        rng = self.rng
        traeger_consent = next(
            (c for c in consents if c.scope is ConsentScope.TRAEGER_CONTACT), None
        )
        if traeger_consent is None or rng.random() < 0.35:
            return []
        traeger, module = offer
        asked = registered + timedelta(hours=1)
        handover = self.uid()
        intake.append(
            HandoverRequested(
                handover_id=handover,
                case_id=case_id,
                bezirk=bezirk,
                module=module,
                traeger=traeger,
                consent_ref=traeger_consent.consent_id,
                requested_by_role=Role.BABYLOTSE,
                requested_at=asked,
            )
        )
        ids = {
            "referral_id": self.uid(),
            "case_id": case_id,
            "bezirk": bezirk,
            "traeger": traeger,
            "module": module,
        }
        out: list[EventModel] = [
            ReferralRequested(
                **ids,
                occurred_at=asked + timedelta(minutes=1),
                consent_ref=traeger_consent.consent_id,
                requested_by_role=Role.BABYLOTSE,
                origin=ReferralOrigin.HANDOVER,
                handover_id=handover,
                answer_due_by=(asked + timedelta(days=5)).date(),
            )
        ]
        t = asked + timedelta(minutes=1)
        if rng.random() < 0.12:
            t += timedelta(days=6)
            out.append(
                ReferralEscalated(
                    **ids,
                    occurred_at=t,
                    working_days_without_answer=4,
                    last_status=ReferralStatus.REQUESTED,
                )
            )
            if rng.random() < 0.3:
                return out  # still open
        t += timedelta(hours=rng.randrange(2, 30))
        out.append(ReferralReceived(**ids, occurred_at=t))
        if rng.random() < 0.05:
            out.append(
                ReferralCancelled(
                    **ids,
                    occurred_at=t + timedelta(days=1),
                    reason=ReferralCancelReason.FAMILY_REQUEST,
                    cancelled_by_role=Role.BABYLOTSE,
                )
            )
            return out
        t += timedelta(days=rng.randrange(1, 4))
        if rng.random() < 0.18:
            out.append(
                ReferralRejected(**ids, occurred_at=t, reason=rng.choice(list(RejectionReason)))
            )
            return out
        out.append(ReferralAccepted(**ids, occurred_at=t))
        contact = rng.randrange(2, 15)
        out.append(
            ReferralFirstContact(
                **ids,
                occurred_at=t + timedelta(days=contact),
                days_since_requested=(t + timedelta(days=contact) - asked).days,
            )
        )
        out.append(ReferralInProgress(**ids, occurred_at=t + timedelta(days=contact, hours=1)))
        if rng.random() < 0.7:
            out.append(
                ReferralCompleted(
                    **ids,
                    occurred_at=t + timedelta(days=contact + rng.randrange(30, 200)),
                    outcome=rng.choice(list(CompletionOutcome)),
                )
            )
        return out


def events(n: int, seed: int) -> Iterator[EventModel]:
    city = City(random.Random(seed))
    made = families = 0
    while made < n:
        for event in city.family(families):
            yield event
            made += 1
            if made >= n:
                return
        families += 1


async def produce(kafka: KafkaConfig, prefix: str, n: int, seed: int) -> dict[str, Any]:
    producer = kafka.producer(linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    types: Counter[str] = Counter()
    size = 0
    cases: set[str] = set()
    started = time.perf_counter()
    try:
        pending = []
        for event in events(n, seed):
            record = to_kafka_binary(event.to_cloudevent())
            types[event.event_type.split(".")[3]] += 1
            size += len(record.value or b"") + sum(len(k) + len(v) for k, v in record.headers)
            if isinstance(event, FamilyRegistered):
                cases.add(event.case_id)
            pending.append(
                await producer.send(
                    prefix + type(event).topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                )
            )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
                print(f"  produced {sum(types.values()):,}", file=sys.stderr)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "families": len(cases),
        "avg_record_bytes": size // n,
        "by_type": dict(types.most_common()),
    }


async def raw_consume(kafka: KafkaConfig, names: list[str], n: int) -> float:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [
            TopicPartition(t, p)
            for t in names
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen = 0
        started: float | None = None
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=2000)
            if batch and started is None:
                started = time.perf_counter()
            seen += sum(len(records) for records in batch.values())
        assert started is not None
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def replay_child(
    bootstrap: str, prefix: str, database: str, batch_size: int, workers: int | None = None
) -> dict[str, Any]:
    env = {
        **os.environ,
        "LOTSE_KAFKA_BOOTSTRAP": bootstrap,
        "LOTSE_TOPIC_PREFIX": prefix,
        "LOTSE_REPORTING_DATABASE_URL": database,
    }
    command = [
        sys.executable,
        "-m",
        "lotse_reporting.replay",
        "--quiet",
        "--idle-timeout",
        "5",
        "--batch-size",
        str(batch_size),
        *(["--workers", str(workers)] if workers is not None else []),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"replay failed:\n{done.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    summary["wall_s"] = round(wall, 2)
    # The replay's own peak (VmHWM): RUSAGE_CHILDREN's ru_maxrss would also count this
    # process's peak (the generated events), which the child's exec replaced.
    summary["peak_rss_mb"] = summary["rss_mb"]["peak"]
    # The shards' processes run beside it: together they hold this much at most.
    summary["peak_rss_all_processes_mb"] = round(
        sum(v for k, v in summary["rss_mb"].items() if k == "peak" or k.endswith("_peak")), 1
    )
    summary["peak_rss_children_ru_maxrss_mb"] = round(
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
    )
    return summary


async def run(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    kafka = KafkaConfig(bootstrap=bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=500)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    names = [prefix + t for t in topic_names.DOMAIN_TOPICS]
    await ensure_topics(
        kafka,
        [TopicSpec(t, partitions=3) for t in names]
        + [
            TopicSpec(prefix + topic_names.REPORTING_KPIS, 3),
            TopicSpec(prefix + "lotse.dlq.reporting", 1),
        ],
    )
    n = args.events
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    print(f"producing {n:,} domain events …", file=sys.stderr)
    produced = await produce(kafka, prefix, n, args.seed)
    print("raw aiokafka consume …", file=sys.stderr)
    raw_s = await raw_consume(kafka, names, n)
    print("raw confluent-kafka consume …", file=sys.stderr)
    confluent_s = await asyncio.to_thread(reporting_peer.raw_confluent, bootstrap, names, n)
    print("plain peer aggregation …", file=sys.stderr)
    peer_db = Path(tempfile.mkdtemp(prefix="lotse-peer-")) / "peer.db"
    peer_s = await asyncio.to_thread(
        reporting_peer.plain_aggregation, bootstrap, names, n, str(peer_db)
    )
    database = (
        args.database
        or f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='lotse-bench-')}/reporting.db"
    )
    print("replay into the projections (child process) …", file=sys.stderr)
    replayed = replay_child(bootstrap, prefix, database, args.batch_size)
    assert replayed["records"] == n, replayed
    raw_rate = n / raw_s
    # End to end: reading and applying every record, writing the projections, then
    # publishing every changed cell until the relay has sent it.
    replay_rate = n / replayed["total_s"]
    peer_rate = n / peer_s
    shared: dict[str, Any] | None = None
    if args.shared_workers > 1 and not database.startswith("postgres"):
        print(f"replay shared by {args.shared_workers} processes …", file=sys.stderr)
        fresh = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='lotse-bench-')}/reporting.db"
        shared = replay_child(bootstrap, prefix, fresh, args.batch_size, args.shared_workers)
        assert shared["records"] == n, shared
        assert shared["applied"] == replayed["applied"], (shared, replayed)
        assert shared["cells_published"] == replayed["cells_published"], (shared, replayed)
        shared_rate = n / shared["total_s"]
        shared["end_to_end_events_per_s"] = round(shared_rate, 1)
        shared["ratio_to_raw"] = round(shared_rate / raw_rate, 4)
        shared["ratio_to_plain_peer"] = round(shared_rate / peer_rate, 4)
    return {
        "benchmark": "reporting_replay",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "broker": "external"
        if os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
        else "embedded (Tansu, memory)",
        "database": "postgresql" if database.startswith("postgres") else "sqlite",
        "events": n,
        "produce": produced,
        "raw_consume": {"seconds": round(raw_s, 2), "events_per_s": round(raw_rate)},
        "raw_confluent_consume": {
            "seconds": round(confluent_s, 2),
            "events_per_s": round(n / confluent_s),
        },
        "plain_peer": {"seconds": round(peer_s, 2), "events_per_s": round(peer_rate)},
        "replay": replayed,
        "replay_end_to_end_events_per_s": round(replay_rate, 1),
        "ratio_replay_to_raw": round(replay_rate / raw_rate, 4),
        "ratio_replay_to_raw_confluent": round(replay_rate * confluent_s / n, 4),
        "ratio_replay_to_plain_peer": round(replay_rate / peer_rate, 4),
        "replay_shared": shared,
        "load_average_at_start": load_at_start,
        "bench_process_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--database", default=None, help="SQLAlchemy URL (default: a new SQLite file)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=5000, help="replay events per transaction"
    )
    parser.add_argument(
        "--shared-workers",
        type=int,
        default=2,
        help="then the same replay shared by this many processes (SQLite; 1: not run)",
    )
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    external = os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
    if external:
        result = asyncio.run(run(args, external))
    else:
        with EmbeddedBroker() as broker:
            result = asyncio.run(run(args, broker.bootstrap))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    replay = result["replay"]
    print(
        f"\nraw aiokafka: {result['raw_consume']['events_per_s']:,} events/s · "
        f"raw confluent-kafka: {result['raw_confluent_consume']['events_per_s']:,} events/s · "
        f"plain peer: {result['plain_peer']['events_per_s']:,} events/s · "
        f"replay end to end: {result['replay_end_to_end_events_per_s']:,.0f} events/s · "
        f"ratio to aiokafka {result['ratio_replay_to_raw']:.1%}, "
        f"to the plain peer {result['ratio_replay_to_plain_peer']:.1%} · "
        f"replay peak RSS {replay['peak_rss_mb']} MB",
        file=sys.stderr,
    )
    shared = result["replay_shared"]
    if shared is not None:
        print(
            f"replay shared by {shared['processes']} processes: "
            f"{shared['end_to_end_events_per_s']:,.0f} events/s · "
            f"ratio to aiokafka {shared['ratio_to_raw']:.1%}, "
            f"to the plain peer {shared['ratio_to_plain_peer']:.1%} · "
            f"peak RSS {shared['peak_rss_mb']} MB, "
            f"{shared['peak_rss_all_processes_mb']} MB with its shards' processes",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
