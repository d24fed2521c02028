"""Intake's tables and the models of its HTTP API.

Nothing personal is stored in clear: names, address, phone, e-mail and birth dates sit only
in ``intake_case.personal``, and the screening result only in ``intake_screening.screening``,
both sealed with the family's own data key (``intake_data_key``, itself wrapped with the
service's key encryption key). The duplicate guard keeps keyed hashes (``intake_match_key``),
Idempotency-Keys keep a keyed fingerprint of the request, never the request. Erasing a family
deletes its key and empties those columns.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from lotse_contracts.events.common import ConsentScope, ConsentState, Slug, Uuid
from lotse_contracts.events.intake import (
    BezirkSource,
    Channel,
    ErasureReason,
    Indicator,
    SupportNeed,
)
from lotse_contracts.events.referrals import PersonalField
from lotse_contracts.personal import EncryptedBlock, KeyPurpose
from lotse_runtime.inputs import (
    BEFORE_REGISTRATION,
    BIRTH_DATE,
    RECORDED,
    BirthDate,
    RecordedMoment,
    RequestModel,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field as TableField
from sqlmodel import SQLModel

# -- tables --------------------------------------------------------------------------------------


class IntakeCase(SQLModel, table=True):
    """A family's case: pseudonymous id, Stadtbezirk, channel, sealed personal data."""

    __tablename__ = "intake_case"

    case_id: str = TableField(primary_key=True, max_length=36)
    channel: str = TableField(max_length=16)
    clinic_id: str | None = TableField(default=None, max_length=64, index=True)
    bezirk: str = TableField(max_length=64, index=True)
    bezirk_source: str = TableField(max_length=16)
    bezirk_derived: str | None = TableField(
        default=None,
        max_length=64,
        description="Stadtbezirk the postcode gave (purged on erasure).",
    )
    registered_at: datetime
    registered_by_role: str = TableField(max_length=32)
    registered_by_subject: str = TableField(max_length=200)
    children_count: int
    preferred_language: str | None = TableField(default=None, max_length=3)
    days_since_birth_at_registration: int | None = None
    visit_target_date: date
    key_id: str = TableField(max_length=128, description="kid of the family's data key.")
    personal: str | None = TableField(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="EncryptedBlock (JSON) of the contact data (PersonalData without the "
        "children's fields), under the family's contact key; null once erased.",
    )
    children: str | None = TableField(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="EncryptedBlock (JSON) of ChildrenData under the family's children key; "
        "null when unknown or erased.",
    )
    erased_at: datetime | None = None
    erasure_reason: str | None = TableField(default=None, max_length=32)
    erased_by_role: str | None = TableField(default=None, max_length=32)


class IntakeDataKey(SQLModel, table=True):
    """One family's data key, wrapped with the key encryption key. Deleted on erasure: that
    is what makes every copy of the family's blocks unreadable (crypto-shredding)."""

    __tablename__ = "intake_data_key"

    case_id: str = TableField(primary_key=True, max_length=36)
    kid: str = TableField(max_length=128, unique=True)
    wrapped_key: str = TableField(sa_column=Column(Text, nullable=False))
    created_at: datetime


class IntakeMatchKey(SQLModel, table=True):
    """Duplicate guard: HMAC of normalised family name + child birth date + address."""

    __tablename__ = "intake_match_key"

    match_key: str = TableField(primary_key=True, max_length=64)
    case_id: str = TableField(max_length=36, index=True)


class IntakeConsent(SQLModel, table=True):
    """A consent of a family and its current state; changes are in intake_consent_change."""

    __tablename__ = "intake_consent"

    consent_id: str = TableField(primary_key=True, max_length=36)
    case_id: str = TableField(max_length=36, index=True)
    scope: str = TableField(max_length=32)
    traeger: str | None = TableField(default=None, max_length=64)
    purpose: str | None = TableField(default=None, max_length=64)
    state: str = TableField(max_length=16)
    given_at: datetime
    withdrawn_at: datetime | None = None
    position: int = TableField(
        default=0, description="Order among consents given at the same moment (registration)."
    )


class IntakeConsentChange(SQLModel, table=True):
    """History of a consent: given or withdrawn, when, recorded by whom (role and
    pseudonymous subject)."""

    __tablename__ = "intake_consent_change"

    id: int | None = TableField(default=None, primary_key=True)
    consent_id: str = TableField(max_length=36, index=True)
    case_id: str = TableField(max_length=36, index=True)
    state: str = TableField(max_length=16)
    at: datetime = TableField(description="When the family gave or withdrew it.")
    recorded_at: datetime
    recorded_by_role: str = TableField(max_length=32)
    recorded_by_subject: str = TableField(max_length=200)


class IntakeScreening(SQLModel, table=True):
    """A screening (needs assessment); its result is Art. 9 GDPR data and stored sealed."""

    __tablename__ = "intake_screening"

    screening_id: str = TableField(primary_key=True, max_length=36)
    case_id: str = TableField(max_length=36, index=True)
    assessed_at: datetime
    recorded_at: datetime
    recorded_by_role: str = TableField(max_length=32)
    recorded_by_subject: str = TableField(max_length=200)
    screening: str | None = TableField(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="EncryptedBlock (JSON) of the Screening; null once erased.",
    )


class IntakeHandover(SQLModel, table=True):
    """A warm handover request to a module (and possibly a named Träger)."""

    __tablename__ = "intake_handover"

    handover_id: str = TableField(primary_key=True, max_length=36)
    case_id: str = TableField(max_length=36, index=True)
    module: str = TableField(max_length=64)
    traeger: str | None = TableField(default=None, max_length=64)
    consent_id: str = TableField(max_length=36)
    urgent: bool
    requested_at: datetime
    requested_by_role: str = TableField(max_length=32)
    requested_by_subject: str = TableField(max_length=200)


class IntakeIdempotency(SQLModel, table=True):
    """An Idempotency-Key a caller used, the request's keyed fingerprint and the first
    response (which never holds personal data), replayed for a repeated request."""

    __tablename__ = "intake_idempotency"
    __table_args__ = (UniqueConstraint("subject", "idempotency_key"),)

    id: int | None = TableField(default=None, primary_key=True)
    subject: str = TableField(max_length=200)
    idempotency_key: str = TableField(max_length=255)
    fingerprint: str = TableField(max_length=64)
    status_code: int
    response: str = TableField(sa_column=Column(Text, nullable=False))
    case_id: str | None = TableField(default=None, max_length=36, index=True)
    created_at: datetime = TableField(index=True)


#: ``IntakeIdempotency.fingerprint`` of a request of a family erased since: a repeat is
#: refused (410) rather than answered or carried out anew.
ERASED_FINGERPRINT = "erased"


class IntakeErasureRequest(SQLModel, table=True):
    """A request to erase a family (four eyes): recorded with its reason by one person,
    carried out only when a different data-protection officer confirms it; withdrawable
    while pending. Kept as proof of who erased why until the tombstone goes."""

    __tablename__ = "intake_erasure_request"

    request_id: str = TableField(primary_key=True, max_length=36)
    case_id: str = TableField(max_length=36, index=True)
    reason: str = TableField(max_length=32)
    note: str = TableField(max_length=500)
    state: str = TableField(max_length=16)
    """``pending``, ``confirmed`` or ``withdrawn``."""
    requested_at: datetime
    requested_by_role: str = TableField(max_length=32)
    requested_by_subject: str = TableField(max_length=200)
    decided_at: datetime | None = None
    decided_by_role: str | None = TableField(default=None, max_length=32)
    decided_by_subject: str | None = TableField(default=None, max_length=200)


class IntakePossibleDuplicate(SQLModel, table=True):
    """A registration that matched a case outside the registrar's scope: the new case was
    created as usual and flagged here for the Familienbüro responsible for the existing
    case (``bezirk``), which merges the two or dismisses the flag. Ids only."""

    __tablename__ = "intake_possible_duplicate"
    __table_args__ = (UniqueConstraint("case_id", "existing_case_id"),)

    duplicate_id: str = TableField(primary_key=True, max_length=36)
    case_id: str = TableField(max_length=36, index=True, description="The new case.")
    existing_case_id: str = TableField(max_length=36, index=True)
    bezirk: str = TableField(
        max_length=64, index=True, description="Stadtbezirk of the existing case: who decides."
    )
    created_at: datetime
    status: str = TableField(max_length=16, description="open, merged or dismissed.")
    decided_at: datetime | None = None
    decided_by_role: str | None = TableField(default=None, max_length=32)
    decided_by_subject: str | None = TableField(default=None, max_length=200)
    merged_case_id: str | None = TableField(
        default=None, max_length=36, index=True, description="The case that went away."
    )
    surviving_case_id: str | None = TableField(default=None, max_length=36)


TABLES: list[type[SQLModel]] = [
    IntakeCase,
    IntakeDataKey,
    IntakeMatchKey,
    IntakeConsent,
    IntakeConsentChange,
    IntakeScreening,
    IntakeHandover,
    IntakeIdempotency,
    IntakeErasureRequest,
    IntakePossibleDuplicate,
]


# -- HTTP request models -------------------------------------------------------------------------

_POSTCODE_DIGITS = 5


class _Input(RequestModel):
    # A misspelt field name is refused rather than silently dropped; control characters in
    # text are refused (RequestModel, lotse_runtime.inputs).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


_RECORDED = (
    f"With its time-zone offset; {RECORDED.text}, and at most {BEFORE_REGISTRATION.days} days "
    "before the family's registration."
)


Text200 = Annotated[str, Field(min_length=1, max_length=200)]


class FamilyCreate(_Input):
    """Who the family is."""

    family_name: Text200 = Field(description="Family name of the household.")
    parent_given_names: list[Text200] = Field(
        default_factory=list, max_length=4, description="Given names of parents or guardians."
    )
    phone: str | None = Field(
        default=None,
        max_length=40,
        description="Phone number for arranging the welcome visit.",
        examples=["+49 231 555 0100"],
    )
    email: str | None = Field(default=None, max_length=254, description="E-mail address.")

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        if value is not None:
            digits = sum(c.isdigit() for c in value)
            if digits < 5 or any(not (c.isdigit() or c in " +-/()") for c in value):
                raise PydanticCustomError(
                    "phone", "a phone number has digits (and + - / ( ) spaces) only"
                )
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None:
            local, at, domain = value.partition("@")
            if not (local and at and "." in domain and " " not in value):
                raise PydanticCustomError("email", "this is not an e-mail address")
        return value


class ChildCreate(_Input):
    """A child the case is about (the newborn, or a child under six moving in)."""

    given_name: str | None = Field(
        default=None, min_length=1, max_length=200, description="Given name, if chosen yet."
    )
    birth_date: BirthDate = Field(
        description=f"Date of birth (YYYY-MM-DD); {BIRTH_DATE.text}, and within the channel's "
        "age limit."
    )


class AddressCreate(_Input):
    """The home address; its postcode decides the Stadtbezirk (city district)."""

    street: Text200 = Field(examples=["Musterweg"])
    house_number: str = Field(min_length=1, max_length=20, examples=["12a"])
    postcode: str = Field(description="Five-digit German postcode (PLZ).", examples=["44263"])
    city: str | None = Field(
        default=None, max_length=100, description="City; if given it must be this city."
    )

    @field_validator("postcode")
    @classmethod
    def _postcode(cls, value: str) -> str:
        if len(value) != _POSTCODE_DIGITS or not value.isascii() or not value.isdigit():
            raise PydanticCustomError("postcode", "a postcode has five digits, e.g. 44137")
        return value


class ConsentCreate(_Input):
    """A consent the family gives.

    Scopes: ``welcome_visit`` (contact by the Familienbüro for a Willkommensbesuch, the
    welcome visit), ``traeger_contact`` (passing contact data for one purpose — a module —
    to the named Träger, or without ``traeger`` to a Träger the Familienbüro chooses;
    § 65 SGB VIII), ``screening_data_use`` (using the screening result for referrals).
    """

    scope: ConsentScope
    traeger: Slug | None = Field(default=None, description="Träger slug (traeger_contact).")
    purpose: Slug | None = Field(
        default=None, description="Module slug the consent is for (traeger_contact)."
    )
    given_at: RecordedMoment | None = Field(
        default=None,
        description=f"When the family gave it (e.g. signed the form); default now. {_RECORDED}",
    )


class RegistrationCreate(_Input):
    """A family to register, from a birth clinic or a move-in notice."""

    channel: Channel = Field(
        description="clinic: registered by a Babylotse; move_in: a move-in notice "
        "(families with children under six)."
    )
    clinic_id: Slug | None = Field(
        default=None,
        description="Birth clinic (clinic channel). A Babylotse may leave it out: their own.",
    )
    family: FamilyCreate
    children: list[ChildCreate] = Field(min_length=1, max_length=20)
    address: AddressCreate
    preferred_language: str | None = Field(
        default=None, description="ISO 639 language code for contact, e.g. de, tr, ar."
    )
    bezirk_override: Slug | None = Field(
        default=None,
        description="Explicit Stadtbezirk, for addresses whose postcode spans two districts; "
        "recorded as bezirk_source=override.",
    )
    consents: list[ConsentCreate] = Field(default_factory=list, max_length=20)

    @field_validator("preferred_language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = value.lower()
        if not (2 <= len(code) <= 3 and code.isascii() and code.isalpha()):
            raise PydanticCustomError(
                "language", "give the language as a two- or three-letter code, e.g. de, tr, ar"
            )
        return code


class ConsentWithdrawal(_Input):
    """The family withdraws a consent."""

    withdrawn_at: RecordedMoment | None = Field(
        default=None,
        description=f"When the family withdrew it; default now. With its time-zone offset; "
        f"{RECORDED.text}, and not before the consent was given.",
    )


class ScreeningCreate(_Input):
    """A screening (needs assessment) by a Babylotse; special-category data (Art. 9 GDPR).

    Indicators come from a fixed list (see the ``Indicator`` schema); wished-for modules
    are the city's offer modules.
    """

    support_need: SupportNeed
    indicators: list[Indicator] = Field(default_factory=list, max_length=len(Indicator))
    wished_modules: list[Slug] = Field(default_factory=list, max_length=20)
    instrument: Slug | None = Field(
        default=None, description="Questionnaire and version, e.g. kinderstark-screening-2024."
    )
    assessed_at: RecordedMoment | None = Field(
        default=None, description=f"When the screening was done; default now. {_RECORDED}"
    )


class HandoverCreate(_Input):
    """A warm handover request: to a module, optionally to a named Träger."""

    module: Slug = Field(description="Offer module, e.g. familienhebamme.")
    traeger: Slug | None = Field(
        default=None, description="The Träger the family chose; none: the Familienbüro chooses."
    )
    consent_id: Uuid | None = Field(
        default=None,
        description="The traeger_contact consent it rests on; default: the matching one.",
    )
    urgent: bool | None = Field(
        default=None,
        description="Default: urgent when the latest screening found an acute need and "
        "the family allowed screening data use.",
    )


class ErasureCreate(_Input):
    """A request to erase a family: its data key is destroyed (crypto-shredding) once a
    second person, a data-protection officer other than the requester, confirms it."""

    reason: ErasureReason = ErasureReason.REQUEST
    note: str = Field(
        min_length=3,
        max_length=500,
        description=(
            "Why, recorded with the request: e.g. the reference of the family's written "
            "request (Art. 17 GDPR). No personal data: it is kept as proof after erasure."
        ),
    )


# -- HTTP response models ------------------------------------------------------------------------


class ConsentChangePublic(BaseModel):
    state: ConsentState
    at: datetime
    recorded_at: datetime
    recorded_by_role: str


class ConsentPublic(BaseModel):
    consent_id: str
    scope: ConsentScope
    traeger: str | None
    purpose: str | None
    state: ConsentState
    given_at: datetime
    withdrawn_at: datetime | None
    history: list[ConsentChangePublic] = Field(default_factory=list)


class HandoverPublic(BaseModel):
    handover_id: str
    case_id: str
    module: str
    traeger: str | None
    consent_id: str
    urgent: bool
    requested_at: datetime


class CasePublic(BaseModel):
    """A case without personal data: what registration answers and what may be replayed."""

    case_id: str
    channel: Channel
    clinic_id: str | None
    bezirk: str
    bezirk_source: BezirkSource
    registered_at: datetime
    visit_target_date: date
    children_count: int
    preferred_language: str | None
    consents: list[ConsentPublic]
    erased: bool = False
    duplicate: bool = Field(
        default=False,
        description="True when the family was already registered: this is the existing case.",
    )


class ChildPublic(BaseModel):
    given_name: str | None
    birth_date: date


class PersonalPublic(BaseModel):
    family_name: str
    parent_given_names: list[str]
    children: list[ChildPublic]
    street: str | None
    house_number: str | None
    postcode: str | None
    city: str | None
    phone: str | None
    email: str | None


class CaseDetail(CasePublic):
    """A case with its personal data (decrypted for the caller; audited)."""

    bezirk_derived: str | None
    personal: PersonalPublic | None
    handovers: list[HandoverPublic]
    erased_at: datetime | None


class ScreeningPublic(BaseModel):
    screening_id: str
    case_id: str
    assessed_at: datetime
    recorded_by_role: str
    support_need: SupportNeed | None = None
    indicators: list[Indicator] | None = None
    wished_modules: list[str] | None = None
    instrument: str | None = None


class ScreeningRecorded(BaseModel):
    """Answer to recording a screening: ids only, the content is not echoed."""

    screening_id: str
    case_id: str
    assessed_at: datetime


class ErasureRequestPublic(BaseModel):
    """A request to erase a family and what became of it (four eyes)."""

    request_id: str
    case_id: str
    reason: ErasureReason
    note: str
    state: str = Field(description="pending, confirmed or withdrawn.")
    requested_at: datetime
    requested_by_role: str
    decided_at: datetime | None
    decided_by_role: str | None


class ErasurePublic(BaseModel):
    case_id: str
    bezirk: str
    erased: bool
    erased_at: datetime | None
    reason: ErasureReason | None
    key_id: str
    pending_request: ErasureRequestPublic | None = Field(
        default=None, description="A request waiting for a second person's confirmation."
    )


class DataKeyPublic(BaseModel):
    """One purpose-bound key of a family, for an authorised service: it opens the blocks
    sealed for that purpose and nothing else."""

    case_id: str
    kid: str
    purpose: KeyPurpose
    alg: str = "A256GCM"
    key: str = Field(description="The 256-bit key, base64url without padding.")


class DisclosureCreate(_Input):
    """What the referrals service asks intake to seal for one referral."""

    referral_id: Uuid
    traeger: Slug
    consent_id: Uuid = Field(description="The traeger_contact consent naming the Träger.")
    fields: list[PersonalField] = Field(
        max_length=len(PersonalField), description="The fields the consent lets pass."
    )


class DisclosureSealed(BaseModel):
    """The disclosure of one referral, sealed for its Träger (nothing when the family gave
    none of the fields)."""

    kid: str | None
    disclosed_fields: list[PersonalField]
    disclosure: EncryptedBlock | None = None
    disclosure_jwe: str | None = None


class PossibleDuplicatePublic(BaseModel):
    """A flagged possible duplicate, as the responsible Familienbüro sees it: ids, the new
    case's Stadtbezirk and channel, no personal data."""

    duplicate_id: str
    case_id: str = Field(description="The case registered later.")
    existing_case_id: str = Field(description="The case of this Bezirk it matched.")
    bezirk: str = Field(description="Stadtbezirk of the existing case (who decides).")
    case_bezirk: str = Field(description="Stadtbezirk of the new case.")
    channel: Channel
    created_at: datetime
    status: str
    decided_at: datetime | None = None
    merged_case_id: str | None = None
    surviving_case_id: str | None = None


class MergeCreate(_Input):
    """Merge the two cases of a possible duplicate: one survives, the other goes away."""

    surviving_case_id: Uuid | None = Field(
        default=None,
        description="The case that survives: one of the two; default the existing case.",
    )
