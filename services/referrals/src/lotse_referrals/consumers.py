"""Event handlers: what intake and visits tell the service, and the Träger's answers.

One consumer group, ``main``, reads ``lotse.intake`` and ``lotse.visits`` (families and their
consents, handover requests, referral wishes from welcome visits, erasures) and every
Träger's ``lotse.partner.<traeger>.responses`` topic. An answer that is not the sender's to give or
does not follow the lifecycle is refused (dead-lettered with the reason) and changes
nothing.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from lotse_contracts import topics
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.intake import (
    CasesMerged,
    ConsentChanged,
    FamilyErased,
    FamilyRegistered,
    HandoverRequested,
)
from lotse_contracts.events.partner import PartnerReferralAnswer
from lotse_contracts.events.referrals import (
    AnswerRefused,
    AnswerRefusedCode,
    ReferralCancelReason,
    ReferralOrigin,
    ReferralStatus,
    WishWaitingFor,
)
from lotse_contracts.events.visits import VisitCompleted
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.consumer import Delivery, EventRejected, Refused
from lotse_runtime.db import on_postgres, one_of
from lotse_runtime.handlers import Handlers
from sqlalchemy import Select, delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_referrals import domain
from lotse_referrals import operations as ops
from lotse_referrals.context import Context
from lotse_referrals.domain import Actor, Step, TransitionRefused
from lotse_referrals.operations import StepDetails
from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import Case, ConsentRecord, Referral, Wish

M = TypeVar("M", bound=EventModel)


def wire_consumers(runtime: ServiceRuntime[ReferralsSettings], ctx: Context) -> None:
    """Register the service's consumer group, each handler typed by its event.

    One group reads intake, visits and every Träger's answers: an idle consumer group fetches
    and heartbeats several times a second, so a second group for the answers doubled what the
    idle service cost. Each handler still takes its events only from the topics it took them
    from as a group of its own (see ``_only_from``)."""
    settings = runtime.settings
    domain_topics = [topics.INTAKE, topics.VISITS]
    answer_topics = [topics.partner_responses(t) for t in runtime.city.traeger_slugs]
    from_domain = partial(_only_from, {settings.topic(t) for t in domain_topics})
    from_partners = partial(_only_from, {settings.topic(t) for t in answer_topics})
    handlers = Handlers()
    handlers.on(FamilyRegistered)(from_domain(partial(family_registered, ctx)))
    handlers.on(ConsentChanged)(from_domain(partial(consent_changed, ctx)))
    handlers.on(HandoverRequested)(from_domain(partial(handover_requested, ctx)))
    handlers.on(FamilyErased)(from_domain(partial(family_erased, ctx)))
    handlers.on(CasesMerged)(from_domain(partial(cases_merged, ctx)))
    handlers.on(VisitCompleted)(from_domain(partial(visit_completed, ctx)))
    handlers.on(PartnerReferralAnswer)(from_partners(partial(partner_answer, ctx)))
    runtime.add_consumer(
        "main",
        [*domain_topics, *answer_topics],
        handlers,
        on_refused=partial(answer_refused, ctx),
        prepare=read_registrations,
    )


def _only_from(
    accepted: set[str], handler: Callable[[Delivery[M]], Awaitable[None]]
) -> Callable[[Delivery[M]], Awaitable[None]]:
    """``handler`` for events from the ``accepted`` topics; from any other the event is
    refused before anything of it is kept (a Träger writing a family's registration onto its
    answer topic, say): the transaction rolls back, its inbox entry with it, so the event's id
    stays free for the service that really owns it."""

    async def checked(delivery: Delivery[M]) -> None:
        if delivery.topic not in accepted:
            raise EventRejected(
                f"{delivery.event.type} is not read from topic {delivery.topic}",
                code=AnswerRefusedCode.NOT_APPLIED.value,
                public_reason=f"{delivery.event.type} is not accepted on this topic",
            )
        await handler(delivery)

    return checked


# --- intake ----------------------------------------------------------------------------


#: The batch's registrations as read by :func:`read_registrations` (in ``session.info``).
_REGISTRATIONS = "lotse_referrals_registrations"

T = TypeVar("T", Case, ConsentRecord)


@dataclass
class Registrations:
    """What the family registrations of one consumer batch found stored when the batch
    began, read in three queries for all of them (:func:`read_registrations`). One by one,
    each registration read its case, its consents and its case's open wishes, three queries,
    and each query first flushed the rows of the events before it, one INSERT per table."""

    cases: dict[str, Case]
    """The registrations' cases that were stored (held here: the session keeps loaded rows
    only while something refers to them)."""
    absent: set[str]
    """The registrations' cases that were not stored."""
    consents: dict[str, ConsentRecord]
    """The stored consents the registrations name; a registration adds the ones it stores."""
    without_wishes: set[str]
    """The registrations' cases that had no open wish."""

    async def case(self, session: AsyncSession, case_id: str) -> Case | None:
        """The case as stored or as this transaction changed it since, without a query
        where the batch's read knows it."""
        held = _held(session, Case, case_id)
        if held is not None:
            return held
        if case_id in self.cases:
            return self.cases[case_id]
        if case_id in self.absent:
            return None
        return await session.get(Case, case_id)

    def stored_consents(
        self, session: AsyncSession, consent_ids: set[str]
    ) -> dict[str, ConsentRecord]:
        """The stored consents, with those this transaction added since the batch began."""
        for consent_id in consent_ids - self.consents.keys():
            held = _held(session, ConsentRecord, consent_id)
            if held is not None:
                self.consents[consent_id] = held
        return self.consents

    def may_have_open_wishes(self, session: AsyncSession, case_id: str) -> bool:
        """False only for a case that had no open wish when the batch began and has no wish
        in this transaction since (one a visit or handover of the batch added, say)."""
        if case_id not in self.without_wishes:
            return True
        sync = session.sync_session
        return any(
            isinstance(row, Wish) and row.case_id == case_id
            for row in (*sync.new, *sync.identity_map.values())
        )


def _held(session: AsyncSession, model: type[T], key: str) -> T | None:
    """The row with this primary key that the session holds: loaded (the identity map) or
    added and not yet flushed."""
    sync = session.sync_session
    found = sync.identity_map.get(sync.identity_key(model, key))
    if isinstance(found, model):
        return found
    name = _PRIMARY_KEYS[model]
    return next(
        (row for row in sync.new if isinstance(row, model) and getattr(row, name) == key), None
    )


_PRIMARY_KEYS: dict[type[Any], str] = {Case: "case_id", ConsentRecord: "consent_id"}


async def read_registrations(session: AsyncSession, events: list[Any]) -> None:
    """The consumer's batch, before its first event: what its family registrations need
    (:class:`Registrations`), read for all of them at once. A wish another replica adds for
    one of these cases while the batch runs is left to its own placement or the placement job,
    as one added just after a registration's query always was."""
    registered = [event for event in events if isinstance(event, FamilyRegistered)]
    if not registered:
        return
    case_ids = {event.case_id for event in registered}
    consent_ids = {c.consent_id for event in registered for c in event.consents}
    postgres = on_postgres(session)
    ids = {"ids": list(case_ids)}
    cases = {
        case.case_id: case
        for case in (await session.execute(_stored_cases(postgres), ids)).scalars()
    }
    wished = set((await session.execute(_cases_with_open_wishes(postgres), ids)).scalars())
    session.info[_REGISTRATIONS] = Registrations(
        cases=cases,
        absent=case_ids - cases.keys(),
        consents=await ops.stored_consents(session, consent_ids),
        without_wishes=case_ids - wished,
    )


@functools.cache
def _stored_cases(postgres: bool) -> Select[Case]:
    return select(Case).where(one_of(col(Case.case_id), "ids", postgres=postgres))


@functools.cache
def _cases_with_open_wishes(postgres: bool) -> Select[str]:
    return (
        select(col(Wish.case_id))
        .where(col(Wish.state) == "open")
        .where(one_of(col(Wish.case_id), "ids", postgres=postgres))
        .distinct()
    )


async def family_registered(ctx: Context, delivery: Delivery[FamilyRegistered]) -> None:
    data = delivery.data
    session = delivery.session
    batch: Registrations | None = session.info.get(_REGISTRATIONS)
    if batch is None:
        case = await session.get(Case, data.case_id)
    else:
        case = await batch.case(session, data.case_id)
    if case is not None and case.erased_at is not None:
        return  # an erased family stays erased, whatever arrives late
    if case is None:
        case = Case(case_id=data.case_id, bezirk=data.bezirk, registered_at=data.registered_at)
    case.bezirk = data.bezirk
    case.clinic_id = data.clinic_id
    case.registered_at = data.registered_at
    # The sealed personal block is not kept: intake seals each disclosure itself, so
    # this service needs no copy of the family's data, not even encrypted.
    session.add(case)
    named = {c.consent_id for c in data.consents}
    if batch is None:
        stored = await ops.stored_consents(session, named)
    else:
        stored = batch.stored_consents(session, named)
    for consent in data.consents:
        await ops.record_consent(
            session,
            consent_id=consent.consent_id,
            case_id=data.case_id,
            scope=consent.scope,
            traeger=consent.traeger,
            purpose=consent.purpose,
            state=consent.state,
            at=consent.at,
            stored=stored,
        )
    # Intake and visits are separate topics: a visit's wish may have come first.
    if batch is None or batch.may_have_open_wishes(session, data.case_id):
        await ops.place_open_wishes(
            session, ctx, ctx.clock(), case_id=data.case_id, defer=delivery.after_commit
        )


async def consent_changed(ctx: Context, delivery: Delivery[ConsentChanged]) -> None:
    data = delivery.data
    session = delivery.session
    now = ctx.clock()
    fresh = await ops.record_consent(
        session,
        consent_id=data.consent_id,
        case_id=data.case_id,
        scope=data.scope,
        traeger=data.traeger,
        purpose=data.purpose,
        state=data.state,
        at=data.changed_at,
    )
    if not fresh or data.scope is not ConsentScope.TRAEGER_CONTACT:
        return
    if data.state is ConsentState.WITHDRAWN:
        cancelled = await ops.cancel_open(
            session,
            ctx,
            case_id=data.case_id,
            reason=ReferralCancelReason.CONSENT_WITHDRAWN,
            now=now,
            consent_id=data.consent_id,
        )
        waiting = await session.execute(
            select(Wish)
            .where(col(Wish.case_id) == data.case_id)
            .where(col(Wish.consent_ref) == data.consent_id)
            .where(col(Wish.state) == "open")
        )
        for wish in waiting.scalars():
            # The named consent is gone; another consent of the family may still cover it.
            wish.consent_ref = None
            wish.problem = "consent_ref: the consent was withdrawn"
            wish.waiting_for = WishWaitingFor.CONSENT.value
            session.add(wish)
        await _places_freed(delivery, ctx, cancelled, now)
    else:
        await ops.place_open_wishes(
            session, ctx, now, case_id=data.case_id, defer=delivery.after_commit
        )


async def handover_requested(ctx: Context, delivery: Delivery[HandoverRequested]) -> None:
    data = delivery.data
    _known_module_and_traeger(ctx, data.module, data.traeger)
    await _wish(
        ctx,
        delivery,
        origin=ReferralOrigin.HANDOVER,
        source_id=data.handover_id,
        case_id=data.case_id,
        bezirk=data.bezirk,
        module=data.module,
        traeger=data.traeger,
        consent_ref=data.consent_ref,
        urgent=data.urgent,
        role=data.requested_by_role,
    )


async def family_erased(ctx: Context, delivery: Delivery[FamilyErased]) -> None:
    data = delivery.data
    session = delivery.session
    now = ctx.clock()
    cancelled = await ops.cancel_open(
        session,
        ctx,
        case_id=data.case_id,
        reason=ReferralCancelReason.CASE_ERASED,
        now=now,
    )
    waiting = await session.execute(
        select(Wish).where(col(Wish.case_id) == data.case_id).where(col(Wish.state) == "open")
    )
    for wish in waiting.scalars():
        wish.state = "dropped"
        wish.problem = "the family's data was erased"
        wish.updated_at = now
        session.add(wish)
    await session.execute(delete(ConsentRecord).where(col(ConsentRecord.case_id) == data.case_id))
    case = await session.get(Case, data.case_id)
    if case is None:
        # A tombstone, so that a late family-registered cannot bring the case back.
        case = Case(case_id=data.case_id, bezirk=data.bezirk, registered_at=data.erased_at)
    case.personal = None
    case.erased_at = data.erased_at
    session.add(case)
    await _places_freed(delivery, ctx, cancelled, now)
    # The sealed disclosures went out under the family key, which intake destroyed: the
    # copies on the Träger feeds are unreadable now; locally only field names remain.


async def cases_merged(ctx: Context, delivery: Delivery[CasesMerged]) -> None:
    """Two cases were one family; from now on it is referred as the survivor.

    Referrals of the merged case that a Träger has not accepted yet are cancelled
    (reason ``duplicate``; the Träger purges what it got) and, with the merged case's
    waiting wishes, move to the survivor as wishes of its own: placed again under the
    survivor's consents (intake carried the merged case's over) and key, unless the
    survivor already has one for that module, then they are dropped. A referral a
    Träger accepted or is working on stays as it is: the family is in good hands, and
    breaking the warm handover off would harm it."""
    data = delivery.data
    session = delivery.session
    now = ctx.clock()
    merged, survivor = data.merged_case_id, data.surviving_case_id
    cancelled = await session.execute(
        select(Referral)
        .where(col(Referral.case_id) == merged)
        .where(col(Referral.status).in_([s.value for s in domain.AWAITING_ANSWER]))
    )
    for referral in list(cancelled.scalars()):
        ops.cancel_as_system(session, ctx, referral, ReferralCancelReason.DUPLICATE, now)
    covered = await _modules_of(session, survivor)
    moving = await session.execute(
        select(Wish, col(Referral.status))
        .outerjoin(Referral, col(Referral.referral_id) == col(Wish.referral_id))
        .where(col(Wish.case_id) == merged)
        .where(col(Wish.state).in_(["open", "placed"]))
    )
    for wish, status in list(moving.all()):
        if await _moves(session, wish, status):
            _move(wish, data, covered, now)
            session.add(wish)
    await ops.place_open_wishes(session, ctx, now, case_id=survivor, defer=delivery.after_commit)


async def _modules_of(session: AsyncSession, case_id: str) -> set[str]:
    """The modules a case has a running referral or an open wish for."""
    running = await session.execute(
        select(col(Referral.module))
        .where(col(Referral.case_id) == case_id)
        .where(col(Referral.status).in_([s.value for s in domain.OPEN_STATUSES]))
    )
    waiting = await session.execute(
        select(col(Wish.module))
        .where(col(Wish.state) == "open")
        .where(col(Wish.case_id) == case_id)
    )
    return set(running.scalars()) | set(waiting.scalars())


async def _moves(session: AsyncSession, wish: Wish, status: str | None) -> bool:
    """Whether a wish of the merged case moves to the survivor: an open one, or one whose
    referral was cancelled just now for the merge (not by the family or the Träger before)."""
    if wish.state == "placed" and status != ReferralStatus.CANCELLED.value:
        return False  # still running with its Träger (accepted or further)
    if wish.state == "placed" and wish.referral_id is not None:
        placed = await session.get(Referral, wish.referral_id)
        if placed is None or placed.cancel_reason != ReferralCancelReason.DUPLICATE:
            return False
    return True


def _move(wish: Wish, data: CasesMerged, covered: set[str], now: datetime) -> None:
    """The wish becomes the survivor's, or is dropped where the survivor has the module."""
    wish.updated_at = now
    if wish.module in covered:
        wish.state = "dropped"
        wish.problem = f"merged into case {data.surviving_case_id}, which has this module already"
        return
    covered.add(wish.module)
    wish.case_id = data.surviving_case_id
    wish.bezirk = data.bezirk
    wish.consent_ref = None  # the survivor's consents decide
    wish.state = "open"
    wish.referral_id = None
    wish.problem = None


# --- visits ----------------------------------------------------------------------------


async def visit_completed(ctx: Context, delivery: Delivery[VisitCompleted]) -> None:
    data = delivery.data
    if data.referral_wished_module is None:
        return
    _known_module_and_traeger(ctx, data.referral_wished_module, None)
    await _wish(
        ctx,
        delivery,
        origin=ReferralOrigin.VISIT,
        source_id=data.visit_id,
        case_id=data.case_id,
        bezirk=data.bezirk,
        module=data.referral_wished_module,
        traeger=None,
        consent_ref=None,
        urgent=False,
        role=EventRole.FAMILIENBUERO,
    )


# --- shared ----------------------------------------------------------------------------


async def _places_freed(
    delivery: Delivery[Any], ctx: Context, referral_ids: list[str], now: datetime
) -> None:
    """Referrals cancelled or rejected just now free their places: the open wishes of their
    modules are tried again at once (skipping any another transaction holds, see
    ``ops.place_open_wishes``)."""
    if not referral_ids:
        return
    session = delivery.session
    modules = await session.execute(
        select(col(Referral.module)).where(col(Referral.referral_id).in_(referral_ids))
    )
    await ops.place_open_wishes(
        session,
        ctx,
        now,
        modules=sorted(set(modules.scalars())),
        skip_locked=True,
        defer=delivery.after_commit,
    )


def _known_module_and_traeger(ctx: Context, module: str, traeger: str | None) -> None:
    city = ctx.city
    if module not in city.module_slugs:
        raise EventRejected(f"module {module!r} is not in the offer catalogue of {city.name}")
    if traeger is not None and traeger not in city.traeger_slugs:
        raise EventRejected(f"Träger {traeger!r} is not in the offer catalogue of {city.name}")


async def _wish(
    ctx: Context,
    delivery: Delivery[Any],
    *,
    origin: ReferralOrigin,
    source_id: str,
    case_id: str,
    bezirk: str,
    module: str,
    traeger: str | None,
    consent_ref: str | None,
    urgent: bool,
    role: EventRole,
) -> None:
    session = delivery.session
    now = ctx.clock()
    existing = (
        await session.execute(
            select(Wish)
            .where(col(Wish.origin) == origin.value)
            .where(col(Wish.source_id) == source_id)
        )
    ).scalar_one_or_none()
    if existing is not None:
        return  # the same handover or visit sent again under a new event id
    wish = Wish(
        wish_id=str(uuid.uuid4()),
        origin=origin.value,
        source_id=source_id,
        case_id=case_id,
        bezirk=bezirk,
        module=module,
        traeger=traeger,
        consent_ref=consent_ref,
        urgent=urgent,
        requested_by_role=role.value,
        state="open",
        created_at=now,
        updated_at=now,
    )
    # Added by ``place`` once it knows the outcome, placed or waiting: one INSERT with the
    # final state. Placeable with a disclosure for intake to seal, it is added open and
    # placed once this transaction has committed, the seal asked for outside any
    # transaction and alongside those of the fetch's other wishes.
    await ops.place_or_defer(session, ctx, wish, now, delivery.after_commit)


# --- partner answers -------------------------------------------------------------------


async def partner_answer(ctx: Context, delivery: Delivery[PartnerReferralAnswer]) -> None:
    data = delivery.data
    settings = ctx.settings
    expected_topic = settings.topic(topics.partner_responses(data.traeger))
    if delivery.topic != expected_topic:
        reason = (
            f"answer of Träger {data.traeger} arrived on {delivery.topic}, "
            f"not on its own topic {expected_topic}"
        )
        raise _refused(AnswerRefusedCode.WRONG_TOPIC, reason)
    if delivery.event.source != data.partner_source():
        reason = (
            f"source {delivery.event.source} does not match Träger {data.traeger} "
            f"(expected {data.partner_source()})"
        )
        raise _refused(AnswerRefusedCode.WRONG_SOURCE, reason)
    session = delivery.session
    # Locked as it is read (PostgreSQL; SQLite's transaction holds the write lock from its
    # start): no concurrent step (HTTP or another answer) can come between judging the
    # answer and writing it, so it needs no savepoint and retry; one that committed first
    # is what this answer is judged against.
    referral = await session.get(Referral, data.referral_id, with_for_update=True)
    # Whether the referral exists, or is another Träger's, the sender is told alike.
    unknown = (
        f"no referral {data.referral_id} of case {data.case_id} is addressed to "
        f"Träger {data.traeger}"
    )
    if referral is None:
        raise _refused(
            AnswerRefusedCode.UNKNOWN_REFERRAL, f"no referral {data.referral_id}", unknown
        )
    if referral.traeger != data.traeger:
        raise _refused(
            AnswerRefusedCode.UNKNOWN_REFERRAL,
            f"referral {data.referral_id} is not addressed to Träger {data.traeger}",
            unknown,
        )
    if referral.case_id != data.case_id:
        raise _refused(
            AnswerRefusedCode.UNKNOWN_REFERRAL,
            f"referral {data.referral_id} belongs to another case",
            unknown,
        )
    now = ctx.clock()
    if data.occurred_at > now + timedelta(seconds=settings.answer_clock_skew_s):
        raise _refused(
            AnswerRefusedCode.IMPLAUSIBLE_TIME,
            f"occurred_at {data.occurred_at.isoformat()} lies in the future",
        )
    if data.occurred_at < referral.requested_at - timedelta(seconds=settings.answer_clock_skew_s):
        raise _refused(
            AnswerRefusedCode.IMPLAUSIBLE_TIME, "occurred_at lies before the referral was requested"
        )
    try:
        # Still written conditional on the referral's version (the ORM's version column).
        ops.take_step(
            session,
            ctx,
            referral,
            Step.from_answer(data.answer),
            actor=Actor.TRAEGER,
            role=EventRole.TRAEGER,
            occurred_at=data.occurred_at,
            now=now,
            details=StepDetails(rejection_reason=data.reason, reason_code=data.reason_code),
            source_event_id=delivery.event.id,
        )
    except TransitionRefused as exc:
        raise _refused(
            AnswerRefusedCode.ILLEGAL_STEP, f"referral {data.referral_id}: {exc.reason}"
        ) from None
    if Step.from_answer(data.answer) in domain.FREES_A_PLACE:
        await _places_freed(delivery, ctx, [referral.referral_id], now)


def _refused(code: AnswerRefusedCode, reason: str, public: str | None = None) -> EventRejected:
    """A refused answer: ``reason`` for the dead letter, ``public`` (default: the same)
    for the sender's notice."""
    return EventRejected(reason, code=code.value, public_reason=public or reason)


#: The code of a refusal the consumer itself made (before or around the handler).
_STAGE_CODES = {
    "envelope": AnswerRefusedCode.INVALID_ENVELOPE,
    "type": AnswerRefusedCode.UNKNOWN_TYPE,
    "schema": AnswerRefusedCode.SCHEMA_VIOLATION,
    "duplicate": AnswerRefusedCode.CONFLICTING_DUPLICATE,
}
#: Stages whose reason is about the sender's own message only, so it may be told.
_TOLD_AS_IS = {"envelope", "type", "schema"}


def refusal_notice(ctx: Context, refused: Refused, now: datetime) -> AnswerRefused | None:
    """The notice for the Träger whose message on its responses topic was refused, or None.

    It goes to the Träger that owns the topic the message arrived on (only that Träger may
    write there), if that is a Träger of the city's catalogue; never to a Träger the
    message merely names. It says what the sender may know: its own message's coordinates,
    a code and a reason, nothing of another Träger's referral (an unknown referral and
    another Träger's are refused alike)."""
    owners = {
        ctx.settings.topic(topics.partner_responses(slug)): slug for slug in ctx.city.traeger_slugs
    }
    traeger = owners.get(refused.topic)
    if traeger is None:
        return None
    if refused.code is not None:
        code = AnswerRefusedCode(refused.code)
        reason = refused.public_reason or "the answer was refused"
    else:
        code = _STAGE_CODES.get(refused.stage, AnswerRefusedCode.NOT_APPLIED)
        if refused.stage in _TOLD_AS_IS:
            reason = refused.reason
        elif code is AnswerRefusedCode.CONFLICTING_DUPLICATE:
            reason = "this event id was sent before with other data; use a new id"
        else:
            reason = "the answer could not be applied; Lotse's operators have it"
    event = refused.event
    return AnswerRefused(
        traeger=traeger,
        refused_event_id=None if event is None else event.id[:256],
        refused_event_type=None if event is None else event.type[:256],
        refused_topic=refused.topic,
        refused_partition=refused.partition,
        refused_offset=refused.offset,
        reason_code=code,
        reason=reason[:1000],
        refused_at=now,
    )


async def answer_refused(ctx: Context, refused: Refused) -> None:
    """Tell the sender of a refused answer on its own feed (``answer-refused``); the dead
    letter stays ops' copy. The notice's id is derived from the refused record's place, so a
    redelivery of the same record (after a crash) repeats the same notice, not a new one."""
    now = ctx.clock()
    notice = refusal_notice(ctx, refused, now)
    if notice is None:
        return
    notice_id = uuid.uuid5(
        uuid.NAMESPACE_URL,
        f"lotse:answer-refused:{refused.topic}:{refused.partition}:{refused.offset}",
    )
    async with ctx.db.transaction() as session:
        # For the Träger's feed only: a refused answer is no fact of the domain.
        ctx.outbox.add(session, notice, event_id=str(notice_id), audiences_only=True)
