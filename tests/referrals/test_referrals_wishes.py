"""Every wish ends somewhere (issue 18): a handover or a visit's referral wish that cannot
become a referral is listed for the Familienbüro of its Bezirk with what it waits for, is
placed at once when something changes that could unblock it (a consent, a freed place, a
catalogue edit), can be placed by the Familienbüro with one call naming the Träger (behind
the consent gate), and is escalated to the Bezirksteam once when it stays open too long.

In process: the real database, inbox and outbox, the HTTP API through ASGI, no broker."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from lotse_contracts import topics
from lotse_contracts.events.common import ConsentScope, ConsentState, Role
from lotse_contracts.events.intake import ConsentChanged
from lotse_contracts.events.partner import PartnerAnswer
from lotse_referrals import operations as ops
from lotse_referrals.app import create_app
from lotse_referrals.keyring import StaticKeyring
from lotse_referrals.tables import CatalogueTraeger, Referral, Wish
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.outbox import OutboxMessage
from lotse_runtime.testing import InProcessFeed, without_broker
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlmodel import col

from tests.referrals.helpers import (
    FAMILIENBUERO,
    FAMILIENBUERO_EVING,
    KOORDINATION,
    MODULE,
    START,
    TRAEGER,
    Clock,
    Family,
    settings,
    transactions_open_while_sealing,
)
from tests.referrals.test_referrals_handlers import answer, handover

WISH_ESCALATED = "de.lotse.referrals.wish-escalated.v1"


@dataclass
class Service:
    runtime: ServiceRuntime[Any]
    http: httpx.AsyncClient
    clock: Clock
    keyring: StaticKeyring
    main: InProcessFeed
    partners: InProcessFeed

    async def register(self, family: Family) -> None:
        self.keyring.families[family.case_id] = family.in_keyring()
        assert await self.main.send(family.registered()) == "ok"

    async def rows(self, model: Any, **where: Any) -> list[Any]:
        query = select(model)
        for name, value in where.items():
            query = query.where(col(getattr(model, name)) == value)
        async with self.runtime.db.transaction() as session:
            return list((await session.execute(query)).scalars())

    async def wish(self, family: Family) -> Wish:
        [wish] = await self.rows(Wish, case_id=family.case_id)
        assert isinstance(wish, Wish)
        return wish

    async def capacity(self, slug: str, places: int) -> None:
        async with self.runtime.db.transaction() as session:
            await session.execute(
                update(CatalogueTraeger)
                .where(col(CatalogueTraeger.slug) == slug)
                .values(capacity_per_month=places)
            )

    async def consent(
        self, family: Family, traeger: str | None, purpose: str | None = None
    ) -> ConsentChanged:
        """The family gives a traeger_contact consent naming ``traeger`` (intake's event)."""
        self.clock.set(self.clock.now + timedelta(minutes=1))
        event = ConsentChanged(
            case_id=family.case_id,
            bezirk=family.bezirk,
            consent_id=str(uuid.uuid4()),
            scope=ConsentScope.TRAEGER_CONTACT,
            traeger=traeger,
            purpose=purpose,
            state=ConsentState.GIVEN,
            changed_at=self.clock.now,
            changed_by_role=Role.FAMILIENBUERO,
        )
        if traeger is not None:  # intake's keyring knows it too
            self.keyring.families[family.case_id].traeger_consents[event.consent_id] = traeger
        assert await self.main.send(event) == "ok"
        return event

    async def outbox(self, event_type: str) -> list[OutboxMessage]:
        query = select(OutboxMessage).where(col(OutboxMessage.event_type) == event_type)
        async with self.runtime.db.transaction() as session:
            return list((await session.execute(query)).scalars())


@asynccontextmanager
async def service(database_url: str, prefix: str, **extra: Any) -> AsyncIterator[Service]:
    clock = Clock()
    keyring = StaticKeyring()
    app = create_app(
        settings("127.0.0.1:1", database_url, prefix, **extra), clock=clock, keyring=keyring
    )
    async with without_broker(app) as runtime:
        # One consumer group reads the domain topics and the Träger's answers alike.
        feed = InProcessFeed(runtime, "main")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Service(
                runtime,
                http,
                clock,
                keyring,
                feed,
                feed,
            )


def traegerless(bezirk: str = "hoerde") -> Family:
    """A family whose traeger_contact consent names no Träger ("the Familienbüro chooses")."""
    return Family(bezirk=bezirk, traeger=None, purpose=None)


async def test_a_wish_without_a_named_traeger_waits_visibly_and_a_consent_places_it(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix) as svc:
        family = traegerless()
        await svc.register(family)
        event = handover(family)
        assert await svc.main.send(event) == "ok"
        wish = await svc.wish(family)
        assert (wish.state, wish.waiting_for) == ("open", "consent")

        listed = (await svc.http.get("/bezirke/hoerde/wishes", headers=FAMILIENBUERO)).json()
        [entry] = [w for w in listed if w["case_id"] == family.case_id]
        assert entry["waiting_for"] == "consent"
        assert f"/wishes/{wish.wish_id}/placement" in entry["problem"]
        # Another Bezirk's Familienbüro sees nothing of it.
        other = await svc.http.get("/bezirke/hoerde/wishes", headers=FAMILIENBUERO_EVING)
        assert other.status_code == 403

        # Placing it with a Träger no consent names: refused, and nothing changes.
        refused = await svc.http.post(
            f"/wishes/{wish.wish_id}/placement", json={"traeger": TRAEGER}, headers=FAMILIENBUERO
        )
        assert refused.status_code == 409, refused.text
        assert refused.json()["errors"][0]["field"] == "consent_ref"
        after = await svc.wish(family)
        assert (after.state, after.problem, after.updated_at) == (
            "open",
            wish.problem,
            wish.updated_at,
        )
        assert await svc.rows(Referral, case_id=family.case_id) == []

        # The family's consent naming the Träger arrives: the wish is placed at once.
        await svc.consent(family, TRAEGER, MODULE)
        placed = await svc.wish(family)
        [referral] = await svc.rows(Referral, case_id=family.case_id)
        assert (placed.state, placed.referral_id, placed.waiting_for) == (
            "placed",
            referral.referral_id,
            None,
        )
        assert (referral.traeger, referral.handover_id) == (TRAEGER, event.handover_id)


async def test_the_familienbuero_places_a_wish_with_the_traeger_it_chooses(
    database_url: str, topic_prefix: str
) -> None:
    module, wished = "aufsuchende-elternberatung", "familienhilfe-ruhrbogen"
    chosen = "elternberatung-unterwegs"
    async with service(database_url, topic_prefix) as svc:
        family = Family(bezirk="brackel", traeger=wished, purpose=module)
        await svc.register(family)
        await svc.capacity(wished, 0)  # the Träger the handover names is full
        assert await svc.main.send(handover(family, module=module, traeger=wished)) == "ok"
        wish = await svc.wish(family)
        assert (wish.state, wish.waiting_for) == ("open", "capacity")

        url = f"/wishes/{wish.wish_id}/placement"
        body = {"traeger": chosen}
        # Not the caller's Bezirk: refused like an unknown wish.
        assert (await svc.http.post(url, json=body, headers=FAMILIENBUERO)).status_code == 403
        brackel = _familienbuero("brackel")
        # No consent of the family names the chosen Träger yet: 409, nothing stored.
        refused = await svc.http.post(url, json=body, headers=brackel)
        assert refused.status_code == 409
        assert refused.json()["errors"][0]["field"] == "consent_ref"
        # A field the API does not know is named.
        bad = await svc.http.post(url, json={"traeger": chosen, "x": 1}, headers=brackel)
        assert bad.status_code == 422

        await svc.consent(family, chosen, module)
        assert (await svc.wish(family)).state == "open"  # still bound to the named Träger
        placed = await svc.http.post(url, json=body, headers=brackel)
        assert placed.status_code == 201, placed.text
        assert placed.json()["state"] == "placed"
        [referral] = await svc.rows(Referral, case_id=family.case_id)
        assert (referral.traeger, referral.requested_by_role) == (chosen, "familienbuero")
        again = await svc.http.post(url, json=body, headers=brackel)
        assert again.status_code == 409
        assert again.json()["errors"][0]["field"] == "wish_id"


async def test_the_familienbueros_placement_has_intake_seal_outside_its_transaction(
    database_url: str, topic_prefix: str
) -> None:
    """``POST /wishes/{id}/placement``: the wish, the caller's access and the gates are read,
    intake seals while the request holds no transaction, then the referral is created with
    that disclosure. Another Bezirk's Familienbüro is refused before intake is asked."""
    module, wished = "aufsuchende-elternberatung", "familienhilfe-ruhrbogen"
    chosen = "elternberatung-unterwegs"
    async with service(database_url, topic_prefix) as svc:
        family = Family(bezirk="brackel", traeger=wished, purpose=module)
        await svc.register(family)
        await svc.capacity(wished, 0)
        assert await svc.main.send(handover(family, module=module, traeger=wished)) == "ok"
        await svc.consent(family, chosen, module)
        wish = await svc.wish(family)
        assert (wish.state, wish.waiting_for) == ("open", "capacity")
        url = f"/wishes/{wish.wish_id}/placement"
        body = {"traeger": chosen}
        with transactions_open_while_sealing(svc.runtime, svc.keyring) as seen:
            other = await svc.http.post(url, json=body, headers=FAMILIENBUERO)
            assert other.status_code == 403, other.text
            assert seen == []
            placed = await svc.http.post(url, json=body, headers=_familienbuero("brackel"))
            assert placed.status_code == 201, placed.text
        assert set(seen) == {0}, seen  # sealed, and always with no transaction open
        [referral] = await svc.rows(Referral, case_id=family.case_id)
        assert referral.traeger == chosen
        assert referral.disclosed_fields
        assert placed.json()["referral_id"] == referral.referral_id
        requested = await svc.outbox("de.lotse.referrals.referral-requested.v1")
        assert any(referral.referral_id in (row.value or b"").decode() for row in requested)


def _familienbuero(bezirk: str) -> dict[str, str]:
    from tests.support import bearer

    return bearer("familienbuero", subject=f"fb-{bezirk}", bezirk=bezirk)


async def test_a_freed_place_and_a_catalogue_edit_place_waiting_wishes_at_once(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix) as svc:
        await svc.capacity(TRAEGER, 1)
        first, second, third = Family(), Family(), Family()
        for family in (first, second, third):
            svc.clock.set(svc.clock.now + timedelta(minutes=1))  # oldest first
            await svc.register(family)
            assert await svc.main.send(handover(family)) == "ok"
        [taken] = await svc.rows(Referral, case_id=first.case_id)
        assert (await svc.wish(second)).waiting_for == "capacity"
        assert (await svc.wish(third)).waiting_for == "capacity"

        # The Träger rejects the first: its place goes to the oldest waiting wish at once.
        rejected = answer(taken, PartnerAnswer.REJECTED, reason="no_capacity")
        own_topic = svc.runtime.settings.topic(topics.partner_responses(TRAEGER))
        outcome = await svc.partners.send(rejected, topic=own_topic)
        assert outcome == "ok", svc.partners.dead_letters
        assert (await svc.wish(second)).state == "placed", (await svc.wish(second)).problem
        assert (await svc.wish(third)).state == "open"

        # City-wide coordination raises the capacity: the third is placed at once.
        patched = await svc.http.patch(
            f"/catalogue/traeger/{TRAEGER}", json={"capacity_per_month": 5}, headers=KOORDINATION
        )
        assert patched.status_code == 200, patched.text
        assert (await svc.wish(third)).state == "placed"


async def test_a_wish_open_too_long_is_escalated_to_the_bezirksteam_once(
    database_url: str, topic_prefix: str
) -> None:
    async with service(database_url, topic_prefix, wish_escalation_working_days=2) as svc:
        family = traegerless()
        await svc.register(family)
        assert await svc.main.send(handover(family)) == "ok"
        wish = await svc.wish(family)

        # Thursday 17 April + 2 working days (Good Friday and Easter Monday do not count)
        # = Wednesday 23 April: not yet on that day, on the next.
        svc.clock.set(START + timedelta(days=6))
        await _escalate(svc)
        assert await svc.outbox(WISH_ESCALATED) == []
        svc.clock.set(START + timedelta(days=7))
        await _escalate(svc)
        await _escalate(svc)
        rows = await svc.outbox(WISH_ESCALATED)
        feeds = sorted(r.topic for r in rows)
        assert feeds == sorted(
            [f"{topic_prefix}lotse.referrals", f"{topic_prefix}lotse.bezirk.hoerde"]
        )
        data = json.loads(rows[0].value or b"{}")
        assert data["wish_id"] == wish.wish_id
        assert data["waiting_for"] == "consent"
        assert data["working_days_open"] == 2
        assert (await svc.wish(family)).escalated_at is not None
        listed = (await svc.http.get("/bezirke/hoerde/wishes", headers=FAMILIENBUERO)).json()
        assert listed[0]["escalated_at"] is not None


async def _escalate(svc: Service) -> None:
    job = next(j for j in svc.runtime.jobs if j.name == "escalation")
    await job.run_once(svc.runtime)
    assert job.last_error is None, job.last_error


async def test_a_consent_that_places_a_waiting_wish_has_intake_seal_outside_its_transaction(
    database_url: str, topic_prefix: str
) -> None:
    """The consent arriving places the waiting wish as a handover's own placement does:
    its disclosure sealed by intake while the consumer holds no transaction."""
    async with service(database_url, topic_prefix) as svc:
        family = traegerless()
        await svc.register(family)
        assert await svc.main.send(handover(family)) == "ok"
        assert (await svc.wish(family)).waiting_for == "consent"
        with transactions_open_while_sealing(svc.runtime, svc.keyring) as seen:
            await svc.consent(family, TRAEGER, MODULE)
        assert set(seen) == {0}, seen  # sealed, and always with no transaction open
        placed = await svc.wish(family)
        [referral] = await svc.rows(Referral, case_id=family.case_id)
        assert (placed.state, placed.referral_id) == ("placed", referral.referral_id)
        assert referral.disclosed_fields


async def test_a_placement_that_meets_a_busy_database_is_tried_again(
    database_url: str, topic_prefix: str, monkeypatch: Any
) -> None:
    """The sealed wish's transaction fails on a busy database (SQLite's lock, a deadlock):
    the same wishes are claimed and placed in the next try, not left for the job."""
    real = ops._place_ready
    failures = [OperationalError("INSERT", {}, Exception("database is locked"))]

    async def busy_once(ctx: Any, ready: Any, now: Any) -> int:
        if failures:
            raise failures.pop()
        return await real(ctx, ready, now)

    monkeypatch.setattr(ops, "_place_ready", busy_once)
    async with service(database_url, topic_prefix) as svc:
        # The placement job places through the same step: stopped, so that the failure
        # is the handover's placement's, not a job pass's.
        for job in svc.runtime.jobs:
            if job.name == "placement":
                await job.stop()
        family = Family()
        await svc.register(family)
        assert await svc.main.send(handover(family)) == "ok"
        assert failures == []
        placed = await svc.wish(family)
        [referral] = await svc.rows(Referral, case_id=family.case_id)
        assert (placed.state, placed.referral_id) == ("placed", referral.referral_id)


async def test_a_referral_asked_for_over_http_has_intake_seal_outside_its_transaction(
    database_url: str, topic_prefix: str
) -> None:
    """``POST /referrals``: the caller's access and the gates are read, intake seals while
    the request holds no transaction, then the referral is created with that disclosure.
    Another Bezirk's Familienbüro is refused before intake is asked anything."""
    async with service(database_url, topic_prefix) as svc:
        family = Family()
        await svc.register(family)
        body = {
            "case_id": family.case_id,
            "module": MODULE,
            "traeger": TRAEGER,
            "consent_ref": family.consent_id,
        }
        with transactions_open_while_sealing(svc.runtime, svc.keyring) as seen:
            other = await svc.http.post("/referrals", json=body, headers=FAMILIENBUERO_EVING)
            assert other.status_code == 403, other.text
            assert seen == []
            created = await svc.http.post("/referrals", json=body, headers=FAMILIENBUERO)
            assert created.status_code == 201, created.text
        assert set(seen) == {0}, seen  # sealed, and always with no transaction open
        [referral] = await svc.rows(Referral, case_id=family.case_id)
        assert referral.referral_id == created.json()["referral_id"]
        assert referral.disclosed_fields
        requested = await svc.outbox("de.lotse.referrals.referral-requested.v1")
        assert any(referral.referral_id in (row.value or b"").decode() for row in requested)
