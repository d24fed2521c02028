"""The visits service on real parts (broker, database) with a clock the test moves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lotse_visits.app import create_app
from lotse_visits.settings import VisitsSettings

from tests.conftest import Broker
from tests.visits.harness import Clock, VisitsService


def _wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"visits service not ready: {response.json()}")
        time.sleep(0.05)


@pytest.fixture
def start_visits(broker: Broker, topics: str) -> Callable[..., Any]:
    """Start the service: ``with start_visits(database_url, **settings) as service: ...``."""

    @contextmanager
    def start(database_url: str, **overrides: Any) -> Iterator[VisitsService]:
        clock = Clock()
        values: dict[str, Any] = {
            "kafka_bootstrap": broker.bootstrap,
            "database_url": database_url,
            "topic_prefix": topics,
            "consumer_session_timeout_ms": 2000,
            "consumer_heartbeat_interval_ms": 300,
            "relay_poll_interval_s": 0.05,
            "consumer_backoff_s": 0.05,
            **overrides,
        }
        app = create_app(VisitsSettings(**values), clock=clock)
        with TestClient(app) as client:
            _wait_ready(client)
            service = VisitsService(client, clock, topics, broker.bootstrap)
            service.run(lambda: service.runtime.consumers[0].wait_assigned())
            yield service

    return start
