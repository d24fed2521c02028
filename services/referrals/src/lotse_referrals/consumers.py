"""Event handlers: what intake and visits tell the service, and the Träger's answers.

``main`` reads ``lotse.intake`` and ``lotse.visits``: families and their consents, handover
requests, referral wishes from welcome visits, erasures. ``partners`` reads every Träger's
``lotse.partner.<traeger>.responses`` topic. An answer that is not the sender's to give or
does not follow the lifecycle is refused (dead-lettered with the reason) and changes
nothing.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from lotse_contracts import topics
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
    ReferralCancelReason,
    ReferralOrigin,
    ReferralStatus,
)
from lotse_contracts.events.visits import VisitCompleted
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.consumer import Delivery, EventRejected, Handler
from sqlalchemy import delete, select
from sqlmodel import col

from lotse_referrals import domain
from lotse_referrals import operations as ops
from lotse_referrals.domain import Actor, Step, TransitionRefused
from lotse_referrals.operations import Context, StepDetails
from lotse_referrals.tables import Case, ConsentRecord, Referral, Wish


def wire_consumers(runtime: ServiceRuntime[Any], ctx: Context) -> None:
    """Register both consumer groups of the service."""
    handlers = Handlers(runtime, ctx)
    runtime.add_consumer(
        "main",
        [topics.INTAKE, topics.VISITS],
        {
            FamilyRegistered.event_type: handlers.family_registered,
            ConsentChanged.event_type: handlers.consent_changed,
            HandoverRequested.event_type: handlers.handover_requested,
            FamilyErased.event_type: handlers.family_erased,
            CasesMerged.event_type: handlers.cases_merged,
            VisitCompleted.event_type: handlers.visit_completed,
        },
    )
    answers: dict[str, Handler] = {PartnerReferralAnswer.event_type: handlers.partner_answer}
    runtime.add_consumer(
        "partners", [topics.partner_responses(t) for t in runtime.city.traeger_slugs], answers
    )


class Handlers:
    def __init__(self, runtime: ServiceRuntime[Any], ctx: Context) -> None:
        self.runtime = runtime
        self.ctx = ctx

    # -- intake ----------------------------------------------------------------------------

    async def family_registered(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, FamilyRegistered)
        session = delivery.session
        case = await session.get(Case, data.case_id)
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
            )
        # Intake and visits are separate topics: a visit's wish may have come first.
        await ops.place_open_wishes(session, self.ctx, self.runtime.clock(), case_id=data.case_id)

    async def consent_changed(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, ConsentChanged)
        session = delivery.session
        now = self.runtime.clock()
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
            await ops.cancel_open(
                session,
                self.ctx,
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
                session.add(wish)
        else:
            await ops.place_open_wishes(session, self.ctx, now, case_id=data.case_id)

    async def handover_requested(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, HandoverRequested)
        self._known_module_and_traeger(data.module, data.traeger)
        await self._wish(
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

    async def family_erased(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, FamilyErased)
        session = delivery.session
        now = self.runtime.clock()
        await ops.cancel_open(
            session,
            self.ctx,
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
        await session.execute(
            delete(ConsentRecord).where(col(ConsentRecord.case_id) == data.case_id)
        )
        case = await session.get(Case, data.case_id)
        if case is None:
            # A tombstone, so that a late family-registered cannot bring the case back.
            case = Case(case_id=data.case_id, bezirk=data.bezirk, registered_at=data.erased_at)
        case.personal = None
        case.erased_at = data.erased_at
        session.add(case)
        # The sealed disclosures went out under the family key, which intake destroyed: the
        # copies on the Träger feeds are unreadable now; locally only field names remain.

    async def cases_merged(self, delivery: Delivery[Any]) -> None:
        """Two cases were one family; from now on it is referred as the survivor.

        Referrals of the merged case that a Träger has not accepted yet are cancelled
        (reason ``duplicate``; the Träger purges what it got) and, with the merged case's
        waiting wishes, move to the survivor as wishes of its own: placed again under the
        survivor's consents (intake carried the merged case's over) and key, unless the
        survivor already has one for that module, then they are dropped. A referral a
        Träger accepted or is working on stays as it is: the family is in good hands, and
        breaking the warm handover off would harm it."""
        data = delivery.data
        assert isinstance(data, CasesMerged)
        session = delivery.session
        now = self.runtime.clock()
        merged, survivor = data.merged_case_id, data.surviving_case_id
        cancelled = await session.execute(
            select(Referral)
            .where(col(Referral.case_id) == merged)
            .where(col(Referral.status).in_([s.value for s in domain.AWAITING_ANSWER]))
        )
        for referral in list(cancelled.scalars()):
            ops.take_step(
                session,
                self.ctx,
                referral,
                Step.CANCELLED,
                actor=Actor.SYSTEM,
                role=EventRole.SYSTEM,
                occurred_at=now,
                now=now,
                details=StepDetails(cancel_reason=ReferralCancelReason.DUPLICATE),
            )
        running = await session.execute(
            select(col(Referral.module))
            .where(col(Referral.case_id) == survivor)
            .where(col(Referral.status).in_([s.value for s in domain.OPEN_STATUSES]))
        )
        covered = set(running.scalars())
        waiting = await session.execute(
            select(Wish).where(col(Wish.state) == "open").where(col(Wish.case_id) == survivor)
        )
        covered |= {wish.module for wish in waiting.scalars()}
        moving = await session.execute(
            select(Wish, col(Referral.status))
            .outerjoin(Referral, col(Referral.referral_id) == col(Wish.referral_id))
            .where(col(Wish.case_id) == merged)
            .where(col(Wish.state).in_(["open", "placed"]))
        )
        for wish, status in list(moving.all()):
            if wish.state == "placed" and status != ReferralStatus.CANCELLED.value:
                continue  # still running with its Träger (accepted or further)
            if wish.state == "placed" and wish.referral_id is not None:
                # Cancelled just now for the merge, not by the family or the Träger before.
                placed = await session.get(Referral, wish.referral_id)
                if placed is None or placed.cancel_reason != ReferralCancelReason.DUPLICATE:
                    continue
            wish.updated_at = now
            if wish.module in covered:
                wish.state = "dropped"
                wish.problem = f"merged into case {survivor}, which has this module already"
            else:
                covered.add(wish.module)
                wish.case_id = survivor
                wish.bezirk = data.bezirk
                wish.consent_ref = None  # the survivor's consents decide
                wish.state = "open"
                wish.referral_id = None
                wish.problem = None
            session.add(wish)
        await ops.place_open_wishes(session, self.ctx, now, case_id=survivor)

    # -- visits ----------------------------------------------------------------------------

    async def visit_completed(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, VisitCompleted)
        if data.referral_wished_module is None:
            return
        self._known_module_and_traeger(data.referral_wished_module, None)
        await self._wish(
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

    # -- shared ----------------------------------------------------------------------------

    def _known_module_and_traeger(self, module: str, traeger: str | None) -> None:
        city = self.runtime.city
        if module not in city.module_slugs:
            raise EventRejected(f"module {module!r} is not in the offer catalogue of {city.name}")
        if traeger is not None and traeger not in city.traeger_slugs:
            raise EventRejected(f"Träger {traeger!r} is not in the offer catalogue of {city.name}")

    async def _wish(
        self,
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
        now = self.runtime.clock()
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
        session.add(wish)
        await ops.place(session, self.ctx, wish, now)

    # -- partner answers -------------------------------------------------------------------

    async def partner_answer(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, PartnerReferralAnswer)
        settings = self.ctx.settings
        expected_topic = settings.topic(topics.partner_responses(data.traeger))
        if delivery.topic != expected_topic:
            raise EventRejected(
                f"answer of Träger {data.traeger} arrived on {delivery.topic}, "
                f"not on its own topic {expected_topic}"
            )
        if delivery.event.source != data.partner_source():
            raise EventRejected(
                f"source {delivery.event.source} does not match Träger {data.traeger} "
                f"(expected {data.partner_source()})"
            )
        session = delivery.session
        referral = await session.get(Referral, data.referral_id)
        if referral is None:
            raise EventRejected(f"no referral {data.referral_id}")
        if referral.traeger != data.traeger:
            raise EventRejected(
                f"referral {data.referral_id} is not addressed to Träger {data.traeger}"
            )
        if referral.case_id != data.case_id:
            raise EventRejected(f"referral {data.referral_id} belongs to another case")
        now = self.runtime.clock()
        if data.occurred_at > now + timedelta(seconds=settings.answer_clock_skew_s):
            raise EventRejected(f"occurred_at {data.occurred_at.isoformat()} lies in the future")
        if data.occurred_at < referral.requested_at - timedelta(
            seconds=settings.answer_clock_skew_s
        ):
            raise EventRejected("occurred_at lies before the referral was requested")
        try:
            # Conditional on the referral's version: an answer that lost against a
            # concurrent step (HTTP or another answer) is refused like any illegal one.
            await ops.take_step_now(
                session,
                self.ctx,
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
            raise EventRejected(f"referral {data.referral_id}: {exc.reason}") from None
