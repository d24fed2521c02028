"""What the visits service does on its own: react to intake events, and notice overdue cases.

Intake events can arrive twice or out of order (a consent withdrawal may overtake the
registration, an erasure may come first of all). Every handler therefore stores what it
learnt per case and decides from the stored whole, so that each family gets at most one
automatic welcome-visit proposal, and none without consent.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from typing import Any

from lotse_contracts import topics
from lotse_contracts.city import UnknownBezirk
from lotse_contracts.events.common import ConsentScope
from lotse_contracts.events.intake import (
    CasesMerged,
    ConsentChanged,
    FamilyErased,
    FamilyRegistered,
)
from lotse_contracts.events.visits import VisitCancelReason, VisitOverdue
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.consumer import Delivery, EventRejected
from sqlalchemy import delete, select, update
from sqlmodel import col

from lotse_visits import domain, store
from lotse_visits.domain import CaseState, ConsentFact, Office
from lotse_visits.tables import VisitsCase, VisitsConsent, VisitsVisit

_log = logging.getLogger(__name__)


class IntakeHandlers:
    """Handlers of the intake events, bound to one runtime."""

    def __init__(self, runtime: ServiceRuntime[Any]) -> None:
        self.runtime = runtime

    async def family_registered(self, delivery: Delivery[Any]) -> None:
        # The queries of one event never need to see its own new rows, so they are written
        # in one flush at its end (a round trip per row saved) — before the next event of a
        # batch, which shares the transaction and must see them.
        with delivery.session.no_autoflush:
            await self._family_registered(delivery)
        await delivery.session.flush()

    async def consent_changed(self, delivery: Delivery[Any]) -> None:
        with delivery.session.no_autoflush:
            await self._consent_changed(delivery)
        await delivery.session.flush()

    async def _family_registered(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, FamilyRegistered)
        runtime, session = self.runtime, delivery.session
        try:
            office = Office.of(runtime.city, data.bezirk)
        except UnknownBezirk as exc:
            raise EventRejected(f"bezirk: {exc}") from None
        now = runtime.clock()
        case = await store.locked_case(session, data.case_id, data.bezirk)
        new_case = case is None
        if case is None:
            case = VisitsCase(
                case_id=data.case_id,
                bezirk=data.bezirk,
                state=CaseState.AWAITING_REGISTRATION.value,
                updated_at=now,
            )
            session.add(case)
        if case.state == CaseState.ERASED.value:
            _log.info("registration of an erased case ignored", extra={"case": data.case_id})
            return
        facts = await store.record_consents(
            session,
            data.case_id,
            [
                ConsentFact(c.consent_id, c.state, c.at)
                for c in data.consents
                if c.scope is ConsentScope.WELCOME_VISIT
            ],
            new_case=new_case,
        )
        if case.state != CaseState.AWAITING_REGISTRATION.value:
            # Registered before: one welcome visit per family, so only consents count.
            await store.apply_consent(session, runtime, case, facts, now=now)
            return
        reference = domain.reference_date(
            data.channel,
            data.registered_at,
            data.days_since_birth_at_registration,
            office.zone,
        )
        # The registration decides the Bezirk (an early consent change may have filed
        # the case elsewhere; locked_case locked both offices then).
        case.bezirk = data.bezirk
        case.channel = data.channel.value
        case.clinic_id = data.clinic_id
        case.registered_at = data.registered_at
        case.reference_date = reference
        case.target_date = domain.target_date(reference, store.target_days(runtime))
        case.intake_target_date = data.visit_target_date
        case.children_count = data.children_count
        case.preferred_language = data.preferred_language
        case.personal = data.personal.model_dump_json()
        case.state = CaseState.WITHOUT_CONSENT.value
        await store.apply_consent(session, runtime, case, facts, now=now, new_case=new_case)

    async def _consent_changed(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, ConsentChanged)
        if data.scope is not ConsentScope.WELCOME_VISIT:
            return  # Träger contact and screening use are the referrals' business
        runtime, session = self.runtime, delivery.session
        now = runtime.clock()
        case = await store.locked_case(session, data.case_id, data.bezirk)
        new_case = case is None
        if case is None:
            # The change overtook the registration: remember it for when that arrives.
            case = VisitsCase(
                case_id=data.case_id,
                bezirk=data.bezirk,
                state=CaseState.AWAITING_REGISTRATION.value,
                updated_at=now,
            )
            session.add(case)
        if case.state == CaseState.ERASED.value:
            return
        facts = await store.record_consents(
            session,
            data.case_id,
            [ConsentFact(data.consent_id, data.state, data.changed_at)],
            new_case=new_case,
        )
        await store.apply_consent(session, runtime, case, facts, now=now)

    async def family_erased(self, delivery: Delivery[Any]) -> None:
        data = delivery.data
        assert isinstance(data, FamilyErased)
        runtime, session = self.runtime, delivery.session
        now = runtime.clock()
        runtime.db.forget_after_commit(session)
        case = await store.locked_case(session, data.case_id, data.bezirk)
        if case is None:
            # Erased before its registration arrived: a tombstone keeps a late registration
            # from scheduling anything.
            case = VisitsCase(
                case_id=data.case_id,
                bezirk=data.bezirk,
                state=CaseState.ERASED.value,
                updated_at=now,
            )
            session.add(case)
        await store.cancel_open_visit(
            session, runtime, case, reason=VisitCancelReason.CASE_ERASED, now=now
        )
        purge(case)
        case.state = CaseState.ERASED.value
        case.erased_at = data.erased_at
        case.updated_at = now
        await session.execute(
            delete(VisitsConsent).where(col(VisitsConsent.case_id) == data.case_id)
        )
        # What was said in a visit is about the family; when and whether it took place
        # stays, pseudonymous, for the calendar and the figures.
        await session.execute(
            update(VisitsVisit)
            .where(col(VisitsVisit.case_id) == data.case_id)
            .values(topics=None, needs_noted=None, referral_wished_module=None)
        )

    async def cases_merged(self, delivery: Delivery[Any]) -> None:
        """Two cases were one family: it is visited once, as the survivor. The merged case's
        open visit is cancelled (reason ``duplicate``) and the case closed; the survivor
        keeps or gets its own visit from its consents (intake carried the merged case's over
        to it, as ``consent-changed`` of the survivor). A family already visited under the
        merged case is not visited again: the survivor's open visit is cancelled too."""
        data = delivery.data
        assert isinstance(data, CasesMerged)
        runtime, session = self.runtime, delivery.session
        now = runtime.clock()
        merged = await store.locked_case(session, data.merged_case_id, data.merged_bezirk)
        if merged is None:
            # Merged before its registration arrived: a closed tombstone keeps a late
            # registration from scheduling anything.
            merged = VisitsCase(
                case_id=data.merged_case_id,
                bezirk=data.merged_bezirk,
                state=CaseState.CLOSED.value,
                updated_at=now,
            )
            session.add(merged)
        if merged.state == CaseState.ERASED.value:
            return
        visited = merged.state == CaseState.VISITED.value
        await store.cancel_open_visit(
            session, runtime, merged, reason=VisitCancelReason.DUPLICATE, now=now
        )
        merged.state = CaseState.CLOSED.value
        merged.updated_at = now
        merged.personal = None
        survivor = await store.locked_case(session, data.surviving_case_id, data.bezirk)
        if visited and survivor is not None and survivor.state == CaseState.ACTIVE.value:
            await store.cancel_open_visit(
                session, runtime, survivor, reason=VisitCancelReason.DUPLICATE, now=now
            )
            survivor.state = CaseState.VISITED.value
            survivor.updated_at = now
        await session.flush()


def purge(case: VisitsCase) -> None:
    """Drop everything of an erased case that could single the family out."""
    case.personal = None
    case.clinic_id = None
    case.registered_at = None
    case.reference_date = None
    case.intake_target_date = None
    case.children_count = None
    case.preferred_language = None


async def check_overdue(runtime: ServiceRuntime[Any]) -> None:
    """Raise "visit overdue" once for every due case whose target date has passed.

    Runs periodically. The conditional update marks a case as reported and publishes in one
    transaction, so a case is reported exactly once however often the check runs, and never
    after its visit was completed in the meantime.
    """
    now = runtime.clock()
    today = now.astimezone(runtime.city.zone()).date()
    batch = store.settings_of(runtime).overdue_batch_size
    skipped: set[str] = set()
    while True:
        async with runtime.db.transaction() as session:
            query = (
                select(VisitsCase)
                .where(
                    col(VisitsCase.state) == CaseState.ACTIVE.value,
                    col(VisitsCase.overdue_raised_at).is_(None),
                    col(VisitsCase.target_date) < today,
                )
                .order_by(col(VisitsCase.target_date))
                .limit(batch)
            )
            if skipped:
                query = query.where(col(VisitsCase.case_id).not_in(skipped))
            cases = list((await session.execute(query)).scalars())
            for case in cases:
                assert case.target_date is not None
                try:
                    office = Office.of(runtime.city, case.bezirk)
                except UnknownBezirk:
                    _log.error(
                        "case of a Bezirk the city no longer has", extra={"case": case.case_id}
                    )
                    skipped.add(case.case_id)
                    continue
                marked = await session.execute(
                    update(VisitsCase)
                    .where(
                        col(VisitsCase.case_id) == case.case_id,
                        col(VisitsCase.state) == CaseState.ACTIVE.value,
                        col(VisitsCase.overdue_raised_at).is_(None),
                    )
                    .values(overdue_raised_at=now)
                )
                if not marked.rowcount:  # type: ignore[attr-defined]
                    continue  # completed, declined or reported meanwhile
                runtime.outbox.add(
                    session,
                    overdue_event(case, office, today=today, now=now),
                    time=now,
                )
        if len(cases) < batch:
            return


def overdue_event(case: VisitsCase, office: Office, *, today: date, now: datetime) -> VisitOverdue:
    assert case.target_date is not None
    return VisitOverdue(
        case_id=case.case_id,
        bezirk=case.bezirk,
        familienbuero=office.slug,
        visit_id=case.open_visit_id,
        target_date=case.target_date,
        days_overdue=domain.days_overdue(case.target_date, today),
        detected_at=now,
    )


def wire(runtime: ServiceRuntime[Any]) -> None:
    """Register the intake consumer and the overdue check."""
    handlers = IntakeHandlers(runtime)
    runtime.add_consumer(
        "main",
        [topics.INTAKE],
        {
            FamilyRegistered.event_type: handlers.family_registered,
            ConsentChanged.event_type: handlers.consent_changed,
            FamilyErased.event_type: handlers.family_erased,
            CasesMerged.event_type: handlers.cases_merged,
        },
    )
    runtime.add_job("overdue", store.settings_of(runtime).overdue_check_interval_s, check_overdue)
