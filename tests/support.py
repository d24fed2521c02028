"""Helpers shared by tests: waiting for conditions and reading topics with an independent
Kafka client (confluent-kafka, not the aiokafka the platform itself uses)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from lotse_runtime.auth import DEV_ISSUER, DevelopmentIssuer

# One token issuer for the whole test run. `install_test_issuer` (called by conftest before any
# test) points every service at its JWKS through the environment, so apps built by tests verify
# real bearer tokens exactly as in production; `bearer` signs them.
TEST_ISSUER_KEY_ENV = "LOTSE_TEST_ISSUER_KEY"


def install_test_issuer() -> Path:
    """Create the run's issuer key and JWKS file and configure services to trust them.

    Idempotent: pytest-xdist workers inherit the controller's environment and reuse its key."""
    if os.environ.get(TEST_ISSUER_KEY_ENV) and os.environ.get("LOTSE_AUTH_JWKS"):
        return Path(os.environ["LOTSE_AUTH_JWKS"])
    folder = Path(tempfile.mkdtemp(prefix="lotse-test-issuer-"))
    issuer = DevelopmentIssuer(folder / "issuer-key.pem")
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    os.environ[TEST_ISSUER_KEY_ENV] = str(issuer.key_file)
    os.environ["LOTSE_AUTH_JWKS"] = str(jwks)
    os.environ["LOTSE_AUTH_ISSUER"] = DEV_ISSUER
    return jwks


@functools.cache
def run_issuer() -> DevelopmentIssuer:
    key = os.environ.get(TEST_ISSUER_KEY_ENV)
    if key is None:
        raise RuntimeError("install_test_issuer() has not run (tests/conftest.py calls it)")
    return DevelopmentIssuer(Path(key))


def bearer(
    role: str,
    *,
    subject: str | None = None,
    bezirk: str | None = None,
    traeger: str | None = None,
    clinic: str | None = None,
) -> dict[str, str]:
    """HTTP headers carrying a valid token of the run's test issuer for this caller."""
    token = run_issuer().token(
        role=role,
        subject=subject or f"test-{role}",
        bezirk=bezirk,
        traeger=traeger,
        clinic=clinic,
    )
    return {"Authorization": f"Bearer {token}"}


async def eventually(
    predicate: Callable[[], Any | Awaitable[Any]], timeout_s: float = 20.0, interval_s: float = 0.05
) -> Any:
    """Await ``predicate()`` (sync or async) until truthy; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode()
        return None


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return [(str(k), v) for k, v in pairs if isinstance(v, bytes)]


def _read(bootstrap: str, topic: str, count: int, timeout_s: float) -> list[Record]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 300,
        }
    )
    consumer.subscribe([topic])
    records: list[Record] = []
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            records.append(
                Record(
                    topic=message.topic() or topic,
                    partition=message.partition() or 0,
                    offset=message.offset() or 0,
                    key=message.key(),
                    value=message.value(),
                    headers=_headers(message.headers()),
                )
            )
    finally:
        consumer.close()
    return records


async def read_topic(
    bootstrap: str, topic: str, count: int, timeout_s: float = 30.0, settle_s: float = 0.0
) -> list[Record]:
    """Read at least ``count`` records from the start of ``topic`` (fewer on timeout).

    ``settle_s`` keeps reading a little after ``count`` arrived, to catch extras.
    """
    records = await asyncio.to_thread(_read, bootstrap, topic, count, timeout_s)
    if settle_s:
        more = await asyncio.to_thread(_read, bootstrap, topic, count + 10_000, settle_s + 2)
        records = more if len(more) > len(records) else records
    return records


def produce(
    bootstrap: str,
    topic: str,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None = None,
    key: bytes | None = None,
) -> None:
    """Write one raw record, as a foreign or faulty producer would."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    producer.produce(topic, value=value, key=key, headers=list(headers or []))
    if producer.flush(15) != 0:
        raise RuntimeError(f"could not produce to {topic}")


class SentStatements(list[str]):
    """The SQL of each statement sent (whitespace collapsed), with ``parameters`` beside."""

    def __init__(self) -> None:
        super().__init__()
        self.parameters: list[Any] = []


@contextmanager
def statements_sent(engine: Any) -> Iterator[SentStatements]:
    """Every statement ``engine`` (a synchronous Engine) sends inside the block."""
    from sqlalchemy import event

    seen = SentStatements()

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        seen.append(" ".join(str(statement).split()))
        seen.parameters.append(parameters)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
