"""Fixtures of the reporting tests: a running reporting service on the real broker and
database, and waiting until it has applied and published everything."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from anyio.from_thread import BlockingPortal
from fastapi.testclient import TestClient
from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import load_registry
from lotse_reporting import store
from lotse_reporting.app import create_app
from lotse_reporting.operations import Reporting
from lotse_reporting.settings import ReportingSettings
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.kafka import KafkaConfig, ensure_topics, platform_topics
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import func, select
from sqlmodel import col

from tests.conftest import Broker

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float = 60.0, what: str = "") -> T:
    """Poll ``predicate`` (sync) until truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or predicate}")
        time.sleep(0.05)


def create_topics(broker: Broker) -> str:
    """A fresh prefix with every platform topic created (for module-scoped fixtures)."""
    prefix = f"r{uuid.uuid4().hex[:10]}."
    kafka = KafkaConfig(bootstrap=broker.bootstrap, client_id="lotse-test")
    registry = load_registry(load_city("dortmund"))
    asyncio.run(ensure_topics(kafka, platform_topics(registry, prefix=prefix, partitions=2)))
    return prefix


def settings_for(broker: Broker, prefix: str, database_url: str, **extra: Any) -> ReportingSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap": broker.bootstrap,
        "database_url": database_url,
        "topic_prefix": prefix,
        "create_topics": False,
        "consumer_session_timeout_ms": 2000,
        "consumer_heartbeat_interval_ms": 300,
        "relay_poll_interval_s": 0.05,
        "publish_interval_s": 0.2,
        "dashboard_poll_s": 0.2,
        "consumer_backoff_s": 0.05,
    }
    return ReportingSettings(**{**values, **extra})


def runtime_of(client: TestClient) -> ServiceRuntime[Any]:
    runtime: ServiceRuntime[Any] = client.app.state.runtime  # type: ignore[attr-defined]
    return runtime


def reporting_of(client: TestClient) -> Reporting:
    reporting: Reporting = client.app.state.reporting  # type: ignore[attr-defined]
    return reporting


def portal_of(client: TestClient) -> BlockingPortal:
    """The event loop the app runs in (only while the client's context is open)."""
    assert client.portal is not None, "use the TestClient as a context manager"
    return client.portal


def wait_ready(client: TestClient) -> None:
    wait_until(lambda: client.get("/readyz").status_code == 200, what="service ready")
    consumer = runtime_of(client).consumers[0]
    portal_of(client).call(consumer.wait_assigned, 30.0)


def handled(client: TestClient) -> int:
    """Records the live consumer has finished with, whatever the outcome."""
    c = runtime_of(client).consumers[0]
    return c.processed + c.dead_lettered + c.duplicates + c.skipped


def settle(client: TestClient, records: int, timeout_s: float = 60.0) -> None:
    """Wait until ``records`` records are handled, their figures published and relayed."""
    wait_until(lambda: handled(client) >= records, timeout_s, f"{records} records handled")
    runtime = runtime_of(client)

    async def quiet() -> bool:
        async with runtime.db.transaction() as session:
            dirty = await store.dirty_years(session)
            unsent = await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(col(OutboxMessage.sent_at).is_(None))
            )
        return not dirty and not unsent

    portal = portal_of(client)
    wait_until(lambda: portal.call(quiet), timeout_s, "figures published and relayed")


@pytest.fixture
def running(broker: Broker, topics: str, sqlite_url: str) -> Iterator[TestClient]:
    """A reporting service on fresh topics and a fresh SQLite database, ready."""
    app = create_app(settings_for(broker, topics, sqlite_url))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def sqlite_file(tmp_path: Path, name: str = "reporting.db") -> str:
    return f"sqlite+aiosqlite:///{tmp_path / name}"
