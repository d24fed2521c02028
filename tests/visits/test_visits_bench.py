"""The year benchmark (bench/visits_year.py) still runs: a tiny year, on the test broker."""

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


def test_the_year_benchmark_runs_on_a_tiny_year(broker: Broker, tmp_path: Path) -> None:
    output = tmp_path / "visits_year.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "visits_year.py"),
        *("--births", "12", "--move-ins", "4", "--paced", "3", "--rate", "50"),
        *("--output", str(output)),
    ]
    env = {**os.environ, "LOTSE_KAFKA_BOOTSTRAP": broker.bootstrap}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=150)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    result = json.loads(output.read_text())
    assert result["families"] == 16
    assert result["burst"]["families_per_s"] > 0
    assert result["raw_aiokafka"]["produce_consume_per_s"] > 0
    assert result["paced"]["families"] == 3
    checks = result["checks"]
    assert checks["families_with_one_visit"] == 16 + 3
    assert (checks["families_with_more"], checks["families_without"]) == (0, 0)
    assert (checks["double_bookings"], checks["outside_working_times"]) == (0, 0)
    assert json.loads(done.stdout) == result
