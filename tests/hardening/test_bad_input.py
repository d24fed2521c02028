"""Bad input is refused, never stored, never a 500 (issue 15, item 4).

Every service, over its real HTTP API: impossible or implausible dates and times (year 1,
9999-12-31, naive date-times, numbers taken for Unix timestamps), control characters in text,
unknown fields, oversized bodies (with and without Content-Length). Each refusal names the
field and the reason, leaves what is stored exactly as it was, and is in the audit log. The
limits are those of ``lotse_runtime.inputs`` (README, "Bad input").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from lotse_runtime.app import create_service_app
from lotse_runtime.identity import CallerDep, Role
from lotse_runtime.inputs import CLOCK_SKEW, RequestModel
from lotse_runtime.policy import AccessPolicy, allow
from lotse_runtime.settings import ServiceSettings
from lotse_tooling.embedded import free_port
from pydantic import Field

from tests.conftest import Broker
from tests.intake.helpers import BABYLOTSE, Intake, run_intake
from tests.referrals.helpers import (
    BEZIRKSTEAM,
    FAMILIENBUERO,
    KOORDINATION,
    MODULE,
    TRAEGER,
    Family,
    Service,
    running,
    traeger_caller,
)
from tests.support import bearer
from tests.visits.harness import Clock as VisitsClock
from tests.visits.harness import VisitsService, office, registered

DPO = bearer("dpo", subject="dsb-1")
HOERDE = office("hoerde")


def errors_of(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return {e["field"]: e["reason"] for e in response.json()["errors"]}


def refused(response: httpx.Response, field: str, reason: str, status: int = 422) -> None:
    assert response.status_code == status, response.text
    errors = errors_of(response)
    assert field in errors, errors
    assert reason in errors[field], errors


def last_audit(client: TestClient) -> dict[str, Any]:
    """The newest audit entry before this read (the read records its own entry after it)."""
    response = client.get("/audit", params={"limit": 1}, headers=DPO)
    assert response.status_code == 200, response.text
    entry: dict[str, Any] = response.json()[0]
    return entry


def assert_audited_refusal(
    client: TestClient, path: str, purpose: str = "invalid input", case_id: str | None = None
) -> None:
    entry = last_audit(client)
    assert entry["action"] == "invalid", entry
    assert entry["case_id"] == case_id, entry
    assert entry["path"] == path, entry
    assert purpose in entry["purpose"], entry


# -- the runtime: a probe service with a small body limit -------------------------------------


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


class Note(RequestModel):
    text: str = Field(max_length=5000)


LIMIT = 1024


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[TestClient]:
    router = APIRouter()
    stored: list[str] = []

    @router.post("/notes")
    async def note(body: Note, caller: CallerDep) -> dict[str, int]:
        stored.append(body.text)
        return {"stored": len(stored)}

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'probe.db'}",
        max_request_body_bytes=LIMIT,
    )
    policy = AccessPolicy({"POST /notes": allow(Role.familienbuero)})
    app = create_service_app(
        settings, title="probe", description="", routers=[router], policy=policy
    )
    with TestClient(app) as client:
        client.app_state_stored = stored
        yield client


def body_of(size: int) -> bytes:
    """A valid note body of exactly ``size`` bytes."""
    empty = len(json.dumps({"text": ""}).encode())
    body = json.dumps({"text": "a" * (size - empty)}).encode()
    assert len(body) == size
    return body


def test_a_body_of_the_limit_is_taken_one_byte_more_is_413(probe: TestClient) -> None:
    headers = {**HOERDE, "Content-Type": "application/json"}
    ok = probe.post("/notes", content=body_of(LIMIT), headers=headers)
    assert ok.status_code == 200, ok.text
    too_big = probe.post("/notes", content=body_of(LIMIT + 1), headers=headers)
    refused(too_big, "body", f"larger than {LIMIT} bytes", status=413)
    assert too_big.json()["detail"] == "request body too large"
    assert probe.app_state_stored == ["a" * (LIMIT - 12)]
    assert_audited_refusal(probe, "/notes", "body too large")
    # The refusal comes before the caller is even looked at: also without a token.
    anonymous = probe.post("/notes", content=body_of(LIMIT + 1), headers={"Content-Type": "a"})
    assert anonymous.status_code == 413


def test_a_chunked_body_without_content_length_is_measured_as_it_comes(probe: TestClient) -> None:
    headers = {**HOERDE, "Content-Type": "application/json"}

    def chunks(body: bytes) -> Iterator[bytes]:
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    ok = probe.post("/notes", content=chunks(body_of(LIMIT)), headers=headers)
    assert ok.status_code == 200, ok.text
    too_big = probe.post("/notes", content=chunks(body_of(LIMIT + 1)), headers=headers)
    refused(too_big, "body", f"larger than {LIMIT} bytes", status=413)
    huge = probe.post("/notes", content=chunks(b"x" * (5 * 1024 * 1024)), headers=headers)
    assert huge.status_code == 413
    assert len(probe.app_state_stored) == 1


@pytest.mark.parametrize(
    ("text", "char"),
    [("a\x00b", "U+0000"), ("line\nbreak", "U+000A"), ("\x1b[31m", "U+001B"), ("\x7f", "U+007F")],
)
def test_control_characters_in_text_are_refused(probe: TestClient, text: str, char: str) -> None:
    response = probe.post("/notes", json={"text": text}, headers=HOERDE)
    refused(response, "text", char)
    assert probe.app_state_stored == []
    assert_audited_refusal(probe, "/notes")


def test_unknown_fields_and_control_characters_in_the_query_are_refused(
    probe: TestClient,
) -> None:
    unknown = probe.post("/notes", json={"text": "ok", "extra": 1}, headers=HOERDE)
    refused(unknown, "extra", "Extra inputs are not permitted")
    query = probe.get("/audit", params={"subject": "a\x00b"}, headers=DPO)
    refused(query, "query.subject", "U+0000")
    assert probe.app_state_stored == []


@pytest.mark.parametrize(
    ("since", "reason"),
    [
        ("2026-01-01", "timezone"),
        ("2026-01-01T00:00:00", "timezone"),
        ("12345", "numbers are not taken"),
        ("0001-01-01T00:00:00+01:00", "outside 1900-01-01"),
        ("9999-12-31T23:59:59Z", "outside 1900-01-01"),
        ("1999-12-31T23:59:59Z", "before 2000-01-01"),
    ],
)
def test_audit_since_must_be_an_aware_plausible_moment(
    probe: TestClient, since: str, reason: str
) -> None:
    response = probe.get("/audit", params={"since": since}, headers=DPO)
    refused(response, "query.since", reason)


def test_the_documented_limits_are_in_the_openapi_document(probe: TestClient) -> None:
    document = probe.get("/openapi.json").json()
    notes = document["paths"]["/notes"]["post"]["responses"]
    assert {"413", "422"} <= set(notes)
    since = next(
        p for p in document["paths"]["/audit"]["get"]["parameters"] if p["name"] == "since"
    )
    assert "not before 2000-01-01" in since["description"]


# -- intake ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def intake(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:
    database = tmp_path_factory.mktemp("intake") / "intake.db"
    yield from run_intake(broker, f"sqlite+aiosqlite:///{database}", f"b{uuid.uuid4().hex[:10]}.")


def new_family(intake: Intake) -> str:
    """A family of its own (the duplicate guard would answer the same one again)."""
    name = "Probe-" + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])
    case_id: str = intake.register(family={"family_name": name})["case_id"]
    return case_id


def intake_snapshot(intake: Intake, case_id: str) -> tuple[Any, Any, dict[str, int]]:
    detail = intake.client.get(f"/cases/{case_id}", headers=BABYLOTSE)
    screenings = intake.client.get(f"/cases/{case_id}/screenings", headers=BABYLOTSE)
    return detail.json(), screenings.json(), intake.stored_state()


BAD_MOMENTS = [
    ("0001-01-01T00:00:00+01:00", "outside 1900-01-01"),
    ("9999-12-31T23:59:59Z", "outside 1900-01-01"),
    ("12345", "numbers are not taken"),
    ("2025-03-01T10:00:00", "timezone"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("moment", "reason"), [*BAD_MOMENTS, (12345, "numbers are not taken")])
def test_intake_refuses_impossible_consent_and_screening_times(
    intake: Intake, moment: Any, reason: str
) -> None:
    case_id = new_family(intake)
    before = intake_snapshot(intake, case_id)
    consent = intake.client.post(
        f"/cases/{case_id}/consents",
        json={"scope": "screening_data_use", "given_at": moment},
        headers=BABYLOTSE,
    )
    refused(consent, "given_at", reason)
    assert_audited_refusal(intake.client, "/cases/{case_id}/consents", case_id=case_id)
    screening = intake.client.post(
        f"/cases/{case_id}/screenings",
        json={"support_need": "general", "assessed_at": moment},
        headers=BABYLOTSE,
    )
    refused(screening, "assessed_at", reason)
    assert_audited_refusal(intake.client, "/cases/{case_id}/screenings", case_id=case_id)
    registration = intake.client.post(
        "/cases",
        json={
            **_registration(),
            "consents": [{"scope": "welcome_visit", "given_at": moment}],
        },
        headers=BABYLOTSE,
    )
    refused(registration, "consents.0.given_at", reason)
    assert intake_snapshot(intake, case_id) == before


def _registration(**changes: Any) -> dict[str, Any]:
    from tests.intake.helpers import registration

    return registration(**changes)


@pytest.mark.integration
def test_intake_windows_around_the_clock_and_the_registration(intake: Intake) -> None:
    case_id = new_family(intake)
    before = intake_snapshot(intake, case_id)
    now = intake.clock.now
    too_old = (now - timedelta(days=366)).isoformat()
    ahead = (now + CLOCK_SKEW + timedelta(seconds=5)).isoformat()
    for moment, reason in (
        (too_old, "365 days before the family's registration"),
        (ahead, "future"),
    ):
        consent = intake.client.post(
            f"/cases/{case_id}/consents",
            json={"scope": "screening_data_use", "given_at": moment},
            headers=BABYLOTSE,
        )
        refused(consent, "given_at", reason)
        screening = intake.client.post(
            f"/cases/{case_id}/screenings",
            json={"support_need": "general", "assessed_at": moment},
            headers=BABYLOTSE,
        )
        refused(screening, "assessed_at", reason)
    assert intake_snapshot(intake, case_id) == before
    # The edges themselves are taken.
    edge = intake.client.post(
        f"/cases/{case_id}/screenings",
        json={"support_need": "general", "assessed_at": (now - timedelta(days=365)).isoformat()},
        headers=BABYLOTSE,
    )
    assert edge.status_code == 201, edge.text


@pytest.mark.integration
def test_intake_refuses_bad_birth_dates_names_and_unknown_fields(intake: Intake) -> None:
    before = intake.stored_state()
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {"children": [{"given_name": "Mira", "birth_date": "1899-12-31"}]},
            "children.0.birth_date",
            "outside 1900-01-01",
        ),
        (
            {"children": [{"given_name": "Mira", "birth_date": 20250227}]},
            "children.0.birth_date",
            "numbers are not taken",
        ),
        (
            {"children": [{"given_name": "Mira", "birth_date": "9999-12-31"}]},
            "children.0.birth_date",
            "outside 1900-01-01",
        ),
        (
            {"family": {"family_name": "Yılmaz\x00Özdemir"}},
            "family.family_name",
            "U+0000",
        ),
        (
            {"family": {"family_name": "Yılmaz", "parent_given_names": ["Ay\x07se"]}},
            "family.parent_given_names",
            "U+0007",
        ),
        (
            {"address": {"street": "We\r\ng", "house_number": "1", "postcode": "44263"}},
            "address.street",
            "U+000D",
        ),
        ({"nickname": "x"}, "nickname", "Extra inputs are not permitted"),
    ]
    for changes, field, reason in cases:
        response = intake.client.post("/cases", json=_registration(**changes), headers=BABYLOTSE)
        refused(response, field, reason)
        assert_audited_refusal(intake.client, "/cases")
    assert intake.stored_state() == before


# -- visits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def visits(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisitsService]:
    from lotse_visits.app import create_app
    from lotse_visits.settings import VisitsSettings

    from tests.visits.conftest import _wait_ready

    database = tmp_path_factory.mktemp("visits") / "visits.db"
    prefix = f"b{uuid.uuid4().hex[:10]}."
    clock = VisitsClock()
    settings = VisitsSettings(
        kafka_bootstrap=broker.bootstrap,
        database_url=f"sqlite+aiosqlite:///{database}",
        topic_prefix=prefix,
        consumer_session_timeout_ms=2000,
        consumer_heartbeat_interval_ms=300,
        relay_poll_interval_s=0.05,
        consumer_backoff_s=0.05,
    )
    with TestClient(create_app(settings, clock=clock)) as client:
        _wait_ready(client)
        service = VisitsService(client, clock, prefix, broker.bootstrap)
        service.run(lambda: service.runtime.consumers[0].wait_assigned())
        yield service


def visit_state(service: VisitsService, case_id: str) -> list[tuple[Any, ...]]:
    return [
        (v.visit_id, v.status, v.starts_at, v.staff_id, v.reschedule_count, v.closed_at)
        for v in service.get_visits(case_id)
    ]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("starts_at", "reason"),
    [
        *BAD_MOMENTS,
        (12345, "numbers are not taken"),
        ("2027-03-04T09:00:00+01:00", "more than 1 year ahead"),
    ],
)
def test_visits_refuses_impossible_reschedules(
    visits: VisitsService, starts_at: Any, reason: str
) -> None:
    event = registered(bezirk="hoerde", days_since_birth=2)
    visits.send(event)
    visit = visits.scheduled(event.case_id)
    before = visit_state(visits, event.case_id)
    response = visits.client.post(
        f"/visits/{visit.visit_id}/reschedule",
        json={"starts_at": starts_at, "rescheduled_by": "family"},
        headers=HOERDE,
    )
    refused(response, "starts_at", reason)
    assert_audited_refusal(visits.client, "/visits/{visit_id}/reschedule")
    completed = visits.client.post(
        f"/visits/{visit.visit_id}/complete",
        json={
            "completed_at": starts_at,
            "informed_about_offers": True,
            "needs_noted": False,
        },
        headers=HOERDE,
    )
    assert completed.status_code == 422, completed.text
    assert "completed_at" in errors_of(completed)
    unknown = visits.client.post(
        f"/visits/{visit.visit_id}/no-show",
        json={"follow_up": "none", "note": "x"},
        headers=HOERDE,
    )
    refused(unknown, "note", "Extra inputs are not permitted")
    staff = visits.client.post(
        f"/visits/{visit.visit_id}/reschedule",
        json={
            "starts_at": "2025-03-04T09:00:00+01:00",
            "staff_id": "fb\x00",
            "rescheduled_by": "family",
        },
        headers=HOERDE,
    )
    refused(staff, "staff_id", "U+0000")
    assert visit_state(visits, event.case_id) == before


@pytest.mark.integration
@pytest.mark.parametrize(
    ("day", "reason"),
    [
        ("0001-01-01", "outside 1900-01-01"),
        ("9999-12-31", "outside 1900-01-01"),
        ("12345", "numbers are not taken"),
        ("2010-01-01", "too far back"),
        ("2030-01-01", "too far ahead"),
    ],
)
def test_visits_calendar_day_is_bounded(visits: VisitsService, day: str, reason: str) -> None:
    response = visits.client.get("/offices/hoerde/calendar", params={"day": day}, headers=HOERDE)
    refused(response, "query.day", reason)
    ok = visits.client.get("/offices/hoerde/calendar", params={"day": "2025-03-04"}, headers=HOERDE)
    assert ok.status_code == 200, ok.text


# -- referrals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def referrals(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    database = tmp_path_factory.mktemp("referrals") / "referrals.db"
    prefix = f"b{uuid.uuid4().hex[:10]}."
    with running(broker.bootstrap, f"sqlite+aiosqlite:///{database}", prefix) as service:
        yield service


def traeger_entry(service: Service) -> dict[str, Any]:
    response = service.client.get(f"/catalogue/traeger/{TRAEGER}", headers=BEZIRKSTEAM)
    assert response.status_code == 200, response.text
    entry: dict[str, Any] = response.json()
    return entry


@pytest.mark.integration
def test_catalogue_patch_refuses_unknown_fields_control_characters_and_big_bodies(
    referrals: Service,
) -> None:
    path = f"/catalogue/traeger/{TRAEGER}"
    before = traeger_entry(referrals)
    cases = [
        ({"capacity_per_month": 0, "deleted": True}, "deleted", "Extra inputs are not permitted"),
        ({"name": "Hebammen\x00zentrum"}, "name", "U+0000"),
        ({"contact": "info@example.org\n"}, "contact", "U+000A"),
    ]
    for body, field, reason in cases:
        response = referrals.client.patch(path, json=body, headers=KOORDINATION)
        refused(response, field, reason)
        assert_audited_refusal(referrals.client, "/catalogue/traeger/{slug}")
    huge = {"contact": "x", "modules": [MODULE] * (5 * 1024 * 1024 // 18)}
    big = referrals.client.patch(path, content=json.dumps(huge), headers=KOORDINATION)
    refused(big, "body", "larger than 65536 bytes", status=413)
    assert_audited_refusal(referrals.client, "/catalogue/traeger/{slug}", "body too large")
    assert traeger_entry(referrals) == before


@pytest.mark.integration
@pytest.mark.parametrize(
    ("planned", "reason"),
    [
        ("9999-12-31", "outside 1900-01-01"),
        ("0001-01-01", "outside 1900-01-01"),
        (20250423, "numbers are not taken"),
        ("2026-04-18", "too far ahead"),
        ("2024-04-16", "too far back"),
    ],
)
def test_first_contact_planned_for_is_bounded(
    referrals: Service, planned: Any, reason: str
) -> None:
    family = Family()
    referrals.register(family)
    referrals.wait(
        lambda: (
            referrals.client.get(
                f"/cases/{family.case_id}/referrals", headers=FAMILIENBUERO
            ).status_code
            == 200
        ),
        what="family registered",
    )
    created = referrals.client.post(
        "/referrals",
        json={
            "case_id": family.case_id,
            "module": MODULE,
            "traeger": TRAEGER,
            "consent_ref": family.consent_id,
        },
        headers=FAMILIENBUERO,
    )
    assert created.status_code == 201, created.text
    rid = created.json()["referral_id"]
    steps = f"/referrals/{rid}/steps"
    hebammen = traeger_caller()
    assert referrals.client.post(steps, json={"step": "received"}, headers=hebammen).is_success
    before = [r.model_dump() for r in referrals.referrals(family.case_id)]
    response = referrals.client.post(
        steps,
        json={"step": "accepted", "first_contact_planned_for": planned},
        headers=hebammen,
    )
    refused(response, "first_contact_planned_for", reason)
    assert_audited_refusal(referrals.client, "/referrals/{referral_id}/steps")
    unknown = referrals.client.post(
        steps, json={"step": "accepted", "priority": "high"}, headers=hebammen
    )
    refused(unknown, "priority", "Extra inputs are not permitted")
    assert [r.model_dump() for r in referrals.referrals(family.case_id)] == before
    ok = referrals.client.post(
        steps,
        json={"step": "accepted", "first_contact_planned_for": "2025-04-23"},
        headers=hebammen,
    )
    assert ok.status_code == 200, ok.text


# -- /audit of every service -------------------------------------------------------------------


@pytest.mark.integration
def test_audit_since_without_time_zone_is_a_422_in_every_service(
    intake: Intake, visits: VisitsService, referrals: Service, tmp_path: Path
) -> None:
    from lotse_reporting.app import create_app as create_reporting
    from lotse_reporting.settings import ReportingSettings

    reporting = create_reporting(
        ReportingSettings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'reporting.db'}",
        )
    )
    with TestClient(reporting) as reporting_client:
        for client in (intake.client, visits.client, referrals.client, reporting_client):
            for since in ("2026-01-01", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59Z"):
                response = client.get("/audit", params={"since": since}, headers=DPO)
                assert response.status_code == 422, response.text
                assert "query.since" in errors_of(response)
            ok = client.get("/audit", params={"since": "2025-01-01T00:00:00Z"}, headers=DPO)
            assert ok.status_code == 200, ok.text
