"""Two delivery instances on one PostgreSQL database and one real receiver on loopback:
row leases keep them from posting the same event twice, and each case's events arrive in
order whichever instance posts them."""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from lotse_delivery.app import create_app
from lotse_delivery.settings import DeliverySettings
from lotse_delivery.worker import DeliveryWorker
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.testing import InProcessFeed, without_broker

from tests.delivery.helpers import TRAEGER, Scripted, receiver_running, referral
from tests.support import bearer

pytestmark = pytest.mark.integration

REQUESTED = "de.lotse.referrals.referral-requested.v1"


class Counting(Scripted):
    """The example receiver, counting every POST per webhook-id (duplicates included) and
    taking a moment per request, so that the two instances' rounds overlap."""

    def __init__(self) -> None:
        super().__init__([])
        self.posts: dict[str, int] = {}
        self.post_lock = threading.Lock()

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        msg_id = {k.lower(): v for k, v in headers.items()}.get("webhook-id", "")
        with self.post_lock:
            self.posts[msg_id] = self.posts.get(msg_id, 0) + 1
        time.sleep(0.01)
        return super().handle(headers, body)


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Instance:
    runtime: ServiceRuntime[DeliverySettings]
    worker: DeliveryWorker
    client: httpx.AsyncClient


@asynccontextmanager
async def two_instances(
    postgres_url: str, tmp_path: Path, clock: Clock | None = None, **values: Any
) -> AsyncIterator[tuple[Instance, Instance]]:
    """Two apps on the same database and secrets key, as two replicas of one deployment."""
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    async with AsyncExitStack() as stack:
        instances = []
        for name in ("a", "b"):
            app = create_app(
                DeliverySettings(
                    database_url=postgres_url,
                    data_dir=tmp_path / name,
                    sink_policy="development",
                    deliver_interval_s=3600,  # the test ticks itself
                    deliver_timeout_s=2.0,
                    deliver_batch=2,
                    retry_base_s=0.05,
                    retry_max_s=0.2,
                    secret_key=key,
                    **values,
                ),
                clock=clock,
            )
            runtime = await stack.enter_async_context(without_broker(app))
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
            )
            instances.append(Instance(runtime, app.state.delivery_worker, client))
        yield instances[0], instances[1]


async def subscribe(instance: Instance, sink: str) -> dict[str, Any]:
    response = await instance.client.post(
        "/subscriptions",
        json={"sink": sink, "types": [REQUESTED]},
        headers=bearer("traeger", traeger=TRAEGER),
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def run_both(a: Instance, b: Instance, until: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        await asyncio.gather(a.worker.tick(), b.worker.tick())
        await asyncio.gather(a.worker.drain(), b.worker.drain())
        await asyncio.sleep(0.01)


async def test_two_instances_post_each_event_once_and_each_case_in_order(
    postgres_url: str, tmp_path: Path
) -> None:
    receiver = Counting()
    async with two_instances(postgres_url, tmp_path) as (a, b):
        with receiver_running(receiver) as sink:
            created = await subscribe(a, sink)
            receiver.secrets = [created["secret"]]
            cases = [f"0b1f7c3e-5d2a-4e8f-9a61-7c2e4d9b0a{n:02d}" for n in range(8)]
            sent = []
            feed = InProcessFeed(a.runtime, "main")
            for _ in range(4):  # interleaved: every case gets an event per pass
                for case in cases:
                    event = referral(case_id=case)
                    assert await feed.send(event) == "ok"
                    sent.append(event)
            await run_both(a, b, lambda: len(receiver.events) >= len(sent))
    assert receiver.rejected == 0
    assert len(receiver.events) == len(sent)
    # No event was posted twice (no lease lapsed here), none is missing.
    assert sorted(receiver.posts.values()) == [1] * len(sent)
    assert receiver.duplicates == 0
    # Each case's events in the order they happened, whichever instance posted them.
    for case in cases:
        got = [e["data"]["referral_id"] for e in receiver.events if e["subject"] == case]
        assert got == [e.referral_id for e in sent if e.case_id == case], case
    # Both instances did deliver: the leases shared the work, not one lock serialising it.
    assert a.worker.delivered > 0
    assert b.worker.delivered > 0
    assert a.worker.delivered + b.worker.delivered == len(sent)


async def test_an_instance_that_dies_holding_leases_delays_its_events_until_they_lapse(
    postgres_url: str, tmp_path: Path
) -> None:
    receiver = Counting()
    clock = Clock(datetime.now(UTC))  # the receiver checks webhook-timestamp against its own
    async with two_instances(postgres_url, tmp_path, clock=clock, lease_s=60) as (a, b):
        with receiver_running(receiver) as sink:
            created = await subscribe(a, sink)
            receiver.secrets = [created["secret"]]
            feed = InProcessFeed(a.runtime, "main")
            first, second = referral(), referral()
            assert first.case_id == second.case_id
            for event in (first, second):
                assert await feed.send(event) == "ok"
            # Instance a claims the head of the case and dies before posting it.
            sub, claimed = await a.worker._claim(created["id"])
            assert sub is not None
            assert [row.cloudevent["data"]["referral_id"] for row in claimed] == [first.referral_id]
            # While the lease holds, b posts nothing of that case (not even the second
            # event: it would overtake the first).
            await b.worker.tick()
            await b.worker.drain()
            assert receiver.posts == {}
            # Once the lease has lapsed, b delivers both, in order.
            clock.now += timedelta(seconds=61)
            await run_both(b, b, lambda: len(receiver.events) >= 2, timeout_s=30)
    assert [e["data"]["referral_id"] for e in receiver.events] == [
        first.referral_id,
        second.referral_id,
    ]
    assert sorted(receiver.posts.values()) == [1, 1]


async def test_a_round_stops_before_an_attempt_that_could_outlast_its_lease(
    postgres_url: str, tmp_path: Path
) -> None:
    receiver = Counting()
    clock = Clock(datetime.now(UTC))  # the receiver checks webhook-timestamp against its own
    async with two_instances(postgres_url, tmp_path, clock=clock, lease_s=5) as (a, b):
        with receiver_running(receiver) as sink:
            created = await subscribe(a, sink)
            receiver.secrets = [created["secret"]]
            feed = InProcessFeed(a.runtime, "main")
            event = referral()
            assert await feed.send(event) == "ok"
            sub, claimed = await a.worker._claim(created["id"])
            assert sub is not None
            [row] = claimed
            # 3.5 s into a 5 s lease an attempt of up to 2 s could end after it: not started.
            clock.now += timedelta(seconds=3.5)
            assert not a.worker._lease_lasts(row)
            clock.now -= timedelta(seconds=3.5)
            assert a.worker._lease_lasts(row)
            await a.worker._release(claimed)
            # Released, it is anyone's again.
            await run_both(b, b, lambda: len(receiver.events) >= 1, timeout_s=30)
    assert list(receiver.posts.values()) == [1]


async def test_a_round_that_died_leaves_no_lease_its_own_instance_waits_for(
    postgres_url: str, tmp_path: Path
) -> None:
    receiver = Counting()
    clock = Clock(datetime.now(UTC))
    async with two_instances(postgres_url, tmp_path, clock=clock, lease_s=60) as (a, b):
        with receiver_running(receiver) as sink:
            created = await subscribe(a, sink)
            receiver.secrets = [created["secret"]]
            assert await InProcessFeed(a.runtime, "main").send(referral()) == "ok"
            # A round of a claims and dies (no release: a database error, say).
            sub, claimed = await a.worker._claim(created["id"])
            assert sub is not None
            assert len(claimed) == 1
            # The other instance respects the lease; a's next round takes it up at once.
            await b.worker.tick()
            await b.worker.drain()
            assert receiver.posts == {}
            await run_both(a, a, lambda: len(receiver.events) >= 1, timeout_s=30)
    assert list(receiver.posts.values()) == [1]
