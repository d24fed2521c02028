"""HTTP API of the intake service (routes only; what they do is in operations.py).

Families are registered by a Babylotse (baby pilot in a birth clinic) or from a move-in
notice of the citizens' office; consent, screening and warm handovers are recorded per case;
other Lotse services obtain a family's data key from the keyring; erasure destroys it.
Every changing route accepts an ``Idempotency-Key`` header and commits its state change,
its events (outbox) and its audit entry in one transaction. Refusals name field and reason.
Which roles may call each route is declared in policy.py and enforced by the runtime.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import Response
from lotse_contracts.events.intake import Screening
from lotse_contracts.personal import PersonalData, encode_data_key
from lotse_runtime.app import runtime_of
from lotse_runtime.audit import AuditAction
from lotse_runtime.identity import AccessDenied, CallerDep, ensure_role, scope_checked_earlier
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_intake import domain, duplicates
from lotse_intake import operations as ops
from lotse_intake.domain import DuplicateStatus, Refusal
from lotse_intake.idempotency import REPLAY_HEADER, Action, IdempotencyKey, Outcome
from lotse_intake.keyring import open_for
from lotse_intake.tables import (
    CaseDetail,
    CasePublic,
    ConsentCreate,
    ConsentPublic,
    ConsentWithdrawal,
    DataKeyPublic,
    ErasureCreate,
    ErasurePublic,
    HandoverCreate,
    HandoverPublic,
    IntakeCase,
    IntakeHandover,
    MergeCreate,
    PersonalPublic,
    PossibleDuplicatePublic,
    RegistrationCreate,
    ScreeningCreate,
    ScreeningPublic,
    ScreeningRecorded,
)

UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
CaseIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="Pseudonymous case id.")]
ConsentIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="Consent id.")]
DuplicateIdPath = Annotated[
    str, Path(pattern=UUID_PATTERN, description="Id of a possible-duplicate flag.")
]
BezirkPath = Annotated[
    str, Path(pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$", max_length=64, description="Bezirk slug.")
]
KeyPurpose = Annotated[
    str,
    Query(min_length=3, max_length=200, description="Why the key is needed (audit log)."),
]

_REFUSALS: dict[int | str, dict[str, Any]] = {
    403: {"description": "Not permitted (also for unknown case ids)."},
    409: {"description": "Conflicts with the stored state; the reason names the field."},
    410: {"description": "The family's data was erased."},
    422: {"description": "Invalid input; each error names the field and the reason."},
}


def call_of(request: Request, caller: CallerDep) -> ops.Call:
    """FastAPI dependency: the request as intake's operations see it."""
    route = request.scope.get("route")
    return ops.Call(
        runtime=runtime_of(request),
        intake=request.app.state.intake,
        caller=caller,
        route=getattr(route, "path", request.url.path),
        path=request.url.path,
    )


CallDep = Annotated[ops.Call, Depends(call_of)]


async def _change(
    call: ops.Call, key: str | None, body: BaseModel | None, action: Action
) -> Response:
    """A changing request under its Idempotency-Key. A replay repeats the answer this same
    caller got when the case checks passed, so the runtime's policy layer counts them as made."""
    response = await call.change(key, body, action)
    if response.headers.get(REPLAY_HEADER):
        scope_checked_earlier()
    return response


# -- routes --------------------------------------------------------------------------------------


def router() -> APIRouter:
    """All routes of the intake service."""
    api = APIRouter()
    _case_routes(api)
    _consent_routes(api)
    _screening_routes(api)
    _handover_routes(api)
    _erasure_routes(api)
    _keyring_routes(api)
    _duplicate_routes(api)
    return api


def _case_routes(api: APIRouter) -> None:
    @api.post(
        "/cases",
        tags=["cases"],
        status_code=201,
        response_model=CasePublic,
        summary="Register a family (birth clinic or move-in notice)",
        responses={
            200: {"description": "Already registered: the existing case.", "model": CasePublic},
            **_REFUSALS,
        },
    )
    async def register(
        body: RegistrationCreate, call: CallDep, idempotency_key: IdempotencyKey = None
    ) -> Response:
        """Registers a family and publishes ``family-registered`` with its personal data
        sealed under the family's new data key. The Stadtbezirk (city district) comes from
        the postcode unless ``bezirk_override`` names one; an address outside the city is
        refused. A Babylotse registers births (channel ``clinic``), the citizens' office (a
        service) or a Familienbüro move-in notices of families with children under six.

        **Duplicate guard**: a family already registered with the same family name, child
        birth date and address (compared ignoring case, umlauts, ß, spaces and street
        abbreviations) is not registered again: the answer is the existing case with
        ``duplicate: true`` (HTTP 200). Record changes through the consent routes.
        """
        ensure_role(call.caller, *domain.CHANNEL_ROLES[body.channel])

        async def action(session: AsyncSession) -> Outcome:
            return await ops.register_family(session, call, body)

        return await _change(call, idempotency_key, body, action)

    @api.get(
        "/cases/{case_id}",
        tags=["cases"],
        response_model=CaseDetail,
        summary="Read a case (with personal data where the role allows)",
        responses={403: _REFUSALS[403]},
    )
    async def read_case(case_id: CaseIdPath, call: CallDep) -> CaseDetail:
        """The case with its consents (and their history) and handovers. Personal data is
        decrypted for the Babylotse of the registering clinic, the Familienbüro of the
        Stadtbezirk and Lotse services holding keyring access; every read is audited. The
        Bezirksteam gets the case without personal data. After erasure a stub remains."""
        async with call.runtime.db.transaction() as session:
            personal_data = call.sees_personal_data()
            case = call.authorise(
                await ops.load_case(session, case_id), ops.READ_CASE, personal_data=personal_data
            )
            personal: PersonalPublic | None = None
            found = await call.intake.keyring.find(session, case_id)
            if personal_data and case.personal is not None and found is not None:
                opened = open_for(case.personal, key=found[1], case_id=case_id)
                personal = ops.personal_public(PersonalData.model_validate(opened))
            handovers = (
                await session.execute(
                    select(IntakeHandover)
                    .where(col(IntakeHandover.case_id) == case_id)
                    .order_by(col(IntakeHandover.requested_at))
                )
            ).scalars()
            detail = CaseDetail(
                **dict(await ops.case_public(session, case)),
                bezirk_derived=case.bezirk_derived,
                personal=personal,
                handovers=[
                    HandoverPublic.model_validate(h, from_attributes=True) for h in handovers
                ],
                erased_at=case.erased_at,
            )
            purpose = "read case" if personal_data else "read case without personal data"
            call.audit(session, AuditAction.read, case_id, purpose)
        return detail


def _consent_routes(api: APIRouter) -> None:
    @api.get(
        "/cases/{case_id}/consents",
        tags=["consent"],
        response_model=list[ConsentPublic],
        summary="Consents of a family with their history",
        responses={403: _REFUSALS[403]},
    )
    async def read_consents(case_id: CaseIdPath, call: CallDep) -> list[ConsentPublic]:
        """Every consent with its history: given or withdrawn, when (as the family did it),
        recorded when and in which role. The data-protection officer may read it too."""
        async with call.runtime.db.transaction() as session:
            call.authorise(
                await ops.load_case(session, case_id), ops.READ_CONSENT, personal_data=False
            )
            consents = await ops.consents_public(session, case_id)
            call.audit(session, AuditAction.read, case_id, "read consents")
        return consents

    @api.post(
        "/cases/{case_id}/consents",
        tags=["consent"],
        status_code=201,
        response_model=ConsentPublic,
        summary="Record a consent the family gives",
        responses={200: {"description": "Already in force: the existing consent."}, **_REFUSALS},
    )
    async def give_consent(
        case_id: CaseIdPath,
        body: ConsentCreate,
        call: CallDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Records a consent given after registration and publishes ``consent-changed``
        (state ``given``). A consent already in force is answered as it is (HTTP 200)."""

        async def action(session: AsyncSession) -> Outcome:
            return await ops.give_consent(session, call, case_id, body)

        return await _change(call, idempotency_key, body, action)

    @api.post(
        "/cases/{case_id}/consents/{consent_id}/withdraw",
        tags=["consent"],
        response_model=ConsentPublic,
        summary="Record that the family withdrew a consent",
        responses={404: {"description": "No such consent in this case."}, **_REFUSALS},
    )
    async def withdraw_consent(
        case_id: CaseIdPath,
        consent_id: ConsentIdPath,
        call: CallDep,
        body: Annotated[ConsentWithdrawal | None, Body()] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Withdraws a consent and publishes ``consent-changed`` (state ``withdrawn``);
        every downstream service must honour it at once (e.g. referrals resting on it are
        cancelled). A withdrawn consent stays withdrawn: a new consent gets a new id."""
        withdrawal = body or ConsentWithdrawal()

        async def action(session: AsyncSession) -> Outcome:
            return await ops.withdraw_consent(session, call, case_id, consent_id, withdrawal)

        return await _change(call, idempotency_key, withdrawal, action)


def _screening_routes(api: APIRouter) -> None:
    @api.post(
        "/cases/{case_id}/screenings",
        tags=["screening"],
        status_code=201,
        response_model=ScreeningRecorded,
        summary="Record a screening (needs assessment)",
        responses=_REFUSALS,
    )
    async def record_screening(
        case_id: CaseIdPath,
        body: ScreeningCreate,
        call: CallDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Records support need (none / general / increased / acute), indicators from the
        fixed list and wished-for modules of the city. The result is special-category data
        (Art. 9 GDPR): stored sealed with the family's key and published only sealed, in
        ``needs-assessed`` on the intake topic, which is never routed to any audience. The
        answer holds ids only."""

        async def action(session: AsyncSession) -> Outcome:
            return await ops.record_screening(session, call, case_id, body)

        return await _change(call, idempotency_key, body, action)

    @api.get(
        "/cases/{case_id}/screenings",
        tags=["screening"],
        response_model=list[ScreeningPublic],
        summary="Screenings of a family (decrypted; audited)",
        responses={403: _REFUSALS[403]},
    )
    async def read_screenings(case_id: CaseIdPath, call: CallDep) -> list[ScreeningPublic]:
        """Screening results, oldest first. Not for the Bezirksteam: it never sees
        screening results. After erasure only the dates remain."""
        async with call.runtime.db.transaction() as session:
            case = call.authorise(
                await ops.load_case(session, case_id), ops.SCREEN, personal_data=True
            )
            found = await call.intake.keyring.find(session, case.case_id)
            result = []
            for row in await ops.screenings_of(session, case_id):
                public = ScreeningPublic(
                    screening_id=row.screening_id,
                    case_id=case_id,
                    assessed_at=row.assessed_at,
                    recorded_by_role=row.recorded_by_role,
                )
                if row.screening is not None and found is not None:
                    opened = open_for(row.screening, key=found[1], case_id=case_id)
                    screening = Screening.model_validate(opened)
                    public.support_need = screening.support_need
                    public.indicators = list(screening.indicators)
                    public.wished_modules = list(screening.wished_modules)
                    public.instrument = screening.instrument
                result.append(public)
            call.audit(session, AuditAction.read, case_id, "read screening")
        return result


def _handover_routes(api: APIRouter) -> None:
    @api.post(
        "/cases/{case_id}/handovers",
        tags=["handover"],
        status_code=201,
        response_model=HandoverPublic,
        summary="Request a warm handover to a module (and a Träger)",
        responses=_REFUSALS,
    )
    async def request_handover(
        case_id: CaseIdPath,
        body: HandoverCreate,
        call: CallDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Publishes ``handover-requested``: the referrals service turns it into a referral
        to a Träger (provider agency) offering the module in the family's Stadtbezirk — the
        named one, or one the Familienbüro chooses. It needs a given ``traeger_contact``
        consent for the module naming that Träger or none (§ 65 SGB VIII). Urgent by
        default when the latest screening found an acute need and the family allowed its
        screening data to be used."""

        async def action(session: AsyncSession) -> Outcome:
            return await ops.request_handover(session, call, case_id, body)

        return await _change(call, idempotency_key, body, action)


def _erasure_routes(api: APIRouter) -> None:
    @api.post(
        "/cases/{case_id}/erasure",
        tags=["erasure"],
        response_model=ErasurePublic,
        summary="Erase a family (crypto-shredding)",
        responses={403: _REFUSALS[403], 422: _REFUSALS[422]},
    )
    async def erase(
        case_id: CaseIdPath,
        call: CallDep,
        body: Annotated[ErasureCreate | None, Body()] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """Destroys the family's data key, so that every personal and screening block of
        the family — in every topic, topic backup and database — is unreadable; purges
        intake's own copies (sealed blocks, duplicate-guard hashes) and publishes
        ``family-erased`` (also to the Bezirksteam's feed), on which every service purges
        its local copies. Erasing an erased family changes nothing and answers the same."""
        erasure = body or ErasureCreate()

        async def action(session: AsyncSession) -> Outcome:
            case = call.authorise(
                await ops.load_case(session, case_id, for_update=True),
                ops.ERASE,
                personal_data=False,
            )
            if case.erased_at is None:
                await ops.erase_case(
                    session,
                    call.runtime,
                    call.intake.keyring,
                    case,
                    reason=erasure.reason,
                    caller=call.caller,
                    path=call.route,
                )
            return Outcome(200, ops.erasure_public(case), case_id)

        return await _change(call, idempotency_key, erasure, action)

    @api.get(
        "/cases/{case_id}/erasure",
        tags=["erasure"],
        response_model=ErasurePublic,
        summary="Erasure status of a case",
        responses={403: _REFUSALS[403]},
    )
    async def erasure_status(case_id: CaseIdPath, call: CallDep) -> ErasurePublic:
        """Whether (when, why) a family was erased; readable by the data-protection officer."""
        async with call.runtime.db.transaction() as session:
            case = call.authorise(
                await ops.load_case(session, case_id), ops.ERASE, personal_data=False
            )
            call.audit(session, AuditAction.read, case_id, "erasure status")
            return ops.erasure_public(case)


def _keyring_routes(api: APIRouter) -> None:
    def ensure_keyring_client(call: ops.Call) -> None:
        # The policy admits services only; of those, only the configured keyring clients.
        if not call.is_keyring_client():
            raise AccessDenied(f"service {call.caller.subject} is not a keyring client")

    responses: dict[int | str, dict[str, Any]] = {
        403: _REFUSALS[403],
        404: {"description": "No such case or key."},
        410: _REFUSALS[410],
    }

    @api.get(
        "/keyring/cases/{case_id}",
        tags=["keyring"],
        response_model=DataKeyPublic,
        summary="A family's data key (internal: Lotse services only)",
        responses=responses,
    )
    async def key_for_case(
        case_id: CaseIdPath, call: CallDep, purpose: KeyPurpose = "open personal data blocks"
    ) -> DataKeyPublic:
        """The key opening the family's ``personal`` and ``screening`` blocks (``kid`` as
        in the blocks). Only for the services named in ``keyring_clients``; every release
        is audited with its purpose. 410 once the family is erased: the key is gone, and
        services must drop any copy they cached when ``family-erased`` arrives."""
        ensure_keyring_client(call)
        async with call.runtime.db.transaction() as session:
            case = await ops.load_case(session, case_id)
            if case is None:
                raise Refusal("case_id", "no such case", status=404)
            kid, key = await ops.family_key(session, call.intake.keyring, case)
            call.audit(session, AuditAction.key_release, case_id, purpose)
        return DataKeyPublic(case_id=case_id, kid=kid, key=encode_data_key(key))

    @api.get(
        "/keyring/keys/{kid}",
        tags=["keyring"],
        response_model=DataKeyPublic,
        summary="A data key by its kid (internal: Lotse services only)",
        responses=responses,
    )
    async def key_by_kid(
        kid: Annotated[str, Path(min_length=1, max_length=128)],
        call: CallDep,
        purpose: KeyPurpose = "open personal data blocks",
    ) -> DataKeyPublic:
        """As ``/keyring/cases/{case_id}``, looked up by the ``kid`` a block names."""
        ensure_keyring_client(call)
        async with call.runtime.db.transaction() as session:
            found = await call.intake.keyring.find_by_kid(session, kid)
            if found is None:
                erased = await session.execute(
                    select(IntakeCase).where(col(IntakeCase.key_id) == kid)
                )
                case = erased.scalar_one_or_none()
                if case is not None:
                    ops.ensure_not_erased(case)
                raise Refusal("kid", "no such key", status=404)
            case_id, key = found
            call.audit(session, AuditAction.key_release, case_id, purpose)
        return DataKeyPublic(case_id=case_id, kid=kid, key=encode_data_key(key))


def _duplicate_routes(api: APIRouter) -> None:
    @api.get(
        "/bezirke/{bezirk}/possible-duplicates",
        tags=["duplicates"],
        response_model=list[PossibleDuplicatePublic],
        summary="Possible duplicates for this Stadtbezirk's Familienbüro to decide",
        responses={403: _REFUSALS[403]},
    )
    async def list_possible_duplicates(
        bezirk: BezirkPath, call: CallDep, status: DuplicateStatus | None = None
    ) -> list[PossibleDuplicatePublic]:
        """Registrations made elsewhere (another clinic, another Stadtbezirk) that matched a
        case of this Stadtbezirk by family name, child birth date and address. The
        registrar was answered as for a new family; only the Familienbüro of the Stadtbezirk
        of the existing case sees the flag (ids only) and merges the two cases or dismisses
        it. Filter with ``status`` (open, merged, dismissed)."""
        async with call.runtime.db.transaction() as session:
            return await duplicates.list_flags(session, call, bezirk, status)

    @api.post(
        "/possible-duplicates/{duplicate_id}/merge",
        tags=["duplicates"],
        response_model=PossibleDuplicatePublic,
        summary="Merge the two cases of a possible duplicate",
        responses=_REFUSALS,
    )
    async def merge_possible_duplicate(
        duplicate_id: DuplicateIdPath,
        call: CallDep,
        body: Annotated[MergeCreate | None, Body()] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """One case survives (``surviving_case_id``, default the existing one), the other
        is merged into it: its consents in force are carried over to the survivor, nothing
        more is recorded for it (409 naming the survivor), and ``cases-merged`` tells
        visits, referrals and reporting to follow the family under the survivor only."""
        merging = body or MergeCreate()

        async def action(session: AsyncSession) -> Outcome:
            return await duplicates.merge(session, call, duplicate_id, merging)

        return await _change(call, idempotency_key, merging, action)

    @api.post(
        "/possible-duplicates/{duplicate_id}/dismiss",
        tags=["duplicates"],
        response_model=PossibleDuplicatePublic,
        summary="Dismiss a possible duplicate (two families after all)",
        responses=_REFUSALS,
    )
    async def dismiss_possible_duplicate(
        duplicate_id: DuplicateIdPath, call: CallDep, idempotency_key: IdempotencyKey = None
    ) -> Response:
        """Both cases stay as they are; the flag is closed."""

        async def action(session: AsyncSession) -> Outcome:
            return await duplicates.dismiss(session, call, duplicate_id)

        return await _change(call, idempotency_key, None, action)
