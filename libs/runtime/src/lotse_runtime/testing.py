"""Run a service's event handlers in process: the real database, the runtime's inbox,
transaction and outbox, no broker.

    app = create_app(settings)
    async with without_broker(app) as runtime:
        feed = InProcessFeed(runtime, "intake")
        assert await feed.send(FamilyRegistered(...)) == "ok"
        assert await feed.send(same_event, event_id=the_same_id) == "duplicate"

A record is built exactly as a producer would (CloudEvents binary mode) and goes through the
consumer's own ``process``: envelope parsing, catalogue validation, the inbox claim, the
handler inside its transaction, retries. Dead letters are kept in :attr:`dead_letters`
instead of being produced. The paths through Kafka itself (partitions, offsets, groups,
dead-letter topics) stay with the tests against the embedded broker.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord
from fastapi import FastAPI
from lotse_contracts.cloudevents import CloudEvent, to_kafka_binary
from lotse_contracts.events.base import EventModel

from lotse_runtime.app import ServiceRuntime
from lotse_runtime.consumer import EventConsumer


@asynccontextmanager
async def without_broker(app: FastAPI) -> AsyncIterator[ServiceRuntime[Any]]:
    """Start the app (database schema, the service's own start-up, jobs) but no Kafka."""
    runtime: ServiceRuntime[Any] = app.state.runtime
    runtime.with_broker = False
    async with app.router.lifespan_context(app):
        yield runtime


@dataclass(frozen=True)
class DeadLetter:
    """A record the consumer refused, with the stage and reason it would carry."""

    event_id: str | None
    stage: str
    reason: str


class InProcessFeed:
    """Feeds records to one consumer of a runtime, as if they came from its topics."""

    def __init__(self, runtime: ServiceRuntime[Any], consumer: str) -> None:
        self.consumer: EventConsumer = next(c for c in runtime.consumers if c.name == consumer)
        self.dead_letters: list[DeadLetter] = []
        self._offsets = itertools.count()

        async def keep(
            record: ConsumerRecord[Any, Any], verdict: Any, *, value_known: bool = True
        ) -> None:
            headers = dict(record.headers or ())
            event_id = headers.get("ce_id")
            self.dead_letters.append(
                DeadLetter(
                    event_id=event_id.decode() if event_id else None,
                    stage=verdict.stage,
                    reason=verdict.reason,
                )
            )
            self.consumer.dead_lettered += 1

        # The one seam: where the consumer would produce to its dead-letter topic.
        self.consumer._dead_letter = keep  # type: ignore[method-assign]

    async def send(
        self,
        event: EventModel | CloudEvent,
        *,
        event_id: str | None = None,
        topic: str | None = None,
    ) -> str:
        """Deliver one event; returns the outcome (ok, duplicate, skipped, dead_lettered)."""
        cloudevent = (
            event if isinstance(event, CloudEvent) else event.to_cloudevent(event_id=event_id)
        )
        record = to_kafka_binary(cloudevent)
        default_topic = (
            self._topic_of(event) if isinstance(event, EventModel) else self.consumer.topics[0]
        )
        return await self.send_raw(
            record.value, record.headers, key=record.key, topic=topic or default_topic
        )

    async def send_batch(self, events: Sequence[EventModel]) -> int:
        """Deliver events as one fetch of one partition delivers them: in the consumer's batch
        transaction (its ``prepare`` hook first). Returns how many were applied that way; the
        consumer would take the rest one by one."""
        records = []
        for event in events:
            record = to_kafka_binary(event.to_cloudevent())
            topic = self._topic_of(event)
            records.append(self._record(record.value, record.headers, key=record.key, topic=topic))
        return await self.consumer._apply_batch(records)

    def _topic_of(self, event: EventModel) -> str:
        """The consumer's topic of the event's type (its first topic where none is)."""
        own = type(event).topic
        return next((t for t in self.consumer.topics if t.endswith(own)), self.consumer.topics[0])

    def _record(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        *,
        key: bytes | None,
        topic: str | None,
    ) -> ConsumerRecord[Any, Any]:
        return ConsumerRecord(
            topic=topic or self.consumer.topics[0],
            partition=0,
            offset=next(self._offsets),
            timestamp=int(time.time() * 1000),
            timestamp_type=0,
            key=key,
            value=value,
            checksum=None,
            serialized_key_size=len(key or b""),
            serialized_value_size=len(value or b""),
            headers=list(headers),
        )

    async def send_raw(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        *,
        key: bytes | None = None,
        topic: str | None = None,
    ) -> str:
        """Deliver raw bytes and headers (for malformed input)."""
        return await self.consumer.process(self._record(value, headers, key=key, topic=topic))
