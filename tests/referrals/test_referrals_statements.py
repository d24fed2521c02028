"""Statements a handled event sends to the database (issue 20: ORM work per event).

Counted, not timed: a registration reads the stored forms of all its consents in one
query, not one get per consent; a handover's wish that waits is inserted once with its
outcome, one that is placed is inserted open and updated once placed, after its disclosure
was sealed outside any transaction; a Träger's answer takes its step without a savepoint."""

from __future__ import annotations

from typing import Any

from lotse_contracts import topics
from lotse_contracts.events.partner import PartnerAnswer
from lotse_referrals.tables import ConsentRecord, Referral, Wish
from sqlalchemy import event

from tests.referrals.helpers import TRAEGER, Family, transactions_open_while_sealing
from tests.referrals.test_referrals_handlers import OTHER_TRAEGER, answer, fed


async def test_a_registration_reads_its_consents_in_one_query(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        registered = family.registered()
        assert len(registered.consents) == 2
        engine = service.runtime.db.engine.sync_engine
        seen: list[str] = []

        def record(*args: Any) -> None:
            seen.append(" ".join(str(args[2]).split()))

        event.listen(engine, "before_cursor_execute", record)
        try:
            assert await service.main.send(registered) == "ok"
            # Sent again as a new event: both consents are found stored, none is added.
            again = registered.model_copy()
            assert await service.main.send(again, event_id="reg-again") == "ok"
        finally:
            event.remove(engine, "before_cursor_execute", record)
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
        seen: list[str] = []

        def record(*args: Any) -> None:
            seen.append(" ".join(str(args[2]).split()))

        event.listen(engine, "before_cursor_execute", record)
        try:
            await service.handover(placed)
            # A Träger the family's consent does not name: the wish waits, written once as well.
            await service.handover(waiting, traeger=OTHER_TRAEGER)
        finally:
            event.remove(engine, "before_cursor_execute", record)
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
        seen: list[str] = []

        def record(*args: Any) -> None:
            seen.append(" ".join(str(args[2]).split()))

        received = answer(referral, PartnerAnswer.RECEIVED)
        event.listen(engine, "before_cursor_execute", record)
        try:
            sent = received.to_cloudevent(source=received.partner_source())
            assert await service.partners.send(sent, topic=topic) == "ok"
        finally:
            event.remove(engine, "before_cursor_execute", record)
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
