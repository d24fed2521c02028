"""Intake's HTTP API on a real database and broker: bad input is refused naming the field and
nothing is stored; Idempotency-Key; who may do what; Stadtbezirk override and move-in
notices; the keyring's clients; retention."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import Broker, PostgresServer, _admin_execute
from tests.intake.helpers import (
    ANALYST,
    BABYLOTSE,
    BEZIRKSTEAM_HOERDE,
    CITIZENS_OFFICE,
    CLINIC,
    DPO,
    ERASURE_REQUEST,
    FAMILIENBUERO_EVING,
    FAMILIENBUERO_HOERDE,
    OTHER_CLINIC,
    PLAINTEXTS,
    REFERRALS_SERVICE,
    REPORTING_SERVICE,
    TRAEGER,
    VISITS_SERVICE,
    Intake,
    erase,
    registration,
    run_intake,
)
from tests.support import bearer, eventually

# A well-formed id that no case or consent has (fixed, so every xdist worker collects the same
# test ids).
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def case_id(shared_intake: Intake) -> str:
    """A family registered in the module's shared intake."""
    body: dict[str, Any] = shared_intake.register(
        family={"family_name": "Bestand", "phone": "0231 555 0100"},
        consents=[
            {"scope": "welcome_visit"},
            {"scope": "screening_data_use"},
            {
                "scope": "traeger_contact",
                "traeger": "hebammenzentrum-dortmund",
                "purpose": "familienhebamme",
            },
        ],
    )
    return str(body["case_id"])


def with_family(**family: Any) -> dict[str, Any]:
    base = registration()["family"]
    base.update(family)
    return registration(family=base)


def with_address(**address: Any) -> dict[str, Any]:
    base = registration()["address"]
    base.update(address)
    return registration(address=base)


def without(section: str, name: str) -> dict[str, Any]:
    body = registration()
    del body[section][name]
    return body


# (id, path, body, headers, status, field, words in the reason)
BAD_INPUT: list[tuple[str, str, Any, dict[str, str], int, str, str]] = [
    (
        "postcode-not-five-digits",
        "/cases",
        with_address(postcode="4426"),
        BABYLOTSE,
        422,
        "address.postcode",
        "five digits",
    ),
    (
        "postcode-letters",
        "/cases",
        with_address(postcode="44a63"),
        BABYLOTSE,
        422,
        "address.postcode",
        "five digits",
    ),
    (
        "postcode-outside-city",
        "/cases",
        with_address(postcode="10115"),
        BABYLOTSE,
        422,
        "address.postcode",
        "not in Dortmund",
    ),
    (
        "other-city-name",
        "/cases",
        with_address(city="Bochum"),
        BABYLOTSE,
        422,
        "address.city",
        "not Dortmund",
    ),
    (
        "birth-date-in-future",
        "/cases",
        registration(children=[{"given_name": "Mira", "birth_date": "2025-03-04"}]),
        BABYLOTSE,
        422,
        "children.0.birth_date",
        "in the future",
    ),
    (
        "birth-year-mistyped",
        "/cases",
        registration(children=[{"birth_date": "2015-02-27"}]),
        BABYLOTSE,
        422,
        "children.0.birth_date",
        "check the year",
    ),
    (
        "birth-date-not-a-date",
        "/cases",
        registration(children=[{"birth_date": "27.02.2025"}]),
        BABYLOTSE,
        422,
        "children.0.birth_date",
        "date",
    ),
    (
        "move-in-child-six",
        "/cases",
        registration(channel="move_in", children=[{"birth_date": "2019-03-01"}]),
        CITIZENS_OFFICE,
        422,
        "children.0.birth_date",
        "under six",
    ),
    (
        "missing-family-name",
        "/cases",
        without("family", "family_name"),
        BABYLOTSE,
        422,
        "family.family_name",
        "Field required",
    ),
    (
        "missing-street",
        "/cases",
        without("address", "street"),
        BABYLOTSE,
        422,
        "address.street",
        "Field required",
    ),
    (
        "no-children",
        "/cases",
        registration(children=[]),
        BABYLOTSE,
        422,
        "children",
        "at least 1",
    ),
    (
        "misspelt-field",
        "/cases",
        {**registration(), "bezirk_overide": "hoerde"},
        BABYLOTSE,
        422,
        "bezirk_overide",
        "not permitted",
    ),
    (
        "unknown-bezirk-override",
        "/cases",
        registration(bezirk_override="hoerde-sued"),
        BABYLOTSE,
        422,
        "bezirk_override",
        "no Stadtbezirk",
    ),
    (
        "unknown-channel",
        "/cases",
        registration(channel="hospital"),
        BABYLOTSE,
        422,
        "channel",
        "'clinic' or 'move_in'",
    ),
    (
        "bad-phone",
        "/cases",
        with_family(phone="call me maybe"),
        BABYLOTSE,
        422,
        "family.phone",
        "digits",
    ),
    (
        "bad-email",
        "/cases",
        with_family(email="ayse.example.org"),
        BABYLOTSE,
        422,
        "family.email",
        "e-mail",
    ),
    (
        "bad-language",
        "/cases",
        registration(preferred_language="Türkisch"),
        BABYLOTSE,
        422,
        "preferred_language",
        "language",
    ),
    (
        "consent-unknown-traeger",
        "/cases",
        registration(
            consents=[
                {"scope": "welcome_visit"},
                {
                    "scope": "traeger_contact",
                    "traeger": "hebammen-ag",
                    "purpose": "familienhebamme",
                },
            ]
        ),
        BABYLOTSE,
        422,
        "consents.1.traeger",
        "no Träger 'hebammen-ag'",
    ),
    (
        "consent-unknown-scope",
        "/cases",
        registration(consents=[{"scope": "everything"}]),
        BABYLOTSE,
        422,
        "consents.0.scope",
        "welcome_visit",
    ),
    (
        "consent-in-future",
        "/cases",
        registration(consents=[{"scope": "welcome_visit", "given_at": "2025-03-10T09:00:00Z"}]),
        BABYLOTSE,
        422,
        "consents.0.given_at",
        "future",
    ),
    (
        "other-clinic-named",
        "/cases",
        registration(clinic_id="klinikum-nord"),
        BABYLOTSE,
        422,
        "clinic_id",
        "own clinic",
    ),
    (
        "later-consent-unknown-traeger",
        "/cases/{case}/consents",
        {"scope": "traeger_contact", "traeger": "hebammen-ag", "purpose": "familienhebamme"},
        BABYLOTSE,
        422,
        "traeger",
        "no Träger",
    ),
    (
        "screening-unknown-indicator",
        "/cases/{case}/screenings",
        {"support_need": "increased", "indicators": ["single_parent", "poverty"]},
        BABYLOTSE,
        422,
        "indicators.1",
        "single_parent",
    ),
    (
        "screening-unknown-need",
        "/cases/{case}/screenings",
        {"support_need": "high"},
        BABYLOTSE,
        422,
        "support_need",
        "'none', 'general', 'increased' or 'acute'",
    ),
    (
        "screening-unknown-module",
        "/cases/{case}/screenings",
        {"support_need": "general", "wished_modules": ["elternschule", "babyschwimmen"]},
        BABYLOTSE,
        422,
        "wished_modules.1",
        "no offer module 'babyschwimmen'",
    ),
    (
        "screening-in-future",
        "/cases/{case}/screenings",
        {"support_need": "general", "assessed_at": "2026-01-01T10:00:00+01:00"},
        BABYLOTSE,
        422,
        "assessed_at",
        "future",
    ),
    (
        "screening-naive-time",
        "/cases/{case}/screenings",
        {"support_need": "general", "assessed_at": "2025-03-01T10:00:00"},
        BABYLOTSE,
        422,
        "assessed_at",
        "timezone",
    ),
    (
        "handover-unknown-module",
        "/cases/{case}/handovers",
        {"module": "babyschwimmen"},
        BABYLOTSE,
        422,
        "module",
        "no offer module",
    ),
    (
        "handover-traeger-without-module",
        "/cases/{case}/handovers",
        {"module": "elternschule", "traeger": "hebammenzentrum-dortmund"},
        BABYLOTSE,
        422,
        "traeger",
        "does not offer elternschule",
    ),
    (
        "handover-without-consent",
        "/cases/{case}/handovers",
        {"module": "erziehungsberatung", "traeger": "familienberatung-sued"},
        BABYLOTSE,
        409,
        "traeger",
        "not consented",
    ),
    (
        "handover-consent-id-not-uuid",
        "/cases/{case}/handovers",
        {"module": "familienhebamme", "consent_id": "the-one-from-monday"},
        BABYLOTSE,
        422,
        "consent_id",
        "pattern",
    ),
    (
        "withdraw-unknown-consent",
        "/cases/{case}/consents/" + UNKNOWN_ID + "/withdraw",
        {},
        BABYLOTSE,
        404,
        "consent_id",
        "no such consent",
    ),
    (
        "erasure-unknown-reason",
        "/cases/{case}/erasure",
        {"reason": "because", "note": "Vorgang E-1"},
        DPO,
        422,
        "reason",
        "request",
    ),
    (
        "case-id-not-uuid",
        "/cases/123/screenings",
        {"support_need": "none"},
        BABYLOTSE,
        422,
        "path.case_id",
        "pattern",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "field", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(
    shared_intake: Intake,
    case_id: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    field: str,
    words: str,
) -> None:
    before = shared_intake.stored_state()
    response = shared_intake.client.post(
        path.format(case=case_id),
        json=body,
        headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == status, response.text
    errors = {e["field"]: e["reason"] for e in response.json()["errors"]}
    assert field in errors, errors
    assert words in errors[field]
    # Reasons never repeat personal values: errors may end up in logs and traces.
    for value in [*PLAINTEXTS, "Bochum", "10115", "2025-03-04", "04.03.2025", "27.02.2015"]:
        assert value not in response.text
    assert shared_intake.stored_state() == before  # no case, key, event, nor idempotency key


def test_idempotency_key_replays_the_first_answer(shared_intake: Intake) -> None:
    client = shared_intake.client
    body = registration(family={"family_name": "Wiederholt"})
    key = {"Idempotency-Key": f"reg-{uuid.uuid4()}"}
    first = client.post("/cases", json=body, headers={**BABYLOTSE, **key})
    assert first.status_code == 201
    state = shared_intake.stored_state()

    again = client.post("/cases", json=body, headers={**BABYLOTSE, **key})
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert shared_intake.stored_state() == state  # nothing new: no case, no event

    # The same key for another request is refused, naming the header.
    other = client.post(
        "/cases",
        json=registration(family={"family_name": "Anders"}),
        headers={**BABYLOTSE, **key},
    )
    assert other.status_code == 422
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert "different request" in other.json()["errors"][0]["reason"]
    assert shared_intake.stored_state() == state

    # A repeated withdrawal gets its first answer, not "already withdrawn".
    case_id = first.json()["case_id"]
    consent_id = first.json()["consents"][0]["consent_id"]
    url = f"/cases/{case_id}/consents/{consent_id}/withdraw"
    withdraw_key = {"Idempotency-Key": f"wd-{uuid.uuid4()}"}
    withdrawn = client.post(url, headers={**BABYLOTSE, **withdraw_key})
    replayed = client.post(url, headers={**BABYLOTSE, **withdraw_key})
    assert withdrawn.status_code == replayed.status_code == 200
    assert replayed.json() == withdrawn.json()
    assert client.post(url, headers=BABYLOTSE).status_code == 409  # without a key: a new try

    # Keys belong to their caller: another caller's key of the same name is another request.
    shared = client.post("/cases", json=body, headers={**FAMILIENBUERO_HOERDE, **key})
    assert shared.status_code == 403  # a Familienbüro does not register clinic births


def test_an_erased_familys_request_keys_do_not_register_it_again(shared_intake: Intake) -> None:
    client = shared_intake.client
    body = registration(family={"family_name": "Vergessen"})
    key = {"Idempotency-Key": f"reg-{uuid.uuid4()}"}
    case_id = client.post("/cases", json=body, headers={**BABYLOTSE, **key}).json()["case_id"]
    assert erase(client, case_id).status_code == 200
    late_retry = client.post("/cases", json=body, headers={**BABYLOTSE, **key})
    assert late_retry.status_code == 410
    assert late_retry.json()["errors"][0]["field"] == "Idempotency-Key"


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/cases/{case}", OTHER_CLINIC),
        ("GET", "/cases/{case}", FAMILIENBUERO_EVING),
        ("GET", "/cases/{case}", DPO),
        ("GET", "/cases/{case}", ANALYST),
        ("GET", "/cases/{case}", TRAEGER),
        ("GET", "/cases/{case}/screenings", BEZIRKSTEAM_HOERDE),
        ("GET", "/cases/{case}/screenings", REPORTING_SERVICE),
        ("GET", "/cases/" + UNKNOWN_ID, BABYLOTSE),
        ("POST", "/cases/{case}/erasure", OTHER_CLINIC),
        ("POST", "/cases/{case}/erasure", ANALYST),
        ("POST", "/cases/{case}/erasure", REPORTING_SERVICE),
        ("GET", "/keyring/cases/{case}/keys/contact", BABYLOTSE),
        ("GET", "/keyring/cases/{case}/keys/contact", FAMILIENBUERO_HOERDE),
        ("GET", "/keyring/cases/{case}/keys/contact", REPORTING_SERVICE),
        ("GET", "/keyring/cases/{case}/keys/contact", DPO),
        # Each service gets only the purposes its task needs.
        ("GET", "/keyring/cases/{case}/keys/contact", REFERRALS_SERVICE),
        ("GET", "/keyring/cases/{case}/keys/children", VISITS_SERVICE),
        ("GET", "/keyring/cases/{case}/keys/screening", VISITS_SERVICE),
        ("GET", "/keyring/cases/{case}/keys/screening", REFERRALS_SERVICE),
    ],
)
def test_callers_see_only_what_is_theirs(
    shared_intake: Intake, case_id: str, method: str, path: str, headers: dict[str, str]
) -> None:
    body = ERASURE_REQUEST if method == "POST" else None
    response = shared_intake.client.request(
        method, path.format(case=case_id), headers=headers, json=body
    )
    assert response.status_code == 403
    assert response.json() == {"detail": "not permitted"}


def test_allowed_readers_and_the_audit_trail(shared_intake: Intake, case_id: str) -> None:
    client = shared_intake.client
    for headers in (BABYLOTSE, FAMILIENBUERO_HOERDE):
        response = client.get(f"/cases/{case_id}", headers=headers)
        assert response.status_code == 200
        assert response.json()["personal"]["family_name"] == "Bestand"
    # The Bezirksteam reads the case, not the family.
    response = client.get(f"/cases/{case_id}", headers=BEZIRKSTEAM_HOERDE)
    assert response.status_code == 200
    assert response.json()["personal"] is None
    assert response.json()["bezirk"] == "hoerde"
    # No service reads cases (they follow intake's events), the keyring client neither.
    for headers in (REFERRALS_SERVICE, REPORTING_SERVICE):
        response = client.get(f"/cases/{case_id}", headers=headers)
        assert response.status_code == 403
    assert client.get(f"/cases/{case_id}/erasure", headers=DPO).json()["erased"] is False
    key = client.get(
        f"/keyring/cases/{case_id}/keys/contact",
        params={"reason": "welcome visit"},
        headers=VISITS_SERVICE,
    )
    assert key.status_code == 200
    assert key.json()["kid"].endswith("/contact")
    client.get(f"/keyring/cases/{case_id}/keys/contact", headers=REPORTING_SERVICE)  # refused

    trail = client.get("/audit", params={"case_id": case_id, "limit": 1000}, headers=DPO).json()
    actions = {(e["action"], e["role"], e["purpose"]) for e in trail}
    assert ("key_release", "service", "contact key: welcome visit") in actions
    assert ("read", "familienbuero", "read case") in actions
    assert ("create", "babylotse", "register family") in actions
    assert any(e["action"] == "denied" and e["subject"] == "reporting" for e in trail)


def test_bezirk_override_and_move_in_notices(shared_intake: Intake) -> None:
    client = shared_intake.client
    overridden = client.post(
        "/cases",
        json=registration(family={"family_name": "Grenzfall"}, bezirk_override="aplerbeck"),
        headers=BABYLOTSE,
    )
    assert overridden.status_code == 201
    assert overridden.json()["bezirk"] == "aplerbeck"
    assert overridden.json()["bezirk_source"] == "override"
    detail = client.get(f"/cases/{overridden.json()['case_id']}", headers=BABYLOTSE).json()
    assert detail["bezirk_derived"] == "hoerde"  # what the address gave is kept

    move_in = registration(
        channel="move_in",
        family={"family_name": "Zugezogen"},
        children=[{"birth_date": "2021-06-01"}, {"birth_date": "2023-11-15"}],
        address={"street": "Evinger Str.", "house_number": "5", "postcode": "44339"},
    )
    registered = client.post("/cases", json=move_in, headers=CITIZENS_OFFICE)
    assert registered.status_code == 201, registered.text
    case = registered.json()
    assert (case["channel"], case["clinic_id"], case["bezirk"]) == ("move_in", None, "eving")
    assert case["children_count"] == 2
    assert case["consents"][0]["history"][0]["recorded_by_role"] == "citizens_office"
    # The Familienbüro of Eving may read it, the Babylotse may not (not their clinic's).
    assert client.get(f"/cases/{case['case_id']}", headers=FAMILIENBUERO_EVING).status_code == 200
    assert client.get(f"/cases/{case['case_id']}", headers=BABYLOTSE).status_code == 403
    # A Babylotse does not file move-in notices; a Familienbüro only for its own Bezirk.
    assert client.post("/cases", json=move_in, headers=BABYLOTSE).status_code == 403
    other = registration(
        channel="move_in",
        family={"family_name": "Nachbar"},
        children=[{"birth_date": "2022-01-01"}],
    )
    assert client.post("/cases", json=other, headers=FAMILIENBUERO_EVING).status_code == 403
    assert client.post("/cases", json=other, headers=FAMILIENBUERO_HOERDE).status_code == 201


def test_openapi_documents_the_domain(shared_intake: Intake) -> None:
    spec = shared_intake.client.get("/openapi.json").json()
    assert spec["info"]["title"] == "Lotse intake"
    assert "Stadtbezirk" in spec["info"]["description"]
    paths = spec["paths"]
    for path in (
        "/cases",
        "/cases/{case_id}",
        "/cases/{case_id}/consents",
        "/cases/{case_id}/consents/{consent_id}/withdraw",
        "/cases/{case_id}/screenings",
        "/cases/{case_id}/handovers",
        "/cases/{case_id}/erasure",
        "/keyring/cases/{case_id}/keys/{purpose}",
        "/keyring/cases/{case_id}/disclosures",
        "/keyring/cases/{case_id}/disclosures/{referral_id}/key",
    ):
        assert path in paths
    parameters = {p["name"] for p in paths["/cases"]["post"]["parameters"]}
    assert "Idempotency-Key" in parameters
    indicator = spec["components"]["schemas"]["Indicator"]
    assert "premature_birth" in indicator["enum"]


@pytest.fixture
def retaining_intake(broker: Broker, topics: str, sqlite_url: str) -> Iterator[Intake]:
    yield from run_intake(
        broker, sqlite_url, topics, retention_days=365, housekeeping_interval_s=0.1
    )


async def test_families_are_erased_when_retention_expires(retaining_intake: Intake) -> None:
    intake = retaining_intake
    old = intake.register()["case_id"]
    intake.clock.advance(days=200)
    young = intake.register(family={"family_name": "Neu"})["case_id"]
    intake.clock.advance(days=170)  # the first family is 370 days old, the second 170

    def erased(case_id: str) -> bool:
        status = intake.client.get(f"/cases/{case_id}/erasure", headers=DPO).json()
        return bool(status["erased"])

    await eventually(lambda: erased(old), timeout_s=10)
    status = intake.client.get(f"/cases/{old}/erasure", headers=DPO).json()
    assert status["reason"] == "retention_expired"
    assert not erased(young)
    assert intake.outbox_types().count("de.lotse.intake.family-erased.v1") == 2


def test_racing_repeats_and_duplicates_make_one_case(intake_any_db: Intake) -> None:
    """A clinic's retries arriving at once (same Idempotency-Key) and two colleagues
    registering the same family at the same moment still make exactly one case."""
    client = intake_any_db.client
    body = registration()
    key = {"Idempotency-Key": f"race-{uuid.uuid4()}"}
    requests = [{**BABYLOTSE, **key}] * 4 + [
        bearer("babylotse", subject=f"bl-{n}", clinic=CLINIC) for n in range(4)
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda h: client.post("/cases", json=body, headers=h), requests))
    assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers]
    assert len({a.json()["case_id"] for a in answers}) == 1
    assert sum(a.status_code == 201 for a in answers) >= 1
    counts = intake_any_db.row_counts()
    assert counts["intake_case"] == 1
    assert counts["intake_data_key"] == 1
    assert intake_any_db.outbox_types() == ["de.lotse.intake.family-registered.v1"]


def test_a_registration_on_connections_a_database_restart_broke_is_retried_not_lost(
    broker: Broker, topics: str, postgres_url: str, postgres_server: PostgresServer | None
) -> None:
    """Pooled connections are not pinged under load (DATABASE_PING_AFTER_IDLE_S): after the
    server ended every session, a request is answered 201, or 503 with Retry-After and
    nothing stored; the client's retry with the same Idempotency-Key then registers the
    family exactly once."""
    assert postgres_server is not None  # postgres_url skips without a server
    for intake in run_intake(broker, postgres_url, topics, database_ping_after_idle_s=3600):
        client = intake.client
        assert client.post("/cases", json=registration(), headers=BABYLOTSE).status_code == 201
        database = postgres_url.rsplit("/", 1)[1]
        _admin_execute(
            postgres_server.admin_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{database}' AND pid <> pg_backend_pid()",
        )
        body = registration(
            family={"family_name": "Nowak", "parent_given_names": ["Ewa"], "phone": "+49 231 1"}
        )
        headers = {**BABYLOTSE, "Idempotency-Key": f"restart-{uuid.uuid4()}"}
        answers = [client.post("/cases", json=body, headers=headers) for _ in range(3)]
        refused = [a for a in answers if a.status_code == 503]
        registered = [a for a in answers if a.status_code == 201]
        assert len(refused) + len(registered) == 3, [a.text for a in answers]
        assert all(a.headers.get("Retry-After") == "1" for a in refused)
        # The first 201 registered the family; the ones after it are the same answer replayed.
        assert registered
        assert answers.index(registered[0]) == len(refused)
        assert len({a.json()["case_id"] for a in registered}) == 1
        assert intake.row_counts()["intake_case"] == 2
