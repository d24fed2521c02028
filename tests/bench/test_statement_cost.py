"""bench/statement_cost.py still runs and its figures are what its table claims.

The smallest size; the assertions are about the results file's shape and what each figure
is compared with, never about how fast a layer was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PostgresServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_statement_cost_measures_every_layer_on_both_databases(
    postgres_server: PostgresServer | None, tmp_path: Path
) -> None:
    if postgres_server is None:
        pytest.skip("no PostgreSQL server")
    output = tmp_path / "statement_cost.json"
    command = [sys.executable, str(ROOT / "bench" / "statement_cost.py"), "--calls", "40"]
    command += ["--postgres-url", postgres_server.admin_url, "--output", str(output)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=170)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    assert "orm get" in done.stdout.decode()  # the human table

    document = json.loads(output.read_text())
    assert document["calls_per_layer"] == 40
    results = document["results"]
    assert set(results) == {"sqlite", "postgresql"}
    for figures in results.values():
        assert len(figures) == 12
        assert figures["transaction, rows at commit in 3 tables"]["us_per_statement"] > 0
        for name, figure in figures.items():
            assert figure["us_per_statement"] > 0, name
        for base in ("read: driver", "insert: driver", "transaction of one read: driver"):
            assert figures[base]["x_driver"] == 1.0
        # Each layer is divided by its own kind's driver figure.
        read = figures["read: orm get"]
        expected = read["us_per_statement"] / figures["read: driver"]["us_per_statement"]
        assert read["x_driver"] == pytest.approx(expected, abs=0.06)
