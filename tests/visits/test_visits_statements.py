"""Statements a handled event sends to the database (issue 20: ORM work per event).

Counted, not timed. A registration whose case an earlier consent change filed under
another office locks both offices; on SQLite the first lock already holds the database's
only write lock, so the case is read once."""

from __future__ import annotations

import uuid

from lotse_contracts.events.common import ConsentState

from tests.support import statements_sent
from tests.visits.harness import START, consent_changed, registered
from tests.visits.test_visits_handlers import fed


async def test_a_case_filed_elsewhere_is_read_once_per_lock_needed(database_url: str) -> None:
    async with fed(database_url) as service:
        consent_id = str(uuid.uuid4())
        case_id = str(uuid.uuid4())
        early = consent_changed(
            case_id, ConsentState.GIVEN, START, bezirk="eving", consent_id=consent_id
        )
        assert await service.feed.send(early) == "ok"
        engine = service.runtime.db.engine.sync_engine
        with statements_sent(engine) as seen:
            outcome = await service.feed.send(
                registered(case_id, bezirk="hoerde", consent_id=consent_id)
            )
        assert outcome == "ok"
        case_reads = [
            s
            for s in seen
            if s.startswith("SELECT visits_case.") and "WHERE visits_case.case_id =" in s
        ]
        # PostgreSQL reads again after the second lock: its holder may have changed the case.
        assert len(case_reads) == (1 if database_url.startswith("sqlite") else 2), case_reads
        case = await service.case(case_id)
        assert case is not None
        assert (case.bezirk, case.state) == ("hoerde", "active")
        [visit] = await service.visits(case_id)
        assert (visit.bezirk, visit.status) == ("hoerde", "scheduled")


async def test_a_batch_locks_each_office_once_and_books_as_one_by_one(database_url: str) -> None:
    """A consumer batch's registrations of one office take its lock with the first of them
    (the lock holds until the transaction ends); each is still booked with the visits the
    ones before it booked in view, so no two share a staff member's slot."""
    async with fed(database_url) as service:
        for bezirk in ("hoerde", "eving"):  # the offices' rows exist from now on
            assert await service.feed.send(registered(bezirk=bezirk)) == "ok"
        families = [str(uuid.uuid4()) for _ in range(6)]
        others = [str(uuid.uuid4()) for _ in range(2)]
        batch = [registered(case_id, bezirk="hoerde") for case_id in families]
        batch += [registered(case_id, bezirk="eving") for case_id in others]
        engine = service.runtime.db.engine.sync_engine
        with statements_sent(engine) as seen:
            assert await service.feed.send_batch(batch) == len(batch)
        bumps = [s for s in seen if s.startswith("UPDATE visits_office")]
        assert len(bumps) == 2, bumps  # hoerde and eving, once each
        slots = []
        for case_id in families + others:
            [visit] = await service.visits(case_id)
            assert visit.status == "scheduled"
            slots.append((visit.staff_id, visit.starts_at))
        assert len(set(slots)) == len(slots)
