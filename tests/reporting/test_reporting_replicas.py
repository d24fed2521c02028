"""Two reporting instances in one consumer group on one PostgreSQL database (production runs
two): each applies the partitions it is assigned; publication passes take turns under an
advisory lock and read the shared cells, so every change of a cell is published once, and
the reporting stream ends, per cell, at the figure computed from all facts at once."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lotse_reporting.app import create_app

from tests.conftest import Broker
from tests.reporting.builders import at, publish, random_city, to_records
from tests.reporting.conftest import (
    handled,
    reporting_of,
    settings_for,
    settle,
    wait_ready,
    wait_until,
)
from tests.reporting.test_reporting_domain import figures, run
from tests.support import _read

pytestmark = pytest.mark.integration

BEZIRKE = ["hoerde", "eving", "brackel", "mengede"]


def test_two_replicas_publish_every_change_once_and_end_at_the_truth(
    broker: Broker, topics: str, postgres_url: str
) -> None:
    events = random_city(random.Random(5), 150, BEZIRKE, at("2025-01-06").date())
    records = to_records(events, topics)
    settings = settings_for(broker, topics, postgres_url)
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        wait_ready(one)
        wait_ready(two)
        publish(broker.bootstrap, records)
        wait_until(lambda: handled(one) + handled(two) >= len(records), 120.0, "records handled")
        settle(one, 0, 120.0)
        settle(two, 0, 120.0)
        applied = [client.app.state.runtime.consumers[0].processed for client in (one, two)]  # type: ignore[attr-defined]
        published = reporting_of(one).published + reporting_of(two).published
    # Both instances worked: the group split the partitions between them.
    assert all(applied), applied
    stream = _read(broker.bootstrap, topics + "lotse.reporting.kpis", published, 60.0)
    assert len(stream) == published
    history: dict[str, list[dict[str, Any]]] = {}
    for record in stream:  # one key stays in one partition, in order
        history.setdefault((record.key or b"").decode(), []).append(
            json.loads(record.value or b"{}")
        )
    # No state of a cell was published twice (by the two instances, or by one twice).
    for key, values in history.items():
        states = [(v.get("value"), v["suppressed"]) for v in values]
        assert all(a != b for a, b in itertools.pairwise(states)), key
    # The last value of every cell is the figure computed from all facts at once.
    snapshot = run(events)
    years = {int(key.split("/")[1][:4]) for key in history}
    expected = {
        "/".join(part for part in cell.key if part): (cell.value, cell.suppressed)
        for year in years
        for cell in figures(snapshot, year).values()
    }
    latest = {
        key: (values[-1].get("value"), values[-1]["suppressed"]) for key, values in history.items()
    }
    assert latest == expected
    assert sum(1 for value, hidden in latest.values() if value and not hidden) > 20
