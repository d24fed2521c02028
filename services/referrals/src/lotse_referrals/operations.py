"""What the service does with its tables, shared by the HTTP routes, the event handlers and
the periodic jobs: create a referral behind the catalogue and consent gates, take a step
of its lifecycle, place waiting wishes, escalate overdue answers.

Every function works inside the caller's transaction and adds its events to the outbox in
that same transaction, so a refusal (an exception) leaves nothing stored and nothing sent.

Concurrency (several requests at once, several replicas on one database): a new referral
locks the catalogue rows of the Träger it may go to before it counts their places (so the
capacity check and the insert are one step), partial unique indexes allow one running
referral per family and module and per handover, the placement job claims a wish with
``FOR UPDATE SKIP LOCKED``, and a referral's row version makes every lifecycle step a
conditional update. The lock order is always wish, then Träger (by slug), then referral, so
that these locks cannot deadlock each other. On SQLite every transaction holds the write
lock from its start (``BEGIN IMMEDIATE``), which serialises all of this anyway.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from lotse_contracts.city import Municipality
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.referrals import (
    CompletionOutcome,
    PersonalField,
    ReferralAccepted,
    ReferralCancelled,
    ReferralCancelReason,
    ReferralCompleted,
    ReferralEscalated,
    ReferralFirstContact,
    ReferralInProgress,
    ReferralOrigin,
    ReferralReceived,
    ReferralRejected,
    ReferralRequested,
    ReferralStatus,
    RejectionReason,
)
from lotse_runtime import audit
from lotse_runtime.db import Database
from lotse_runtime.identity import Caller
from lotse_runtime.identity import Role as CallerRole
from lotse_runtime.outbox import Outbox
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import col

from lotse_referrals import domain
from lotse_referrals.domain import Actor, ConsentView, Offer, Step, WorkingCalendar
from lotse_referrals.keyring import (
    DisclosureFor,
    KeyGone,
    KeyRefused,
    Keyring,
    KeyringUnavailable,
    SealedDisclosure,
)
from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import (
    ONE_OPEN_PER_HANDOVER,
    Case,
    CatalogueTraeger,
    ConsentRecord,
    Referral,
    ReferralStep,
    Wish,
)

_log = logging.getLogger(__name__)

SERVICE = "referrals"


class Refused(Exception):
    """A request the domain refuses: HTTP ``status`` (409 or 422), the field, the reason."""

    def __init__(self, status: int, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason


class Unavailable(Exception):
    """A dependency (the keyring) did not answer; the same request may work later."""


@dataclass
class Context:
    """What the operations need besides a session: settings, city, calendar, keyring."""

    settings: ReferralsSettings
    city: Municipality
    calendar: WorkingCalendar
    keyring: Keyring | None
    db: Database
    outbox: Outbox

    def today(self, now: datetime) -> date:
        return domain.local_date(now, self.city.zone())

    def month_start_utc(self, now: datetime) -> datetime:
        first = domain.month_start(self.today(now))
        return datetime.combine(first, time(0), tzinfo=self.city.zone()).astimezone(UTC)


# --- roles --------------------------------------------------------------------------------

REQUESTER_ROLES = (
    CallerRole.babylotse,
    CallerRole.familienbuero,
    CallerRole.bezirksteam,
)


def event_role(role: CallerRole) -> EventRole:
    """The role as events name it (another Lotse service acts as ``system``)."""
    if role is CallerRole.service:
        return EventRole.SYSTEM
    return EventRole(role.value)


def actor_of(role: CallerRole) -> Actor:
    if role is CallerRole.traeger:
        return Actor.TRAEGER
    if role is CallerRole.service:
        return Actor.SYSTEM
    return Actor.REQUESTER


# --- catalogue ----------------------------------------------------------------------------


async def seed_catalogue(ctx: Context, now: datetime) -> int:
    """Bring the catalogue tables in line with the city configuration: new Träger are added,
    unedited ones follow the file, ones edited through the API keep their edits."""
    try:
        return await _seed_catalogue(ctx, now)
    except IntegrityError:
        # Another replica seeded the same rows at the same moment; its rows are as good.
        return await _seed_catalogue(ctx, now)


async def _seed_catalogue(ctx: Context, now: datetime) -> int:
    changed = 0
    async with ctx.db.transaction() as session:
        rows = {r.slug: r for r in (await session.execute(select(CatalogueTraeger))).scalars()}
        # In slug order, the order in which new referrals lock Träger rows (no deadlock).
        for traeger in sorted(ctx.city.traeger, key=lambda t: t.slug):
            row = rows.get(traeger.slug)
            if row is not None and row.edited:
                continue
            if row is None:
                row = CatalogueTraeger(
                    slug=traeger.slug,
                    name=traeger.name,
                    contact=traeger.contact,
                    modules=list(traeger.modules),
                    bezirke=list(traeger.bezirke),
                    capacity_per_month=traeger.capacity_per_month,
                    updated_at=now,
                )
                session.add(row)
                changed += 1
                continue
            wanted: dict[str, Any] = {
                "name": traeger.name,
                "contact": traeger.contact,
                "modules": list(traeger.modules),
                "bezirke": list(traeger.bezirke),
                "capacity_per_month": traeger.capacity_per_month,
            }
            if any(getattr(row, k) != v for k, v in wanted.items()):
                for key, value in wanted.items():
                    setattr(row, key, value)
                row.updated_at = now
                changed += 1
    return changed


async def usage_this_month(session: AsyncSession, ctx: Context, now: datetime) -> dict[str, int]:
    """Referrals per Träger requested this month (city time) that hold a place: all but the
    rejected and the cancelled ones."""
    query = (
        select(col(Referral.traeger), func.count())
        .where(col(Referral.requested_at) >= ctx.month_start_utc(now))
        .where(
            col(Referral.status).not_in(
                [ReferralStatus.REJECTED.value, ReferralStatus.CANCELLED.value]
            )
        )
        .group_by(Referral.traeger)
    )
    return {slug: int(n) for slug, n in (await session.execute(query)).all()}


def offer_of(row: CatalogueTraeger, used: int) -> Offer:
    return Offer(
        traeger=row.slug,
        name=row.name,
        modules=tuple(row.modules),
        bezirke=tuple(row.bezirke),
        capacity_per_month=row.capacity_per_month,
        used_this_month=used,
        active=row.active,
    )


async def load_offers(session: AsyncSession, ctx: Context, now: datetime) -> dict[str, Offer]:
    used = await usage_this_month(session, ctx, now)
    rows = (
        await session.execute(select(CatalogueTraeger).execution_options(populate_existing=True))
    ).scalars()
    return {r.slug: offer_of(r, used.get(r.slug, 0)) for r in rows}


async def lock_places(
    session: AsyncSession, *, traeger: str | None, module: str, bezirk: str
) -> list[str]:
    """Lock the catalogue rows of the Träger a new referral may go to (``traeger``, or every
    Träger offering ``module`` in ``bezirk``), in slug order, until the transaction ends.

    Whoever creates a referral holds these locks while it counts the places taken and
    inserts, so two requests for the last place of a Träger run one after the other and the
    second counts the first's referral (PostgreSQL, ``SELECT ... FOR UPDATE``; a statement
    after the lock sees everything committed before it). SQLite's transactions hold the
    database's write lock from their start, so nothing is needed there."""
    if traeger is not None:
        slugs = [traeger]
    else:
        rows = (await session.execute(select(CatalogueTraeger))).scalars()
        slugs = sorted(
            r.slug for r in rows if offer_of(r, 0).offers(module) and offer_of(r, 0).serves(bezirk)
        )
    if not slugs:
        return []
    locked = await session.execute(
        select(col(CatalogueTraeger.slug))
        .where(col(CatalogueTraeger.slug).in_(slugs))
        .order_by(col(CatalogueTraeger.slug))
        .with_for_update()
    )
    return list(locked.scalars())


# --- consents -----------------------------------------------------------------------------


def consent_view(row: ConsentRecord) -> ConsentView:
    return ConsentView(
        consent_id=row.consent_id,
        case_id=row.case_id,
        scope=ConsentScope(row.scope),
        traeger=row.traeger,
        purpose=row.purpose,
        state=ConsentState(row.state),
    )


async def consents_of(session: AsyncSession, case_id: str) -> list[ConsentView]:
    rows = (
        await session.execute(select(ConsentRecord).where(col(ConsentRecord.case_id) == case_id))
    ).scalars()
    return [consent_view(r) for r in rows]


async def record_consent(
    session: AsyncSession,
    *,
    consent_id: str,
    case_id: str,
    scope: ConsentScope,
    traeger: str | None,
    purpose: str | None,
    state: ConsentState,
    at: datetime,
) -> bool:
    """Store a consent or its change; False when the stored one is newer (stale event)."""
    row = await session.get(ConsentRecord, consent_id)
    if row is not None and row.changed_at > at:
        return False
    if row is None:
        row = ConsentRecord(
            consent_id=consent_id, case_id=case_id, changed_at=at, scope="", state=""
        )
        session.add(row)
    row.case_id = case_id
    row.scope = scope.value
    row.traeger = traeger
    row.purpose = purpose
    row.state = state.value
    row.changed_at = at
    return True


# --- creating a referral ------------------------------------------------------------------


@dataclass(frozen=True)
class NewReferral:
    """What a referral is created from (HTTP request, handover or visit outcome)."""

    case_id: str
    module: str
    origin: ReferralOrigin
    requested_by_role: EventRole
    traeger: str | None = None
    consent_ref: str | None = None
    urgent: bool = False
    handover_id: str | None = None
    visit_id: str | None = None
    disclose: Sequence[PersonalField] | None = None
    requested_by_subject: str | None = None


async def _disclosure(
    ctx: Context, which: DisclosureFor, wanted: Sequence[PersonalField] | None
) -> SealedDisclosure:
    """The consented subset of the family's personal data, sealed by intake's keyring under
    a key bound to this referral and its Träger. This service never holds a key of the
    family nor its data in clear; erasing the family in intake shreds the disclosure too."""
    try:
        fields = domain.disclosure_fields(
            ctx.settings.disclosed_fields, wanted, [f.value for f in PersonalField]
        )
    except ValueError as exc:
        raise Refused(422, "disclose", str(exc)) from None
    if ctx.keyring is None or not fields:
        return SealedDisclosure(kid=None, disclosed_fields=[])
    try:
        return await ctx.keyring.seal_disclosure(which, fields)
    except KeyGone:
        raise Refused(409, "case_id", "the family's data was erased") from None
    except KeyRefused as exc:
        raise Refused(409, "consent_ref", str(exc)) from None
    except KeyringUnavailable as exc:
        raise Unavailable(f"keyring: {exc}") from exc


async def _choose(
    session: AsyncSession, ctx: Context, case: Case, new: NewReferral, now: datetime
) -> tuple[Offer, ConsentView]:
    """The Träger and the consent a new referral rests on, or a refusal naming the field."""
    if new.module not in ctx.city.module_slugs:
        raise Refused(
            422,
            "module",
            f"unknown module {new.module} (known: {', '.join(ctx.city.module_slugs)})",
        )
    offers = await load_offers(session, ctx, now)
    consents = await consents_of(session, case.case_id)
    by_id = {c.consent_id: c for c in consents}
    if new.consent_ref is not None and new.consent_ref not in by_id:
        # Looked up anyway, so that the refusal can say "another case's consent".
        foreign = await session.get(ConsentRecord, new.consent_ref)
        if foreign is not None:
            by_id[foreign.consent_id] = consent_view(foreign)

    def consent_for(traeger: str) -> ConsentView | None:
        if new.consent_ref is not None:
            found = by_id.get(new.consent_ref)
            ok = domain.consent_problem(
                found, case_id=case.case_id, traeger=traeger, module=new.module
            )
            return found if ok is None else None
        covering = domain.covering_consents(
            consents, case_id=case.case_id, traeger=traeger, module=new.module
        )
        return covering[0] if covering else None

    if new.traeger is not None:
        offer = offers.get(new.traeger)
        problem = domain.offer_problem(
            offer, traeger=new.traeger, bezirk=case.bezirk, module=new.module
        )
        if problem is not None or offer is None:
            raise Refused(422, "traeger", problem or f"unknown Träger {new.traeger}")
        consent = consent_for(offer.traeger)
        if consent is None:
            raise Refused(409, "consent_ref", _consent_reason(new, by_id, case, offer.traeger))
        if offer.free_capacity <= 0:
            raise Refused(
                409,
                "traeger",
                f"Träger {offer.traeger} has no free capacity this month "
                f"(all {offer.capacity_per_month} places taken)",
            )
        return offer, consent

    candidates = domain.suggest(offers.values(), bezirk=case.bezirk, module=new.module)
    if not candidates:
        raise Refused(422, "module", f"no Träger offers {new.module} in Stadtbezirk {case.bezirk}")
    consented = {o.traeger: consent_for(o.traeger) for o in candidates}
    if not any(consented.values()):
        raise Refused(
            409,
            "consent_ref",
            "no consent of the family covers passing contact data for "
            f"{new.module} to any Träger offering it in {case.bezirk} "
            f"({', '.join(o.traeger for o in candidates)})",
        )
    chosen = domain.pick(candidates, lambda o: consented[o.traeger] is not None)
    if chosen is None:
        raise Refused(
            409,
            "traeger",
            f"no consented Träger offering {new.module} in {case.bezirk} has free capacity "
            "this month",
        )
    consent = consented[chosen.traeger]
    assert consent is not None
    return chosen, consent


def _consent_reason(
    new: NewReferral, by_id: dict[str, ConsentView], case: Case, traeger: str
) -> str:
    if new.consent_ref is None:
        return (
            f"no consent of the family covers passing contact data to {traeger} "
            f"for {new.module} (§ 65 SGB VIII)"
        )
    problem = domain.consent_problem(
        by_id.get(new.consent_ref), case_id=case.case_id, traeger=traeger, module=new.module
    )
    return f"consent {new.consent_ref}: {problem}"


async def create_referral(
    session: AsyncSession,
    ctx: Context,
    new: NewReferral,
    now: datetime,
    *,
    caller: Caller | None = None,
    path: str | None = None,
) -> Referral:
    """Create a referral behind the catalogue, capacity and consent gates and publish
    ``referral-requested``; raises :class:`Refused` or :class:`Unavailable`."""
    case = await session.get(Case, new.case_id)
    if case is None:
        raise Refused(409, "case_id", "no family registered under this case id")
    if case.erased_at is not None:
        raise Refused(409, "case_id", "the family's data was erased")
    # First the lock, then every check: what was committed while waiting for it counts.
    await lock_places(session, traeger=new.traeger, module=new.module, bezirk=case.bezirk)
    duplicate = (
        await session.execute(
            select(col(Referral.referral_id), col(Referral.traeger))
            .where(col(Referral.case_id) == case.case_id)
            .where(col(Referral.module) == new.module)
            .where(col(Referral.status).in_([s.value for s in domain.OPEN_STATUSES]))
        )
    ).first()
    if duplicate is not None:
        raise Refused(
            409,
            "module",
            f"referral {duplicate[0]} of this family to {duplicate[1]} for {new.module} "
            "is still open",
        )
    offer, consent = await _choose(session, ctx, case, new, now)
    referral_id = str(uuid.uuid4())
    sealed = await _disclosure(
        ctx,
        DisclosureFor(case.case_id, referral_id, offer.traeger, consent.consent_id),
        new.disclose,
    )
    fields = sealed.disclosed_fields
    due = domain.answer_due_by(
        ctx.today(now),
        urgent=new.urgent,
        days=ctx.settings.answer_working_days,
        urgent_days=ctx.settings.urgent_answer_working_days,
        calendar=ctx.calendar,
    )
    referral = Referral(
        referral_id=referral_id,
        case_id=case.case_id,
        bezirk=case.bezirk,
        traeger=offer.traeger,
        module=new.module,
        status=ReferralStatus.REQUESTED.value,
        origin=new.origin.value,
        consent_ref=consent.consent_id,
        requested_by_role=new.requested_by_role.value,
        requested_by_subject=new.requested_by_subject,
        handover_id=new.handover_id,
        visit_id=new.visit_id,
        urgent=new.urgent,
        disclosed_fields=[f.value for f in fields],
        requested_at=now,
        answer_due_by=due,
        updated_at=now,
    )
    await _insert_running(session, referral)
    _add_step(session, referral, "requested", new.requested_by_role.value, now, now)
    ctx.outbox.add(
        session,
        ReferralRequested(
            **_ids(referral),
            occurred_at=now,
            consent_ref=consent.consent_id,
            requested_by_role=new.requested_by_role,
            origin=new.origin,
            handover_id=new.handover_id,
            urgent=new.urgent,
            answer_due_by=due,
            disclosed_fields=fields,
            disclosure=sealed.disclosure,
            disclosure_jwe=sealed.disclosure_jwe,
        ),
    )
    audit.record(
        session,
        service=SERVICE,
        caller=caller,
        action=audit.AuditAction.create,
        case_id=case.case_id,
        purpose=f"referral to {offer.traeger} for {new.module}"
        + (f", disclosing {', '.join(f.value for f in fields)}" if fields else ""),
        path=path or f"consumer:{new.origin.value}",
    )
    return referral


async def _insert_running(session: AsyncSession, referral: Referral) -> None:
    """Insert a new referral; a concurrent one for the same family and module (or the same
    handover) that committed first makes this a refusal naming the field, not an error."""
    # What the transaction did before is written first, outside the savepoint: a refusal
    # here rolls back the referral only, never the consumer's other changes.
    await session.flush()
    try:
        async with session.begin_nested():
            session.add(referral)
            await session.flush()
    except IntegrityError as exc:
        message = str(exc.orig)
        if ONE_OPEN_PER_HANDOVER in message or "referrals_referral.handover_id" in message:
            raise Refused(
                409,
                "handover_id",
                f"handover {referral.handover_id} already has a running referral "
                "(created at the same moment)",
            ) from None
        if "uq_referrals_referral_open_case_module" in message or (
            "referrals_referral.case_id" in message and "referrals_referral.module" in message
        ):
            raise Refused(
                409,
                "module",
                f"another referral of this family for {referral.module} is still open "
                "(created at the same moment)",
            ) from None
        raise


def _ids(referral: Referral) -> dict[str, str]:
    return {
        "referral_id": referral.referral_id,
        "case_id": referral.case_id,
        "bezirk": referral.bezirk,
        "traeger": referral.traeger,
        "module": referral.module,
    }


def _add_step(
    session: AsyncSession,
    referral: Referral,
    step: str,
    role: str,
    occurred_at: datetime,
    now: datetime,
    event_id: str | None = None,
) -> None:
    session.add(
        ReferralStep(
            referral_id=referral.referral_id,
            step=step,
            actor_role=role,
            occurred_at=occurred_at,
            recorded_at=now,
            event_id=event_id,
        )
    )


# --- lifecycle steps ----------------------------------------------------------------------

#: How often a step is tried again on a referral that changed since it was read, while the
#: step is still legal from the new status (e.g. accepted after a concurrent received).
STEP_ATTEMPTS = 3


@dataclass(frozen=True)
class StepDetails:
    """What a step may carry besides the step itself."""

    rejection_reason: RejectionReason | None = None
    reason_code: str | None = None
    cancel_reason: ReferralCancelReason | None = None
    first_contact_planned_for: date | None = None
    outcome: CompletionOutcome | None = None


def take_step(
    session: AsyncSession,
    ctx: Context,
    referral: Referral,
    step: Step,
    *,
    actor: Actor,
    role: EventRole,
    occurred_at: datetime,
    now: datetime,
    details: StepDetails = StepDetails(),
    source_event_id: str | None = None,
) -> EventModel:
    """Apply one lifecycle step and publish its event; raises ``TransitionRefused``."""
    status = ReferralStatus(referral.status)
    new_status = domain.apply_step(
        status, step, actor, first_contact_confirmed=referral.first_contact_at is not None
    )
    if step is Step.REJECTED and details.rejection_reason is None:
        raise domain.TransitionRefused("a rejection needs a reason")
    if step is Step.CANCELLED and details.cancel_reason is None:
        raise domain.TransitionRefused("a cancellation needs a reason")
    ids = _ids(referral)
    event: EventModel
    match step:
        case Step.RECEIVED:
            referral.received_at = occurred_at
            event = ReferralReceived(**ids, occurred_at=occurred_at)
        case Step.ACCEPTED:
            referral.accepted_at = occurred_at
            referral.first_contact_planned_for = details.first_contact_planned_for
            event = ReferralAccepted(
                **ids,
                occurred_at=occurred_at,
                first_contact_planned_for=details.first_contact_planned_for,
            )
        case Step.REJECTED:
            assert details.rejection_reason is not None
            referral.rejected_at = occurred_at
            referral.rejection_reason = details.rejection_reason.value
            referral.rejection_code = details.reason_code
            event = ReferralRejected(
                **ids,
                occurred_at=occurred_at,
                reason=details.rejection_reason,
                reason_code=details.reason_code,
            )
        case Step.IN_PROGRESS:
            referral.in_progress_at = occurred_at
            event = ReferralInProgress(**ids, occurred_at=occurred_at)
        case Step.FIRST_CONTACT:
            zone = ctx.city.zone()
            days = max(
                0,
                (
                    domain.local_date(occurred_at, zone)
                    - domain.local_date(referral.requested_at, zone)
                ).days,
            )
            referral.first_contact_at = occurred_at
            referral.days_to_first_contact = days
            event = ReferralFirstContact(**ids, occurred_at=occurred_at, days_since_requested=days)
        case Step.COMPLETED:
            referral.completed_at = occurred_at
            referral.completion_outcome = details.outcome.value if details.outcome else None
            event = ReferralCompleted(**ids, occurred_at=occurred_at, outcome=details.outcome)
        case Step.CANCELLED:
            assert details.cancel_reason is not None
            referral.cancelled_at = occurred_at
            referral.cancel_reason = details.cancel_reason.value
            referral.cancelled_by_role = role.value
            event = ReferralCancelled(
                **ids,
                occurred_at=occurred_at,
                reason=details.cancel_reason,
                reason_code=details.reason_code,
                cancelled_by_role=role,
            )
    referral.status = new_status.value
    referral.updated_at = now
    session.add(referral)
    _add_step(session, referral, step.value, role.value, occurred_at, now, source_event_id)
    ctx.outbox.add(session, event)
    return event


async def take_step_now(
    session: AsyncSession,
    ctx: Context,
    referral: Referral,
    step: Step,
    **kwargs: Any,
) -> EventModel:
    """:func:`take_step`, written at once as a conditional update: only if the referral is
    still at the version it was read in (its row version, see ``tables.Referral``).

    When a concurrent step committed first, the referral is read again and the step judged
    from its new status: still legal, it is applied to that; otherwise it is refused
    (``TransitionRefused`` naming the status) and leaves nothing behind, neither a change
    nor an event. So of two conflicting answers (accepted and rejected) exactly one wins."""
    await session.flush()  # the savepoint below holds this step's changes only
    for attempt in range(1, STEP_ATTEMPTS + 1):
        try:
            async with session.begin_nested():
                event = take_step(session, ctx, referral, step, **kwargs)
                await session.flush()
            return event
        except StaleDataError:
            # The savepoint is gone with the step's row, event and outbox copies; read the
            # referral as the winner committed it.
            await session.refresh(referral)
            if attempt == STEP_ATTEMPTS:
                raise domain.TransitionRefused(
                    f"the referral kept changing while {step.value} was taken "
                    f"(now {referral.status}); try again"
                ) from None
    raise AssertionError("unreachable")


async def cancel_open(
    session: AsyncSession,
    ctx: Context,
    *,
    case_id: str,
    reason: ReferralCancelReason,
    now: datetime,
    consent_id: str | None = None,
) -> list[str]:
    """Cancel the case's open referrals (only those resting on ``consent_id`` if given) as
    the system; the Träger learns it from ``referral-cancelled`` on its feed."""
    query = (
        select(Referral)
        .where(col(Referral.case_id) == case_id)
        .where(col(Referral.status).in_([s.value for s in domain.OPEN_STATUSES]))
    )
    if consent_id is not None:
        query = query.where(col(Referral.consent_ref) == consent_id)
    cancelled = []
    for referral in (await session.execute(query)).scalars():
        take_step(
            session,
            ctx,
            referral,
            Step.CANCELLED,
            actor=Actor.SYSTEM,
            role=EventRole.SYSTEM,
            occurred_at=now,
            now=now,
            details=StepDetails(cancel_reason=reason),
        )
        cancelled.append(referral.referral_id)
    return cancelled


# --- wishes (handovers and visit outcomes waiting for a referral) -------------------------


async def place(session: AsyncSession, ctx: Context, wish: Wish, now: datetime) -> bool:
    """Try to turn an open wish into a referral; records why not when it cannot (yet)."""
    new = NewReferral(
        case_id=wish.case_id,
        module=wish.module,
        origin=ReferralOrigin(wish.origin),
        requested_by_role=EventRole(wish.requested_by_role),
        traeger=wish.traeger,
        consent_ref=wish.consent_ref,
        urgent=wish.urgent,
        handover_id=wish.source_id if wish.origin == ReferralOrigin.HANDOVER.value else None,
        visit_id=wish.source_id if wish.origin == ReferralOrigin.VISIT.value else None,
    )
    try:
        # create_referral checks everything before it writes, so a refusal leaves no trace.
        referral = await create_referral(session, ctx, new, now)
    except Refused as exc:
        wish.problem = f"{exc.field}: {exc.reason}"
        wish.updated_at = now
        session.add(wish)
        return False
    except Unavailable as exc:
        wish.problem = f"waiting for the keyring ({exc})"
        wish.updated_at = now
        session.add(wish)
        return False
    wish.state = "placed"
    wish.problem = None
    wish.referral_id = referral.referral_id
    wish.updated_at = now
    session.add(wish)
    return True


async def place_open_wishes(
    session: AsyncSession, ctx: Context, now: datetime, *, case_id: str | None = None
) -> int:
    """Place the open wishes (of one case): locked first (``FOR UPDATE``), so a placement
    job on another replica can neither place them at the same time nor be overtaken; one
    it is placing right now is waited for and then, no longer open, left out."""
    query = (
        select(Wish)
        .where(col(Wish.state) == "open")
        .order_by(col(Wish.created_at), col(Wish.wish_id))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if case_id is not None:
        query = query.where(col(Wish.case_id) == case_id)
    placed = 0
    for wish in list((await session.execute(query)).scalars()):
        if await place(session, ctx, wish, now):
            placed += 1
    return placed


async def place_waiting_wishes(ctx: Context, now: datetime) -> int:
    """The placement job: try every open wish again, each in a transaction of its own, so
    that the keyring calls of a long list hold no lock across the whole pass."""
    async with ctx.db.transaction() as session:
        waiting = list(
            (
                await session.execute(
                    select(col(Wish.wish_id))
                    .where(col(Wish.state) == "open")
                    .order_by(col(Wish.created_at))
                )
            ).scalars()
        )
    placed = 0
    for wish_id in waiting:
        async with ctx.db.transaction() as session:
            # The claim: the wish, still open, locked by this transaction. One that another
            # replica's job or a consumer holds right now is skipped (it is being placed);
            # one placed or dropped meanwhile is no longer found.
            wish = (
                await session.execute(
                    select(Wish)
                    .where(col(Wish.wish_id) == wish_id)
                    .where(col(Wish.state) == "open")
                    .with_for_update(skip_locked=True)
                )
            ).scalar_one_or_none()
            if wish is not None and await place(session, ctx, wish, now):
                placed += 1
    return placed


# --- escalation ---------------------------------------------------------------------------


async def escalate_overdue(ctx: Context, now: datetime) -> list[str]:
    """Escalate every referral still waiting for the Träger's decision after its last day
    for an answer; each exactly once, also with several replicas running this job."""
    today = ctx.today(now)
    async with ctx.db.transaction() as session:
        due = list(
            (
                await session.execute(
                    select(col(Referral.referral_id))
                    .where(col(Referral.status).in_([s.value for s in domain.AWAITING_ANSWER]))
                    .where(col(Referral.escalated_at).is_(None))
                    .where(col(Referral.answer_due_by) < today)
                    .order_by(col(Referral.requested_at))
                )
            ).scalars()
        )
    escalated = []
    for referral_id in due:
        async with ctx.db.transaction() as session:
            # The conditional update is the claim: a concurrent run updates nothing.
            claimed = await session.execute(
                update(Referral)
                .where(col(Referral.referral_id) == referral_id)
                .where(col(Referral.escalated_at).is_(None))
                .where(col(Referral.status).in_([s.value for s in domain.AWAITING_ANSWER]))
                .where(col(Referral.answer_due_by) < today)
                .values(escalated_at=now, updated_at=now)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                continue
            referral = await session.get(Referral, referral_id)
            assert referral is not None
            await session.refresh(referral)
            status = ReferralStatus(referral.status)
            if not domain.escalation_due(
                status, referral.answer_due_by, today, already_escalated=False
            ):
                continue
            # Whole working days gone by without the answer: up to yesterday, since today
            # has only begun when the job escalates in the early morning.
            days = max(
                1,
                ctx.calendar.working_days_between(
                    domain.local_date(referral.requested_at, ctx.city.zone()),
                    today - timedelta(days=1),
                ),
            )
            referral.working_days_at_escalation = days
            _add_step(session, referral, "escalated", EventRole.SYSTEM.value, now, now)
            ctx.outbox.add(
                session,
                ReferralEscalated(
                    **_ids(referral),
                    occurred_at=now,
                    working_days_without_answer=days,
                    last_status=status,
                ),
            )
            escalated.append(referral_id)
    if escalated:
        _log.info("referrals escalated", extra={"count": len(escalated)})
    return escalated
