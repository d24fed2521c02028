"""``lotse broker`` and ``lotse up`` stop their embedded broker on SIGTERM and on SIGINT:
afterwards the port is free and no Tansu process is left (it used to outlive a SIGTERM with
parent PID 1, and the next start on that port failed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lotse_tooling.embedded import free_port

pytestmark = pytest.mark.integration


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


def tansu_of(process: subprocess.Popen[bytes]) -> int:
    found: list[int] = []

    def started() -> bool:
        found[:] = [
            pid for pid in children(process.pid) if "tansu" in _cmdline(pid) or "broker" in
            _cmdline(pid)
        ]  # fmt: skip
        return bool(found)

    wait_until(started, 20, "the broker process did not appear")
    return found[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_lotse_broker_stops_its_broker(signum: int) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lotse_tooling.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: answers(port), 20, "the broker did not answer")
        broker = tansu_of(process)
        process.send_signal(signum)
        assert process.wait(15) == 0
        wait_until(lambda: not alive(broker), 5, "the broker process is still alive")
        assert not answers(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_lotse_up_stops_broker_and_services_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOTSE_")}
    env.pop("DATABASE_URL", None)
    env.update(LOTSE_DATA_DIR=str(tmp_path), LOTSE_LOG_LEVEL="WARNING")
    # One service is enough: what matters is what stops with the command.
    process = subprocess.Popen(
        [sys.executable, "-m", "lotse_tooling.cli", "up", "reporting", "--ready-timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**env, "LOTSE_REPORTING_HTTP_PORT": str(port)},
    )
    try:
        broker = tansu_of(process)
        wait_until(lambda: answers(port), 60, "the service did not listen")
        started = children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, 130)
        for pid in started:
            wait_until(lambda pid=pid: not alive(pid), 10, f"process {_cmdline(pid)} is alive")
        assert not alive(broker)
        assert not answers(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
