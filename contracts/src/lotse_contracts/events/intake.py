"""Intake events: a family enters the chain, consents, is screened, asks for a handover.

Producer: the intake service (``/lotse/intake``), topic ``lotse.intake``. Families come
from a Babylotse in a birth clinic or from a move-in notice of the citizens' office
(families with children under six). Identifying data sits only in the ``personal`` block;
the screening result is special-category data (Art. 9 GDPR) and sits only in the
``screening`` block.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from lotse_contracts import topics
from lotse_contracts.events.base import CATALOGUE, EventModel
from lotse_contracts.events.common import (
    BERLIN_WINTER,
    DOCUMENTED,
    EXAMPLE_BEZIRK,
    EXAMPLE_BIRTH,
    EXAMPLE_CASE_ID,
    EXAMPLE_CONSENT_TRAEGER_ID,
    EXAMPLE_CONSENT_VISIT_ID,
    EXAMPLE_HANDOVER_ID,
    EXAMPLE_MODULE,
    EXAMPLE_REGISTERED_AT,
    EXAMPLE_TRAEGER,
    EXAMPLE_VISIT_TARGET,
    CaseId,
    Consent,
    ConsentScope,
    ConsentState,
    Role,
    Slug,
    Uuid,
    utc,
)
from lotse_contracts.personal import (
    EXAMPLE_KID,
    EncryptedBlock,
    PersonalData,
    example_block,
    split_personal,
)

SOURCE = "/lotse/intake"


class Channel(StrEnum):
    """How the family came to Lotse: via a birth clinic or via a move-in notice."""

    CLINIC = "clinic"
    MOVE_IN = "move_in"


def welcome_visit_target(
    channel: Channel, registered_on: date, days_since_birth: int, target_days: int
) -> date:
    """The day by which a family's welcome visit should have taken place: ``target_days``
    after the birth for a family registered in a birth clinic, after the registration for a
    family moving in. One rule for intake (``visit_target_date`` of ``family-registered``)
    and visits (its overdue check), so both name the same day."""
    reference = registered_on
    if channel is Channel.CLINIC:
        reference = registered_on - timedelta(days=days_since_birth)
    return reference + timedelta(days=target_days)


class BezirkSource(StrEnum):
    """How the Stadtbezirk was determined: from the address, or set explicitly by staff."""

    ADDRESS = "address"
    OVERRIDE = "override"


class SupportNeed(StrEnum):
    """Support need found in the screening, from none to acute."""

    NONE = "none"
    GENERAL = "general"
    INCREASED = "increased"
    ACUTE = "acute"


class Indicator(StrEnum):
    """Screening indicators (risk and strain factors) a Babylotse may record."""

    SINGLE_PARENT = "single_parent"
    YOUNG_PARENT = "young_parent"
    FINANCIAL_STRAIN = "financial_strain"
    HOUSING_STRAIN = "housing_strain"
    SOCIAL_ISOLATION = "social_isolation"
    LANGUAGE_BARRIER = "language_barrier"
    PARENT_HEALTH_STRAIN = "parent_health_strain"
    PARENT_MENTAL_STRAIN = "parent_mental_strain"
    CHILD_HEALTH_STRAIN = "child_health_strain"
    PREMATURE_BIRTH = "premature_birth"
    MULTIPLE_BIRTH = "multiple_birth"
    SIBLINGS_CARE_STRAIN = "siblings_care_strain"
    OTHER = "other"


class ErasureReason(StrEnum):
    """Why a family's data was erased: on request (Art. 17 GDPR), at the end of the
    retention period, or because the case duplicated another one."""

    REQUEST = "request"
    RETENTION_EXPIRED = "retention_expired"
    DUPLICATE = "duplicate"


class Screening(BaseModel):
    """Plaintext of the ``screening`` block of ``needs-assessed`` (Art. 9 GDPR data)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    support_need: SupportNeed
    """Overall support need."""
    indicators: list[Indicator] = Field(default_factory=list)
    """Indicators that led to the assessment."""
    wished_modules: list[Slug] = Field(default_factory=list)
    """Modules (offer catalogue slugs) the family would like, e.g. ``familienhebamme``."""
    instrument: Slug | None = None
    """Screening questionnaire and version used, e.g. ``kinderstark-screening-2024``."""


class _IntakeEvent(EventModel):
    model_config = DOCUMENTED

    topic: ClassVar[str] = topics.INTAKE
    source: ClassVar[str] = SOURCE


@CATALOGUE.register
class FamilyRegistered(_IntakeEvent):
    """A family was registered: a new case in a Stadtbezirk (city district).

    The identifying data is in ``personal``; everything in clear is derived and does not
    identify the family on its own. The Familienbüro (family office) of ``bezirk`` offers
    a Willkommensbesuch (welcome visit) by ``visit_target_date``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"channel": {"const": "clinic"}}},
            "then": {"required": ["clinic_id"]},
            "else": {"not": {"required": ["clinic_id"]}},
        }
    )

    event_type: ClassVar[str] = "de.lotse.intake.family-registered.v1"

    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug, e.g. ``innenstadt-west``, ``hoerde``."""
    bezirk_source: BezirkSource
    """Whether ``bezirk`` was derived from the address or set explicitly."""
    channel: Channel
    """Clinic (registered by a Babylotse) or move-in notice."""
    clinic_id: Slug | None = None
    """The birth clinic, for channel ``clinic`` only (and required there)."""
    registered_at: AwareDatetime
    """When the family was registered."""
    visit_target_date: date
    """Date by which the welcome visit should have taken place (computed by intake)."""
    days_since_birth_at_registration: int = Field(ge=0, le=6 * 366)
    """Age in days of the (youngest) child when the family was registered."""
    children_count: int = Field(ge=1, le=20)
    """Number of children the case covers (newborns, or children under six moving in)."""
    preferred_language: str | None = Field(default=None, pattern=r"^[a-z]{2,3}$")
    """Preferred language for contact, ISO 639 code such as ``de``, ``tr``, ``ar``."""
    consents: list[Consent]
    """Consents recorded at registration."""
    personal: EncryptedBlock
    """The family's contact data, sealed under its ``contact`` key (plaintext: PersonalData
    with the household's names, address, phone and e-mail). Blocks sealed before keys were
    bound to purposes (key id without ``/``) also hold the children's fields."""
    children: EncryptedBlock | None = None
    """The children's given names and dates of birth, sealed under the family's
    ``children`` key (plaintext: ChildrenData); absent when nothing about them is known."""

    @model_validator(mode="after")
    def _clinic_only_for_clinic_channel(self) -> FamilyRegistered:
        if (self.channel is Channel.CLINIC) != (self.clinic_id is not None):
            raise ValueError("clinic_id is required for channel 'clinic' and only there")
        return self

    @classmethod
    def example(cls) -> FamilyRegistered:
        personal = PersonalData(
            family_name="Beispiel",
            parent_given_names=["Elif", "Jonas"],
            child_given_names=["Mira"],
            child_birth_dates=[EXAMPLE_BIRTH],
            street="Musterweg",
            house_number="12a",
            postcode="44263",
            city="Dortmund",
            phone="+49 231 555 0100",
            email="familie.beispiel@example.org",
        )
        contact, children = split_personal(personal)
        assert children is not None
        return cls(
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            bezirk_source=BezirkSource.ADDRESS,
            channel=Channel.CLINIC,
            clinic_id="st-josefs-hospital-hoerde",
            registered_at=EXAMPLE_REGISTERED_AT,
            visit_target_date=EXAMPLE_VISIT_TARGET,
            days_since_birth_at_registration=(EXAMPLE_REGISTERED_AT.date() - EXAMPLE_BIRTH).days,
            children_count=1,
            preferred_language="de",
            consents=[
                Consent(
                    consent_id=EXAMPLE_CONSENT_VISIT_ID,
                    scope=ConsentScope.WELCOME_VISIT,
                    state=ConsentState.GIVEN,
                    at=EXAMPLE_REGISTERED_AT,
                ),
                Consent(
                    consent_id=EXAMPLE_CONSENT_TRAEGER_ID,
                    scope=ConsentScope.TRAEGER_CONTACT,
                    traeger=EXAMPLE_TRAEGER,
                    purpose=EXAMPLE_MODULE,
                    state=ConsentState.GIVEN,
                    at=EXAMPLE_REGISTERED_AT,
                ),
            ],
            personal=example_block(
                contact, case_id=EXAMPLE_CASE_ID, label="family-registered.personal"
            ),
            children=example_block(
                children, case_id=EXAMPLE_CASE_ID, label="family-registered.children"
            ),
        )


@CATALOGUE.register
class NeedsAssessed(_IntakeEvent):
    """A Babylotse screened the family's support needs.

    The result (need level, indicators, wished-for modules) is special-category data
    (Art. 9 GDPR) and travels only inside ``screening`` (plaintext: Screening).
    """

    event_type: ClassVar[str] = "de.lotse.intake.needs-assessed.v1"

    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    assessed_at: AwareDatetime
    """When the screening was done."""
    screening: EncryptedBlock
    """The screening result, sealed with the family's data key."""

    @classmethod
    def example(cls) -> NeedsAssessed:
        screening = Screening(
            support_need=SupportNeed.INCREASED,
            indicators=[Indicator.SINGLE_PARENT, Indicator.SOCIAL_ISOLATION],
            wished_modules=[EXAMPLE_MODULE],
            instrument="kinderstark-screening-2024",
        )
        return cls(
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            assessed_at=datetime(2025, 3, 3, 10, 5, tzinfo=BERLIN_WINTER),
            screening=example_block(
                screening, case_id=EXAMPLE_CASE_ID, label="needs-assessed.screening"
            ),
        )


@CATALOGUE.register
class ConsentChanged(_IntakeEvent):
    """A consent was given or withdrawn after registration.

    Consumers must honour a withdrawal at once: a referral resting on a withdrawn
    ``traeger_contact`` consent is cancelled.
    """

    event_type: ClassVar[str] = "de.lotse.intake.consent-changed.v1"

    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    consent_id: Uuid
    """Id of the consent (new, or one given earlier)."""
    scope: ConsentScope
    """What the consent covers."""
    traeger: Slug | None = None
    """The Träger the consent is limited to (``traeger_contact`` only)."""
    purpose: Slug | None = None
    """The purpose it is limited to, a module slug."""
    state: ConsentState
    """The new state."""
    changed_at: AwareDatetime
    """When the family gave or withdrew the consent."""
    changed_by_role: Role
    """Role of the person who recorded the change."""

    @classmethod
    def example(cls) -> ConsentChanged:
        return cls(
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            consent_id="1c8f3e6a-4b2d-4a9e-b7f1-6d0e2c5a8b43",
            scope=ConsentScope.SCREENING_DATA_USE,
            state=ConsentState.GIVEN,
            changed_at=datetime(2025, 3, 12, 10, 40, tzinfo=BERLIN_WINTER),
            changed_by_role=Role.FAMILIENBUERO,
        )


@CATALOGUE.register
class HandoverRequested(_IntakeEvent):
    """A Babylotse asked for a warm handover of the family to a support module.

    The referrals service turns this into a referral (``referral-requested``) to a Träger
    (provider agency) offering ``module`` in the Bezirk; ``traeger`` is set only when the
    family chose one.
    """

    event_type: ClassVar[str] = "de.lotse.intake.handover-requested.v1"
    traeger_field: ClassVar[str | None] = "traeger"

    handover_id: Uuid
    """Id of this request; the resulting referral cites it."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    module: Slug
    """Requested module from the offer catalogue, e.g. ``familienhebamme``."""
    traeger: Slug | None = None
    """Träger the family chose, if any."""
    consent_ref: Uuid
    """The ``traeger_contact`` consent the handover rests on (§ 65 SGB VIII)."""
    urgent: bool = False
    """True when the screening found an acute need."""
    requested_by_role: Role
    """Role of the requester, normally ``babylotse``."""
    requested_at: AwareDatetime
    """When the handover was requested."""

    @classmethod
    def example(cls) -> HandoverRequested:
        return cls(
            handover_id=EXAMPLE_HANDOVER_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            module=EXAMPLE_MODULE,
            traeger=EXAMPLE_TRAEGER,
            consent_ref=EXAMPLE_CONSENT_TRAEGER_ID,
            requested_by_role=Role.BABYLOTSE,
            requested_at=datetime(2025, 3, 3, 10, 20, tzinfo=BERLIN_WINTER),
        )


@CATALOGUE.register
class FamilyErased(_IntakeEvent):
    """A family's data key was destroyed (crypto-shredding).

    Every encrypted block of the case is unreadable from now on; every service must purge
    its local copies and any derived data that could single the family out.
    """

    event_type: ClassVar[str] = "de.lotse.intake.family-erased.v1"

    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    erased_at: AwareDatetime
    """When the key was destroyed."""
    key_id: str = Field(min_length=1, max_length=128)
    """The ``kid`` of the destroyed data key."""
    reason: ErasureReason
    """Why the data was erased."""

    @classmethod
    def example(cls) -> FamilyErased:
        return cls(
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            erased_at=utc(2028, 3, 31, 0, 30),
            key_id=EXAMPLE_KID,
            reason=ErasureReason.RETENTION_EXPIRED,
        )


@CATALOGUE.register
class CasesMerged(_IntakeEvent):
    """Two cases turned out to be the same family; the Familienbüro responsible for the
    existing case merged them, and ``merged_case_id`` goes away in favour of
    ``surviving_case_id``.

    Published once, keyed (Kafka key and ``subject``) by the merged case, so it follows
    that case's own events; ``bezirk`` is the survivor's Stadtbezirk. Consents of the merged
    case still in force that the survivor lacks were carried over to it beforehand, each
    published as ``consent-changed`` of the survivor. Consumers count and visit the family
    once, under the survivor: the merged case's open welcome visit is cancelled (reason
    ``duplicate``), its waiting referral wishes move to the survivor, and it leaves the
    registration figures. Nothing changes on the merged case afterwards.
    """

    event_type: ClassVar[str] = "de.lotse.intake.cases-merged.v1"
    subject_field: ClassVar[str] = "merged_case_id"

    merged_case_id: CaseId
    """The case that goes away (pseudonymous UUID)."""
    surviving_case_id: CaseId
    """The case the family is followed under from now on."""
    bezirk: Slug
    """Stadtbezirk slug of the surviving case."""
    merged_bezirk: Slug
    """Stadtbezirk slug of the merged case (it may differ from ``bezirk``)."""
    merged_at: AwareDatetime
    """When the Familienbüro merged the two cases."""
    merged_by_role: Role
    """Role of the person who merged them, normally ``familienbuero``."""

    @classmethod
    def example(cls) -> CasesMerged:
        return cls(
            merged_case_id="5b0f7c1e-2d4a-4c8e-9a61-3f7e8d2b1c90",
            surviving_case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            merged_bezirk="aplerbeck",
            merged_at=datetime(2025, 3, 20, 9, 15, tzinfo=BERLIN_WINTER),
            merged_by_role=Role.FAMILIENBUERO,
        )
