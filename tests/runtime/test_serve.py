"""The service launcher (``python -m lotse_runtime.serve``): serves an app factory as uvicorn
does, with its one-second tick, and stops on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lotse_tooling.embedded import free_port

FACTORY = """
def create_app():
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"built by the factory"})
    return app
"""


def _get(url: str, deadline: float) -> tuple[bytes, dict[str, str]]:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.read(), dict(answer.headers)
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the launcher did not serve in time"
            time.sleep(0.1)


def test_serves_the_factory_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "probe_app.py").write_text(FACTORY)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    process = subprocess.Popen(
        [sys.executable, "-m", "lotse_runtime.serve", "probe_app:create_app", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        body, headers = _get(f"http://127.0.0.1:{port}/", time.monotonic() + 60)
        assert body == b"built by the factory"
        # The Date header comes from the server's tick (once a second here).
        assert headers.get("date", "").endswith("GMT")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # A graceful stop: the shutdown ran to its end, then uvicorn re-raises the signal it
    # caught (as under ``python -m uvicorn``), so the process ends by that signal.
    assert b"Finished server process" in output, output.decode(errors="replace")
    assert process.returncode in (0, -signal.SIGTERM), output.decode(errors="replace")
