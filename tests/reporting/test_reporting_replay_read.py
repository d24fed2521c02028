"""The replay reads the domain topics with confluent-kafka where it may (plain connections)
and with aiokafka otherwise: both readers must hand over the same records, every partition's
in its order, and stop once caught up."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import pytest
from lotse_contracts.topics import DOMAIN_TOPICS
from lotse_reporting.replay import read_from_start
from lotse_runtime.kafka import KafkaConfig

from tests.conftest import Broker
from tests.hardening.test_poison import poison_for
from tests.reporting.builders import Published, at, publish, random_city, to_records

pytestmark = pytest.mark.integration

Seen = tuple[str, int, int, bytes | None, tuple[tuple[str, bytes | None], ...]]


def _records(prefix: str) -> list[Published]:
    rng = random.Random(4)
    records = to_records(random_city(rng, 40, ["hoerde", "eving"], at("2025-02-03").date()), prefix)
    for topic in DOMAIN_TOPICS:
        for bad in poison_for(topic, 3, rng):
            if bad.kind != "oversized":
                records.append(Published(prefix + topic, bad.key, bad.value, bad.headers))
    return records


async def _read(bootstrap: str, prefix: str, confluent: bool) -> tuple[list[Seen], int]:
    seen: list[Seen] = []

    def handle(records: list[Any]) -> None:
        for r in records:
            headers = tuple((name, value) for name, value in r.headers or ())
            seen.append((r.topic, r.partition, r.offset, r.value, headers))

    read = await read_from_start(
        KafkaConfig(bootstrap=bootstrap),
        [prefix + topic for topic in DOMAIN_TOPICS],
        handle,
        batch_size=50,
        idle_timeout_s=10.0,
        confluent=confluent,
    )
    return seen, read


def test_both_readers_hand_over_every_record_in_partition_order(
    broker: Broker, topics: str
) -> None:
    records = _records(topics)
    publish(broker.bootstrap, records)
    by_client = {}
    for confluent in (True, False):
        seen, read = asyncio.run(_read(broker.bootstrap, topics, confluent))
        assert read == len(seen) == len(records)
        offsets: dict[tuple[str, int], list[int]] = defaultdict(list)
        for topic, partition, offset, *_ in seen:
            offsets[(topic, partition)].append(offset)
        for found in offsets.values():
            assert found == sorted(found)
            assert found[0] == 0
        by_client[confluent] = sorted(seen, key=lambda s: (s[0], s[1], s[2]))
    assert by_client[True] == by_client[False]
    assert {(r.topic, r.value) for r in records} == {(s[0], s[3]) for s in by_client[True]}
