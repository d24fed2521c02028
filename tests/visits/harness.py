"""Helpers of the visits tests: intake events as intake sends them, a movable clock, and a
handle on the running service (database reads on its own event loop)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from fastapi.testclient import TestClient
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import Consent, ConsentScope, ConsentState, Role
from lotse_contracts.events.intake import (
    BezirkSource,
    CasesMerged,
    Channel,
    ConsentChanged,
    ErasureReason,
    FamilyErased,
    FamilyRegistered,
)
from lotse_contracts.personal import PersonalData, new_data_key, seal
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.outbox import OutboxMessage
from lotse_visits.tables import VisitsCase, VisitsVisit
from sqlmodel import col, select

from tests.support import Record, bearer, eventually, produce, read_topic

T = TypeVar("T")

#: Monday 3 March 2025, 08:00 in Dortmund: the test's "now" unless moved.
START = datetime(2025, 3, 3, 7, 0, tzinfo=UTC)


def office(bezirk: str) -> dict[str, str]:
    """Headers of a Familienbüro staff member of ``bezirk``."""
    return bearer("familienbuero", subject="fb-7", bezirk=bezirk)


def team(bezirk: str) -> dict[str, str]:
    """Headers of a Bezirksteam member of ``bezirk``."""
    return bearer("bezirksteam", subject="bt-2", bezirk=bezirk)


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now


def registered(
    case_id: str | None = None,
    *,
    bezirk: str = "hoerde",
    at: datetime = START,
    days_since_birth: int = 2,
    channel: Channel = Channel.CLINIC,
    consent: ConsentState | None = ConsentState.GIVEN,
    consent_id: str | None = None,
) -> FamilyRegistered:
    """A "family registered" event as intake sends it, with a really sealed personal block."""
    case_id = case_id or str(uuid.uuid4())
    consents = []
    if consent is not None:
        consents.append(
            Consent(
                consent_id=consent_id or str(uuid.uuid4()),
                scope=ConsentScope.WELCOME_VISIT,
                state=consent,
                at=at,
            )
        )
    personal = PersonalData(
        family_name="Beispiel",
        child_given_names=["Mira"],
        child_birth_dates=[at.date() - timedelta(days=days_since_birth)],
        postcode="44263",
    )
    return FamilyRegistered(
        case_id=case_id,
        bezirk=bezirk,
        bezirk_source=BezirkSource.ADDRESS,
        channel=channel,
        clinic_id="st-josefs-hospital-hoerde" if channel is Channel.CLINIC else None,
        registered_at=at,
        visit_target_date=at.date() + timedelta(days=14),
        days_since_birth_at_registration=days_since_birth,
        children_count=1,
        preferred_language="de",
        consents=consents,
        personal=seal(personal, key=new_data_key(), kid=f"k-{case_id[:8]}", case_id=case_id),
    )


def consent_changed(
    case_id: str, state: ConsentState, at: datetime, *, bezirk: str = "hoerde", consent_id: str
) -> ConsentChanged:
    return ConsentChanged(
        case_id=case_id,
        bezirk=bezirk,
        consent_id=consent_id,
        scope=ConsentScope.WELCOME_VISIT,
        state=state,
        changed_at=at,
        changed_by_role=Role.BABYLOTSE,
    )


def erased(case_id: str, *, bezirk: str = "hoerde") -> FamilyErased:
    return FamilyErased(
        case_id=case_id,
        bezirk=bezirk,
        erased_at=START + timedelta(days=1),
        key_id=f"k-{case_id[:8]}",
        reason=ErasureReason.REQUEST,
    )


def merged(
    merged_case_id: str,
    surviving_case_id: str,
    *,
    bezirk: str = "hoerde",
    merged_bezirk: str = "hoerde",
) -> CasesMerged:
    return CasesMerged(
        merged_case_id=merged_case_id,
        surviving_case_id=surviving_case_id,
        bezirk=bezirk,
        merged_bezirk=merged_bezirk,
        merged_at=START + timedelta(days=1),
        merged_by_role=Role.FAMILIENBUERO,
    )


@dataclass
class VisitsService:
    """A running visits service and what a test does with it."""

    client: TestClient
    clock: Clock
    prefix: str
    bootstrap: str
    sent: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> ServiceRuntime[Any]:
        runtime: ServiceRuntime[Any] = self.client.app.state.runtime  # type: ignore[attr-defined]
        return runtime

    def topic(self, name: str) -> str:
        return self.prefix + name

    def send(self, event: EventModel, *, event_id: str | None = None) -> str:
        """Produce an intake event onto the real broker, as intake's relay would."""
        cloudevent = event.to_cloudevent(event_id=event_id, source="/lotse/intake")
        record = to_kafka_binary(cloudevent)
        topic = self.topic("lotse.intake")
        produce(self.bootstrap, topic, record.value, record.headers, record.key)
        return cloudevent.id

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine function on the app's event loop."""
        result: T = self.client.portal.call(fn)  # type: ignore[union-attr]
        return result

    def wait(self, predicate: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
        async def until() -> Any:
            return await eventually(predicate, timeout_s=timeout_s)

        return self.run(until)

    # -- database reads --------------------------------------------------------------------------

    async def case(self, case_id: str) -> VisitsCase | None:
        async with self.runtime.db.transaction() as session:
            return await session.get(VisitsCase, case_id)

    async def visits(self, case_id: str | None = None) -> list[VisitsVisit]:
        query = select(VisitsVisit).order_by(col(VisitsVisit.starts_at))
        if case_id is not None:
            query = query.where(col(VisitsVisit.case_id) == case_id)
        async with self.runtime.db.transaction() as session:
            return list((await session.execute(query)).scalars())

    async def published(self, event_type: str, topic: str = "lotse.visits") -> list[dict[str, Any]]:
        """Data of the events of a type the outbox holds for a topic (sent or not)."""
        async with self.runtime.db.transaction() as session:
            rows = await session.execute(
                select(OutboxMessage)
                .where(
                    col(OutboxMessage.event_type) == event_type,
                    col(OutboxMessage.topic) == self.topic(topic),
                )
                .order_by(col(OutboxMessage.id))
            )
            return [json.loads(r.value or b"null") for r in rows.scalars()]

    # -- the same, from the test's thread -------------------------------------------------------

    def get_case(self, case_id: str) -> VisitsCase | None:
        return self.run(lambda: self.case(case_id))

    def get_visits(self, case_id: str | None = None) -> list[VisitsVisit]:
        return self.run(lambda: self.visits(case_id))

    def events(self, event_type: str, topic: str = "lotse.visits") -> list[dict[str, Any]]:
        return self.run(lambda: self.published(event_type, topic))

    def wait_events(
        self, event_type: str, count: int = 1, topic: str = "lotse.visits"
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events of the type are in the outbox for ``topic``."""

        async def enough() -> list[dict[str, Any]] | None:
            found = await self.published(event_type, topic)
            return found if len(found) >= count else None

        found: list[dict[str, Any]] = self.wait(enough)
        return found

    def read(self, topic: str, count: int) -> list[Record]:
        """Read ``count`` records of a topic with the independent client."""
        return self.run(lambda: read_topic(self.bootstrap, self.topic(topic), count))

    def scheduled(self, case_id: str) -> VisitsVisit:
        """Wait until the case has a scheduled visit and return it."""

        async def found() -> VisitsVisit | None:
            return next((v for v in await self.visits(case_id) if v.status == "scheduled"), None)

        visit: VisitsVisit = self.wait(found)
        return visit

    def processed(self, count: int) -> None:
        """Wait until the consumer has handled ``count`` events (applied, duplicate, dead)."""

        def done() -> bool:
            consumer = self.runtime.consumers[0]
            return consumer.processed + consumer.duplicates + consumer.dead_lettered >= count

        async def check() -> bool:
            return done()

        self.wait(check)


def local_day(moment: datetime) -> date:
    from zoneinfo import ZoneInfo

    return moment.astimezone(ZoneInfo("Europe/Berlin")).date()
