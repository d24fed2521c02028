"""Kafka clients and topic provisioning, configured for what every Kafka-protocol broker does.

Producers use acks=all and no idempotence or transactions: the embedded broker lacks both,
and exactly-once effects come from the outbox and the inbox instead.

Record size: one limit, :attr:`KafkaConfig.max_record_bytes` (setting
``kafka_max_record_bytes``), is the producer's ``max_request_size``, the topics'
``max.message.bytes`` and the consumer's ``max_partition_fetch_bytes`` alike, so that what one
side may write the others accept and can read. ``deploy/topics.toml`` states the same number
for topics that Strimzi or the compose step create.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2
from lotse_contracts import topics as topic_names
from lotse_contracts.subscriptions import SubscriptionRegistry

_log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 1024 * 1024
"""Default largest record (key, value and headers) the platform writes, stores and reads: the
producer's ``max_request_size``, the topics' ``max.message.bytes`` and the consumer's
``max_partition_fetch_bytes``. Apache Kafka's own default is about the same (1 MiB)."""

FETCH_MAX_BYTES = 50 * 1024 * 1024
"""aiokafka's default for a whole fetch response; raised to the record limit if that is larger."""


@functools.lru_cache(maxsize=16_384)
def _murmur2(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


def key_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """The partition aiokafka's (and the Java client's) default partitioner picks, with the
    keys' hashes remembered: its murmur2 is pure Python (~10 µs a key here), and a service
    writes the same keys again and again (a family's events, reporting's cells)."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[_murmur2(key) % len(all_partitions)]


@dataclass(frozen=True)
class KafkaConfig:
    """Connection settings shared by every client of one service."""

    bootstrap: str
    client_id: str = "lotse"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    request_timeout_ms: int = 15_000
    max_record_bytes: int = MAX_RECORD_BYTES
    fetch_max_wait_ms: int = 100
    """How long the broker may hold a fetch; a broker may hold it even when data arrives
    (the embedded one does, for part of the wait): a short wait keeps each consumer hop fast,
    a long one saves idle fetches."""
    fetch_max_wait_idle_ms: int = 500
    """The fetch wait of a consumer that has had nothing for a while (``EventConsumer``
    switches back on the first record). Each idle fetch costs the service CPU; Apache Kafka
    answers a waiting fetch as soon as data arrives, so there a long wait costs no latency,
    while the embedded broker holds it for part of the wait (~100 ms at 500 ms): the first
    event after a quiet spell pays that once."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def producer(self, **overrides: Any) -> AIOKafkaProducer:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            "acks": "all",
            "enable_idempotence": False,
            "linger_ms": 2,
            "partitioner": key_partitioner,
            "max_request_size": self.max_record_bytes,
            "request_timeout_ms": self.request_timeout_ms,
            **self.extra,
            **overrides,
        }
        return AIOKafkaProducer(**options)

    def consumer(self, *topics: str, group_id: str, **overrides: Any) -> AIOKafkaConsumer:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            "group_id": group_id,
            "enable_auto_commit": False,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            # A record of the limit's size must fit one partition's share of a fetch (Apache
            # Kafka returns a larger first batch anyway; older brokers would cut it off).
            "max_partition_fetch_bytes": self.max_record_bytes,
            "fetch_max_bytes": max(FETCH_MAX_BYTES, self.max_record_bytes),
            "auto_offset_reset": "earliest",
            # aiokafka's fetch routine also wakes when this runs out with nothing to do; it is
            # woken anyway by fetch answers, consumption, assignment changes and metadata, so
            # the default 200 ms only cost an idle group five wake-ups a second (idle.py: the
            # four services 1.13 -> 0.80 % of one core, first-event probes unchanged).
            "consumer_timeout_ms": 2000,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "request_timeout_ms": max(self.request_timeout_ms, self.session_timeout_ms + 5000),
            **self.extra,
            **overrides,
        }
        return AIOKafkaConsumer(*topics, **options)

    def admin(self) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            request_timeout_ms=self.request_timeout_ms,
            **self.extra,
        )


class TopicCreationError(RuntimeError):
    """The broker refused to create a topic."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int = 1
    config: Mapping[str, str] = field(default_factory=dict)


def platform_topics(
    registry: SubscriptionRegistry | None,
    *,
    prefix: str = "",
    partitions: int = 3,
    replication: int = 1,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> list[TopicSpec]:
    """Every topic the platform uses: domain, reporting, dead letters and audience feeds."""
    compacted = {"cleanup.policy": "compact"}
    names: dict[str, Mapping[str, str]] = {t: {} for t in topic_names.DOMAIN_TOPICS}
    names[topic_names.REPORTING_KPIS] = compacted
    for service in topic_names.SERVICES:
        names[topic_names.dead_letter(service)] = {}
    if registry is not None:
        for name in registry.topics():
            names.setdefault(name, {})
    size = {"max.message.bytes": str(max_record_bytes)}
    return [
        TopicSpec(prefix + name, partitions, replication, {**config, **size})
        for name, config in sorted(names.items())
    ]


async def ensure_topics(config: KafkaConfig, specs: Iterable[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.

    Topics are created explicitly because auto-created ones get whatever partition count
    the broker defaults to (odd ones on the embedded broker).
    """
    wanted = {spec.name: spec for spec in specs}
    admin = config.admin()
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for name, spec in wanted.items() if name not in existing]
        if not missing:
            return []
        new = [
            NewTopic(
                name=spec.name,
                num_partitions=spec.partitions,
                replication_factor=spec.replication,
                topic_configs=dict(spec.config),
            )
            for spec in missing
        ]
        response = await admin.create_topics(new)
        problems = []
        for error in response.topic_errors:
            name, code = error[0], error[1]
            # 36 = TOPIC_ALREADY_EXISTS: another service created it at the same moment.
            if code not in (0, 36):
                message = error[2] if len(error) > 2 and error[2] else f"error code {code}"
                problems.append(f"{name}: {message}")
        if problems:
            raise TopicCreationError("cannot create topics: " + "; ".join(problems))
        created = [spec.name for spec in missing]
        _log.info("created topics", extra={"topics": created})
        await _wait_for_metadata(admin, set(created))
        return created
    finally:
        await admin.close()


async def _wait_for_metadata(admin: AIOKafkaAdminClient, names: set[str]) -> None:
    for _ in range(50):
        if names <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.1)


@dataclass
class TopicReport:
    """What :func:`verify_topics` found: topics missing, created, or of the wrong shape."""

    missing: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    wrong_partitions: list[tuple[str, int, int]] = field(default_factory=list)
    """(topic, expected, found) partition counts."""

    @property
    def problems(self) -> list[str]:
        """One line per problem that remains (created topics are fixed, not a problem)."""
        lines = [f"topic {name} is missing" for name in self.missing]
        lines.extend(
            f"topic {name} has {found} partitions, expected {expected}"
            for name, expected, found in self.wrong_partitions
        )
        return lines


async def verify_topics(
    config: KafkaConfig, specs: Iterable[TopicSpec], *, create: bool
) -> TopicReport:
    """Check that every topic exists with its partition count; create missing ones if allowed.

    A topic with another partition count than planned is never changed (partitions cannot be
    removed, and adding some would move families' keys to other partitions): it is reported,
    and readiness fails until an operator fixes it. A broker that auto-creates a topic on
    first use (with its default partition count) shows up here.
    """
    wanted = {spec.name: spec for spec in specs}
    report = TopicReport()
    admin = config.admin()
    await admin.start()
    try:
        found = await _partition_counts(admin, list(wanted))
    finally:
        await admin.close()
    missing = [name for name in wanted if name not in found]
    for name, count in sorted(found.items()):
        expected = wanted[name].partitions
        if count != expected:
            report.wrong_partitions.append((name, expected, count))
    if missing and create:
        report.created = await ensure_topics(config, [wanted[name] for name in missing])
        missing = [name for name in missing if name not in report.created]
        if report.created:
            _log.warning("re-created missing topics", extra={"topics": report.created})
    report.missing = sorted(missing)
    if report.problems:
        _log.error("topics not as planned", extra={"problems": report.problems})
    return report


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partitions per existing topic among ``names`` (one metadata request)."""
    existing = set(await admin.list_topics())
    present = [name for name in names if name in existing]
    if not present:
        return {}
    counts: dict[str, int] = {}
    for description in await admin.describe_topics(present):
        if description.get("error_code", 0) != 0:
            continue
        counts[description["topic"]] = len(description.get("partitions") or [])
    return counts
