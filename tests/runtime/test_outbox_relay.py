"""Outbox and relay against the real broker and both database backends."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
from lotse_contracts.city import load_city
from lotse_contracts.cloudevents import from_kafka, to_kafka_binary
from lotse_contracts.events.visits import VisitScheduled
from lotse_contracts.subscriptions import RoutingError, load_registry
from lotse_runtime import audit
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.migrations import create_schema
from lotse_runtime.outbox import NOTIFY_CHANNEL, Outbox, OutboxMessage, OutboxRelay
from lotse_runtime.telemetry import TelemetryConfig, setup_telemetry
from opentelemetry.sdk.metrics.export import NumberDataPoint
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlmodel import col, select

from tests.support import eventually, read_topic

pytestmark = pytest.mark.integration


def scheduled(case_id: str, n: int = 0) -> VisitScheduled:
    return VisitScheduled.example().model_copy(
        update={"case_id": case_id, "visit_id": str(uuid.uuid4()), "staff_id": f"st-{n}"}
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_schema(database, [])
    yield database
    await database.dispose()


def make_outbox(prefix: str, relay: OutboxRelay | None = None) -> Outbox:
    return Outbox(
        source="/lotse/visits",
        topic_prefix=prefix,
        registry=load_registry(load_city("dortmund")),
        on_commit=relay.wake if relay else None,
    )


async def test_events_reach_domain_topic_and_feed_in_order_with_trace(
    db: Database, kafka: KafkaConfig, topics: str, broker: object
) -> None:
    telemetry = setup_telemetry(TelemetryConfig(service_name="t", in_memory=True))
    relay = OutboxRelay(db, kafka, service="visits", telemetry=telemetry)
    outbox = make_outbox(topics, relay)
    case_id = str(uuid.uuid4())
    events = [scheduled(case_id, n) for n in range(5)]
    with telemetry.tracer.start_as_current_span("http request") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        async with db.transaction() as session:
            ids = [outbox.add(session, event).id for event in events]
    try:
        await relay.drain()
        assert relay.backlog == 0
        domain = await read_topic(kafka.bootstrap, topics + "lotse.visits", 5)
        assert [r.header("ce_id") for r in domain] == ids  # order of the transaction kept
        assert {r.partition for r in domain} == {domain[0].partition}
        assert all(r.key == case_id.encode() for r in domain)
        assert all(trace_id in (r.header("traceparent") or "") for r in domain)
        first = from_kafka(domain[0].value, domain[0].headers)
        assert first.type == VisitScheduled.event_type
        assert first.data["staff_id"] == "st-0"

        feed = await read_topic(kafka.bootstrap, topics + "lotse.bezirk.hoerde", 5)
        assert [r.header("ce_id") for r in feed] == ids
        projected = json.loads(feed[0].value or b"{}")
        assert "staff_id" not in projected  # data minimisation for the Bezirksteam
        assert projected["visit_id"] == events[0].visit_id
    finally:
        await relay.stop()
        telemetry.shutdown()


async def test_rolled_back_transaction_leaves_no_event(db: Database, kafka: KafkaConfig) -> None:
    outbox = make_outbox("unused.")

    async def failing_change() -> None:
        async with db.transaction() as session:
            outbox.add(session, scheduled(str(uuid.uuid4())))
            raise RuntimeError("state change failed")

    with pytest.raises(RuntimeError, match="state change failed"):
        await failing_change()
    async with db.transaction() as session:
        assert (await session.execute(select(OutboxMessage))).first() is None


async def test_rows_of_a_rolled_back_savepoint_are_not_stored(db: Database) -> None:
    # Outbox and audit rows go in at commit, one statement per table: the savepoints between
    # must still decide which of them exist, and the ids keep the order they were added in.
    outbox = make_outbox("")
    case_id = str(uuid.uuid4())
    added: dict[str, str] = {}

    def add(name: str, session: AsyncSession) -> None:
        added[name] = outbox.add(session, scheduled(case_id)).id
        audit.record(
            session,
            service="visits",
            caller=None,
            action=audit.AuditAction.change,
            case_id=case_id,
            purpose=name,
        )

    async def refused_step(session: AsyncSession, name: str, inner: str | None = None) -> None:
        async with session.begin_nested():
            add(name, session)
            if inner is not None:
                async with session.begin_nested():
                    add(inner, session)
            raise RuntimeError("step refused")

    async with db.transaction() as session:
        add("before", session)
        async with session.begin_nested():
            add("released", session)
            with pytest.raises(RuntimeError):
                await refused_step(session, "inner rolled back")
            add("released after inner", session)
        with pytest.raises(RuntimeError):
            await refused_step(session, "rolled back", "released inside rolled back")
        add("after", session)
    kept = ["before", "released", "released after inner", "after"]
    async with db.transaction() as session:
        stored = (
            await session.execute(
                select(OutboxMessage.event_id, OutboxMessage.topic).order_by(col(OutboxMessage.id))
            )
        ).all()
        purposes = (
            await session.execute(
                select(audit.AuditEntry.purpose).order_by(col(audit.AuditEntry.id))
            )
        ).scalars()
        assert [event_id for event_id, topic in stored if topic == "lotse.visits"] == [
            added[name] for name in kept
        ]
        assert list(purposes) == kept
        # The audience copies (feeds) of the dropped events went with them.
        assert {event_id for event_id, _ in stored} == {added[name] for name in kept}


async def test_unroutable_event_fails_the_transaction(db: Database) -> None:
    outbox = make_outbox("unused.")
    bad = scheduled(str(uuid.uuid4())).model_copy(update={"bezirk": "atlantis"})
    with pytest.raises(RoutingError, match="atlantis"):
        async with db.transaction() as session:
            outbox.add(session, bad)
    async with db.transaction() as session:
        assert (await session.execute(select(OutboxMessage))).first() is None


async def test_crash_between_publish_and_mark_sent_republishes(
    db: Database, kafka: KafkaConfig, topics: str
) -> None:
    outbox = make_outbox(topics)
    event_id = None
    async with db.transaction() as session:
        event_id = outbox.add(session, scheduled(str(uuid.uuid4()))).id

    crashing = OutboxRelay(db, kafka, service="visits")

    async def crash(_ids: list[int]) -> None:
        raise ConnectionError("process killed before marking sent")

    crashing._mark_sent = crash  # type: ignore[method-assign,assignment]
    with pytest.raises(ConnectionError):
        await crashing.publish_pending()
    await crashing.stop()
    async with db.transaction() as session:
        rows = (await session.execute(select(OutboxMessage))).scalars().all()
        assert rows
        assert all(row.sent_at is None for row in rows)

    restarted = OutboxRelay(db, kafka, service="visits")
    try:
        await restarted.drain()
    finally:
        await restarted.stop()
    records = await read_topic(kafka.bootstrap, topics + "lotse.visits", 2)
    # Published twice with the same CloudEvents id: consumers dedupe by source + id.
    assert [r.header("ce_id") for r in records] == [event_id, event_id]
    async with db.transaction() as session:
        rows = (await session.execute(select(OutboxMessage))).scalars().all()
        assert all(row.sent_at is not None for row in rows)


async def test_relay_survives_broker_absence_and_reports_it(db: Database) -> None:
    from lotse_tooling.embedded import free_port

    nowhere = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}", request_timeout_ms=1000)
    relay = OutboxRelay(db, nowhere, service="visits", poll_interval_s=0.05)
    async with db.transaction() as session:
        make_outbox("x.").add(session, scheduled(str(uuid.uuid4())))
    await relay.start()
    try:
        from tests.support import eventually

        await eventually(lambda: relay.last_error is not None, timeout_s=15)
    finally:
        await relay.stop()
    async with db.transaction() as session:
        rows = (await session.execute(select(OutboxMessage))).scalars().all()
        assert rows
        assert all(row.sent_at is None for row in rows)


async def test_relay_is_woken_after_commit_not_after_rollback(db: Database) -> None:
    wakes: list[str] = []
    outbox = make_outbox("x.")
    outbox.notify(lambda: wakes.append("wake"))
    async with db.transaction() as session:
        outbox.add(session, scheduled(str(uuid.uuid4())))
        assert wakes == []  # not before the rows are visible to the relay
    assert wakes == ["wake"]

    async def rolled_back() -> None:
        async with db.transaction() as session:
            outbox.add(session, scheduled(str(uuid.uuid4())))
            raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await rolled_back()
    assert wakes == ["wake"]


async def test_backlog_is_reported_as_a_metric(
    db: Database, kafka: KafkaConfig, topics: str
) -> None:
    telemetry = setup_telemetry(TelemetryConfig(service_name="t", in_memory=True))
    relay = OutboxRelay(db, kafka, service="visits", telemetry=telemetry, batch_size=4)
    async with db.transaction() as session:
        for _ in range(3):
            make_outbox(topics).add(session, scheduled(str(uuid.uuid4())))
    try:
        # Each event is one row for the domain topic and one for the Bezirk feed.
        assert await relay.publish_pending() == 4
        assert relay.backlog == 2
        assert telemetry.metric_reader is not None
        data = telemetry.metric_reader.get_metrics_data()
        assert data is not None
        gauges = {
            metric.name: [
                p.value for p in metric.data.data_points if isinstance(p, NumberDataPoint)
            ]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
        assert gauges["lotse.outbox.backlog"] == [2]
    finally:
        await relay.stop()
        telemetry.shutdown()


async def test_an_event_its_contract_forbids_is_never_stored(db: Database) -> None:
    from pydantic import ValidationError

    outbox = make_outbox("unused.")
    invalid = scheduled(str(uuid.uuid4())).model_copy(update={"staff_id": "x"})  # unvalidated

    async def publish() -> None:
        async with db.transaction() as session:
            outbox.add(session, invalid)

    with pytest.raises(ValidationError, match="staff_id"):
        await publish()
    async with db.transaction() as session:
        assert (await session.execute(select(OutboxMessage))).first() is None


async def test_a_commit_in_another_process_wakes_the_relay_on_postgresql(
    postgres_url: str, kafka: KafkaConfig, topics: str
) -> None:
    relay_db, writer_db = Database(postgres_url), Database(postgres_url)
    await create_schema(relay_db, [])
    # Polling would take ten minutes: only the NOTIFY of the writer's commit can wake it.
    relay = OutboxRelay(relay_db, kafka, service="visits", poll_interval_s=600)
    await relay.start()
    try:
        await eventually(lambda: relay.published == 0 and relay._leader is not None)
        outbox = make_outbox(topics)  # another replica's outbox: no in-process wake
        async with writer_db.transaction() as session:
            event_id = outbox.add(session, scheduled(str(uuid.uuid4()))).id
        records = await read_topic(kafka.bootstrap, topics + "lotse.visits", 1)
        assert [r.header("ce_id") for r in records] == [event_id]
        await eventually(lambda: relay.backlog == 0 and relay.published == 2)
    finally:
        await relay.stop()
        await relay_db.dispose()
        await writer_db.dispose()


@asynccontextmanager
async def _listening(db: Database, heard: list[str]) -> AsyncIterator[AsyncConnection]:
    """A connection of its own that LISTENs on the relay's channel; ``heard`` gets each
    notice's channel."""
    async with db.engine.connect() as listener:
        conn = await listener.execution_options(isolation_level="AUTOCOMMIT")
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        await driver.add_listener(NOTIFY_CHANNEL, lambda *args: heard.append(args[2]))
        yield conn


async def test_a_rolled_back_transaction_sends_no_notice(postgres_url: str) -> None:
    db = Database(postgres_url)
    await create_schema(db, [])
    heard: list[str] = []
    try:
        async with _listening(db, heard) as conn:

            async def rolled_back() -> None:
                async with db.transaction() as session:
                    make_outbox("x.").add(session, scheduled(str(uuid.uuid4())))
                    raise ValueError("no")

            with pytest.raises(ValueError, match="no"):
                await rolled_back()
            async with db.transaction() as session:
                make_outbox("x.").add(session, scheduled(str(uuid.uuid4())))
            await eventually(lambda: heard)
            await conn.execute(text("SELECT 1"))  # a round trip: a second notice would be in
            assert heard == [NOTIFY_CHANNEL]
    finally:
        await db.dispose()


async def test_the_leading_relays_own_commits_send_no_notice_and_others_still_do(
    postgres_url: str, kafka: KafkaConfig, topics: str
) -> None:
    # Only the lock's holder listens for the NOTIFY, and its own process wakes it on
    # commit: the notice would be a round trip per transaction for nothing.
    db, other_db = Database(postgres_url), Database(postgres_url)
    await create_schema(db, [])
    relay = OutboxRelay(db, kafka, service="visits", poll_interval_s=600)
    own = Outbox(
        source="/lotse/visits",
        topic_prefix=topics,
        registry=load_registry(load_city("dortmund")),
        on_commit=relay.wake,
        leading=relay.leading,
    )
    heard: list[str] = []
    try:
        async with _listening(db, heard) as conn:
            assert not relay.leading()
            async with db.transaction() as session:  # not leading yet: another may be
                first = own.add(session, scheduled(str(uuid.uuid4()))).id
            await eventually(lambda: heard == [NOTIFY_CHANNEL])
            await relay.start()
            await eventually(lambda: relay.leading() and relay.backlog == 0)
            async with db.transaction() as session:
                mine = own.add(session, scheduled(str(uuid.uuid4()))).id
            async with other_db.transaction() as session:  # another replica's commit
                theirs = make_outbox(topics).add(session, scheduled(str(uuid.uuid4()))).id
            records = await read_topic(kafka.bootstrap, topics + "lotse.visits", 3)
            assert {r.header("ce_id") for r in records} == {first, mine, theirs}
            await conn.execute(text("SELECT 1"))  # a round trip: a notice sent would be in
            assert heard == [NOTIFY_CHANNEL, NOTIFY_CHANNEL]
            await relay.stop()
            assert not relay.leading()
    finally:
        await relay.stop()
        await db.dispose()
        await other_db.dispose()


async def test_rows_built_by_the_caller_are_sent_and_a_routed_type_is_refused(
    db: Database, kafka: KafkaConfig, topics: str, broker: object
) -> None:
    """``add_records``: rows a service built itself (reporting's ``kpi-updated`` records)
    go out like any event; a type with audience copies must go through ``add_cloudevent``."""
    relay = OutboxRelay(db, kafka, service="visits")
    outbox = make_outbox(topics, relay)
    event = scheduled(str(uuid.uuid4()))
    routed = to_kafka_binary(event.to_cloudevent(source=outbox.source))
    row = {
        "topic": topics + "lotse.visits",
        "record_key": routed.key.decode() if routed.key else None,
        "value": routed.value,
        "headers": json.dumps([[k, v.decode()] for k, v in routed.headers]),
        "event_id": "e-1",
        "event_type": VisitScheduled.event_type,
        "created_at": datetime.now(UTC),
        "sent_at": None,
    }
    async with db.transaction() as session:
        with pytest.raises(ValueError, match="audience copies"):
            outbox.add_records(session, [row])
    unrouted = {**row, "event_type": "de.lotse.test.unrouted.v1"}
    async with db.transaction() as session:
        outbox.add_records(session, [unrouted])
    try:
        await relay.drain()
        assert relay.published == 1
        [record] = await read_topic(kafka.bootstrap, topics + "lotse.visits", 1)
        assert record.value == routed.value
        assert record.key == routed.key
    finally:
        await relay.stop()
