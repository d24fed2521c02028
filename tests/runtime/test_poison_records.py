"""No single record stops a partition: oversized records are dead-lettered by reference,
conflicting duplicates are dead-lettered and counted, and a partition that does not advance
is reported. Against the real broker (embedded Tansu here) and both database backends."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import load_registry
from lotse_runtime import inbox
from lotse_runtime.consumer import EventConsumer
from lotse_runtime.db import Database
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.kafka import MAX_RECORD_BYTES, KafkaConfig
from lotse_runtime.migrations import create_schema
from lotse_runtime.settings import ServiceSettings
from lotse_runtime.telemetry import TelemetryConfig, setup_telemetry
from lotse_tooling import acls
from sqlmodel import select

from tests.runtime.consumer_harness import (
    DLQ,
    VISITS,
    Harness,
    ProbeEffect,
    group,
    record_of,
    scheduled,
)
from tests.support import eventually, read_topic

pytestmark = pytest.mark.integration


@pytest.fixture
async def small(sqlite_url: str, kafka: KafkaConfig, topics: str) -> AsyncIterator[Harness]:
    """The consumer harness on SQLite only: record sizes do not depend on the database."""
    db = Database(sqlite_url)
    await create_schema(db, [ProbeEffect])
    h = Harness(db, kafka, topics)
    yield h
    for consumer in h.consumers:
        await consumer.stop()
    await db.dispose()


@pytest.fixture
async def both(database_url: str, kafka: KafkaConfig, topics: str) -> AsyncIterator[Harness]:
    db = Database(database_url)
    await create_schema(db, [ProbeEffect])
    h = Harness(db, kafka, topics)
    yield h
    for consumer in h.consumers:
        await consumer.stop()
    await db.dispose()


def produce_large(bootstrap: str, topic: str, value: bytes, headers: list[tuple[str, bytes]],
                  key: bytes) -> None:  # fmt: skip
    """A foreign producer allowed larger records than the platform (the embedded broker keeps
    them; Apache Kafka would refuse them above the topic's max.message.bytes)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "message.max.bytes": 8 * 1024 * 1024}
    )
    producer.produce(topic, value=value, key=key, headers=list(headers))
    assert producer.flush(30) == 0


async def test_a_record_of_1_mib_and_one_over_the_limit_are_dead_lettered_by_reference(
    small: Harness,
) -> None:
    consumer = small.consumer(group())
    await consumer.start()
    case = str(uuid.uuid4())
    _value, headers, key = record_of(scheduled(case_id=case))
    assert key is not None
    sizes = [1024 * 1024, MAX_RECORD_BYTES + 1]
    values = [b'{"x":"' + b"a" * (size - 8) + b'"}' for size in sizes]
    for value in values:
        produce_large(small.kafka.bootstrap, small.prefix + VISITS, value, headers, key)
    # The next event of the same family, on the same partition, is applied.
    after = small.send(scheduled(case_id=case))
    await eventually(lambda: consumer.dead_lettered == 2 and consumer.processed == 1, 30)
    assert [effect.event_id for effect in await small.effects()] == [after]

    letters = await read_topic(small.kafka.bootstrap, small.prefix + DLQ, 2)
    assert len(letters) == 2
    offsets = sorted(int(letter.header("lotse_dlq_offset") or -1) for letter in letters)
    assert offsets[1] == offsets[0] + 1
    for letter, value in zip(
        sorted(letters, key=lambda r: int(r.header("lotse_dlq_offset") or -1)), values, strict=True
    ):
        assert letter.value is None
        assert letter.header("lotse_dlq_value") == "reference"
        assert letter.header("lotse_dlq_size") == str(len(value))
        assert letter.header("lotse_dlq_sha256") == hashlib.sha256(value).hexdigest()
        assert letter.header("lotse_dlq_topic") == small.prefix + VISITS
        assert letter.header("lotse_dlq_partition") is not None
        assert "exceeds the limit" in (letter.header("lotse_dlq_reason") or "")
        assert letter.header("lotse_dlq_stage") == "envelope"
        assert letter.header("ce_id") == dict(headers)["ce_id"].decode()  # headers kept
        assert letter.key == key


async def test_a_dead_letter_that_fits_carries_the_whole_value(small: Harness) -> None:
    consumer = small.consumer(group(), max_event_bytes=1024)
    await consumer.start()
    value, headers, key = record_of(scheduled())
    assert value is not None
    big = value[:-1] + b', "padding": "' + b"p" * 2000 + b'"}'
    produce_large(small.kafka.bootstrap, small.prefix + VISITS, big, headers, key or b"")
    await eventually(lambda: consumer.dead_lettered == 1)
    [letter] = await read_topic(small.kafka.bootstrap, small.prefix + DLQ, 1)
    assert letter.value == big
    assert letter.header("lotse_dlq_value") == "original"
    assert letter.header("lotse_dlq_sha256") == hashlib.sha256(big).hexdigest()


async def test_a_conflicting_duplicate_is_dead_lettered_and_counted(both: Harness) -> None:
    telemetry = setup_telemetry(TelemetryConfig(service_name="t", in_memory=True))
    consumer = both.consumer(group())
    consumer.telemetry = telemetry
    await consumer.start()
    case = str(uuid.uuid4())
    first = scheduled(case_id=case)
    event_id = both.send(first)
    await eventually(lambda: consumer.processed == 1)
    # Same source and id: other data, then the same data again (a plain redelivery), then
    # a new event; all in one fetch (the batch path), and then once more one by one.
    both.send(scheduled(case_id=case), event_id=event_id)
    both.send(first, event_id=event_id)
    last = both.send(scheduled(case_id=case))
    await eventually(lambda: consumer.processed == 2 and consumer.dead_lettered == 1)
    assert (consumer.conflicts, consumer.duplicates) == (1, 1)
    assert [e.event_id for e in await both.effects()] == [event_id, last]

    [letter] = await read_topic(both.kafka.bootstrap, both.prefix + DLQ, 1)
    assert letter.header("lotse_dlq_reason") == "conflicting duplicate"
    assert letter.header("lotse_dlq_stage") == "duplicate"
    assert letter.header("ce_id") == event_id
    assert letter.header("lotse_dlq_value") == "original"

    # What is stored is unchanged: the inbox still holds the first event's fingerprint.
    async with both.db.transaction() as session:
        entries = list(
            (await session.execute(select(InboxEntry).where(InboxEntry.event_id == event_id)))
            .scalars()
        )  # fmt: skip
    assert len(entries) == 1
    assert entries[0].data_sha256 == inbox.fingerprint(first.to_cloudevent(event_id=event_id))

    assert telemetry.metric_reader is not None
    data = telemetry.metric_reader.get_metrics_data()
    assert data is not None
    counted: dict[str, int] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", 0)
                    counted[metric.name] = counted.get(metric.name, 0) + int(value)
    assert counted["lotse.events.conflicting_duplicates"] == 1
    assert counted["lotse.events.dead_lettered"] == 1
    telemetry.shutdown()


async def test_a_partition_that_does_not_advance_is_reported(small: Harness) -> None:
    consumer: EventConsumer = small.consumer(group())
    await consumer.start()
    await consumer.wait_assigned()
    await asyncio.sleep(0.5)
    assert consumer.stalled(0.0) == []  # idle, nothing pending: not stalled
    small.slow_s = 3.0  # a handler that hangs (asking a service that does not answer, say)
    small.send(scheduled())
    found = await eventually(lambda: consumer.stalled(0.5), 10)
    assert len(found) == 1
    assert found[0].startswith(small.prefix + VISITS + "[")
    assert "stuck at offset 0" in found[0]
    await eventually(lambda: consumer.processed == 1, 15)
    await eventually(lambda: consumer.stalled(0.5) == [], 5)


async def test_size_limits_are_set_together() -> None:
    settings = ServiceSettings()
    assert settings.kafka_max_record_bytes == MAX_RECORD_BYTES
    config = KafkaConfig(bootstrap="127.0.0.1:9", max_record_bytes=2 * MAX_RECORD_BYTES)
    producer_options = config.producer()
    consumer_options = config.consumer("t", group_id="g")
    assert producer_options._max_request_size == 2 * MAX_RECORD_BYTES
    assert consumer_options._max_partition_fetch_bytes == 2 * MAX_RECORD_BYTES
    with pytest.raises(ValueError, match="max_event_bytes"):
        ServiceSettings(kafka_max_record_bytes=256 * 1024)
    # The topic plan (Strimzi, compose) states the same limit for the topics.
    plan = acls.load_topic_plan(Path(__file__).parents[2] / "deploy" / "topics.toml")
    assert plan.max_message_bytes == MAX_RECORD_BYTES
    registry = load_registry(load_city("dortmund"))
    assert {t.config["max.message.bytes"] for t in acls.planned_topics(registry, plan)} == {
        MAX_RECORD_BYTES
    }
