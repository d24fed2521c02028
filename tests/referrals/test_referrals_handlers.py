"""The referrals consumers' handlers, fed in process (``lotse_runtime.testing``): the real
database, the runtime's inbox, transaction and outbox, no broker.

Each event type the service handles is delivered once (its effect on the tables and the
outbox), again under the same event id (a redelivery: ``duplicate``, no second effect), and
in a form the service must refuse (dead-lettered with the reason, nothing changed). The
paths through Kafka itself stay with the tests against the embedded broker
(test_referrals_flow.py, test_referrals_concurrency.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lotse_contracts import topics
from lotse_contracts.events.common import ConsentState, Role
from lotse_contracts.events.intake import (
    CasesMerged,
    ErasureReason,
    FamilyErased,
    HandoverRequested,
)
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_contracts.events.visits import VisitCompleted
from lotse_referrals.app import create_app
from lotse_referrals.keyring import StaticKeyring
from lotse_referrals.tables import Case, ConsentRecord, Referral, ReferralStep, Wish
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.outbox import OutboxMessage
from lotse_runtime.testing import InProcessFeed, without_broker
from sqlalchemy import select
from sqlmodel import col

from tests.referrals.helpers import MODULE, START, TRAEGER, Clock, Family, settings

OTHER_TRAEGER = "elternberatung-unterwegs"


@dataclass
class Fed:
    """The service started without a broker, with a feed per consumer."""

    runtime: ServiceRuntime[Any]
    keyring: StaticKeyring
    clock: Clock
    main: InProcessFeed
    partners: InProcessFeed

    async def register(self, family: Family) -> None:
        self.keyring.families[family.case_id] = family.in_keyring()
        assert await self.main.send(family.registered()) == "ok"

    async def handover(self, family: Family, **changes: Any) -> HandoverRequested:
        event = handover(family, **changes)
        assert await self.main.send(event) == "ok"
        return event

    async def rows(self, model: Any, **where: Any) -> list[Any]:
        query = select(model)
        for name, value in where.items():
            query = query.where(col(getattr(model, name)) == value)
        async with self.runtime.db.transaction() as session:
            return list((await session.execute(query)).scalars())

    async def referral(self, case_id: str) -> Referral:
        rows = await self.rows(Referral, case_id=case_id)
        assert len(rows) == 1, rows
        referral: Referral = rows[0]
        return referral

    async def published(self, referral_id: str) -> list[str]:
        """The referral's events on the domain topic's outbox rows, by short type, in order."""
        query = (
            select(OutboxMessage)
            .where(col(OutboxMessage.topic) == self.runtime.settings.topic(topics.REFERRALS))
            .order_by(col(OutboxMessage.id))
        )
        async with self.runtime.db.transaction() as session:
            rows = list((await session.execute(query)).scalars())
        return [
            row.event_type.split(".")[-2]
            for row in rows
            if json.loads(row.value or b"{}").get("referral_id") == referral_id
        ]


def handover(family: Family, **changes: Any) -> HandoverRequested:
    values: dict[str, Any] = {
        "handover_id": str(uuid.uuid4()),
        "case_id": family.case_id,
        "bezirk": family.bezirk,
        "module": MODULE,
        "consent_ref": family.consent_id,
        "requested_by_role": Role.BABYLOTSE,
        "requested_at": START,
    }
    values.update(changes)
    return HandoverRequested(**values)


def visit_wishing(family: Family) -> VisitCompleted:
    """A completed welcome visit after which the family wished for a Träger's offer."""
    return VisitCompleted(
        visit_id=str(uuid.uuid4()),
        case_id=family.case_id,
        bezirk=family.bezirk,
        familienbuero="familienbuero-hoerde",
        scheduled_for=START,
        completed_at=START,
        informed_about_offers=True,
        needs_noted=True,
        referral_wished_module=MODULE,
        days_since_reference=10,
    )


def erasure(family: Family) -> FamilyErased:
    """The family's data erased at its request, an hour after the start."""
    return FamilyErased(
        case_id=family.case_id,
        bezirk=family.bezirk,
        erased_at=START + timedelta(hours=1),
        key_id=family.kid,
        reason=ErasureReason.REQUEST,
    )


def answer(referral: Referral, what: PartnerAnswer, **changes: Any) -> PartnerReferralAnswer:
    values: dict[str, Any] = {
        "referral_id": referral.referral_id,
        "case_id": referral.case_id,
        "traeger": referral.traeger,
        "answer": what,
        "occurred_at": START,
    }
    values.update(changes)
    return PartnerReferralAnswer(**values)


@asynccontextmanager
async def fed(database_url: str, prefix: str) -> AsyncIterator[Fed]:
    clock = Clock()
    keyring = StaticKeyring()
    # Nothing listens on the bootstrap address: the test must not need a broker.
    app = create_app(settings("127.0.0.1:1", database_url, prefix), clock=clock, keyring=keyring)
    async with without_broker(app) as runtime:
        # One consumer group reads the domain topics and the Träger's answers alike.
        feed = InProcessFeed(runtime, "main")
        yield Fed(
            runtime,
            keyring,
            clock,
            feed,
            feed,
        )


async def test_family_registered_records_the_case_and_its_consents(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        event = family.registered()
        assert await service.main.send(event, event_id="reg-1") == "ok"
        assert await service.main.send(event, event_id="reg-1") == "duplicate"
        [case] = await service.rows(Case, case_id=family.case_id)
        assert (case.bezirk, case.clinic_id, case.erased_at) == ("hoerde", event.clinic_id, None)
        consents = await service.rows(ConsentRecord, case_id=family.case_id)
        assert {(c.consent_id, c.state) for c in consents} >= {(family.consent_id, "given")}
        assert len(consents) == 2
        # Not the catalogue's consumer: a record that is no CloudEvent is dead-lettered.
        assert await service.main.send_raw(b"{}", [("ce_type", b"nonsense")]) == "dead_lettered"
        assert service.main.dead_letters[-1].stage == "envelope"


async def test_domain_events_count_only_from_their_own_topics(
    database_url: str, topic_prefix: str
) -> None:
    """One consumer group reads the domain topics and the Träger's answer topics: a family's
    registration written onto a Träger's answer topic is refused there and keeps nothing, not
    even its event id, which the real registration from intake then takes."""
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        event = family.registered()
        answers = service.runtime.settings.topic(topics.partner_responses(TRAEGER))
        assert await service.main.send(event, event_id="reg-7", topic=answers) == "dead_lettered"
        assert service.main.dead_letters[-1].stage == "rejected"
        assert "is not read from topic" in service.main.dead_letters[-1].reason
        assert await service.rows(Case, case_id=family.case_id) == []
        service.keyring.families[family.case_id] = family.in_keyring()
        assert await service.main.send(event, event_id="reg-7") == "ok"
        assert len(await service.rows(Case, case_id=family.case_id)) == 1
        # And an answer on a domain topic is refused the same way.
        await service.handover(family)
        referral = await service.referral(family.case_id)
        accepted = answer(referral, PartnerAnswer.ACCEPTED).to_cloudevent(
            source=f"/partner/{TRAEGER}"
        )
        intake = service.runtime.settings.topic(topics.INTAKE)
        assert await service.partners.send(accepted, topic=intake) == "dead_lettered"
        assert (await service.referral(family.case_id)).status == "requested"


async def test_a_handover_becomes_a_referral_once(database_url: str, topic_prefix: str) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        event = handover(family)
        assert await service.main.send(event, event_id="ho-1") == "ok"
        assert await service.main.send(event, event_id="ho-1") == "duplicate"
        # The same handover again under a new event id: still one wish, one referral.
        assert await service.main.send(event, event_id="ho-2") == "ok"
        referral = await service.referral(family.case_id)
        assert (referral.traeger, referral.origin, referral.status) == (
            TRAEGER,
            "handover",
            "requested",
        )
        assert referral.handover_id == event.handover_id
        [wish] = await service.rows(Wish, case_id=family.case_id)
        assert (wish.state, wish.referral_id) == ("placed", referral.referral_id)
        assert await service.published(referral.referral_id) == ["referral-requested"]
        # A module the city does not offer is refused, not stored as a wish.
        unknown = handover(family, module="zauberkurs")
        assert await service.main.send(unknown) == "dead_lettered"
        assert "not in the offer catalogue" in service.main.dead_letters[-1].reason
        assert len(await service.rows(Wish, case_id=family.case_id)) == 1


async def test_a_withdrawn_consent_cancels_the_referrals_resting_on_it(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        await service.handover(family)
        referral = await service.referral(family.case_id)
        withdrawn = family.consent_changed(ConsentState.WITHDRAWN, START + timedelta(minutes=5))
        assert await service.main.send(withdrawn, event_id="cc-1") == "ok"
        assert await service.main.send(withdrawn, event_id="cc-1") == "duplicate"
        referral = await service.referral(family.case_id)
        assert (referral.status, referral.cancel_reason) == ("cancelled", "consent_withdrawn")
        assert await service.published(referral.referral_id) == [
            "referral-requested",
            "referral-cancelled",
        ]
        # An older change arriving late is stale: the consent stays withdrawn.
        late = family.consent_changed(ConsentState.GIVEN, START)
        assert await service.main.send(late) == "ok"
        [consent] = await service.rows(ConsentRecord, consent_id=family.consent_id)
        assert consent.state == "withdrawn"


async def test_a_visit_wish_is_placed_with_a_consented_traeger(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        visit = visit_wishing(family)
        assert await service.main.send(visit, event_id="v-1") == "ok"
        assert await service.main.send(visit, event_id="v-1") == "duplicate"
        referral = await service.referral(family.case_id)
        assert (referral.origin, referral.visit_id, referral.traeger) == (
            "visit",
            visit.visit_id,
            TRAEGER,
        )
        assert referral.requested_by_role == "familienbuero"
        # A visit without a wish asks for nothing; one for an unknown module is refused.
        quiet = visit.model_copy(
            update={"visit_id": str(uuid.uuid4()), "referral_wished_module": None}
        )
        assert await service.main.send(quiet) == "ok"
        unknown = visit.model_copy(
            update={"visit_id": str(uuid.uuid4()), "referral_wished_module": "zauberkurs"}
        )
        assert await service.main.send(unknown) == "dead_lettered"
        assert len(await service.rows(Wish, case_id=family.case_id)) == 1


async def test_an_erasure_cancels_drops_and_stays(database_url: str, topic_prefix: str) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        await service.handover(family)
        erased = erasure(family)
        assert await service.main.send(erased, event_id="er-1") == "ok"
        assert await service.main.send(erased, event_id="er-1") == "duplicate"
        referral = await service.referral(family.case_id)
        assert (referral.status, referral.cancel_reason) == ("cancelled", "case_erased")
        assert await service.rows(ConsentRecord, case_id=family.case_id) == []
        # A family-registered arriving late does not bring the family back.
        assert await service.main.send(family.registered()) == "ok"
        [case] = await service.rows(Case, case_id=family.case_id)
        assert case.erased_at is not None
        assert await service.rows(ConsentRecord, case_id=family.case_id) == []
        # Nor does a handover: the wish cannot be placed for an erased family.
        await service.handover(family)
        wishes = await service.rows(Wish, case_id=family.case_id, state="open")
        assert [w.problem for w in wishes] == ["case_id: the family's data was erased"]


async def test_a_merge_moves_waiting_referrals_to_the_survivor(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        duplicate, survivor = Family(), Family()
        await service.register(duplicate)
        await service.register(survivor)
        await service.handover(duplicate)
        before = await service.referral(duplicate.case_id)
        merge = CasesMerged(
            merged_case_id=duplicate.case_id,
            surviving_case_id=survivor.case_id,
            bezirk=survivor.bezirk,
            merged_bezirk=duplicate.bezirk,
            merged_at=START + timedelta(hours=1),
            merged_by_role=Role.FAMILIENBUERO,
        )
        assert await service.main.send(merge, event_id="m-1") == "ok"
        assert await service.main.send(merge, event_id="m-1") == "duplicate"
        before = await service.referral(duplicate.case_id)
        assert (before.status, before.cancel_reason) == ("cancelled", "duplicate")
        moved = await service.referral(survivor.case_id)
        assert (moved.status, moved.module, moved.consent_ref) == (
            "requested",
            MODULE,
            survivor.consent_id,
        )
        [wish] = await service.rows(Wish, case_id=survivor.case_id)
        assert (wish.state, wish.referral_id) == ("placed", moved.referral_id)


async def test_partner_answers_take_steps_and_foreign_ones_are_refused(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        await service.handover(family)
        referral = await service.referral(family.case_id)
        own_topic = service.runtime.settings.topic(topics.partner_responses(TRAEGER))

        async def send(event: PartnerReferralAnswer, topic: str = own_topic, **kw: Any) -> str:
            source = kw.pop("source", event.partner_source())
            cloudevent = event.to_cloudevent(source=source, **kw)
            return await service.partners.send(cloudevent, topic=topic)

        accepted = answer(referral, PartnerAnswer.ACCEPTED)
        assert await send(accepted, event_id="a-1") == "ok"
        assert await send(accepted, event_id="a-1") == "duplicate"
        referral = await service.referral(family.case_id)
        assert referral.status == "accepted"
        steps = await service.rows(ReferralStep, referral_id=referral.referral_id)
        assert [(s.step, s.actor_role, s.event_id) for s in steps][-1] == (
            "accepted",
            "traeger",
            "a-1",
        )
        # Another Träger answers for this referral, on its own topic: not its to answer.
        other_topic = service.runtime.settings.topic(topics.partner_responses(OTHER_TRAEGER))
        foreign = answer(referral, PartnerAnswer.COMPLETED, traeger=OTHER_TRAEGER)
        assert await send(foreign, topic=other_topic) == "dead_lettered"
        assert service.partners.dead_letters[-1].reason == (
            f"referral {referral.referral_id} is not addressed to Träger {OTHER_TRAEGER}"
        )
        # The right Träger on another's topic, or under another source, is refused too.
        assert await send(answer(referral, PartnerAnswer.IN_PROGRESS), other_topic) == (
            "dead_lettered"
        )
        assert "not on its own topic" in service.partners.dead_letters[-1].reason
        impostor = answer(referral, PartnerAnswer.IN_PROGRESS)
        assert await send(impostor, source=f"/partner/{OTHER_TRAEGER}") == "dead_lettered"
        assert "does not match" in service.partners.dead_letters[-1].reason
        # A step the lifecycle does not allow from accepted, and one from the future.
        assert await send(answer(referral, PartnerAnswer.RECEIVED)) == "dead_lettered"
        assert service.partners.dead_letters[-1].reason.startswith(
            f"referral {referral.referral_id}: "
        )
        future = answer(referral, PartnerAnswer.IN_PROGRESS, occurred_at=START + timedelta(days=1))
        assert await send(future) == "dead_lettered"
        assert "lies in the future" in service.partners.dead_letters[-1].reason
        referral = await service.referral(family.case_id)
        assert referral.status == "accepted"
        assert await service.published(referral.referral_id) == [
            "referral-requested",
            "referral-accepted",
        ]
