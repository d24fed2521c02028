"""Services verify their topics: missing ones are re-created where allowed, a wrong partition
count fails readiness naming topic, expected and found counts; the operator command
``lotse republish`` publishes retained outbox rows again after the broker lost its data."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiokafka.admin import NewTopic
from fastapi.testclient import TestClient
from lotse_contracts.events.visits import VisitScheduled
from lotse_runtime.app import create_service_app
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig, platform_topics, verify_topics
from lotse_runtime.migrations import create_schema
from lotse_runtime.outbox import Outbox, OutboxMessage
from lotse_runtime.settings import ServiceSettings
from lotse_tooling import cli
from sqlmodel import select, update

from tests.conftest import Broker
from tests.support import read_topic

pytestmark = pytest.mark.integration

VISITS = "lotse.visits"


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


async def create_topic(kafka: KafkaConfig, name: str, partitions: int) -> None:
    admin = kafka.admin()
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def test_verify_creates_missing_topics_and_reports_a_wrong_partition_count(
    kafka: KafkaConfig,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    specs = platform_topics(None, prefix=prefix, partitions=2)
    await create_topic(kafka, prefix + VISITS, 3)  # as a broker's auto-creation might

    untouched = await verify_topics(kafka, specs, create=False)
    assert untouched.created == []
    assert prefix + "lotse.intake" in untouched.missing
    assert untouched.wrong_partitions == [(prefix + VISITS, 2, 3)]

    report = await verify_topics(kafka, specs, create=True)
    assert sorted(report.created) == sorted(s.name for s in specs if s.name != prefix + VISITS)
    assert report.missing == []
    assert report.problems == [f"topic {prefix + VISITS} has 3 partitions, expected 2"]
    again = await verify_topics(kafka, specs, create=True)
    assert (again.created, again.missing) == ([], [])


def wait_for(client: TestClient, predicate: Any, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = client.get("/readyz").json()
        if predicate(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"readiness not as expected: {body}")
        time.sleep(0.1)


def probe_app(broker: Broker, tmp_path: Path, prefix: str, **settings: Any) -> TestClient:
    values: dict[str, Any] = {
        "kafka_bootstrap": broker.bootstrap,
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
        "data_dir": tmp_path,
        "topic_prefix": prefix,
        "topic_partitions": 2,
        "topic_check_interval_s": 0.3,
        **settings,
    }
    return TestClient(create_service_app(ProbeSettings(**values), title="probe", description=""))


async def test_readiness_names_a_wrong_partition_count(
    broker: Broker, kafka: KafkaConfig, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    await create_topic(kafka, prefix + VISITS, 3)
    with probe_app(broker, tmp_path, prefix) as client:
        body = wait_for(
            client, lambda b: "not checked yet" not in b["checks"].get("topics", "not checked yet")
        )
        assert body["status"] == "not ready"
        assert body["checks"]["topics"] == (
            f"RuntimeError: topic {prefix + VISITS} has 3 partitions, expected 2"
        )
        assert body["checks"]["broker"] == "ok"


async def test_missing_topics_fail_readiness_where_they_may_not_be_created(
    broker: Broker, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    with probe_app(broker, tmp_path, prefix, create_topics=False) as client:
        body = wait_for(client, lambda b: "missing" in b["checks"].get("topics", ""))
        assert body["status"] == "not ready"
        assert f"topic {prefix}lotse" in body["checks"]["topics"]
    # Allowed to create them, the service does, and is ready.
    with probe_app(broker, tmp_path, prefix) as client:
        body = wait_for(client, lambda b: b["status"] == "ready")
        assert body["checks"]["topics"] == "ok"


def scheduled() -> VisitScheduled:
    return VisitScheduled.example().model_copy(
        update={"case_id": str(uuid.uuid4()), "visit_id": str(uuid.uuid4())}
    )


async def test_republish_sends_retained_rows_from_a_point_in_time(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    url = f"sqlite+aiosqlite:///{tmp_path / 'visits.db'}"
    db = Database(url)
    await create_schema(db, [])
    outbox = Outbox(source="/lotse/visits", topic_prefix=prefix)
    ids = []
    async with db.transaction() as session:
        for _ in range(3):
            ids.append(outbox.add(session, scheduled()).id)
    now = datetime.now(UTC)
    async with db.transaction() as session:
        # The first row is older than the point in time; all were sent long ago.
        rows = list((await session.execute(select(OutboxMessage).order_by("id"))).scalars())
        visits_rows = [row for row in rows if row.topic == prefix + VISITS]
        assert len(visits_rows) == 3
        await session.execute(update(OutboxMessage).values(sent_at=now))
        await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.event_id == ids[0])  # type: ignore[arg-type]
            .values(created_at=now - timedelta(hours=2))
        )
    await db.dispose()

    monkeypatch.setenv("LOTSE_VISITS_DATABASE_URL", url)
    monkeypatch.setenv("LOTSE_KAFKA_BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("LOTSE_TOPIC_PREFIX", prefix)
    since = (now - timedelta(hours=1)).isoformat()
    common = ["republish", "--service", "visits", "--since", since, "--topic", VISITS]

    naive = ["republish", "--service", "visits", "--since", "2026-11-24T08:00:00"]
    assert await _run(naive) == 2  # no time-zone offset
    assert await _run(["republish", "--service", "nobody", "--since", since]) == 2
    assert await _run([*common, "--dry-run"]) == 0
    # The broker lost everything: the topics are re-created with their partitions first.
    assert await _run(common) == 0
    records = await read_topic(broker.bootstrap, prefix + VISITS, 2, settle_s=1.0)
    assert sorted(r.header("ce_id") or "" for r in records) == sorted(ids[1:])
    db = Database(url)
    async with db.transaction() as session:
        rows = list((await session.execute(select(OutboxMessage))).scalars())
    await db.dispose()
    assert all(row.sent_at is not None for row in rows)  # nothing stored changed


async def _run(argv: list[str]) -> int:
    import asyncio

    # The command runs its own event loop: give it a thread of its own.
    return await asyncio.to_thread(cli.main, argv)
