"""The visits service reacting to intake events on the real broker: automatic proposals,
one visit per family whatever the delivery order, consent withdrawal, erasure, dead letters,
and the overdue check."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from lotse_contracts.events.common import ConsentState
from lotse_contracts.events.intake import Channel
from lotse_contracts.events.visits import (
    VisitCancelled,
    VisitOverdue,
    VisitScheduled,
)
from lotse_runtime.consumer import DLQ_REASON, DLQ_STAGE
from lotse_visits.domain import Booking, Office, clash

from tests.support import bearer
from tests.visits.harness import (
    START,
    consent_changed,
    erased,
    local_day,
    merged,
    registered,
)

pytestmark = pytest.mark.integration


def local_time(moment: Any) -> str:
    return str(moment.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M"))


TINY_CITY = str(Path(__file__).parent / "tiny-city.toml")


def test_a_registered_family_gets_one_visit_inside_working_times(
    start_visits: Callable[..., Any], database_url: str
) -> None:
    event = registered(days_since_birth=2)
    with start_visits(database_url) as service:
        service.send(event)
        visit = service.scheduled(event.case_id)
        runtime = service.runtime
        office = Office.of(runtime.city, "hoerde")
        # Registered Monday 08:00; one lead day: Tuesday 09:00 is the first free slot.
        assert service.clock.now == START
        assert visit.starts_at == office.at(local_day(START) + timedelta(days=1), time(9))
        assert visit.ends_at - visit.starts_at == timedelta(hours=1)
        assert visit.staff_id in office.staff_ids
        assert office.within_working_time(visit.starts_at)
        assert visit.target_date == local_day(START) - timedelta(days=2) + timedelta(days=14)
        assert not visit.target_missed

        published = service.wait_events(VisitScheduled.event_type)
        assert len(published) == 1
        data = published[0]
        assert data["visit_id"] == visit.visit_id
        assert data["familienbuero"] == "familienbuero-hoerde"
        assert data["staff_id"] == visit.staff_id
        assert data["proposed_automatically"] is True

        feed = service.events(VisitScheduled.event_type, "lotse.bezirk.hoerde")
        assert len(feed) == 1
        assert "staff_id" not in feed[0]  # the Bezirksteam never sees staff ids

        on_topic = service.read("lotse.visits", 1)
        assert on_topic[0].key == event.case_id.encode()
        assert on_topic[0].header("ce_type") == VisitScheduled.event_type


def test_a_burst_of_registrations_never_double_books(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    # Sent back to back, the events reach the consumer in batches that share a transaction.
    events = [registered() for _ in range(9)]
    events.append(registered(consent=None, case_id=events[0].case_id))  # and one repeated
    with start_visits(sqlite_url) as service:
        for event in events:
            service.send(event)
        visits = [service.scheduled(e.case_id) for e in events[:9]]
        service.processed(len(events))
        office = Office.of(service.runtime.city, "hoerde")
        assert len(service.get_visits()) == 9
        for visit in visits:
            others = [(v.visit_id, v.staff_id, v.starts_at, v.ends_at) for v in visits]
            booked = [Booking(*o) for o in others]
            assert (
                clash(office, visit.staff_id, visit.starts_at, booked, ignore_visit=visit.visit_id)
                is None
            )
        # Tuesday 09:00 for all four staff, then 10:30 for four, then 12:00.
        assert sorted(local_time(v.starts_at) for v in visits) == ["09:00"] * 4 + ["10:30"] * 4 + [
            "12:00"
        ]


def test_one_visit_per_family_when_the_registration_comes_twice(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    event = registered(days_since_birth=3)
    with start_visits(sqlite_url, visit_target_days=21) as service:
        event_id = service.send(event)
        service.send(event, event_id=event_id)  # redelivered: the inbox knows it
        service.send(event)  # published again by intake under a new id
        service.processed(3)
        visits = service.get_visits(event.case_id)
        assert len(visits) == 1
        assert visits[0].status == "scheduled"
        # The target window is configurable: 21 days after the birth here.
        assert visits[0].target_date == local_day(START) - timedelta(days=3) + timedelta(days=21)
        assert len(service.events(VisitScheduled.event_type)) == 1
        assert service.runtime.consumers[0].duplicates == 1


def test_a_withdrawal_overtaking_the_registration_means_no_visit(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    consent_id = str(uuid.uuid4())
    event = registered(consent_id=consent_id, at=START)
    withdrawal = consent_changed(
        event.case_id, ConsentState.WITHDRAWN, START + timedelta(hours=1), consent_id=consent_id
    )
    with start_visits(sqlite_url) as service:
        service.send(withdrawal)
        service.send(event)
        service.processed(2)
        case = service.get_case(event.case_id)
        assert case is not None
        assert case.state == "without_consent"
        assert case.personal is None  # no purpose to keep contact data without consent
        assert service.get_visits(event.case_id) == []

        # Later the family says yes after all: now it gets its visit.
        service.send(
            consent_changed(
                event.case_id,
                ConsentState.GIVEN,
                START + timedelta(hours=2),
                consent_id=str(uuid.uuid4()),
            )
        )
        visit = service.scheduled(event.case_id)
        assert visit.attempt == 1


def test_a_family_without_welcome_visit_consent_gets_no_visit(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    without = registered(consent=None)
    refused = registered(consent=ConsentState.WITHDRAWN)
    control = registered()
    with start_visits(sqlite_url) as service:
        for event in (without, refused, control):
            service.send(event)
        service.scheduled(control.case_id)
        service.processed(3)
        for event in (without, refused):
            case = service.get_case(event.case_id)
            assert case is not None
            assert case.state == "without_consent"
            assert service.get_visits(event.case_id) == []


def test_withdrawing_consent_cancels_the_open_visit_and_purges_personal_data(
    start_visits: Callable[..., Any], database_url: str
) -> None:
    consent_id = str(uuid.uuid4())
    event = registered(consent_id=consent_id)
    with start_visits(database_url) as service:
        service.send(event)
        visit = service.scheduled(event.case_id)
        case = service.get_case(event.case_id)
        assert case is not None
        assert case.personal is not None
        assert json.loads(case.personal) == event.personal.model_dump(mode="json")

        service.send(
            consent_changed(
                event.case_id,
                ConsentState.WITHDRAWN,
                START + timedelta(hours=3),
                consent_id=consent_id,
            )
        )
        cancelled = service.wait_events(VisitCancelled.event_type)
        assert cancelled[0]["visit_id"] == visit.visit_id
        assert cancelled[0]["reason"] == "consent_withdrawn"
        assert cancelled[0]["cancelled_by_role"] == "system"
        case = service.get_case(event.case_id)
        assert case is not None
        assert (case.state, case.personal, case.open_visit_id) == ("without_consent", None, None)
        [after] = service.get_visits(event.case_id)
        assert after.status == "cancelled"
        feed = service.events(VisitCancelled.event_type, "lotse.bezirk.hoerde")
        assert feed[0]["reason"] == "consent_withdrawn"


def test_erasure_cancels_purges_and_outlasts_a_late_registration(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    family = registered()
    erased_first = registered()
    with start_visits(sqlite_url) as service:
        service.send(family)
        visit = service.scheduled(family.case_id)
        service.send(erased(family.case_id))
        service.send(erased(erased_first.case_id))  # erasure overtakes the registration
        service.send(erased_first)
        service.send(family)  # a late re-publication of the registration
        service.processed(5)

        [cancelled] = service.events(VisitCancelled.event_type)
        assert cancelled["visit_id"] == visit.visit_id
        assert cancelled["reason"] == "case_erased"
        for case_id in (family.case_id, erased_first.case_id):
            case = service.get_case(case_id)
            assert case is not None
            assert case.state == "erased"
            assert case.personal is None
            assert case.reference_date is None
            assert case.preferred_language is None
        assert service.get_visits(erased_first.case_id) == []
        assert [v.status for v in service.get_visits(family.case_id)] == ["cancelled"]


def test_a_merge_leaves_one_visit_for_the_family(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    existing = registered()
    duplicate = registered(bezirk="eving")
    merged_first = registered()
    with start_visits(sqlite_url) as service:
        service.send(existing)
        service.send(duplicate)
        kept = service.scheduled(existing.case_id)
        gone = service.scheduled(duplicate.case_id)
        event = merged(duplicate.case_id, existing.case_id, merged_bezirk="eving")
        service.send(event, event_id=service.send(event))  # redelivered: no second effect
        # Merged before its registration arrived: the late registration schedules nothing.
        service.send(merged(merged_first.case_id, existing.case_id))
        service.send(merged_first)
        service.processed(6)

        [cancelled] = service.events(VisitCancelled.event_type)
        assert cancelled["visit_id"] == gone.visit_id
        assert cancelled["case_id"] == duplicate.case_id
        assert cancelled["reason"] == "duplicate"
        assert cancelled["cancelled_by_role"] == "system"
        # The Bezirksteam of the merged case's Bezirk learns it on its own feed.
        assert service.events(VisitCancelled.event_type, "lotse.bezirk.eving")
        case = service.get_case(duplicate.case_id)
        assert case is not None
        assert (case.state, case.personal, case.open_visit_id) == ("closed", None, None)
        survivor = service.get_case(existing.case_id)
        assert survivor is not None
        assert survivor.state == "active"
        assert survivor.open_visit_id == kept.visit_id
        assert service.get_visits(merged_first.case_id) == []
        assert [v.status for v in service.get_visits(existing.case_id)] == ["scheduled"]


def test_bad_events_are_dead_lettered_and_scheduling_goes_on(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    from lotse_contracts.cloudevents import to_kafka_binary

    from tests.support import produce

    good = registered()
    atlantis = registered(bezirk="atlantis")
    incomplete = registered().to_cloudevent(source="/lotse/intake")
    assert isinstance(incomplete.data, dict)
    incomplete_data = dict(incomplete.data)
    del incomplete_data["consents"]
    broken = to_kafka_binary(incomplete.model_copy(update={"data": incomplete_data}))
    with start_visits(sqlite_url) as service:
        intake = service.topic("lotse.intake")
        produce(service.bootstrap, intake, b"\x00not a cloudevent", [], b"k")
        produce(service.bootstrap, intake, broken.value, broken.headers, broken.key)
        service.send(atlantis)
        service.send(good)
        service.scheduled(good.case_id)
        dead = service.read("lotse.dlq.visits", 3)
        stages = {r.header(DLQ_STAGE): r.header(DLQ_REASON) or "" for r in dead}
        assert set(stages) == {"envelope", "schema", "rejected"}
        assert "consents" in stages["schema"]
        assert "atlantis" in stages["rejected"]
        assert service.get_visits(atlantis.case_id) == []
        assert service.runtime.consumers[0].dead_lettered == 3


def test_capacity_runs_out_per_office_and_late_proposals_are_flagged(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    # Kleinstadt-Nord can make one visit a week (Mondays 09:00); Süd works normally.
    nord = [registered(bezirk="nord", days_since_birth=2) for _ in range(3)]
    sued = registered(bezirk="sued", days_since_birth=2)
    late = registered(bezirk="sued", days_since_birth=20, channel=Channel.CLINIC)
    with start_visits(sqlite_url, city=TINY_CITY) as service:
        for event in [*nord, sued, late]:
            service.send(event)
        planned = {e.case_id: service.scheduled(e.case_id) for e in [*nord, sued, late]}
        target = local_day(START) - timedelta(days=2) + timedelta(days=14)  # Saturday 15 March
        nord_visits = sorted((planned[e.case_id] for e in nord), key=lambda v: v.starts_at)
        days = [local_day(v.starts_at) for v in nord_visits]
        monday = local_day(START)
        assert days == [monday + timedelta(weeks=n) for n in (1, 2, 3)]
        assert [v.target_missed for v in nord_visits] == [False, True, True]
        assert [v.target_missed_reason for v in nord_visits] == [None, "no_capacity", "no_capacity"]
        assert all(v.target_date == target for v in nord_visits)

        in_sued = planned[sued.case_id]
        assert local_day(in_sued.starts_at) == monday + timedelta(days=1)
        assert not in_sued.target_missed
        late_visit = planned[late.case_id]
        assert late_visit.target_missed
        assert late_visit.target_missed_reason == "late_registration"
        published = service.events(VisitScheduled.event_type)
        flagged = {d["case_id"]: d.get("target_missed_reason") for d in published}
        assert flagged[late.case_id] == "late_registration"


def test_overdue_is_raised_once_per_case(start_visits: Callable[..., Any], sqlite_url: str) -> None:
    due = registered(days_since_birth=2)
    done = registered(days_since_birth=2)
    without_consent = registered(days_since_birth=2, consent=None)
    with start_visits(sqlite_url, overdue_check_interval_s=0.05) as service:
        for event in (due, done, without_consent):
            service.send(event)
        open_visit = service.scheduled(due.case_id)
        done_visit = service.scheduled(done.case_id)
        service.processed(3)
        service.clock.now = done_visit.starts_at + timedelta(hours=1)
        response = service.client.post(
            f"/visits/{done_visit.visit_id}/complete",
            json={"informed_about_offers": True, "needs_noted": False},
            headers=bearer("familienbuero", subject="fb-1", bezirk=done.bezirk),
        )
        assert response.status_code == 200, response.text
        job = service.runtime.jobs[0]
        runs = job.runs
        service.wait(lambda: _ran(job, runs + 2))
        assert service.events(VisitOverdue.event_type) == []

        # The target (birth + 14 days = 15 March) has passed two days ago.
        service.clock.now = START + timedelta(days=14)
        overdue = service.wait_events(VisitOverdue.event_type)
        runs = job.runs
        service.wait(lambda: _ran(job, runs + 5))
        overdue = service.events(VisitOverdue.event_type)
        assert len(overdue) == 1
        assert overdue[0]["case_id"] == due.case_id
        assert overdue[0]["visit_id"] == open_visit.visit_id
        assert overdue[0]["days_overdue"] == 2
        assert job.failures == 0
        feed = service.events(VisitOverdue.event_type, "lotse.bezirk.hoerde")
        assert len(feed) == 1
        case = service.get_case(due.case_id)
        assert case is not None
        assert case.overdue_raised_at == service.clock.now


async def _ran(job: Any, runs: int) -> bool:
    return bool(job.runs >= runs)
