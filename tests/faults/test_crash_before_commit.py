"""A consumer killed after its effect committed but before its Kafka offset did: the event is
delivered again after the restart, and the inbox turns it away — one welcome visit, one
visit-scheduled event, not two.

No hook in the service: the test holds the visits consumer inside its transaction with a
table lock, holds back everything clients send to the broker (a proxy in front of it), lets
the transaction commit, sees the visit in the database, and kills the process before its
offset commit could reach the broker."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import asyncpg
import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from lotse_contracts import topics as topic_names
from lotse_contracts.city import load_city
from lotse_contracts.events.visits import VisitScheduled
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.kafka import KafkaConfig, ensure_topics, platform_topics

from tests.faults.families import babylotse, make_families
from tests.faults.processes import Launcher, ProxiedBroker, build_platform, fetch, plain_url
from tests.support import eventually, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PREFIX = "crash."


def committed_offset(bootstrap: str, group: str, topic: str, partition: int) -> int:
    """The group's committed offset of one partition (negative: none), read without joining."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        [found] = reader.committed([TopicPartition(topic, partition)], timeout=10)
        return int(found.offset)
    finally:
        reader.close()


async def register(client: httpx.AsyncClient, intake_url: str, body: dict[str, object]) -> str:
    response = await client.post(f"{intake_url}/cases", json=body, headers=babylotse())
    assert response.status_code == 201, response.text
    case_id: str = response.json()["case_id"]
    return case_id


async def test_redelivery_after_crash_between_effect_and_offset_commit_has_no_second_effect(
    launcher: Launcher, service_databases: dict[str, str], tmp_path: Path
) -> None:
    families = make_families(random.Random(9), 2)
    for family in families:
        family.body["consents"] = [{"scope": "welcome_visit"}]
    broker = ProxiedBroker(tmp_path)
    await broker.start()
    platform = build_platform(
        launcher,
        bootstrap=broker.bootstrap,
        topic_prefix=PREFIX,
        databases=service_databases,
        data_dir=tmp_path,
        names=["intake", "visits"],
    )
    visits_db = service_databases["visits"]
    lock: asyncpg.Connection | None = None
    try:
        registry = load_registry(load_city("dortmund"))
        await ensure_topics(
            KafkaConfig(bootstrap=broker.bootstrap),
            platform_topics(registry, prefix=PREFIX, partitions=2),
        )
        await platform.start()
        intake_url = platform["intake"].base_url
        async with httpx.AsyncClient(timeout=10) as client:
            # Warm-up: the consumer has joined its group and applies events.
            first = await register(client, intake_url, families[0].body)
            visit_of = "SELECT count(*) FROM visits_visit WHERE case_id = $1"
            await eventually(lambda: _one(visits_db, visit_of, first), timeout_s=30)

            lock = await asyncpg.connect(plain_url(visits_db))
            await lock.execute("BEGIN; LOCK TABLE inbox IN EXCLUSIVE MODE")
            case_id = await register(client, intake_url, families[1].body)
            # The consumer has the event and waits for the lock inside its transaction.
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            await eventually(lambda: _one(visits_db, waiting), timeout_s=30)
            broker.proxy.hold()
            await lock.execute("ROLLBACK")
            await lock.close()
            lock = None
            await eventually(lambda: _one(visits_db, visit_of, case_id), timeout_s=15)
            await asyncio.to_thread(platform["visits"].kill)
            broker.proxy.cut()
            broker.proxy.release()

        [entry] = await fetch(
            visits_db,
            'SELECT topic, partition, "offset" FROM inbox WHERE event_type = $1'
            " ORDER BY processed_at DESC LIMIT 1",
            "de.lotse.intake.family-registered.v1",
        )
        topic: str = entry["topic"]
        partition: int = entry["partition"]
        offset: int = entry["offset"]
        group = f"{PREFIX}lotse-visits-main"
        before = await asyncio.to_thread(
            committed_offset, broker.bootstrap, group, topic, partition
        )
        assert before <= offset, f"offset {before} committed although the process was killed"

        platform["visits"].start()
        await platform["visits"].wait_ready()

        async def redelivered() -> bool:
            now = await asyncio.to_thread(
                committed_offset, broker.bootstrap, group, topic, partition
            )
            return now > offset

        await eventually(redelivered, timeout_s=30)

        assert await _one(visits_db, visit_of, case_id) == 1
        # The redelivered record was turned away by the inbox, not applied a second time.
        applied = 'SELECT count(*) FROM inbox WHERE topic = $1 AND partition = $2 AND "offset" = $3'
        assert await _one(visits_db, applied, topic, partition, offset) == 1
        scheduled = await fetch(
            visits_db,
            "SELECT DISTINCT event_id FROM outbox WHERE record_key = $1 AND event_type = $2"
            " AND topic = $3",
            case_id,
            VisitScheduled.event_type,
            PREFIX + topic_names.VISITS,
        )
        assert len(scheduled) == 1, scheduled
        records = await read_topic(broker.bootstrap, PREFIX + topic_names.VISITS, 2, settle_s=1)
        ids = {
            r.header("ce_id")
            for r in records
            if r.header("ce_subject") == case_id
            and r.header("ce_type") == VisitScheduled.event_type
        }
        assert len(ids) == 1, ids
    except BaseException:
        for service in platform.services.values():
            print(f"--- {service.name} log ---\n{service.tail()}")
        raise
    finally:
        if lock is not None:
            await lock.close()
        await asyncio.to_thread(platform.stop)
        await broker.stop()


async def _one(url: str, query: str, *args: object) -> int:
    [row] = await fetch(url, query, *args)
    value: int = row[0]
    return value
