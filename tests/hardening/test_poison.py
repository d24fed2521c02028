"""Poison on every consumed topic: malformed records of every kind are dead-lettered with their
reason, no consumer dies, nothing stored changes, and valid events around them still flow.

The topics come from the services themselves (their consumers' subscriptions) and are checked
against the subscription registry, so a new consumer or Träger is covered without editing this
file. ``LOTSE_POISON_COUNT`` sets the records per topic (default 1,000).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaError, Message, Producer
from fastapi import FastAPI
from lotse_contracts import topics as topic_names
from lotse_contracts.city import load_city
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import Consent, ConsentScope, ConsentState, Role
from lotse_contracts.events.intake import (
    BezirkSource,
    Channel,
    FamilyRegistered,
    HandoverRequested,
)
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_contracts.events.referrals import ReferralRequested
from lotse_contracts.events.visits import VisitCompleted
from lotse_contracts.personal import PersonalData, new_data_key, seal
from lotse_contracts.subscriptions import load_registry
from lotse_referrals.app import create_app as create_referrals
from lotse_referrals.keyring import StaticFamily, StaticKeyring
from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import Referral
from lotse_reporting import store
from lotse_reporting.app import create_app as create_reporting
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.tables import ReportingCase, ReportingFact, ReportingReferral
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.consumer import (
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_STAGE,
    DLQ_TOPIC,
    EventConsumer,
)
from lotse_runtime.db import transient_error
from lotse_runtime.outbox import OutboxMessage
from lotse_visits.app import create_app as create_visits
from lotse_visits.settings import VisitsSettings
from lotse_visits.tables import VisitsVisit
from sqlalchemy import MetaData, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from tests.conftest import Broker
from tests.support import Record, eventually, read_topic

pytestmark = pytest.mark.integration

POISON_PER_TOPIC = int(os.environ.get("LOTSE_POISON_COUNT", "1000"))
#: Lowered from the 256 KiB default so that oversized records stay cheap to produce 1,000
#: times; the limit is the same code path whatever its value.
MAX_EVENT_BYTES = 16 * 1024
TRAEGER = "hebammenzentrum-dortmund"
MODULE = "familienhebamme"
CLINIC = "st-josefs-hospital-hoerde"
BEZIRK = "hoerde"

#: A handled event type per topic: data errors must reach validation in every consumer of the
#: topic (a known type a consumer does not handle is skipped, not validated).
PROBE: dict[str, type[EventModel]] = {
    topic_names.INTAKE: FamilyRegistered,
    topic_names.VISITS: VisitCompleted,
    topic_names.REFERRALS: ReferralRequested,
}

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Poison:
    kind: str
    stages: frozenset[str]  # where the consumer must catch it
    key: bytes | None
    value: bytes | None
    headers: Headers


# -- malformed records --------------------------------------------------------------------------


def _probe(topic: str) -> type[EventModel]:
    if topic in PROBE:
        return PROBE[topic]
    if topic.startswith("lotse.partner.") and topic.endswith(".responses"):
        return PartnerReferralAnswer
    raise AssertionError(f"a consumed topic the test has no probe event for: {topic}")


def _template(topic: str) -> tuple[Headers, dict[str, Any], str]:
    """Headers, data and type of a valid event of a type every consumer of ``topic`` handles
    (``topic`` without prefix)."""
    model = _probe(topic)
    event = model.example().to_cloudevent()
    record = to_kafka_binary(event)
    data: dict[str, Any] = json.loads(record.value or b"{}")
    return record.headers, data, event.type


def _with(headers: Headers, name: str, value: bytes | None) -> Headers:
    kept = [(k, v) for k, v in headers if k != name]
    return kept if value is None else [*kept, (name, value)]


def _wrong_types(data: dict[str, Any], rng: random.Random) -> Any:
    """Data of the right event type with wrongly typed, missing or nonsense fields."""
    choice = rng.randrange(6)
    if choice == 0:
        return [data]
    if choice == 1:
        return rng.choice(["a string", 42, 3.5, True])
    spoiled = dict(data)
    name = rng.choice(sorted(data))
    if choice == 2:
        del spoiled[name]
        # Dropping an optional field alone would leave valid data; the required ids go too.
        return {k: v for k, v in spoiled.items() if k not in ("case_id", "referral_id")}
    wrong: Any = {
        3: {"nested": [1, 2, {"deep": None}]},
        4: [None, 17],
        5: 10**30,
    }[choice]
    spoiled[name] = wrong
    spoiled["case_id"] = rng.choice([123, None, ["x"], {"id": "x"}])
    return spoiled


def poison_for(topic: str, count: int, rng: random.Random) -> list[Poison]:
    """``count`` malformed records for ``topic``, every kind in turn."""
    headers, data, event_type = _template(topic)
    domain = event_type.split(".")[2]
    unversioned = event_type.rsplit(".", 1)[0]
    body = json.dumps(data).encode()

    def key(i: int) -> bytes | None:
        # Every third record has no key at all; others a case-like key or raw bytes.
        if i % 3 == 0:
            return None
        return str(uuid.uuid4()).encode() if i % 3 == 1 else rng.randbytes(rng.randrange(1, 40))

    def bad_json(i: int) -> Poison:
        value = rng.choice([b"{not json", body[: max(1, len(body) // 2)], b"\xff\xfe{}", b"[1,2"])
        return Poison("bad_json", frozenset({"envelope"}), key(i), value, headers)

    def wrong_types(i: int) -> Poison:
        value = json.dumps(_wrong_types(data, rng)).encode()
        return Poison("wrong_types", frozenset({"schema"}), key(i), value, headers)

    def unknown_type(i: int) -> Poison:
        name = rng.choice(
            [f"de.lotse.{domain}.no-such-event-{i}.v1", "de.lotse.nowhere.thing.v1", "hello", "x"]
        )
        return Poison(
            "unknown_type",
            frozenset({"type"}),
            key(i),
            body,
            _with(headers, "ce_type", name.encode()),
        )

    def unknown_major(i: int) -> Poison:
        name = f"{unversioned}.v{rng.randrange(2, 1000)}".encode()
        return Poison(
            "unknown_major", frozenset({"type"}), key(i), body, _with(headers, "ce_type", name)
        )

    def oversized(i: int) -> Poison:
        padded = {**data, "padding": "x" * (MAX_EVENT_BYTES + rng.randrange(1, 4096))}
        return Poison(
            "oversized", frozenset({"envelope"}), key(i), json.dumps(padded).encode(), headers
        )

    def missing_headers(i: int) -> Poison:
        name = ("ce_id", "ce_source", "ce_type", "ce_specversion")[i % 4]
        spoiled = _with(headers, name, None if i % 8 < 4 else b"")
        if i % 16 == 15:
            spoiled = _with(headers, "ce_specversion", b"0.3")
        return Poison("missing_headers", frozenset({"envelope"}), key(i), body, spoiled)

    def not_a_cloudevent(i: int) -> Poison:
        structured = [("content-type", b"application/cloudevents+json")]
        value, extra = rng.choice(
            [
                (body, []),  # plain JSON, no headers at all
                (body, [("x-origin", b"somewhere")]),
                (b'{"hello": "world"}', structured),
                (b"[1, 2, 3]", structured),
                (b'{"specversion": "1.0", "id": 7, "source": [], "type": {}}', structured),
                (
                    b'{"specversion": "1.0", "id": "1", "source": "/x", "type": "t", '
                    b'"data_base64": "AA=="}',
                    structured,
                ),
            ]
        )
        return Poison("not_a_cloudevent", frozenset({"envelope"}), key(i), value, extra)

    def garbage(i: int) -> Poison:
        noise = rng.randbytes(rng.randrange(1, 2048))
        junk_headers: Headers = rng.choice(
            [[], [("ce_type", rng.randbytes(12)), ("ce_id", b"\xc3\x28")], headers[:1]]
        )
        return Poison("garbage", frozenset({"envelope"}), key(i), noise, junk_headers)

    def empty(i: int) -> Poison:
        value = None if i % 2 else b""
        if i % 5 == 0:
            structured = [("content-type", b"application/cloudevents+json")]
            return Poison("empty", frozenset({"envelope"}), key(i), value, structured)
        return Poison("empty", frozenset({"schema"}), key(i), value, headers)

    kinds: list[Callable[[int], Poison]] = [
        bad_json,
        wrong_types,
        unknown_type,
        unknown_major,
        oversized,
        missing_headers,
        not_a_cloudevent,
        garbage,
        empty,
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


# -- producing in bulk ----------------------------------------------------------------------------


@dataclass
class Ledger:
    """Where each produced record landed, so its dead letter can be traced back to it."""

    placed: dict[tuple[str, int, int], Poison] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def produce_all(bootstrap: str, records: list[tuple[str, Poison]], ledger: Ledger) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "linger.ms": 20,
            "queue.buffering.max.messages": 200_000,
            "message.max.bytes": 1_000_000,
        }
    )

    def placed(poison: Poison) -> Callable[[KafkaError | None, Message], None]:
        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                ledger.errors.append(str(error))
                return
            where = (
                str(message.topic()),
                int(message.partition() or 0),
                int(message.offset() or 0),
            )
            ledger.placed[where] = poison

        return report

    for topic, poison in records:
        producer.produce(
            topic,
            value=poison.value,
            key=poison.key,
            headers=list(poison.headers),
            on_delivery=placed(poison),
        )
        producer.poll(0)
    if producer.flush(60) != 0:
        raise AssertionError("could not produce every poison record")
    assert not ledger.errors, ledger.errors[:5]


def produce_valid(bootstrap: str, prefix: str, events: list[EventModel]) -> None:
    records = []
    for event in events:
        record = to_kafka_binary(event.to_cloudevent())
        topic = type(event).topic
        if isinstance(event, PartnerReferralAnswer):
            topic = topic_names.partner_responses(event.traeger)
        records.append(
            (
                prefix + topic,
                Poison("valid", frozenset(), record.key, record.value, record.headers),
            )
        )
    produce_all(bootstrap, records, Ledger())


# -- valid families -------------------------------------------------------------------------------


@dataclass
class Family:
    case_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    traeger_consent: str = field(default_factory=lambda: str(uuid.uuid4()))
    key: bytes = field(default_factory=new_data_key)

    @property
    def kid(self) -> str:
        return f"k-{self.case_id}"

    def registered(self, now: datetime) -> FamilyRegistered:
        consents = [
            Consent(
                consent_id=str(uuid.uuid4()),
                scope=ConsentScope.WELCOME_VISIT,
                state=ConsentState.GIVEN,
                at=now,
            ),
            Consent(
                consent_id=self.traeger_consent,
                scope=ConsentScope.TRAEGER_CONTACT,
                traeger=TRAEGER,
                purpose=MODULE,
                state=ConsentState.GIVEN,
                at=now,
            ),
        ]
        personal = PersonalData(
            family_name="Beispiel",
            child_given_names=["Mira"],
            child_birth_dates=[now.date() - timedelta(days=2)],
            postcode="44263",
        )
        return FamilyRegistered(
            case_id=self.case_id,
            bezirk=BEZIRK,
            bezirk_source=BezirkSource.ADDRESS,
            channel=Channel.CLINIC,
            clinic_id=CLINIC,
            registered_at=now,
            visit_target_date=now.date() + timedelta(days=14),
            days_since_birth_at_registration=2,
            children_count=1,
            consents=consents,
            personal=seal(personal, key=self.key, kid=self.kid, case_id=self.case_id),
        )

    def handover(self, now: datetime) -> HandoverRequested:
        return HandoverRequested(
            handover_id=str(uuid.uuid4()),
            case_id=self.case_id,
            bezirk=BEZIRK,
            module=MODULE,
            consent_ref=self.traeger_consent,
            requested_by_role=Role.BABYLOTSE,
            requested_at=now,
        )


# -- the platform's consumers, in process ---------------------------------------------------------


@dataclass
class Platform:
    apps: dict[str, FastAPI]
    keyring: StaticKeyring

    def know(self, *families: Family) -> None:
        """Give referrals the families' data keys, as intake's keyring would."""
        for family in families:
            self.keyring.families[family.case_id] = StaticFamily(
                family.kid,
                family.key,
                PersonalData(family_name="Beispiel", postcode="44263"),
                {family.traeger_consent: TRAEGER},
            )

    def runtime(self, service: str) -> ServiceRuntime[Any]:
        runtime: ServiceRuntime[Any] = self.apps[service].state.runtime
        return runtime

    def consumers(self) -> list[tuple[str, EventConsumer]]:
        return [(s, c) for s in self.apps for c in self.runtime(s).consumers]

    async def rows(self, service: str, model: Any, *where: Any) -> list[Any]:
        """The rows, or none while the service holds its SQLite write lock (every SQLite
        transaction takes it, reads too): the poll asks again rather than failing."""
        try:
            async with self.runtime(service).db.transaction() as session:
                return list((await session.execute(select(model).where(*where))).scalars())
        except DBAPIError as exc:
            if transient_error(exc):
                return []
            raise


@asynccontextmanager
async def platform(broker: Broker, prefix: str, tmp_path: Path) -> AsyncIterator[Platform]:
    common: dict[str, Any] = {
        "kafka_bootstrap": broker.bootstrap,
        "topic_prefix": prefix,
        "create_topics": False,
        "consumer_session_timeout_ms": 2000,
        "consumer_heartbeat_interval_ms": 300,
        "relay_poll_interval_s": 0.05,
        "consumer_backoff_s": 0.05,
        "max_event_bytes": MAX_EVENT_BYTES,
    }

    def db(name: str) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"

    keyring = StaticKeyring()
    apps = {
        "visits": create_visits(
            VisitsSettings(**common, database_url=db("visits"), overdue_check_interval_s=3600)
        ),
        "referrals": create_referrals(
            ReferralsSettings(
                **common,
                database_url=db("referrals"),
                escalation_interval_s=3600,
                placement_interval_s=3600,
            ),
            keyring=keyring,
        ),
        "reporting": create_reporting(
            ReportingSettings(**common, database_url=db("reporting"), publish_interval_s=0.2)
        ),
    }
    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        running = Platform(apps, keyring)
        await eventually(lambda: all(c.running for _s, c in running.consumers()), timeout_s=30)
        for _service, consumer in running.consumers():
            await consumer.wait_assigned(30)
        yield running


# -- what is stored -------------------------------------------------------------------------------


async def snapshot(runtime: ServiceRuntime[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a service's database, in a stable order."""
    metadata = MetaData()
    async with runtime.db.engine.connect() as conn:
        await conn.run_sync(metadata.reflect)
    tables: dict[str, list[tuple[Any, ...]]] = {}
    async with runtime.db.transaction() as session:
        for table in metadata.sorted_tables:
            rows = (await session.execute(select(table))).all()
            tables[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return tables


def without_refusal_notices(
    tables: dict[str, list[tuple[Any, ...]]],
) -> tuple[dict[str, list[tuple[Any, ...]]], list[str]]:
    """The snapshot without the outbox rows of ``answer-refused`` notices, and the topics
    those rows were for (outbox columns: id, topic, key, value, headers, event id, type, …)."""
    rows = tables.get("outbox", [])
    notices = [r for r in rows if r[6] == "de.lotse.referrals.answer-refused.v1"]
    rest = {**tables, "outbox": [r for r in rows if r not in notices]} if notices else tables
    return rest, [str(r[1]) for r in notices]


async def outbox_drained(session: AsyncSession) -> bool:
    unsent = await session.scalar(
        select(func.count()).select_from(OutboxMessage).where(col(OutboxMessage.sent_at).is_(None))
    )
    return unsent == 0


async def quiet(running: Platform) -> bool:
    """Every outbox relayed and every reporting figure published: nothing is in flight."""
    for service in running.apps:
        async with running.runtime(service).db.transaction() as session:
            if not await outbox_drained(session):
                return False
            if service == "reporting" and await store.dirty_years(session):
                return False
    return True


def dead_letters_expected(running: Platform, per_topic: dict[str, int]) -> dict[str, int]:
    """Dead letters per service: each of its consumers dead-letters every poison record of
    each topic it reads."""
    expected: Counter[str] = Counter()
    for service, consumer in running.consumers():
        expected[service] += sum(per_topic.get(t, 0) for t in consumer.topics)
    return dict(expected)


def dead_lettered(running: Platform) -> dict[str, int]:
    found: Counter[str] = Counter()
    for service, consumer in running.consumers():
        found[service] += consumer.dead_lettered
    return dict(found)


async def all_dead_lettered(
    running: Platform, expected: dict[str, int], ledger: Ledger, timeout_s: float
) -> None:
    """Wait for the dead letters; on timeout, say where each consumer stands and on what."""
    try:
        await eventually(lambda: dead_lettered(running) == expected, timeout_s, interval_s=0.2)
    except AssertionError:
        stuck = []
        for service, consumer in running.consumers():
            stuck.append(
                f"{service}.{consumer.name}: processed {consumer.processed}, skipped "
                f"{consumer.skipped}, duplicates {consumer.duplicates}, running {consumer.running}"
            )
            for tp, position in sorted(consumer._positions.items()):
                waiting = ledger.placed.get((tp.topic, tp.partition, position))
                kind = waiting.kind if waiting else "-"
                stuck.append(
                    f"{service}.{consumer.name} {tp.topic}/{tp.partition}@{position}: {kind}"
                )
        raise AssertionError(
            f"dead letters {dead_lettered(running)}, expected {expected}\n" + "\n".join(stuck)
        ) from None


async def assert_alive(running: Platform) -> None:
    for service, consumer in running.consumers():
        assert consumer.running, (service, consumer.name)
        assert consumer.failed is None, (service, consumer.name, consumer.failed)
    for service, app in running.apps.items():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            response = await client.get("/readyz")
        assert response.status_code == 200, (service, response.text)


def check_dead_letters(
    records: list[Record], ledger: Ledger, service: str, expected: int
) -> Counter[str]:
    """Every dead letter names its reason and origin, keeps the record's bytes, and was
    caught where its kind must be caught; returns dead letters per kind."""
    assert len(records) == expected, f"{service}: {len(records)} dead letters, expected {expected}"
    kinds: Counter[str] = Counter()
    for record in records:
        origin = (
            str(record.header(DLQ_TOPIC)),
            int(record.header(DLQ_PARTITION) or -1),
            int(record.header(DLQ_OFFSET) or -1),
        )
        poison = ledger.placed.get(origin)
        assert poison is not None, f"{service}: dead letter of a record not sent as poison {origin}"
        reason = record.header(DLQ_REASON)
        assert reason, f"{service}: dead letter without reason ({poison.kind})"
        stage = record.header(DLQ_STAGE)
        assert stage in poison.stages, f"{service}: {poison.kind} caught at {stage}: {reason}"
        assert (record.value or b"") == (poison.value or b""), f"{service}: bytes changed"
        assert record.key == poison.key
        kinds[poison.kind] += 1
    return kinds


# -- the test -------------------------------------------------------------------------------------


@pytest.mark.timeout(60 + POISON_PER_TOPIC * 0.45)
async def test_poison_on_every_consumed_topic_is_dead_lettered_and_the_services_carry_on(
    broker: Broker, topics: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    rng = random.Random(9)
    registry = load_registry(load_city("dortmund"))
    async with platform(broker, topics, tmp_path) as running:
        consumed = sorted({t for _s, c in running.consumers() for t in c.topics})
        # The services read exactly what the registry grants them (and so what ACLs allow).
        # Delivery, which reads the same domain topics and the Träger feeds' notices through
        # the same runtime consumer, is not started here.
        granted = sorted(
            {
                topics + t
                for a in registry.audiences()
                if a.kind == "service" and a.name.removeprefix("service-") in running.apps
                for t in a.read_topics
            }
        )
        assert consumed == granted
        assert len(consumed) == 3 + len(load_city("dortmund").traeger_slugs)

        # A family that was there before the poison: its rows must survive untouched.
        now = datetime.now(UTC)
        before = Family()
        running.know(before)
        produce_valid(broker.bootstrap, topics, [before.registered(now), before.handover(now)])
        referral = (
            await eventually(
                lambda: running.rows("referrals", Referral, col(Referral.case_id) == before.case_id)
            )
        )[0]
        answer = PartnerReferralAnswer(
            referral_id=referral.referral_id,
            case_id=before.case_id,
            traeger=TRAEGER,
            answer=PartnerAnswer.RECEIVED,
            occurred_at=datetime.now(UTC),
        )
        produce_valid(broker.bootstrap, topics, [answer])
        await eventually(
            lambda: running.rows(
                "referrals",
                Referral,
                col(Referral.referral_id) == referral.referral_id,
                col(Referral.status) == "received",
            )
        )
        await eventually(
            lambda: running.rows(
                "reporting",
                ReportingFact,
                col(ReportingFact.case_id) == before.case_id,
                col(ReportingFact.kind) == "offered",
            )
        )
        await eventually(
            lambda: running.rows(
                "reporting",
                ReportingReferral,
                col(ReportingReferral.referral_id) == referral.referral_id,
                col(ReportingReferral.status) == "received",
            )
        )
        await eventually(lambda: quiet(running))
        stored = {s: await snapshot(running.runtime(s)) for s in running.apps}
        assert not any(dead_lettered(running).values())

        # Phase 1: nothing but poison, POISON_PER_TOPIC records on every consumed topic.
        ledger = Ledger()
        poison = [
            (t, p)
            for t in consumed
            for p in poison_for(t.removeprefix(topics), POISON_PER_TOPIC, rng)
        ]
        produce_all(broker.bootstrap, poison, ledger)
        expected = dead_letters_expected(running, {t: POISON_PER_TOPIC for t in consumed})
        # Generous: on 2 shared cores the dead letters of 1,000 records a topic take ~80 s, and
        # each refused partner answer now also writes its sender's answer-refused notice (one
        # more transaction per record on the partner topics): up to ~180 s beside other tests.
        await all_dead_lettered(running, expected, ledger, timeout_s=30 + POISON_PER_TOPIC * 0.27)
        await assert_alive(running)
        await eventually(lambda: quiet(running))
        for service in running.apps:
            after, notices = without_refusal_notices(await snapshot(running.runtime(service)))
            assert after == stored[service], service
            # The one designed effect of poison: a refused answer tells its sender, on the
            # sender's own feed and nowhere else (issue 18).
            assert all(
                topic.startswith(topics + "lotse.partner.") and topic.endswith(".referrals")
                for topic in notices
            ), notices
        phase_one = time.monotonic() - started

        # Phase 2: valid events among fresh poison, on the same partitions, after it.
        later = Family()
        running.know(later)
        few = max(9, POISON_PER_TOPIC // 50)
        mixed: list[tuple[str, Poison]] = []
        for topic in consumed:
            mixed.extend((topic, p) for p in poison_for(topic.removeprefix(topics), few, rng))
        produce_all(broker.bootstrap, mixed[: len(mixed) // 2], ledger)
        accepted = answer.model_copy(
            update={"answer": PartnerAnswer.ACCEPTED, "occurred_at": datetime.now(UTC)}
        )
        produce_valid(
            broker.bootstrap, topics, [later.registered(now), later.handover(now), accepted]
        )
        produce_all(broker.bootstrap, mixed[len(mixed) // 2 :], ledger)

        await eventually(
            lambda: running.rows("visits", VisitsVisit, col(VisitsVisit.case_id) == later.case_id)
        )
        await eventually(
            lambda: running.rows("referrals", Referral, col(Referral.case_id) == later.case_id)
        )
        await eventually(
            lambda: running.rows(
                "referrals",
                Referral,
                col(Referral.referral_id) == referral.referral_id,
                col(Referral.status) == "accepted",
            )
        )
        await eventually(
            lambda: running.rows(
                "reporting", ReportingCase, col(ReportingCase.case_id) == later.case_id
            )
        )
        await eventually(
            lambda: running.rows(
                "reporting",
                ReportingFact,
                col(ReportingFact.case_id) == later.case_id,
                col(ReportingFact.kind) == "offered",
            )
        )
        await eventually(
            lambda: running.rows(
                "reporting", ReportingReferral, col(ReportingReferral.case_id) == later.case_id
            )
        )
        expected = dead_letters_expected(running, {t: POISON_PER_TOPIC + few for t in consumed})
        await all_dead_lettered(running, expected, ledger, timeout_s=30)
        await assert_alive(running)

        for service, count in expected.items():
            dlq = topics + topic_names.dead_letter(service)
            records = await read_topic(broker.bootstrap, dlq, count, timeout_s=30)
            kinds = check_dead_letters(records, ledger, service, count)
            assert set(kinds) >= {"bad_json", "wrong_types", "unknown_type", "oversized", "garbage"}
    print(
        f"\npoison: {POISON_PER_TOPIC} per topic x {len(consumed)} topics; "
        f"phase 1 {phase_one:.1f} s, total {time.monotonic() - started:.1f} s"
    )
