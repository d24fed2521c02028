"""A Lotse platform on the simulated clock: the embedded broker (or ``LOTSE_KAFKA_BOOTSTRAP``),
the platform's topics, and every installed service as its own process with its own SQLite
database under ``data_dir`` — as ``lotse up`` starts it, except that the services take their
time from the simulator's clock file, so that a year can pass in minutes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType

from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.auth import DevelopmentIssuer
from lotse_runtime.kafka import KafkaConfig, ensure_topics, platform_topics
from lotse_tooling.embedded import EmbeddedBroker, free_port

from lotse_simulator import clock
from lotse_simulator.endpoints import Endpoints

DEFAULT_PORTS = {"intake": 8001, "visits": 8002, "referrals": 8003, "reporting": 8004}


class PlatformError(RuntimeError):
    pass


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class SimulatedPlatform:
    """Start with :meth:`start` (or ``with``); :meth:`stop` ends every process it started."""

    data_dir: Path
    start_at: datetime
    city: str = "dortmund"
    topic_prefix: str = ""
    bootstrap: str | None = None
    default_ports: bool = True
    """Try 8001-8004 first (a taken port is replaced by a free one)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 180.0
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _broker: EmbeddedBroker | None = None

    @property
    def clock_file(self) -> Path:
        return self.data_dir / "sim-clock.txt"

    @property
    def issuer_key(self) -> Path:
        return self.data_dir / "dev-issuer-key.pem"

    def start(self) -> Endpoints:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        clock.advance(self.clock_file, self.start_at)
        bootstrap = self.bootstrap or os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
        if bootstrap is None:
            self._broker = EmbeddedBroker(log_path=self.data_dir / "tansu.log")
            bootstrap = self._broker.start()
        self.bootstrap = bootstrap
        registry = load_registry(load_city(self.city))
        asyncio.run(
            ensure_topics(
                KafkaConfig(bootstrap=bootstrap),
                platform_topics(registry, prefix=self.topic_prefix),
            )
        )
        DevelopmentIssuer(self.issuer_key)  # every service trusts this one local issuer
        services = sorted(ep.name for ep in entry_points(group="lotse.services"))
        ports = {
            name: DEFAULT_PORTS[name]
            if self.default_ports and name in DEFAULT_PORTS and _port_free(DEFAULT_PORTS[name])
            else free_port()
            for name in services
        }
        # The platform's own settings only: an outer test run's auth or database settings
        # must not leak into it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOTSE_")}
        env.pop("DATABASE_URL", None)
        env.update(
            LOTSE_KAFKA_BOOTSTRAP=bootstrap,
            LOTSE_DATA_DIR=str(self.data_dir),
            LOTSE_TOPIC_PREFIX=self.topic_prefix,
            LOTSE_CITY=self.city,
            LOTSE_CONSUMER_SESSION_TIMEOUT_MS="2000",
            LOTSE_CONSUMER_HEARTBEAT_INTERVAL_MS="300",
            LOTSE_LOG_LEVEL="WARNING",
            # The demo's dashboard is watched in a browser, which has no token to present.
            LOTSE_REPORTING_DASHBOARD_PUBLIC="true",
            # The simulated clock runs days in seconds: look for what is overdue (unanswered
            # referrals, wishes nobody placed) often enough to escalate it about on time.
            LOTSE_REFERRALS_ESCALATION_INTERVAL_S="5",
        )
        # Four processes import the same large dependency tree: let them compile it once, into
        # a cache outside the source tree, instead of at every start.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.setdefault(
            "PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "lotse-simulator-pycache")
        )
        env.update(self.extra_env)
        for name in services:
            service_env = dict(env)
            # Events name their schema below the address the service really listens on.
            service_env.setdefault(
                f"LOTSE_{name.upper()}_CONTRACTS_BASE_URL",
                f"http://127.0.0.1:{ports[name]}/contracts",
            )
            if "intake" in ports:
                service_env.setdefault(
                    f"LOTSE_{name.upper()}_KEYRING_URL", f"http://127.0.0.1:{ports['intake']}"
                )
            log = (self.data_dir / f"{name}.log").open("wb")
            self.processes[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lotse_simulator.serve",
                    name,
                    "--port",
                    str(ports[name]),
                    "--clock-file",
                    str(self.clock_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=service_env,
            )
            log.close()
        self._wait_ready(ports)
        return Endpoints(
            intake=f"http://127.0.0.1:{ports['intake']}",
            visits=f"http://127.0.0.1:{ports['visits']}",
            referrals=f"http://127.0.0.1:{ports['referrals']}",
            reporting=f"http://127.0.0.1:{ports['reporting']}",
            bootstrap=bootstrap,
            topic_prefix=self.topic_prefix,
        )

    def _wait_ready(self, ports: dict[str, int]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = dict(ports)
        while pending:
            for name, port in list(pending.items()):
                process = self.processes[name]
                if process.poll() is not None:
                    log = (self.data_dir / f"{name}.log").read_text(errors="replace")
                    raise PlatformError(f"{name} exited ({process.returncode}):\n{log[-2000:]}")
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/readyz", timeout=2
                    ) as answer:
                        if answer.status == 200:
                            del pending[name]
                except (urllib.error.URLError, OSError):
                    pass
            if pending and time.monotonic() > deadline:
                raise PlatformError(f"not ready after {self.ready_timeout_s:.0f} s: {pending}")
            time.sleep(0.5)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.processes.clear()
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def __enter__(self) -> SimulatedPlatform:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
