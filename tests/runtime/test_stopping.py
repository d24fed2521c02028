"""A shutdown never hangs on one step: each is bounded, an overrun is logged and left behind,
and the steps after it still run (lotse_runtime.stopping, used by the lifespan, the
consumers, the relay and the periodic jobs)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiokafka import AIOKafkaConsumer
from fastapi.testclient import TestClient
from lotse_contracts import topics as topic_names
from lotse_runtime import stopping
from lotse_runtime.app import ServiceRuntime, create_service_app
from lotse_runtime.handlers import Handlers
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.settings import ServiceSettings
from lotse_runtime.stopping import cancel_within, within


@pytest.fixture
def short_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stopping, "STEP_TIMEOUT_S", 0.3)


async def _deaf(released: asyncio.Event) -> None:
    """A step that swallows every cancellation (as a client stuck in a retry loop may),
    until the test releases it."""
    while not released.is_set():
        try:
            await released.wait()
        except asyncio.CancelledError:
            continue


async def _never_answers() -> None:
    """A client waiting for an answer that does not come (it ends when cancelled)."""
    await asyncio.Event().wait()


def _abandoned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(r, "step", "")
        for r in caplog.records
        if r.name == "lotse_runtime.stopping" and r.levelno == logging.WARNING
    ]


async def test_a_step_that_never_ends_is_abandoned_and_named(
    short_steps: None, caplog: pytest.LogCaptureFixture
) -> None:
    released = asyncio.Event()
    deaf = asyncio.ensure_future(_deaf(released))
    assert await within(_deaf(released), "probe client") is False
    assert await cancel_within(deaf, "probe task") is False
    assert _abandoned(caplog) == ["probe client", "probe task"]
    assert not deaf.done()  # left behind, not waited for
    released.set()
    await deaf


async def test_a_step_that_ends_or_fails_is_not_abandoned(
    short_steps: None, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> None:
        raise ConnectionError("broker gone")

    async def quick() -> None:
        await asyncio.sleep(0)

    assert await within(quick(), "quick") is True
    assert await within(fails(), "failing") is True  # logged, and the shutdown goes on
    failed = [r for r in caplog.records if getattr(r, "step", None) == "failing"]
    assert failed
    assert failed[0].exc_info is not None

    async def ends_on_cancel() -> None:
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(ends_on_cancel())
    await asyncio.sleep(0)
    assert await cancel_within(task, "polite") is True
    assert task.cancelled()
    assert await cancel_within(None, "never started") is True


async def test_cancelling_the_shutdown_cancels_the_step(short_steps: None) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def step() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    outer = asyncio.ensure_future(within(step(), "step", timeout_s=3600))
    await started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.wait_for(cancelled.wait(), 5)


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


@pytest.mark.integration
def test_the_service_stops_when_its_kafka_consumer_never_leaves_its_group(
    short_steps: None,
    kafka: KafkaConfig,
    topics: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hang seen once in CI: a consumer rejoining its group at shutdown, its aiokafka
    client's stop() waiting without end. The real broker and a real consumer; only stop()
    of the aiokafka consumer is made to hang."""
    settings = ProbeSettings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=topics,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
        consumer_session_timeout_ms=2000,
        consumer_heartbeat_interval_ms=300,
    )

    def wire(runtime: ServiceRuntime[Any]) -> None:
        runtime.add_consumer("main", [topic_names.INTAKE], Handlers())

    app = create_service_app(settings, title="probe", description="", wire=wire)
    runtime: ServiceRuntime[Any] = app.state.runtime
    disposed: list[bool] = []
    dispose = runtime.db.dispose

    async def dispose_and_note() -> None:
        await dispose()
        disposed.append(True)

    monkeypatch.setattr(runtime.db, "dispose", dispose_and_note)
    with TestClient(app) as client:
        assert client.portal is not None
        deadline = time.monotonic() + 30
        while not runtime.consumers and time.monotonic() < deadline:
            time.sleep(0.05)  # the consumers start once the broker is reached
        client.portal.call(runtime.consumers[0].wait_assigned, 30.0)
        monkeypatch.setattr(AIOKafkaConsumer, "stop", lambda self: _never_answers())
    # Leaving the client ran the lifespan's shutdown: it came back, and the steps after the
    # hanging one (the relay, the database pool) ran.
    assert disposed == [True]
    assert any("AIOKafkaConsumer.stop" in step for step in _abandoned(caplog))
