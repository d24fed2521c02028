"""End to end on real parts: the referrals and the delivery service on the real broker, their
own databases, and the Träger's webhook receiver (the partner kit's example) on loopback.

A family's referral reaches the Träger's webhook although the receiver first answers 500,
then 429, then times out; the Träger answers over HTTP and the referral advances in the
referrals service. Then the receiver is down for a while: what happens meanwhile (another
family's referral, the refusal notice of an answer the state rules do not allow) arrives
once it is back, in order per case, nothing missing, and a redelivery of everything has no
second effect on a receiver that deduplicates by webhook-id."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.common import Role
from lotse_contracts.events.intake import HandoverRequested
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_delivery.app import create_app
from lotse_delivery.settings import DeliverySettings

from tests.conftest import Broker
from tests.delivery.helpers import Scripted
from tests.referrals.helpers import BEZIRKSTEAM, MODULE, TRAEGER, Family, Service, running
from tests.support import bearer

pytestmark = pytest.mark.integration

TYPES = [
    "de.lotse.referrals.referral-requested.v1",
    "de.lotse.referrals.referral-cancelled.v1",
    "de.lotse.referrals.answer-refused.v1",
]
OWN = bearer("traeger", subject=f"tr-{TRAEGER}", traeger=TRAEGER)


@contextmanager
def serving(receiver: Scripted, port: int = 0) -> Iterator[int]:
    """The receiver on loopback (on ``port`` again after a restart)."""
    server = receiver.server("127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def delivery_service(broker: Broker, prefix: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = DeliverySettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'delivery.db'}",
        data_dir=tmp_path,
        kafka_bootstrap=broker.bootstrap,
        topic_prefix=prefix,
        topic_partitions=2,
        consumer_session_timeout_ms=2000,
        consumer_heartbeat_interval_ms=300,
        relay_poll_interval_s=0.05,
        sink_policy="development",
        deliver_interval_s=0.05,
        deliver_timeout_s=0.5,
        retry_base_s=0.05,
        retry_max_s=0.5,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        client.portal.call(app.state.runtime.consumers[0].wait_assigned)  # type: ignore[union-attr]
        yield client


def handover(family: Family) -> HandoverRequested:
    return HandoverRequested(
        handover_id=str(uuid.uuid4()),
        case_id=family.case_id,
        bezirk=family.bezirk,
        module=MODULE,
        consent_ref=family.consent_id,
        requested_by_role=Role.BABYLOTSE,
        requested_at=datetime.now(UTC),
    )


def answer_request(event: dict[str, Any], step: PartnerAnswer) -> tuple[bytes, dict[str, str]]:
    """The Träger's answer as an HTTP request: the referral-answer CloudEvent, binary mode."""
    model = PartnerReferralAnswer(
        referral_id=event["data"]["referral_id"],
        case_id=event["data"]["case_id"],
        traeger=TRAEGER,
        answer=step,
        occurred_at=datetime.now(UTC),
    )
    record = to_kafka_binary(
        model.to_cloudevent(event_id=f"{event['data']['referral_id']}/{step.value}")
    )
    headers = {k.replace("ce_", "ce-", 1): v.decode() for k, v in record.headers}
    return record.value or b"", {**headers, **OWN}


def post_answer(delivery: TestClient, request: tuple[bytes, dict[str, str]]) -> Any:
    content, headers = request
    return delivery.post(f"/traeger/{TRAEGER}/answers", content=content, headers=headers)


def until(predicate: Any, what: str, timeout_s: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.05)


def status_of(referrals: Service, referral_id: str) -> str:
    answer = referrals.client.get(f"/referrals/{referral_id}", headers=BEZIRKSTEAM)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["status"])


# Longer than 60 lines on purpose: one story from the first referral to the redelivery.
def test_referral_to_webhook_answer_over_http_advances_it_and_an_outage_loses_nothing(
    broker: Broker, postgres_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    receiver = Scripted([], script=[500, 429, "timeout"])
    with (
        running(broker.bootstrap, postgres_url, topic_prefix) as referrals,
        delivery_service(broker, topic_prefix, tmp_path) as delivery,
    ):
        referrals.clock.set(datetime.now(UTC))
        with serving(receiver) as port:
            sink = f"http://127.0.0.1:{port}/hook"
            created = delivery.post(
                "/subscriptions", json={"sink": sink, "types": TYPES}, headers=OWN
            )
            assert created.status_code == 201, created.text
            subscription = created.json()
            receiver.secrets = [subscription["secret"]]

            # A family's handover becomes a referral to the Träger; its webhook gets it
            # after three failed attempts.
            first = Family(traeger=TRAEGER, purpose=MODULE)
            referrals.register(first)
            referrals.send(handover(first))
            until(lambda: receiver.events, "the referral at the webhook")
            [requested] = receiver.events
            assert requested["type"] == TYPES[0]
            assert requested["subject"] == first.case_id
            referral_id = requested["data"]["referral_id"]

            # The Träger answers over HTTP; the referral advances in the referrals service.
            for step in (PartnerAnswer.RECEIVED, PartnerAnswer.ACCEPTED):
                request = answer_request(requested, step)
                sent = post_answer(delivery, request)
                assert sent.status_code == 202, sent.text
                assert sent.json()["status"] == "accepted"
            again = post_answer(delivery, request)  # a retry after a lost answer: same request
            assert again.json()["status"] == "duplicate"
            until(lambda: status_of(referrals, referral_id) == "accepted", "accepted")

        # The receiver is down. Meanwhile another family's referral is made, and the Träger
        # sends an answer the state rules refuse (completed before in progress).
        second = Family(traeger=TRAEGER, purpose=MODULE)
        referrals.register(second)
        referrals.send(handover(second))
        refused = post_answer(delivery, answer_request(requested, PartnerAnswer.COMPLETED))
        assert refused.status_code == 202  # well-formed: the state rules are referrals' to apply
        log_url = f"/subscriptions/{subscription['id']}/deliveries"
        until(
            lambda: (
                len(
                    [
                        e
                        for e in delivery.get(log_url, headers=OWN).json()
                        if e["error"] == "ConnectError"
                    ]
                )
                >= 2
            ),
            "failed attempts while the receiver is down",
        )
        assert len(receiver.events) == 1

        with serving(receiver, port):
            until(lambda: len(receiver.events) >= 3, "what waited, after the outage")
            time.sleep(0.5)  # nothing more may come
            got = list(receiver.events)
            # Everything once, nothing missing, each case in its order.
            assert len(got) == 3
            assert len({e["id"] for e in got}) == 3
            by_type = {e["type"]: e for e in got[1:]}
            assert set(by_type) == {TYPES[0], TYPES[2]}
            assert by_type[TYPES[0]]["subject"] == second.case_id
            notice = by_type[TYPES[2]]["data"]
            assert notice["traeger"] == TRAEGER
            assert notice["refused_event_type"] == PartnerReferralAnswer.event_type
            assert "in-progress" in notice["reason"]
            assert status_of(referrals, referral_id) == "accepted"  # the refusal changed nothing

            # Everything again, on request: same webhook-ids, no second effect.
            redo = delivery.post(
                f"/subscriptions/{subscription['id']}/redeliver",
                json={"since": "2000-01-01T00:00:00Z"},
                headers=OWN,
            )
            assert redo.json() == {"requeued": 3}
            until(lambda: receiver.duplicates >= 3, "the redelivery")
            assert receiver.events == got
        outcomes = [e["outcome"] for e in reversed(delivery.get(log_url, headers=OWN).json())]
    assert receiver.rejected == 0
    assert outcomes[:4] == ["retry", "retry", "retry", "delivered"]
    assert "paused" not in outcomes
