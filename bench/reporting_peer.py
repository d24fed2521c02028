"""The reference peers of bench/reporting_replay.py, on the same records and broker.

- :func:`raw_confluent`: confluent-kafka reads every record of the domain topics from the
  beginning and does nothing with it (the second client's ceiling).
- :func:`plain_aggregation`: the plain-Python peer a team would write by hand: confluent-kafka,
  ``json.loads`` of each record, a dict of counts per (event type, Stadtbezirk, month), and
  one SQLite transaction writing the counts at the end. No validation, no inbox, no
  anonymity rules, no corrections: the floor of what a replay costs in Python.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


def _consumer(bootstrap: str, topics: Sequence[str]) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-peer",  # required by the client; nothing is committed
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
        }
    )
    metadata = consumer.list_topics(timeout=10)
    partitions = [
        TopicPartition(topic, p, OFFSET_BEGINNING)
        for topic in topics
        for p in sorted(metadata.topics[topic].partitions)
    ]
    consumer.assign(partitions)
    return consumer


def _read(bootstrap: str, topics: Sequence[str], n: int, each: Callable[[Any], None]) -> float:
    """Seconds from the first record to the n-th, calling ``each`` per record."""
    consumer = _consumer(bootstrap, topics)
    try:
        seen = 0
        started: float | None = None
        while seen < n:
            batch = consumer.consume(num_messages=5000, timeout=1.0)
            if batch and started is None:
                started = time.perf_counter()
            for message in batch:
                if message.error() is None:
                    each(message)
                    seen += 1
        assert started is not None
        return time.perf_counter() - started
    finally:
        consumer.close()


def raw_confluent(bootstrap: str, topics: Sequence[str], n: int) -> float:
    """Seconds confluent-kafka needs to read n records."""
    return _read(bootstrap, topics, n, lambda message: None)


def plain_aggregation(bootstrap: str, topics: Sequence[str], n: int, database: str) -> float:
    """Seconds to read n records, count them per (type, Bezirk, month) and store the counts."""
    counts: Counter[tuple[str, str, str]] = Counter()

    def each(message: Any) -> None:
        headers = dict(message.headers() or ())
        data = json.loads(message.value())
        kind = headers.get("ce_type", b"").decode()
        month = headers.get("ce_time", b"").decode()[:7]
        counts[(kind, str(data.get("bezirk", "")), month)] += 1

    seconds = _read(bootstrap, topics, n, each)
    stored = time.perf_counter()
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS counts (kind TEXT, bezirk TEXT, month TEXT, n INTEGER,"
                " PRIMARY KEY (kind, bezirk, month))"
            )
            connection.executemany(
                "INSERT INTO counts VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET n = n + excluded.n",
                [(*key, value) for key, value in counts.items()],
            )
    finally:
        connection.close()
    return seconds + (time.perf_counter() - stored)
