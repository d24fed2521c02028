"""Helpers of the referrals tests: the real service on the real broker and database, a
clock the test controls, an in-memory keyring, intake/visit events injected as raw Kafka
records, and readers for the service's tables."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from lotse_contracts import topics
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import Consent, ConsentScope, ConsentState, Role
from lotse_contracts.events.intake import (
    BezirkSource,
    Channel,
    ConsentChanged,
    FamilyRegistered,
)
from lotse_contracts.personal import (
    KeyPurpose,
    PersonalData,
    derive_key,
    new_data_key,
    seal,
    split_personal,
)
from lotse_referrals.app import create_app
from lotse_referrals.keyring import StaticFamily, StaticKeyring
from lotse_referrals.operations import Context
from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import Referral, Wish
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.consumer import EventConsumer
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import select

from tests.support import bearer, produce

TRAEGER = "hebammenzentrum-dortmund"
MODULE = "familienhebamme"
CLINIC = "st-josefs-hospital-hoerde"
# Thursday 17 April 2025, 10:00 in Dortmund (the Easter weekend follows).
START = datetime(2025, 4, 17, 8, 0, tzinfo=UTC)

FAMILIENBUERO = bearer("familienbuero", subject="fb-3", bezirk="hoerde")
FAMILIENBUERO_EVING = bearer("familienbuero", subject="fb-4", bezirk="eving")
BEZIRKSTEAM = bearer("bezirksteam", subject="bt-1", bezirk="hoerde")
#: City-wide coordination: the one role that edits every Träger's catalogue entry.
KOORDINATION = bearer("koordination", subject="koord-1")
BABYLOTSE = bearer("babylotse", subject="bl-7", clinic=CLINIC)


def traeger_caller(slug: str = TRAEGER) -> dict[str, str]:
    return bearer("traeger", subject=f"tr-{slug}", traeger=slug)


#: The family's plaintext values. Those of contact fields may reach the addressed Träger
#: only sealed; the children's name and birth date never leave at all.
CONTACT_VALUES = ["Yılmaz-Özdemir", "Ayşe", "+49 231 555 0177", "ayse.yilmaz@example.org"]
NEVER_DISCLOSED = ["Mirabelle", "2025-04-10"]


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment


@dataclass
class Family:
    """One registered family: its case id, data key and consents."""

    case_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    kid: str = field(default_factory=lambda: f"fk-{uuid.uuid4().hex}")
    key: bytes = field(default_factory=new_data_key)
    bezirk: str = "hoerde"
    consent_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    traeger: str | None = TRAEGER
    purpose: str | None = MODULE

    def personal(self) -> PersonalData:
        return PersonalData(
            family_name=CONTACT_VALUES[0],
            parent_given_names=[CONTACT_VALUES[1]],
            child_given_names=[NEVER_DISCLOSED[0]],
            child_birth_dates=[date.fromisoformat(NEVER_DISCLOSED[1])],
            phone=CONTACT_VALUES[2],
            email=CONTACT_VALUES[3],
        )

    def registered(self, *, with_traeger_consent: bool = True) -> FamilyRegistered:
        contact, children = split_personal(self.personal())
        consents = [
            Consent(
                consent_id=str(uuid.uuid4()),
                scope=ConsentScope.WELCOME_VISIT,
                state=ConsentState.GIVEN,
                at=START - timedelta(hours=1),
            )
        ]
        if with_traeger_consent:
            consents.append(self.traeger_consent())
        return FamilyRegistered(
            case_id=self.case_id,
            bezirk=self.bezirk,
            bezirk_source=BezirkSource.ADDRESS,
            channel=Channel.CLINIC,
            clinic_id=CLINIC,
            registered_at=START - timedelta(hours=1),
            visit_target_date=date(2025, 5, 1),
            days_since_birth_at_registration=7,
            children_count=1,
            consents=consents,
            personal=seal(contact, key=self.key, kid=self.kid, case_id=self.case_id),
            children=None
            if children is None
            else seal(children, key=self.key, kid=self.kid, case_id=self.case_id),
        )

    def disclosure_key(self, referral_id: str, traeger: str = TRAEGER) -> bytes:
        """The key intake's keyring derives for one referral's disclosure to one Träger."""
        return derive_key(
            self.key,
            KeyPurpose.DISCLOSURE,
            case_id=self.case_id,
            referral_id=referral_id,
            traeger=traeger,
        )

    def in_keyring(self) -> StaticFamily:
        """The family as intake's keyring knows it (its Träger consent counts as given)."""
        consents = {} if self.traeger is None else {self.consent_id: self.traeger}
        return StaticFamily(self.kid, self.key, self.personal(), consents)

    def traeger_consent(self, state: ConsentState = ConsentState.GIVEN) -> Consent:
        return Consent(
            consent_id=self.consent_id,
            scope=ConsentScope.TRAEGER_CONTACT,
            traeger=self.traeger,
            purpose=self.purpose,
            state=state,
            at=START - timedelta(hours=1),
        )

    def consent_changed(self, state: ConsentState, at: datetime) -> ConsentChanged:
        return ConsentChanged(
            case_id=self.case_id,
            bezirk=self.bezirk,
            consent_id=self.consent_id,
            scope=ConsentScope.TRAEGER_CONTACT,
            traeger=self.traeger,
            purpose=self.purpose,
            state=state,
            changed_at=at,
            changed_by_role=Role.FAMILIENBUERO,
        )


def settings(bootstrap: str, database_url: str, prefix: str, **extra: Any) -> ReferralsSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "database_url": database_url,
        "topic_prefix": prefix,
        "consumer_session_timeout_ms": 2000,
        "consumer_heartbeat_interval_ms": 300,
        "relay_poll_interval_s": 0.05,
        "consumer_backoff_s": 0.05,
        # The jobs are run by the tests, with the clock where they want it.
        "escalation_interval_s": 3600,
        "placement_interval_s": 3600,
        "topic_partitions": 2,
    }
    values.update(extra)
    return ReferralsSettings(**values)


@dataclass
class Service:
    """A running referrals service and what tests need of it."""

    client: TestClient
    clock: Clock
    keyring: StaticKeyring
    prefix: str
    bootstrap: str

    @property
    def runtime(self) -> ServiceRuntime[Any]:
        runtime: ServiceRuntime[Any] = self.client.app.state.runtime  # type: ignore[attr-defined]
        return runtime

    @property
    def ctx(self) -> Context:
        ctx: Context = self.client.app.state.referrals  # type: ignore[attr-defined]
        return ctx

    def consumer(self, name: str) -> EventConsumer:
        return next(c for c in self.runtime.consumers if c.name == name)

    def register(self, family: Family, **kwargs: Any) -> None:
        self.keyring.families[family.case_id] = family.in_keyring()
        self.send(family.registered(**kwargs))

    def send(self, event: EventModel, *, event_id: str | None = None) -> None:
        """Publish an intake or visits event as its producer would (raw record)."""
        record = to_kafka_binary(event.to_cloudevent(event_id=event_id))
        produce(
            self.bootstrap,
            self.prefix + type(event).topic,
            record.value,
            record.headers,
            record.key,
        )

    def send_raw(self, topic: str, record: Any) -> None:
        produce(self.bootstrap, self.prefix + topic, record.value, record.headers, record.key)

    def referrals(self, case_id: str) -> list[Referral]:
        async def load() -> list[Referral]:
            async with self.runtime.db.transaction() as session:
                query = select(Referral).where(Referral.case_id == case_id)  # type: ignore[arg-type]
                return list((await session.execute(query)).scalars())

        rows: list[Referral] = self.client.portal.call(load)  # type: ignore[union-attr]
        return rows

    def wishes(self, case_id: str) -> list[Wish]:
        async def load() -> list[Wish]:
            async with self.runtime.db.transaction() as session:
                query = select(Wish).where(Wish.case_id == case_id)  # type: ignore[arg-type]
                return list((await session.execute(query)).scalars())

        rows: list[Wish] = self.client.portal.call(load)  # type: ignore[union-attr]
        return rows

    def wait(self, predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met within {timeout_s} s")
            time.sleep(0.1)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        self.wait(lambda: self.client.get("/readyz").status_code == 200, timeout_s, "readiness")
        for consumer in self.runtime.consumers:
            self.client.portal.call(consumer.wait_assigned)  # type: ignore[union-attr]

    def outbox_rows(self) -> list[OutboxMessage]:
        async def load() -> list[OutboxMessage]:
            async with self.runtime.db.transaction() as session:
                return list((await session.execute(select(OutboxMessage))).scalars())

        rows: list[OutboxMessage] = self.client.portal.call(load)  # type: ignore[union-attr]
        return rows

    def run_job(self, name: str) -> None:
        job = next(j for j in self.runtime.jobs if j.name == name)
        self.client.portal.call(job.run_once, self.runtime)  # type: ignore[union-attr]
        assert job.last_error is None, job.last_error

    def domain_topic(self) -> str:
        return self.prefix + topics.REFERRALS


@contextmanager
def running(
    bootstrap: str, database_url: str, prefix: str, *, ready: bool = True, **extra: Any
) -> Iterator[Service]:
    clock = Clock()
    keyring = StaticKeyring()
    app = create_app(
        settings(bootstrap, database_url, prefix, **extra), clock=clock, keyring=keyring
    )
    with TestClient(app) as client:
        service = Service(client, clock, keyring, prefix, bootstrap)
        if ready:
            service.wait_ready()
        yield service


@contextmanager
def transactions_open_while_sealing(
    runtime: ServiceRuntime[Any], keyring: Any
) -> Iterator[list[int]]:
    """While inside: for each disclosure the keyring seals, how many of the service's
    database transactions the sealing task holds open at that moment (intake is another
    service: it must be 0). Counted per asyncio task around ``Database.transaction``,
    through which every transaction of the service is opened."""
    db = runtime.db
    open_in: dict[asyncio.Task[Any] | None, int] = {}
    real_transaction = db.transaction

    @asynccontextmanager
    async def transaction(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        task = asyncio.current_task()
        open_in[task] = open_in.get(task, 0) + 1
        try:
            async with real_transaction(*args, **kwargs) as session:
                yield session
        finally:
            open_in[task] -= 1

    real_seal = keyring.seal_disclosure
    seen: list[int] = []

    async def seal(which: Any, fields: Any) -> Any:
        seen.append(open_in.get(asyncio.current_task(), 0))
        return await real_seal(which, fields)

    keyring.seal_disclosure = seal
    db.transaction = transaction  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del db.transaction  # the class's own again
        del keyring.seal_disclosure
