"""Referrals under concurrency, with one instance and with two instances on one database:
the last places of a Träger, one running referral per family and module, the placement job
run by two replicas at once, conflicting lifecycle steps over HTTP and Kafka.

Every probe sends its requests at the same moment (``asyncio.gather`` on each instance, the
instances on threads of their own) and asserts the exact outcome: how many succeed, that
every refusal names its field and reason, what the tables and the outbox hold."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from lotse_contracts import topics
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import Role
from lotse_contracts.events.intake import HandoverRequested
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_referrals import operations as ops
from lotse_referrals.tables import Case, CatalogueTraeger, Referral, Wish
from lotse_runtime.consumer import DLQ_REASON
from sqlalchemy import select, update
from sqlmodel import col

from tests.conftest import Broker
from tests.referrals.helpers import (
    FAMILIENBUERO,
    KOORDINATION,
    MODULE,
    START,
    TRAEGER,
    Family,
    Service,
    running,
    traeger_caller,
)
from tests.support import read_topic

pytestmark = pytest.mark.integration

Call = tuple[str, str, dict[str, Any] | None, dict[str, str]]


@contextmanager
def instances(
    broker: Broker, database_url: str, prefix: str, count: int
) -> Iterator[list[Service]]:
    """``count`` instances of the service on one database (replicas of one deployment)."""
    with ExitStack() as stack:
        services = [
            stack.enter_context(running(broker.bootstrap, database_url, prefix))
            for _ in range(count)
        ]
        yield services


def fire(services: Sequence[Service], calls: Sequence[Call]) -> list[httpx.Response]:
    """Send every call at once, spread round-robin over the instances; answers in order."""
    shares: list[list[int]] = [
        list(range(i, len(calls), len(services))) for i in range(len(services))
    ]

    async def burst(app: Any, indexes: list[int]) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://referrals") as client:
            return list(
                await asyncio.gather(
                    *(
                        client.request(
                            calls[i][0], calls[i][1], json=calls[i][2], headers=calls[i][3]
                        )
                        for i in indexes
                    )
                )
            )

    answers: list[httpx.Response | None] = [None] * len(calls)
    with ThreadPoolExecutor(len(services)) as pool:
        futures = [
            (share, pool.submit(service.client.portal.call, burst, service.client.app, share))  # type: ignore[union-attr]
            for service, share in zip(services, shares, strict=True)
        ]
        for share, future in futures:
            for index, response in zip(share, future.result(), strict=True):
                answers[index] = response
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def send_all(service: Service, events: Sequence[EventModel]) -> None:
    """Publish intake events as intake would, with one producer."""
    producer = Producer({"bootstrap.servers": service.bootstrap, "acks": "all"})
    for event in events:
        record = to_kafka_binary(event.to_cloudevent())
        producer.produce(
            service.prefix + type(event).topic,
            value=record.value,
            key=record.key,
            headers=list(record.headers),
        )
    assert producer.flush(15) == 0


def register_all(services: Sequence[Service], families: Sequence[Family]) -> None:
    for service in services:
        for family in families:
            service.keyring.families[family.case_id] = family.in_keyring()
    send_all(services[0], [f.registered() for f in families])
    wanted = {f.case_id for f in families}

    def known() -> bool:
        async def load() -> set[str]:
            async with services[0].runtime.db.transaction() as session:
                query = select(col(Case.case_id)).where(col(Case.case_id).in_(wanted))
                return set((await session.execute(query)).scalars())

        return services[0].client.portal.call(load) == wanted  # type: ignore[union-attr]

    services[0].wait(known, timeout_s=30, what=f"{len(families)} families registered")


def table(service: Service, model: Any) -> list[Any]:
    async def load() -> list[Any]:
        async with service.runtime.db.transaction() as session:
            return list((await session.execute(select(model))).scalars())

    rows: list[Any] = service.client.portal.call(load)  # type: ignore[union-attr]
    return rows


def domain_events(service: Service) -> Counter[str]:
    """The outbox's events on the domain topic, by type (``referral-accepted`` etc.)."""
    domain_topic = service.prefix + topics.REFERRALS
    return Counter(
        m.event_type.split(".")[-2] for m in service.outbox_rows() if m.topic == domain_topic
    )


def set_capacity(service: Service, places: int) -> None:
    response = service.client.patch(
        f"/catalogue/traeger/{TRAEGER}",
        json={"capacity_per_month": places},
        headers=KOORDINATION,
    )
    assert response.status_code == 200, response.text


def set_capacity_in_table(service: Service, places: int) -> None:
    async def write() -> None:
        async with service.runtime.db.transaction() as session:
            await session.execute(
                update(CatalogueTraeger)
                .where(col(CatalogueTraeger.slug) == TRAEGER)
                .values(capacity_per_month=places)
            )

    service.client.portal.call(write)  # type: ignore[union-attr]


def referral_request(family: Family, *, chosen: bool) -> Call:
    body: dict[str, Any] = {
        "case_id": family.case_id,
        "module": MODULE,
        "consent_ref": family.consent_id,
    }
    if chosen:
        body["traeger"] = TRAEGER
    return ("POST", "/referrals", body, FAMILIENBUERO)


def refusals(responses: Sequence[httpx.Response]) -> list[dict[str, Any]]:
    return [e for r in responses if r.status_code == 409 for e in r.json()["errors"]]


# --- the probes -----------------------------------------------------------------------------


def probe_capacity(services: Sequence[Service], families: list[Family]) -> None:
    """12 requests for the last 3 places of a Träger: 3 × 201, 9 × 409 naming the Träger."""
    first = services[0]
    earlier, families = families[0], families[1:13]
    set_capacity(first, 4)
    one = first.client.post(
        "/referrals", json=referral_request(earlier, chosen=True)[2], headers=FAMILIENBUERO
    )
    assert one.status_code == 201, one.text
    assert (
        first.client.get(f"/catalogue/traeger/{TRAEGER}", headers=FAMILIENBUERO).json()[
            "free_capacity"
        ]
        == 3
    )

    # Half name the Träger, half leave the choice to the service: both paths are gated.
    responses = fire(
        services, [referral_request(f, chosen=i % 2 == 0) for i, f in enumerate(families)]
    )
    codes = Counter(r.status_code for r in responses)
    assert codes == {201: 3, 409: 9}, [r.text for r in responses]
    errors = refusals(responses)
    assert len(errors) == 9
    assert {e["field"] for e in errors} == {"traeger"}
    assert all("capacity" in e["reason"] for e in errors), errors
    running = [r for r in table(first, Referral) if r.traeger == TRAEGER]
    assert len(running) == 4
    assert domain_events(first)["referral-requested"] == 4
    assert (
        first.client.get(f"/catalogue/traeger/{TRAEGER}", headers=FAMILIENBUERO).json()[
            "free_capacity"
        ]
        == 0
    )


def probe_one_open_per_module(services: Sequence[Service], family: Family) -> None:
    """6 requests for one family and module: one 201, five 409 naming ``module``."""
    first = services[0]
    set_capacity(first, 1000)
    before = domain_events(first)["referral-requested"]
    responses = fire(services, [referral_request(family, chosen=i % 2 == 0) for i in range(6)])
    codes = Counter(r.status_code for r in responses)
    assert codes == {201: 1, 409: 5}, [r.text for r in responses]
    errors = refusals(responses)
    assert {e["field"] for e in errors} == {"module"}
    assert all("still open" in e["reason"] for e in errors), errors
    assert len(first.referrals(family.case_id)) == 1
    assert domain_events(first)["referral-requested"] == before + 1


def probe_placement(services: Sequence[Service], families: list[Family]) -> None:
    """20 handovers waiting for places; places freed; the placement job runs on every
    instance at once (and twice per instance): each wish becomes exactly one referral."""
    first = services[0]
    assert len(families) == 20
    taken = first.client.get(f"/catalogue/traeger/{TRAEGER}", headers=FAMILIENBUERO).json()
    set_capacity(first, taken["used_this_month"])  # no place left
    handovers = [
        HandoverRequested(
            handover_id=str(uuid.uuid4()),
            case_id=f.case_id,
            bezirk=f.bezirk,
            module=MODULE,
            traeger=TRAEGER,
            consent_ref=f.consent_id,
            requested_by_role=Role.BABYLOTSE,
            requested_at=START,
        )
        for f in families
    ]
    send_all(first, handovers)
    ids = {h.handover_id for h in handovers}

    def waiting() -> bool:
        rows = [w for w in table(first, Wish) if w.source_id in ids]
        return len(rows) == 20 and all(w.state == "open" and w.problem for w in rows)

    first.wait(waiting, timeout_s=30, what="20 handovers waiting for a place")
    assert not [r for r in table(first, Referral) if r.handover_id in ids]
    before = domain_events(first)["referral-requested"]
    # Straight in the table: an edit through the API would place the wishes itself at once
    # (test_referrals_wishes.py); here the placement jobs are to race for them.
    set_capacity_in_table(first, taken["used_this_month"] + 20)

    def job(service: Service) -> int:
        async def twice() -> int:
            now = service.clock()
            placed = await asyncio.gather(
                ops.place_waiting_wishes(service.ctx, now),
                ops.place_waiting_wishes(service.ctx, now),
            )
            return sum(placed)

        placed: int = service.client.portal.call(twice)  # type: ignore[union-attr]
        return placed

    with ThreadPoolExecutor(len(services)) as pool:
        placed = sum(pool.map(job, services))
    assert placed == 20
    referrals = [r for r in table(first, Referral) if r.handover_id in ids]
    assert Counter(r.handover_id for r in referrals) == dict.fromkeys(ids, 1)
    wishes = [w for w in table(first, Wish) if w.source_id in ids]
    assert {w.state for w in wishes} == {"placed"}
    assert {w.referral_id for w in wishes} == {r.referral_id for r in referrals}
    assert domain_events(first)["referral-requested"] == before + 20


def probe_conflicting_steps(services: Sequence[Service], family: Family) -> None:
    """accepted × 3 and rejected × 3 on one referral at once: one 200, five 409 naming
    ``step``, one event; the status is the winner's."""
    first = services[0]
    set_capacity(first, 1000)
    created = first.client.post(
        "/referrals", json=referral_request(family, chosen=True)[2], headers=FAMILIENBUERO
    )
    assert created.status_code == 201, created.text
    referral_id = created.json()["referral_id"]
    before = domain_events(first)
    answer = traeger_caller()
    accepted: Call = ("POST", f"/referrals/{referral_id}/steps", {"step": "accepted"}, answer)
    rejected: Call = (
        "POST",
        f"/referrals/{referral_id}/steps",
        {"step": "rejected", "rejection_reason": "no_capacity"},
        answer,
    )
    responses = fire(services, [accepted, rejected] * 3)
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: 1, 409: 5}, [r.text for r in responses]
    winner = next(r.json()["status"] for r in responses if r.status_code == 200)
    errors = refusals(responses)
    assert {e["field"] for e in errors} == {"step"}
    assert all(f"the referral is {winner}" in e["reason"] for e in errors), errors
    after = domain_events(first)
    assert after["referral-accepted"] + after["referral-rejected"] == (
        before["referral-accepted"] + before["referral-rejected"] + 1
    )
    detail = first.client.get(f"/referrals/{referral_id}", headers=FAMILIENBUERO).json()
    assert detail["status"] == winner
    assert [s["step"] for s in detail["steps"]] == ["requested", winner]


def probe_answer_against_http(services: Sequence[Service], family: Family) -> None:
    """A Träger's Kafka answer (accepted) meets its own HTTP answers (rejected × 3) at the
    same moment: exactly one of them wins. A losing Kafka answer is refused like any illegal
    answer: dead-lettered with the referral's status as reason, nothing changed."""
    first = services[0]
    set_capacity(first, 1000)
    created = first.client.post(
        "/referrals", json=referral_request(family, chosen=True)[2], headers=FAMILIENBUERO
    )
    assert created.status_code == 201, created.text
    referral = created.json()
    before = domain_events(first)
    dead_before = sum(c.dead_lettered for s in services for c in s.runtime.consumers)
    answer = PartnerReferralAnswer(
        referral_id=referral["referral_id"],
        case_id=family.case_id,
        traeger=TRAEGER,
        answer=PartnerAnswer.ACCEPTED,
        occurred_at=START + timedelta(minutes=1),
    )
    record = to_kafka_binary(answer.to_cloudevent())
    producer = Producer({"bootstrap.servers": first.bootstrap, "acks": "all"})
    producer.produce(
        first.prefix + topics.partner_responses(TRAEGER),
        value=record.value,
        key=record.key,
        headers=list(record.headers),
    )
    assert producer.flush(15) == 0
    rejected: Call = (
        "POST",
        f"/referrals/{referral['referral_id']}/steps",
        {"step": "rejected", "rejection_reason": "family_declined"},
        traeger_caller(),
    )
    responses = fire(services, [rejected] * 3)
    http_won = [r for r in responses if r.status_code == 200]
    assert len(http_won) <= 1
    assert all(r.status_code in (200, 409) for r in responses)

    def answered() -> bool:
        dead = sum(c.dead_lettered for s in services for c in s.runtime.consumers)
        return dead > dead_before or status(first, referral) == "accepted"

    first.wait(answered, timeout_s=30, what="the Kafka answer handled")
    after = domain_events(first)
    won = {kind: after[kind] - before[kind] for kind in ("referral-accepted", "referral-rejected")}
    if http_won:
        assert won == {"referral-accepted": 0, "referral-rejected": 1}
        assert status(first, referral) == "rejected"
        dead = asyncio.run(
            read_topic(first.bootstrap, first.prefix + topics.dead_letter("referrals"), 1)
        )
        assert any("the referral is rejected" in str(r.header(DLQ_REASON)) for r in dead)
    else:
        assert won == {"referral-accepted": 1, "referral-rejected": 0}
        assert status(first, referral) == "accepted"
        assert {e["field"] for e in refusals(responses)} == {"step"}


def status(service: Service, referral: dict[str, Any]) -> str:
    body = service.client.get(f"/referrals/{referral['referral_id']}", headers=FAMILIENBUERO)
    return str(body.json()["status"])


# --- one instance, both backends; two instances on one database ----------------------------


def probes(services: Sequence[Service]) -> None:
    families = [Family() for _ in range(36)]
    register_all(services, families)  # once: each probe has families of its own
    probe_capacity(services, families[:13])
    probe_one_open_per_module(services, families[13])
    probe_placement(services, families[14:34])
    probe_conflicting_steps(services, families[34])
    probe_answer_against_http(services, families[35])


def test_one_instance_keeps_capacity_uniqueness_placement_and_steps_exact(
    broker: Broker, database_url: str, topic_prefix: str
) -> None:
    with instances(broker, database_url, topic_prefix, 1) as services:
        probes(services)


def test_two_instances_on_one_postgresql_database_keep_the_same_outcomes(
    broker: Broker, postgres_url: str, topic_prefix: str
) -> None:
    """Two replicas, as deployed: requests spread over both, both run the placement job.
    (Two instances on one SQLite file are no deployment; the one-instance test covers
    SQLite, whose transactions are serialised by the database's write lock.)"""
    with instances(broker, postgres_url, topic_prefix, 2) as services:
        probes(services)
