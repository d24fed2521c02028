"""The referrals' use cases, one function each, in the shape load → decide (domain.py) →
save and publish: create a referral behind the catalogue and consent gates, take a step of
its lifecycle, release the key of its disclosure, follow referrals, place waiting wishes,
escalate overdue answers. Shared by the HTTP routes (api.py), the event handlers
(consumers.py) and the periodic jobs; the offer catalogue's own use cases are in
catalogue.py.

A use case knows nothing of HTTP: it refuses with :class:`~lotse_runtime.refusal.Refusal`
(422) or :class:`~lotse_runtime.refusal.Conflict` (409), a keyring that does not answer is
:class:`~lotse_runtime.refusal.Unavailable` (503), and the runtime's app factory answers
each in the platform's one shape. Those called with a session work inside the caller's
transaction and add their events to the outbox in that same transaction, so a refusal (an
exception) leaves nothing stored and nothing sent; those called without one open their own.

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

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import partial
from typing import Any

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
    WishEscalated,
    WishWaitingFor,
)
from lotse_runtime import audit
from lotse_runtime.consumer import FollowUp
from lotse_runtime.db import add_at_commit, on_postgres, one_of, transient_error
from lotse_runtime.identity import AccessDenied, Caller, CaseScope, ensure_may_access_case
from lotse_runtime.identity import Role as CallerRole
from lotse_runtime.identity import event_role as event_role_of
from lotse_runtime.refusal import Conflict, Refusal, Unavailable
from sqlalchemy import Select, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import col

from lotse_referrals import domain
from lotse_referrals.catalogue import (
    Listing,
    Reconciled,
    city_file_text,
    fingerprint,
    load_offers,
    lock_places,
    reconcile_with_file,
    retired_traeger_query,
    update_traeger,
)
from lotse_referrals.context import SERVICE, Context
from lotse_referrals.domain import Actor, ConsentView, Offer, Step
from lotse_referrals.keyring import (
    DisclosureFor,
    KeyGone,
    KeyRefused,
    KeyringUnavailable,
    SealedDisclosure,
)
from lotse_referrals.tables import (
    ONE_OPEN_PER_HANDOVER,
    Case,
    ConsentRecord,
    Referral,
    ReferralStep,
    Wish,
)

__all__ = ["SERVICE", "Context"]  # re-exported: the context is where every use case starts

_log = logging.getLogger(__name__)


# --- roles --------------------------------------------------------------------------------

REQUESTER_ROLES = (
    CallerRole.babylotse,
    CallerRole.familienbuero,
    CallerRole.bezirksteam,
)


def actor_of(role: CallerRole) -> Actor:
    if role is CallerRole.traeger:
        return Actor.TRAEGER
    if role is CallerRole.service:
        return Actor.SYSTEM
    return Actor.REQUESTER


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


async def stored_consents(
    session: AsyncSession, consent_ids: Collection[str]
) -> dict[str, ConsentRecord]:
    """The stored consents among ``consent_ids``, read in one query (a get each cost a
    statement per consent)."""
    if not consent_ids:
        return {}
    rows = await session.execute(_stored_consents(on_postgres(session)), {"ids": list(consent_ids)})
    return {row.consent_id: row for row in rows.scalars()}


@functools.cache
def _stored_consents(postgres: bool) -> Select[ConsentRecord]:
    """Built once per dialect: every family's registration asks it."""
    return select(ConsentRecord).where(
        one_of(col(ConsentRecord.consent_id), "ids", postgres=postgres)
    )


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
    stored: dict[str, ConsentRecord] | None = None,
) -> bool:
    """Store a consent or its change; False when the stored one is newer (stale event).

    ``stored``: the consents already read (``stored_consents``), instead of a get each."""
    if stored is None:
        row = await session.get(ConsentRecord, consent_id)
    else:
        row = stored.get(consent_id)
    if row is not None and row.changed_at > at:
        return False
    if row is None:
        row = ConsentRecord(
            consent_id=consent_id, case_id=case_id, changed_at=at, scope="", state=""
        )
        session.add(row)
        if stored is not None:
            stored[consent_id] = row  # an event naming it twice updates the one row
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

    @classmethod
    def asked_by(cls, caller: Caller, fields: Mapping[str, Any]) -> NewReferral:
        """A referral a person asks for (the fields of the request), in the caller's role."""
        return cls(
            **{**fields, "origin": ReferralOrigin(fields["origin"])},
            requested_by_role=event_role_of(caller.role),
            requested_by_subject=caller.subject,
        )


def _disclosed_fields(ctx: Context, wanted: Sequence[PersonalField] | None) -> list[PersonalField]:
    """The fields a referral discloses: those asked for (or the configured ones) that the
    service may pass on; a refusal naming ``disclose`` for any it may not."""
    try:
        return domain.disclosure_fields(
            ctx.settings.disclosed_fields, wanted, [f.value for f in PersonalField]
        )
    except ValueError as exc:
        raise Refusal("disclose", str(exc)) from None


async def _disclosure(
    ctx: Context, which: DisclosureFor, fields: Sequence[PersonalField]
) -> SealedDisclosure:
    """The consented subset of the family's personal data, sealed by intake's keyring under
    a key bound to this referral and its Träger. This service never holds a key of the
    family nor its data in clear; erasing the family in intake shreds the disclosure too."""
    if ctx.keyring is None or not fields:
        return SealedDisclosure(kid=None, disclosed_fields=[])
    try:
        return await ctx.keyring.seal_disclosure(which, fields)
    except KeyGone:
        raise Conflict("case_id", "the family's data was erased") from None
    except KeyRefused as exc:
        raise Conflict("consent_ref", str(exc)) from None
    except KeyringUnavailable as exc:
        raise Unavailable(f"keyring: {exc}") from exc


@dataclass(frozen=True)
class SealedAhead:
    """A disclosure intake was asked to seal before the transaction that creates its
    referral (see :func:`place_sealed`): for which referral id, Träger and consent, with
    which fields, and what intake answered (the sealed disclosure, or why not)."""

    which: DisclosureFor
    fields: tuple[PersonalField, ...]
    answer: SealedDisclosure | Refusal | Unavailable

    def fits(self, which: DisclosureFor, fields: Sequence[PersonalField]) -> bool:
        """Whether it was sealed for this case, Träger, consent and these fields (the
        referral id is the one it was sealed for)."""
        ahead = self.which
        return (ahead.case_id, ahead.traeger, ahead.consent_id, self.fields) == (
            which.case_id,
            which.traeger,
            which.consent_id,
            tuple(fields),
        )

    def result(self) -> SealedDisclosure:
        if isinstance(self.answer, SealedDisclosure):
            return self.answer
        raise self.answer


@dataclass(frozen=True)
class _Consents:
    """The family's consents as a new referral asks for them: the one it names (looked up
    even when it is another case's, so that the refusal can say so) or any covering one."""

    new: NewReferral
    case: Case
    all: list[ConsentView]
    by_id: dict[str, ConsentView]

    @classmethod
    async def load(cls, session: AsyncSession, case: Case, new: NewReferral) -> _Consents:
        consents = await consents_of(session, case.case_id)
        by_id = {c.consent_id: c for c in consents}
        if new.consent_ref is not None and new.consent_ref not in by_id:
            foreign = await session.get(ConsentRecord, new.consent_ref)
            if foreign is not None:
                by_id[foreign.consent_id] = consent_view(foreign)
        return cls(new, case, consents, by_id)

    def covering(self, traeger: str) -> ConsentView | None:
        """The consent that lets this referral go to ``traeger``, if any."""
        case_id, module = self.case.case_id, self.new.module
        if self.new.consent_ref is not None:
            found = self.by_id.get(self.new.consent_ref)
            problem = domain.consent_problem(found, case_id=case_id, traeger=traeger, module=module)
            return found if problem is None else None
        covering = domain.covering_consents(
            self.all, case_id=case_id, traeger=traeger, module=module
        )
        return covering[0] if covering else None

    def missing(self, traeger: str) -> str:
        """Why no consent lets this referral go to ``traeger``."""
        new = self.new
        if new.consent_ref is None:
            return (
                f"no consent of the family covers passing contact data to {traeger} "
                f"for {new.module} (§ 65 SGB VIII)"
            )
        problem = domain.consent_problem(
            self.by_id.get(new.consent_ref),
            case_id=self.case.case_id,
            traeger=traeger,
            module=new.module,
        )
        return f"consent {new.consent_ref}: {problem}"


async def _choose(
    session: AsyncSession, ctx: Context, case: Case, new: NewReferral, now: datetime
) -> tuple[Offer, ConsentView]:
    """The Träger and the consent a new referral rests on, or a refusal naming the field."""
    if new.module not in ctx.city.module_slugs:
        raise Refusal(
            "module", f"unknown module {new.module} (known: {', '.join(ctx.city.module_slugs)})"
        )
    offers = await load_offers(session, ctx, now)
    consents = await _Consents.load(session, case, new)
    if new.traeger is not None:
        return _named(offers.get(new.traeger), new.traeger, case, consents)
    return _suggested(list(offers.values()), case, consents)


def _named(
    offer: Offer | None, traeger: str, case: Case, consents: _Consents
) -> tuple[Offer, ConsentView]:
    """The Träger the requester named: it must offer the module there, be consented to and
    have a free place."""
    module = consents.new.module
    problem = domain.offer_problem(offer, traeger=traeger, bezirk=case.bezirk, module=module)
    if problem is not None or offer is None:
        raise Refusal("traeger", problem or f"unknown Träger {traeger}")
    consent = consents.covering(offer.traeger)
    if consent is None:
        raise Conflict("consent_ref", consents.missing(offer.traeger))
    if offer.free_capacity <= 0:
        raise Conflict(
            "traeger",
            f"Träger {offer.traeger} has no free capacity this month "
            f"(all {offer.capacity_per_month} places taken)",
        )
    return offer, consent


def _suggested(offers: list[Offer], case: Case, consents: _Consents) -> tuple[Offer, ConsentView]:
    """The best suggestion of the catalogue the family consented to that has a free place."""
    module = consents.new.module
    candidates = domain.suggest(offers, bezirk=case.bezirk, module=module)
    if not candidates:
        raise Refusal("module", f"no Träger offers {module} in Stadtbezirk {case.bezirk}")
    consented = {o.traeger: consents.covering(o.traeger) for o in candidates}
    if not any(consented.values()):
        raise Conflict(
            "consent_ref",
            "no consent of the family covers passing contact data for "
            f"{module} to any Träger offering it in {case.bezirk} "
            f"({', '.join(o.traeger for o in candidates)})",
        )
    chosen = domain.pick(candidates, lambda o: consented[o.traeger] is not None)
    if chosen is None:
        raise Conflict(
            "traeger",
            f"no consented Träger offering {module} in {case.bezirk} has free capacity this month",
        )
    consent = consented[chosen.traeger]
    assert consent is not None
    return chosen, consent


async def _referable_case(session: AsyncSession, new: NewReferral) -> Case:
    """The family's case, registered and not erased, with no referral for the module open;
    the Träger rows it may go to locked first, so that what was committed while waiting for
    the lock counts."""
    case = await session.get(Case, new.case_id)
    if case is None:
        raise Conflict("case_id", "no family registered under this case id")
    if case.erased_at is not None:
        raise Conflict("case_id", "the family's data was erased")
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
        raise Conflict(
            "module",
            f"referral {duplicate[0]} of this family to {duplicate[1]} for {new.module} "
            "is still open",
        )
    return case


async def create_referral(
    session: AsyncSession,
    ctx: Context,
    new: NewReferral,
    now: datetime,
    *,
    caller: Caller | None = None,
    path: str | None = None,
    sealed_ahead: SealedAhead | None = None,
) -> Referral:
    """Create a referral behind the catalogue, capacity and consent gates and publish
    ``referral-requested``; raises :class:`Refusal` or :class:`Unavailable`.

    ``sealed_ahead``: the disclosure intake sealed before this transaction, used when the
    gates choose the same Träger, consent and fields now (else intake is asked here)."""
    case = await _referable_case(session, new)
    offer, consent = await _choose(session, ctx, case, new, now)
    fields = _disclosed_fields(ctx, new.disclose)
    which = _new_disclosure(case, offer, consent)
    if sealed_ahead is not None and sealed_ahead.fits(which, fields):
        which, sealed = sealed_ahead.which, sealed_ahead.result()
    else:
        sealed = await _disclosure(ctx, which, fields)
    referral_id = which.referral_id
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
        disclosed_fields=[f.value for f in sealed.disclosed_fields],
        requested_at=now,
        answer_due_by=due,
        updated_at=now,
    )
    await _insert_running(session, referral)
    _requested(session, ctx, referral, new, sealed, now)
    fields = sealed.disclosed_fields
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


def _requested(
    session: AsyncSession,
    ctx: Context,
    referral: Referral,
    new: NewReferral,
    sealed: SealedDisclosure,
    now: datetime,
) -> None:
    """The first step of a new referral, and ``referral-requested`` in the outbox."""
    _add_step(session, referral, "requested", new.requested_by_role.value, now, now)
    ctx.outbox.add(
        session,
        ReferralRequested(
            **_ids(referral),
            occurred_at=now,
            consent_ref=referral.consent_ref,
            requested_by_role=new.requested_by_role,
            origin=new.origin,
            handover_id=new.handover_id,
            urgent=new.urgent,
            answer_due_by=referral.answer_due_by,
            disclosed_fields=sealed.disclosed_fields,
            disclosure=sealed.disclosure,
            disclosure_jwe=sealed.disclosure_jwe,
        ),
    )


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
            raise Conflict(
                "handover_id",
                f"handover {referral.handover_id} already has a running referral "
                "(created at the same moment)",
            ) from None
        if "uq_referrals_referral_open_case_module" in message or (
            "referrals_referral.case_id" in message and "referrals_referral.module" in message
        ):
            raise Conflict(
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
    # Inserted at commit: the history is only appended to, and read in other transactions
    # (a referral's page, retention), so the ORM's unit of work has nothing to track.
    add_at_commit(
        session,
        ReferralStep(
            referral_id=referral.referral_id,
            step=step,
            actor_role=role,
            occurred_at=occurred_at,
            recorded_at=now,
            event_id=event_id,
        ),
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
    event = _record(ctx, referral, step, role, occurred_at, details)
    referral.status = new_status.value
    referral.updated_at = now
    session.add(referral)
    _add_step(session, referral, step.value, role.value, occurred_at, now, source_event_id)
    ctx.outbox.add(session, event)
    return event


def _record(
    ctx: Context,
    referral: Referral,
    step: Step,
    role: EventRole,
    occurred_at: datetime,
    details: StepDetails,
) -> EventModel:
    """Write what a (legal) step records on the referral; return the event that says so."""
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
            days = _days_since_requested(ctx, referral, occurred_at)
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
    return event


def _days_since_requested(ctx: Context, referral: Referral, moment: datetime) -> int:
    """Calendar days (city time) from the request to ``moment``."""
    zone = ctx.city.zone()
    return max(
        0, (domain.local_date(moment, zone) - domain.local_date(referral.requested_at, zone)).days
    )


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


def cancel_as_system(
    session: AsyncSession,
    ctx: Context,
    referral: Referral,
    reason: ReferralCancelReason,
    now: datetime,
) -> None:
    """Cancel an open referral as the system (withdrawn consent, erasure, merge)."""
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
        cancel_as_system(session, ctx, referral, reason, now)
        cancelled.append(referral.referral_id)
    return cancelled


# --- wishes (handovers and visit outcomes waiting for a referral) -------------------------


async def _named_consent(session: AsyncSession, wish: Wish) -> str | None:
    """The consent a wish names, if it names a Träger. A consent that names none ("the
    Familienbüro chooses") covers nobody by itself (§ 65 SGB VIII), so such a wish rests
    on whichever consent of the family names the Träger chosen, once there is one."""
    if wish.consent_ref is None:
        return None
    named = await session.get(ConsentRecord, wish.consent_ref)
    if named is not None and named.traeger is None and named.case_id == wish.case_id:
        return None
    return wish.consent_ref


def waiting_for(exc: Refusal | Unavailable) -> WishWaitingFor:
    """What a wish waits for, from the refusal that kept it from becoming a referral."""
    if isinstance(exc, Unavailable):
        return WishWaitingFor.KEYRING
    if exc.field == "consent_ref":
        return WishWaitingFor.CONSENT
    if exc.field == "case_id":
        return WishWaitingFor.CASE
    if exc.field == "traeger":
        return WishWaitingFor.CAPACITY if "capacity" in exc.reason else WishWaitingFor.OFFER
    if exc.field == "module" and "no Träger offers" in exc.reason:
        return WishWaitingFor.OFFER
    return WishWaitingFor.OTHER


_HINTS = {
    WishWaitingFor.CONSENT: "record the family's traeger_contact consent naming a Träger "
    "that offers the module: the wish is placed at once (or with POST "
    "/wishes/{wish_id}/placement naming that Träger)",
    WishWaitingFor.CAPACITY: "placed as soon as a place is free (a rejection, a "
    "cancellation, more capacity, a new month), or with POST /wishes/{wish_id}/placement "
    "naming another consented Träger",
    WishWaitingFor.OFFER: "placed when the catalogue offers the module in the Stadtbezirk",
}


def _wait(session: AsyncSession, wish: Wish, exc: Refusal | Unavailable, now: datetime) -> None:
    """Record on the open wish why it waits, and for what."""
    why = waiting_for(exc)
    text = f"{exc.field}: {exc.reason}" if isinstance(exc, Refusal) else f"keyring: {exc}"
    hint = _HINTS.get(why)
    wish.problem = text if hint is None else f"{text} — {hint.replace('{wish_id}', wish.wish_id)}"
    wish.waiting_for = why.value
    wish.updated_at = now
    session.add(wish)


def _wish_referral(wish: Wish, consent_ref: str | None, **changes: Any) -> NewReferral:
    values: dict[str, Any] = {
        "case_id": wish.case_id,
        "module": wish.module,
        "origin": ReferralOrigin(wish.origin),
        "requested_by_role": EventRole(wish.requested_by_role),
        "traeger": wish.traeger,
        "consent_ref": consent_ref,
        "urgent": wish.urgent,
        "handover_id": wish.source_id if wish.origin == ReferralOrigin.HANDOVER.value else None,
        "visit_id": wish.source_id if wish.origin == ReferralOrigin.VISIT.value else None,
    }
    values.update(changes)
    return NewReferral(**values)


async def place(
    session: AsyncSession,
    ctx: Context,
    wish: Wish,
    now: datetime,
    *,
    sealed_ahead: SealedAhead | None = None,
) -> bool:
    """Try to turn an open wish into a referral; records why not (and what it waits for)
    when it cannot (yet). A new wish not yet in the session is added with that outcome."""
    new = _wish_referral(wish, await _named_consent(session, wish))
    try:
        # create_referral checks everything before it writes, so a refusal leaves no trace.
        referral = await create_referral(session, ctx, new, now, sealed_ahead=sealed_ahead)
    except (Refusal, Unavailable) as exc:
        _wait(session, wish, exc, now)
        return False
    _placed(session, wish, referral, now)
    return True


Defer = Callable[[FollowUp], None]
"""Where work for after the transaction goes (a consumer's ``Delivery.after_commit``)."""


async def place_or_defer(
    session: AsyncSession, ctx: Context, wish: Wish, now: datetime, defer: Defer | None
) -> bool:
    """:func:`place` the wish now, unless its referral would carry a disclosure for intake
    to seal and ``defer`` is given: then the wish is kept open and :func:`place_sealed`
    deferred, so that intake is asked outside this transaction. True if placed now."""
    if defer is not None:
        sealing = await disclosure_to_seal(session, ctx, wish, now)
        if sealing is not None:
            session.add(wish)
            defer(partial(place_sealed, ctx, wish.wish_id, *sealing))
            return False
    return await place(session, ctx, wish, now)


async def disclosure_to_seal(
    session: AsyncSession, ctx: Context, wish: Wish, now: datetime
) -> tuple[DisclosureFor, list[PersonalField]] | None:
    """The disclosure a new wish's referral would carry if it were placed now: see
    :func:`_disclosure_plan`."""
    new = _wish_referral(wish, await _named_consent(session, wish))
    return await _disclosure_plan(session, ctx, new, now)


async def _disclosure_plan(
    session: AsyncSession, ctx: Context, new: NewReferral, now: datetime
) -> tuple[DisclosureFor, list[PersonalField]] | None:
    """The disclosure this referral would carry if it were created now (which Träger, on
    which consent, with which fields, under a new referral id), when that needs intake to
    seal something; None when it cannot be created now or discloses nothing. Reads only:
    the gates are checked again, under their locks, when it is created."""
    if ctx.keyring is None:
        return None
    case = await session.get(Case, new.case_id)
    if case is None or case.erased_at is not None:
        return None
    try:
        offer, consent = await _choose(session, ctx, case, new, now)
        fields = _disclosed_fields(ctx, new.disclose)
    except (Refusal, Unavailable):
        return None
    if not fields:
        return None
    return _new_disclosure(case, offer, consent), fields


def _new_disclosure(case: Case, offer: Offer, consent: ConsentView) -> DisclosureFor:
    """The disclosure of a new referral (its id made here) to the offer's Träger."""
    return DisclosureFor(case.case_id, str(uuid.uuid4()), offer.traeger, consent.consent_id)


async def seal_ahead(
    ctx: Context, which: DisclosureFor, fields: Sequence[PersonalField]
) -> SealedAhead:
    """Intake's answer to sealing this disclosure (the sealed disclosure, or why not),
    asked for outside any transaction."""
    try:
        answer: SealedDisclosure | Refusal | Unavailable = await _disclosure(ctx, which, fields)
    except (Refusal, Unavailable) as exc:
        answer = exc
    return SealedAhead(which, tuple(fields), answer)


async def place_sealed(
    ctx: Context, wish_id: str, which: DisclosureFor, fields: Sequence[PersonalField]
) -> int:
    """Place an open wish whose disclosure is sealed first, outside any transaction: intake
    is another service, and a transaction waiting for it would hold the wish's locks (on
    SQLite the service's write lock) for as long. Then the wish waits in ``ctx.sealed``
    until a placement holds the lock: that one claims every wish ready by then and places
    each as :func:`place` does, in one transaction, with its disclosure if the gates still
    choose the same Träger and consent (else intake is asked again there). Wishes placed,
    dropped or claimed meanwhile are left alone; one this does not reach (a crash, a
    transaction that fails) stays open for the placement job. Returns how many it placed."""
    ahead = await seal_ahead(ctx, which, fields)
    sealed = ctx.sealed
    sealed.ready.append((wish_id, ahead))
    async with sealed.lock:
        ready = dict(sealed.take())
        if not ready:
            return 0  # placed by the placement that held the lock before
        for attempt in range(1, PLACEMENT_ATTEMPTS + 1):
            try:
                return await _place_ready(ctx, ready, ctx.clock())
            except Exception as exc:
                # A busy database (SQLite's lock, a deadlock on PostgreSQL): the claims
                # were rolled back with the rest, so the same wishes are tried again.
                if not transient_error(exc) or attempt == PLACEMENT_ATTEMPTS:
                    raise
                await asyncio.sleep(PLACEMENT_RETRY_S * attempt)
        return 0


#: Tries of a placement whose transaction meets a busy database, and the pause before the
#: next (times the attempt): after the last, the wishes wait for the placement job.
PLACEMENT_ATTEMPTS = 3
PLACEMENT_RETRY_S = 0.2


async def _place_ready(ctx: Context, ready: Mapping[str, SealedAhead | None], now: datetime) -> int:
    """Claim the wishes still open and :func:`place` each (with its disclosure sealed
    ahead, if any), in one transaction; returns how many were placed."""
    placed = 0
    async with ctx.db.transaction() as session:
        for wish in await _claim_open_wishes(session, list(ready)):
            if await place(session, ctx, wish, now, sealed_ahead=ready[wish.wish_id]):
                placed += 1
    return placed


async def _claim_open_wishes(session: AsyncSession, wish_ids: Sequence[str]) -> list[Wish]:
    """Those of the wishes still open, locked by this transaction, oldest first. One that
    another replica's job or a consumer holds right now is skipped (it is being placed);
    one placed or dropped meanwhile is no longer found."""
    return list(
        (
            await session.execute(
                select(Wish)
                .where(col(Wish.wish_id).in_(list(wish_ids)))
                .where(col(Wish.state) == "open")
                .order_by(col(Wish.created_at), col(Wish.wish_id))
                .with_for_update(skip_locked=True)
            )
        ).scalars()
    )


def _placed(session: AsyncSession, wish: Wish, referral: Referral, now: datetime) -> None:
    wish.state = "placed"
    wish.problem = None
    wish.waiting_for = None
    wish.referral_id = referral.referral_id
    wish.updated_at = now
    session.add(wish)


async def place_open_wishes(
    session: AsyncSession,
    ctx: Context,
    now: datetime,
    *,
    case_id: str | None = None,
    modules: Sequence[str] | None = None,
    skip_locked: bool = False,
    defer: Defer | None = None,
) -> int:
    """Place the open wishes (of one case, for some modules): locked first (``FOR
    UPDATE``), so a placement job on another replica can neither place them at the same
    time nor be overtaken; one it is placing right now is waited for and then, no longer
    open, left out. ``skip_locked`` skips those instead of waiting: for callers that hold
    a referral's row already (a place freed by a rejection or cancellation), which must not
    wait for a wish lock (the lock order is wish, Träger, referral). ``defer``: see
    :func:`place_or_defer` (the wishes it defers are not counted)."""
    bound: dict[str, Any] = {}
    if case_id is not None:
        bound["case_id"] = case_id
    if modules is not None:
        bound["modules"] = list(modules)
    query = _open_wishes(case_id is not None, modules is not None, skip_locked)
    placed = 0
    for wish in list((await session.execute(query, bound)).scalars()):
        if await place_or_defer(session, ctx, wish, now, defer):
            placed += 1
    return placed


@functools.cache
def _open_wishes(of_case: bool, of_modules: bool, skip_locked: bool) -> Select[Wish]:
    """The open wishes, locked, oldest first; built once per shape (every family's
    registration asks for its case's)."""
    query = (
        select(Wish)
        .where(col(Wish.state) == "open")
        .order_by(col(Wish.created_at), col(Wish.wish_id))
        .with_for_update(skip_locked=skip_locked)
        .execution_options(populate_existing=True)
    )
    if of_case:
        query = query.where(col(Wish.case_id) == bindparam("case_id"))
    if of_modules:
        query = query.where(col(Wish.module).in_(bindparam("modules", expanding=True)))
    return query


async def place_waiting_wishes(
    ctx: Context, now: datetime, *, modules: Sequence[str] | None = None
) -> int:
    """The placement job (and the re-evaluation after a catalogue edit or a freed place,
    for ``modules``): try every open wish again, each in a transaction of its own; one
    that can be placed now has its disclosure sealed by intake between a transaction that
    reads the gates and the one that claims and places it (as :func:`place_sealed`)."""
    query = select(col(Wish.wish_id)).where(col(Wish.state) == "open")
    if modules is not None:
        query = query.where(col(Wish.module).in_(list(modules)))
    async with ctx.db.transaction() as session:
        waiting = list((await session.execute(query.order_by(col(Wish.created_at)))).scalars())
    placed = 0
    for wish_id in waiting:
        async with ctx.db.transaction() as session:
            wish = await session.get(Wish, wish_id)
            plan = None
            if wish is not None and wish.state == "open":
                plan = await disclosure_to_seal(session, ctx, wish, now)
        ahead = None if plan is None else await seal_ahead(ctx, *plan)
        placed += await _place_ready(ctx, {wish_id: ahead}, now)
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
    escalated = [r for r in due if await _escalate(ctx, r, today, now)]
    if escalated:
        _log.info("referrals escalated", extra={"count": len(escalated)})
    return escalated


async def _escalate(ctx: Context, referral_id: str, today: date, now: datetime) -> bool:
    """Escalate one referral in a transaction of its own, if no other run did."""
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
            return False
        referral = await session.get(Referral, referral_id)
        assert referral is not None
        await session.refresh(referral)
        status = ReferralStatus(referral.status)
        if not domain.escalation_due(
            status, referral.answer_due_by, today, already_escalated=False
        ):
            return False
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
        return True


async def escalate_waiting_wishes(ctx: Context, now: datetime) -> list[str]:
    """Escalate to the Bezirksteam every wish still open after the configured number of
    working days (``wish_escalation_working_days``); each exactly once, also with several
    replicas running this job (the conditional update on ``escalated_at`` is the claim)."""
    today = ctx.today(now)
    days = ctx.settings.wish_escalation_working_days
    async with ctx.db.transaction() as session:
        rows = (
            await session.execute(
                select(col(Wish.wish_id), col(Wish.created_at))
                .where(col(Wish.state) == "open")
                .where(col(Wish.escalated_at).is_(None))
                .order_by(col(Wish.created_at))
            )
        ).all()
    zone = ctx.city.zone()
    due = [
        wish_id
        for wish_id, created in rows
        if domain.wish_escalation_due(
            domain.local_date(created, zone), today, days=days, calendar=ctx.calendar
        )
    ]
    escalated = [w for w in due if await _escalate_wish(ctx, w, today, now)]
    if escalated:
        _log.info("wishes escalated", extra={"count": len(escalated)})
    return escalated


async def _escalate_wish(ctx: Context, wish_id: str, today: date, now: datetime) -> bool:
    async with ctx.db.transaction() as session:
        claimed = await session.execute(
            update(Wish)
            .where(col(Wish.wish_id) == wish_id)
            .where(col(Wish.state) == "open")
            .where(col(Wish.escalated_at).is_(None))
            .values(escalated_at=now, updated_at=now)
        )
        if getattr(claimed, "rowcount", 0) != 1:
            return False
        wish = await session.get(Wish, wish_id)
        assert wish is not None
        await session.refresh(wish)
        created = domain.local_date(wish.created_at, ctx.city.zone())
        ctx.outbox.add(
            session,
            WishEscalated(
                wish_id=wish.wish_id,
                case_id=wish.case_id,
                bezirk=wish.bezirk,
                module=wish.module,
                origin="visit" if wish.origin == ReferralOrigin.VISIT.value else "handover",
                waiting_for=WishWaitingFor(wish.waiting_for or WishWaitingFor.OTHER.value),
                reason=(wish.problem or "not placed yet")[:1000],
                working_days_open=max(
                    1, ctx.calendar.working_days_between(created, today - timedelta(days=1))
                ),
                occurred_at=now,
            ),
        )
        return True


@dataclass(frozen=True)
class Placement:
    """The Familienbüro's choice for a waiting wish: the Träger, and optionally fewer
    disclosed fields and urgency."""

    traeger: str
    disclose: Sequence[PersonalField] | None = None
    urgent: bool | None = None


async def place_wish(ctx: Context, caller: Caller, wish_id: str, choice: Placement) -> Wish:
    """The Familienbüro (or Bezirksteam) of the family's Bezirk places an open wish with
    the Träger it names. Every gate of a new referral applies: the Träger must offer the
    module there and have a free place, and a consent of the family must name that Träger
    (and purpose): record it first. A refusal changes nothing, not even the wish's reason."""
    now = ctx.clock()
    async with ctx.db.transaction() as session:
        _, new = await _wish_placement(session, caller, wish_id, choice)
        plan = await _disclosure_plan(session, ctx, new, now)
    # Intake seals while this request holds no transaction (see place_sealed); the wish,
    # the caller's access and the gates are checked again below.
    ahead = None if plan is None else await seal_ahead(ctx, *plan)
    async with ctx.db.transaction() as session:
        wish, new = await _wish_placement(session, caller, wish_id, choice)
        referral = await create_referral(
            session,
            ctx,
            new,
            now,
            caller=caller,
            path="/wishes/{wish_id}/placement",
            sealed_ahead=ahead,
        )
        _placed(session, wish, referral, now)
    return wish


async def _wish_placement(
    session: AsyncSession, caller: Caller, wish_id: str, choice: Placement
) -> tuple[Wish, NewReferral]:
    """The wish, locked, and the referral the caller's choice makes of it: 403 for a wish
    outside the caller's scope (or none), 409 for one no longer open."""
    wish = (
        await session.execute(select(Wish).where(col(Wish.wish_id) == wish_id).with_for_update())
    ).scalar_one_or_none()
    scope = None if wish is None else CaseScope(bezirk=wish.bezirk, case_id=wish.case_id)
    ensure_may_access_case(caller, scope, personal_data=True)
    assert wish is not None
    if wish.state != "open":
        raise Conflict(
            "wish_id",
            f"the wish is {wish.state}"
            + (f" (referral {wish.referral_id})" if wish.referral_id else ""),
        )
    consent_ref = await _named_consent(session, wish)
    if consent_ref is not None:
        named = await session.get(ConsentRecord, consent_ref)
        if named is not None and named.traeger not in (None, choice.traeger):
            consent_ref = None  # the Familienbüro chose another Träger: its consent counts
    new = _wish_referral(
        wish,
        consent_ref,
        traeger=choice.traeger,
        disclose=choice.disclose,
        urgent=wish.urgent if choice.urgent is None else choice.urgent,
        requested_by_role=event_role_of(caller.role),
        requested_by_subject=caller.subject,
    )
    return wish, new


async def change_catalogue_entry(
    ctx: Context, caller: Caller, slug: str, changes: dict[str, Any]
) -> Listing:
    """Change a catalogue entry, then try the open wishes its modules could unblock (more
    capacity, a new module or Bezirk, active again) at once."""
    listing = await update_traeger(ctx, caller, slug, changes)
    row = listing[0]
    await place_waiting_wishes(ctx, ctx.clock(), modules=list(row.modules))
    return listing


async def reconcile_catalogue(ctx: Context, now: datetime, *, force: bool) -> Reconciled:
    """Reconcile the catalogue with the city file now (``force``, coordination's call) or
    when it changed (the periodic check); then try the waiting wishes again, as after an
    API edit: a Träger's new capacity, module or Bezirk may place them."""
    result = await reconcile_with_file(ctx, now, force=force)
    if result.applied.changed:
        await place_waiting_wishes(ctx, now)
    if result.applied.retired:
        _log.warning(
            "Träger retired while running; their open referrals are listed per Bezirk",
            extra={"retired": list(result.applied.retired), "open": result.open_of_retired},
        )
    return result


async def check_city_file(ctx: Context, now: datetime) -> Reconciled | None:
    """The periodic check: reconcile when the city file changed. A file that cannot be
    applied changes nothing and is reported once (until it changes again)."""
    try:
        return await reconcile_catalogue(ctx, now, force=False)
    except Refusal as exc:  # a Conflict (another city) too
        with contextlib.suppress(Refusal):  # unreadable: said again at the next look
            ctx.city_fingerprint = fingerprint(city_file_text(ctx.settings.city)[0])
        _log.error("city file not applied to the catalogue: %s", exc.reason)
        return None


async def referrals_to_retired_traeger(
    ctx: Context, caller: Caller, bezirk: str, *, limit: int
) -> list[Referral]:
    """A Stadtbezirk's open referrals whose Träger the city file no longer names."""
    _ensure_bezirk(caller, bezirk)
    return await _referrals(ctx, retired_traeger_query(bezirk).limit(limit))


# --- referrals asked for and followed by people (the HTTP API) ----------------------------


async def request_referral(ctx: Context, caller: Caller, new: NewReferral) -> Referral:
    """A person refers a family (of their Bezirk or clinic); a waiting handover or visit
    wish the referral is made for counts as placed by it."""
    now = ctx.clock()
    async with ctx.db.transaction() as session:
        await _ensure_may_refer(session, caller, new.case_id)
        plan = await _disclosure_plan(session, ctx, new, now)
    # Intake seals the disclosure while this request holds no transaction (see
    # place_sealed); the gates, the caller's access included, are checked again below.
    ahead = None if plan is None else await seal_ahead(ctx, *plan)
    async with ctx.db.transaction() as session:
        await _ensure_may_refer(session, caller, new.case_id)
        # The waiting wish this referral settles, locked before the Träger rows (the
        # placement job's lock order), so that the job does not place it too.
        await _lock_open_wishes(session, new.handover_id, new.visit_id)
        referral = await create_referral(
            session, ctx, new, now, caller=caller, path="/referrals", sealed_ahead=ahead
        )
        await _mark_wishes_placed(session, referral, now)
    return referral


async def _ensure_may_refer(session: AsyncSession, caller: Caller, case_id: str) -> None:
    case = await session.get(Case, case_id)
    scope = (
        None
        if case is None
        else CaseScope(
            bezirk=case.bezirk, case_id=case.case_id, registered_by_clinic=case.clinic_id
        )
    )
    ensure_may_access_case(caller, scope, personal_data=True)


def _wish_sources(handover_id: str | None, visit_id: str | None) -> list[tuple[str, str]]:
    return [(o, s) for o, s in (("handover", handover_id), ("visit", visit_id)) if s is not None]


async def _lock_open_wishes(
    session: AsyncSession, handover_id: str | None, visit_id: str | None
) -> None:
    for origin, source in _wish_sources(handover_id, visit_id):
        await session.execute(
            select(col(Wish.wish_id))
            .where(col(Wish.origin) == origin)
            .where(col(Wish.source_id) == source)
            .where(col(Wish.state) == "open")
            .with_for_update()
        )


async def _mark_wishes_placed(session: AsyncSession, referral: Referral, now: datetime) -> None:
    """A referral made by staff for a waiting handover or visit wish settles that wish."""
    for origin, source in _wish_sources(referral.handover_id, referral.visit_id):
        wishes = await session.execute(
            select(Wish)
            .where(col(Wish.origin) == origin)
            .where(col(Wish.source_id) == source)
            .where(col(Wish.state) == "open")
        )
        for wish in wishes.scalars():
            _placed(session, wish, referral, now)


async def _followed(
    session: AsyncSession, caller: Caller, referral_id: str, *, personal_data: bool = False
) -> Referral:
    """The referral, if the caller may follow it (403 alike for unknown ids)."""
    referral = await session.get(Referral, referral_id)
    scope = None
    if referral is not None:
        case = await session.get(Case, referral.case_id)
        scope = CaseScope(
            bezirk=referral.bezirk,
            case_id=referral.case_id,
            traeger=frozenset({referral.traeger}),
            registered_by_clinic=case.clinic_id if case is not None else None,
        )
    ensure_may_access_case(caller, scope, personal_data=personal_data)
    assert referral is not None
    return referral


async def read_referral(
    ctx: Context, caller: Caller, referral_id: str
) -> tuple[Referral, list[ReferralStep]]:
    """A referral with its steps, oldest first."""
    async with ctx.db.transaction() as session:
        referral = await _followed(session, caller, referral_id)
        steps = (
            await session.execute(
                select(ReferralStep)
                .where(col(ReferralStep.referral_id) == referral_id)
                .order_by(col(ReferralStep.id))
            )
        ).scalars()
        return referral, list(steps)


async def step_referral(
    ctx: Context, caller: Caller, referral_id: str, step: Step, details: StepDetails
) -> Referral:
    """A person takes a lifecycle step: the addressed Träger answers, the requesting side
    cancels. Of concurrent conflicting steps one wins, the others are refused (409) with
    the status they found."""
    if step is Step.REJECTED and details.rejection_reason is None:
        raise Refusal("rejection_reason", "required for the step rejected")
    if step is Step.CANCELLED and details.cancel_reason is None:
        raise Refusal("cancel_reason", "required for the step cancelled")
    now = ctx.clock()
    async with ctx.db.transaction() as session:
        referral = await _followed(session, caller, referral_id)
        try:
            await take_step_now(
                session,
                ctx,
                referral,
                step,
                actor=actor_of(caller.role),
                role=event_role_of(caller.role),
                occurred_at=now,
                now=now,
                details=details,
            )
        except domain.TransitionRefused as exc:
            raise Conflict("step", exc.reason) from None
    if step in domain.FREES_A_PLACE:
        # The place is free again: the waiting wishes of the module may take it now.
        await place_waiting_wishes(ctx, now, modules=[referral.module])
    return referral


async def _releasable(
    session: AsyncSession, ctx: Context, caller: Caller, referral_id: str
) -> Referral:
    referral = await _followed(session, caller, referral_id, personal_data=True)
    if ReferralStatus(referral.status) not in domain.OPEN_STATUSES:
        raise Conflict("referral_id", f"the referral is {referral.status}")
    if not referral.disclosed_fields or ctx.keyring is None:
        raise Refusal("referral_id", "this referral carries no disclosure", status=404)
    return referral


async def release_disclosure_key(
    ctx: Context, caller: Caller, referral_id: str
) -> tuple[str, bytes]:
    """The key (kid, key) of a running referral's disclosure, for its addressed Träger
    while the family's consent stands; recorded in the audit log."""
    async with ctx.db.transaction() as session:
        referral = await _releasable(session, ctx, caller, referral_id)
        case_id = referral.case_id
        which = DisclosureFor(case_id, referral_id, referral.traeger, referral.consent_ref)
    # The keyring is another service: ask it outside any transaction, so that a slow
    # answer holds no lock here (on SQLite every transaction holds the write lock).
    assert ctx.keyring is not None
    try:
        kid, key = await ctx.keyring.disclosure_key(which)
    except KeyGone:
        raise Refusal("case_id", "the family's data was erased", status=410) from None
    except KeyRefused as exc:
        raise Conflict("consent_ref", str(exc)) from None
    except KeyringUnavailable as exc:
        raise Unavailable(str(exc)) from None
    async with ctx.db.transaction() as session:
        # Checked again with the release: cancelled or closed meanwhile means no key.
        await _releasable(session, ctx, caller, referral_id)
        audit.record(
            session,
            service=SERVICE,
            caller=caller,
            action=audit.AuditAction.key_release,
            case_id=case_id,
            purpose=f"open the disclosure of referral {referral_id}",
            path="/referrals/{referral_id}/disclosure-key",
        )
    return kid, key


async def referrals_of_case(ctx: Context, caller: Caller, case_id: str) -> list[Referral]:
    """A family's referrals, oldest first (a Träger sees only its own)."""
    async with ctx.db.transaction() as session:
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
    if caller.role is CallerRole.traeger:
        rows = [r for r in rows if r.traeger == caller.traeger]
    return rows


def _statuses(status: str) -> list[str]:
    """The statuses a list asks for: ``open``, ``all`` or one status."""
    if status == "open":
        return [s.value for s in domain.OPEN_STATUSES]
    if status == "all":
        return [s.value for s in ReferralStatus]
    if status not in [s.value for s in ReferralStatus]:
        raise Refusal(
            "status",
            f"unknown status {status}: use open, all or one of "
            f"{', '.join(s.value for s in ReferralStatus)}",
        )
    return [status]


def _ensure_bezirk(caller: Caller, bezirk: str) -> None:
    ensure_may_access_case(caller, CaseScope(bezirk=bezirk), personal_data=False)


async def _referrals(ctx: Context, query: Any) -> list[Referral]:
    async with ctx.db.transaction() as session:
        return list((await session.execute(query)).scalars())


async def referrals_of_bezirk(
    ctx: Context, caller: Caller, bezirk: str, *, status: str, limit: int
) -> list[Referral]:
    """A Stadtbezirk's referrals (``open``, ``all`` or one status), due first."""
    _ensure_bezirk(caller, bezirk)
    return await _referrals(
        ctx,
        select(Referral)
        .where(col(Referral.bezirk) == bezirk)
        .where(col(Referral.status).in_(_statuses(status)))
        .order_by(col(Referral.answer_due_by), col(Referral.requested_at))
        .limit(limit),
    )


async def escalations_of_bezirk(
    ctx: Context, caller: Caller, bezirk: str, *, open_only: bool, limit: int
) -> list[Referral]:
    """A Stadtbezirk's escalated referrals (those still open), in escalation order."""
    _ensure_bezirk(caller, bezirk)
    query = (
        select(Referral)
        .where(col(Referral.bezirk) == bezirk)
        .where(col(Referral.escalated_at).is_not(None))
        .order_by(col(Referral.escalated_at))
        .limit(limit)
    )
    if open_only:
        query = query.where(col(Referral.status).in_(_statuses("open")))
    return await _referrals(ctx, query)


async def wishes_of_bezirk(ctx: Context, caller: Caller, bezirk: str, *, state: str) -> list[Wish]:
    """A Stadtbezirk's handover and visit wishes in ``state``, oldest first."""
    _ensure_bezirk(caller, bezirk)
    async with ctx.db.transaction() as session:
        rows = await session.execute(
            select(Wish)
            .where(col(Wish.bezirk) == bezirk)
            .where(col(Wish.state) == state)
            .order_by(col(Wish.created_at))
        )
        return list(rows.scalars())


async def referrals_of_traeger(
    ctx: Context, caller: Caller, slug: str, *, status: str, limit: int
) -> list[Referral]:
    """The referrals addressed to one Träger (asked by that Träger), urgent first."""
    if caller.role is CallerRole.traeger and caller.traeger != slug:
        raise AccessDenied("another Träger's referrals")
    return await _referrals(
        ctx,
        select(Referral)
        .where(col(Referral.traeger) == slug)
        .where(col(Referral.status).in_(_statuses(status)))
        .order_by(col(Referral.urgent).desc(), col(Referral.requested_at))
        .limit(limit),
    )
