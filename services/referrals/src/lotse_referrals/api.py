"""HTTP API: the offer catalogue, creating and following referrals, a Stadtbezirk's open
referrals, escalations and waiting wishes, and a Träger's own referrals.

Every route is a module-level function on ``router``: it takes typed dependencies (the
service's :class:`~lotse_referrals.context.Context`, the caller), calls one use case of
operations.py or catalogue.py and turns its result into the public model. Refusals are the
use cases' own (``Refusal``/``Conflict``/``Unavailable``), answered by the runtime.

No route returns personal data: a referral's contact data travels only sealed, on the
addressed Träger's Kafka feed; the Träger fetches the key to open it here. The roles of each
route are declared in policy.py and enforced by the runtime.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import Enum
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from lotse_contracts.events.referrals import (
    CompletionOutcome,
    PersonalField,
    ReferralCancelReason,
    ReferralOrigin,
    ReferralStatus,
    RejectionReason,
    WishWaitingFor,
)
from lotse_contracts.personal import encode_data_key
from lotse_runtime.identity import Caller, CallerDep, Role
from lotse_runtime.inputs import FIRST_CONTACT, FirstContactDay, RequestModel
from pydantic import BaseModel, Field, field_validator

from lotse_referrals import catalogue, domain
from lotse_referrals import operations as ops
from lotse_referrals.context import Context
from lotse_referrals.domain import Step
from lotse_referrals.tables import Referral, ReferralStep, Wish

_SLUG = r"^[a-z0-9]+(-[a-z0-9]+)*$"
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
Slug = Annotated[str, Field(pattern=_SLUG, max_length=64)]
Uuid = Annotated[str, Field(pattern=_UUID)]


async def context_of(request: Request) -> Context:
    """FastAPI dependency: the referrals context of the app serving this request."""
    ctx: Context = request.app.state.referrals
    return ctx


ContextDep = Annotated[Context, Depends(context_of)]

router = APIRouter()

# --- models -------------------------------------------------------------------------------


class ModulePublic(BaseModel):
    slug: str
    name: str
    description: str | None = None


class TraegerPublic(BaseModel):
    """A Träger (provider agency) of the offer catalogue with this month's load."""

    slug: str
    name: str
    contact: str = Field(description="Organisation contact, never a person.")
    modules: list[str]
    bezirke: list[str] = Field(description='Stadtbezirke served; ["*"] means all.')
    capacity_per_month: int
    used_this_month: int = Field(description="Referrals this month holding a place.")
    free_capacity: int
    active: bool = Field(description="False: takes no new referrals at present.")
    edited: bool = Field(description="Changed through the API (kept over restarts).")
    edited_fields: list[str] = Field(
        default_factory=list,
        description="The fields changed through the API: they keep their values over "
        "restarts until the city file changes the same field; the others follow the file.",
    )
    retired: bool = Field(
        default=False,
        description="No longer in the city configuration: takes no new referrals; its "
        "referrals stay and can be followed and answered.",
    )


class TraegerUpdate(RequestModel):
    """Changes to a Träger's catalogue entry; fields left out stay as they are. Unknown
    fields and control characters in text are refused (422)."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    contact: str | None = Field(default=None, min_length=1, max_length=200)
    modules: list[Slug] | None = Field(default=None, min_length=1)
    bezirke: list[str] | None = Field(default=None, min_length=1)
    capacity_per_month: int | None = Field(default=None, ge=0, le=100_000)
    active: bool | None = None


class ReferralCreate(RequestModel):
    """A referral of a family to a module, by the requesting side (Familienbüro, Babylotse,
    Bezirksteam). Without ``traeger`` the best matching Träger with free capacity that the
    family's consent covers is chosen."""

    case_id: Uuid
    module: Slug = Field(description="Module from the offer catalogue, e.g. familienhebamme.")
    traeger: Slug | None = Field(default=None, description="Träger to refer to, if chosen.")
    consent_ref: Uuid = Field(
        description="The family's traeger_contact consent for this Träger and purpose "
        "(§ 65 SGB VIII)."
    )
    urgent: bool = False
    origin: Literal["staff", "screening", "visit", "handover"] = "staff"
    handover_id: Uuid | None = None
    visit_id: Uuid | None = None
    disclose: list[PersonalField] | None = Field(
        default=None,
        description="Narrow the disclosed contact fields further; default: all the consent "
        "covers that the family gave.",
    )


class StepRequest(RequestModel):
    """One lifecycle step: the addressed Träger sets received, accepted, rejected,
    in-progress, first-contact or completed; the requesting side sets cancelled."""

    step: Step
    rejection_reason: RejectionReason | None = Field(
        default=None, description="Required for rejected."
    )
    cancel_reason: ReferralCancelReason | None = Field(
        default=None, description="Required for cancelled."
    )
    reason_code: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,32}$")
    first_contact_planned_for: FirstContactDay | None = Field(
        default=None, description=f"With accepted (YYYY-MM-DD); {FIRST_CONTACT.text}."
    )
    outcome: CompletionOutcome | None = Field(default=None, description="With completed.")

    @field_validator("cancel_reason")
    @classmethod
    def _not_system_reasons(cls, value: ReferralCancelReason | None) -> ReferralCancelReason | None:
        if value is ReferralCancelReason.CASE_ERASED:
            raise ValueError("case_erased is set by the system when a family is erased")
        return value


class StepPublic(BaseModel):
    step: str
    actor_role: str
    occurred_at: datetime
    recorded_at: datetime


class ReferralPublic(BaseModel):
    referral_id: str
    case_id: str
    bezirk: str
    traeger: str
    module: str
    status: ReferralStatus
    origin: ReferralOrigin
    consent_ref: str
    requested_by_role: str
    handover_id: str | None
    visit_id: str | None
    urgent: bool
    disclosed_fields: list[str]
    requested_at: datetime
    answer_due_by: date
    received_at: datetime | None
    accepted_at: datetime | None
    first_contact_planned_for: date | None
    rejected_at: datetime | None
    rejection_reason: str | None
    rejection_code: str | None = Field(
        description="The Träger's own code; shown to that Träger and services only."
    )
    in_progress_at: datetime | None
    first_contact_at: datetime | None
    days_to_first_contact: int | None
    warm_handover: bool = Field(description="Accepted and first contact confirmed.")
    hours_to_warm_handover: float | None
    completed_at: datetime | None
    completion_outcome: str | None
    cancelled_at: datetime | None
    cancel_reason: str | None
    cancelled_by_role: str | None
    escalated: bool
    escalated_at: datetime | None
    working_days_at_escalation: int | None


class ReferralDetail(ReferralPublic):
    steps: list[StepPublic]


class WishPublic(BaseModel):
    """A handover or visit wish that is not a referral yet, and why."""

    wish_id: str
    origin: str
    source_id: str
    case_id: str
    bezirk: str
    module: str
    traeger: str | None
    urgent: bool
    state: str
    problem: str | None = Field(description="Why it is not a referral yet, and what helps.")
    waiting_for: WishWaitingFor | None = Field(
        default=None,
        description="What an open wish waits for: consent (no consent names a Träger "
        "offering the module), capacity, offer (not offered in the Bezirk), case, keyring.",
    )
    referral_id: str | None
    created_at: datetime
    escalated_at: datetime | None = Field(
        default=None, description="When it was escalated to the Bezirksteam (once)."
    )


class WishPlacement(RequestModel):
    """The Träger the Familienbüro chooses for a waiting wish. The family's
    ``traeger_contact`` consent must name that Träger (and cover the module): record it
    first (intake), otherwise the placement is refused (409, field ``consent_ref``)."""

    traeger: Slug = Field(description="The chosen Träger (catalogue slug).")
    urgent: bool | None = Field(default=None, description="Default: as the wish says.")
    disclose: list[PersonalField] | None = Field(
        default=None, description="Narrow the disclosed contact fields further."
    )


class CatalogueReconciled(BaseModel):
    """What reconciling the catalogue with the city file did."""

    source: str = Field(description="The city file read.")
    file_changed: bool = Field(
        description="Whether the file differs from the one last reconciled (at start, by the "
        "periodic check or by this call)."
    )
    changed: int = Field(description="Catalogue entries added or changed.")
    retired: list[str] = Field(description="Träger the file no longer names, retired now.")
    restored: list[str] = Field(description="Retired Träger the file names again.")
    needs_restart: list[str] = Field(
        description="File changes the running service cannot take over (new Träger, the "
        "city's modules or Stadtbezirke): they apply at the next start."
    )
    open_of_retired: dict[str, int] = Field(
        description="Open referrals per retired Träger; each Bezirk lists its own at "
        "GET /bezirke/{bezirk}/retired-traeger/referrals."
    )


class DisclosureKey(BaseModel):
    """The key that opens this referral's sealed ``disclosure`` (base64url, 32 bytes)."""

    referral_id: str
    kid: str
    key: str


#: The fields a referral shows as stored; the others are derived in :func:`_public`.
_OWN_FIELDS = [
    name
    for name in ReferralPublic.model_fields
    if name
    not in {
        "status",
        "origin",
        "disclosed_fields",
        "rejection_code",
        "warm_handover",
        "hours_to_warm_handover",
        "escalated",
    }
]


def _public(row: Referral, caller: Caller) -> ReferralPublic:
    status = ReferralStatus(row.status)
    first_contact = row.first_contact_at
    warm = domain.warm_handover_done(status, first_contact is not None)
    hours = None
    if warm and first_contact is not None:
        hours = round((first_contact - row.requested_at).total_seconds() / 3600, 2)
    own = {name: getattr(row, name) for name in _OWN_FIELDS}
    return ReferralPublic(
        **own,
        status=status,
        origin=ReferralOrigin(row.origin),
        disclosed_fields=list(row.disclosed_fields or []),
        # The Träger's own code is shown to that Träger only.
        rejection_code=row.rejection_code if caller.role is Role.traeger else None,
        warm_handover=warm,
        hours_to_warm_handover=hours,
        escalated=row.escalated_at is not None,
    )


def _traeger_public(listing: catalogue.Listing) -> TraegerPublic:
    row, used = listing
    return TraegerPublic(
        slug=row.slug,
        name=row.name,
        contact=row.contact,
        modules=list(row.modules),
        bezirke=list(row.bezirke),
        capacity_per_month=row.capacity_per_month,
        used_this_month=used,
        free_capacity=catalogue.offer_of(row, used).free_capacity,
        active=row.active and not row.retired,
        edited=row.edited,
        edited_fields=list(row.edited_fields or []),
        retired=row.retired,
    )


def _step_public(step: ReferralStep) -> StepPublic:
    return StepPublic(
        step=step.step,
        actor_role=step.actor_role,
        occurred_at=step.occurred_at,
        recorded_at=step.recorded_at,
    )


def _wish_public(wish: Wish) -> WishPublic:
    return WishPublic.model_validate(wish, from_attributes=True)


# --- the offer catalogue ------------------------------------------------------------------

CATALOGUE: list[str | Enum] = ["catalogue"]


@router.get(
    "/catalogue/modules", tags=CATALOGUE, response_model=list[ModulePublic], summary="Offer modules"
)
async def modules(ctx: ContextDep, caller: CallerDep) -> list[ModulePublic]:
    return [
        ModulePublic(slug=m.slug, name=m.name, description=m.description) for m in ctx.city.modules
    ]


@router.get(
    "/catalogue/traeger",
    tags=CATALOGUE,
    response_model=list[TraegerPublic],
    summary="Träger (provider agencies) with modules, Bezirke, capacity and contact",
)
async def list_traeger(
    ctx: ContextDep,
    caller: CallerDep,
    module: Annotated[str | None, Query(description="Only Träger offering it.")] = None,
    bezirk: Annotated[str | None, Query(description="Only Träger serving it.")] = None,
) -> list[TraegerPublic]:
    listings = await catalogue.list_traeger(ctx, module=module, bezirk=bezirk)
    return [_traeger_public(listing) for listing in listings]


@router.get(
    "/catalogue/traeger/{slug}", tags=CATALOGUE, response_model=TraegerPublic, summary="One Träger"
)
async def get_traeger(slug: str, ctx: ContextDep, caller: CallerDep) -> TraegerPublic:
    return _traeger_public(await catalogue.get_traeger(ctx, slug))


@router.patch(
    "/catalogue/traeger/{slug}",
    tags=CATALOGUE,
    response_model=TraegerPublic,
    summary="Change a Träger's catalogue entry",
    description="A Träger may change its own entry's contact, capacity and "
    "availability; city-wide coordination (role koordination) may change every entry. "
    "Nobody else: capacity and availability hold for every Stadtbezirk the Träger "
    "serves, so they are no Bezirksteam's to change. Träger are added in the city "
    "configuration (their Kafka topics and ACLs come from it), not here.",
)
async def update_traeger(
    slug: str, body: TraegerUpdate, ctx: ContextDep, caller: CallerDep
) -> TraegerPublic:
    changes = body.model_dump(exclude_unset=True)
    return _traeger_public(await ops.change_catalogue_entry(ctx, caller, slug, changes))


@router.get(
    "/catalogue/suggestions",
    tags=CATALOGUE,
    response_model=list[TraegerPublic],
    summary="Träger offering a module in a Stadtbezirk, free capacity first",
)
async def suggestions(
    ctx: ContextDep,
    caller: CallerDep,
    bezirk: Annotated[str, Query(description="The family's Stadtbezirk.")],
    module: Annotated[str, Query(description="The wished-for module.")],
) -> list[TraegerPublic]:
    listings = await catalogue.suggest_traeger(ctx, bezirk=bezirk, module=module)
    return [_traeger_public(listing) for listing in listings]


@router.post(
    "/catalogue/reconcile",
    tags=CATALOGUE,
    response_model=CatalogueReconciled,
    summary="Reconcile the catalogue with the city file now (koordination)",
    description="As at start, and as the periodic check does when the file changed: Träger "
    "the file no longer names are retired (kept while referrals point at them, no new "
    "referrals to them); the others follow the file field by field, except fields edited "
    "through the API that the file did not change. A file that does not parse (422) or "
    "configures another city (409) changes nothing.",
    responses={
        409: {"description": "The file configures another city; nothing changed"},
        422: {"description": "The file cannot be read or is invalid; nothing changed"},
    },
)
async def reconcile_catalogue(ctx: ContextDep, caller: CallerDep) -> CatalogueReconciled:
    result = await ops.reconcile_catalogue(ctx, ctx.clock(), force=True)
    return CatalogueReconciled(
        source=result.source,
        file_changed=result.file_changed,
        changed=result.applied.changed,
        retired=list(result.applied.retired),
        restored=list(result.applied.restored),
        needs_restart=result.needs_restart,
        open_of_retired=result.open_of_retired,
    )


# --- referrals ----------------------------------------------------------------------------

REFERRALS: list[str | Enum] = ["referrals"]


@router.post(
    "/referrals",
    tags=REFERRALS,
    status_code=201,
    response_model=ReferralPublic,
    summary="Refer a family to a Träger's module",
    responses={
        409: {"description": "Consent missing, no capacity, or already referred"},
        422: {"description": "Unknown Träger or module, module not offered in the Bezirk"},
        503: {"description": "The keyring is unavailable; try again"},
    },
)
async def create_referral(
    body: ReferralCreate, ctx: ContextDep, caller: CallerDep
) -> ReferralPublic:
    new = ops.NewReferral.asked_by(caller, body.model_dump())
    return _public(await ops.request_referral(ctx, caller, new), caller)


@router.get(
    "/referrals/{referral_id}",
    tags=REFERRALS,
    response_model=ReferralDetail,
    summary="Follow a referral",
)
async def read_referral(referral_id: str, ctx: ContextDep, caller: CallerDep) -> ReferralDetail:
    referral, steps = await ops.read_referral(ctx, caller, referral_id)
    public = _public(referral, caller).model_dump()
    return ReferralDetail(**public, steps=[_step_public(s) for s in steps])


@router.post(
    "/referrals/{referral_id}/steps",
    tags=REFERRALS,
    response_model=ReferralPublic,
    summary="Take a lifecycle step (Träger: answer; requesting side: cancel)",
    responses={409: {"description": "Illegal step, or not the caller's to take"}},
)
async def take_step(
    referral_id: str, body: StepRequest, ctx: ContextDep, caller: CallerDep
) -> ReferralPublic:
    details = ops.StepDetails(**body.model_dump(exclude={"step"}))
    return _public(await ops.step_referral(ctx, caller, referral_id, body.step, details), caller)


@router.get(
    "/referrals/{referral_id}/disclosure-key",
    tags=REFERRALS,
    response_model=DisclosureKey,
    summary="Key to open the referral's sealed disclosure (addressed Träger only)",
    description="The key of this referral's disclosure, bound to this referral and this "
    "Träger: it opens the referral's `disclosure` / `disclosure_jwe` and no other block "
    "of the family. Released only to the Träger the referral is addressed to, while the "
    "referral is running and the family's consent stands (409 otherwise), and recorded "
    "in the audit log here and in intake's keyring. After the family's erasure there is "
    "no key any more (410).",
)
async def disclosure_key(referral_id: str, ctx: ContextDep, caller: CallerDep) -> DisclosureKey:
    kid, key = await ops.release_disclosure_key(ctx, caller, referral_id)
    return DisclosureKey(referral_id=referral_id, kid=kid, key=encode_data_key(key))


@router.get(
    "/cases/{case_id}/referrals",
    tags=REFERRALS,
    response_model=list[ReferralPublic],
    summary="Referrals of one family (a Träger sees only its own)",
)
async def referrals_of_case(
    case_id: str, ctx: ContextDep, caller: CallerDep
) -> list[ReferralPublic]:
    return [_public(r, caller) for r in await ops.referrals_of_case(ctx, caller, case_id)]


# --- a Stadtbezirk's and a Träger's lists -------------------------------------------------

OVERVIEWS: list[str | Enum] = ["bezirke", "traeger"]
StatusQuery = Annotated[str, Query(description="open, all, or one status")]
LimitQuery = Annotated[int, Query(ge=1, le=1000)]


@router.get(
    "/bezirke/{bezirk}/referrals",
    tags=OVERVIEWS,
    response_model=list[ReferralPublic],
    summary="A Stadtbezirk's referrals (default: the open ones)",
)
async def referrals_of_bezirk(
    bezirk: str,
    ctx: ContextDep,
    caller: CallerDep,
    status: StatusQuery = "open",
    limit: LimitQuery = 200,
) -> list[ReferralPublic]:
    rows = await ops.referrals_of_bezirk(ctx, caller, bezirk, status=status, limit=limit)
    return [_public(r, caller) for r in rows]


@router.get(
    "/bezirke/{bezirk}/escalations",
    tags=OVERVIEWS,
    response_model=list[ReferralPublic],
    summary="A Stadtbezirk's escalated referrals (default: still waiting for an answer)",
)
async def escalations_of_bezirk(
    bezirk: str,
    ctx: ContextDep,
    caller: CallerDep,
    open_only: Annotated[bool, Query(description="Only those still open.")] = True,
    limit: LimitQuery = 200,
) -> list[ReferralPublic]:
    rows = await ops.escalations_of_bezirk(ctx, caller, bezirk, open_only=open_only, limit=limit)
    return [_public(r, caller) for r in rows]


@router.get(
    "/bezirke/{bezirk}/retired-traeger/referrals",
    tags=OVERVIEWS,
    response_model=list[ReferralPublic],
    summary="A Stadtbezirk's open referrals to Träger the city file no longer names",
    description="No new referral goes to a retired Träger and its Kafka answers are no "
    "longer read: each of these needs a person (follow up, answer over HTTP, or cancel "
    "and refer elsewhere).",
)
async def referrals_to_retired_traeger(
    bezirk: str, ctx: ContextDep, caller: CallerDep, limit: LimitQuery = 200
) -> list[ReferralPublic]:
    rows = await ops.referrals_to_retired_traeger(ctx, caller, bezirk, limit=limit)
    return [_public(r, caller) for r in rows]


@router.get(
    "/bezirke/{bezirk}/wishes",
    tags=OVERVIEWS,
    response_model=list[WishPublic],
    summary="Handovers and visit wishes not placed yet, with the reason",
)
async def wishes_of_bezirk(
    bezirk: str,
    ctx: ContextDep,
    caller: CallerDep,
    state: Annotated[Literal["open", "placed", "dropped"], Query()] = "open",
) -> list[WishPublic]:
    return [_wish_public(w) for w in await ops.wishes_of_bezirk(ctx, caller, bezirk, state=state)]


@router.post(
    "/wishes/{wish_id}/placement",
    tags=OVERVIEWS,
    status_code=201,
    response_model=WishPublic,
    summary="Place a waiting wish with the Träger the Familienbüro chooses",
    responses={
        409: {
            "description": "No consent names that Träger, no free place, or the wish is "
            "no longer open"
        },
        422: {"description": "Unknown Träger, or it does not offer the module in the Bezirk"},
        503: {"description": "The keyring is unavailable; try again"},
    },
)
async def place_wish(
    wish_id: str, body: WishPlacement, ctx: ContextDep, caller: CallerDep
) -> WishPublic:
    choice = ops.Placement(**body.model_dump())
    return _wish_public(await ops.place_wish(ctx, caller, wish_id, choice))


@router.get(
    "/traeger/{slug}/referrals",
    tags=OVERVIEWS,
    response_model=list[ReferralPublic],
    summary="The referrals addressed to one Träger (that Träger only)",
)
async def referrals_of_traeger(
    slug: str,
    ctx: ContextDep,
    caller: CallerDep,
    status: StatusQuery = "open",
    limit: LimitQuery = 200,
) -> list[ReferralPublic]:
    rows = await ops.referrals_of_traeger(ctx, caller, slug, status=status, limit=limit)
    return [_public(r, caller) for r in rows]
