"""The delivery service on real parts: a real HTTP receiver on loopback (the partner kit's
example receiver), the real database (SQLite and PostgreSQL), and the broker."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from lotse_contracts import topics as topic_names
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_contracts.events.visits import VisitOverdue
from lotse_delivery.app import create_app
from lotse_delivery.settings import DeliverySettings
from lotse_delivery.worker import DeliveryWorker
from lotse_runtime.testing import InProcessFeed, without_broker

from tests.conftest import Broker
from tests.delivery.helpers import TRAEGER, Scripted, cancelled, receiver_running, referral
from tests.support import bearer, produce, read_topic

pytestmark = pytest.mark.integration

REQUESTED = "de.lotse.referrals.referral-requested.v1"
CANCELLED = "de.lotse.referrals.referral-cancelled.v1"
FAST = {
    "sink_policy": "development",
    "deliver_interval_s": 0.05,
    "retry_base_s": 0.05,
    "retry_max_s": 1.5,
    "deliver_timeout_s": 0.5,
}


def settings(database_url: str, tmp_path: Path, **overrides: Any) -> DeliverySettings:
    return DeliverySettings(database_url=database_url, data_dir=tmp_path, **{**FAST, **overrides})


def subscribe(client: Any, sink: str, **values: Any) -> dict[str, Any]:
    response = client.post(
        "/subscriptions",
        json={"sink": sink, "types": [REQUESTED, CANCELLED], **values},
        headers=bearer("traeger", traeger=TRAEGER),
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


# -- handlers through the in-process feed (both databases) ---------------------------------------


async def test_an_event_for_a_traeger_is_stored_projected_and_delivered_signed(
    database_url: str, tmp_path: Path
) -> None:
    app = create_app(settings(database_url, tmp_path, deliver_interval_s=3600))
    async with without_broker(app) as runtime:
        worker: DeliveryWorker = app.state.delivery_worker
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        probe = Scripted([])
        with receiver_running(probe) as sink:
            created = (
                await client.post(
                    "/subscriptions",
                    json={"sink": sink, "types": [REQUESTED]},
                    headers=bearer("traeger", traeger=TRAEGER),
                )
            ).json()
            probe.secrets = [created["secret"]]
            feed = InProcessFeed(runtime, "main")
            mine, other = referral(), referral(traeger="familienforum-west")
            assert await feed.send(mine) == "ok"
            assert await feed.send(other) == "ok"  # another Träger's: not for this subscription
            assert await feed.send(VisitOverdue.example()) == "ok"  # a Bezirk's event
            await worker.tick()
            await worker.drain()
        await client.aclose()
    assert len(probe.events) == 1
    event = probe.events[0]
    assert event["type"] == REQUESTED
    assert event["traeger"] == TRAEGER
    # The registry's projection for a Träger: handover_id is not among its fields.
    assert "handover_id" not in event["data"]
    assert event["data"]["referral_id"] == mine.referral_id
    assert probe.rejected == 0


# -- through the broker, with a receiver in trouble ----------------------------------------------


@contextmanager
def running_service(
    broker: Broker, topics: str, database_url: str, tmp_path: Path, **overrides: Any
) -> Iterator[TestClient]:
    app = create_app(
        settings(
            database_url,
            tmp_path,
            kafka_bootstrap=broker.bootstrap,
            topic_prefix=topics,
            consumer_session_timeout_ms=2000,
            consumer_heartbeat_interval_ms=300,
            relay_poll_interval_s=0.05,
            failure_budget_attempts=5,
            **overrides,
        )
    )
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        client.portal.call(app.state.runtime.consumers[0].wait_assigned)  # type: ignore[union-attr]
        yield client


@pytest.fixture
def service(broker: Broker, topics: str, sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with running_service(broker, topics, sqlite_url, tmp_path) as client:
        yield client


def test_a_receiver_in_trouble_gets_every_event_later_in_order_without_gap(
    service: TestClient, broker: Broker, topics: str
) -> None:
    receiver = Scripted([], script=[500, 429, "timeout", 503])
    with receiver_running(receiver) as sink:
        created = subscribe(service, sink)
        receiver.secrets = [created["secret"]]
        case = "0b1f7c3e-5d2a-4e8f-9a61-7c2e4d9b0a15"
        sent = []
        for _ in range(3):
            requested = referral(case_id=case)
            sent += [requested, cancelled(requested)]
        for event in sent:
            record = to_kafka_binary(event.to_cloudevent())
            produce(
                broker.bootstrap,
                topics + topic_names.REFERRALS,
                record.value,
                record.headers,
                record.key,
            )
        deadline = time.monotonic() + 30
        while len(receiver.events) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more may arrive
    got = [(e["type"], e["data"]["referral_id"]) for e in receiver.events]
    assert got == [(e.event_type, e.referral_id) for e in sent]  # in order, no gap, once
    assert receiver.rejected == 0
    log = service.get(
        f"/subscriptions/{created['id']}/deliveries", headers=bearer("traeger", traeger=TRAEGER)
    ).json()
    outcomes = [entry["outcome"] for entry in reversed(log)]
    assert outcomes[:4] == ["retry"] * 4
    assert outcomes.count("delivered") == len(sent)
    assert [e["status_code"] for e in reversed(log)][:4] == [500, 429, None, 503]
    assert all("data" not in entry for entry in log)  # the log holds no payload
    assert "timeout" in [e["error"] for e in log]


def test_the_failure_budget_pauses_and_resuming_delivers_what_waited(
    service: TestClient, broker: Broker, topics: str
) -> None:
    receiver = Scripted([], script=[500] * 5)
    auth = bearer("traeger", traeger=TRAEGER)
    with receiver_running(receiver) as sink:
        created = subscribe(service, sink)
        receiver.secrets = [created["secret"]]
        requested = referral()
        cloudevent = requested.to_cloudevent()
        record = to_kafka_binary(cloudevent)
        produce(
            broker.bootstrap,
            topics + topic_names.REFERRALS,
            record.value,
            record.headers,
            record.key,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = service.get(f"/subscriptions/{created['id']}", headers=auth).json()
            if state["status"] == "paused":
                break
            time.sleep(0.05)
        assert state["status"] == "paused"
        assert "5 failed attempts" in state["paused_reason"]
        assert state["pending"] == 1
        assert receiver.events == []
        resumed = service.patch(
            f"/subscriptions/{created['id']}", json={"status": "active"}, headers=auth
        )
        assert resumed.status_code == 200
        deadline = time.monotonic() + 20
        while not receiver.events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["id"] for e in receiver.events] == [cloudevent.id]
        # Redelivery on request: the same event again, same webhook-id: the receiver dedupes.
        # The receiver may see the event a moment before the worker commits it as delivered;
        # only a delivered event is requeued, and asking again before that requeues nothing.
        deadline = time.monotonic() + 10
        while True:
            again = service.post(
                f"/subscriptions/{created['id']}/redeliver",
                json={"since": "2000-01-01T00:00:00Z"},
                headers=auth,
            )
            if again.json() != {"requeued": 0} or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert again.json() == {"requeued": 1}
        deadline = time.monotonic() + 20
        while receiver.duplicates < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.duplicates == 1
        assert len(receiver.events) == 1


def test_subscriptions_beyond_the_ceiling_or_to_bad_sinks_are_refused(service: TestClient) -> None:
    auth = bearer("traeger", traeger=TRAEGER)
    with receiver_running(Scripted([])) as sink:
        beyond = service.post(
            "/subscriptions",
            json={"sink": sink, "types": ["de.lotse.visits.visit-overdue.v1"]},
            headers=auth,
        )
        assert beyond.status_code == 422
        assert beyond.json()["errors"][0]["field"] == "types.0"
        plain = service.post(
            "/subscriptions",
            json={"sink": "http://partner.example/hook", "types": [REQUESTED]},
            headers=auth,
        )
        assert plain.status_code == 422
        assert "https" in plain.json()["detail"]
    other_team = service.post(
        "/subscriptions",
        json={
            "sink": "https://partner.example/hook",
            "types": ["de.lotse.visits.visit-overdue.v1"],
            "filters": [{"exact": {"bezirk": "eving"}}],
        },
        headers=bearer("bezirksteam", bezirk="hoerde"),
    )
    assert other_team.status_code == 422
    assert (
        service.post(
            "/subscriptions", json={}, headers=bearer("familienbuero", bezirk="hoerde")
        ).status_code
        == 403
    )


def test_a_subscription_is_its_owners_alone_and_changes_are_audited(service: TestClient) -> None:
    with receiver_running(Scripted([])) as sink:
        created = subscribe(service, sink)
    mine = bearer("traeger", traeger=TRAEGER)
    theirs = bearer("traeger", traeger="familienforum-west")
    assert service.get(f"/subscriptions/{created['id']}", headers=theirs).status_code == 403
    assert service.get("/subscriptions", headers=theirs).json() == []
    assert "secret" not in service.get(f"/subscriptions/{created['id']}", headers=mine).json()
    rotated = service.post(f"/subscriptions/{created['id']}/secret", headers=mine).json()
    assert rotated["secret"] != created["secret"]
    assert service.delete(f"/subscriptions/{created['id']}", headers=theirs).status_code == 403
    assert service.delete(f"/subscriptions/{created['id']}", headers=mine).status_code == 204
    audit = service.get("/audit", headers=bearer("dpo")).json()
    purposes = [entry["purpose"] for entry in audit]
    assert any(p.endswith("created") for p in purposes)
    assert any(p.endswith("secret rotated") for p in purposes)
    assert any(p.endswith("deleted") for p in purposes)


def test_answers_over_http_reach_the_responses_topic_and_only_the_own(
    service: TestClient, broker: Broker, topics: str
) -> None:
    answer = PartnerReferralAnswer.example()
    event = answer.to_cloudevent()
    record = to_kafka_binary(event)
    headers = {k.replace("ce_", "ce-", 1): v.decode() for k, v in record.headers}
    own = bearer("traeger", traeger=TRAEGER)
    url = f"/traeger/{TRAEGER}/answers"
    accepted = service.post(url, content=record.value, headers={**headers, **own})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "accepted"
    again = service.post(url, content=record.value, headers={**headers, **own})
    assert again.json()["status"] == "duplicate"
    # Structured mode works the same way.
    structured = answer.model_copy(update={"answer": PartnerAnswer.IN_PROGRESS}).to_cloudevent()
    doc = json.dumps({**structured.attributes(), "data": structured.data})
    ok = service.post(
        url, content=doc, headers={"content-type": "application/cloudevents+json", **own}
    )
    assert ok.status_code == 202, ok.text
    # Nobody answers for another Träger.
    foreign = bearer("traeger", traeger="familienforum-west")
    assert (
        service.post(url, content=record.value, headers={**headers, **foreign}).status_code == 403
    )
    other_url = "/traeger/familienforum-west/answers"
    assert (
        service.post(other_url, content=record.value, headers={**headers, **own}).status_code == 403
    )
    wrong_source = {**headers, "ce-source": "/partner/familienforum-west", "ce-id": "x-1"}
    refused = service.post(url, content=record.value, headers={**wrong_source, **own})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "source"
    bad = service.post(
        url, content=b'{"answer":"maybe"}', headers={**headers, "ce-id": "x-2", **own}
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "data"
    records = service.portal.call(  # type: ignore[union-attr]
        read_topic, broker.bootstrap, topics + topic_names.partner_responses(TRAEGER), 2, 20.0
    )
    assert [r.header("ce_id") for r in records] == [event.id, structured.id]
    assert all(r.header("ce_source") == f"/partner/{TRAEGER}" for r in records)


@contextmanager
def misbehaving_sink(kind: str) -> Iterator[str]:
    """A loopback sink that never answers ("hanging") or answers 200 with an endless body
    ("flooding"): neither may hold up another subscriber's deliveries."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            with contextlib.suppress(OSError):
                if conn.recv(65536).startswith(b"OPTIONS"):
                    # Passes the validation handshake; only its deliveries misbehave.
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nWebHook-Allowed-Origin: *\r\n"
                        b"content-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    return
                if kind == "flooding":
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
                    chunk = b"x" * 65536
                    while not stop.is_set():
                        conn.sendall(chunk)  # until the sender hangs up
                stop.wait(30)

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        server.close()
        thread.join(5)


def test_slow_and_oversized_receivers_hold_up_no_other_subscriber(
    broker: Broker, topics: str, sqlite_url: str, tmp_path: Path
) -> None:
    auth = bearer("traeger", traeger=TRAEGER)
    healthy = Scripted([])
    with (
        # An attempt may take 20 s here: the healthy subscriber must not wait for them.
        running_service(broker, topics, sqlite_url, tmp_path, deliver_timeout_s=20) as service,
        misbehaving_sink("hanging") as hanging_sink,
        misbehaving_sink("flooding") as flooding_sink,
        receiver_running(healthy) as healthy_sink,
    ):
        # The broken ones first, so that a sender serving subscriptions one after the other
        # would meet them before the healthy one.
        hanging = subscribe(service, hanging_sink)
        flooding = subscribe(service, flooding_sink)
        created = subscribe(service, healthy_sink)
        healthy.secrets = [created["secret"]]
        sent = [referral() for _ in range(4)]
        for event in sent:
            record = to_kafka_binary(event.to_cloudevent())
            produce(
                broker.bootstrap,
                topics + topic_names.REFERRALS,
                record.value,
                record.headers,
                record.key,
            )
        deadline = time.monotonic() + 30
        while len(healthy.events) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        got = [e["data"]["referral_id"] for e in healthy.events]
        assert got == [e.referral_id for e in sent]  # all, in order, once
        # ... while the hanging sink's first attempt has not even ended: nothing of it is
        # logged, nothing lost, nothing counted as delivered.
        state = service.get(f"/subscriptions/{hanging['id']}", headers=auth).json()
        assert state["pending"] == len(sent), state
        log = service.get(f"/subscriptions/{hanging['id']}/deliveries", headers=auth).json()
        assert log == []
        # The endless body is not read: its 200 counts, and the sender hangs up.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = service.get(f"/subscriptions/{flooding['id']}", headers=auth).json()
            if state["pending"] == 0:
                break
            time.sleep(0.1)
        assert state["pending"] == 0, state
