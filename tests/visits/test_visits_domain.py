"""The scheduling and lifecycle rules of welcome visits, without I/O: Dortmund's real city
configuration, plain values, no fakes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from lotse_contracts.city import Municipality, UnknownBezirk, load_city
from lotse_contracts.events.common import ConsentState
from lotse_contracts.events.intake import Channel, welcome_visit_target
from lotse_contracts.events.visits import (
    MissedFollowUp,
    RescheduleInitiator,
    TargetMissedReason,
    VisitCancelReason,
)
from lotse_runtime.refusal import Conflict, Refusal
from lotse_visits import domain
from lotse_visits.domain import (
    Booking,
    CaseState,
    ConsentFact,
    Office,
    Reaction,
    VisitStatus,
)

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY = date(2025, 3, 3)  # a Monday in winter time (UTC+1)
TINY_CITY = Path(__file__).parent / "tiny-city.toml"


@contextmanager
def invalid(match: str | None = None) -> Iterator[pytest.ExceptionInfo[Refusal]]:
    """A refusal of a value that cannot be right (HTTP 422), not a conflict (409)."""
    with pytest.raises(Refusal, match=match) as refused:
        yield refused
    assert refused.value.status == 422
    assert not isinstance(refused.value, Conflict)


@pytest.fixture(scope="module")
def dortmund() -> Municipality:
    return load_city("dortmund")


@pytest.fixture(scope="module")
def hoerde(dortmund: Municipality) -> Office:
    return Office.of(dortmund, "hoerde")


def local(day: date, hh: int, mm: int = 0) -> datetime:
    return datetime.combine(day, time(hh, mm), tzinfo=BERLIN)


def booking(staff: str, start: datetime, office: Office, visit_id: str = "v") -> Booking:
    return Booking(visit_id, staff, start, start + office.visit_length)


# -- the office ----------------------------------------------------------------------------------


def test_office_comes_from_the_city_configuration(hoerde: Office, dortmund: Municipality) -> None:
    assert hoerde.slug == "familienbuero-hoerde"
    assert hoerde.staff_ids == tuple(f"familienbuero-hoerde-{n}" for n in range(1, 5))
    assert hoerde.visit_length == timedelta(minutes=60)
    assert hoerde.travel_buffer == timedelta(minutes=30)
    assert len(Office.of(dortmund, "eving").staff_ids) == 3
    with pytest.raises(UnknownBezirk):
        Office.of(dortmund, "atlantis")


def test_grid_fills_each_working_window_with_visit_plus_travel(hoerde: Office) -> None:
    # Monday 11:00–16:00 (the office is open for walk-ins until 10:30): 11:00, 12:30, 14:00;
    # 15:30 would end at 16:30, after the working time.
    assert [s.astimezone(BERLIN).time() for s in hoerde.grid(MONDAY)] == [
        time(11, 0),
        time(12, 30),
        time(14, 0),
    ]
    tuesday = MONDAY + timedelta(days=1)
    assert [s.astimezone(BERLIN).strftime("%H:%M") for s in hoerde.grid(tuesday)] == [
        "09:00",
        "10:30",
        "12:00",
        "13:30",
        "15:00",
    ]
    assert hoerde.grid(MONDAY + timedelta(days=5)) == []  # Saturday
    assert hoerde.grid(MONDAY + timedelta(days=6)) == []  # Sunday


def test_grid_follows_local_time_across_the_clock_change(hoerde: Office) -> None:
    after_change = date(2025, 3, 31)  # first Monday in summer time (UTC+2)
    first = hoerde.grid(after_change)[0]
    assert first.astimezone(UTC).time() == time(9, 0)
    assert hoerde.grid(MONDAY)[0].astimezone(UTC).time() == time(10, 0)


def test_working_time_means_the_whole_visit_inside_one_window(hoerde: Office) -> None:
    assert hoerde.within_working_time(local(MONDAY, 11))
    assert hoerde.within_working_time(local(MONDAY, 15))  # ends 16:00 exactly
    assert not hoerde.within_working_time(local(MONDAY, 15, 30))  # would end 16:30
    assert not hoerde.within_working_time(local(MONDAY, 9))  # walk-in hours, not visits
    assert not hoerde.within_working_time(local(MONDAY + timedelta(days=5), 11))  # Saturday
    assert hoerde.within_working_time(local(MONDAY, 11).astimezone(UTC))  # any offset


# -- double booking ------------------------------------------------------------------------------


def test_a_staff_member_clashes_inside_visit_or_travel_time(hoerde: Office) -> None:
    staff = hoerde.staff_ids[0]
    booked = [booking(staff, local(MONDAY, 11), hoerde)]
    assert domain.clash(hoerde, staff, local(MONDAY, 11), booked) == booked[0]
    assert domain.clash(hoerde, staff, local(MONDAY, 12, 15), booked) == booked[0]  # travel
    assert domain.clash(hoerde, staff, local(MONDAY, 9, 45), booked) == booked[0]  # travel
    assert domain.clash(hoerde, staff, local(MONDAY, 12, 30), booked) is None
    assert domain.clash(hoerde, staff, local(MONDAY, 9, 30), booked) is None
    assert domain.clash(hoerde, hoerde.staff_ids[1], local(MONDAY, 11), booked) is None
    assert domain.clash(hoerde, staff, local(MONDAY, 11), booked, ignore_visit="v") is None


def test_first_free_slot_takes_the_earliest_time_and_the_least_busy_staff(
    hoerde: Office,
) -> None:
    earliest = local(MONDAY, 0)
    until = earliest + timedelta(days=14)
    assert domain.first_free_slot(hoerde, [], earliest, until) == domain.Slot(
        hoerde.staff_ids[0], local(MONDAY, 11), local(MONDAY, 12)
    )
    first, second = hoerde.staff_ids[:2]
    booked = [booking(first, local(MONDAY, 11), hoerde)]
    slot = domain.first_free_slot(hoerde, booked, earliest, until)
    assert slot is not None
    assert (slot.staff_id, slot.starts_at) == (second, local(MONDAY, 11))
    everyone = [booking(s, local(MONDAY, 11), hoerde, s) for s in hoerde.staff_ids]
    slot = domain.first_free_slot(hoerde, everyone, earliest, until)
    assert slot is not None
    assert slot.starts_at == local(MONDAY, 12, 30)


def test_first_free_slot_respects_earliest_and_until(hoerde: Office) -> None:
    slot = domain.first_free_slot(hoerde, [], local(MONDAY, 11, 1), local(MONDAY, 23))
    assert slot is not None
    assert slot.starts_at == local(MONDAY, 12, 30)
    assert domain.first_free_slot(hoerde, [], local(MONDAY, 14, 1), local(MONDAY, 23)) is None


def test_filling_a_fortnight_never_double_books_nor_leaves_working_times(
    hoerde: Office,
) -> None:
    earliest, until = local(MONDAY, 0), local(MONDAY, 0) + timedelta(days=14)
    booked: list[Booking] = []
    while (slot := domain.first_free_slot(hoerde, booked, earliest, until)) is not None:
        assert hoerde.within_working_time(slot.starts_at)
        assert domain.clash(hoerde, slot.staff_id, slot.starts_at, booked) is None
        booked.append(Booking(str(len(booked)), slot.staff_id, slot.starts_at, slot.ends_at))
    # 19 grid slots a week (3 + 5 + 5 + 3 + 3) per staff member, 4 staff, two weeks.
    assert len(booked) == 19 * 4 * 2
    per_staff = {s: sum(1 for b in booked if b.staff_id == s) for s in hoerde.staff_ids}
    assert set(per_staff.values()) == {38}  # the least busy first: evenly spread
    for first in booked:
        for second in booked:
            if first is not second and first.staff_id == second.staff_id:
                assert (
                    first.ends_at + hoerde.travel_buffer <= second.starts_at
                    or second.ends_at + hoerde.travel_buffer <= first.starts_at
                )


def test_capacity_of_one_office_does_not_touch_another() -> None:
    city = load_city(str(TINY_CITY))
    nord, sued = Office.of(city, "nord"), Office.of(city, "sued")
    earliest, until = local(MONDAY, 0), local(MONDAY, 0) + timedelta(days=7)
    full_nord = [booking(nord.staff_ids[0], local(MONDAY, 9), nord)]
    assert domain.first_free_slot(nord, full_nord, earliest, until) is None
    slot = domain.first_free_slot(sued, full_nord, earliest, until)
    assert slot is not None
    assert slot.starts_at == local(MONDAY, 9)


def test_free_slots_of_a_day_per_staff_member(hoerde: Office) -> None:
    first = hoerde.staff_ids[0]
    booked = [booking(first, local(MONDAY, 12, 30), hoerde)]
    free = domain.free_slots(hoerde, booked, MONDAY, not_before=local(MONDAY, 11, 30))
    assert (first, local(MONDAY, 12, 30)) not in {(s.staff_id, s.starts_at) for s in free}
    assert {s.starts_at for s in free} == {local(MONDAY, 12, 30), local(MONDAY, 14)}
    assert len(free) == 3 + 4  # 12:30 for three, 14:00 for all four


def test_staff_for_a_chosen_time(hoerde: Office) -> None:
    first, second = hoerde.staff_ids[:2]
    booked = [booking(first, local(MONDAY, 11), hoerde, "mine")]
    at = local(MONDAY, 11, 30)
    assert domain.staff_for(hoerde, at, booked, preferred=first) == second
    assert domain.staff_for(hoerde, at, booked, preferred=first, ignore_visit="mine") == first
    with pytest.raises(Conflict) as occupied:
        domain.staff_for(hoerde, at, booked, wanted=first)
    assert occupied.value.field == "starts_at"
    assert "occupied" in occupied.value.reason
    assert "11:00–12:00" in occupied.value.reason
    with invalid() as unknown:
        domain.staff_for(hoerde, at, booked, wanted="nobody-1")
    assert unknown.value.field == "staff_id"
    everyone = [booking(s, local(MONDAY, 11), hoerde, s) for s in hoerde.staff_ids]
    with pytest.raises(Conflict, match="no staff member of Familienbüro Hörde"):
        domain.staff_for(hoerde, at, everyone)


def test_appointments_only_in_the_future_and_inside_working_times(hoerde: Office) -> None:
    now = local(MONDAY, 12)
    domain.check_appointment(hoerde, local(MONDAY, 14), now)
    with invalid(match="lies in the past") as past:
        domain.check_appointment(hoerde, local(MONDAY, 11), now)
    assert past.value.field == "starts_at"
    with invalid(match=r"outside the working times.*11:00–16:00"):
        domain.check_appointment(hoerde, local(MONDAY + timedelta(days=7), 9), now)
    with invalid(match="makes no visits on Saturdays"):
        domain.check_appointment(hoerde, local(MONDAY + timedelta(days=5), 11), now)


# -- target dates --------------------------------------------------------------------------------


def test_reference_is_the_birth_or_the_move_in() -> None:
    registered = local(MONDAY, 0, 30).astimezone(UTC)  # Sunday 23:30 UTC, Monday in Dortmund
    assert domain.reference_date(Channel.CLINIC, registered, 2, BERLIN) == date(2025, 3, 1)
    assert domain.reference_date(Channel.MOVE_IN, registered, 400, BERLIN) == MONDAY
    # Intake's visit_target_date and visits' overdue check use one rule (contracts), counted
    # from the same reference: the birth for clinic families, the move-in otherwise.
    assert welcome_visit_target(Channel.CLINIC, MONDAY, 2, 14) == date(2025, 3, 15)
    assert welcome_visit_target(Channel.MOVE_IN, MONDAY, 400, 21) == MONDAY + timedelta(days=21)
    for channel, days in ((Channel.CLINIC, 2), (Channel.MOVE_IN, 400)):
        reference = domain.reference_date(channel, registered, days, BERLIN)
        assert welcome_visit_target(channel, MONDAY, days, 14) == reference + timedelta(days=14)


def test_earliest_proposal_leaves_lead_days_and_never_lies_before_registration() -> None:
    now = local(MONDAY, 15)
    assert domain.earliest_proposal(now, now, 1, BERLIN) == local(MONDAY + timedelta(days=1), 0)
    assert domain.earliest_proposal(now, now, 0, BERLIN) == now
    later = local(MONDAY + timedelta(days=30), 10)  # a replayed year: registered "in future"
    assert domain.earliest_proposal(now, later, 2, BERLIN) == local(MONDAY + timedelta(days=32), 0)


def test_target_verdict_and_why_it_was_missed(hoerde: Office) -> None:
    target = MONDAY + timedelta(days=1)
    why = TargetMissedReason.NO_CAPACITY
    assert domain.target_verdict(hoerde, local(target, 15), target, why) == (False, None)
    assert domain.target_verdict(hoerde, local(target + timedelta(days=1), 9), target, why) == (
        True,
        why,
    )
    late = domain.proposal_miss_reason(hoerde, local(target + timedelta(days=1), 0), target)
    assert late is TargetMissedReason.LATE_REGISTRATION
    full = domain.proposal_miss_reason(hoerde, local(target, 0), target)
    assert full is TargetMissedReason.NO_CAPACITY
    assert (
        domain.reschedule_miss_reason(RescheduleInitiator.FAMILY)
        is TargetMissedReason.FAMILY_REQUEST
    )


def test_days_counted_for_reporting_and_overdue(hoerde: Office) -> None:
    assert domain.days_since_reference(hoerde, local(MONDAY, 11), date(2025, 3, 1)) == 2
    assert domain.days_overdue(MONDAY, MONDAY) == 0
    assert domain.days_overdue(MONDAY, MONDAY + timedelta(days=3)) == 3


# -- consent -------------------------------------------------------------------------------------

T1 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
T2 = T1 + timedelta(hours=2)


def test_the_latest_word_of_the_family_counts_not_the_arrival() -> None:
    given = ConsentFact("c1", ConsentState.GIVEN, T1)
    withdrawn = ConsentFact("c1", ConsentState.WITHDRAWN, T2)
    assert domain.supersedes(given, None)
    assert domain.supersedes(withdrawn, given)
    assert not domain.supersedes(given, withdrawn)  # the registration arriving late
    same_time = ConsentFact("c1", ConsentState.WITHDRAWN, T1)
    assert domain.supersedes(same_time, given)
    assert not domain.supersedes(given, same_time)


def test_consent_in_force_over_several_consent_ids() -> None:
    assert not domain.visit_consent_in_force([])
    assert domain.visit_consent_in_force([ConsentFact("a", ConsentState.GIVEN, T1)])
    # A withdrawal recorded under a new id still ends the older consent.
    assert not domain.visit_consent_in_force(
        [ConsentFact("a", ConsentState.GIVEN, T1), ConsentFact("b", ConsentState.WITHDRAWN, T2)]
    )
    # Given again later.
    assert domain.visit_consent_in_force(
        [
            ConsentFact("a", ConsentState.WITHDRAWN, T1),
            ConsentFact("b", ConsentState.GIVEN, T2),
        ]
    )


# -- the case lifecycle --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "consent", "expected"),
    [
        (CaseState.WITHOUT_CONSENT, True, (CaseState.ACTIVE, Reaction.SCHEDULE)),
        (CaseState.WITHOUT_CONSENT, False, (CaseState.WITHOUT_CONSENT, Reaction.NONE)),
        (CaseState.ACTIVE, True, (CaseState.ACTIVE, Reaction.NONE)),
        (CaseState.ACTIVE, False, (CaseState.WITHOUT_CONSENT, Reaction.CANCEL)),
        (CaseState.AWAITING_REGISTRATION, True, (CaseState.AWAITING_REGISTRATION, Reaction.NONE)),
        (CaseState.ERASED, True, (CaseState.ERASED, Reaction.NONE)),
        (CaseState.VISITED, True, (CaseState.VISITED, Reaction.NONE)),
        (CaseState.VISITED, False, (CaseState.VISITED, Reaction.NONE)),
        (CaseState.DECLINED, True, (CaseState.DECLINED, Reaction.NONE)),
    ],
)
def test_reconcile(state: CaseState, consent: bool, expected: tuple[CaseState, Reaction]) -> None:
    assert domain.reconcile(state, consent) == expected


def test_case_state_after_staff_actions() -> None:
    assert domain.state_after_missed(MissedFollowUp.NO_FURTHER_ATTEMPT) is CaseState.NOT_REACHED
    assert domain.state_after_missed(MissedFollowUp.LETTER_SENT) is CaseState.ACTIVE
    assert domain.state_after_cancel(VisitCancelReason.FAMILY_MOVED_AWAY) is CaseState.CLOSED
    assert domain.state_after_cancel(VisitCancelReason.DUPLICATE) is CaseState.CLOSED
    assert domain.state_after_cancel(VisitCancelReason.STAFF_UNAVAILABLE) is CaseState.ACTIVE


@pytest.mark.parametrize("status", [s for s in VisitStatus if s is not VisitStatus.SCHEDULED])
def test_only_a_scheduled_visit_can_be_acted_on(status: VisitStatus) -> None:
    domain.check_open(VisitStatus.SCHEDULED, "complete")
    with pytest.raises(Conflict) as refused:
        domain.check_open(status, "complete")
    assert refused.value.field == "status"
    assert refused.value.reason == (
        f"the visit is {status.value}; only a scheduled visit can be completed"
    )


def test_staff_may_not_use_the_system_cancel_reasons() -> None:
    domain.check_staff_cancel_reason(VisitCancelReason.STAFF_UNAVAILABLE)
    for reason in (VisitCancelReason.CONSENT_WITHDRAWN, VisitCancelReason.CASE_ERASED):
        with invalid(match="set by the system"):
            domain.check_staff_cancel_reason(reason)


def test_who_may_get_a_new_visit() -> None:
    domain.check_new_visit(CaseState.ACTIVE, has_open_visit=False, consent=True)
    domain.check_new_visit(CaseState.DECLINED, has_open_visit=False, consent=True)
    domain.check_new_visit(CaseState.NOT_REACHED, has_open_visit=False, consent=True)
    refusals = [
        (CaseState.ACTIVE, True, True, "already has a scheduled visit"),
        (CaseState.ACTIVE, False, False, "no welcome-visit consent"),
        (CaseState.VISITED, False, True, "the case is visited"),
        (CaseState.CLOSED, False, True, "the case is closed"),
        (CaseState.ERASED, False, True, "erased"),
    ]
    for state, open_visit, consent, reason in refusals:
        with pytest.raises(Conflict, match=reason):
            domain.check_new_visit(state, has_open_visit=open_visit, consent=consent)


def test_completion_and_no_show_times() -> None:
    start = local(MONDAY, 11)
    domain.check_completion(start, start + timedelta(minutes=70), start + timedelta(hours=3))
    with invalid(match="future"):
        domain.check_completion(start, start + timedelta(hours=4), start + timedelta(hours=3))
    with pytest.raises(Conflict, match="before the appointment's start"):
        domain.check_completion(start, start - timedelta(hours=1), start + timedelta(hours=3))
    domain.check_no_show(start, start + timedelta(minutes=20))
    with pytest.raises(Conflict, match="has not started yet"):
        domain.check_no_show(start, start - timedelta(minutes=1))


def test_wished_module_must_be_in_the_catalogue(dortmund: Municipality) -> None:
    domain.check_module(dortmund, None)
    domain.check_module(dortmund, "familienhebamme")
    with invalid() as unknown:
        domain.check_module(dortmund, "zauberschule")
    assert unknown.value.field == "referral_wished_module"
