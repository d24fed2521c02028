"""What intake does, apart from HTTP: one function per use case (register a family, record
consent, screening and handovers, read a case, erase a family), each in the shape load →
decide (domain.py) → save, inside the session it is given, with its events added to the
outbox and its audit entry recorded. A changing use case returns an :class:`Outcome` (status
and public model); the route (api.py) runs it under the request's Idempotency-Key
(idempotency.py), which opens the transaction. Refusals are raised, never answered here.

The four-eyes erasure (erasure.py), possible duplicates (duplicates.py) and the keyring's
releases to other services (releases.py) are use cases of the same shape in modules of
their own.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from lotse_contracts.events.common import Consent, ConsentScope, ConsentState
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.intake import (
    BezirkSource,
    Channel,
    ConsentChanged,
    ErasureReason,
    FamilyErased,
    FamilyRegistered,
    HandoverRequested,
    NeedsAssessed,
    Screening,
    SupportNeed,
)
from lotse_contracts.personal import (
    ChildrenData,
    EncryptedBlock,
    KeyPurpose,
    PersonalData,
    split_personal,
)
from lotse_runtime import audit
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.audit import AuditAction
from lotse_runtime.db import add_at_commit, on_postgres, one_of
from lotse_runtime.identity import (
    AccessDenied,
    Caller,
    CaseScope,
    Role,
    ensure_may_access_case,
    ensure_role,
    event_role,
    may_access_case,
)
from lotse_runtime.outbox import OutboxMessage
from lotse_runtime.refusal import Conflict, Refusal
from pydantic import BaseModel
from sqlalchemy import Select, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_intake import domain
from lotse_intake.domain import ConsentRecord, ConsentTerms, DuplicateStatus
from lotse_intake.keyring import FamilyKeys, Keyring
from lotse_intake.settings import IntakeSecrets, IntakeSettings
from lotse_intake.tables import (
    ERASED_FINGERPRINT,
    CaseDetail,
    CasePublic,
    ChildPublic,
    ConsentChangePublic,
    ConsentCreate,
    ConsentPublic,
    ConsentWithdrawal,
    ErasurePublic,
    HandoverCreate,
    HandoverPublic,
    IntakeCase,
    IntakeConsent,
    IntakeConsentChange,
    IntakeHandover,
    IntakeIdempotency,
    IntakeMatchKey,
    IntakePossibleDuplicate,
    IntakeScreening,
    PersonalPublic,
    RegistrationCreate,
    ScreeningCreate,
    ScreeningPublic,
    ScreeningRecorded,
)

#: Who may do what, before the per-case policy (own clinic / own Stadtbezirk) applies.
READ_CASE = (Role.babylotse, Role.familienbuero, Role.bezirksteam)
CHANGE_CONSENT = (Role.babylotse, Role.familienbuero, Role.bezirksteam)
READ_CONSENT = (*CHANGE_CONSENT, Role.dpo)
SCREEN = (Role.babylotse, Role.familienbuero)
HAND_OVER = (Role.babylotse, Role.familienbuero)
ERASE = (Role.dpo, Role.familienbuero, Role.babylotse)
#: Who sees names and addresses. The Bezirksteam (district coordination team) reads cases
#: of its Bezirk without them: it coordinates, the Familienbüro contacts the family. Of the
#: services only those named in ``keyring_clients`` (by token subject, never by role).
PERSONAL_DATA_ROLES = frozenset({Role.babylotse, Role.familienbuero})


@dataclass(frozen=True)
class IntakeContext:
    """What intake's routes need beyond the runtime; built in the app factory."""

    settings: IntakeSettings
    secrets: IntakeSecrets
    keyring: Keyring


@dataclass(frozen=True)
class Outcome:
    """What a changing use case produced: its status, its answer (never personal data, as
    it is stored for replay) and the case it concerns."""

    status_code: int
    body: BaseModel
    case_id: str | None


@dataclass(frozen=True)
class Call:
    """One request: who calls which route, and what the service works with."""

    runtime: ServiceRuntime[IntakeSettings]
    intake: IntakeContext
    caller: Caller
    route: str
    """Route template (``/cases/{case_id}``), as the audit log records it."""
    path: str

    def now(self) -> datetime:
        return self.runtime.clock()

    def audit(
        self, session: AsyncSession, action: AuditAction, case_id: str | None, purpose: str
    ) -> None:
        audit.record(
            session,
            service=self.runtime.service,
            caller=self.caller,
            action=action,
            case_id=case_id,
            purpose=purpose,
            path=self.route,
        )

    def is_keyring_client(self) -> bool:
        """A service named in ``keyring_clients``: by its token's subject, the role alone
        (any service) is never enough."""
        return (
            self.caller.role is Role.service
            and self.caller.subject in self.intake.settings.keyring_clients
        )

    def sees_personal_data(self) -> bool:
        if self.caller.role is Role.service:
            return self.is_keyring_client()  # by name, see is_keyring_client
        return self.caller.role in PERSONAL_DATA_ROLES

    def authorise(
        self, case: IntakeCase | None, roles: Sequence[Role], *, personal_data: bool
    ) -> IntakeCase:
        """The case, if the caller has one of ``roles`` and may access it (else 403)."""
        ensure_role(self.caller, *roles)
        if personal_data and self.caller.role is Role.service and not self.is_keyring_client():
            raise AccessDenied(f"service {self.caller.subject} may not read personal data")
        scope = (
            None
            if case is None
            else CaseScope(bezirk=case.bezirk, registered_by_clinic=case.clinic_id)
        )
        ensure_may_access_case(self.caller, scope, personal_data=personal_data)
        assert case is not None  # the policy denies an unknown case
        return case


# -- reading state -------------------------------------------------------------------------------


async def load_case(
    session: AsyncSession, case_id: str, *, for_update: bool = False
) -> IntakeCase | None:
    query = select(IntakeCase).where(col(IntakeCase.case_id) == case_id)
    if for_update:
        query = query.with_for_update()  # changes and erasure of one family serialise
    return (await session.execute(query)).scalar_one_or_none()


def ensure_not_erased(case: IntakeCase) -> None:
    if case.erased_at is not None:
        raise Refusal(
            "case_id",
            f"this family's data was erased on {case.erased_at:%d.%m.%Y}; nothing can be "
            "recorded for it any more",
            status=410,
        )


async def surviving_case_of(session: AsyncSession, case_id: str) -> str | None:
    """The case this one was merged into, if it was."""
    found = await session.execute(
        select(col(IntakePossibleDuplicate.surviving_case_id)).where(
            col(IntakePossibleDuplicate.merged_case_id) == case_id,
            col(IntakePossibleDuplicate.status) == DuplicateStatus.MERGED.value,
        )
    )
    return found.scalars().first()


async def ensure_not_merged(session: AsyncSession, case: IntakeCase) -> None:
    """409 naming the survivor once the case was merged into another: nothing more is
    recorded for it (the caller passed the case check, so it may learn the survivor)."""
    survivor = await surviving_case_of(session, case.case_id)
    if survivor is not None:
        raise Conflict("case_id", f"this case was merged into case {survivor}; record it there")


async def case_to_change(
    session: AsyncSession,
    call: Call,
    case_id: str,
    roles: Sequence[Role],
    *,
    personal_data: bool,
) -> IntakeCase:
    """Load a case to record something for it (locked): the caller may (403), the family
    is not erased (410) and the case not merged into another (409)."""
    case = call.authorise(
        await load_case(session, case_id, for_update=True), roles, personal_data=personal_data
    )
    ensure_not_erased(case)
    await ensure_not_merged(session, case)
    return case


async def flag_possible_duplicates(
    session: AsyncSession, call: Call, case_id: str, existing_ids: Sequence[str]
) -> None:
    """Flag a new case as a possible duplicate of cases outside the registrar's scope, for
    the Familienbüro of each existing case. Audited with ids only; the registrar's answer
    does not change."""
    for existing_id in existing_ids:
        existing = await load_case(session, existing_id)
        assert existing is not None
        flag = IntakePossibleDuplicate(
            duplicate_id=str(uuid.uuid4()),
            case_id=case_id,
            existing_case_id=existing_id,
            bezirk=existing.bezirk,
            created_at=call.now(),
            status=DuplicateStatus.OPEN.value,
        )
        session.add(flag)
        for flagged in (case_id, existing_id):
            call.audit(
                session,
                AuditAction.create,
                flagged,
                f"possible duplicate {flag.duplicate_id} flagged: case {case_id} "
                f"may be case {existing_id}",
            )


async def family_key(session: AsyncSession, keyring: Keyring, case: IntakeCase) -> FamilyKeys:
    """The keys of a family that is not erased (410 if it is)."""
    found = await keyring.find(session, case.case_id)
    if found is None:
        ensure_not_erased(case)
        raise RuntimeError(f"case {case.case_id} has no data key")  # never without erasure
    return found


async def consent_rows(session: AsyncSession, case_id: str) -> list[IntakeConsent]:
    query = (
        select(IntakeConsent)
        .where(col(IntakeConsent.case_id) == case_id)
        .order_by(
            col(IntakeConsent.given_at), col(IntakeConsent.position), col(IntakeConsent.consent_id)
        )
    )
    return list((await session.execute(query)).scalars())


async def consents_public(session: AsyncSession, case_id: str) -> list[ConsentPublic]:
    changes = (
        await session.execute(
            select(IntakeConsentChange)
            .where(col(IntakeConsentChange.case_id) == case_id)
            .order_by(col(IntakeConsentChange.id))
        )
    ).scalars()
    return _consents_public(await consent_rows(session, case_id), changes)


def _consents_public(
    rows: Iterable[IntakeConsent], changes: Iterable[IntakeConsentChange]
) -> list[ConsentPublic]:
    """Consents in the order given (``rows``), each with its history (``changes``, in the
    order recorded)."""
    history: dict[str, list[ConsentChangePublic]] = {}
    for change in changes:
        history.setdefault(change.consent_id, []).append(
            ConsentChangePublic(
                state=ConsentState(change.state),
                at=change.at,
                recorded_at=change.recorded_at,
                recorded_by_role=change.recorded_by_role,
            )
        )
    return [
        ConsentPublic(
            consent_id=row.consent_id,
            scope=ConsentScope(row.scope),
            traeger=row.traeger,
            purpose=row.purpose,
            state=ConsentState(row.state),
            given_at=row.given_at,
            withdrawn_at=row.withdrawn_at,
            history=history.get(row.consent_id, []),
        )
        for row in rows
    ]


async def consent_public(session: AsyncSession, case_id: str, consent_id: str) -> ConsentPublic:
    return next(c for c in await consents_public(session, case_id) if c.consent_id == consent_id)


async def case_public(
    session: AsyncSession, case: IntakeCase, *, duplicate: bool = False
) -> CasePublic:
    return _case_public(case, await consents_public(session, case.case_id), duplicate=duplicate)


def _case_public(
    case: IntakeCase, consents: list[ConsentPublic], *, duplicate: bool = False
) -> CasePublic:
    return CasePublic(
        case_id=case.case_id,
        channel=Channel(case.channel),
        clinic_id=case.clinic_id,
        bezirk=case.bezirk,
        bezirk_source=BezirkSource(case.bezirk_source),
        registered_at=case.registered_at,
        visit_target_date=case.visit_target_date,
        children_count=case.children_count,
        preferred_language=case.preferred_language,
        consents=consents,
        erased=case.erased_at is not None,
        duplicate=duplicate,
    )


def personal_public(personal: PersonalData) -> PersonalPublic:
    names: list[str | None] = [name or None for name in personal.child_given_names]
    names += [None] * (len(personal.child_birth_dates) - len(names))
    return PersonalPublic(
        family_name=personal.family_name,
        parent_given_names=list(personal.parent_given_names),
        children=[
            ChildPublic(given_name=name, birth_date=born)
            for name, born in zip(names, personal.child_birth_dates, strict=False)
        ],
        street=personal.street,
        house_number=personal.house_number,
        postcode=personal.postcode,
        city=personal.city,
        phone=personal.phone,
        email=personal.email,
    )


async def screenings_of(session: AsyncSession, case_id: str) -> list[IntakeScreening]:
    query = (
        select(IntakeScreening)
        .where(col(IntakeScreening.case_id) == case_id)
        .order_by(col(IntakeScreening.assessed_at), col(IntakeScreening.recorded_at))
    )
    return list((await session.execute(query)).scalars())


def erasure_public(case: IntakeCase) -> ErasurePublic:
    return ErasurePublic(
        case_id=case.case_id,
        bezirk=case.bezirk,
        erased=case.erased_at is not None,
        erased_at=case.erased_at,
        reason=ErasureReason(case.erasure_reason) if case.erasure_reason else None,
        key_id=case.key_id,
    )


def personal_data_of(keys: FamilyKeys, case: IntakeCase) -> PersonalData:
    """The family's contact and children's blocks, opened and joined (intake only)."""
    assert case.personal is not None
    data = keys.open(case.personal, KeyPurpose.CONTACT)
    if case.children is not None:
        children = ChildrenData.model_validate(keys.open(case.children, KeyPurpose.CHILDREN))
        data |= children.model_dump(mode="json")
    return PersonalData.model_validate(data)


# -- reading use cases ---------------------------------------------------------------------------


async def read_case(session: AsyncSession, call: Call, case_id: str) -> CaseDetail:
    """The case with its consents and handovers; personal data where the caller sees it."""
    personal_data = call.sees_personal_data()
    case = call.authorise(await load_case(session, case_id), READ_CASE, personal_data=personal_data)
    personal: PersonalPublic | None = None
    found = await call.intake.keyring.find(session, case_id)
    if personal_data and case.personal is not None and found is not None:
        personal = personal_public(personal_data_of(found, case))
    handovers = (
        await session.execute(
            select(IntakeHandover)
            .where(col(IntakeHandover.case_id) == case_id)
            .order_by(col(IntakeHandover.requested_at))
        )
    ).scalars()
    detail = CaseDetail(
        **dict(await case_public(session, case)),
        bezirk_derived=case.bezirk_derived,
        personal=personal,
        handovers=[HandoverPublic.model_validate(h, from_attributes=True) for h in handovers],
        erased_at=case.erased_at,
    )
    purpose = "read case" if personal_data else "read case without personal data"
    call.audit(session, AuditAction.read, case_id, purpose)
    return detail


async def read_consents(session: AsyncSession, call: Call, case_id: str) -> list[ConsentPublic]:
    call.authorise(await load_case(session, case_id), READ_CONSENT, personal_data=False)
    consents = await consents_public(session, case_id)
    call.audit(session, AuditAction.read, case_id, "read consents")
    return consents


async def read_screenings(session: AsyncSession, call: Call, case_id: str) -> list[ScreeningPublic]:
    """Screening results, opened; after erasure only their dates."""
    case = call.authorise(await load_case(session, case_id), SCREEN, personal_data=True)
    found = await call.intake.keyring.find(session, case.case_id)
    result = []
    for row in await screenings_of(session, case_id):
        public = ScreeningPublic(
            screening_id=row.screening_id,
            case_id=case_id,
            assessed_at=row.assessed_at,
            recorded_by_role=row.recorded_by_role,
        )
        if row.screening is not None and found is not None:
            opened = found.open(row.screening, KeyPurpose.SCREENING)
            screening = Screening.model_validate(opened)
            public.support_need = screening.support_need
            public.indicators = list(screening.indicators)
            public.wished_modules = list(screening.wished_modules)
            public.instrument = screening.instrument
        result.append(public)
    call.audit(session, AuditAction.read, case_id, "read screening")
    return result


# -- changing state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Registration:
    """A registration the rules accept: what was decided about it before anything is stored."""

    now: datetime
    today: date
    clinic: str | None
    bezirk: domain.BezirkChoice
    birth_dates: list[date]


def _check_registration(call: Call, body: RegistrationCreate) -> _Registration:
    """Decide: the domain's checks of a registration (refusals name the field)."""
    city, settings, caller = call.runtime.city, call.intake.settings, call.caller
    now = call.now()
    today = domain.local_date(now, city)
    clinic = domain.resolve_clinic(body.channel, caller.role, caller.clinic, body.clinic_id)
    domain.check_city_name(body.address.city, city)
    choice = domain.choose_bezirk(city, body.address.postcode, body.bezirk_override)
    birth_dates = [child.birth_date for child in body.children]
    domain.check_birth_dates(
        body.channel, birth_dates, today, clinic_max_age_days=settings.clinic_max_child_age_days
    )
    domain.check_consents(
        [ConsentTerms(c.scope, c.traeger, c.purpose) for c in body.consents], city, choice.bezirk
    )
    for index, consent in enumerate(body.consents):
        if consent.given_at is not None:
            domain.check_recorded(f"consents.{index}.given_at", consent.given_at, now, now)
    ensure_may_access_case(
        caller, CaseScope(bezirk=choice.bezirk, registered_by_clinic=clinic), personal_data=True
    )
    return _Registration(now, today, clinic, choice, birth_dates)


@functools.cache
def _taken_match_keys(postgres: bool) -> Select[str, str]:
    """Built once per dialect: every registration asks it (the ORM's objects and the
    expression cost more than the lookup)."""
    return select(col(IntakeMatchKey.match_key), col(IntakeMatchKey.case_id)).where(
        one_of(col(IntakeMatchKey.match_key), "keys", postgres=postgres)
    )


async def _matching_cases(
    session: AsyncSession, call: Call, body: RegistrationCreate, birth_dates: list[date]
) -> tuple[IntakeCase | None, list[str], list[str]]:
    """The duplicate guard: (a matching case the caller may read, ids of matching cases
    outside the caller's scope, the family's match keys no case holds yet)."""
    match_keys = domain.match_keys(
        secret=call.intake.secrets.match_key_secret,
        family_name=body.family.family_name,
        birth_dates=birth_dates,
        street=body.address.street,
        house_number=body.address.house_number,
        postcode=body.address.postcode,
    )
    found = await session.execute(_taken_match_keys(on_postgres(session)), {"keys": match_keys})
    taken: dict[str, str] = {match_key: case_id for match_key, case_id in found}
    # The guard answers only with a case the caller may read (own clinic, own Stadtbezirk).
    # A match outside that scope must not show: the family is registered as new (same
    # answer, same work) and flagged for the Familienbüro of the existing case.
    elsewhere: list[str] = []
    for existing_id in dict.fromkeys(taken[k] for k in match_keys if k in taken):
        existing = await load_case(session, existing_id)
        assert existing is not None
        scope = CaseScope(bezirk=existing.bezirk, registered_by_clinic=existing.clinic_id)
        if may_access_case(call.caller, scope, personal_data=False):
            return existing, elsewhere, []
        elsewhere.append(existing_id)
    # The hashes already taken stay with the existing case (until a merge decides).
    return None, elsewhere, [k for k in match_keys if k not in taken]


def _sealed_personal(
    keys: FamilyKeys, body: RegistrationCreate, city_name: str, birth_dates: list[date]
) -> tuple[EncryptedBlock, EncryptedBlock | None]:
    """The family's contact data and the children's data, each sealed under a key of its
    own, so that a key released for a welcome visit (contact) opens nothing about the
    children."""
    names = [child.given_name for child in body.children]
    personal = PersonalData(
        family_name=body.family.family_name,
        parent_given_names=body.family.parent_given_names,
        # Positions pair names with birth dates; "" marks a child not named yet.
        child_given_names=[name or "" for name in names] if any(names) else [],
        child_birth_dates=birth_dates,
        street=body.address.street,
        house_number=body.address.house_number,
        postcode=body.address.postcode,
        city=body.address.city or city_name,
        phone=body.family.phone,
        email=body.family.email,
    )
    contact, children = split_personal(personal)
    block = keys.seal(contact, KeyPurpose.CONTACT)
    return block, None if children is None else keys.seal(children, KeyPurpose.CHILDREN)


def _registration_consents(
    session: AsyncSession,
    call: Call,
    case_id: str,
    body: RegistrationCreate,
    recorded_by: EventRole,
    now: datetime,
) -> tuple[list[ConsentPublic], list[Consent]]:
    """Store the consents given at registration; their answer form (as a later read lists
    them) and their event form for family-registered."""
    rows: list[IntakeConsent] = []
    changes: list[IntakeConsentChange] = []
    consents: list[Consent] = []
    for position, given in enumerate(body.consents):
        row = IntakeConsent.model_construct(
            consent_id=str(uuid.uuid4()),
            case_id=case_id,
            scope=given.scope.value,
            traeger=given.traeger,
            purpose=given.purpose,
            state=ConsentState.GIVEN.value,
            given_at=given.given_at or now,
            position=position,
        )
        rows.append(row)
        changes.append(consent_change(call, row, ConsentState.GIVEN, row.given_at, recorded_by))
        consents.append(
            Consent(
                consent_id=row.consent_id,
                scope=given.scope,
                traeger=given.traeger,
                purpose=given.purpose,
                state=ConsentState.GIVEN,
                at=row.given_at,
            )
        )
    add_at_commit(session, *rows, *changes)
    # consent_rows' order (stored moments are UTC, so aware datetimes sort alike); the
    # positions differ, so consent_id never decides.
    rows.sort(key=lambda row: (row.given_at, row.position))
    return _consents_public(rows, changes), consents


async def register_family(session: AsyncSession, call: Call, body: RegistrationCreate) -> Outcome:
    checked = _check_registration(call, body)
    city, caller, now, today = call.runtime.city, call.caller, checked.now, checked.today
    existing, elsewhere, match_keys = await _matching_cases(
        session, call, body, checked.birth_dates
    )
    if existing is not None:
        call.audit(session, AuditAction.read, existing.case_id, "duplicate registration")
        return Outcome(200, await case_public(session, existing, duplicate=True), existing.case_id)

    case_id = str(uuid.uuid4())
    keys = call.intake.keyring.create(session, case_id, now)
    block, children_block = _sealed_personal(keys, body, city.name, checked.birth_dates)
    recorded_by = domain.registrar_role(caller.role, body.channel)
    days_since_birth = domain.days_since_birth(checked.birth_dates, today)
    case = IntakeCase.model_construct(
        case_id=case_id,
        channel=body.channel.value,
        clinic_id=checked.clinic,
        bezirk=checked.bezirk.bezirk,
        bezirk_source=checked.bezirk.source.value,
        bezirk_derived=checked.bezirk.derived,
        registered_at=now,
        registered_by_role=recorded_by.value,
        registered_by_subject=caller.subject,
        children_count=len(body.children),
        preferred_language=body.preferred_language,
        days_since_birth_at_registration=days_since_birth,
        visit_target_date=domain.visit_target_date(body.channel, today, days_since_birth, city),
        key_id=keys.kid,
        personal=block.model_dump_json(),
        children=None if children_block is None else children_block.model_dump_json(),
    )
    # At commit: a match key another registration took fails it, and run_once retries.
    taken = [IntakeMatchKey.model_construct(match_key=k, case_id=case_id) for k in match_keys]
    add_at_commit(session, case, *taken)
    answered, consents = _registration_consents(session, call, case_id, body, recorded_by, now)
    call.runtime.outbox.add(
        session,
        FamilyRegistered(
            case_id=case_id,
            bezirk=case.bezirk,
            bezirk_source=checked.bezirk.source,
            channel=body.channel,
            clinic_id=checked.clinic,
            registered_at=now,
            visit_target_date=case.visit_target_date,
            days_since_birth_at_registration=days_since_birth,
            children_count=case.children_count,
            preferred_language=body.preferred_language,
            consents=consents,
            personal=block,
            children=children_block,
        ),
        time=now,
    )
    call.audit(session, AuditAction.create, case_id, "register family")
    await flag_possible_duplicates(session, call, case_id, elsewhere)
    # Answered from the rows just built: reading them back cost two SELECTs per family.
    return Outcome(201, _case_public(case, answered), case_id)


def consent_change(
    call: Call, consent: IntakeConsent, state: ConsentState, at: datetime, role: EventRole
) -> IntakeConsentChange:
    """One entry of a consent's history (given or withdrawn, when, by which role)."""
    return IntakeConsentChange(
        consent_id=consent.consent_id,
        case_id=consent.case_id,
        state=state.value,
        at=at,
        recorded_at=call.now(),
        recorded_by_role=role.value,
        recorded_by_subject=call.caller.subject,
    )


def consent_changed(
    session: AsyncSession,
    call: Call,
    case: IntakeCase,
    consent: IntakeConsent,
    at: datetime,
    role: EventRole,
) -> None:
    """A consent given or withdrawn after registration (its ``state`` says which): recorded
    in its history and published as ``consent-changed``."""
    state = ConsentState(consent.state)
    session.add(consent_change(call, consent, state, at, role))
    call.runtime.outbox.add(
        session,
        ConsentChanged(
            case_id=consent.case_id,
            bezirk=case.bezirk,
            consent_id=consent.consent_id,
            scope=ConsentScope(consent.scope),
            traeger=consent.traeger,
            purpose=consent.purpose,
            state=state,
            changed_at=at,
            changed_by_role=role,
        ),
        time=call.now(),
    )


async def give_consent(
    session: AsyncSession, call: Call, case_id: str, body: ConsentCreate
) -> Outcome:
    case = await case_to_change(session, call, case_id, CHANGE_CONSENT, personal_data=False)
    now = call.now()
    terms = ConsentTerms(body.scope, body.traeger, body.purpose)
    domain.check_consent(terms, call.runtime.city, case.bezirk, "")
    given_at = body.given_at or now
    domain.check_recorded("given_at", given_at, now, case.registered_at)
    for row in await consent_rows(session, case_id):
        in_force = row.state == ConsentState.GIVEN.value
        if in_force and ConsentTerms(ConsentScope(row.scope), row.traeger, row.purpose) == terms:
            return Outcome(200, await consent_public(session, case_id, row.consent_id), case_id)
    row = IntakeConsent(
        consent_id=str(uuid.uuid4()),
        case_id=case_id,
        scope=body.scope.value,
        traeger=body.traeger,
        purpose=body.purpose,
        state=ConsentState.GIVEN.value,
        given_at=given_at,
    )
    session.add(row)
    consent_changed(session, call, case, row, given_at, event_role(call.caller.role))
    call.audit(session, AuditAction.change, case_id, "consent given")
    await session.flush()
    return Outcome(201, await consent_public(session, case_id, row.consent_id), case_id)


async def withdraw_consent(
    session: AsyncSession, call: Call, case_id: str, consent_id: str, body: ConsentWithdrawal
) -> Outcome:
    case = await case_to_change(session, call, case_id, CHANGE_CONSENT, personal_data=False)
    now = call.now()
    row = await session.get(IntakeConsent, consent_id)
    if row is None or row.case_id != case_id:
        raise Refusal("consent_id", "this case has no such consent", status=404)
    if row.withdrawn_at is not None:
        raise Conflict(
            "consent_id", f"this consent was already withdrawn on {row.withdrawn_at:%d.%m.%Y}"
        )
    withdrawn_at = body.withdrawn_at or now
    domain.check_not_future("withdrawn_at", withdrawn_at, now)
    if withdrawn_at < row.given_at:
        raise Refusal("withdrawn_at", "lies before the consent was given")
    row.state = ConsentState.WITHDRAWN.value
    row.withdrawn_at = withdrawn_at
    session.add(row)
    consent_changed(session, call, case, row, withdrawn_at, event_role(call.caller.role))
    call.audit(session, AuditAction.change, case_id, "consent withdrawn")
    await session.flush()
    return Outcome(200, await consent_public(session, case_id, consent_id), case_id)


async def record_screening(
    session: AsyncSession, call: Call, case_id: str, body: ScreeningCreate
) -> Outcome:
    case = await case_to_change(session, call, case_id, SCREEN, personal_data=True)
    now = call.now()
    modules = domain.check_modules(call.runtime.city, body.wished_modules, "wished_modules")
    assessed_at = body.assessed_at or now
    domain.check_recorded("assessed_at", assessed_at, now, case.registered_at)
    keys = await family_key(session, call.intake.keyring, case)
    screening = Screening(
        support_need=body.support_need,
        indicators=list(dict.fromkeys(body.indicators)),
        wished_modules=modules,
        instrument=body.instrument,
    )
    block = keys.seal(screening, KeyPurpose.SCREENING)
    row = IntakeScreening(
        screening_id=str(uuid.uuid4()),
        case_id=case_id,
        assessed_at=assessed_at,
        recorded_at=now,
        recorded_by_role=event_role(call.caller.role).value,
        recorded_by_subject=call.caller.subject,
        screening=block.model_dump_json(),
    )
    session.add(row)
    call.runtime.outbox.add(
        session,
        NeedsAssessed(
            case_id=case_id, bezirk=case.bezirk, assessed_at=assessed_at, screening=block
        ),
        time=now,
    )
    call.audit(session, AuditAction.create, case_id, "screening")
    recorded = ScreeningRecorded(
        screening_id=row.screening_id, case_id=case_id, assessed_at=assessed_at
    )
    return Outcome(201, recorded, case_id)


async def _latest_need(session: AsyncSession, call: Call, case: IntakeCase) -> SupportNeed | None:
    """The support need the family's latest screening found, if any."""
    screenings = await screenings_of(session, case.case_id)
    if not screenings or screenings[-1].screening is None:
        return None
    keys = await family_key(session, call.intake.keyring, case)
    opened = keys.open(screenings[-1].screening, KeyPurpose.SCREENING)
    return Screening.model_validate(opened).support_need


async def request_handover(
    session: AsyncSession, call: Call, case_id: str, body: HandoverCreate
) -> Outcome:
    case = await case_to_change(session, call, case_id, HAND_OVER, personal_data=False)
    now = call.now()
    domain.check_handover_target(call.runtime.city, case.bezirk, body.module, body.traeger)
    records = [
        ConsentRecord(
            consent_id=row.consent_id,
            terms=ConsentTerms(ConsentScope(row.scope), row.traeger, row.purpose),
            state=ConsentState(row.state),
        )
        for row in await consent_rows(session, case_id)
    ]
    consent = domain.consent_for_handover(records, body.module, body.traeger, body.consent_id)
    screening_use = any(
        r.terms.scope is ConsentScope.SCREENING_DATA_USE and r.state is ConsentState.GIVEN
        for r in records
    )
    # The screening is opened only when the family allowed its use for referrals.
    latest_need = await _latest_need(session, call, case) if screening_use else None
    urgent = domain.is_urgent(body.urgent, latest_need, screening_use)
    role = event_role(call.caller.role)
    row = IntakeHandover(
        handover_id=str(uuid.uuid4()),
        case_id=case_id,
        module=body.module,
        traeger=body.traeger,
        consent_id=consent.consent_id,
        urgent=urgent,
        requested_at=now,
        requested_by_role=role.value,
        requested_by_subject=call.caller.subject,
    )
    session.add(row)
    call.runtime.outbox.add(
        session,
        HandoverRequested(
            handover_id=row.handover_id,
            case_id=case_id,
            bezirk=case.bezirk,
            module=body.module,
            traeger=body.traeger,
            consent_ref=consent.consent_id,
            urgent=urgent,
            requested_by_role=role,
            requested_at=now,
        ),
        time=now,
    )
    call.audit(session, AuditAction.create, case_id, "warm handover")
    return Outcome(201, HandoverPublic.model_validate(row, from_attributes=True), case_id)


async def _purge_copies(session: AsyncSession, case_id: str) -> None:
    """Intake's own copies of an erased family's data: duplicate-guard hashes, sealed
    screenings, request fingerprints, sent outbox records."""
    await session.execute(delete(IntakeMatchKey).where(col(IntakeMatchKey.case_id) == case_id))
    await session.execute(
        update(IntakeScreening)
        .where(col(IntakeScreening.case_id) == case_id)
        .values(screening=None)
    )
    # The fingerprints of its requests derive from its data; the keys stay until they
    # expire, so a late repeat of, say, its registration is refused (410), not carried out.
    await session.execute(
        update(IntakeIdempotency)
        .where(col(IntakeIdempotency.case_id) == case_id)
        .values(fingerprint=ERASED_FINGERPRINT)
    )
    # Published copies are unreadable without the key anyway; the sent ones kept here for
    # replay need not outlive the family. Unsent ones still go out, as unreadable
    # ciphertext, so that the topic keeps the family's order of events.
    await session.execute(
        delete(OutboxMessage).where(
            col(OutboxMessage.record_key) == case_id, col(OutboxMessage.sent_at).is_not(None)
        )
    )


async def erase_case(
    session: AsyncSession,
    runtime: ServiceRuntime[IntakeSettings],
    keyring: Keyring,
    case: IntakeCase,
    *,
    reason: ErasureReason,
    caller: Caller | None,
    path: str,
) -> None:
    """Crypto-shred a family: destroy its key, purge intake's copies, tell everyone."""
    now = runtime.clock()
    case_id = case.case_id
    runtime.db.forget_after_commit(session)
    await keyring.destroy(session, case_id)
    case.personal = None
    case.children = None
    case.bezirk_derived = None
    case.preferred_language = None
    case.days_since_birth_at_registration = None
    case.erased_at = now
    case.erasure_reason = reason.value
    case.erased_by_role = (event_role(caller.role) if caller else EventRole.SYSTEM).value
    session.add(case)
    await _purge_copies(session, case_id)
    runtime.outbox.add(
        session,
        FamilyErased(
            case_id=case_id, bezirk=case.bezirk, erased_at=now, key_id=case.key_id, reason=reason
        ),
        time=now,
    )
    audit.record(
        session,
        service=runtime.service,
        caller=caller,
        action=AuditAction.erase,
        case_id=case_id,
        purpose=f"erasure: {reason}",
        path=path,
    )


#: Families erased per housekeeping transaction (keeps each transaction short).
RETENTION_BATCH = 100


async def erase_expired(
    runtime: ServiceRuntime[IntakeSettings], keyring: Keyring, cutoff: datetime
) -> None:
    """Erase the families registered before ``cutoff`` (the retention period), a batch per
    transaction; recorded as ``erasure: retention_expired`` with no caller."""
    while True:
        async with runtime.db.transaction() as session:
            expired = list(
                (
                    await session.execute(
                        select(col(IntakeCase.case_id))
                        .where(
                            col(IntakeCase.erased_at).is_(None),
                            col(IntakeCase.registered_at) < cutoff,
                        )
                        .limit(RETENTION_BATCH)
                    )
                ).scalars()
            )
            for case_id in expired:
                case = await load_case(session, case_id, for_update=True)
                if case is not None and case.erased_at is None:
                    await erase_case(
                        session,
                        runtime,
                        keyring,
                        case,
                        reason=ErasureReason.RETENTION_EXPIRED,
                        caller=None,
                        path="job:retention",
                    )
        if len(expired) < RETENTION_BATCH:
            return
