"""bench/delivery.py still runs: smallest sizes, on the test broker. The assertions are about
what the results say (everything arrived, verified, once), never about how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Broker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_the_delivery_benchmark_runs_in_its_tiny_size(broker: Broker, tmp_path: Path) -> None:
    results = tmp_path / "delivery.json"
    command = [sys.executable, str(ROOT / "bench" / "delivery.py")]
    command += ["--events", "3", "--subscribers", "4", "--raw-events", "200"]
    command += ["--timeout", "120", "--results", str(results)]
    env = {**os.environ, "LOTSE_KAFKA_BOOTSTRAP": broker.bootstrap}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=280)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report = json.loads(results.read_text())
    assert report["deliveries"] == report["expected"] == 12
    assert report["every_subscriber_got_every_event"] is True
    assert report["receiver"] == {"rejected": 0, "duplicates": 0}
    assert report["deliveries_per_s"] > 0
    assert report["raw_consume_per_s"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
