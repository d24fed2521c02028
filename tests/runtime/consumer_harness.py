"""The consumer harness shared by the consumer tests: a probe table, events, records and a
harness that builds consumers against the real broker and database."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import Any

from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.visits import VisitScheduled
from lotse_runtime.consumer import Delivery, EventConsumer, EventRejected
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.outbox import Outbox
from sqlalchemy.exc import OperationalError
from sqlmodel import Field, SQLModel, func, select

from tests.support import produce

VISITS = "lotse.visits"
DLQ = "lotse.dlq.visits"


class ProbeEffect(SQLModel, table=True):
    """What the test handler does: one row per applied event."""

    __tablename__ = "test_probe_effect"

    id: int | None = Field(default=None, primary_key=True)
    event_id: str
    visit_id: str


def scheduled(**update: object) -> VisitScheduled:
    values: dict[str, object] = {"case_id": str(uuid.uuid4()), "visit_id": str(uuid.uuid4())}
    values.update(update)
    return VisitScheduled.example().model_copy(update=values)


def record_of(
    event: VisitScheduled, event_id: str | None = None
) -> tuple[bytes | None, list[tuple[str, bytes]], bytes | None]:
    record = to_kafka_binary(event.to_cloudevent(event_id=event_id))
    return record.value, record.headers, record.key


@dataclass
class Harness:
    db: Database
    kafka: KafkaConfig
    prefix: str
    consumers: list[EventConsumer] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)  # visit_id -> failures left
    busy: dict[str, int] = field(default_factory=dict)  # visit_id -> "database is locked" left
    slow_s: float = 0.0  # how long each handler call takes
    rejected: set[str] = field(default_factory=set)

    async def handle(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, VisitScheduled)
        delivery.session.add(ProbeEffect(event_id=delivery.event.id, visit_id=data.visit_id))
        await delivery.session.flush()  # the row exists inside the transaction...
        if data.visit_id in self.rejected:
            raise EventRejected(f"visit {data.visit_id} belongs to nobody here")
        if self.slow_s:
            await asyncio.sleep(self.slow_s)  # e.g. asking another service
        busy = self.busy.get(data.visit_id, 0)
        if busy:
            self.busy[data.visit_id] = busy - 1
            raise OperationalError(
                "INSERT INTO test_probe_effect", {}, sqlite3.OperationalError("database is locked")
            )
        left = self.failures.get(data.visit_id, 0)
        if left:
            self.failures[data.visit_id] = left - 1
            raise ConnectionError("database hiccup")

    def consumer(
        self, group: str, *, max_event_bytes: int = 256 * 1024, max_transaction_s: float = 0.5
    ) -> EventConsumer:
        consumer = EventConsumer(
            name="probe",
            service="visits",
            topics=[self.prefix + VISITS],
            handlers={VisitScheduled.event_type: self.handle},
            db=self.db,
            outbox=Outbox(source="/lotse/visits", topic_prefix=self.prefix),
            kafka=self.kafka,
            group_id=group,
            dead_letter_topic=self.prefix + DLQ,
            max_event_bytes=max_event_bytes,
            max_attempts=3,
            backoff_s=0.01,
            max_transaction_s=max_transaction_s,
        )
        self.consumers.append(consumer)
        return consumer

    def send(self, event: VisitScheduled, event_id: str | None = None) -> str:
        value, headers, key = record_of(event, event_id)
        produce(self.kafka.bootstrap, self.prefix + VISITS, value, headers, key)
        return dict(headers)["ce_id"].decode()

    async def effects(self) -> list[ProbeEffect]:
        async with self.db.transaction() as session:
            return list((await session.execute(select(ProbeEffect))).scalars())

    async def count(self) -> int:
        async with self.db.transaction() as session:
            return int(
                (await session.execute(select(func.count()).select_from(ProbeEffect))).scalar_one()
            )


def group() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"
