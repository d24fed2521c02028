"""HTTP API: the offer catalogue, creating and following referrals, a Stadtbezirk's open
referrals, escalations and waiting wishes, and a Träger's own referrals.

No route returns personal data: a referral's contact data travels only sealed, on the
addressed Träger's Kafka feed; the Träger fetches the key to open it here. The roles of each
route are declared in policy.py and enforced by the runtime.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from lotse_contracts.events.referrals import (
    CompletionOutcome,
    PersonalField,
    ReferralCancelReason,
    ReferralOrigin,
    ReferralStatus,
    RejectionReason,
)
from lotse_contracts.personal import encode_data_key
from lotse_runtime import audit
from lotse_runtime.app import ServiceRuntime, runtime_of
from lotse_runtime.identity import (
    AccessDenied,
    Caller,
    CallerDep,
    CaseScope,
    Role,
    ensure_may_access_case,
)
from lotse_runtime.inputs import FIRST_CONTACT, FirstContactDay, RequestModel
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_referrals import domain
from lotse_referrals import operations as ops
from lotse_referrals.domain import Step
from lotse_referrals.keyring import DisclosureFor, KeyGone, KeyRefused, KeyringUnavailable
from lotse_referrals.operations import Context, Refused, StepDetails
from lotse_referrals.tables import (
    Case,
    CatalogueTraeger,
    Referral,
    ReferralStep,
    Wish,
)

_SLUG = r"^[a-z0-9]+(-[a-z0-9]+)*$"
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
Slug = Annotated[str, Field(pattern=_SLUG, max_length=64)]
Uuid = Annotated[str, Field(pattern=_UUID)]


def context_of(request: Request) -> Context:
    ctx: Context = request.app.state.referrals
    return ctx


RuntimeDep = Annotated[ServiceRuntime[Any], Depends(runtime_of)]
ContextDep = Annotated[Context, Depends(context_of)]


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
    problem: str | None
    referral_id: str | None
    created_at: datetime


class DisclosureKey(BaseModel):
    """The key that opens this referral's sealed ``disclosure`` (base64url, 32 bytes)."""

    referral_id: str
    kid: str
    key: str


def _public(row: Referral, caller: Caller) -> ReferralPublic:
    status = ReferralStatus(row.status)
    first_contact = row.first_contact_at
    warm = domain.warm_handover_done(status, first_contact is not None)
    hours = None
    if warm and first_contact is not None:
        hours = round((first_contact - row.requested_at).total_seconds() / 3600, 2)
    sees_code = caller.role is Role.traeger
    return ReferralPublic(
        referral_id=row.referral_id,
        case_id=row.case_id,
        bezirk=row.bezirk,
        traeger=row.traeger,
        module=row.module,
        status=status,
        origin=ReferralOrigin(row.origin),
        consent_ref=row.consent_ref,
        requested_by_role=row.requested_by_role,
        handover_id=row.handover_id,
        visit_id=row.visit_id,
        urgent=row.urgent,
        disclosed_fields=list(row.disclosed_fields or []),
        requested_at=row.requested_at,
        answer_due_by=row.answer_due_by,
        received_at=row.received_at,
        accepted_at=row.accepted_at,
        first_contact_planned_for=row.first_contact_planned_for,
        rejected_at=row.rejected_at,
        rejection_reason=row.rejection_reason,
        rejection_code=row.rejection_code if sees_code else None,
        in_progress_at=row.in_progress_at,
        first_contact_at=first_contact,
        days_to_first_contact=row.days_to_first_contact,
        warm_handover=warm,
        hours_to_warm_handover=hours,
        completed_at=row.completed_at,
        completion_outcome=row.completion_outcome,
        cancelled_at=row.cancelled_at,
        cancel_reason=row.cancel_reason,
        cancelled_by_role=row.cancelled_by_role,
        escalated=row.escalated_at is not None,
        escalated_at=row.escalated_at,
        working_days_at_escalation=row.working_days_at_escalation,
    )


def _traeger_public(row: CatalogueTraeger, used: int) -> TraegerPublic:
    offer = ops.offer_of(row, used)
    return TraegerPublic(
        slug=row.slug,
        name=row.name,
        contact=row.contact,
        modules=list(row.modules),
        bezirke=list(row.bezirke),
        capacity_per_month=row.capacity_per_month,
        used_this_month=used,
        free_capacity=offer.free_capacity,
        active=row.active,
        edited=row.edited,
    )


def _refuse(status: int, field: str, reason: str) -> Refused:
    """A refusal answered as ``{"detail": reason, "errors": [{"field", "reason"}]}``, the
    shape of the platform's request validation errors (see app.py)."""
    return Refused(status, field, reason)


# --- access helpers -----------------------------------------------------------------------


async def _scope(session: AsyncSession, referral: Referral) -> CaseScope:
    case = await session.get(Case, referral.case_id)
    return CaseScope(
        bezirk=referral.bezirk,
        case_id=referral.case_id,
        traeger=frozenset({referral.traeger}),
        registered_by_clinic=case.clinic_id if case is not None else None,
    )


def _ensure_bezirk(caller: Caller, bezirk: str) -> None:
    ensure_may_access_case(caller, CaseScope(bezirk=bezirk), personal_data=False)


# --- routes -------------------------------------------------------------------------------


def catalogue_router() -> APIRouter:
    router = APIRouter(prefix="/catalogue", tags=["catalogue"])

    @router.get("/modules", response_model=list[ModulePublic], summary="Offer modules")
    async def modules(runtime: RuntimeDep, caller: CallerDep) -> list[ModulePublic]:
        return [
            ModulePublic(slug=m.slug, name=m.name, description=m.description)
            for m in runtime.city.modules
        ]

    @router.get(
        "/traeger",
        response_model=list[TraegerPublic],
        summary="Träger (provider agencies) with modules, Bezirke, capacity and contact",
    )
    async def list_traeger(
        runtime: RuntimeDep,
        ctx: ContextDep,
        caller: CallerDep,
        module: Annotated[str | None, Query(description="Only Träger offering it.")] = None,
        bezirk: Annotated[str | None, Query(description="Only Träger serving it.")] = None,
    ) -> list[TraegerPublic]:
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            used = await ops.usage_this_month(session, ctx, now)
            rows = (
                await session.execute(select(CatalogueTraeger).order_by(col(CatalogueTraeger.slug)))
            ).scalars()
            result = []
            for row in rows:
                offer = ops.offer_of(row, used.get(row.slug, 0))
                if module is not None and not offer.offers(module):
                    continue
                if bezirk is not None and not offer.serves(bezirk):
                    continue
                result.append(_traeger_public(row, used.get(row.slug, 0)))
        return result

    @router.get("/traeger/{slug}", response_model=TraegerPublic, summary="One Träger")
    async def get_traeger(
        slug: str, runtime: RuntimeDep, ctx: ContextDep, caller: CallerDep
    ) -> TraegerPublic:
        async with runtime.db.transaction() as session:
            row = await session.get(CatalogueTraeger, slug)
            if row is None:
                raise HTTPException(404, detail=f"no Träger {slug} in the catalogue")
            used = await ops.usage_this_month(session, ctx, runtime.clock())
            return _traeger_public(row, used.get(slug, 0))

    @router.patch(
        "/traeger/{slug}",
        response_model=TraegerPublic,
        summary="Change a Träger's catalogue entry",
        description="A Träger may change its own entry's contact, capacity and "
        "availability; city-wide coordination (role koordination) may change every entry. "
        "Nobody else: capacity and availability hold for every Stadtbezirk the Träger "
        "serves, so they are no Bezirksteam's to change. Träger are added in the city "
        "configuration (their Kafka topics and ACLs come from it), not here.",
    )
    async def update_traeger(
        slug: str, body: TraegerUpdate, runtime: RuntimeDep, ctx: ContextDep, caller: CallerDep
    ) -> TraegerPublic:
        if caller.role is not Role.koordination:
            # The policy admits Träger and coordination only; a Träger edits its own entry.
            if caller.role is not Role.traeger or caller.traeger != slug:
                raise AccessDenied("a Träger may change only its own entry")
            if body.modules is not None or body.bezirke is not None or body.name is not None:
                raise AccessDenied("a Träger may change only contact, capacity and activity")
        city = runtime.city
        if body.modules is not None:
            unknown = [m for m in body.modules if m not in city.module_slugs]
            if unknown:
                raise _refuse(422, "modules", f"unknown module(s) {', '.join(unknown)}")
        if body.bezirke is not None and body.bezirke != ["*"]:
            unknown = [b for b in body.bezirke if b not in city.bezirk_slugs]
            if unknown:
                raise _refuse(
                    422,
                    "bezirke",
                    f'unknown Stadtbezirk(e) {", ".join(unknown)}; use ["*"] for all',
                )
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            row = await session.get(CatalogueTraeger, slug)
            if row is None:
                raise HTTPException(404, detail=f"no Träger {slug} in the catalogue")
            for key, value in body.model_dump(exclude_unset=True).items():
                if value is not None:
                    setattr(row, key, value)
            row.edited = True
            row.updated_at = now
            session.add(row)
            used = await ops.usage_this_month(session, ctx, now)
            return _traeger_public(row, used.get(slug, 0))

    @router.get(
        "/suggestions",
        response_model=list[TraegerPublic],
        summary="Träger offering a module in a Stadtbezirk, free capacity first",
    )
    async def suggestions(
        runtime: RuntimeDep,
        ctx: ContextDep,
        caller: CallerDep,
        bezirk: Annotated[str, Query(description="The family's Stadtbezirk.")],
        module: Annotated[str, Query(description="The wished-for module.")],
    ) -> list[TraegerPublic]:
        if bezirk not in runtime.city.bezirk_slugs:
            raise _refuse(422, "bezirk", f"unknown Stadtbezirk {bezirk}")
        if module not in runtime.city.module_slugs:
            raise _refuse(422, "module", f"unknown module {module}")
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            used = await ops.usage_this_month(session, ctx, now)
            rows = {r.slug: r for r in (await session.execute(select(CatalogueTraeger))).scalars()}
        offers = [ops.offer_of(r, used.get(s, 0)) for s, r in rows.items()]
        ranked = domain.suggest(offers, bezirk=bezirk, module=module)
        return [_traeger_public(rows[o.traeger], o.used_this_month) for o in ranked]

    return router


def referrals_router() -> APIRouter:
    router = APIRouter(tags=["referrals"])

    @router.post(
        "/referrals",
        status_code=201,
        response_model=ReferralPublic,
        summary="Refer a family to a Träger's module",
        responses={
            409: {"description": "Consent missing, no capacity, or already referred"},
            422: {"description": "Unknown Träger or module, module not offered in the Bezirk"},
            503: {"description": "The keyring is unavailable; try again"},
        },
    )
    async def create(
        body: ReferralCreate,
        request: Request,
        runtime: RuntimeDep,
        ctx: ContextDep,
        caller: CallerDep,
    ) -> ReferralPublic:
        now = runtime.clock()
        try:
            async with runtime.db.transaction() as session:
                case = await session.get(Case, body.case_id)
                scope = (
                    None
                    if case is None
                    else CaseScope(
                        bezirk=case.bezirk,
                        case_id=case.case_id,
                        registered_by_clinic=case.clinic_id,
                    )
                )
                ensure_may_access_case(caller, scope, personal_data=True)
                # The waiting wish this referral settles, locked before the Träger rows
                # (the placement job's lock order), so that the job does not place it too.
                await _lock_open_wishes(session, body.handover_id, body.visit_id)
                referral = await ops.create_referral(
                    session,
                    ctx,
                    ops.NewReferral(
                        case_id=body.case_id,
                        module=body.module,
                        origin=ReferralOrigin(body.origin),
                        requested_by_role=ops.event_role(caller.role),
                        traeger=body.traeger,
                        consent_ref=body.consent_ref,
                        urgent=body.urgent,
                        handover_id=body.handover_id,
                        visit_id=body.visit_id,
                        disclose=body.disclose,
                        requested_by_subject=caller.subject,
                    ),
                    now,
                    caller=caller,
                    path="/referrals",
                )
                await _mark_wishes_placed(session, referral, now)
        except ops.Unavailable as exc:
            raise HTTPException(503, detail=f"try again later: {exc}") from None
        return _public(referral, caller)

    @router.get(
        "/referrals/{referral_id}", response_model=ReferralDetail, summary="Follow a referral"
    )
    async def read(referral_id: str, runtime: RuntimeDep, caller: CallerDep) -> ReferralDetail:
        async with runtime.db.transaction() as session:
            referral = await session.get(Referral, referral_id)
            scope = None if referral is None else await _scope(session, referral)
            ensure_may_access_case(caller, scope, personal_data=False)
            assert referral is not None
            steps = (
                await session.execute(
                    select(ReferralStep)
                    .where(col(ReferralStep.referral_id) == referral_id)
                    .order_by(col(ReferralStep.id))
                )
            ).scalars()
            history = [
                StepPublic(
                    step=s.step,
                    actor_role=s.actor_role,
                    occurred_at=s.occurred_at,
                    recorded_at=s.recorded_at,
                )
                for s in steps
            ]
        return ReferralDetail(**_public(referral, caller).model_dump(), steps=history)

    @router.post(
        "/referrals/{referral_id}/steps",
        response_model=ReferralPublic,
        summary="Take a lifecycle step (Träger: answer; requesting side: cancel)",
        responses={409: {"description": "Illegal step, or not the caller's to take"}},
    )
    async def step(
        referral_id: str,
        body: StepRequest,
        runtime: RuntimeDep,
        ctx: ContextDep,
        caller: CallerDep,
    ) -> ReferralPublic:
        if body.step is Step.REJECTED and body.rejection_reason is None:
            raise _refuse(422, "rejection_reason", "required for the step rejected")
        if body.step is Step.CANCELLED and body.cancel_reason is None:
            raise _refuse(422, "cancel_reason", "required for the step cancelled")
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            referral = await session.get(Referral, referral_id)
            scope = None if referral is None else await _scope(session, referral)
            ensure_may_access_case(caller, scope, personal_data=False)
            assert referral is not None
            try:
                # A conditional update: of concurrent conflicting steps one wins, the
                # others are refused here (409) with the status they found.
                await ops.take_step_now(
                    session,
                    ctx,
                    referral,
                    body.step,
                    actor=ops.actor_of(caller.role),
                    role=ops.event_role(caller.role),
                    occurred_at=now,
                    now=now,
                    details=StepDetails(
                        rejection_reason=body.rejection_reason,
                        reason_code=body.reason_code,
                        cancel_reason=body.cancel_reason,
                        first_contact_planned_for=body.first_contact_planned_for,
                        outcome=body.outcome,
                    ),
                )
            except domain.TransitionRefused as exc:
                raise _refuse(409, "step", exc.reason) from None
        return _public(referral, caller)

    @router.get(
        "/referrals/{referral_id}/disclosure-key",
        response_model=DisclosureKey,
        summary="Key to open the referral's sealed disclosure (addressed Träger only)",
        description="The key of this referral's disclosure, bound to this referral and this "
        "Träger: it opens the referral's `disclosure` / `disclosure_jwe` and no other block "
        "of the family. Released only to the Träger the referral is addressed to, while the "
        "referral is running and the family's consent stands (409 otherwise), and recorded "
        "in the audit log here and in intake's keyring. After the family's erasure there is "
        "no key any more (410).",
    )
    async def disclosure_key(
        referral_id: str, runtime: RuntimeDep, ctx: ContextDep, caller: CallerDep
    ) -> DisclosureKey:
        async def releasable(session: AsyncSession) -> Referral:
            referral = await session.get(Referral, referral_id)
            scope = None if referral is None else await _scope(session, referral)
            ensure_may_access_case(caller, scope, personal_data=True)
            assert referral is not None
            if ReferralStatus(referral.status) not in domain.OPEN_STATUSES:
                raise _refuse(409, "referral_id", f"the referral is {referral.status}")
            if not referral.disclosed_fields or ctx.keyring is None:
                raise HTTPException(404, detail="this referral carries no disclosure")
            return referral

        async with runtime.db.transaction() as session:
            referral = await releasable(session)
            case_id = referral.case_id
            which = DisclosureFor(case_id, referral_id, referral.traeger, referral.consent_ref)
        # The keyring is another service: ask it outside any transaction, so that a slow
        # answer holds no lock here (on SQLite every transaction holds the write lock).
        assert ctx.keyring is not None
        try:
            kid, key = await ctx.keyring.disclosure_key(which)
        except KeyGone:
            raise HTTPException(410, detail="the family's data was erased") from None
        except KeyRefused as exc:
            raise _refuse(409, "consent_ref", str(exc)) from None
        except KeyringUnavailable as exc:
            raise HTTPException(503, detail=f"try again later: {exc}") from None
        async with runtime.db.transaction() as session:
            # Checked again with the release: cancelled or closed meanwhile means no key.
            await releasable(session)
            audit.record(
                session,
                service=runtime.service,
                caller=caller,
                action=audit.AuditAction.key_release,
                case_id=case_id,
                purpose=f"open the disclosure of referral {referral_id}",
                path="/referrals/{referral_id}/disclosure-key",
            )
        return DisclosureKey(referral_id=referral_id, kid=kid, key=encode_data_key(key))

    @router.get(
        "/cases/{case_id}/referrals",
        response_model=list[ReferralPublic],
        summary="Referrals of one family (a Träger sees only its own)",
    )
    async def of_case(case_id: str, runtime: RuntimeDep, caller: CallerDep) -> list[ReferralPublic]:
        async with runtime.db.transaction() as session:
            rows = list(
                (
                    await session.execute(
                        select(Referral)
                        .where(col(Referral.case_id) == case_id)
                        .order_by(col(Referral.requested_at))
                    )
                ).scalars()
            )
            case = await session.get(Case, case_id)
            scope = (
                None
                if case is None
                else CaseScope(
                    bezirk=case.bezirk,
                    case_id=case_id,
                    traeger=frozenset(r.traeger for r in rows),
                    registered_by_clinic=case.clinic_id,
                )
            )
            ensure_may_access_case(caller, scope, personal_data=False)
        if caller.role is Role.traeger:
            rows = [r for r in rows if r.traeger == caller.traeger]
        return [_public(r, caller) for r in rows]

    return router


async def _lock_open_wishes(
    session: AsyncSession, handover_id: str | None, visit_id: str | None
) -> None:
    for origin, source in (("handover", handover_id), ("visit", visit_id)):
        if source is not None:
            await session.execute(
                select(col(Wish.wish_id))
                .where(col(Wish.origin) == origin)
                .where(col(Wish.source_id) == source)
                .where(col(Wish.state) == "open")
                .with_for_update()
            )


async def _mark_wishes_placed(session: AsyncSession, referral: Referral, now: datetime) -> None:
    """A referral made by staff for a waiting handover or visit wish settles that wish."""
    for origin, source in (("handover", referral.handover_id), ("visit", referral.visit_id)):
        if source is None:
            continue
        wishes = await session.execute(
            select(Wish)
            .where(col(Wish.origin) == origin)
            .where(col(Wish.source_id) == source)
            .where(col(Wish.state) == "open")
        )
        for wish in wishes.scalars():
            wish.state = "placed"
            wish.problem = None
            wish.referral_id = referral.referral_id
            wish.updated_at = now
            session.add(wish)


def _status_clause(status: str) -> list[str]:
    if status == "open":
        return [s.value for s in domain.OPEN_STATUSES]
    if status == "all":
        return [s.value for s in ReferralStatus]
    return [status]


def overview_router() -> APIRouter:
    router = APIRouter(tags=["bezirke", "traeger"])

    @router.get(
        "/bezirke/{bezirk}/referrals",
        response_model=list[ReferralPublic],
        summary="A Stadtbezirk's referrals (default: the open ones)",
    )
    async def of_bezirk(
        bezirk: str,
        runtime: RuntimeDep,
        caller: CallerDep,
        status: Annotated[str, Query(description="open, all, or one status")] = "open",
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> list[ReferralPublic]:
        _ensure_bezirk(caller, bezirk)
        _check_status(status)
        async with runtime.db.transaction() as session:
            rows = (
                await session.execute(
                    select(Referral)
                    .where(col(Referral.bezirk) == bezirk)
                    .where(col(Referral.status).in_(_status_clause(status)))
                    .order_by(col(Referral.answer_due_by), col(Referral.requested_at))
                    .limit(limit)
                )
            ).scalars()
            return [_public(r, caller) for r in rows]

    @router.get(
        "/bezirke/{bezirk}/escalations",
        response_model=list[ReferralPublic],
        summary="A Stadtbezirk's escalated referrals (default: still waiting for an answer)",
    )
    async def escalations(
        bezirk: str,
        runtime: RuntimeDep,
        caller: CallerDep,
        open_only: Annotated[bool, Query(description="Only those still open.")] = True,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> list[ReferralPublic]:
        _ensure_bezirk(caller, bezirk)
        query = (
            select(Referral)
            .where(col(Referral.bezirk) == bezirk)
            .where(col(Referral.escalated_at).is_not(None))
            .order_by(col(Referral.escalated_at))
            .limit(limit)
        )
        if open_only:
            query = query.where(col(Referral.status).in_(_status_clause("open")))
        async with runtime.db.transaction() as session:
            return [_public(r, caller) for r in (await session.execute(query)).scalars()]

    @router.get(
        "/bezirke/{bezirk}/wishes",
        response_model=list[WishPublic],
        summary="Handovers and visit wishes not placed yet, with the reason",
    )
    async def wishes(
        bezirk: str,
        runtime: RuntimeDep,
        caller: CallerDep,
        state: Annotated[Literal["open", "placed", "dropped"], Query()] = "open",
    ) -> list[WishPublic]:
        _ensure_bezirk(caller, bezirk)
        async with runtime.db.transaction() as session:
            rows = (
                await session.execute(
                    select(Wish)
                    .where(col(Wish.bezirk) == bezirk)
                    .where(col(Wish.state) == state)
                    .order_by(col(Wish.created_at))
                )
            ).scalars()
            return [
                WishPublic(
                    wish_id=w.wish_id,
                    origin=w.origin,
                    source_id=w.source_id,
                    case_id=w.case_id,
                    bezirk=w.bezirk,
                    module=w.module,
                    traeger=w.traeger,
                    urgent=w.urgent,
                    state=w.state,
                    problem=w.problem,
                    referral_id=w.referral_id,
                    created_at=w.created_at,
                )
                for w in rows
            ]

    @router.get(
        "/traeger/{slug}/referrals",
        response_model=list[ReferralPublic],
        summary="The referrals addressed to one Träger (that Träger only)",
    )
    async def of_traeger(
        slug: str,
        runtime: RuntimeDep,
        caller: CallerDep,
        status: Annotated[str, Query(description="open, all, or one status")] = "open",
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> list[ReferralPublic]:
        if caller.role is Role.traeger and caller.traeger != slug:
            raise AccessDenied("another Träger's referrals")
        _check_status(status)
        async with runtime.db.transaction() as session:
            rows = (
                await session.execute(
                    select(Referral)
                    .where(col(Referral.traeger) == slug)
                    .where(col(Referral.status).in_(_status_clause(status)))
                    .order_by(col(Referral.urgent).desc(), col(Referral.requested_at))
                    .limit(limit)
                )
            ).scalars()
            return [_public(r, caller) for r in rows]

    return router


def _check_status(status: str) -> None:
    if status not in ("open", "all", *[s.value for s in ReferralStatus]):
        raise _refuse(
            422,
            "status",
            f"unknown status {status}: use open, all or one of "
            f"{', '.join(s.value for s in ReferralStatus)}",
        )
