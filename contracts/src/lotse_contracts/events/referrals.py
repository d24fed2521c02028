"""Referral events: a family is referred to a module of a Träger (provider agency).

Producer: the referrals service (``/lotse/referrals``), topic ``lotse.referrals``; the
events carry the ``traeger`` extension attribute. The lifecycle follows the FHIR Task
statuses: requested → received → accepted | rejected → in-progress → completed, and
cancelled by the requester at any point before completion. A "warm handover" is an
accepted referral whose first contact with the family is confirmed
(``referral-first-contact``). A referral without an answer within the configured number
of working days is escalated to the Bezirksteam (district coordination team).

A referral always cites the ``traeger_contact`` consent it rests on (§ 65 SGB VIII); the
only personal data it carries is the consented subset, sealed in ``disclosure``.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import ClassVar, Literal, TypedDict

from pydantic import AwareDatetime, Field, model_validator

from lotse_contracts import topics
from lotse_contracts.events.base import CATALOGUE, EventModel
from lotse_contracts.events.common import (
    BERLIN_WINTER,
    DOCUMENTED,
    EXAMPLE_BEZIRK,
    EXAMPLE_CASE_ID,
    EXAMPLE_CONSENT_TRAEGER_ID,
    EXAMPLE_HANDOVER_ID,
    EXAMPLE_MODULE,
    EXAMPLE_REFERRAL_ID,
    EXAMPLE_TRAEGER,
    CaseId,
    Role,
    Slug,
    Uuid,
)
from lotse_contracts.personal import (
    JWE_COMPACT_PATTERN,
    EncryptedBlock,
    PersonalData,
    example_block,
    example_jwe,
)

SOURCE = "/lotse/referrals"


class ReferralStatus(StrEnum):
    """Status of a referral, named as in FHIR Task.status."""

    REQUESTED = "requested"
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class ReferralOrigin(StrEnum):
    """What led to the referral: a Babylotse's handover request at intake, the screening,
    a welcome visit, or a staff decision."""

    HANDOVER = "handover"
    SCREENING = "screening"
    VISIT = "visit"
    STAFF = "staff"


class PersonalField(StrEnum):
    """Names of the PersonalData fields; used to say which ones a disclosure contains."""

    FAMILY_NAME = "family_name"
    PARENT_GIVEN_NAMES = "parent_given_names"
    CHILD_GIVEN_NAMES = "child_given_names"
    CHILD_BIRTH_DATES = "child_birth_dates"
    STREET = "street"
    HOUSE_NUMBER = "house_number"
    POSTCODE = "postcode"
    CITY = "city"
    PHONE = "phone"
    EMAIL = "email"


class RejectionReason(StrEnum):
    """Why a Träger rejects a referral."""

    NO_CAPACITY = "no_capacity"
    NOT_ELIGIBLE = "not_eligible"
    OUTSIDE_SERVICE_AREA = "outside_service_area"
    MODULE_UNAVAILABLE = "module_unavailable"
    FAMILY_UNREACHABLE = "family_unreachable"
    FAMILY_DECLINED = "family_declined"
    OTHER = "other"


class ReferralCancelReason(StrEnum):
    """Why the requester cancelled a referral."""

    CONSENT_WITHDRAWN = "consent_withdrawn"
    FAMILY_REQUEST = "family_request"
    NEED_RESOLVED = "need_resolved"
    FAMILY_MOVED_AWAY = "family_moved_away"
    CASE_ERASED = "case_erased"
    DUPLICATE = "duplicate"
    OTHER = "other"


class CompletionOutcome(StrEnum):
    """How a module ended for the family."""

    GOAL_REACHED = "goal_reached"
    ENDED_BY_FAMILY = "ended_by_family"
    ENDED_BY_TRAEGER = "ended_by_traeger"
    TRANSFERRED = "transferred"


_REASON_CODE = r"^[A-Za-z0-9._-]{1,32}$"


class _ReferralEvent(EventModel):
    model_config = DOCUMENTED

    topic: ClassVar[str] = topics.REFERRALS
    source: ClassVar[str] = SOURCE
    traeger_field: ClassVar[str | None] = "traeger"

    referral_id: Uuid
    """Id of the referral."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk (city district) slug of the case."""
    traeger: Slug
    """Slug of the Träger (provider agency) the referral is addressed to, e.g.
    ``hebammenzentrum-dortmund``."""
    module: Slug
    """Module from the offer catalogue, e.g. ``familienhebamme``, ``elternschule``."""
    occurred_at: AwareDatetime
    """When the status change happened."""


class _ExampleIds(TypedDict):
    referral_id: str
    case_id: str
    bezirk: str
    traeger: str
    module: str


def _example_ids() -> _ExampleIds:
    return {
        "referral_id": EXAMPLE_REFERRAL_ID,
        "case_id": EXAMPLE_CASE_ID,
        "bezirk": EXAMPLE_BEZIRK,
        "traeger": EXAMPLE_TRAEGER,
        "module": EXAMPLE_MODULE,
    }


@CATALOGUE.register
class ReferralRequested(_ReferralEvent):
    """A referral to a Träger's module was created (FHIR Task status ``requested``)."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-requested.v1"

    consent_ref: Uuid
    """The ``traeger_contact`` consent for this Träger and purpose (§ 65 SGB VIII)."""
    requested_by_role: Role
    """Role of the requester (Babylotse, Familienbüro, Bezirksteam)."""
    origin: ReferralOrigin
    """What led to the referral."""
    handover_id: Uuid | None = None
    """The intake handover request this referral fulfils, if any."""
    urgent: bool = False
    """True when an acute need was found; the Träger should answer first."""
    answer_due_by: date
    """Last day for the Träger's answer before the referral escalates."""
    disclosed_fields: list[PersonalField] = Field(default_factory=list)
    """Which personal fields ``disclosure`` contains: exactly the consented ones."""
    disclosure: EncryptedBlock | None = None
    """The consented personal fields, sealed under this referral's disclosure key
    (plaintext: a PersonalData subset). Same content as ``disclosure_jwe``."""
    disclosure_jwe: str | None = Field(default=None, pattern=JWE_COMPACT_PATTERN)
    """The same disclosure as a compact JWE (RFC 7516, ``alg`` ``dir``, ``enc`` ``A256GCM``,
    ``kid`` in the protected header), for any JOSE library: open it with the key of
    ``GET /referrals/{referral_id}/disclosure-key``. That key opens this disclosure and
    nothing else of the family."""

    @model_validator(mode="after")
    def _disclosure_matches_fields(self) -> ReferralRequested:
        if bool(self.disclosed_fields) != (self.disclosure is not None):
            raise ValueError("disclosure is required exactly when disclosed_fields is not empty")
        if self.disclosure_jwe is not None and self.disclosure is None:
            raise ValueError("disclosure_jwe is present only beside disclosure")
        return self

    @classmethod
    def example(cls) -> ReferralRequested:
        contact = PersonalData(
            family_name="Beispiel", parent_given_names=["Elif"], phone="+49 231 555 0100"
        )
        return cls(
            **_example_ids(),
            occurred_at=datetime(2025, 3, 3, 10, 21, tzinfo=BERLIN_WINTER),
            consent_ref=EXAMPLE_CONSENT_TRAEGER_ID,
            requested_by_role=Role.BABYLOTSE,
            origin=ReferralOrigin.HANDOVER,
            handover_id=EXAMPLE_HANDOVER_ID,
            answer_due_by=date(2025, 3, 6),
            disclosed_fields=[
                PersonalField.FAMILY_NAME,
                PersonalField.PARENT_GIVEN_NAMES,
                PersonalField.PHONE,
            ],
            disclosure=example_block(
                contact, case_id=EXAMPLE_CASE_ID, label="referral-requested.disclosure"
            ),
            disclosure_jwe=example_jwe(contact, label="referral-requested.disclosure_jwe"),
        )


@CATALOGUE.register
class ReferralReceived(_ReferralEvent):
    """The Träger confirmed it received the referral (``received``)."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-received.v1"

    @classmethod
    def example(cls) -> ReferralReceived:
        return cls(**_example_ids(), occurred_at=datetime(2025, 3, 3, 13, 2, tzinfo=BERLIN_WINTER))


@CATALOGUE.register
class ReferralAccepted(_ReferralEvent):
    """The Träger accepted the referral (``accepted``)."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-accepted.v1"

    first_contact_planned_for: date | None = None
    """When the Träger plans its first contact with the family, if known."""

    @classmethod
    def example(cls) -> ReferralAccepted:
        return cls(
            **_example_ids(),
            occurred_at=datetime(2025, 3, 4, 9, 30, tzinfo=BERLIN_WINTER),
            first_contact_planned_for=date(2025, 3, 6),
        )


@CATALOGUE.register
class ReferralRejected(_ReferralEvent):
    """The Träger rejected the referral (``rejected``); the requester may refer elsewhere."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-rejected.v1"

    reason: RejectionReason
    """Why the referral was rejected."""
    reason_code: str | None = Field(default=None, pattern=_REASON_CODE)
    """The Träger's own reason code, if it has one (a code, never free text)."""

    @classmethod
    def example(cls) -> ReferralRejected:
        return cls(
            **_example_ids(),
            occurred_at=datetime(2025, 3, 4, 9, 30, tzinfo=BERLIN_WINTER),
            reason=RejectionReason.NO_CAPACITY,
        )


@CATALOGUE.register
class ReferralInProgress(_ReferralEvent):
    """The Träger started working with the family (``in-progress``)."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-in-progress.v1"

    @classmethod
    def example(cls) -> ReferralInProgress:
        return cls(**_example_ids(), occurred_at=datetime(2025, 3, 10, 11, 0, tzinfo=BERLIN_WINTER))


@CATALOGUE.register
class ReferralFirstContact(_ReferralEvent):
    """The Träger confirmed its first contact with the family: the warm handover is done."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-first-contact.v1"

    days_since_requested: int = Field(ge=0)
    """Calendar days from ``referral-requested`` to this first contact; used by reporting."""

    @classmethod
    def example(cls) -> ReferralFirstContact:
        return cls(
            **_example_ids(),
            occurred_at=datetime(2025, 3, 6, 15, 10, tzinfo=BERLIN_WINTER),
            days_since_requested=3,
        )


@CATALOGUE.register
class ReferralCompleted(_ReferralEvent):
    """The module ended for this family (``completed``)."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-completed.v1"

    outcome: CompletionOutcome | None = None
    """How the module ended, if the Träger said."""

    @classmethod
    def example(cls) -> ReferralCompleted:
        return cls(
            **_example_ids(),
            occurred_at=datetime(2025, 9, 30, 16, 0, tzinfo=BERLIN_WINTER),
            outcome=CompletionOutcome.GOAL_REACHED,
        )


@CATALOGUE.register
class ReferralCancelled(_ReferralEvent):
    """The requester cancelled the referral (``cancelled``); the Träger must stop and purge."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-cancelled.v1"

    reason: ReferralCancelReason
    """Why the referral was cancelled."""
    reason_code: str | None = Field(default=None, pattern=_REASON_CODE)
    """A more specific code, if any (a code, never free text)."""
    cancelled_by_role: Role
    """Role of the person (or ``system``) that cancelled."""

    @classmethod
    def example(cls) -> ReferralCancelled:
        return cls(
            **_example_ids(),
            occurred_at=datetime(2025, 3, 5, 8, 45, tzinfo=BERLIN_WINTER),
            reason=ReferralCancelReason.CONSENT_WITHDRAWN,
            cancelled_by_role=Role.SYSTEM,
        )


@CATALOGUE.register
class ReferralEscalated(_ReferralEvent):
    """The Träger did not answer in time; the Bezirksteam (district team) takes over."""

    event_type: ClassVar[str] = "de.lotse.referrals.referral-escalated.v1"

    working_days_without_answer: int = Field(ge=1)
    """Working days since the referral was requested without the awaited answer."""
    last_status: ReferralStatus
    """The status the referral was stuck in."""
    escalated_to: Literal["bezirksteam"] = "bezirksteam"
    """Who the escalation goes to: the Bezirksteam of ``bezirk``."""

    @classmethod
    def example(cls) -> ReferralEscalated:
        return cls(
            **_example_ids(),
            occurred_at=datetime(2025, 3, 7, 6, 0, tzinfo=BERLIN_WINTER),
            working_days_without_answer=3,
            last_status=ReferralStatus.REQUESTED,
        )


# --- wishes no Träger could be found for, and refused partner answers ---------------------


class WishWaitingFor(StrEnum):
    """What an open wish (a handover or a visit's "referral wished") is waiting for."""

    CONSENT = "consent"
    """No consent of the family names a Träger offering the module (e.g. "the Familienbüro
    chooses"): the Familienbüro records one and places the wish."""
    CAPACITY = "capacity"
    """The consented Träger have no free place this month."""
    OFFER = "offer"
    """No (active) Träger offers the module in the family's Stadtbezirk."""
    CASE = "case"
    """The family is not known to the service yet (its registration has not arrived)."""
    KEYRING = "keyring"
    """The keyring did not answer; tried again."""
    OTHER = "other"


@CATALOGUE.register
class WishEscalated(EventModel):
    """A handover or a visit's referral wish is still not a referral after the configured
    number of working days: the Bezirksteam (district team) takes it over. Sent once per
    wish."""

    model_config = DOCUMENTED

    event_type: ClassVar[str] = "de.lotse.referrals.wish-escalated.v1"
    topic: ClassVar[str] = topics.REFERRALS
    source: ClassVar[str] = SOURCE

    wish_id: Uuid
    """Id of the wish (as listed under ``GET /bezirke/{bezirk}/wishes``)."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk (city district) slug of the case."""
    module: Slug
    """The module wished for."""
    origin: Literal["handover", "visit"]
    """A Babylotse's handover request or a welcome visit's referral wish."""
    waiting_for: WishWaitingFor
    """What the wish is waiting for."""
    reason: str = Field(max_length=1000)
    """Why it could not be placed, in words (names Träger and modules, never a person)."""
    working_days_open: int = Field(ge=1)
    """Working days since the wish arrived."""
    occurred_at: AwareDatetime
    """When it was escalated."""
    escalated_to: Literal["bezirksteam"] = "bezirksteam"
    """Who the escalation goes to: the Bezirksteam of ``bezirk``."""

    @classmethod
    def example(cls) -> WishEscalated:
        return cls(
            wish_id=EXAMPLE_HANDOVER_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            module=EXAMPLE_MODULE,
            origin="handover",
            waiting_for=WishWaitingFor.CONSENT,
            reason="the family's consent names no Träger: the Familienbüro chooses one",
            working_days_open=5,
            occurred_at=datetime(2025, 3, 10, 6, 0, tzinfo=BERLIN_WINTER),
        )


class AnswerRefusedCode(StrEnum):
    """Why a Träger's message on its responses topic was refused (machine-readable)."""

    INVALID_ENVELOPE = "invalid-envelope"
    """Not a CloudEvent (binary or structured mode), or too large."""
    UNKNOWN_TYPE = "unknown-type"
    """An event type (or major version) the contract does not know."""
    SCHEMA_VIOLATION = "schema-violation"
    """The data does not match the JSON Schema of its type."""
    WRONG_TOPIC = "wrong-topic"
    """The answer names another Träger than the topic it was written to."""
    WRONG_SOURCE = "wrong-source"
    """The CloudEvents ``source`` is not ``/partner/<traeger>``."""
    UNKNOWN_REFERRAL = "unknown-referral"
    """No referral with this id and case is addressed to the Träger (also said when it
    is another Träger's: whose it is, or whether it exists, is not told)."""
    IMPLAUSIBLE_TIME = "implausible-time"
    """``occurred_at`` lies in the future or before the referral was requested."""
    ILLEGAL_STEP = "illegal-step"
    """The answer does not follow the referral's lifecycle from its current status."""
    CONFLICTING_DUPLICATE = "conflicting-duplicate"
    """The same event id was sent before with other data."""
    NOT_APPLIED = "not-applied"
    """Anything else; ops have the details on the dead-letter topic."""


@CATALOGUE.register
class AnswerRefused(EventModel):
    """A message a Träger wrote to its responses topic was refused and changed nothing.

    Published to that Träger's own feed only (``lotse.partner.<traeger>.referrals``), so
    that its client can log and fix it; ops keep the full record on the dead-letter topic.
    Carries the refused message's coordinates, a code and a reason, never data of another
    Träger's referral."""

    model_config = DOCUMENTED

    event_type: ClassVar[str] = "de.lotse.referrals.answer-refused.v1"
    topic: ClassVar[str] = topics.REFERRALS
    source: ClassVar[str] = SOURCE
    subject_field: ClassVar[str] = "refused_event_id"
    bezirk_field: ClassVar[str | None] = None
    traeger_field: ClassVar[str | None] = "traeger"

    traeger: Slug
    """The Träger whose message was refused (the owner of the topic it arrived on)."""
    refused_event_id: str | None = Field(default=None, max_length=256)
    """The CloudEvents ``id`` of the refused message (absent when it was no CloudEvent)."""
    refused_event_type: str | None = Field(default=None, max_length=256)
    """Its CloudEvents ``type``, if it had one."""
    refused_topic: str = Field(max_length=249)
    """The topic it was read from (the Träger's responses topic)."""
    refused_partition: int = Field(ge=0)
    """Its partition."""
    refused_offset: int = Field(ge=0)
    """Its offset."""
    reason_code: AnswerRefusedCode
    """Why it was refused (machine-readable)."""
    reason: str = Field(max_length=1000)
    """Why it was refused, in words."""
    refused_at: AwareDatetime
    """When it was refused."""

    @classmethod
    def example(cls) -> AnswerRefused:
        return cls(
            traeger=EXAMPLE_TRAEGER,
            refused_event_id="b1f0c3d2-4e5a-4b6c-8d7e-9f0a1b2c3d4e",
            refused_event_type="de.lotse.partner.referral-answer.v1",
            refused_topic="lotse.partner.hebammenzentrum-dortmund.responses",
            refused_partition=0,
            refused_offset=42,
            reason_code=AnswerRefusedCode.ILLEGAL_STEP,
            reason="completed is only possible from in-progress; the referral is accepted",
            refused_at=datetime(2025, 3, 4, 9, 31, tzinfo=BERLIN_WINTER),
        )
