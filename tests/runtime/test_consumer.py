"""The consumer wrapper against the real broker and both database backends: inbox dedupe,
commit after effect, retries, dead letters for every kind of bad input."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from lotse_contracts.cloudevents import to_kafka_binary, to_structured
from lotse_contracts.events.visits import VisitScheduled
from lotse_runtime.consumer import Delivery
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.migrations import create_schema
from lotse_runtime.telemetry import TelemetryConfig, inject_headers, setup_telemetry
from sqlmodel import func, select

from tests.runtime.consumer_harness import (
    DLQ,
    VISITS,
    Harness,
    ProbeEffect,
    group,
    record_of,
    scheduled,
)
from tests.support import Record, eventually, produce, read_topic

pytestmark = pytest.mark.integration


@pytest.fixture
async def harness(database_url: str, kafka: KafkaConfig, topics: str) -> AsyncIterator[Harness]:
    db = Database(database_url)
    await create_schema(db, [ProbeEffect])
    h = Harness(db, kafka, topics)
    yield h
    for consumer in h.consumers:
        await consumer.stop()
    await db.dispose()


async def test_redelivered_event_has_one_effect(harness: Harness) -> None:
    consumer = harness.consumer(group())
    await consumer.start()
    event = scheduled()
    event_id = str(uuid.uuid4())
    harness.send(event, event_id)
    harness.send(event, event_id)  # the relay re-published after a crash: same source + id
    await eventually(lambda: consumer.processed + consumer.duplicates == 2)
    assert consumer.processed == 1
    assert consumer.duplicates == 1
    assert [e.visit_id for e in await harness.effects()] == [event.visit_id]


async def test_offsets_are_committed_after_the_effect(harness: Harness) -> None:
    name = group()
    first = harness.consumer(name)
    await first.start()
    harness.send(scheduled())
    harness.send(scheduled())
    await eventually(lambda: first.processed == 2)
    await first.stop()

    second = harness.consumer(name)  # same group: resumes after the committed offset
    await second.start()
    later = scheduled()
    harness.send(later)
    await eventually(lambda: second.processed == 1)
    assert second.duplicates == 0
    assert await harness.count() == 3


async def test_transient_failure_is_retried_with_one_effect(harness: Harness) -> None:
    consumer = harness.consumer(group())
    await consumer.start()
    event = scheduled()
    harness.failures[event.visit_id] = 2  # fails twice, succeeds on the third attempt
    harness.send(event)
    await eventually(lambda: consumer.processed == 1)
    assert consumer.dead_lettered == 0
    assert [e.visit_id for e in await harness.effects()] == [event.visit_id]


async def test_a_busy_database_holds_the_partition_instead_of_dead_lettering(
    harness: Harness,
) -> None:
    consumer = harness.consumer(group())  # max_attempts=3
    await consumer.start()
    case_id = str(uuid.uuid4())
    waiting, following = scheduled(case_id=case_id), scheduled(case_id=case_id)
    harness.busy[waiting.visit_id] = 5  # more busy answers than attempts allowed
    harness.send(waiting)
    harness.send(following)
    await eventually(lambda: consumer.processed == 2)
    assert consumer.dead_lettered == 0
    assert harness.busy[waiting.visit_id] == 0
    # (A batch's first try may use up one busy answer before the record-by-record path.)
    assert consumer.held >= 4
    # Held, not skipped: the partition's order is kept.
    assert [e.visit_id for e in await harness.effects()] == [waiting.visit_id, following.visit_id]


async def test_persistent_failure_is_dead_lettered_and_the_partition_moves_on(
    harness: Harness,
) -> None:
    consumer = harness.consumer(group())
    await consumer.start()
    case_id = str(uuid.uuid4())  # same key: same partition, behind the failing event
    failing, following = scheduled(case_id=case_id), scheduled(case_id=case_id)
    harness.failures[failing.visit_id] = 99
    failing_id = harness.send(failing)
    harness.send(following)
    await eventually(lambda: consumer.processed == 1 and consumer.dead_lettered == 1)
    assert [e.visit_id for e in await harness.effects()] == [following.visit_id]
    [dead] = await read_topic(harness.kafka.bootstrap, harness.prefix + DLQ, 1)
    assert dead.header("ce_id") == failing_id  # original headers kept
    assert dead.header("lotse_dlq_stage") == "handler"
    assert dead.header("lotse_dlq_attempts") == "3"
    assert "ConnectionError: database hiccup" in (dead.header("lotse_dlq_reason") or "")
    assert dead.header("lotse_dlq_topic") == harness.prefix + VISITS


def _without(headers: list[tuple[str, bytes]], name: str) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in headers if k != name]


def _replace(headers: list[tuple[str, bytes]], name: str, value: str) -> list[tuple[str, bytes]]:
    return [(k, value.encode() if k == name else v) for k, v in headers]


BadInput = Callable[[], tuple[bytes | None, list[tuple[str, bytes]]]]


def _bad_inputs() -> dict[str, tuple[BadInput, str, str]]:
    """name -> (record factory, expected stage, expected words in the reason)."""

    def bad_json() -> tuple[bytes | None, list[tuple[str, bytes]]]:
        _, headers, _ = record_of(scheduled())
        return b'{"visit_id": ', headers

    def missing_type() -> tuple[bytes | None, list[tuple[str, bytes]]]:
        value, headers, _ = record_of(scheduled())
        return value, _without(headers, "ce_type")

    def unknown_type() -> tuple[bytes | None, list[tuple[str, bytes]]]:
        value, headers, _ = record_of(scheduled())
        return value, _replace(headers, "ce_type", "de.lotse.visits.visit-teleported.v1")

    def unknown_major() -> tuple[bytes | None, list[tuple[str, bytes]]]:
        value, headers, _ = record_of(scheduled())
        return value, _replace(headers, "ce_type", "de.lotse.visits.visit-scheduled.v9")

    def schema_violation() -> tuple[bytes | None, list[tuple[str, bytes]]]:
        _, headers, _ = record_of(scheduled())
        data = scheduled().model_dump(mode="json")
        del data["starts_at"]
        data["ends_at"] = "next tuesday"
        import json

        return json.dumps(data).encode(), headers

    def too_large() -> tuple[bytes | None, list[tuple[str, bytes]]]:
        _, headers, _ = record_of(scheduled())
        return b'{"padding": "' + b"x" * 20_000 + b'"}', headers

    def not_a_cloudevent() -> tuple[bytes | None, list[tuple[str, bytes]]]:
        return b'{"hello": "world"}', []

    return {
        "bad JSON": (bad_json, "envelope", "not valid JSON"),
        "missing ce_type": (missing_type, "envelope", "ce_type"),
        "unknown ce_type": (unknown_type, "type", "visit-teleported.v1' is unknown"),
        "unknown major": (unknown_major, "type", "major version 9 is unknown"),
        "schema violation": (schema_violation, "schema", "starts_at"),
        "too large": (too_large, "envelope", "exceeds the limit of 8192 bytes"),
        "no CloudEvent": (not_a_cloudevent, "envelope", "not a CloudEvent"),
    }


async def test_bad_input_is_dead_lettered_with_reason_and_nothing_stored_changes(
    harness: Harness,
) -> None:
    consumer = harness.consumer(group(), max_event_bytes=8192)
    await consumer.start()
    before = scheduled()
    harness.send(before)
    await eventually(lambda: consumer.processed == 1)
    stored = [(e.id, e.event_id, e.visit_id) for e in await harness.effects()]

    cases = _bad_inputs()
    key = b"one-partition"  # all behind each other, so the last good event proves progress
    for make, _stage, _reason in cases.values():
        value, headers = make()
        produce(harness.kafka.bootstrap, harness.prefix + VISITS, value, headers, key)
    after = scheduled()
    value, headers, _ = record_of(after)
    produce(harness.kafka.bootstrap, harness.prefix + VISITS, value, headers, key)

    await eventually(lambda: consumer.processed == 2)
    assert consumer.dead_lettered == len(cases)
    effects = [(e.id, e.event_id, e.visit_id) for e in await harness.effects()]
    assert effects[:1] == stored  # the stored row is unchanged
    assert [e[2] for e in effects] == [before.visit_id, after.visit_id]

    dead: list[Record] = await read_topic(harness.kafka.bootstrap, harness.prefix + DLQ, len(cases))
    assert len(dead) == len(cases)
    for record, (name, (_make, stage, words)) in zip(dead, cases.items(), strict=True):
        reason = record.header("lotse_dlq_reason") or ""
        assert record.header("lotse_dlq_stage") == stage, (name, reason)
        assert words in reason, (name, reason)
        assert record.key == key


async def test_rejected_event_is_dead_lettered_and_its_effects_rolled_back(
    harness: Harness,
) -> None:
    consumer = harness.consumer(group())
    await consumer.start()
    event = scheduled()
    harness.rejected.add(event.visit_id)
    harness.send(event)
    await eventually(lambda: consumer.dead_lettered == 1)
    assert await harness.count() == 0  # the row flushed before the rejection is gone
    [dead] = await read_topic(harness.kafka.bootstrap, harness.prefix + DLQ, 1)
    assert dead.header("lotse_dlq_stage") == "rejected"
    assert "belongs to nobody here" in (dead.header("lotse_dlq_reason") or "")


async def test_structured_mode_and_unhandled_known_types(harness: Harness) -> None:
    from lotse_contracts.events.visits import VisitMissed

    consumer = harness.consumer(group())
    await consumer.start()
    event = scheduled()
    produce(
        harness.kafka.bootstrap,
        harness.prefix + VISITS,
        to_structured(event.to_cloudevent()),
        [("content-type", b"application/cloudevents+json")],
    )
    # A known event this consumer does not handle is skipped, not dead-lettered.
    record = to_kafka_binary(VisitMissed.example().to_cloudevent())
    produce(harness.kafka.bootstrap, harness.prefix + VISITS, record.value, record.headers)
    await eventually(lambda: consumer.processed == 1 and consumer.skipped == 1)
    assert consumer.dead_lettered == 0


async def test_trace_continues_from_producer_to_consumer(harness: Harness) -> None:
    telemetry = setup_telemetry(TelemetryConfig(service_name="t", in_memory=True))
    consumer = harness.consumer(group())
    consumer.telemetry = telemetry
    await consumer.start()
    with telemetry.tracer.start_as_current_span("request") as span:
        trace_id = span.get_span_context().trace_id
        record = to_kafka_binary(scheduled().to_cloudevent(), extra_headers=inject_headers())
    produce(harness.kafka.bootstrap, harness.prefix + VISITS, record.value, record.headers)
    await eventually(lambda: consumer.processed == 1)
    assert telemetry.span_exporter is not None
    spans = [s for s in telemetry.span_exporter.get_finished_spans() if "process" in s.name]
    assert spans
    assert spans[0].context.trace_id == trace_id
    telemetry.shutdown()


async def test_latency_lag_and_dead_letter_metrics_are_reported(harness: Harness) -> None:
    telemetry = setup_telemetry(TelemetryConfig(service_name="t", in_memory=True))
    consumer = harness.consumer(group())
    consumer.telemetry = telemetry
    await consumer.start()
    harness.send(scheduled())
    produce(harness.kafka.bootstrap, harness.prefix + VISITS, b"{", [("ce_type", b"x")])
    await eventually(lambda: consumer.processed == 1 and consumer.dead_lettered == 1)
    assert telemetry.metric_reader is not None
    data = telemetry.metric_reader.get_metrics_data()
    assert data is not None
    points = {
        metric.name: [dict(p.attributes or {}) for p in metric.data.data_points]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    outcomes = {p["outcome"] for p in points["lotse.handler.duration"]}
    assert {"ok", "dead_lettered"} <= outcomes
    assert points["lotse.events.dead_lettered"] == [{"reason_kind": "envelope"}]
    lag_topics = {p["topic"] for p in points["lotse.consumer.lag"]}
    assert lag_topics == {harness.prefix + VISITS}
    telemetry.shutdown()


async def test_a_batch_with_one_failing_event_falls_back_to_one_by_one(harness: Harness) -> None:
    """Many events arrive together: they are applied in one transaction; when one of them
    fails, the batch is rolled back and applied one by one, so only that one is retried."""
    case_id = str(uuid.uuid4())  # one key: one partition, one batch
    events = [scheduled(case_id=case_id) for _ in range(20)]
    harness.failures[events[7].visit_id] = 1  # fails once, then succeeds
    for event in events:
        harness.send(event)
    consumer = harness.consumer(group())
    await consumer.start()  # started after producing, so the first fetch holds them all
    await eventually(lambda: consumer.processed == 20)
    assert consumer.dead_lettered == 0
    assert consumer.duplicates == 0
    visits = [e.visit_id for e in await harness.effects()]
    assert sorted(visits) == sorted(e.visit_id for e in events)  # each exactly once


async def test_a_long_batch_is_split_so_no_transaction_holds_the_database_long(
    harness: Harness,
) -> None:
    """On SQLite every transaction holds the write lock: a batch of slow handlers is committed
    in parts of about ``max_transaction_s``, each event still applied once and in order."""
    from sqlalchemy import event as sa_event

    commits: list[float] = []
    sa_event.listen(harness.db.engine.sync_engine, "commit", lambda _c: commits.append(1.0))
    harness.slow_s = 0.1
    case_id = str(uuid.uuid4())  # one partition, one batch
    events = [scheduled(case_id=case_id) for _ in range(20)]
    for each in events:
        harness.send(each)
    consumer = harness.consumer(group(), max_transaction_s=0.25)
    await consumer.start()  # started after producing, so the first fetch holds them all
    await eventually(lambda: consumer.processed == 20, timeout_s=30)
    # 20 handlers of at least 0.1 s each, parts of about 0.25 s: several commits, not one.
    assert len(commits) >= 4
    assert consumer.dead_lettered == 0
    assert consumer.duplicates == 0
    assert [e.visit_id for e in await harness.effects()] == [e.visit_id for e in events]


async def test_a_batch_handler_sees_what_the_handlers_before_it_wrote(harness: Harness) -> None:
    """A batch shares one transaction and is flushed once, at commit: a handler's query still
    sees the rows the events before it added (the session flushes before an ORM query), as if
    each event had had a transaction of its own."""
    case_id = str(uuid.uuid4())  # one key: one partition, one batch
    events = [scheduled(case_id=case_id) for _ in range(10)]
    seen: list[int] = []

    async def count_then_add(delivery: Delivery[Any]) -> None:
        session = delivery.session
        seen.append(int(await session.scalar(select(func.count()).select_from(ProbeEffect)) or 0))
        session.add(ProbeEffect(event_id=delivery.event.id, visit_id=delivery.data.visit_id))

    for event in events:
        harness.send(event)
    consumer = harness.consumer(group())
    consumer.handlers[VisitScheduled.event_type] = count_then_add
    await consumer.start()  # started after producing, so the first fetch holds them all
    await eventually(lambda: consumer.processed == 10)
    assert seen == list(range(10))
    assert [e.visit_id for e in await harness.effects()] == [e.visit_id for e in events]


async def test_a_quiet_consumer_fetches_with_the_idle_wait_and_wakes_on_records(
    harness: Harness,
) -> None:
    """Nothing for a while: the fetches wait longer (fewer of them); the next event is applied
    and the short wait is back."""
    consumer = harness.consumer(group())
    consumer.quiet_after_s = 0.5
    await consumer.start()
    fetcher = consumer._consumer._fetcher  # type: ignore[union-attr]
    assert fetcher._fetch_max_wait_ms == harness.kafka.fetch_max_wait_ms
    await eventually(lambda: consumer.quiet)
    assert fetcher._fetch_max_wait_ms == harness.kafka.fetch_max_wait_idle_ms
    event = scheduled()
    harness.send(event)
    await eventually(lambda: consumer.processed == 1)
    assert not consumer.quiet
    assert fetcher._fetch_max_wait_ms == harness.kafka.fetch_max_wait_ms
    assert [e.visit_id for e in await harness.effects()] == [event.visit_id]


async def test_stop_closes_a_consumer_whose_loop_already_failed(harness: Harness) -> None:
    """A loop that ended on an error (aiokafka raises IllegalStateError when a rebalance meets
    shutdown) is reported as `failed`; stopping must not raise it again, and closes the
    clients all the same."""
    consumer = harness.consumer(group())
    await consumer.start()
    loop_task = consumer._task
    assert loop_task is not None
    loop_task.cancel()

    async def failed_loop() -> None:
        raise RuntimeError("partition not assigned")

    consumer._task = asyncio.create_task(failed_loop())
    await asyncio.sleep(0)
    await consumer.stop()
    assert consumer._consumer is None
    assert consumer._producer is None
    assert not consumer.running


async def test_a_rebalance_during_a_batch_does_not_stop_the_consumer(harness: Harness) -> None:
    """A second instance joins the group while the first is still applying a fetch from both
    partitions: one partition moves before the first can commit its offset. The first must
    commit what it still owns and go on (the new owner reads the moved partition from the last
    committed offset, and the inbox drops what was applied already), not stop on aiokafka's
    "partition is not assigned"."""
    name = group()
    first = harness.consumer(name)
    await first.start()
    await first.wait_assigned()
    harness.slow_s = 0.4
    events = [scheduled() for _ in range(12)]
    for event in events:
        harness.send(event)
    # The first has fetched and is inside its (slow) handlers when the second joins.
    await eventually(lambda: len(first._fetched) == 2, timeout_s=20.0)
    second = harness.consumer(name)
    await second.start()
    harness.slow_s = 0.0
    await eventually(lambda: first.processed + second.processed >= len(events), timeout_s=60.0)
    assert first.failed is None
    assert first.running
    # The moved partition was read again by its new owner: what the first had applied came
    # as duplicates (the first's commit left it out), the rest was applied there.
    await eventually(lambda: second.processed + second.duplicates > 0, timeout_s=30.0)
    assert sorted(e.visit_id for e in await harness.effects()) == sorted(e.visit_id for e in events)
    # Both still consume: a later event on either partition is applied once.
    later = [scheduled() for _ in range(6)]
    for event in later:
        harness.send(event)
    await eventually(lambda: _count_is(harness, len(events) + len(later)), timeout_s=30.0)
    assert first.failed is None
    assert second.failed is None


async def _count_is(harness: Harness, expected: int) -> bool:
    return await harness.count() == expected


def _follow_up_probe(
    harness: Harness, followed: list[tuple[str, int]], together: asyncio.Barrier | None
) -> Callable[[Delivery[Any]], Any]:
    """A handler that adds its effect (failing while ``harness.failures`` says so) and
    leaves a follow-up that (waiting for the others at ``together``, if given) counts the
    event's committed effects in a transaction of its own, and writes there."""

    async def add_then_follow(delivery: Delivery[Any]) -> None:
        visit_id = delivery.data.visit_id
        if harness.failures.get(visit_id, 0) > 0:
            harness.failures[visit_id] -= 1
            raise RuntimeError("fails once")
        delivery.session.add(ProbeEffect(event_id=delivery.event.id, visit_id=visit_id))

        async def follow() -> None:
            if together is not None:
                await asyncio.wait_for(together.wait(), timeout=10)
            async with harness.db.transaction() as session:
                committed = await session.scalar(
                    select(func.count())
                    .select_from(ProbeEffect)
                    .where(ProbeEffect.visit_id == visit_id)
                )
                session.add(ProbeEffect(event_id=f"follow-{visit_id}", visit_id=visit_id))
            followed.append((visit_id, int(committed or 0)))

        delivery.after_commit(follow)

    return add_then_follow


async def test_follow_ups_run_after_the_commit_and_those_of_a_batch_together(
    harness: Harness,
) -> None:
    """A handler may leave work for after its transaction (a call to another service): it
    runs once the effects are committed (its own transaction sees them, and can write on
    SQLite, whose only write lock the batch no longer holds), and the follow-ups of one
    batch run at the same time (each here waits until all of them are running)."""
    case_id = str(uuid.uuid4())  # one key: one partition, one batch
    events = [scheduled(case_id=case_id) for _ in range(5)]
    followed: list[tuple[str, int]] = []
    for event in events:
        harness.send(event)
    consumer = harness.consumer(group())
    probe = _follow_up_probe(harness, followed, asyncio.Barrier(len(events)))
    consumer.handlers[VisitScheduled.event_type] = probe
    await consumer.start()  # started after producing, so the first fetch holds them all
    await eventually(lambda: len(followed) == len(events), timeout_s=30)
    assert sorted(followed) == sorted((e.visit_id, 1) for e in events)
    assert consumer.processed == len(events)
    assert consumer.follow_ups_failed == 0


async def test_a_batch_rolled_back_runs_no_follow_up_of_its_own(harness: Harness) -> None:
    """A failing event rolls the batch back: its follow-ups are dropped with it, and the
    one-by-one path that applies the events again runs each event's follow-up once."""
    case_id = str(uuid.uuid4())
    events = [scheduled(case_id=case_id) for _ in range(6)]
    harness.failures[events[4].visit_id] = 1
    followed: list[tuple[str, int]] = []
    for event in events:
        harness.send(event)
    consumer = harness.consumer(group())
    consumer.handlers[VisitScheduled.event_type] = _follow_up_probe(harness, followed, None)
    await consumer.start()
    await eventually(lambda: consumer.processed == len(events), timeout_s=30)
    await eventually(lambda: len(followed) == len(events))
    assert sorted(followed) == sorted((e.visit_id, 1) for e in events)
    assert consumer.follow_ups_failed == 0


async def test_a_failing_follow_up_is_counted_and_the_event_stays_applied(
    harness: Harness,
) -> None:
    event = scheduled()

    async def add_then_fail_later(delivery: Delivery[Any]) -> None:
        delivery.session.add(
            ProbeEffect(event_id=delivery.event.id, visit_id=delivery.data.visit_id)
        )

        async def broken() -> None:
            raise RuntimeError("the other service is away")

        delivery.after_commit(broken)

    harness.send(event)
    consumer = harness.consumer(group())
    consumer.handlers[VisitScheduled.event_type] = add_then_fail_later
    await consumer.start()
    await eventually(lambda: consumer.processed == 1)
    await eventually(lambda: consumer.follow_ups_failed == 1)
    assert consumer.dead_lettered == 0
    assert [e.visit_id for e in await harness.effects()] == [event.visit_id]
