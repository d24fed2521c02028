"""The visits service's tables and the models of its HTTP API.

Personal data arrives only as the encrypted block of "family registered"; it is kept exactly
as received (``visits_case.personal``), never opened here, and dropped when the family
withdraws its welcome-visit consent or is erased. Everything else is pseudonymous: case
ids, staff position ids, times, codes.
"""

from __future__ import annotations

from datetime import date, datetime

from lotse_contracts.events.common import ConsentState, Slug
from lotse_contracts.events.visits import (
    DeclineChannel,
    MissedFollowUp,
    RescheduleInitiator,
    TargetMissedReason,
    VisitCancelReason,
    VisitSetting,
    VisitTopic,
)
from lotse_contracts.personal import EncryptedBlock
from lotse_runtime.inputs import (
    APPOINTMENT,
    RECORDED,
    AppointmentMoment,
    RecordedMoment,
    RequestModel,
)
from pydantic import BaseModel, Field
from sqlalchemy import Column, Index, Text
from sqlmodel import Field as TableField
from sqlmodel import SQLModel

from lotse_visits.domain import CaseState, VisitStatus

# -- tables --------------------------------------------------------------------------------------


class VisitsOffice(SQLModel, table=True):
    """One row per Familienbüro, written before every change to its calendar.

    The write locks the row, so bookings of one office are made one after the other
    (no double booking across concurrent requests and consumers) while other offices
    book in parallel.
    """

    __tablename__ = "visits_office"

    bezirk: str = TableField(primary_key=True, max_length=64)
    bookings_changed: int = TableField(default=0, description="Counts calendar changes.")


class VisitsCase(SQLModel, table=True):
    """What the visits service knows of one family's case."""

    __tablename__ = "visits_case"
    __table_args__ = (Index("ix_visits_case_due", "state", "target_date"),)

    case_id: str = TableField(primary_key=True, max_length=36)
    bezirk: str = TableField(max_length=64, index=True)
    state: str = TableField(max_length=32)
    channel: str | None = TableField(default=None, max_length=16)
    clinic_id: str | None = TableField(default=None, max_length=64)
    registered_at: datetime | None = None
    reference_date: date | None = TableField(
        default=None, description="Birth (clinic) or move-in notice (move-in)."
    )
    target_date: date | None = TableField(
        default=None, description="Date by which the welcome visit should have happened."
    )
    intake_target_date: date | None = TableField(
        default=None, description="visit_target_date as intake computed it."
    )
    children_count: int | None = None
    preferred_language: str | None = TableField(default=None, max_length=3)
    personal: str | None = TableField(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="EncryptedBlock (JSON) exactly as received; null once purged.",
    )
    open_visit_id: str | None = TableField(default=None, max_length=36)
    overdue_raised_at: datetime | None = None
    erased_at: datetime | None = None
    updated_at: datetime


class VisitsConsent(SQLModel, table=True):
    """Latest known statement on one welcome-visit consent of a case (out-of-order safe)."""

    __tablename__ = "visits_consent"

    consent_id: str = TableField(primary_key=True, max_length=36)
    case_id: str = TableField(max_length=36, index=True)
    state: str = TableField(max_length=16)
    at: datetime = TableField(description="When the family gave or withdrew it.")


class VisitsVisit(SQLModel, table=True):
    """One appointment of a welcome visit and what became of it."""

    __tablename__ = "visits_visit"
    __table_args__ = (
        Index("ix_visits_visit_calendar", "bezirk", "starts_at"),
        Index("ix_visits_visit_booked", "bezirk", "status", "starts_at"),
    )

    visit_id: str = TableField(primary_key=True, max_length=36)
    case_id: str = TableField(max_length=36, index=True)
    bezirk: str = TableField(max_length=64)
    familienbuero: str = TableField(max_length=64)
    staff_id: str = TableField(max_length=64)
    starts_at: datetime
    ends_at: datetime
    setting: str = TableField(max_length=16)
    status: str = TableField(max_length=16)
    attempt: int = TableField(description="1 for the family's first appointment.")
    target_date: date
    target_missed: bool
    target_missed_reason: str | None = TableField(default=None, max_length=32)
    proposed_automatically: bool
    scheduled_at: datetime
    reschedule_count: int = 0
    closed_at: datetime | None = TableField(
        default=None, description="When it was completed, missed, declined or cancelled."
    )
    informed_about_offers: bool | None = None
    topics: str | None = TableField(
        default=None, max_length=400, description="Comma-separated VisitTopic codes."
    )
    needs_noted: bool | None = None
    referral_wished_module: str | None = TableField(default=None, max_length=64)
    missed_follow_up: str | None = TableField(default=None, max_length=32)
    follow_up_visit_id: str | None = TableField(default=None, max_length=36)
    declined_via: str | None = TableField(default=None, max_length=16)
    cancel_reason: str | None = TableField(default=None, max_length=32)
    cancelled_by_role: str | None = TableField(default=None, max_length=32)


TABLES: list[type[SQLModel]] = [VisitsOffice, VisitsCase, VisitsConsent, VisitsVisit]

# -- API models ----------------------------------------------------------------------------------


class _Body(RequestModel):
    """Unknown fields are refused (a typo in an action must not pass silently), and so are
    control characters in text (RequestModel, lotse_runtime.inputs)."""


class RescheduleRequest(_Body):
    starts_at: AppointmentMoment = Field(
        description=f"New start, with time-zone offset; {APPOINTMENT.text}, and inside the "
        "office's working times."
    )
    staff_id: str | None = Field(
        default=None,
        max_length=64,
        description="Staff member to take it; default: the one assigned, else anyone free.",
    )
    rescheduled_by: RescheduleInitiator = Field(description="Who asked for the change.")


class NoShowRequest(_Body):
    follow_up: MissedFollowUp = Field(
        description=(
            "What happens next; new_appointment_offered schedules the next free slot at once."
        )
    )


class DeclineRequest(_Body):
    declined_via: DeclineChannel = Field(description="How the family declined.")


class CancelRequest(_Body):
    reason: VisitCancelReason = Field(
        description="Why; consent_withdrawn and case_erased are set only by the system."
    )


class CompleteRequest(_Body):
    completed_at: RecordedMoment | None = Field(
        default=None,
        description=f"When the visit was done, with time-zone offset; default now. "
        f"{RECORDED.text}, and not before the appointment's start.",
    )
    setting: VisitSetting | None = Field(
        default=None, description="Where it took place; default as planned."
    )
    informed_about_offers: bool = Field(description="The family heard about the offers.")
    topics: list[VisitTopic] = Field(
        default_factory=list, max_length=len(VisitTopic), description="Topics discussed."
    )
    needs_noted: bool = Field(description="Staff noted a need for further support.")
    referral_wished_module: Slug | None = Field(
        default=None, description="Offer module the family wishes a referral to."
    )


class NewVisitRequest(_Body):
    starts_at: AppointmentMoment | None = Field(
        default=None,
        description=f"Start chosen by staff, with time-zone offset; default: the first free "
        f"slot. {APPOINTMENT.text}, and inside the office's working times.",
    )
    staff_id: str | None = Field(
        default=None, max_length=64, description="Staff member; default: anyone free."
    )
    setting: VisitSetting = Field(default=VisitSetting.HOME, description="Where it takes place.")


class Outcome(BaseModel):
    informed_about_offers: bool
    topics: list[VisitTopic]
    needs_noted: bool
    referral_wished_module: str | None


class VisitPublic(BaseModel):
    """A visit as staff see it. ``staff_id`` is left out for the Bezirksteam."""

    visit_id: str
    case_id: str
    bezirk: str
    familienbuero: str
    staff_id: str | None
    starts_at: datetime
    ends_at: datetime
    setting: VisitSetting
    status: VisitStatus
    attempt: int
    target_date: date
    target_missed: bool
    target_missed_reason: TargetMissedReason | None
    proposed_automatically: bool
    scheduled_at: datetime
    reschedule_count: int
    closed_at: datetime | None
    outcome: Outcome | None
    missed_follow_up: MissedFollowUp | None
    follow_up_visit_id: str | None
    declined_via: DeclineChannel | None
    cancel_reason: VisitCancelReason | None


class CasePublic(BaseModel):
    """A family's case as the Familienbüro sees it; ``personal`` only for the office."""

    case_id: str
    bezirk: str
    state: CaseState
    channel: str | None
    registered_at: datetime | None
    reference_date: date | None
    target_date: date | None
    children_count: int | None
    preferred_language: str | None
    welcome_visit_consent: ConsentState | None
    overdue_raised_at: datetime | None
    personal: EncryptedBlock | None = Field(
        description="Sealed names, address and phone as intake sent them; open with the key."
    )
    visits: list[VisitPublic]


class VisitDetails(BaseModel):
    visit: VisitPublic
    case: CasePublic


class FreeSlot(BaseModel):
    staff_id: str | None
    starts_at: datetime
    ends_at: datetime


class WorkingWindow(BaseModel):
    starts_at: datetime
    ends_at: datetime


class Calendar(BaseModel):
    """One office's day: working windows, the visits of the day, and what is still free."""

    bezirk: str
    familienbuero: str
    name: str
    day: date
    time_zone: str
    working_windows: list[WorkingWindow]
    staff_ids: list[str] | None
    visits: list[VisitPublic]
    free_slots: list[FreeSlot]


class DueCase(BaseModel):
    """A family of the office still waiting for an appointment."""

    case_id: str
    state: CaseState
    target_date: date | None
    overdue: bool = Field(description="The target date has passed.")
    overdue_raised_at: datetime | None
    last_visit_status: VisitStatus | None = Field(
        description="What became of the latest appointment, if there was one."
    )
