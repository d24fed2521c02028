"""`lotse up` — the README's first command — brings every service up on embedded defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_lotse_up_starts_broker_and_every_service(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("LOTSE_") and k != "DATABASE_URL"
    }
    env["LOTSE_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lotse_tooling.cli", "up", "--exit-when-ready"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "embedded Tansu" in output
    for service in ("intake", "visits", "referrals", "reporting"):
        assert f"ready:     {service}" in output, output
        assert (tmp_path / f"{service}.db").exists()  # its own SQLite database
    assert "Lotse is up" in output
