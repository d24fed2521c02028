"""The platform benchmarks of bench/run_all.py (pipeline, latency) still run.

Smallest sizes, on the test broker; the assertions are about what the results files say and
that the chain completed, never about how fast it was. The reporting replay is left out
(``--skip-replay``): its fixed costs (a broker and two processes of its own) would double
the test's time, and bench/reporting_replay.py is the existing, separately run benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"intake", "visits", "referrals", "reporting"}
CUTS = {"p50", "p95", "p99", "max", "n"}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.mark.timeout(300)
def test_all_benchmarks_run_side_by_side_in_their_tiny_sizes(
    broker: Broker, tmp_path: Path
) -> None:
    command = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--tiny", "--skip-replay"]
    command += ["--results-dir", str(tmp_path)]
    env = {**os.environ, "LOTSE_KAFKA_BOOTSTRAP": broker.bootstrap}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=280)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    assert "pipeline events/s" in done.stdout.decode()  # the human table

    combined = json.loads((tmp_path / "run_all.json").read_text())
    assert combined["mode"] == "tiny"
    machine = combined["machine"]
    assert _positive(machine["cpus"])
    assert _positive(machine["ram_gb"])
    assert machine["python"].count(".") == 2
    assert combined["broker"] == "external Kafka"  # the test broker, through the variable
    assert combined["database"] == "sqlite"

    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    assert combined["pipeline"] == pipeline
    assert pipeline["complete"] is True
    assert pipeline["families"] == 20
    seen = pipeline["reporting_seen"]
    assert seen["families_registered"] == 20
    assert seen["visits_offered"] == pipeline["welcome_visits"]
    assert seen["referrals_accepted"] == pipeline["handovers"] > 0
    assert pipeline["visits_scheduled_seen"] == pipeline["welcome_visits"]
    assert pipeline["referrals_answered"] == pipeline["handovers"]
    assert pipeline["dead_letters"] == 0
    assert set(pipeline["published_by_service"]) == SERVICES
    for key in ("families_per_s", "events_per_s", "ratio_events_to_raw"):
        assert _positive(pipeline[key]), key
    raw = pipeline["raw_aiokafka"]
    assert raw["messages"] == pipeline["events"]
    assert _positive(raw["messages_per_s"])
    assert set(pipeline["memory"]["peak_rss_mb"]) >= SERVICES
    assert all(_positive(v) for v in pipeline["memory"]["peak_rss_mb"].values())

    latency = json.loads((tmp_path / "latency.json").read_text())
    assert latency["complete"] is True
    assert latency["families"] == round(latency["rate_per_s"] * latency["seconds"])
    cuts = latency["latency_ms"]
    assert set(cuts) == {"http_to_visit_scheduled", "http_to_kpi_updated", "http_call"}
    for name, cut in cuts.items():
        assert set(cut) == CUTS, name
        assert cut["n"] == latency["families"], name
        assert cut["p50"] <= cut["p95"] <= cut["p99"] <= cut["max"], name
    assert set(latency["memory"]["peak_rss_mb"]) >= SERVICES

    assert combined["reporting_replay"] == {"benchmark": "reporting_replay", "error": "skipped"}


@pytest.mark.timeout(240)
def test_the_statement_count_names_each_services_statements_and_their_sites(
    broker: Broker, tmp_path: Path
) -> None:
    output = tmp_path / "statements.json"
    command = [sys.executable, str(ROOT / "bench" / "statements.py"), "--families", "10"]
    command += ["--output", str(output)]
    env = {**os.environ, "LOTSE_KAFKA_BOOTSTRAP": broker.bootstrap}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=220)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(output.read_text())
    assert result["complete"] is True
    assert set(result["statements_per_family"]) == SERVICES
    assert all(_positive(n) for n in result["statements_per_family"].values())
    intake = result["services"]["intake"]
    # Every family is registered once: its row inserted at the commit of the registering
    # request, its duplicate check asked from the use case that registers it.
    inserted = [row for row in intake if row["statement"].startswith("INSERT INTO intake_case")]
    assert sum(row["per_family"] for row in inserted) == 1
    checks = [row for row in intake if "_matching_cases" in row["sites"]]
    assert checks
    assert all("register_family" in row["sites"] for row in checks)
