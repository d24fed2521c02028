"""SSRF by DNS rebinding: a sink's name is resolved once per attempt, the answer judged, and
the connection goes to exactly that address (Host and SNI keep the name). A resolver the
test controls stands in for DNS; a real loopback server shows where connections land."""

from __future__ import annotations

import threading
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from lotse_delivery.app import create_app
from lotse_delivery.pinning import pinned, pinned_client
from lotse_delivery.settings import DeliverySettings
from lotse_delivery.tables import DeliverySubscription
from lotse_delivery.worker import DeliveryWorker
from lotse_runtime.testing import InProcessFeed, without_broker

from tests.delivery.helpers import TRAEGER, referral
from tests.support import bearer, eventually

REQUESTED = "de.lotse.referrals.referral-requested.v1"
NAME = "hooks.partner.invalid"  # .invalid: no real DNS answers for it
PUBLIC = "93.184.215.14"


@contextmanager
def host_recorder() -> Iterator[tuple[int, list[str]]]:
    """A plain HTTP server on loopback that records the Host header of every request."""
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hosts.append(self.headers.get("Host", ""))
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hosts
    finally:
        server.shutdown()
        server.server_close()


async def test_a_pinned_connection_reaches_the_pinned_address_with_the_names_host() -> None:
    with host_recorder() as (port, hosts):
        async with pinned_client(5.0) as client:
            with pinned(NAME, "127.0.0.1"):
                answer = await client.post(f"http://{NAME}:{port}/hook", content=b"{}")
            assert answer.status_code == 204
            # Without a pin nothing is resolved behind the check's back: refused.
            with pytest.raises(httpx.ConnectError, match="no checked address pinned"):
                await client.post(f"http://{NAME}:{port}/hook", content=b"{}")
    assert hosts == [f"{NAME}:{port}"]


class Recording(httpcore.AsyncNetworkBackend):
    """Where connections would go; connects nowhere (the public address is not ours)."""

    def __init__(self) -> None:
        self.targets: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.targets.append((host, port))
        raise httpcore.ConnectError("test: not connected")


class Rebinding:
    """A DNS that answers by a script, then the public address; counts the questions."""

    def __init__(self, script: list[list[str]]) -> None:
        self.script = list(script)
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.script.pop(0) if self.script else [PUBLIC]


async def test_a_name_rebound_to_an_internal_address_is_never_connected_to(
    tmp_path: Path,
) -> None:
    # Public when the subscription is made; then loopback, the metadata address, a mix; then
    # public again. A client that resolves again when it connects would follow the second
    # answer; this one connects only to addresses it judged.
    dns = Rebinding(
        [[PUBLIC], ["127.0.0.1"], ["169.254.169.254"], [PUBLIC, "10.0.0.7"], ["fd00:ec2::254"]]
    )
    settings = DeliverySettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'd.db'}",
        data_dir=tmp_path,
        sink_policy="production",
        verify_sinks=False,
        deliver_interval_s=3600,
        retry_base_s=0.001,
        retry_max_s=0.001,
    )
    app = create_app(settings, resolver=dns)
    network = Recording()
    async with without_broker(app) as runtime:
        # The app's own worker ticks once as it starts (then hourly here). Its tick is let pass
        # before the subscription exists: it would otherwise race this test's worker for the
        # event's lease, and connect for real.
        deliver = next(job for job in runtime.jobs if job.name == "deliver")
        await eventually(lambda: deliver.runs > 0, interval_s=0.005)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        created = await client.post(
            "/subscriptions",
            json={"sink": f"https://{NAME}/hook", "types": [REQUESTED]},
            headers=bearer("traeger", traeger=TRAEGER),
        )
        assert created.status_code == 201, created.text
        worker = DeliveryWorker(runtime, app.state.secret_box, resolver=dns, network=network)
        assert await InProcessFeed(runtime, "main").send(referral()) == "ok"
        for _ in range(5):
            async with runtime.db.transaction() as session:
                sub = await session.get(DeliverySubscription, created.json()["id"])
                assert sub is not None
                sub.hold_until = None  # no waiting for the backoff in this test
                session.add(sub)
            await worker.tick()
            await worker.drain()
        log = (
            await client.get(
                f"/subscriptions/{created.json()['id']}/deliveries",
                headers=bearer("traeger", traeger=TRAEGER),
            )
        ).json()
        await client.aclose()
        await worker.close()
    errors = [entry["error"] for entry in reversed(log)]
    assert "loopback" in errors[0]
    assert "link-local" in errors[1]
    assert "private" in errors[2]  # one bad address among good ones refuses them all
    assert "private" in errors[3]
    assert errors[4] == "ConnectError"  # the public address: tried, and only it
    # One DNS question per attempt (plus the one when subscribing), and the only connection
    # ever tried went to the public answer, on the sink's port.
    assert len(dns.asked) == 1 + 5
    assert network.targets == [(PUBLIC, 443)]
