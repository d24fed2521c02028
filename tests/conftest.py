"""Real infrastructure for the whole test tree.

Broker: ``LOTSE_KAFKA_BOOTSTRAP`` (an existing Kafka) if set; else testcontainers' Kafka if a
Docker engine answers; else the embedded Tansu broker. Database: ``DATABASE_URL`` if set;
else testcontainers' PostgreSQL if Docker answers; else the machine's PostgreSQL on
127.0.0.1:5432 if it answers; SQLite files are always tested as well, being the embedded
default. Every test gets its own topic prefix and its own database, so tests never see each
other's events or rows.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.db import async_url
from lotse_runtime.kafka import KafkaConfig, ensure_topics, platform_topics
from lotse_tooling.embedded import EmbeddedBroker
from sqlalchemy.engine import make_url

from tests.support import install_test_issuer

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"

# Test topics have two partitions (fixture ``topics`` and the helpers alike); services check
# the partition count of their topics and are not ready on another one.
os.environ.setdefault("LOTSE_TOPIC_PARTITIONS", "2")

# Before any test module (or nested conftest) builds tokens or apps: every service verifies
# bearer tokens of the run's own issuer.
install_test_issuer()


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    kind: str  # "external", "testcontainers" or "embedded"

    @property
    def is_apache_kafka(self) -> bool:
        return self.kind in ("external", "testcontainers")


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    external = os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
    if external:
        yield Broker(external, "external")
        return
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield Broker(kafka.get_bootstrap_server(), "testcontainers")
        return
    with EmbeddedBroker() as embedded:
        yield Broker(embedded.bootstrap, "embedded")


@pytest.fixture(autouse=True)
def _skip_kafka_only(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kafka_only"):
        found = request.getfixturevalue("broker")
        if not found.is_apache_kafka:
            pytest.skip("needs Apache Kafka; the embedded broker lacks this feature")


@pytest.fixture
def kafka(broker: Broker) -> KafkaConfig:
    """Client settings tuned for fast group joins in tests."""
    return KafkaConfig(
        bootstrap=broker.bootstrap,
        client_id="lotse-test",
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
    )


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
async def topics(kafka: KafkaConfig, topic_prefix: str) -> str:
    """Create every platform topic under this test's prefix; returns the prefix."""
    registry = load_registry(load_city("dortmund"))
    await ensure_topics(kafka, platform_topics(registry, prefix=topic_prefix, partitions=2))
    return topic_prefix


# -- databases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresServer:
    admin_url: str  # a database we may CREATE DATABASE from
    kind: str


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield PostgresServer(configured, "external")
        return
    if _docker_answers():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield PostgresServer(pg.get_connection_url(), "testcontainers")
        return
    if _port_answers("127.0.0.1", 5432):
        yield PostgresServer(LOCAL_POSTGRES, "local")
        return
    yield None


def _plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _admin_execute(admin_url: str, statement: str) -> None:
    """Run one statement on the admin database, on a thread of its own: fixtures may be set
    up while the test's event loop is already running."""

    async def run() -> None:
        conn = await asyncpg.connect(_plain(admin_url))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer | None) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if postgres_server is None:
        pytest.skip("no PostgreSQL: set DATABASE_URL or run one on 127.0.0.1:5432")
    name = f"lotse_test_{uuid.uuid4().hex[:12]}"
    _admin_execute(postgres_server.admin_url, f'CREATE DATABASE "{name}"')
    yield async_url(make_url(postgres_server.admin_url).set(database=name).render_as_string(False))
    _admin_execute(postgres_server.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each database-backed test runs on both backends Lotse supports."""
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("postgres_url")
    return url
