"""Domain events for the reporting tests, built from the contract models as the producing
services would publish them (real personal-data blocks, sealed with a per-family key)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from confluent_kafka import Producer
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import Consent, ConsentScope, ConsentState, Role
from lotse_contracts.events.intake import (
    BezirkSource,
    Channel,
    ConsentChanged,
    ErasureReason,
    FamilyErased,
    FamilyRegistered,
)
from lotse_contracts.events.referrals import (
    CompletionOutcome,
    ReferralAccepted,
    ReferralCompleted,
    ReferralEscalated,
    ReferralFirstContact,
    ReferralOrigin,
    ReferralReceived,
    ReferralRejected,
    ReferralRequested,
    ReferralStatus,
    RejectionReason,
)
from lotse_contracts.events.visits import (
    DeclineChannel,
    MissedFollowUp,
    VisitCompleted,
    VisitDeclined,
    VisitMissed,
    VisitScheduled,
    VisitTopic,
)
from lotse_contracts.personal import PersonalData, new_data_key, seal

BERLIN = ZoneInfo("Europe/Berlin")
TRAEGER = "hebammenzentrum-dortmund"


def at(day: date | str, hour: int = 10, minute: int = 0) -> datetime:
    """A local Dortmund time."""
    if isinstance(day, str):
        day = date.fromisoformat(day)
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=BERLIN)


def new_id(rng: random.Random | None = None) -> str:
    if rng is None:
        return str(uuid.uuid4())
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass
class Family:
    """One family and the ids its events share; names and phone are what must never leak."""

    bezirk: str
    channel: Channel = Channel.CLINIC
    case_id: str = field(default_factory=new_id)
    family_name: str = "Beispiel"
    phone: str = "+49 231 555 0100"
    postcode: str = "44263"

    def registered(
        self,
        when: datetime,
        *,
        welcome_consent: bool = True,
        traeger_consent: bool = False,
        days_since_birth: int = 3,
    ) -> FamilyRegistered:
        consents = []
        if welcome_consent:
            consents.append(
                Consent(
                    consent_id=new_id(),
                    scope=ConsentScope.WELCOME_VISIT,
                    state=ConsentState.GIVEN,
                    at=when,
                )
            )
        if traeger_consent:
            consents.append(
                Consent(
                    consent_id=new_id(),
                    scope=ConsentScope.TRAEGER_CONTACT,
                    traeger=TRAEGER,
                    purpose="familienhebamme",
                    state=ConsentState.GIVEN,
                    at=when,
                )
            )
        personal = PersonalData(
            family_name=self.family_name,
            parent_given_names=["Elif"],
            child_given_names=["Mira"],
            child_birth_dates=[(when - timedelta(days=days_since_birth)).date()],
            street="Musterweg",
            house_number="12a",
            postcode=self.postcode,
            city="Dortmund",
            phone=self.phone,
        )
        return FamilyRegistered(
            case_id=self.case_id,
            bezirk=self.bezirk,
            bezirk_source=BezirkSource.ADDRESS,
            channel=self.channel,
            clinic_id="st-josefs-hospital-hoerde" if self.channel is Channel.CLINIC else None,
            registered_at=when,
            visit_target_date=(when + timedelta(days=14)).date(),
            days_since_birth_at_registration=days_since_birth,
            children_count=1,
            preferred_language="de",
            consents=consents,
            personal=seal(
                personal, key=new_data_key(), kid=f"kid-{self.case_id[:8]}", case_id=self.case_id
            ),
        )

    def consent(self, scope: ConsentScope, given: bool, when: datetime) -> ConsentChanged:
        return ConsentChanged(
            case_id=self.case_id,
            bezirk=self.bezirk,
            consent_id=new_id(),
            scope=scope,
            traeger=TRAEGER if scope is ConsentScope.TRAEGER_CONTACT else None,
            purpose="familienhebamme" if scope is ConsentScope.TRAEGER_CONTACT else None,
            state=ConsentState.GIVEN if given else ConsentState.WITHDRAWN,
            changed_at=when,
            changed_by_role=Role.FAMILIENBUERO,
        )

    def scheduled(self, visit_id: str, made: datetime, starts: datetime) -> VisitScheduled:
        return VisitScheduled(
            visit_id=visit_id,
            case_id=self.case_id,
            bezirk=self.bezirk,
            familienbuero=f"familienbuero-{self.bezirk}",
            staff_id="st-4k9q2x",
            starts_at=starts,
            ends_at=starts + timedelta(hours=1),
            target_date=(made + timedelta(days=14)).date(),
            target_missed=False,
            scheduled_at=made,
        )

    def completed(
        self, visit_id: str, starts: datetime, done: datetime, days_since_birth: int
    ) -> VisitCompleted:
        return VisitCompleted(
            visit_id=visit_id,
            case_id=self.case_id,
            bezirk=self.bezirk,
            familienbuero=f"familienbuero-{self.bezirk}",
            staff_id="st-4k9q2x",
            scheduled_for=starts,
            completed_at=done,
            informed_about_offers=True,
            topics=[VisitTopic.SLEEP],
            needs_noted=False,
            days_since_reference=days_since_birth,
        )

    def missed(self, visit_id: str, starts: datetime, attempt: int = 1) -> VisitMissed:
        return VisitMissed(
            visit_id=visit_id,
            case_id=self.case_id,
            bezirk=self.bezirk,
            familienbuero=f"familienbuero-{self.bezirk}",
            scheduled_for=starts,
            attempt=attempt,
            follow_up=MissedFollowUp.NEW_APPOINTMENT_OFFERED,
            recorded_at=starts + timedelta(minutes=30),
        )

    def declined(self, when: datetime, visit_id: str | None = None) -> VisitDeclined:
        return VisitDeclined(
            visit_id=visit_id,
            case_id=self.case_id,
            bezirk=self.bezirk,
            familienbuero=f"familienbuero-{self.bezirk}",
            declined_via=DeclineChannel.PHONE,
            declined_at=when,
        )

    def erased(self, when: datetime, reason: ErasureReason) -> FamilyErased:
        return FamilyErased(
            case_id=self.case_id,
            bezirk=self.bezirk,
            erased_at=when,
            key_id=f"kid-{self.case_id[:8]}",
            reason=reason,
        )

    def referral(self, referral_id: str, module: str = "familienhebamme") -> Referral:
        return Referral(self, referral_id, module)


@dataclass
class Referral:
    family: Family
    referral_id: str
    module: str

    def _ids(self) -> dict[str, str]:
        return {
            "referral_id": self.referral_id,
            "case_id": self.family.case_id,
            "bezirk": self.family.bezirk,
            "traeger": TRAEGER,
            "module": self.module,
        }

    def requested(self, when: datetime) -> ReferralRequested:
        return ReferralRequested(
            **self._ids(),
            occurred_at=when,
            consent_ref=new_id(),
            requested_by_role=Role.BABYLOTSE,
            origin=ReferralOrigin.HANDOVER,
            answer_due_by=(when + timedelta(days=3)).date(),
        )

    def received(self, when: datetime) -> ReferralReceived:
        return ReferralReceived(**self._ids(), occurred_at=when)

    def accepted(self, when: datetime) -> ReferralAccepted:
        return ReferralAccepted(**self._ids(), occurred_at=when)

    def rejected(self, when: datetime) -> ReferralRejected:
        return ReferralRejected(
            **self._ids(),
            occurred_at=when,
            reason=RejectionReason.NO_CAPACITY,
        )

    def first_contact(self, when: datetime, days: int) -> ReferralFirstContact:
        return ReferralFirstContact(
            **self._ids(),
            occurred_at=when,
            days_since_requested=days,
        )

    def completed(self, when: datetime) -> ReferralCompleted:
        return ReferralCompleted(
            **self._ids(),
            occurred_at=when,
            outcome=CompletionOutcome.GOAL_REACHED,
        )

    def escalated(self, when: datetime) -> ReferralEscalated:
        return ReferralEscalated(
            **self._ids(),
            occurred_at=when,
            working_days_without_answer=3,
            last_status=ReferralStatus.REQUESTED,
        )


# --- publishing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """An event as it went onto its topic (the id is the dedup key with the source)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def to_records(events: Iterable[EventModel], prefix: str) -> list[Published]:
    out = []
    for event in events:
        record = to_kafka_binary(event.to_cloudevent())
        out.append(Published(prefix + type(event).topic, record.key, record.value, record.headers))
    return out


def publish(bootstrap: str, records: Sequence[Published]) -> None:
    """Write records with an independent client, in order (per key)."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for record in records:
        headers: list[tuple[str, str | bytes | None]] = list(record.headers)
        producer.produce(record.topic, value=record.value, key=record.key, headers=headers)
        producer.poll(0)
    if producer.flush(30) != 0:
        raise RuntimeError("could not publish all records")


# --- a small city's worth of random families ------------------------------------------------


def random_city(
    rng: random.Random, families: int, bezirke: Sequence[str], start: date
) -> list[EventModel]:
    """Plausible event histories of ``families`` families registered over ~3 months,
    returned topic by topic (intake, visits, referrals), each in per-family order."""
    intake: list[EventModel] = []
    visits: list[EventModel] = []
    referrals: list[EventModel] = []
    modules = ["familienhebamme", "elternschule", "aufsuchende-elternberatung"]
    for _ in range(families):
        family = Family(
            bezirk=rng.choice(bezirke),
            channel=Channel.CLINIC if rng.random() < 0.8 else Channel.MOVE_IN,
            case_id=new_id(rng),
        )
        registered = at(start + timedelta(days=rng.randrange(0, 95)), rng.randrange(8, 17))
        born = rng.randrange(1, 8)
        intake.append(
            family.registered(
                registered,
                welcome_consent=rng.random() < 0.9,
                traeger_consent=rng.random() < 0.4,
                days_since_birth=born,
            )
        )
        if rng.random() < 0.1:
            intake.append(
                family.consent(
                    ConsentScope.SCREENING_DATA_USE, True, registered + timedelta(days=2)
                )
            )
        roll = rng.random()
        if roll < 0.08:
            visits.append(family.declined(registered + timedelta(days=1)))
        else:
            visit_id = new_id(rng)
            made = registered + timedelta(minutes=5)
            starts = at((registered + timedelta(days=rng.randrange(3, 20))).date(), 11)
            visits.append(family.scheduled(visit_id, made, starts))
            if roll < 0.2:
                visits.append(family.missed(visit_id, starts))
                starts = starts + timedelta(days=7)
            if roll < 0.9:
                days = born + (starts.date() - registered.date()).days
                visits.append(
                    family.completed(visit_id, starts, starts + timedelta(minutes=50), days)
                )
        if rng.random() < 0.35:
            referral = family.referral(new_id(rng), rng.choice(modules))
            asked = registered + timedelta(hours=2)
            referrals.append(referral.requested(asked))
            fate = rng.random()
            if fate < 0.15:
                referrals.append(referral.escalated(asked + timedelta(days=5)))
            if fate < 0.1:
                continue  # still open
            referrals.append(referral.received(asked + timedelta(days=1)))
            if fate < 0.3:
                referrals.append(referral.rejected(asked + timedelta(days=6)))
                continue
            referrals.append(referral.accepted(asked + timedelta(days=6)))
            contact = rng.randrange(7, 20)
            referrals.append(referral.first_contact(asked + timedelta(days=contact), contact))
            if fate > 0.8:
                referrals.append(referral.completed(asked + timedelta(days=60)))
    return [*intake, *visits, *referrals]
