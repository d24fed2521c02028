"""The slot search's calendar (``domain.Calendar``) answers exactly as a scan of every
booking does: the same clashes and the same first free slot, for calendars of any shape
(bookings off the grid, of other lengths, across midnight and the change of clocks)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from lotse_contracts.city import load_city
from lotse_visits import domain
from lotse_visits.domain import Booking, Office, Slot

BERLIN = ZoneInfo("Europe/Berlin")
# The week before the clocks change (30 March 2025), so that days of 23 hours come up.
FIRST_DAY = date(2025, 3, 24)
HOERDE = Office.of(load_city("dortmund"), "hoerde")


def scanned_first_free_slot(
    office: Office, bookings: Sequence[Booking], earliest: datetime, until: datetime
) -> Slot | None:
    """The reference: every staff member's every booking looked at for every slot."""
    day, last = office.local_date(earliest), office.local_date(until)
    while day <= last:
        starts = [s for s in office.grid(day) if earliest <= s < until]
        if starts:

            def load(staff_id: str, day: date = day) -> int:
                return sum(
                    1
                    for b in bookings
                    if b.staff_id == staff_id and office.local_date(b.starts_at) == day
                )

            staff = sorted(office.staff_ids, key=lambda s: (load(s), office.staff_ids.index(s)))
            for start in starts:
                for staff_id in staff:
                    if domain.clash(office, staff_id, start, bookings) is None:
                        return Slot(staff_id, start, start + office.visit_length)
        day += timedelta(days=1)
    return None


def moments(days: int = 10) -> st.SearchStrategy[datetime]:
    """Local moments over ``days`` days, on the minute (most of them in working hours)."""
    return st.builds(
        lambda day, minute: (
            datetime.combine(FIRST_DAY + timedelta(days=day), time(0), tzinfo=BERLIN)
            + timedelta(minutes=minute)
        ),
        st.integers(0, days - 1),
        st.one_of(st.integers(8 * 60, 17 * 60), st.integers(0, 24 * 60 - 1)),
    )


bookings = st.lists(
    st.builds(
        lambda n, staff, start, minutes: Booking(
            f"v{n}", staff, start, start + timedelta(minutes=minutes)
        ),
        st.integers(0, 10_000),
        st.sampled_from(HOERDE.staff_ids),
        moments(),
        st.sampled_from([60, 30, 90, 240, 0]),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(booked=bookings, start=moments())
def test_a_clash_is_found_exactly_when_a_scan_finds_one(
    booked: list[Booking], start: datetime
) -> None:
    calendar = domain.Calendar(HOERDE, booked)
    for staff_id in HOERDE.staff_ids:
        found = calendar.clash(staff_id, start)
        scanned = domain.clash(HOERDE, staff_id, start, booked)
        assert (found is None) == (scanned is None)
        if found is not None:
            colliding = [
                b
                for b in booked
                if b.staff_id == staff_id and domain.clash(HOERDE, staff_id, start, [b])
            ]
            assert found in colliding
            assert found.starts_at == min(b.starts_at for b in colliding)


@settings(max_examples=200, deadline=None)
@given(booked=bookings, earliest=moments(days=4), days=st.integers(0, 6))
def test_the_first_free_slot_is_the_one_a_scan_finds(
    booked: list[Booking], earliest: datetime, days: int
) -> None:
    until = earliest + timedelta(days=days, hours=7)
    assert domain.first_free_slot(HOERDE, booked, earliest, until) == scanned_first_free_slot(
        HOERDE, booked, earliest, until
    )


def test_a_full_fortnight_is_searched_to_its_end() -> None:
    """Every slot of two weeks booked: the search walks them all and finds nothing; one
    cancellation on the last day is found."""
    earliest = datetime.combine(FIRST_DAY, time(0), tzinfo=BERLIN)
    until = earliest + timedelta(days=14)
    full: list[Booking] = []
    while (slot := domain.first_free_slot(HOERDE, full, earliest, until)) is not None:
        full.append(Booking(f"v{len(full)}", slot.staff_id, slot.starts_at, slot.ends_at))
    assert len(full) > 100
    assert domain.first_free_slot(HOERDE, full, earliest, until) is None
    last = max(full, key=lambda b: b.starts_at)
    freed = [b for b in full if b is not last]
    slot = domain.first_free_slot(HOERDE, freed, earliest, until)
    assert slot == Slot(last.staff_id, last.starts_at, last.ends_at)
    assert scanned_first_free_slot(HOERDE, freed, earliest, until) == slot
