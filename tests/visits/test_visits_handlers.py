"""The visits service's intake handlers fed in process: the real database, the runtime's
inbox, transaction and outbox, no broker (``lotse_runtime.testing``). Each handled event
type, its redelivery (a duplicate changes nothing) and a refused or invalid event (dead-
lettered with its reason, nothing stored). The paths through Kafka stay in
test_visits_events.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.common import ConsentState
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.outbox import OutboxMessage
from lotse_runtime.testing import InProcessFeed, without_broker
from lotse_visits.app import create_app
from lotse_visits.settings import VisitsSettings
from lotse_visits.tables import VisitsCase, VisitsVisit
from sqlmodel import col, select

from tests.visits.harness import START, Clock, consent_changed, erased, merged, registered

SCHEDULED = "de.lotse.visits.visit-scheduled.v1"
CANCELLED = "de.lotse.visits.visit-cancelled.v1"


@dataclass
class Fed:
    runtime: ServiceRuntime[VisitsSettings]
    feed: InProcessFeed
    clock: Clock

    async def case(self, case_id: str) -> VisitsCase | None:
        async with self.runtime.db.transaction() as session:
            return await session.get(VisitsCase, case_id)

    async def visits(self, case_id: str) -> list[VisitsVisit]:
        async with self.runtime.db.transaction() as session:
            rows = await session.execute(
                select(VisitsVisit)
                .where(col(VisitsVisit.case_id) == case_id)
                .order_by(col(VisitsVisit.attempt))
            )
            return list(rows.scalars())

    async def published(self, case_id: str) -> list[tuple[str, dict[str, object]]]:
        """Event type and data of what the outbox holds for a case, in order (each event
        once, though the outbox has a row per topic it goes to)."""
        async with self.runtime.db.transaction() as session:
            rows = await session.execute(
                select(OutboxMessage)
                .where(col(OutboxMessage.record_key) == case_id)
                .order_by(col(OutboxMessage.id))
            )
            messages = list(rows.scalars())
        seen: dict[str, tuple[str, dict[str, object]]] = {}
        for message in messages:
            data = json.loads(message.value or b"{}")  # binary mode: the value is the data
            seen.setdefault(message.event_id, (message.event_type, data))
        return list(seen.values())


@asynccontextmanager
async def fed(database_url: str) -> AsyncIterator[Fed]:
    settings = VisitsSettings(
        database_url=database_url,
        kafka_bootstrap="127.0.0.1:1",  # nothing listens: no broker is needed
        consumer_backoff_s=0.01,
        overdue_check_interval_s=3600,
    )
    clock = Clock()
    async with without_broker(create_app(settings, clock=clock)) as runtime:
        yield Fed(runtime, InProcessFeed(runtime, "main"), clock)


async def test_a_registration_schedules_one_visit_and_a_redelivery_changes_nothing(
    database_url: str,
) -> None:
    async with fed(database_url) as service:
        event = registered()
        assert await service.feed.send(event, event_id="reg-1") == "ok"
        assert await service.feed.send(event, event_id="reg-1") == "duplicate"
        # The same registration sent again as a new event: one welcome visit per family.
        assert await service.feed.send(event, event_id="reg-2") == "ok"
        case = await service.case(event.case_id)
        assert case is not None
        assert (case.state, case.bezirk, case.clinic_id) == ("active", "hoerde", event.clinic_id)
        assert case.personal is not None
        [visit] = await service.visits(event.case_id)
        assert (visit.status, visit.attempt, visit.proposed_automatically) == (
            "scheduled",
            1,
            True,
        )
        assert case.open_visit_id == visit.visit_id
        published = await service.published(event.case_id)
        assert [t for t, _ in published] == [SCHEDULED]
        assert published[0][1]["visit_id"] == visit.visit_id
        assert service.feed.consumer.duplicates == 1
        assert service.feed.dead_letters == []


async def test_a_registration_without_consent_schedules_nothing(database_url: str) -> None:
    async with fed(database_url) as service:
        event = registered(consent=None)
        assert await service.feed.send(event) == "ok"
        case = await service.case(event.case_id)
        assert case is not None
        assert case.state == "without_consent"
        assert await service.visits(event.case_id) == []
        assert await service.published(event.case_id) == []


async def test_a_registration_of_an_unknown_bezirk_is_refused(database_url: str) -> None:
    async with fed(database_url) as service:
        event = registered(bezirk="atlantis")
        assert await service.feed.send(event, event_id="bad-1") == "dead_lettered"
        [letter] = service.feed.dead_letters
        assert (letter.event_id, letter.stage) == ("bad-1", "rejected")
        assert letter.reason.startswith("bezirk:")
        assert "atlantis" in letter.reason
        assert await service.case(event.case_id) is None
        assert await service.published(event.case_id) == []
        # The next event is applied as usual.
        assert await service.feed.send(registered()) == "ok"


async def test_data_that_does_not_match_the_schema_is_dead_lettered(database_url: str) -> None:
    async with fed(database_url) as service:
        event = registered()
        record = to_kafka_binary(event.to_cloudevent(event_id="broken-1"))
        assert record.value is not None
        data = json.loads(record.value)
        del data["bezirk"]
        outcome = await service.feed.send_raw(
            json.dumps(data).encode(), record.headers, key=record.key
        )
        assert outcome == "dead_lettered"
        [letter] = service.feed.dead_letters
        assert (letter.event_id, letter.stage) == ("broken-1", "schema")
        assert "bezirk" in letter.reason
        assert await service.case(event.case_id) is None


async def test_a_withdrawn_consent_cancels_the_visit_and_drops_the_contact_data(
    database_url: str,
) -> None:
    async with fed(database_url) as service:
        consent_id = str(uuid.uuid4())
        event = registered(consent_id=consent_id)
        assert await service.feed.send(event) == "ok"
        withdrawal = consent_changed(
            event.case_id, ConsentState.WITHDRAWN, START + timedelta(hours=1), consent_id=consent_id
        )
        assert await service.feed.send(withdrawal, event_id="wd-1") == "ok"
        assert await service.feed.send(withdrawal, event_id="wd-1") == "duplicate"
        case = await service.case(event.case_id)
        assert case is not None
        assert (case.state, case.personal, case.open_visit_id) == ("without_consent", None, None)
        [visit] = await service.visits(event.case_id)
        assert (visit.status, visit.cancel_reason, visit.cancelled_by_role) == (
            "cancelled",
            "consent_withdrawn",
            "system",
        )
        published = await service.published(event.case_id)
        assert [t for t, _ in published] == [SCHEDULED, CANCELLED]
        assert published[1][1]["reason"] == "consent_withdrawn"


async def test_a_withdrawal_that_overtakes_the_registration_is_kept_for_it(
    database_url: str,
) -> None:
    async with fed(database_url) as service:
        consent_id = str(uuid.uuid4())
        event = registered(consent_id=consent_id)
        early = consent_changed(
            event.case_id, ConsentState.WITHDRAWN, START + timedelta(hours=1), consent_id=consent_id
        )
        assert await service.feed.send(early) == "ok"
        waiting = await service.case(event.case_id)
        assert waiting is not None
        assert waiting.state == "awaiting_registration"
        assert await service.feed.send(event) == "ok"
        case = await service.case(event.case_id)
        assert case is not None
        # The family spoke last to withdraw: no visit, however the events arrived.
        assert case.state == "without_consent"
        assert await service.visits(event.case_id) == []
        assert await service.published(event.case_id) == []


async def test_an_erasure_cancels_the_visit_and_keeps_a_tombstone(database_url: str) -> None:
    async with fed(database_url) as service:
        event = registered()
        assert await service.feed.send(event) == "ok"
        erasure = erased(event.case_id)
        assert await service.feed.send(erasure, event_id="er-1") == "ok"
        assert await service.feed.send(erasure, event_id="er-1") == "duplicate"
        case = await service.case(event.case_id)
        assert case is not None
        assert (case.state, case.erased_at) == ("erased", erasure.erased_at)
        assert (case.personal, case.clinic_id, case.registered_at) == (None, None, None)
        [visit] = await service.visits(event.case_id)
        assert (visit.status, visit.cancel_reason) == ("cancelled", "case_erased")
        # A registration arriving after the erasure schedules nothing.
        assert await service.feed.send(event, event_id="late-reg") == "ok"
        assert len(await service.visits(event.case_id)) == 1
        types = [t for t, _ in await service.published(event.case_id)]
        assert types == [SCHEDULED, CANCELLED]


async def test_a_merge_closes_the_duplicate_case_and_keeps_the_survivor(
    database_url: str,
) -> None:
    async with fed(database_url) as service:
        duplicate, survivor = registered(), registered()
        assert await service.feed.send(duplicate) == "ok"
        assert await service.feed.send(survivor) == "ok"
        merge = merged(duplicate.case_id, survivor.case_id)
        assert await service.feed.send(merge, event_id="mg-1") == "ok"
        assert await service.feed.send(merge, event_id="mg-1") == "duplicate"
        closed = await service.case(duplicate.case_id)
        kept = await service.case(survivor.case_id)
        assert closed is not None
        assert kept is not None
        assert (closed.state, closed.personal, closed.open_visit_id) == ("closed", None, None)
        [cancelled] = await service.visits(duplicate.case_id)
        assert (cancelled.status, cancelled.cancel_reason) == ("cancelled", "duplicate")
        [open_visit] = await service.visits(survivor.case_id)
        assert (kept.state, open_visit.status) == ("active", "scheduled")
        # Merged before its registration arrived: a closed tombstone, nothing scheduled later.
        unknown = str(uuid.uuid4())
        assert await service.feed.send(merged(unknown, survivor.case_id)) == "ok"
        assert await service.feed.send(registered(unknown)) == "ok"
        tombstone = await service.case(unknown)
        assert tombstone is not None
        assert tombstone.state == "closed"
        assert await service.visits(unknown) == []
