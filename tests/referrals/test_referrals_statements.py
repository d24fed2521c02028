"""Statements a handled event sends to the database (issue 20: ORM work per event).

Counted, not timed: a registration reads the stored forms of all its consents in one
query, not one get per consent; a handover's wish that waits is inserted once with its
outcome, one that is placed is inserted open and updated once placed, after its disclosure
was sealed outside any transaction; a Träger's answer takes its step without a savepoint."""

from __future__ import annotations

from typing import Any

from lotse_contracts import topics
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.partner import PartnerAnswer
from lotse_referrals.tables import Case, ConsentRecord, Referral, Wish

from tests.referrals.helpers import TRAEGER, Family, transactions_open_while_sealing
from tests.referrals.test_referrals_handlers import (
    OTHER_TRAEGER,
    answer,
    erasure,
    fed,
    handover,
    visit_wishing,
)
from tests.support import statements_sent


async def test_a_registration_reads_its_consents_in_one_query(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        registered = family.registered()
        assert len(registered.consents) == 2
        engine = service.runtime.db.engine.sync_engine
        with statements_sent(engine) as seen:
            assert await service.main.send(registered) == "ok"
            # Sent again as a new event: both consents are found stored, none is added.
            again = registered.model_copy()
            assert await service.main.send(again, event_id="reg-again") == "ok"
        consent_reads = [s for s in seen if s.startswith("SELECT referrals_consent.")]
        assert len(consent_reads) == 2, consent_reads  # one per delivery
        stored = await service.rows(ConsentRecord, case_id=family.case_id)
        assert sorted((c.consent_id, c.state) for c in stored) == sorted(
            (c.consent_id, c.state.value) for c in registered.consents
        )


async def test_a_handover_writes_its_wish_with_its_outcome(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        placed, waiting = Family(), Family()
        await service.register(placed)
        await service.register(waiting)
        engine = service.runtime.db.engine.sync_engine
        with statements_sent(engine) as seen:
            await service.handover(placed)
            # A Träger the family's consent does not name: the wish waits, written once as well.
            await service.handover(waiting, traeger=OTHER_TRAEGER)
        wish_writes = [
            s for s in seen if s.startswith(("INSERT INTO referrals_wish", "UPDATE referrals_wish"))
        ]
        # Placed: inserted open with the event, updated by the placement once intake sealed
        # its disclosure. Waiting (nothing for intake to seal): inserted once, as it stays.
        assert [s.split()[0] for s in wish_writes] == ["INSERT", "UPDATE", "INSERT"], wish_writes
        [done] = await service.rows(Wish, case_id=placed.case_id)
        referral = await service.referral(placed.case_id)
        assert (done.state, done.referral_id) == ("placed", referral.referral_id)
        [open_wish] = await service.rows(Wish, case_id=waiting.case_id)
        assert open_wish.state == "open"
        assert open_wish.waiting_for is not None
        assert await service.rows(Referral, case_id=waiting.case_id) == []


async def test_an_answer_is_written_without_a_savepoint(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        await service.handover(family)
        referral = await service.referral(family.case_id)
        topic = service.runtime.settings.topic(topics.partner_responses(TRAEGER))
        engine = service.runtime.db.engine.sync_engine
        received = answer(referral, PartnerAnswer.RECEIVED)
        with statements_sent(engine) as seen:
            sent = received.to_cloudevent(source=received.partner_source())
            assert await service.partners.send(sent, topic=topic) == "ok"
        # The referral is locked as it is read; the step needs no savepoint to be retried in.
        assert not [s for s in seen if "SAVEPOINT" in s.upper()], seen
        referral_writes = [s for s in seen if s.startswith("UPDATE referrals_referral ")]
        assert len(referral_writes) == 1, referral_writes
        assert "version" in referral_writes[0]
        assert (await service.referral(family.case_id)).status == "received"


async def test_a_handover_seals_its_disclosure_outside_any_transaction(
    database_url: str, topic_prefix: str
) -> None:
    """Intake is another service: while it seals a referral's disclosure, the consumer
    holds no transaction open (on SQLite that would be the service's only write lock, and
    every event behind the handover would wait for intake too)."""
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        await service.register(family)
        with transactions_open_while_sealing(service.runtime, service.keyring) as seen:
            await service.handover(family)
        assert set(seen) == {0}, seen  # sealed, and always with no transaction open
        referral = await service.referral(family.case_id)
        assert referral.disclosed_fields
        [wish] = await service.rows(Wish, case_id=family.case_id)
        assert (wish.state, wish.referral_id) == ("placed", referral.referral_id)


def _values(params: Any) -> list[Any]:
    """A statement's parameters as a flat list (a tuple, a dict, or lists of them)."""
    if isinstance(params, dict):
        params = list(params.values())
    found: list[Any] = []
    for value in params or ():
        found.extend(_values(value) if isinstance(value, (list, tuple, dict)) else [value])
    return found


async def test_a_batch_of_registrations_reads_what_they_need_once_and_stores_as_one_by_one(
    database_url: str, topic_prefix: str
) -> None:
    """The consumer's batch reads the cases, consents and open wishes of all its
    registrations in one query each (``read_registrations``), and each registration then
    finds what the batch's events before it changed: a case registered twice, a wish a visit
    of the same batch left open, a handover right after its family's registration."""
    async with fed(database_url, topic_prefix) as service:
        wished, again, erased = Family(), Family(), Family()
        fresh, twice, visited = Family(), Family(), Family()
        for family in (wished, again, erased, fresh, twice, visited):
            service.keyring.families[family.case_id] = family.in_keyring()
        # Before the batch: a visit's wish waiting for its family, a family registered
        # already, and one erased.
        assert await service.main.send(visit_wishing(wished)) == "ok"
        registered_again = again.registered()
        assert await service.main.send(registered_again) == "ok"
        await service.register(erased)
        assert await service.main.send(erasure(erased)) == "ok"
        registered_twice = twice.registered()
        batch: list[EventModel] = [  # each a new event (its own id)
            wished.registered(),
            registered_again,
            erased.registered(),
            fresh.registered(),
            handover(fresh),
            registered_twice,
            registered_twice,
            visit_wishing(visited),
            visited.registered(),
        ]
        engine = service.runtime.db.engine.sync_engine
        with statements_sent(engine) as seen:
            assert await service.main.send_batch(batch) == len(batch)
        case_reads = [s for s in seen if s.startswith("SELECT referrals_case.")]
        batch_reads = [s for s in case_reads if " IN " in s or "ANY" in s]
        assert len(batch_reads) == 1, case_reads
        # Read by key only by the placements (after the batch's commit): not for a family
        # the batch found stored, erased or registered twice.
        quiet = {again.case_id, erased.case_id, twice.case_id}
        for sql, params in zip(seen, seen.parameters, strict=True):
            if sql.startswith("SELECT referrals_case.") and sql not in batch_reads:
                assert not quiet & set(_values(params)), sql
        wish_locks = [
            s
            for s in seen
            if "ORDER BY referrals_wish.created_at" in s and "referrals_wish.case_id =" in s
        ]
        assert len(wish_locks) == 2, wish_locks  # wished and visited: their wishes only
        for family in (wished, fresh, visited):
            referral = await service.referral(family.case_id)
            assert referral.traeger == TRAEGER
        for family in (again, fresh, twice, visited, wished):
            [case] = await service.rows(Case, case_id=family.case_id)
            assert case.erased_at is None
            consents = await service.rows(ConsentRecord, case_id=family.case_id)
            assert len(consents) == 2
        [case] = await service.rows(Case, case_id=erased.case_id)
        assert case.erased_at is not None
        assert await service.rows(ConsentRecord, case_id=erased.case_id) == []
        assert await service.rows(Wish, case_id=twice.case_id) == []
