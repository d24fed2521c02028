"""`lotse up` — the README's first command — brings every service up on embedded defaults,
tells the tools where (``var/platform.json``: the broker's actual bootstrap and each
service's URL, removed on stop), and each service serves the contract documents its events
name as ``dataschema``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from lotse_tooling import platform_file

pytestmark = pytest.mark.integration

SCHEMA = "de.lotse.intake.family-registered.v1"


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.headers.get("content-type", ""), answer.read()


def test_lotse_up_starts_broker_and_every_service(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("LOTSE_") and k != "DATABASE_URL"
    }
    env["LOTSE_DATA_DIR"] = str(tmp_path)
    log = tmp_path / "up.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lotse_tooling.cli", "up"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        info = None
        while info is None and process.poll() is None and time.monotonic() < deadline:
            info = platform_file.read(tmp_path)
            time.sleep(0.5)
        output = log.read_text(errors="replace")
        assert info is not None, output
        assert info.pid == process.pid
        # The bootstrap is where the broker really listens (9092 may have been taken).
        host, port = info.bootstrap.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            pass
        assert set(info.services) >= {"intake", "visits", "referrals", "reporting"}
        for name, url in info.services.items():
            assert _get(f"{url}/healthz")[0] == 200, name
        # The dataschema of intake's events resolves on intake, as committed.
        status, media, body = _get(f"{info.services['intake']}/contracts/schemas/{SCHEMA}.json")
        assert (status, media) == (200, "application/schema+json")
        committed = Path(__file__).resolve().parents[2] / "contracts" / "schemas"
        assert json.loads(body) == json.loads((committed / f"{SCHEMA}.json").read_text())
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert "embedded Tansu" in output
    for service in ("intake", "visits", "referrals", "reporting"):
        assert f"ready:     {service}" in output, output
        assert (tmp_path / f"{service}.db").exists()  # its own SQLite database
    assert "Lotse is up" in output
    assert str(tmp_path / "platform.json") in output
    # Stopped: the file is gone, so no tool mistakes a dead platform for a running one.
    assert not (tmp_path / "platform.json").exists()
