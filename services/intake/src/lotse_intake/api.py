"""HTTP API of the intake service: module-level routes, each a few lines calling a use case
(operations.py; the four-eyes erasure in erasure.py, possible duplicates in duplicates.py,
the keyring's releases in releases.py).

Families are registered by a Babylotse (baby pilot in a birth clinic) or from a move-in
notice of the citizens' office; consent, screening and warm handovers are recorded per case;
other Lotse services obtain purpose-bound keys from the keyring (what each may get is
``keyring.RELEASES``); erasure destroys the family's secret and with it every key.
Every changing route runs its use case under the request's ``Idempotency-Key``
(idempotency.run_once), which commits the state change, its events (outbox) and its audit
entry in one transaction. Refusals (the runtime's Refusal/Conflict) name field and reason.
Which roles may call each route is declared in policy.py and enforced by the runtime.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import Response
from lotse_contracts.personal import KeyPurpose
from lotse_runtime.app import ServiceRuntime, current_runtime
from lotse_runtime.identity import CallerDep, ensure_role

from lotse_intake import domain, duplicates, releases
from lotse_intake import erasure as four_eyes
from lotse_intake import operations as ops
from lotse_intake.domain import DuplicateStatus
from lotse_intake.idempotency import IdempotencyKey, run_once
from lotse_intake.settings import IntakeSettings
from lotse_intake.tables import (
    CaseDetail,
    CasePublic,
    ConsentCreate,
    ConsentPublic,
    ConsentWithdrawal,
    DataKeyPublic,
    DisclosureCreate,
    DisclosureSealed,
    ErasureCreate,
    ErasurePublic,
    ErasureRequestPublic,
    HandoverCreate,
    HandoverPublic,
    MergeCreate,
    PossibleDuplicatePublic,
    RegistrationCreate,
    ScreeningCreate,
    ScreeningPublic,
    ScreeningRecorded,
)

UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
CaseIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="Pseudonymous case id.")]
ConsentIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="Consent id.")]
RequestIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="Erasure request id.")]
DuplicateIdPath = Annotated[
    str, Path(pattern=UUID_PATTERN, description="Id of a possible-duplicate flag.")
]
BezirkPath = Annotated[
    str, Path(pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$", max_length=64, description="Bezirk slug.")
]
AuditPurpose = Annotated[
    str,
    Query(min_length=3, max_length=200, description="Why the key is needed (audit log)."),
]
ReferralIdPath = Annotated[str, Path(pattern=UUID_PATTERN, description="Referral id.")]
TraegerQuery = Annotated[
    str,
    Query(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=64, description="Träger slug."),
]
ConsentIdQuery = Annotated[
    str, Query(pattern=UUID_PATTERN, description="The traeger_contact consent it rests on.")
]

_REFUSALS: dict[int | str, dict[str, Any]] = {
    403: {"description": "Not permitted (also for unknown case ids)."},
    409: {"description": "Conflicts with the stored state; the reason names the field."},
    410: {"description": "The family's data was erased."},
    422: {"description": "Invalid input; each error names the field and the reason."},
}


#: The intake runtime, typed by intake's settings.
IntakeRuntimeDep = Annotated[ServiceRuntime[IntakeSettings], Depends(current_runtime)]


async def intake_of(request: Request) -> ops.IntakeContext:
    """FastAPI dependency: what intake works with beyond the runtime (app factory)."""
    context: ops.IntakeContext = request.app.state.intake
    return context


IntakeDep = Annotated[ops.IntakeContext, Depends(intake_of)]


async def call_of(
    request: Request, runtime: IntakeRuntimeDep, intake: IntakeDep, caller: CallerDep
) -> ops.Call:
    """FastAPI dependency: the request as intake's use cases see it."""
    route = request.scope.get("route")
    return ops.Call(
        runtime=runtime,
        intake=intake,
        caller=caller,
        route=getattr(route, "path", request.url.path),
        path=request.url.path,
    )


CallDep = Annotated[ops.Call, Depends(call_of)]

router = APIRouter()


# -- cases ---------------------------------------------------------------------------------------


@router.post(
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

    return await run_once(
        call, idempotency_key, body, lambda session: ops.register_family(session, call, body)
    )


@router.get(
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
        return await ops.read_case(session, call, case_id)


# -- consent --------------------------------------------------------------------------------------


@router.get(
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
        return await ops.read_consents(session, call, case_id)


@router.post(
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
    return await run_once(
        call, idempotency_key, body, lambda session: ops.give_consent(session, call, case_id, body)
    )


@router.post(
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
    return await run_once(
        call,
        idempotency_key,
        withdrawal,
        lambda session: ops.withdraw_consent(session, call, case_id, consent_id, withdrawal),
    )


# -- screening ------------------------------------------------------------------------------------


@router.post(
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
    return await run_once(
        call,
        idempotency_key,
        body,
        lambda session: ops.record_screening(session, call, case_id, body),
    )


@router.get(
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
        return await ops.read_screenings(session, call, case_id)


# -- handover -------------------------------------------------------------------------------------


@router.post(
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
    return await run_once(
        call,
        idempotency_key,
        body,
        lambda session: ops.request_handover(session, call, case_id, body),
    )


# -- erasure (four eyes) ------------------------------------------------------------------------


@router.post(
    "/cases/{case_id}/erasure",
    tags=["erasure"],
    status_code=202,
    response_model=ErasureRequestPublic,
    summary="Request the erasure of a family (four eyes: a second person confirms)",
    responses={
        403: _REFUSALS[403],
        409: _REFUSALS[409],
        410: _REFUSALS[410],
        422: _REFUSALS[422],
    },
)
async def request_erasure(
    case_id: CaseIdPath,
    body: ErasureCreate,
    call: CallDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Records a request to erase the family, with its reason and a note (e.g. the
    reference of the family's written request), and erases nothing yet: a
    data-protection officer other than the requester confirms it
    (``.../erasure/{request_id}/confirm``), or it is withdrawn. One pending request per
    family; 409 while one is waiting, 410 once the family is erased."""
    return await run_once(
        call, idempotency_key, body, lambda session: four_eyes.request(session, call, case_id, body)
    )


@router.post(
    "/cases/{case_id}/erasure/{request_id}/confirm",
    tags=["erasure"],
    response_model=ErasurePublic,
    summary="Confirm an erasure request and erase the family (crypto-shredding)",
    responses={403: _REFUSALS[403], 409: _REFUSALS[409]},
)
async def confirm_erasure(
    case_id: CaseIdPath,
    request_id: RequestIdPath,
    call: CallDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """A data-protection officer other than the requester confirms (409 for the
    requester: four eyes). Then the family's data key is destroyed, so that every
    personal and screening block of the family — in every topic, topic backup and
    database — is unreadable; intake's own copies (sealed blocks, duplicate-guard
    hashes) are purged and ``family-erased`` is published (also to the Bezirksteam's
    feed), on which every service purges its local copies."""
    return await run_once(
        call,
        idempotency_key,
        None,
        lambda session: four_eyes.confirm(session, call, case_id, request_id),
    )


@router.post(
    "/cases/{case_id}/erasure/{request_id}/withdraw",
    tags=["erasure"],
    response_model=ErasureRequestPublic,
    summary="Withdraw a pending erasure request",
    responses={403: _REFUSALS[403], 409: _REFUSALS[409]},
)
async def withdraw_erasure(
    case_id: CaseIdPath,
    request_id: RequestIdPath,
    call: CallDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """The requester or a data-protection officer withdraws a pending request; nothing
    is erased."""
    return await run_once(
        call,
        idempotency_key,
        None,
        lambda session: four_eyes.withdraw(session, call, case_id, request_id),
    )


@router.get(
    "/cases/{case_id}/erasure",
    tags=["erasure"],
    response_model=ErasurePublic,
    summary="Erasure status of a case",
    responses={403: _REFUSALS[403]},
)
async def erasure_status(case_id: CaseIdPath, call: CallDep) -> ErasurePublic:
    """Whether (when, why) a family was erased, and a request waiting for confirmation;
    readable by the data-protection officer."""
    async with call.runtime.db.transaction() as session:
        return await four_eyes.status(session, call, case_id)


# -- keyring (internal: Lotse services only) ----------------------------------------------------

_KEYRING_REFUSALS: dict[int | str, dict[str, Any]] = {
    403: _REFUSALS[403],
    404: {"description": "No such case."},
    409: {"description": "The consent does not (or no longer) cover the Träger."},
    410: _REFUSALS[410],
}


@router.get(
    "/keyring/cases/{case_id}/keys/{purpose}",
    tags=["keyring"],
    response_model=DataKeyPublic,
    summary="A family's key for one purpose (internal: Lotse services only)",
    responses=_KEYRING_REFUSALS,
)
async def purpose_key(
    case_id: CaseIdPath,
    purpose: KeyPurpose,
    call: CallDep,
    reason: AuditPurpose = "open a sealed block",
) -> DataKeyPublic:
    """The key that opens the family's blocks of one purpose (``contact``, ``children``,
    ``screening``) and nothing else. Only for the services whose task needs that
    purpose (visits: contact data for the welcome visit); every release is audited.
    Disclosure keys are not released here (see ``/disclosures``). 410 once the family
    is erased: the secret is gone and no key can be derived any more."""
    async with call.runtime.db.transaction() as session:
        return await releases.purpose_key(session, call, case_id, purpose, reason)


@router.post(
    "/keyring/cases/{case_id}/disclosures",
    tags=["keyring"],
    response_model=DisclosureSealed,
    summary="Seal a referral's disclosure for one Träger (internal: referrals only)",
    responses=_KEYRING_REFUSALS,
)
async def seal_disclosure(
    case_id: CaseIdPath, body: DisclosureCreate, call: CallDep
) -> DisclosureSealed:
    """The requested fields the family gave, sealed under the key of this referral and
    this Träger, as an EncryptedBlock and as a compact JWE. The consent named must be
    the family's ``traeger_contact`` consent for that Träger and still given. The
    referrals service never sees the family's other keys or the plaintext."""
    async with call.runtime.db.transaction() as session:
        return await releases.seal_disclosure(session, call, case_id, body)


@router.get(
    "/keyring/cases/{case_id}/disclosures/{referral_id}/key",
    tags=["keyring"],
    response_model=DataKeyPublic,
    summary="The key of one referral's disclosure (internal: referrals only)",
    responses=_KEYRING_REFUSALS,
)
async def disclosure_key(
    case_id: CaseIdPath,
    referral_id: ReferralIdPath,
    traeger: TraegerQuery,
    consent_id: ConsentIdQuery,
    call: CallDep,
) -> DataKeyPublic:
    """The key the addressed Träger opens its disclosure with: bound to this referral
    and this Träger, it opens no other block of the family. Released (to the referrals
    service, which hands it to the Träger while the referral is open) only while the
    consent stands and the family is not erased; audited."""
    async with call.runtime.db.transaction() as session:
        return await releases.disclosure_key(
            session, call, case_id, referral_id, traeger, consent_id
        )


# -- possible duplicates --------------------------------------------------------------------------


@router.get(
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


@router.post(
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
    return await run_once(
        call,
        idempotency_key,
        merging,
        lambda session: duplicates.merge(session, call, duplicate_id, merging),
    )


@router.post(
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
    return await run_once(
        call, idempotency_key, None, lambda session: duplicates.dismiss(session, call, duplicate_id)
    )
