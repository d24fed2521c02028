"""Partners hear about refused answers (issue 18): an answer the referrals service refuses
is dead-lettered for ops and answered with ``answer-refused`` on the feed of the Träger
that wrote it, and of no other Träger; the notice tells nothing of another Träger's
referral. In process (``lotse_runtime.testing``): the real database, inbox and outbox."""

from __future__ import annotations

import json
from typing import Any

from lotse_contracts import topics
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.partner import PartnerAnswer
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import select
from sqlmodel import col

from tests.referrals.helpers import TRAEGER, Family
from tests.referrals.test_referrals_handlers import OTHER_TRAEGER, Fed, answer, fed

NOTICE = "de.lotse.referrals.answer-refused.v1"


async def _notices(service: Fed) -> list[tuple[str, dict[str, Any]]]:
    query = (
        select(OutboxMessage)
        .where(col(OutboxMessage.event_type) == NOTICE)
        .order_by(col(OutboxMessage.id))
    )
    async with service.runtime.db.transaction() as session:
        rows = list((await session.execute(query)).scalars())
    return [(row.topic, json.loads(row.value or b"{}")) for row in rows]


def _own(service: Fed, slug: str) -> str:
    return str(service.runtime.settings.topic(topics.partner_responses(slug)))


def _feed(service: Fed, slug: str) -> str:
    return str(service.runtime.settings.topic(topics.partner_referrals(slug)))


async def test_a_refused_answer_reaches_the_senders_feed_only(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        await service.handover(family)
        referral = await service.referral(family.case_id)
        domain_topic = service.runtime.settings.topic(topics.REFERRALS)

        # Another Träger answers this Träger's referral on its own topic.
        foreign = answer(referral, PartnerAnswer.ACCEPTED, traeger=OTHER_TRAEGER)
        sent = foreign.to_cloudevent()
        outcome = await service.partners.send(sent, topic=_own(service, OTHER_TRAEGER))
        assert outcome == "dead_lettered"
        assert "not addressed" in service.partners.dead_letters[-1].reason  # ops' copy
        notices = await _notices(service)
        assert [t for t, _ in notices] == [_feed(service, OTHER_TRAEGER)]
        data = notices[-1][1]
        assert data["traeger"] == OTHER_TRAEGER
        assert data["refused_event_id"] == sent.id
        assert data["reason_code"] == "unknown-referral"
        # Told exactly as for a referral that does not exist: nothing of whose it is.
        assert TRAEGER not in data["reason"]
        assert referral.bezirk not in json.dumps(data)
        assert "module" not in data
        assert "case_id" not in data

        # A Träger writes an answer naming another Träger to its own topic: the notice goes
        # to the sender (the topic's owner), never to the Träger it names.
        before = len(await _notices(service))
        named = answer(referral, PartnerAnswer.ACCEPTED, traeger=OTHER_TRAEGER)
        outcome = await service.partners.send(named, topic=_own(service, TRAEGER))
        assert outcome == "dead_lettered"
        new = (await _notices(service))[before:]
        assert [t for t, _ in new] == [_feed(service, TRAEGER)]
        assert new[-1][1]["reason_code"] == "wrong-topic"

        # Data that violates the schema: the validation message goes back.
        bad = to_kafka_binary(answer(referral, PartnerAnswer.ACCEPTED).to_cloudevent())
        value = json.loads(bad.value or b"{}")
        value["answer"] = "maybe"
        outcome = await service.partners.send_raw(
            json.dumps(value).encode(), bad.headers, topic=_own(service, TRAEGER)
        )
        assert outcome == "dead_lettered"
        topic, data = (await _notices(service))[-1]
        assert topic == _feed(service, TRAEGER)
        assert data["reason_code"] == "schema-violation"
        assert "answer" in data["reason"]

        # An illegal step on its own referral: the lifecycle's reason.
        done = answer(referral, PartnerAnswer.COMPLETED)
        assert await service.partners.send(done, topic=_own(service, TRAEGER)) == "dead_lettered"
        data = (await _notices(service))[-1][1]
        assert data["reason_code"] == "illegal-step"
        assert data["refused_topic"] == _own(service, TRAEGER)

        # Nothing stored changed: the referral is as it was.
        assert (await service.referral(family.case_id)).status == "requested"
        # One notice per refused answer, on the senders' feeds only.
        ids = [d["refused_event_id"] for _, d in await _notices(service)]
        assert len(ids) == 4
        assert domain_topic not in {t for t, _ in await _notices(service)}


async def test_the_example_partner_client_logs_a_refusal_notice() -> None:
    from lotse_contracts.events.referrals import AnswerRefused

    from examples.partner_client import PartnerClient, read_referral_event

    notice = AnswerRefused.example()
    record = to_kafka_binary(notice.to_cloudevent())
    assert read_referral_event(record.value, record.headers) == notice
    client = PartnerClient(bootstrap="127.0.0.1:1", traeger=notice.traeger)
    await client._handle(None, record.value, record.headers)
    assert client.summary.refused == [(notice.refused_event_id, "illegal-step")]
    assert client.summary.answered == {}
