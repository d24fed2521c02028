"""Reporting's consumer handlers, fed in process (``lotse_runtime.testing``): the real
database, inbox, transaction and outbox, no broker. Every handled event type is applied, a
redelivered event is applied once, and an impossible or malformed event is dead-lettered
without changing a row. The paths through Kafka stay with test_reporting_service.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import ConsentScope, Role
from lotse_contracts.events.intake import CasesMerged, ErasureReason
from lotse_contracts.events.referrals import (
    ReferralCancelled,
    ReferralCancelReason,
    ReferralInProgress,
)
from lotse_reporting import domain, operations
from lotse_reporting.app import create_app
from lotse_reporting.consumers import CONSUMER
from lotse_reporting.operations import Reporting
from lotse_reporting.settings import ReportingSettings
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.testing import InProcessFeed, without_broker
from sqlalchemy import event, text

from tests.reporting.builders import Family, at, new_id


class Service:
    def __init__(self, runtime: ServiceRuntime[Any], reporting: Reporting) -> None:
        self.runtime = runtime
        self.reporting = reporting
        self.feed = InProcessFeed(runtime, CONSUMER)

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        async with self.runtime.db.transaction() as session:
            return [tuple(row) for row in await session.execute(text(sql))]


@pytest.fixture
async def service(database_url: str) -> AsyncIterator[Service]:
    settings = ReportingSettings(
        database_url=database_url,
        kafka_bootstrap="127.0.0.1:1",  # nothing listens: no broker is needed
        consumer_backoff_s=0.01,
        publish_interval_s=3600,  # the tests publish themselves
        publish_debounce_s=10,
    )
    app = create_app(settings)
    async with without_broker(app) as runtime:
        yield Service(runtime, app.state.reporting)


def _story() -> list[EventModel]:
    """One family's year through every event type the projections use, in order."""
    family = Family(bezirk="hoerde")
    twin = Family(bezirk="hoerde")
    day = at("2025-03-03")
    visit = new_id()
    helped, late, dropped = (family.referral(new_id()) for _ in range(3))
    ids = {
        "referral_id": dropped.referral_id,
        "case_id": family.case_id,
        "bezirk": family.bezirk,
        "traeger": "hebammenzentrum-dortmund",
        "module": dropped.module,
    }
    merged = CasesMerged.example().model_copy(
        update={
            "merged_case_id": twin.case_id,
            "case_id": family.case_id,
            "bezirk": family.bezirk,
        }
    )
    return [
        family.registered(day, traeger_consent=True),
        twin.registered(day),
        merged,
        family.consent(ConsentScope.TRAEGER_CONTACT, False, day + timedelta(days=1)),
        family.scheduled(visit, day, day + timedelta(days=7)),
        family.missed(visit, day + timedelta(days=7)),
        family.completed(visit, day + timedelta(days=9), day + timedelta(days=9), 12),
        family.declined(day + timedelta(days=10)),
        helped.requested(day + timedelta(days=10)),
        helped.received(day + timedelta(days=11)),
        helped.accepted(day + timedelta(days=11)),
        ReferralInProgress(
            **{**ids, "referral_id": helped.referral_id}, occurred_at=day + timedelta(days=12)
        ),
        helped.first_contact(day + timedelta(days=12), days=2),
        helped.completed(day + timedelta(days=40)),
        late.requested(day + timedelta(days=10)),
        late.escalated(day + timedelta(days=15)),
        late.rejected(day + timedelta(days=16)),
        dropped.requested(day + timedelta(days=10)),
        ReferralCancelled(
            **ids,
            occurred_at=day + timedelta(days=13),
            reason=ReferralCancelReason.CONSENT_WITHDRAWN,
            cancelled_by_role=Role.FAMILIENBUERO,
        ),
        family.erased(day + timedelta(days=60), ErasureReason.REQUEST),
    ]


async def test_every_handled_event_type_is_applied(service: Service) -> None:
    story = _story()
    assert {type(e) for e in story} == set(domain.HANDLED), "the story misses a type"
    outcomes = [await service.feed.send(event) for event in story]
    assert outcomes == ["ok"] * len(story), service.feed.dead_letters
    family, twin = story[0].case_id, story[1].case_id  # type: ignore[attr-defined]
    cases = await service.rows("SELECT case_id, erased, excluded FROM reporting_case")
    assert {c: (bool(e), bool(x)) for c, e, x in cases} == {
        family: (True, False),  # erased, still counted as registered
        twin: (False, True),  # merged into the family: counted nowhere
    }
    kinds = {kind for (kind,) in await service.rows("SELECT kind FROM reporting_fact")}
    assert {"offered", "missed", "completed", "declined", "requested"} <= kinds
    assert {"accepted", "first_contact", "rejected", "escalated"} <= kinds
    statuses = {s for (s,) in await service.rows("SELECT status FROM reporting_referral")}
    assert statuses == {"completed", "rejected", "cancelled"}
    # The escalation was closed by the rejection.
    assert await service.rows(
        "SELECT count(*) FROM reporting_fact WHERE kind = 'escalated' AND until IS NULL"
    ) == [(0,)]
    assert await service.rows("SELECT year FROM reporting_dirty_year") == [(2025,)]
    # Every record is in the live consumer's inbox, under the name the replay uses too.
    assert await service.rows("SELECT count(*) FROM inbox WHERE consumer = 'reporting.main'") == [
        (len(story),)
    ]
    # The publication job turns the facts into kpi-updated events, through the outbox.
    published = await operations.publish_figures(service.reporting)
    assert published > 0
    outbox = await service.rows("SELECT DISTINCT event_type FROM outbox")
    assert outbox == [("de.lotse.reporting.kpi-updated.v1",)]
    # The mark is cleared, not deleted: its version goes on from where it was.
    marks = await service.rows("SELECT year, version, cleared FROM reporting_dirty_year")
    assert [(year, version > 1, version == cleared) for year, version, cleared in marks] == [
        (2025, True, True)
    ]


async def test_a_redelivered_event_is_applied_once(service: Service) -> None:
    family = Family(bezirk="hoerde")
    day = at("2025-03-03")
    visit = new_id()
    scheduled = family.scheduled(visit, day, day + timedelta(days=7))
    assert await service.feed.send(family.registered(day)) == "ok"
    assert await service.feed.send(scheduled, event_id="visit-1") == "ok"
    facts = await service.rows("SELECT kind, ref FROM reporting_fact")
    assert await service.feed.send(scheduled, event_id="visit-1") == "duplicate"
    assert service.feed.consumer.duplicates == 1
    assert (
        await service.rows("SELECT kind, ref FROM reporting_fact") == facts == [("offered", visit)]
    )
    # The same event under a new id is another delivery: applied again, still one fact.
    assert await service.feed.send(scheduled, event_id="visit-2") == "ok"
    assert await service.rows("SELECT kind, ref FROM reporting_fact") == facts


async def test_impossible_and_malformed_events_are_dead_lettered(service: Service) -> None:
    family = Family(bezirk="hoerde")
    day = at("2025-03-03")
    assert await service.feed.send(family.registered(day)) == "ok"
    before = await service.rows("SELECT case_id, bezirk FROM reporting_case")

    # Impossible by the domain's rules: a Bezirk the city does not have, a no-show recorded
    # before its appointment.
    stranger = Family(bezirk="atlantis")
    assert await service.feed.send(stranger.registered(day)) == "dead_lettered"
    rejected = service.feed.dead_letters[-1]
    assert rejected.stage == "rejected"
    assert rejected.reason.startswith("bezirk: 'atlantis'")
    missed = family.missed(new_id(), day + timedelta(days=7))
    early = missed.model_copy(update={"recorded_at": missed.scheduled_for - timedelta(hours=1)})
    assert await service.feed.send(early) == "dead_lettered"
    assert service.feed.dead_letters[-1].reason.startswith("visit-missed: recorded_at")

    # Malformed: no CloudEvent at all, and data that is not the announced type's.
    assert await service.feed.send_raw(b"{not json", [("ce_type", b"x")]) == "dead_lettered"
    assert service.feed.dead_letters[-1].stage == "envelope"
    cloudevent = family.declined(day).to_cloudevent()
    broken = cloudevent.model_copy(update={"data": {"case_id": family.case_id}})
    assert await service.feed.send(broken) == "dead_lettered"
    assert service.feed.dead_letters[-1].stage == "schema"

    assert len(service.feed.dead_letters) == 4
    assert await service.rows("SELECT case_id, bezirk FROM reporting_case") == before
    assert await service.rows("SELECT count(*) FROM reporting_fact") == [(0,)]
    # The next good event goes through as if nothing had happened.
    assert await service.feed.send(family.declined(day)) == "ok"


async def test_a_batch_in_one_transaction_adds_to_the_cells_once_at_commit(
    service: Service,
) -> None:
    """The consumer applies a batch per transaction; the cells and dirty marks are written
    at its commit, summed over the batch, and equal those of one transaction per event."""
    story = _story()
    cells_sql = (
        "SELECT bezirk, period, figure, dimension, families, value, hits, weight "
        "FROM reporting_cell WHERE families != 0 OR value != 0 OR hits != 0 OR weight != 0 "
        "ORDER BY 1, 2, 3, 4"
    )
    numbers_sql = "SELECT * FROM reporting_cell_number WHERE count != 0 ORDER BY 1, 2, 3, 4, 5"
    rules = service.reporting.rules
    db = service.runtime.db

    async def apply_and_fail() -> None:
        async with db.transaction() as session:
            for event in story:
                await operations.apply_event(session, event, rules)
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await apply_and_fail()
    assert await service.rows("SELECT count(*) FROM reporting_cell") == [(0,)]
    assert await service.rows("SELECT count(*) FROM reporting_dirty_year") == [(0,)]
    async with db.transaction() as session:
        for event in story:
            await operations.apply_event(session, event, rules)
    batched = (await service.rows(cells_sql), await service.rows(numbers_sql))
    assert batched[0]
    assert await service.rows("SELECT year FROM reporting_dirty_year") == [(2025,)]
    async with db.transaction() as session:
        await session.execute(text("DELETE FROM reporting_cell"))
        await session.execute(text("DELETE FROM reporting_cell_number"))
        await session.execute(text("DELETE FROM reporting_case"))
        await session.execute(text("DELETE FROM reporting_consent"))
        await session.execute(text("DELETE FROM reporting_fact"))
        await session.execute(text("DELETE FROM reporting_referral"))
    for event in story:
        async with db.transaction() as session:
            await operations.apply_event(session, event, rules)
    assert (await service.rows(cells_sql), await service.rows(numbers_sql)) == batched


_PROJECTIONS = (
    "SELECT * FROM reporting_case ORDER BY case_id",
    "SELECT * FROM reporting_consent ORDER BY case_id, consent_id",
    "SELECT kind, ref, case_id, bezirk, month, dimension, number, at, until "
    "FROM reporting_fact ORDER BY kind, ref",
    "SELECT * FROM reporting_referral ORDER BY referral_id",
    "SELECT bezirk, period, figure, dimension, families, value, hits, weight "
    "FROM reporting_cell WHERE families != 0 OR value != 0 OR hits != 0 OR weight != 0 "
    "ORDER BY 1, 2, 3, 4",
    "SELECT * FROM reporting_cell_number WHERE count != 0 ORDER BY 1, 2, 3, 4, 5",
    "SELECT year FROM reporting_dirty_year ORDER BY year",
)


async def test_a_prepared_batch_reads_its_families_once_and_stores_what_single_events_do(
    service: Service,
) -> None:
    """The live consumer's batch reads the rows of its events' families in one query
    (operations.prepare_events); the projections come out as with one transaction per
    event. A merge (two families) reads afresh and later events do too."""
    alone = [e for e in _story() if not isinstance(e, CasesMerged)]
    merging = _story()
    # Two families' years on the prepared rows, then two more registered, then a merge.
    events = alone + merging
    rules = service.reporting.rules
    db = service.runtime.db
    engine = db.engine.sync_engine
    family_reads: list[str] = []

    def count(*args: Any) -> None:
        if " AS tag" in str(args[2]):
            family_reads.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        async with db.transaction() as session:
            await operations.prepare_events(session, events)
            for one in events:
                await operations.apply_event(session, one, rules)
        before_merge = events.index(next(e for e in events if isinstance(e, CasesMerged)))
        # One read for the batch, then one per event from the merge on.
        assert len(family_reads) == 1 + len(events) - before_merge
    finally:
        event.remove(engine, "before_cursor_execute", count)
    batched = [await service.rows(sql) for sql in _PROJECTIONS]
    assert all(batched[:5])
    async with db.transaction() as session:
        for table in ("cell", "cell_number", "case", "consent", "fact", "referral", "dirty_year"):
            await session.execute(text(f"DELETE FROM reporting_{table}"))
    for one in events:
        async with db.transaction() as session:
            await operations.apply_event(session, one, rules)
    assert [await service.rows(sql) for sql in _PROJECTIONS] == batched
