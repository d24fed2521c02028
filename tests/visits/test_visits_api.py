"""The HTTP API of the visits service: calendar, details, and what staff record. Every
refusal names field and reason and changes nothing; nobody sees another Bezirk's visits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from lotse_contracts.events.visits import (
    VisitCompleted,
    VisitDeclined,
    VisitMissed,
    VisitRescheduled,
    VisitScheduled,
)
from lotse_visits.tables import VisitsVisit

from tests.support import bearer
from tests.visits.harness import (
    VisitsService,
    local_day,
    office,
    registered,
    team,
)

pytestmark = pytest.mark.integration

TUESDAY = date(2025, 3, 4)
BABYLOTSE = bearer("babylotse", subject="bl-1", clinic="other")
HOERDE = office("hoerde")


def families(service: VisitsService, count: int, bezirk: str = "hoerde") -> list[VisitsVisit]:
    """Register ``count`` families and return their scheduled visits, earliest first."""
    events = [registered(bezirk=bezirk, days_since_birth=2) for _ in range(count)]
    for event in events:
        service.send(event)
    visits = [service.scheduled(e.case_id) for e in events]
    return sorted(visits, key=lambda v: (v.starts_at, v.staff_id))


def errors_of(response: httpx.Response) -> dict[str, str]:
    return {e["field"]: e["reason"] for e in response.json()["errors"]}


def berlin(day: date, hh: int, mm: int = 0) -> str:
    """An ISO time with the winter-time offset of Dortmund."""
    return f"{day.isoformat()}T{hh:02d}:{mm:02d}:00+01:00"


def unchanged(service: VisitsService, visit: VisitsVisit) -> None:
    [now] = [v for v in service.get_visits(visit.case_id) if v.visit_id == visit.visit_id]
    assert (now.status, now.starts_at, now.staff_id, now.reschedule_count) == (
        visit.status,
        visit.starts_at,
        visit.staff_id,
        visit.reschedule_count,
    )


# -- reading -------------------------------------------------------------------------------------


def test_calendar_of_an_office_by_day(start_visits: Callable[..., Any], sqlite_url: str) -> None:
    with start_visits(sqlite_url) as service:
        hoerde = families(service, 2)
        families(service, 1, bezirk="eving")
        client = service.client

        response = client.get(
            "/offices/hoerde/calendar", params={"day": "2025-03-04"}, headers=HOERDE
        )
        assert response.status_code == 200, response.text
        calendar = response.json()
        assert calendar["familienbuero"] == "familienbuero-hoerde"
        assert calendar["time_zone"] == "Europe/Berlin"
        assert calendar["working_windows"] == [
            {"starts_at": "2025-03-04T08:00:00Z", "ends_at": "2025-03-04T15:00:00Z"}
        ]
        assert [v["visit_id"] for v in calendar["visits"]] == [v.visit_id for v in hoerde]
        assert {v["staff_id"] for v in calendar["visits"]} == {v.staff_id for v in hoerde}
        assert len(calendar["staff_ids"]) == 4
        # Tuesday: five slots for each of four staff, two of them taken.
        assert len(calendar["free_slots"]) == 5 * 4 - 2

        as_team = client.get(
            "/offices/hoerde/calendar", params={"day": "2025-03-04"}, headers=team("hoerde")
        ).json()
        assert [v["staff_id"] for v in as_team["visits"]] == [None, None]
        assert as_team["staff_ids"] is None
        assert len(as_team["free_slots"]) == 5  # each free time once, without staff

        today = client.get("/offices/hoerde/calendar", headers=HOERDE).json()
        assert today["day"] == "2025-03-03"
        assert today["visits"] == []
        assert len(today["free_slots"]) == 3 * 4  # Monday 11:00, 12:30, 14:00: all ahead
        saturday = client.get(
            "/offices/hoerde/calendar", params={"day": "2025-03-08"}, headers=HOERDE
        ).json()
        assert (saturday["working_windows"], saturday["free_slots"]) == ([], [])

        for headers in (office("eving"), team("eving"), BABYLOTSE):
            denied = client.get("/offices/hoerde/calendar", headers=headers)
            assert denied.status_code == 403
            assert denied.json() == {"detail": "not permitted"}
        unknown = client.get("/offices/atlantis/calendar", headers=office("atlantis"))
        assert unknown.status_code == 404
        assert "atlantis" in unknown.json()["detail"]
        bad_day = client.get("/offices/hoerde/calendar", params={"day": "4.3.2025"}, headers=HOERDE)
        assert bad_day.status_code == 422
        assert "query.day" in errors_of(bad_day)


def test_visit_details_for_the_own_bezirk_only(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    event = registered()
    with start_visits(sqlite_url) as service:
        service.send(event)
        visit = service.scheduled(event.case_id)
        client = service.client

        details = client.get(f"/visits/{visit.visit_id}", headers=HOERDE)
        assert details.status_code == 200, details.text
        body = details.json()
        assert body["visit"]["staff_id"] == visit.staff_id
        assert body["visit"]["status"] == "scheduled"
        assert body["case"]["state"] == "active"
        assert body["case"]["welcome_visit_consent"] == "given"
        assert body["case"]["reference_date"] == "2025-03-01"
        assert body["case"]["target_date"] == "2025-03-15"
        # The sealed block exactly as intake sent it; this service never opens it.
        assert body["case"]["personal"] == event.personal.model_dump(mode="json")

        as_team = client.get(f"/visits/{visit.visit_id}", headers=team("hoerde")).json()
        assert as_team["case"]["personal"] is None
        assert as_team["visit"]["staff_id"] is None

        case = client.get(f"/cases/{event.case_id}", headers=HOERDE).json()
        assert [v["visit_id"] for v in case["visits"]] == [visit.visit_id]

        for path in (f"/visits/{visit.visit_id}", f"/cases/{event.case_id}"):
            denied = client.get(path, headers=office("eving"))
            assert denied.status_code == 403
            assert denied.json() == {"detail": "not permitted"}
        assert (
            client.get("/visits/0c5f5d4e-1111-4aaa-8bbb-123456789abc", headers=HOERDE).status_code
            == 403
        )

        audit = client.get(
            "/audit",
            params={"case_id": event.case_id},
            headers=bearer("dpo", subject="dpo-1"),
        ).json()
        reads = [a for a in audit if a["action"] == "read"]
        assert {a["subject"] for a in reads} == {"fb-7"}  # the office's reads, not the team's
        assert any(a["action"] == "denied" for a in audit)


# -- rescheduling --------------------------------------------------------------------------------


def test_rescheduling_refuses_occupied_past_and_closed_times(
    start_visits: Callable[..., Any], database_url: str
) -> None:
    with start_visits(database_url) as service:
        mine, other = families(service, 2)
        client = service.client
        path = f"/visits/{mine.visit_id}/reschedule"

        occupied = client.post(
            path,
            json={
                "starts_at": berlin(TUESDAY, 9, 30),
                "staff_id": other.staff_id,
                "rescheduled_by": "family",
            },
            headers=HOERDE,
        )
        assert occupied.status_code == 409, occupied.text
        reason = errors_of(occupied)["starts_at"]
        assert "occupied" in reason
        assert f"{other.staff_id} has a visit 09:00–10:00" in reason

        refusals = [
            ({"starts_at": "2025-03-03T06:00:00Z"}, 422, "starts_at", "lies in the past"),
            ({"starts_at": berlin(date(2025, 3, 8), 10)}, 422, "starts_at", "Saturdays"),
            ({"starts_at": berlin(TUESDAY, 15, 30)}, 422, "starts_at", "outside the working"),
            ({"starts_at": "2025-03-05T10:00:00"}, 422, "starts_at", "timezone"),
            (
                {"starts_at": berlin(TUESDAY, 12), "staff_id": "someone-else"},
                422,
                "staff_id",
                "not a staff member",
            ),
            ({"starts_at": berlin(TUESDAY, 12), "when": "soon"}, 422, "when", "Extra inputs"),
            (
                {"starts_at": mine.starts_at.isoformat(), "staff_id": mine.staff_id},
                409,
                "starts_at",
                "current appointment",
            ),
        ]
        for change, status, field, words in refusals:
            response = client.post(
                path, json={"rescheduled_by": "family", **change}, headers=HOERDE
            )
            assert response.status_code == status, (change, response.text)
            assert words in errors_of(response)[field], (change, response.text)
        for headers in (office("eving"), team("hoerde")):
            response = client.post(
                path,
                json={"starts_at": berlin(TUESDAY, 12), "rescheduled_by": "family"},
                headers=headers,
            )
            assert response.status_code == 403
        unchanged(service, mine)
        assert service.events(VisitRescheduled.event_type) == []

        moved = client.post(
            path,
            json={"starts_at": berlin(date(2025, 3, 5), 10, 30), "rescheduled_by": "family"},
            headers=HOERDE,
        )
        assert moved.status_code == 200, moved.text
        assert moved.json()["staff_id"] == mine.staff_id  # kept: still free then
        assert moved.json()["reschedule_count"] == 1
        [event] = service.wait_events(VisitRescheduled.event_type)
        assert event["previous_starts_at"] == mine.starts_at.isoformat().replace("+00:00", "Z")
        assert event["starts_at"] == "2025-03-05T09:30:00Z"
        assert event["target_missed"] is False

        # After the target date (15 March), at the family's wish: flagged as such.
        late = client.post(
            path,
            json={"starts_at": berlin(date(2025, 3, 17), 11), "rescheduled_by": "family"},
            headers=HOERDE,
        ).json()
        assert (late["target_missed"], late["target_missed_reason"]) == (True, "family_request")
        # Into the other family's slot without naming anyone: someone free takes it.
        shared = client.post(
            path,
            json={"starts_at": other.starts_at.isoformat(), "rescheduled_by": "familienbuero"},
            headers=HOERDE,
        ).json()
        assert shared["staff_id"] != other.staff_id


def test_concurrent_reschedules_never_double_book(
    start_visits: Callable[..., Any], database_url: str
) -> None:
    with start_visits(database_url) as service:
        visits = families(service, 5)
        staff = visits[0].staff_id
        slot = berlin(date(2025, 3, 5), 12)
        app = service.client.app

        async def race() -> list[int]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://visits") as http:
                responses = await asyncio.gather(
                    *(
                        http.post(
                            f"/visits/{v.visit_id}/reschedule",
                            json={"starts_at": slot, "staff_id": staff, "rescheduled_by": "family"},
                            headers=HOERDE,
                        )
                        for v in visits
                    )
                )
            return sorted(r.status_code for r in responses)

        assert service.run(race) == [200, 409, 409, 409, 409]
        at_slot = [
            v
            for v in service.get_visits()
            if v.staff_id == staff and v.starts_at == datetime(2025, 3, 5, 11, tzinfo=UTC)
        ]
        assert len(at_slot) == 1


# -- outcomes and other actions ------------------------------------------------------------------


def test_completing_with_an_outcome_and_refused_actions(
    start_visits: Callable[..., Any], sqlite_url: str
) -> None:
    with start_visits(sqlite_url) as service:
        done, dropped = families(service, 2)
        client = service.client
        complete = f"/visits/{done.visit_id}/complete"
        outcome = {
            "informed_about_offers": True,
            "topics": ["sleep", "kita", "sleep"],
            "needs_noted": True,
            "referral_wished_module": "familienhebamme",
        }

        early = client.post(complete, json=outcome, headers=HOERDE)
        assert early.status_code == 409
        assert "before the appointment's start" in errors_of(early)["completed_at"]

        service.clock.now = done.starts_at + timedelta(minutes=70)
        refusals = [
            ({**outcome, "topics": ["sleep", "astrology"]}, "topics.1", "Input should be"),
            (
                {**outcome, "referral_wished_module": "zauberschule"},
                "referral_wished_module",
                "no offer module",
            ),
            ({**outcome, "completed_at": "2025-03-04T23:00:00Z"}, "completed_at", "future"),
            ({"informed_about_offers": True}, "needs_noted", "Field required"),
        ]
        for body, field, words in refusals:
            response = client.post(complete, json=body, headers=HOERDE)
            assert response.status_code == 422, (body, response.text)
            assert words in errors_of(response)[field], response.text
        assert client.post(complete, json=outcome, headers=office("eving")).status_code == 403
        unchanged(service, done)
        assert service.events(VisitCompleted.event_type) == []

        completed = client.post(complete, json=outcome, headers=HOERDE)
        assert completed.status_code == 200, completed.text
        assert completed.json()["outcome"] == {
            "informed_about_offers": True,
            "topics": ["sleep", "kita"],
            "needs_noted": True,
            "referral_wished_module": "familienhebamme",
        }
        [event] = service.wait_events(VisitCompleted.event_type)
        assert event["topics"] == ["sleep", "kita"]
        assert event["staff_id"] == done.staff_id
        assert event["days_since_reference"] == 3  # born 1 March, visited 4 March
        [feed] = service.wait_events(VisitCompleted.event_type, topic="lotse.bezirk.hoerde")
        assert "topics" not in feed  # the topics stay with the Familienbüro
        again = client.post(complete, json=outcome, headers=HOERDE)
        assert again.status_code == 409
        assert errors_of(again)["status"] == (
            "the visit is completed; only a scheduled visit can be completed"
        )
        case = client.get(f"/cases/{done.case_id}", headers=HOERDE).json()
        assert case["state"] == "visited"

        system_only = client.post(
            f"/visits/{dropped.visit_id}/cancel",
            json={"reason": "consent_withdrawn"},
            headers=HOERDE,
        )
        assert system_only.status_code == 422
        assert "set by the system" in errors_of(system_only)["reason"]
        cancelled = client.post(
            f"/visits/{dropped.visit_id}/cancel",
            json={"reason": "staff_unavailable"},
            headers=HOERDE,
        )
        assert cancelled.status_code == 200
        assert cancelled.json()["cancel_reason"] == "staff_unavailable"
        for action, body in [
            ("complete", outcome),
            ("reschedule", {"starts_at": berlin(TUESDAY, 12), "rescheduled_by": "family"}),
            ("no-show", {"follow_up": "letter_sent"}),
            ("decline", {"declined_via": "phone"}),
            ("cancel", {"reason": "other"}),
        ]:
            response = client.post(
                f"/visits/{dropped.visit_id}/{action}", json=body, headers=HOERDE
            )
            assert response.status_code == 409, (action, response.text)
            assert errors_of(response)["status"].startswith("the visit is cancelled;")
        # Cancelled for staff reasons, the family still has a visit coming: it is on the
        # office's list of families without an appointment, and staff arrange one.
        [due] = client.get("/offices/hoerde/due", headers=HOERDE).json()
        assert (due["case_id"], due["last_visit_status"], due["overdue"]) == (
            dropped.case_id,
            "cancelled",
            False,
        )
        assert client.get("/offices/hoerde/due", headers=office("eving")).status_code == 403
        again_due = client.post(f"/cases/{dropped.case_id}/visits", json={}, headers=HOERDE)
        assert again_due.status_code == 201, again_due.text
        assert again_due.json()["attempt"] == 2
        assert again_due.json()["proposed_automatically"] is True
        assert client.get("/offices/hoerde/due", headers=team("hoerde")).json() == []


def test_no_show_decline_and_a_new_visit(start_visits: Callable[..., Any], sqlite_url: str) -> None:
    without_consent = registered(consent=None)
    with start_visits(sqlite_url) as service:
        missed, declined = families(service, 2)
        service.send(without_consent)
        client = service.client

        too_early = client.post(
            f"/visits/{missed.visit_id}/no-show",
            json={"follow_up": "new_appointment_offered"},
            headers=HOERDE,
        )
        assert too_early.status_code == 409
        assert "has not started yet" in errors_of(too_early)["status"]

        service.clock.now = missed.starts_at + timedelta(minutes=30)
        no_show = client.post(
            f"/visits/{missed.visit_id}/no-show",
            json={"follow_up": "new_appointment_offered"},
            headers=HOERDE,
        )
        assert no_show.status_code == 200, no_show.text
        follow_up_id = no_show.json()["follow_up_visit_id"]
        [event] = service.wait_events(VisitMissed.event_type)
        assert (event["attempt"], event["follow_up"]) == (1, "new_appointment_offered")
        scheduled = service.wait_events(VisitScheduled.event_type, count=3)
        [follow_up] = [s for s in scheduled if s["visit_id"] == follow_up_id]
        assert follow_up["case_id"] == missed.case_id
        assert local_day(datetime.fromisoformat(follow_up["starts_at"])) > local_day(
            service.clock.now
        )
        refused = client.post(
            f"/cases/{missed.case_id}/decline", json={"declined_via": "phone"}, headers=HOERDE
        )
        assert refused.status_code == 409
        assert follow_up_id in errors_of(refused)["case_id"]

        declining = client.post(
            f"/visits/{declined.visit_id}/decline", json={"declined_via": "letter"}, headers=HOERDE
        )
        assert declining.status_code == 200
        [event] = service.wait_events(VisitDeclined.event_type)
        assert event["declined_via"] == "letter"
        [feed] = service.wait_events(VisitDeclined.event_type, topic="lotse.bezirk.hoerde")
        assert "declined_via" not in feed  # the family's channel is nobody else's business
        assert (
            client.get(f"/cases/{declined.case_id}", headers=HOERDE).json()["state"] == "declined"
        )

        # The family changes its mind and calls: staff book a time of their choosing.
        chosen = berlin(date(2025, 3, 18), 9)
        new = client.post(
            f"/cases/{declined.case_id}/visits",
            json={
                "starts_at": chosen,
                "staff_id": "familienbuero-hoerde-3",
                "setting": "familienbuero",
            },
            headers=HOERDE,
        )
        assert new.status_code == 201, new.text
        body = new.json()
        assert (body["proposed_automatically"], body["setting"], body["attempt"]) == (
            False,
            "familienbuero",
            2,
        )
        assert (body["target_missed"], body["target_missed_reason"]) == (True, "family_request")
        twice = client.post(f"/cases/{declined.case_id}/visits", json={}, headers=HOERDE)
        assert twice.status_code == 409
        assert "already has a scheduled visit" in errors_of(twice)["case_id"]

        service.wait(lambda: service.case(without_consent.case_id))
        no_consent = client.post(
            f"/cases/{without_consent.case_id}/visits", json={}, headers=HOERDE
        )
        assert no_consent.status_code == 409
        assert "consent" in errors_of(no_consent)["case_id"]
