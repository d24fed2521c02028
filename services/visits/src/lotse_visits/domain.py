"""The rules of welcome visits (Willkommensbesuche), without I/O.

A Familienbüro (family office of one Stadtbezirk, city district) visits every family that
consented, inside its working times (``visit_hours`` of the city configuration), with one
staff member per visit, a fixed visit length and a travel buffer kept free between two
visits of the same staff member. Bezirke never share staff, so the capacity of one office
never depends on another.

Automatic proposals use a grid per working window (start, start + visit + buffer, ...), so
that a day fills without gaps; staff may move a visit to any time inside the working times
as long as the staff member is free, travel buffer included.

Times: working windows are local times of the city; everything else is aware UTC.

A rule that says no raises the runtime's ``Refusal`` (422: a value that cannot be right) or
``Conflict`` (409: it clashes with the state of things), naming the field and the reason; a
decision on what staff record returns the event that says what happened (operations.py
stores it and puts it in the outbox).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Protocol, TypedDict
from zoneinfo import ZoneInfo

from lotse_contracts.city import Municipality, TimeWindow
from lotse_contracts.events import visits as events
from lotse_contracts.events.common import ConsentState
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.intake import Channel
from lotse_contracts.events.visits import (
    DeclineChannel,
    MissedFollowUp,
    RescheduleInitiator,
    TargetMissedReason,
    VisitCancelReason,
    VisitSetting,
    VisitTopic,
)
from lotse_runtime.refusal import Conflict, Refusal

# -- states --------------------------------------------------------------------------------------


class VisitStatus(StrEnum):
    """Where one appointment stands; only ``scheduled`` is open."""

    SCHEDULED = "scheduled"
    COMPLETED = "completed"
    MISSED = "missed"
    DECLINED = "declined"
    CANCELLED = "cancelled"


class CaseState(StrEnum):
    """Where a family stands with its welcome visit.

    ``awaiting_registration``: only a consent change has arrived so far (events can come out
    of order); ``without_consent``: registered, but no welcome-visit consent in force;
    ``active``: a visit is due (scheduled, or still to be scheduled); ``visited``,
    ``declined``, ``not_reached`` (no further attempt after a no-show) and ``closed`` (moved
    away, duplicate case) end the chase; ``erased``: the family's data was destroyed.
    """

    AWAITING_REGISTRATION = "awaiting_registration"
    WITHOUT_CONSENT = "without_consent"
    ACTIVE = "active"
    VISITED = "visited"
    DECLINED = "declined"
    NOT_REACHED = "not_reached"
    CLOSED = "closed"
    ERASED = "erased"


#: From these states staff may arrange a new visit (the family changed its mind, called back).
REOPENABLE = frozenset({CaseState.ACTIVE, CaseState.DECLINED, CaseState.NOT_REACHED})

#: Cancel reasons only the system uses, when intake reports a withdrawal or an erasure.
SYSTEM_CANCEL_REASONS = frozenset(
    {VisitCancelReason.CONSENT_WITHDRAWN, VisitCancelReason.CASE_ERASED}
)

# -- the office ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One appointment of one staff member."""

    staff_id: str
    starts_at: datetime
    ends_at: datetime


@dataclass(frozen=True)
class Booking:
    """An appointment already in the calendar (a scheduled visit)."""

    visit_id: str
    staff_id: str
    starts_at: datetime
    ends_at: datetime


@dataclass(frozen=True)
class Office:
    """What scheduling needs to know of one Familienbüro."""

    bezirk: str
    slug: str
    name: str
    zone: ZoneInfo
    visit_hours: tuple[TimeWindow, ...]
    staff_ids: tuple[str, ...]
    visit_length: timedelta
    travel_buffer: timedelta

    @classmethod
    def of(cls, city: Municipality, bezirk: str) -> Office:
        """The office of a Stadtbezirk; raises ``UnknownBezirk``."""
        office = city.bezirk(bezirk).familienbuero
        return cls(
            bezirk=bezirk,
            slug=office.slug,
            name=office.name,
            zone=city.zone(),
            visit_hours=tuple(sorted(office.visit_hours, key=lambda w: (w.weekday, w.start))),
            # The city file has a head count, not names: ids stand for staff positions of the
            # office, pseudonymous by construction.
            staff_ids=tuple(f"{office.slug}-{n}" for n in range(1, office.staff + 1)),
            visit_length=timedelta(minutes=office.visit_minutes),
            travel_buffer=timedelta(minutes=office.travel_buffer_minutes),
        )

    def local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone)

    def local_date(self, moment: datetime) -> date:
        return moment.astimezone(self.zone).date()

    def at(self, day: date, clock_time: time) -> datetime:
        """An aware moment from a local day and time."""
        return datetime.combine(day, clock_time, tzinfo=self.zone)

    def start_of(self, day: date) -> datetime:
        return self.at(day, time(0, 0))

    def windows_on(self, day: date) -> list[tuple[datetime, datetime]]:
        """The working windows of a local day, as aware moments."""
        return [
            (self.at(day, w.start), self.at(day, w.end))
            for w in self.visit_hours
            if w.weekday == day.weekday()
        ]

    def grid(self, day: date) -> list[datetime]:
        """Starts of the slots the scheduler proposes on a local day."""
        step = self.visit_length + self.travel_buffer
        starts: list[datetime] = []
        for window_start, window_end in self.windows_on(day):
            start = window_start
            while start + self.visit_length <= window_end:
                starts.append(start)
                start += step
        return starts

    def within_working_time(self, starts_at: datetime) -> bool:
        """Whether a visit starting then lies wholly inside one working window."""
        ends_at = starts_at + self.visit_length
        return any(
            start <= starts_at and ends_at <= end
            for start, end in self.windows_on(self.local_date(starts_at))
        )

    def describe_hours(self, day: date) -> str:
        windows = [w for w in self.visit_hours if w.weekday == day.weekday()]
        if not windows:
            return f"{self.name} makes no visits on {day:%A}s"
        hours = ", ".join(f"{w.start:%H:%M}–{w.end:%H:%M}" for w in windows)
        return f"{self.name} visits on {day:%A}s {hours} ({self.zone.key})"


def clash(
    office: Office,
    staff_id: str,
    starts_at: datetime,
    bookings: Iterable[Booking],
    *,
    ignore_visit: str | None = None,
) -> Booking | None:
    """The booking of ``staff_id`` that a visit starting at ``starts_at`` would collide
    with, travel buffer on both sides included; None when the staff member is free."""
    for booking in bookings:
        if booking.staff_id != staff_id or booking.visit_id == ignore_visit:
            continue
        if _collides(office, starts_at, booking):
            return booking
    return None


def _collides(office: Office, starts_at: datetime, booking: Booking) -> bool:
    """Whether a visit starting at ``starts_at`` and the booking overlap, travel buffer on
    both sides included."""
    buffer = office.travel_buffer
    return (
        starts_at < booking.ends_at + buffer
        and booking.starts_at < starts_at + office.visit_length + buffer
    )


class Calendar:
    """An office's bookings arranged for the slot search: per staff member in order of
    start, and counted per local day.

    The search asks, for every grid slot of every day it walks and every staff member,
    whether that person is free. Scanning all of their bookings for each question made a
    proposal cost grow with the square of a full calendar (the visits service's largest
    CPU share at 2,000 families); here a question looks only at the bookings that start
    close enough to collide (a binary search), and answers exactly as :func:`clash`."""

    def __init__(self, office: Office, bookings: Iterable[Booking]) -> None:
        self.office = office
        self._booked: dict[str, list[Booking]] = {}
        for booking in bookings:
            self._booked.setdefault(booking.staff_id, []).append(booking)
        self._starts: dict[str, list[datetime]] = {}
        self._longest: dict[str, timedelta] = {}
        self._per_day: Counter[tuple[str, date]] = Counter()
        for staff_id, booked in self._booked.items():
            booked.sort(key=lambda b: b.starts_at)
            self._starts[staff_id] = [b.starts_at for b in booked]
            # No booking ends later than this after its start: bounds how early a booking
            # that still collides can start.
            self._longest[staff_id] = max(b.ends_at - b.starts_at for b in booked)
            for b in booked:
                self._per_day[staff_id, office.local_date(b.starts_at)] += 1

    def load(self, staff_id: str, day: date) -> int:
        """How many visits the staff member has on that local day."""
        return self._per_day[staff_id, day]

    def clash(self, staff_id: str, starts_at: datetime) -> Booking | None:
        """:func:`clash` for this office and these bookings (the one that starts first,
        where several collide)."""
        booked = self._booked.get(staff_id)
        if not booked:
            return None
        office = self.office
        buffer = office.travel_buffer
        starts = self._starts[staff_id]
        # A booking collides (_collides) when it starts before the visit's end + buffer and
        # ends after starts_at - buffer; it ends at most `longest` after it starts.
        low = bisect_right(starts, starts_at - buffer - self._longest[staff_id])
        high = bisect_left(starts, starts_at + office.visit_length + buffer, lo=low)
        for booking in booked[low:high]:
            if _collides(office, starts_at, booking):
                return booking
        return None

    def staff_in_order(self, day: date) -> list[str]:
        """The least busy staff member of the day first, so that work spreads over the
        team (ties in the office's own order)."""
        order = self.office.staff_ids
        return sorted(order, key=lambda s: (self.load(s, day), order.index(s)))


def first_free_slot(
    office: Office, bookings: Sequence[Booking], earliest: datetime, until: datetime
) -> Slot | None:
    """The first grid slot at or after ``earliest`` and starting before ``until`` in which
    some staff member is free; None when the whole range is booked.

    ``bookings`` must hold every scheduled visit of the office that could touch the range.
    """
    calendar = Calendar(office, bookings)
    day = office.local_date(earliest)
    last = office.local_date(until)
    while day <= last:
        starts = [s for s in office.grid(day) if earliest <= s < until]
        if starts:
            staff = calendar.staff_in_order(day)
            for start in starts:
                for staff_id in staff:
                    if calendar.clash(staff_id, start) is None:
                        return Slot(staff_id, start, start + office.visit_length)
        day += timedelta(days=1)
    return None


def free_slots(
    office: Office, bookings: Sequence[Booking], day: date, not_before: datetime
) -> list[Slot]:
    """Every grid slot of a local day, per staff member, that is free and not yet past."""
    calendar = Calendar(office, bookings)
    return [
        Slot(staff_id, start, start + office.visit_length)
        for start in office.grid(day)
        if start >= not_before
        for staff_id in office.staff_ids
        if calendar.clash(staff_id, start) is None
    ]


def check_appointment(office: Office, starts_at: datetime, now: datetime) -> None:
    """Raise ``Refusal`` for a start in the past or outside the office's working times."""
    if starts_at < now:
        raise Refusal(
            "starts_at",
            f"{office.local(starts_at):%Y-%m-%d %H:%M} lies in the past; "
            "an appointment can only be made for the future",
        )
    if not office.within_working_time(starts_at):
        local = office.local(starts_at)
        raise Refusal(
            "starts_at",
            f"a {int(office.visit_length.total_seconds() // 60)}-minute visit starting "
            f"{local:%Y-%m-%d %H:%M} is outside the working times: "
            f"{office.describe_hours(local.date())}",
        )


def staff_for(
    office: Office,
    starts_at: datetime,
    bookings: Sequence[Booking],
    *,
    wanted: str | None = None,
    preferred: str | None = None,
    ignore_visit: str | None = None,
) -> str:
    """The staff member who takes an appointment staff chose by hand.

    ``wanted`` is a staff member named in the request: it must exist and be free.
    Otherwise ``preferred`` (the one already assigned) if free, else anyone free.
    Raises ``Refusal`` for an unknown staff member, ``Conflict`` for an occupied slot.
    """
    if wanted is not None and wanted not in office.staff_ids:
        raise Refusal(
            "staff_id",
            f"{wanted!r} is not a staff member of {office.name} "
            f"(known: {', '.join(office.staff_ids)})",
        )
    candidates = (
        [wanted]
        if wanted is not None
        else sorted(office.staff_ids, key=lambda s: (s != preferred, office.staff_ids.index(s)))
    )
    clashes: list[tuple[str, Booking]] = []
    for staff_id in candidates:
        assert staff_id is not None
        found = clash(office, staff_id, starts_at, bookings, ignore_visit=ignore_visit)
        if found is None:
            return staff_id
        clashes.append((staff_id, found))
    local = office.local(starts_at)
    busy = "; ".join(
        f"{staff_id} has a visit {office.local(b.starts_at):%H:%M}–{office.local(b.ends_at):%H:%M}"
        for staff_id, b in clashes
    )
    who = f"staff member {wanted}" if wanted is not None else f"no staff member of {office.name}"
    verb = "is not free" if wanted is not None else "is free"
    raise Conflict(
        "starts_at",
        f"slot {local:%Y-%m-%d %H:%M} is occupied: {who} {verb} then "
        f"({busy}; {int(office.travel_buffer.total_seconds() // 60)} minutes of travel are kept "
        "free between two visits)",
    )


# -- target dates --------------------------------------------------------------------------------


def reference_date(
    channel: Channel, registered_at: datetime, days_since_birth: int, zone: ZoneInfo
) -> date:
    """The day the target window counts from: the birth for families from a clinic, the
    registration (the move-in notice) for families moving in."""
    registered_on = registered_at.astimezone(zone).date()
    if channel is Channel.CLINIC:
        return registered_on - timedelta(days=days_since_birth)
    return registered_on


def earliest_proposal(
    now: datetime, registered_at: datetime, lead_days: int, zone: ZoneInfo
) -> datetime:
    """The first moment an automatic proposal may take: ``lead_days`` whole days after the
    later of now and the registration (events may be replayed long after), never earlier
    than now."""
    base = max(now, registered_at)
    day = base.astimezone(zone).date() + timedelta(days=lead_days)
    return max(base, datetime.combine(day, time(0, 0), tzinfo=zone))


def target_verdict(
    office: Office, starts_at: datetime, target: date, why: TargetMissedReason
) -> tuple[bool, TargetMissedReason | None]:
    """Whether an appointment misses the target date, and why (only when it does)."""
    missed = office.local_date(starts_at) > target
    return missed, (why if missed else None)


def proposal_miss_reason(office: Office, earliest: datetime, target: date) -> TargetMissedReason:
    """Why an automatic proposal is late: the family came too late to be seen in time,
    or the office had no free slot before the target."""
    if office.local_date(earliest) > target:
        return TargetMissedReason.LATE_REGISTRATION
    return TargetMissedReason.NO_CAPACITY


def reschedule_miss_reason(by: RescheduleInitiator) -> TargetMissedReason:
    return (
        TargetMissedReason.FAMILY_REQUEST
        if by is RescheduleInitiator.FAMILY
        else TargetMissedReason.NO_CAPACITY
    )


def days_since_reference(office: Office, starts_at: datetime, reference: date) -> int:
    return max(0, (office.local_date(starts_at) - reference).days)


def days_overdue(target: date, today: date) -> int:
    """Days since the target date; 0 while it has not passed."""
    return max(0, (today - target).days)


# -- consent -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentFact:
    """One statement about a welcome-visit consent: given or withdrawn, at a time."""

    consent_id: str
    state: ConsentState
    at: datetime


def supersedes(incoming: ConsentFact, existing: ConsentFact | None) -> bool:
    """Whether ``incoming`` replaces what is known of the same consent.

    Events arrive out of order (a withdrawal may overtake the registration), so the time
    the family spoke decides, not the arrival; at equal times a withdrawal wins.
    """
    if existing is None:
        return True
    if incoming.at != existing.at:
        return incoming.at > existing.at
    return incoming.state is ConsentState.WITHDRAWN and existing.state is ConsentState.GIVEN


def visit_consent_in_force(facts: Iterable[ConsentFact]) -> bool:
    """Whether the family's latest word on welcome visits is yes.

    The latest statement over all welcome-visit consents decides, so a withdrawal recorded
    under a new consent id still ends an older consent; at equal times a withdrawal wins.
    """
    latest: ConsentFact | None = None
    for fact in facts:
        if latest is None or supersedes(fact, latest):
            latest = fact
    return latest is not None and latest.state is ConsentState.GIVEN


# -- case lifecycle ------------------------------------------------------------------------------


class Reaction(StrEnum):
    """What a change of consent means for the visits of a case."""

    NONE = "none"
    SCHEDULE = "schedule"
    CANCEL = "cancel"


def reconcile(state: CaseState, consent: bool) -> tuple[CaseState, Reaction]:
    """The case state after the consent situation became ``consent``, and what to do.

    A registered family without a visit gets one when consent is in force; an active case
    whose consent ended loses its open visit. Finished cases stay finished, erased ones
    stay erased, and nothing happens before the registration has arrived.
    """
    if state is CaseState.WITHOUT_CONSENT and consent:
        return CaseState.ACTIVE, Reaction.SCHEDULE
    if state is CaseState.ACTIVE and not consent:
        return CaseState.WITHOUT_CONSENT, Reaction.CANCEL
    return state, Reaction.NONE


def state_after_missed(follow_up: MissedFollowUp) -> CaseState:
    if follow_up is MissedFollowUp.NO_FURTHER_ATTEMPT:
        return CaseState.NOT_REACHED
    return CaseState.ACTIVE


def state_after_cancel(reason: VisitCancelReason) -> CaseState:
    """Moved away or a duplicate ends the case; otherwise a new visit is still due."""
    if reason in (VisitCancelReason.FAMILY_MOVED_AWAY, VisitCancelReason.DUPLICATE):
        return CaseState.CLOSED
    if reason is VisitCancelReason.CASE_ERASED:
        return CaseState.ERASED
    if reason is VisitCancelReason.CONSENT_WITHDRAWN:
        return CaseState.WITHOUT_CONSENT
    return CaseState.ACTIVE


_VERBS = {
    "reschedule": "rescheduled",
    "no_show": "recorded as a no-show",
    "decline": "declined",
    "cancel": "cancelled",
    "complete": "completed",
}


def check_open(status: VisitStatus, action: str) -> None:
    """Only a scheduled visit can be acted on; raise ``Conflict`` naming its status."""
    if status is not VisitStatus.SCHEDULED:
        raise Conflict(
            "status",
            f"the visit is {status.value}; only a scheduled visit can be {_VERBS[action]}",
        )


def check_staff_cancel_reason(reason: VisitCancelReason) -> None:
    if reason in SYSTEM_CANCEL_REASONS:
        raise Refusal(
            "reason",
            f"{reason.value} is set by the system when intake reports a withdrawn consent or "
            "an erasure; record those in intake",
        )


def check_new_visit(state: CaseState, has_open_visit: bool, consent: bool) -> None:
    """Staff may arrange a new visit only for a consenting family with no open visit whose
    case is not finished for good."""
    if has_open_visit:
        raise Conflict("case_id", "the family already has a scheduled visit; reschedule it")
    if state is CaseState.ERASED:
        raise Conflict("case_id", "the family's data was erased")
    if not consent or state in (CaseState.WITHOUT_CONSENT, CaseState.AWAITING_REGISTRATION):
        raise Conflict("case_id", "no welcome-visit consent of the family is in force")
    if state not in REOPENABLE:
        raise Conflict("case_id", f"the case is {state.value}; no further visit is due")


def check_no_show(starts_at: datetime, now: datetime) -> None:
    if now < starts_at:
        raise Conflict("status", "the appointment has not started yet; a no-show comes after it")


def check_completion(starts_at: datetime, completed_at: datetime, now: datetime) -> None:
    """A visit is completed after it started and not in the future."""
    if completed_at > now:
        raise Refusal("completed_at", "lies in the future")
    if completed_at < starts_at:
        raise Conflict(
            "completed_at",
            "is before the appointment's start; if the visit took place at another time, "
            "reschedule it to that time first",
        )


def check_module(city: Municipality, module: str | None) -> None:
    if module is not None and module not in city.module_slugs:
        raise Refusal(
            "referral_wished_module",
            f"{city.name} has no offer module {module!r} (known: {', '.join(city.module_slugs)})",
        )


# -- what staff record: each decision checks the rules and returns the event ------------------


class Appointment(Protocol):
    """What the rules read of a visit (a ``VisitsVisit`` row is one)."""

    visit_id: str
    case_id: str
    bezirk: str
    familienbuero: str
    staff_id: str
    status: str
    starts_at: datetime
    setting: str
    attempt: int
    target_date: date


class VisitKeys(TypedDict):
    """The fields every event about one visit starts with."""

    visit_id: str
    case_id: str
    bezirk: str
    familienbuero: str


def keys_of(visit: Appointment) -> VisitKeys:
    return {
        "visit_id": visit.visit_id,
        "case_id": visit.case_id,
        "bezirk": visit.bezirk,
        "familienbuero": visit.familienbuero,
    }


class CaseFacts(Protocol):
    """What the rules read of a case (a ``VisitsCase`` row is one)."""

    case_id: str
    bezirk: str
    state: str
    open_visit_id: str | None


def reschedule(
    office: Office,
    visit: Appointment,
    *,
    starts_at: datetime,
    wanted: str | None,
    by: RescheduleInitiator,
    booked: Sequence[Booking],
    now: datetime,
) -> events.VisitRescheduled:
    """Move a scheduled visit to ``starts_at`` (``wanted``: a staff member named by hand)."""
    check_open(VisitStatus(visit.status), "reschedule")
    check_appointment(office, starts_at, now)
    staff_id = staff_for(
        office,
        starts_at,
        booked,
        wanted=wanted,
        preferred=visit.staff_id,
        ignore_visit=visit.visit_id,
    )
    if staff_id == visit.staff_id and starts_at == visit.starts_at:
        raise Conflict("starts_at", "is the visit's current appointment")
    missed, reason = target_verdict(
        office, starts_at, visit.target_date, reschedule_miss_reason(by)
    )
    new_start = starts_at.astimezone(UTC)
    return events.VisitRescheduled(
        **keys_of(visit),
        staff_id=staff_id,
        previous_starts_at=visit.starts_at,
        starts_at=new_start,
        ends_at=new_start + office.visit_length,
        target_date=visit.target_date,
        target_missed=missed,
        target_missed_reason=reason,
        rescheduled_by=by,
        rescheduled_at=now,
    )


def no_show(visit: Appointment, follow_up: MissedFollowUp, now: datetime) -> events.VisitMissed:
    """The family was not there (only once the appointment has begun)."""
    check_open(VisitStatus(visit.status), "no_show")
    check_no_show(visit.starts_at, now)
    return events.VisitMissed(
        **keys_of(visit),
        scheduled_for=visit.starts_at,
        attempt=visit.attempt,
        follow_up=follow_up,
        recorded_at=now,
    )


def decline(
    office: Office,
    case: CaseFacts,
    visit: Appointment | None,
    via: DeclineChannel,
    now: datetime,
) -> events.VisitDeclined:
    """The family does not want the visit: its scheduled one, or (``visit`` None) any."""
    if visit is not None:
        check_open(VisitStatus(visit.status), "decline")
    elif case.open_visit_id is not None:
        raise Conflict(
            "case_id",
            f"the family has a scheduled visit; decline it: "
            f"POST /visits/{case.open_visit_id}/decline",
        )
    elif case.state not in (CaseState.ACTIVE.value, CaseState.NOT_REACHED.value):
        raise Conflict("case_id", f"the case is {case.state}; no visit is due")
    return events.VisitDeclined(
        visit_id=visit.visit_id if visit is not None else None,
        case_id=case.case_id,
        bezirk=case.bezirk,
        familienbuero=office.slug,
        declined_via=via,
        declined_at=now,
    )


def cancel(
    visit: Appointment, reason: VisitCancelReason, role: EventRole, now: datetime
) -> events.VisitCancelled:
    """The Familienbüro cancels a scheduled visit (not for the system's reasons)."""
    check_open(VisitStatus(visit.status), "cancel")
    check_staff_cancel_reason(reason)
    return events.VisitCancelled(
        **keys_of(visit),
        reason=reason,
        cancelled_by_role=role,
        cancelled_at=now,
    )


class OutcomeReport(Protocol):
    """What staff record of a visit that took place (a ``CompleteRequest`` is one)."""

    completed_at: datetime | None
    setting: VisitSetting | None
    informed_about_offers: bool
    topics: list[VisitTopic]
    needs_noted: bool
    referral_wished_module: str | None


def complete(
    office: Office,
    city: Municipality,
    visit: Appointment,
    outcome: OutcomeReport,
    *,
    reference: date | None,
    now: datetime,
) -> events.VisitCompleted:
    """The visit took place (after it began, not in the future), with its outcome;
    ``reference`` is the case's reference date (unknown: the day of the visit)."""
    check_open(VisitStatus(visit.status), "complete")
    completed_at = outcome.completed_at or now
    check_completion(visit.starts_at, completed_at, now)
    check_module(city, outcome.referral_wished_module)
    reference = reference or office.local_date(visit.starts_at)
    return events.VisitCompleted(
        **keys_of(visit),
        staff_id=visit.staff_id,
        scheduled_for=visit.starts_at,
        completed_at=completed_at,
        setting=outcome.setting or VisitSetting(visit.setting),
        informed_about_offers=outcome.informed_about_offers,
        topics=list(dict.fromkeys(outcome.topics)),  # once each, in the order given
        needs_noted=outcome.needs_noted,
        referral_wished_module=outcome.referral_wished_module,
        days_since_reference=days_since_reference(office, visit.starts_at, reference),
    )


def check_chosen_slot(starts_at: datetime | None, staff_id: str | None) -> None:
    """A staff member is named only together with the time chosen for them."""
    if starts_at is None and staff_id is not None:
        raise Refusal("staff_id", "name a staff member only together with starts_at")


def new_visit_miss_reason(
    state: CaseState, has_open_visit: bool, consent: bool
) -> TargetMissedReason:
    """Check that staff may arrange a new visit; why it will be late if it is."""
    check_new_visit(state, has_open_visit, consent)
    return {
        CaseState.DECLINED: TargetMissedReason.FAMILY_REQUEST,
        CaseState.NOT_REACHED: TargetMissedReason.FAMILY_UNREACHABLE,
    }.get(state, TargetMissedReason.NO_CAPACITY)
