"""The producers' partitioner: the partition of a key is the default partitioner's, so a
family's events stay in order on one partition whichever client wrote them."""

from __future__ import annotations

import uuid

from aiokafka.partitioner import DefaultPartitioner
from lotse_runtime.kafka import KafkaConfig, key_partitioner


def test_a_key_lands_where_the_default_partitioner_puts_it() -> None:
    keys = [str(uuid.uuid4()).encode() for _ in range(500)]
    keys += [b"", b"x", b"dortmund|2025-03|families_registered|", bytes(range(256))]
    for partitions in (1, 3, 6, 7, 12):
        everyone = list(range(partitions))
        for key in keys * 2:  # the second round comes from the cache
            expected = DefaultPartitioner()(key, everyone, everyone)
            assert key_partitioner(key, everyone, everyone) == expected


def test_a_record_without_key_goes_to_an_available_partition() -> None:
    for _ in range(50):
        assert key_partitioner(None, [0, 1, 2, 3], [2, 3]) in (2, 3)
        assert key_partitioner(None, [0, 1, 2], []) in (0, 1, 2)


async def test_the_services_producers_use_it() -> None:
    producer = KafkaConfig(bootstrap="127.0.0.1:9").producer()
    assert producer._partitioner is key_partitioner
