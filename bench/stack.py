"""The whole platform for a benchmark: broker, topics, the four services as processes of their
own (started the way ``lotse up`` starts them), their databases, a token issuer, readers on
topics and a sampler of each process's memory.

Used by ``pipeline.py`` and ``latency.py``; not a benchmark by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil  # type: ignore[import-untyped]
from aiokafka import AIOKafkaConsumer, TopicPartition
from lotse_contracts.city import Municipality, load_city
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.auth import DevelopmentIssuer
from lotse_runtime.db import Database
from lotse_runtime.kafka import KafkaConfig, ensure_topics, platform_topics
from lotse_tooling.embedded import EmbeddedBroker, free_port
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

SERVICES = ("intake", "visits", "referrals", "reporting")
RESULTS_DIR = Path(__file__).parent / "results"
#: A Kafka record as the raw baseline sends it: key, value, headers.
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]
#: The broker's name among the processes measured (not one of the services).
BROKER = "broker (tansu)"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    memory = psutil.virtual_memory()
    return {
        "cpus": os.cpu_count(),
        "ram_gb": round(memory.total / 2**30, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """p50/p95/p99/max of ``values`` (milliseconds), nearest rank; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None

    def rank(p: float) -> float:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
        return round(ordered[index], 1)

    return {
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": round(ordered[-1], 1),
        "n": len(ordered),
    }


@dataclass
class RunningService:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    database_url: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class MemorySampler:
    """Samples the resident set size of named processes in a thread; keeps the peak."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval_s = interval_s
        self.peak_mb: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.first_mb: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        for name, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                rss = process.memory_info().rss / 2**20
                self.first_mb.setdefault(name, rss)
                self.peak_mb[name] = max(self.peak_mb[name], rss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def report(self) -> dict[str, Any]:
        return {
            "peak_rss_mb": {k: round(v, 1) for k, v in self.peak_mb.items()},
            "rss_at_start_mb": {k: round(v, 1) for k, v in self.first_mb.items()},
            "samples": self.samples,
            "interval_s": self.interval_s,
        }


class CpuMeter:
    """CPU time (user + system) each named process used between two snapshots."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._start = self._now()

    def _now(self) -> dict[str, tuple[float, float]]:
        found = {}
        for name, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                found[name] = (float(times.user), float(times.system))
        return found

    def user_and_system(self) -> dict[str, tuple[float, float]]:
        """CPU seconds per process since this meter was made, in user space and in the kernel
        (system calls: sockets, files, waking others), from one reading of each process."""
        now = self._now()
        return {
            name: (now[name][0] - self._start[name][0], now[name][1] - self._start[name][1])
            for name in now
            if name in self._start
        }


class DatabaseServerCpu:
    """The CPU time of the PostgreSQL server processes serving the run's databases, by
    database: on PostgreSQL the statements' server side runs outside the services (on SQLite
    inside them), so it is measured beside them, as the broker is. A server process per
    connection; its title names the database ("postgres: user database host state"). Sampled
    in a thread, so a connection's process that ends before the last reading still counts
    up to its last sample. Only server processes on this machine are seen."""

    def __init__(self, databases: dict[str, str], interval_s: float = 0.5) -> None:
        self.databases = databases  # database name → service name
        self.interval_s = interval_s
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-cpu", daemon=True)
        self._sample(first=True)

    def _sample(self, *, first: bool = False) -> None:
        for process in psutil.process_iter(["name", "cmdline", "create_time"]):
            with contextlib.suppress(psutil.Error):
                if process.info["name"] != "postgres":
                    continue
                words = " ".join(process.info["cmdline"] or ()).split()
                service = next((self.databases[w] for w in words if w in self.databases), None)
                if service is None:
                    continue
                times = process.cpu_times()
                used = float(times.user + times.system)
                key = (process.pid, process.info["create_time"])
                if first:
                    self._first[key] = used
                self._last[key] = (service, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> DatabaseServerCpu:
        self._thread.start()
        return self

    def seconds(self) -> dict[str, float]:
        """CPU seconds by service since the start (stops the sampling)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(5)
            self._sample()
        used: dict[str, float] = {}
        for key, (service, last) in self._last.items():
            used[service] = used.get(service, 0.0) + last - self._first.get(key, 0.0)
        return used


@dataclass
class Stack:
    """Broker, topics and the four services; ``with Stack(...) as stack:``."""

    database: str | None = None
    # Generous: on a machine shared with other work, four services take a while to start.
    ready_timeout_s: float = 300.0
    # Group joins on the embedded broker are slow with the defaults; shorter sessions join
    # faster but rebalance when a starved machine delays heartbeats (the smoke test's choice).
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 500
    keep: bool = False
    #: The services' consumer fetch wait (None: their default); see consumer_fetch_max_wait_ms.
    fetch_max_wait_ms: int | None = None
    #: Referrals' placement job; None: the service's default (15 min).
    placement_interval_s: float | None = 5.0
    #: More of the services' settings, as environment variables (``LOTSE_...`` names, shared
    #: or one service's own), applied last: to try other values than the stack's or the
    #: services' defaults (``--set`` of the benchmarks).
    service_env: dict[str, str] = field(default_factory=dict)
    city: Municipality = field(default_factory=lambda: load_city("dortmund"))
    prefix: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:6]}.")
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lotse-bench-")))
    services: dict[str, RunningService] = field(default_factory=dict)
    bootstrap: str = ""
    broker: EmbeddedBroker | None = None
    issuer: DevelopmentIssuer | None = None
    _pg_databases: list[str] = field(default_factory=list)

    # -- start and stop --------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def broker_name(self) -> str:
        return "external Kafka" if self.broker is None else "embedded Tansu 0.6 (memory storage)"

    @property
    def database_kind(self) -> str:
        return "postgresql" if self.database else "sqlite"

    def start(self) -> None:
        external = os.environ.get("LOTSE_KAFKA_BOOTSTRAP")
        if external:
            self.bootstrap = external
        else:
            self.broker = EmbeddedBroker(log_path=self.data_dir / "tansu.log")
            self.bootstrap = self.broker.start()
        asyncio.run(self._prepare())
        # Every service trusts this key file (they find it in their data dir).
        self.issuer = DevelopmentIssuer(self.data_dir / "dev-issuer-key.pem")
        targets = {ep.name: ep.value for ep in entry_points(group="lotse.services")}
        missing = [name for name in SERVICES if name not in targets]
        if missing:
            raise RuntimeError(f"services not installed: {missing}")
        ports = {name: free_port() for name in SERVICES}
        for name in SERVICES:
            self.services[name] = self._launch(name, targets[name], ports)
        self._wait_ready()

    async def _prepare(self) -> None:
        registry = load_registry(self.city)
        await ensure_topics(self.kafka(), platform_topics(registry, prefix=self.prefix))
        if self.database:
            admin = create_async_engine(
                _async_pg(self.database), isolation_level="AUTOCOMMIT", pool_size=1
            )
            try:
                async with admin.connect() as conn:
                    for name in SERVICES:
                        db = f"{self.prefix.rstrip('.')}_{name}"
                        await conn.execute(text(f'CREATE DATABASE "{db}"'))
                        self._pg_databases.append(db)
            finally:
                await admin.dispose()

    def service_databases(self) -> dict[str, str]:
        """PostgreSQL: each service's database name → the service (empty on SQLite)."""
        if not self.database:
            return {}
        return {f"{self.prefix.rstrip('.')}_{name}": name for name in self.services}

    def database_url(self, name: str) -> str:
        if self.database:
            base = self.database.rsplit("/", 1)[0]
            return f"{base}/{self.prefix.rstrip('.')}_{name}"
        return f"sqlite+aiosqlite:///{self.data_dir / (name + '.db')}"

    def _launch(self, name: str, target: str, ports: dict[str, int]) -> RunningService:
        # Nothing of the caller's LOTSE_* settings leaks in (a test run's issuer, say):
        # the stack is configured completely here, the way `lotse up` configures it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOTSE_")}
        env.pop("DATABASE_URL", None)
        prefix = f"LOTSE_{name.upper()}_"
        env.update(
            {
                "LOTSE_KAFKA_BOOTSTRAP": self.bootstrap,
                "LOTSE_DATA_DIR": str(self.data_dir),
                "LOTSE_TOPIC_PREFIX": self.prefix,
                "LOTSE_CREATE_TOPICS": "false",
                "LOTSE_LOG_LEVEL": "WARNING",
                "LOTSE_CONSUMER_SESSION_TIMEOUT_MS": str(self.session_timeout_ms),
                "LOTSE_CONSUMER_HEARTBEAT_INTERVAL_MS": str(self.heartbeat_interval_ms),
                prefix + "DATABASE_URL": self.database_url(name),
                prefix + "KEYRING_URL": f"http://127.0.0.1:{ports['intake']}",
                prefix + "HTTP_PORT": str(ports[name]),
            }
        )
        if self.placement_interval_s is not None:
            # A handover whose keyring call timed out waits for this job (default 15 min).
            env["LOTSE_REFERRALS_PLACEMENT_INTERVAL_S"] = str(self.placement_interval_s)
        if self.fetch_max_wait_ms is not None:
            env["LOTSE_CONSUMER_FETCH_MAX_WAIT_MS"] = str(self.fetch_max_wait_ms)
        env.update(self.service_env)
        log = self.data_dir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "lotse_runtime.serve",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(ports[name]),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        with log.open("wb") as handle:
            process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.data_dir,
            )
        return RunningService(name, ports[name], process, log, self.database_url(name))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = dict(self.services)
        last: dict[str, str] = {}
        while pending:
            for name, svc in list(pending.items()):
                if svc.process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with status {svc.process.returncode}:\n"
                        + svc.log.read_text(errors="replace")[-3000:]
                    )
                try:
                    with urllib.request.urlopen(f"{svc.base_url}/readyz", timeout=2) as answer:
                        answer.read()
                    del pending[name]
                except urllib.error.HTTPError as exc:
                    last[name] = exc.read().decode(errors="replace")[:500]
                except OSError as exc:
                    last[name] = str(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {self.ready_timeout_s:.0f} s: {last}")
            time.sleep(0.2)

    def stop(self) -> None:
        for svc in self.services.values():
            if svc.process.poll() is None:
                svc.process.terminate()
        for svc in self.services.values():
            try:
                svc.process.wait(15)
            except subprocess.TimeoutExpired:
                svc.process.kill()
                svc.process.wait(5)
        if self.broker is not None:
            self.broker.stop()
        if self._pg_databases and self.database:
            with contextlib.suppress(Exception):
                asyncio.run(self._drop_databases())
        if not self.keep:
            import shutil

            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def _drop_databases(self) -> None:
        assert self.database is not None
        admin = create_async_engine(_async_pg(self.database), isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as conn:
                for db in self._pg_databases:
                    await conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        finally:
            await admin.dispose()

    # -- what benchmarks use ---------------------------------------------------------------

    def kafka(self) -> KafkaConfig:
        return KafkaConfig(
            bootstrap=self.bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=500
        )

    def topic(self, name: str) -> str:
        return self.prefix + name

    def url(self, service: str) -> str:
        return self.services[service].base_url

    def bearer(
        self,
        role: str,
        *,
        subject: str,
        bezirk: str | None = None,
        traeger: str | None = None,
        clinic: str | None = None,
    ) -> dict[str, str]:
        """Headers with a token of the development issuer the services trust."""
        assert self.issuer is not None
        token = self.issuer.token(
            role=role,
            subject=subject,
            bezirk=bezirk,
            traeger=traeger,
            clinic=clinic,
            ttl=timedelta(hours=4),
        )
        return {"Authorization": f"Bearer {token}"}

    def pids(self) -> dict[str, int]:
        found = {name: svc.process.pid for name, svc in self.services.items()}
        if self.broker is not None:
            for child in psutil.Process().children():
                with contextlib.suppress(psutil.Error):
                    if "tansu" in child.name():
                        found[BROKER] = child.pid
        return found

    def service_logs_tail(self, lines: int = 15) -> dict[str, str]:
        return {
            name: "\n".join(svc.log.read_text(errors="replace").splitlines()[-lines:])
            for name, svc in self.services.items()
        }

    async def table_counts(self) -> dict[str, dict[str, Any]]:
        """Per service: events published (outbox rows sent, audience copies included) and
        events applied (inbox rows), with the average size of what was published."""
        counts: dict[str, dict[str, Any]] = {}
        for name, svc in self.services.items():
            db = Database(svc.database_url)
            try:
                async with db.engine.connect() as conn:
                    sent, size = (
                        await conn.execute(
                            text(
                                "SELECT COUNT(*), COALESCE(SUM(LENGTH(value) + LENGTH(headers)), 0)"
                                " FROM outbox WHERE sent_at IS NOT NULL"
                            )
                        )
                    ).one()
                    unsent = (
                        await conn.execute(
                            text("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL")
                        )
                    ).scalar_one()
                    applied = (await conn.execute(text("SELECT COUNT(*) FROM inbox"))).scalar_one()
            finally:
                await db.dispose()
            counts[name] = {
                "published": int(sent),
                "unsent": int(unsent),
                "applied": int(applied),
                "published_bytes": int(size),
            }
        return counts

    async def outbox_records(self) -> list[Record]:
        """Every record the services published (key, value, headers), for the raw baseline."""
        records: list[Record] = []
        for svc in self.services.values():
            db = Database(svc.database_url)
            try:
                async with db.engine.connect() as conn:
                    rows = await conn.execute(
                        text("SELECT record_key, value, headers FROM outbox ORDER BY id")
                    )
                    for key, value, headers in rows:
                        records.append(
                            (
                                key.encode() if key else None,
                                bytes(value) if value is not None else None,
                                [(k, v.encode()) for k, v in json.loads(headers)],
                            )
                        )
            finally:
                await db.dispose()
        return records


def _async_pg(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


# -- reading topics -----------------------------------------------------------------------------


async def assigned_reader(kafka: KafkaConfig, topics: list[str]) -> AIOKafkaConsumer:
    """A consumer on every partition of ``topics`` from the beginning, without a group (no
    join to wait for) and with a short fetch wait: it is a stopwatch, it must not add latency."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    await consumer.topics()
    partitions = [
        TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
    ]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    return consumer


async def dead_letter_reasons(
    kafka: KafkaConfig, topics: list[str], idle_s: float = 1.5
) -> dict[str, int]:
    """How many dead letters ``topics`` hold, per topic, event type, stage and reason (the
    ``lotse_dlq_*`` headers), so a run that dead-letters says why."""
    reader = await assigned_reader(kafka, topics)
    found: dict[str, int] = {}
    try:
        while True:
            batch = await reader.getmany(timeout_ms=int(idle_s * 1000), max_records=5000)
            if not batch:
                return found
            for records in batch.values():
                for record in records:
                    headers = {k: v.decode(errors="replace") for k, v in record.headers or ()}
                    key = " | ".join(
                        (
                            record.topic,
                            headers.get("ce_type", "?"),
                            headers.get("lotse_dlq_stage", "?"),
                            headers.get("lotse_dlq_reason", "?")[:160],
                        )
                    )
                    found[key] = found.get(key, 0) + 1
    finally:
        await reader.stop()


async def count_records(kafka: KafkaConfig, topics: list[str], idle_s: float = 1.5) -> int:
    """How many records ``topics`` hold (read until nothing came for ``idle_s``)."""
    reader = await assigned_reader(kafka, topics)
    seen = 0
    try:
        while True:
            batch = await reader.getmany(timeout_ms=int(idle_s * 1000), max_records=5000)
            if not batch:
                return seen
            seen += sum(len(records) for records in batch.values())
    finally:
        await reader.stop()


async def raw_produce_consume(
    kafka: KafkaConfig,
    topic: str,
    records: list[Record],
) -> dict[str, Any]:
    """Produce ``records`` with plain aiokafka (acks=all) while a plain consumer reads them
    back: what broker and client alone do with the same number and size of messages."""
    reader = await assigned_reader(kafka, [topic])
    producer = kafka.producer()
    await producer.start()
    total = len(records)
    done = asyncio.Event()
    consumed = 0
    finished = 0.0

    async def consume() -> None:
        nonlocal consumed, finished
        while consumed < total:
            batch = await reader.getmany(timeout_ms=200, max_records=5000)
            consumed += sum(len(r) for r in batch.values())
        finished = time.perf_counter()
        done.set()

    reading = asyncio.create_task(consume())
    try:
        started = time.perf_counter()
        pending = []
        for key, value, headers in records:
            pending.append(await producer.send(topic, value=value, key=key, headers=headers))
        await asyncio.gather(*pending)
        acked = time.perf_counter() - started
        await asyncio.wait_for(reading, timeout=600)
    finally:
        reading.cancel()
        await producer.stop()
        await reader.stop()
    seconds = finished - started
    size = sum(len(v or b"") + sum(len(k) + len(h) for k, h in hs) for _, v, hs in records)
    return {
        "messages": total,
        "avg_message_bytes": size // max(1, total),
        "seconds": round(seconds, 3),
        "produce_acked_s": round(acked, 3),
        "messages_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }


def add_settings_option(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--set NAME=VALUE`` (repeatable): a setting for the services."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the services, e.g. CONSUMER_FETCH_MAX_WAIT_IDLE_MS=1000 or "
        "REFERRALS_RELAY_POLL_INTERVAL_S=30 (LOTSE_ is added; repeatable; the stack "
        "otherwise passes none of the caller's LOTSE_ variables on)",
    )


def service_settings(pairs: Iterable[str]) -> dict[str, str]:
    """``--set`` values (``NAME=VALUE``; ``LOTSE_`` is added where missing) as the services'
    environment variables."""
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set wants NAME=VALUE, got {pair!r}")
        name = name.strip().upper()
        found[name if name.startswith("LOTSE_") else "LOTSE_" + name] = value
    return found


def run_on_own_stack(
    benchmark: str,
    measure: Callable[[Stack, Any], Awaitable[dict[str, Any]]],
    args: Any,
    stack_options: dict[str, Any] | None = None,
    **labels: Any,
) -> dict[str, Any]:
    """Run one benchmark on a stack of its own (``--database``, ``--keep``) and label the
    result; service logs are attached when the run did not complete."""
    database = DEFAULT_POSTGRES if args.database == "postgresql" else args.database
    about = machine()
    fetch_wait = getattr(args, "fetch_max_wait_ms", None)
    settings = service_settings(getattr(args, "set", None) or ())
    options = {"fetch_max_wait_ms": fetch_wait, "service_env": settings, **(stack_options or {})}
    with Stack(database=database, keep=args.keep, **options) as stack:
        result = asyncio.run(measure(stack, args))
        if not result["complete"]:
            result["service_logs"] = stack.service_logs_tail()
        broker, kind = stack.broker_name, stack.database_kind
    return {
        "benchmark": benchmark,
        "consumer_fetch_max_wait_ms": fetch_wait or "service default",
        "service_settings": settings,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": about,
        "broker": broker,
        "database": kind,
        **labels,
        **result,
    }
