"""Sending a replay's outbox rows in large producer batches.

A replay publishes tens of thousands of ``kpi-updated`` events at once. The runtime's relay
sends them one ``aiokafka`` call each (its partitioner hashes every key in Python), which
costs more than the whole replay before it. :func:`send_unsent` does the relay's job for this
one burst with confluent-kafka (librdkafka batches and hashes in C), under the relay's rules:

* only rows already **committed** to the outbox are sent (the replay's transaction, with the
  ``reporting_kpi`` rows recording them as published, has committed before), in id order;
* ``acks=all``, and a row is marked sent only after the broker acknowledged it; the rows
  from the first one that failed on stay unsent, for the relay (``replay`` drains it next,
  and the service's relay would find them too): at-least-once with a stable CloudEvents id;
* keys go to the partition aiokafka's default partitioner picks (``murmur2_random`` is
  librdkafka's name for the same Java-compatible murmur2), so a cell's later updates from the
  live relay land on the same partition of the compacted topic.

Where the Kafka settings carry client options (``LOTSE_KAFKA_*`` extras: TLS, SASL), which
are written for aiokafka, nothing is sent here and the relay does it all.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import Table, select, update

_OUTBOX: Table = OutboxMessage.__table__  # type: ignore[attr-defined]

#: Rows read, sent and marked per round (bounds the memory of a very large publication).
ROWS_PER_ROUND = 50_000


def can_send(kafka: KafkaConfig) -> bool:
    """Whether :func:`send_unsent` may send with these settings (plain connections only)."""
    return not kafka.extra


async def send_unsent(db: Database, kafka: KafkaConfig) -> int:
    """Send every committed, unsent outbox row in id order; returns how many were sent."""
    sent = 0
    while True:
        async with db.autocommit() as conn:
            rows = (
                await conn.execute(
                    select(
                        _OUTBOX.c.id,
                        _OUTBOX.c.topic,
                        _OUTBOX.c.record_key,
                        _OUTBOX.c.value,
                        _OUTBOX.c.headers,
                    )
                    .where(_OUTBOX.c.sent_at.is_(None))
                    .order_by(_OUTBOX.c.id)
                    .limit(ROWS_PER_ROUND)
                )
            ).all()
        if not rows:
            return sent
        records = [(row.id, row.topic, row.record_key, row.value, row.headers) for row in rows]
        delivered = await asyncio.to_thread(_produce, kafka, records)
        if delivered:
            first, last = records[0][0], records[delivered - 1][0]
            async with db.autocommit() as conn:
                await conn.execute(
                    update(_OUTBOX)
                    .where(_OUTBOX.c.id.between(first, last), _OUTBOX.c.sent_at.is_(None))
                    .values(sent_at=datetime.now(UTC))
                )
        sent += delivered
        if delivered < len(records):
            return sent  # the rest is the relay's, in order


Row = tuple[int, str, str | None, bytes | None, str]
"""id, topic, key, value, headers (JSON) of an outbox row."""


def _produce(kafka: KafkaConfig, records: list[Row]) -> int:
    """Produce the records and wait for the broker; how many leading ones it acknowledged."""
    producer = Producer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "client.id": f"{kafka.client_id}-replay",
            "acks": "all",
            "partitioner": "murmur2_random",
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 200_000,
        }
    )
    acked = [False] * len(records)

    def done(position: int) -> Any:
        def report(error: KafkaError | None, _message: Message) -> None:
            acked[position] = error is None

        return report

    for position, (_id, topic, key, value, headers) in enumerate(records):
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=key.encode() if key is not None else None,
                    # librdkafka writes a str value as its UTF-8 bytes itself.
                    headers=[tuple(pair) for pair in json.loads(headers)],
                    on_delivery=done(position),
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)
    # Rows after the first one not acknowledged (failed, or not in time) stay unsent.
    return next((i for i, ok in enumerate(acked) if not ok), len(records))
