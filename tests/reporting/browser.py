"""A real headless browser for the dashboard tests: Debian's chromium, driven over the Chrome
DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages separated by NUL on
file descriptors 3 and 4), so no WebSocket client or browser download is needed."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
ENSURE = Path(__file__).resolve().parents[2] / "scripts" / "ensure-chromium.sh"

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]


def find_chromium() -> tuple[Path | None, str]:
    """The browser, installing it with scripts/ensure-chromium.sh if missing; else why not."""
    if CHROMIUM.exists():
        return CHROMIUM, ""
    try:
        done = subprocess.run(
            ["sh", str(ENSURE)], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{ENSURE.name} failed: {exc}"
    if CHROMIUM.exists():
        return CHROMIUM, ""
    return None, f"{ENSURE.name} could not install chromium: {done.stderr.strip()[-400:]}"


class CdpError(RuntimeError):
    pass


class Chromium:
    """One headless chromium with one page; ``evaluate`` runs JavaScript in it."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self._profile = tempfile.mkdtemp(prefix="lotse-chromium-")
        self._process: subprocess.Popen[bytes] | None = None
        self._next_id = 0
        self._responses: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._session: str | None = None
        self._reader: threading.Thread | None = None
        self.console: list[str] = []

    def __enter__(self) -> Chromium:
        # The browser reads commands on fd 3 and answers on fd 4; keep our ends away from
        # those numbers so dup2 in the child cannot clobber them.
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire_pipes() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self._process = subprocess.Popen(
            [str(self.binary), *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=wire_pipes,  # only dup2 before exec; no locks involved
        )
        os.close(child_in)
        os.close(child_out)
        self._write = os.fdopen(to_browser_w, "wb", buffering=0)
        self._read = os.fdopen(from_browser_r, "rb", buffering=0)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attach = {"targetId": target["targetId"], "flatten": True}
        attached = self.send("Target.attachToTarget", attach, session=False)
        self._session = attached["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", session=False, timeout_s=5)
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        with contextlib.suppress(OSError):
            self._write.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read_loop(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self._read.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if message.get("method") == "Runtime.consoleAPICalled":
                    args = message["params"].get("args", [])
                    self.console.append(" ".join(str(a.get("value", "")) for a in args))
                if "id" in message:
                    with self._cond:
                        self._responses[message["id"]] = message
                        self._cond.notify_all()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = True,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        with self._cond:
            self._next_id += 1
            command_id = self._next_id
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if session and self._session is not None:
            message["sessionId"] = self._session
        self._write.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while command_id not in self._responses:
                left = deadline - time.monotonic()
                if left <= 0 or (self._process is not None and self._process.poll() is not None):
                    raise CdpError(f"no answer to {method}")
                self._cond.wait(min(left, 0.2))
            answer = self._responses.pop(command_id)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        """Poll a JavaScript expression until it is truthy."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(CdpError):
                last = self.evaluate(expression)
                if last:
                    return last
            time.sleep(0.1)
        raise AssertionError(f"{expression} stayed {last!r} for {timeout_s} s")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
