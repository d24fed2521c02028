"""Welcome-visit events (Willkommensbesuch) of the Familienbüros (district family offices).

Producer: the visits service (``/lotse/visits``), topic ``lotse.visits``. A visit is
proposed automatically inside office hours and staff capacity before the case's target
date; rescheduling, no-shows, declines, cancellations and the outcome are events, and a
case without a visit by its target date raises ``visit-overdue``.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import ClassVar

from pydantic import AwareDatetime, Field, model_validator

from lotse_contracts import topics
from lotse_contracts.events.base import CATALOGUE, EventModel
from lotse_contracts.events.common import (
    BERLIN_WINTER,
    DOCUMENTED,
    EXAMPLE_BEZIRK,
    EXAMPLE_BIRTH,
    EXAMPLE_CASE_ID,
    EXAMPLE_FAMILIENBUERO,
    EXAMPLE_MODULE,
    EXAMPLE_STAFF_ID,
    EXAMPLE_VISIT_ID,
    EXAMPLE_VISIT_START,
    EXAMPLE_VISIT_TARGET,
    CaseId,
    Role,
    Slug,
    StaffId,
    Uuid,
)

SOURCE = "/lotse/visits"


class VisitSetting(StrEnum):
    """Where the visit takes place: at the family's home, in the Familienbüro, or by phone."""

    HOME = "home"
    FAMILIENBUERO = "familienbuero"
    PHONE = "phone"


class TargetMissedReason(StrEnum):
    """Why the visit cannot happen by the target date."""

    NO_CAPACITY = "no_capacity"
    FAMILY_REQUEST = "family_request"
    FAMILY_UNREACHABLE = "family_unreachable"
    LATE_REGISTRATION = "late_registration"


class RescheduleInitiator(StrEnum):
    """Who asked to move the appointment."""

    FAMILY = "family"
    FAMILIENBUERO = "familienbuero"


class VisitTopic(StrEnum):
    """Topics discussed in a welcome visit (documented list, extended only by a new major).

    ``health`` (child and parent health, check-ups, vaccinations), ``sleep``, ``feeding``,
    ``childcare`` (day care by Tagespflege), ``kita`` (day-care centre places),
    ``financial_support`` (Elterngeld, Kindergeld, other benefits), ``parenting``,
    ``language_courses``, ``early_help_offers`` (Frühe Hilfen in the Bezirk),
    ``safety`` (accident prevention, safe sleep).
    """

    HEALTH = "health"
    SLEEP = "sleep"
    FEEDING = "feeding"
    CHILDCARE = "childcare"
    KITA = "kita"
    FINANCIAL_SUPPORT = "financial_support"
    PARENTING = "parenting"
    LANGUAGE_COURSES = "language_courses"
    EARLY_HELP_OFFERS = "early_help_offers"
    SAFETY = "safety"


class MissedFollowUp(StrEnum):
    """What the Familienbüro does after a no-show."""

    NEW_APPOINTMENT_OFFERED = "new_appointment_offered"
    LETTER_SENT = "letter_sent"
    NO_FURTHER_ATTEMPT = "no_further_attempt"


class DeclineChannel(StrEnum):
    """How the family said it does not want a visit."""

    PHONE = "phone"
    LETTER = "letter"
    IN_PERSON = "in_person"
    ONLINE = "online"


class VisitCancelReason(StrEnum):
    """Why the Familienbüro cancelled a planned visit."""

    STAFF_UNAVAILABLE = "staff_unavailable"
    FAMILY_MOVED_AWAY = "family_moved_away"
    CONSENT_WITHDRAWN = "consent_withdrawn"
    CASE_ERASED = "case_erased"
    DUPLICATE = "duplicate"
    OTHER = "other"


class _VisitEvent(EventModel):
    model_config = DOCUMENTED

    topic: ClassVar[str] = topics.VISITS
    source: ClassVar[str] = SOURCE


def _check_appointment(
    starts_at: datetime, ends_at: datetime, target_missed: bool, reason: TargetMissedReason | None
) -> None:
    if ends_at <= starts_at:
        raise ValueError("ends_at must be after starts_at")
    if reason is not None and not target_missed:
        raise ValueError("target_missed_reason is only allowed when target_missed is true")


@CATALOGUE.register
class VisitScheduled(_VisitEvent):
    """A welcome visit was scheduled (proposed automatically or by staff)."""

    event_type: ClassVar[str] = "de.lotse.visits.visit-scheduled.v1"

    visit_id: Uuid
    """Id of the visit."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    familienbuero: Slug
    """The Familienbüro doing the visit, e.g. ``familienbuero-hoerde``."""
    staff_id: StaffId
    """Pseudonymous id of the staff member assigned."""
    starts_at: AwareDatetime
    """Start of the appointment."""
    ends_at: AwareDatetime
    """End of the appointment."""
    setting: VisitSetting = VisitSetting.HOME
    """Where the visit takes place."""
    target_date: date
    """Date by which the visit should take place."""
    target_missed: bool
    """True if the appointment is after ``target_date`` (the target could not be met)."""
    target_missed_reason: TargetMissedReason | None = None
    """Why the target could not be met (only when ``target_missed``)."""
    proposed_automatically: bool = True
    """True if the scheduler proposed the slot, false if staff chose it."""
    scheduled_at: AwareDatetime
    """When the appointment was made."""

    @model_validator(mode="after")
    def _consistent(self) -> VisitScheduled:
        _check_appointment(
            self.starts_at, self.ends_at, self.target_missed, self.target_missed_reason
        )
        return self

    @classmethod
    def example(cls) -> VisitScheduled:
        return cls(
            visit_id=EXAMPLE_VISIT_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            familienbuero=EXAMPLE_FAMILIENBUERO,
            staff_id=EXAMPLE_STAFF_ID,
            starts_at=EXAMPLE_VISIT_START,
            ends_at=EXAMPLE_VISIT_START + timedelta(hours=1),
            target_date=EXAMPLE_VISIT_TARGET,
            target_missed=False,
            scheduled_at=datetime(2025, 3, 3, 9, 16, tzinfo=BERLIN_WINTER),
        )


@CATALOGUE.register
class VisitRescheduled(_VisitEvent):
    """A scheduled welcome visit was moved to another time."""

    event_type: ClassVar[str] = "de.lotse.visits.visit-rescheduled.v1"

    visit_id: Uuid
    """Id of the visit."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    familienbuero: Slug
    """The Familienbüro doing the visit."""
    staff_id: StaffId
    """Pseudonymous id of the staff member now assigned."""
    previous_starts_at: AwareDatetime
    """Start of the appointment before the change."""
    starts_at: AwareDatetime
    """New start of the appointment."""
    ends_at: AwareDatetime
    """New end of the appointment."""
    target_date: date
    """Date by which the visit should take place."""
    target_missed: bool
    """True if the new appointment is after ``target_date``."""
    target_missed_reason: TargetMissedReason | None = None
    """Why the target could not be met (only when ``target_missed``)."""
    rescheduled_by: RescheduleInitiator
    """Who asked for the change."""
    rescheduled_at: AwareDatetime
    """When the appointment was changed."""

    @model_validator(mode="after")
    def _consistent(self) -> VisitRescheduled:
        _check_appointment(
            self.starts_at, self.ends_at, self.target_missed, self.target_missed_reason
        )
        return self

    @classmethod
    def example(cls) -> VisitRescheduled:
        new_start = datetime(2025, 3, 14, 9, 0, tzinfo=BERLIN_WINTER)
        return cls(
            visit_id=EXAMPLE_VISIT_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            familienbuero=EXAMPLE_FAMILIENBUERO,
            staff_id=EXAMPLE_STAFF_ID,
            previous_starts_at=EXAMPLE_VISIT_START,
            starts_at=new_start,
            ends_at=new_start + timedelta(hours=1),
            target_date=EXAMPLE_VISIT_TARGET,
            target_missed=False,
            rescheduled_by=RescheduleInitiator.FAMILY,
            rescheduled_at=datetime(2025, 3, 10, 8, 20, tzinfo=BERLIN_WINTER),
        )


@CATALOGUE.register
class VisitCompleted(_VisitEvent):
    """A welcome visit took place; the outcome, without any free text."""

    event_type: ClassVar[str] = "de.lotse.visits.visit-completed.v1"

    visit_id: Uuid
    """Id of the visit."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    familienbuero: Slug
    """The Familienbüro that did the visit."""
    staff_id: StaffId | None = None
    """Pseudonymous id of the staff member who did it."""
    scheduled_for: AwareDatetime
    """Start of the appointment as scheduled."""
    completed_at: AwareDatetime
    """When the visit was recorded as done."""
    setting: VisitSetting = VisitSetting.HOME
    """Where the visit took place."""
    informed_about_offers: bool
    """The family was informed about the offers in its Bezirk."""
    topics: list[VisitTopic] = Field(default_factory=list)
    """Topics discussed."""
    needs_noted: bool
    """Staff noted a need for further support."""
    referral_wished_module: Slug | None = None
    """Module the family wishes to be referred to, if any (offer catalogue slug)."""
    days_since_reference: int = Field(ge=0)
    """Days from the reference date (birth, or move-in) to the visit; used by reporting."""

    @classmethod
    def example(cls) -> VisitCompleted:
        return cls(
            visit_id=EXAMPLE_VISIT_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            familienbuero=EXAMPLE_FAMILIENBUERO,
            staff_id=EXAMPLE_STAFF_ID,
            scheduled_for=EXAMPLE_VISIT_START,
            completed_at=datetime(2025, 3, 12, 11, 5, tzinfo=BERLIN_WINTER),
            informed_about_offers=True,
            topics=[VisitTopic.SLEEP, VisitTopic.KITA, VisitTopic.EARLY_HELP_OFFERS],
            needs_noted=True,
            referral_wished_module=EXAMPLE_MODULE,
            days_since_reference=(EXAMPLE_VISIT_START.date() - EXAMPLE_BIRTH).days,
        )


@CATALOGUE.register
class VisitMissed(_VisitEvent):
    """The family was not there for a scheduled visit (no-show)."""

    event_type: ClassVar[str] = "de.lotse.visits.visit-missed.v1"

    visit_id: Uuid
    """Id of the visit."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    familienbuero: Slug
    """The Familienbüro that attempted the visit."""
    scheduled_for: AwareDatetime
    """Start of the missed appointment."""
    attempt: int = Field(ge=1)
    """Which attempt this was (1 for the first appointment)."""
    follow_up: MissedFollowUp
    """What happens next."""
    recorded_at: AwareDatetime
    """When the no-show was recorded."""

    @classmethod
    def example(cls) -> VisitMissed:
        return cls(
            visit_id=EXAMPLE_VISIT_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            familienbuero=EXAMPLE_FAMILIENBUERO,
            scheduled_for=EXAMPLE_VISIT_START,
            attempt=1,
            follow_up=MissedFollowUp.NEW_APPOINTMENT_OFFERED,
            recorded_at=datetime(2025, 3, 12, 10, 45, tzinfo=BERLIN_WINTER),
        )


@CATALOGUE.register
class VisitDeclined(_VisitEvent):
    """The family does not want a welcome visit. No reason is recorded: declining is free."""

    event_type: ClassVar[str] = "de.lotse.visits.visit-declined.v1"

    visit_id: Uuid | None = None
    """Id of the visit, if one had been scheduled."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    familienbuero: Slug
    """The Familienbüro that offered the visit."""
    declined_via: DeclineChannel
    """How the family declined."""
    declined_at: AwareDatetime
    """When the family declined."""

    @classmethod
    def example(cls) -> VisitDeclined:
        return cls(
            visit_id=EXAMPLE_VISIT_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            familienbuero=EXAMPLE_FAMILIENBUERO,
            declined_via=DeclineChannel.PHONE,
            declined_at=datetime(2025, 3, 5, 14, 30, tzinfo=BERLIN_WINTER),
        )


@CATALOGUE.register
class VisitCancelled(_VisitEvent):
    """The Familienbüro cancelled a scheduled visit."""

    event_type: ClassVar[str] = "de.lotse.visits.visit-cancelled.v1"

    visit_id: Uuid
    """Id of the visit."""
    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    familienbuero: Slug
    """The Familienbüro that cancelled."""
    reason: VisitCancelReason
    """Why the visit was cancelled."""
    cancelled_by_role: Role = Role.FAMILIENBUERO
    """Role of the person (or ``system``) that cancelled."""
    cancelled_at: AwareDatetime
    """When the visit was cancelled."""

    @classmethod
    def example(cls) -> VisitCancelled:
        return cls(
            visit_id=EXAMPLE_VISIT_ID,
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            familienbuero=EXAMPLE_FAMILIENBUERO,
            reason=VisitCancelReason.STAFF_UNAVAILABLE,
            cancelled_at=datetime(2025, 3, 11, 7, 50, tzinfo=BERLIN_WINTER),
        )


@CATALOGUE.register
class VisitOverdue(_VisitEvent):
    """A case has had no welcome visit by its target date."""

    event_type: ClassVar[str] = "de.lotse.visits.visit-overdue.v1"

    case_id: CaseId
    """Pseudonymous case id (UUID) of the family."""
    bezirk: Slug
    """Stadtbezirk slug of the case."""
    familienbuero: Slug
    """The Familienbüro responsible."""
    visit_id: Uuid | None = None
    """The pending visit, if one is scheduled (after the target date)."""
    target_date: date
    """The target date that passed."""
    days_overdue: int = Field(ge=1)
    """Days since ``target_date``."""
    detected_at: AwareDatetime
    """When the overdue check found it."""

    @classmethod
    def example(cls) -> VisitOverdue:
        return cls(
            case_id=EXAMPLE_CASE_ID,
            bezirk=EXAMPLE_BEZIRK,
            familienbuero=EXAMPLE_FAMILIENBUERO,
            target_date=EXAMPLE_VISIT_TARGET,
            days_overdue=1,
            detected_at=datetime(2025, 3, 18, 6, 0, tzinfo=BERLIN_WINTER),
        )
