"""Every privilege has a scope, tried as an attacker would with real ids of another scope:
service tokens are admitted by name only where that service calls, the catalogue is edited
only by its Träger or city-wide coordination, an erasure needs a second person, and an
Idempotency-Key never replays an answer into another role or scope."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lotse_runtime.identity import Role
from lotse_runtime.policy import AccessPolicy, PolicyError, Rule, allow

from tests.conftest import Broker
from tests.intake.helpers import (
    BABYLOTSE,
    CITIZENS_OFFICE,
    DPO,
    ERASURE_REQUEST,
    FAMILIENBUERO_EVING,
    FAMILIENBUERO_HOERDE,
    REFERRALS_SERVICE,
    REPORTING_SERVICE,
    SECOND_DPO,
    VISITS_SERVICE,
    Intake,
    registration,
    run_intake,
)
from tests.security.test_case_scope import trail_of
from tests.support import bearer

pytestmark = pytest.mark.integration


@pytest.fixture
def intake(broker: Broker, topics: str, sqlite_url: str) -> Iterator[Intake]:
    yield from run_intake(broker, sqlite_url, topics)


def policies() -> dict[str, AccessPolicy]:
    from lotse_intake.policy import POLICY as INTAKE
    from lotse_referrals.policy import POLICY as REFERRALS
    from lotse_reporting.policy import POLICY as REPORTING
    from lotse_visits.policy import POLICY as VISITS

    return {"intake": INTAKE, "visits": VISITS, "referrals": REFERRALS, "reporting": REPORTING}


# -- service tokens name their service ---------------------------------------------------------

#: Which service calls which route (service, route) → the services admitted. Everything else
#: admits no service token at all.
SERVICE_CALLS = {
    ("intake", "POST /cases"): {"buergerbuero"},
    ("intake", "GET /keyring/cases/{case_id}/keys/{purpose}"): {"visits", "referrals"},
    ("intake", "POST /keyring/cases/{case_id}/disclosures"): {"referrals"},
    ("intake", "GET /keyring/cases/{case_id}/disclosures/{referral_id}/key"): {"referrals"},
}


def test_every_rule_admitting_services_names_them_and_only_the_real_callers() -> None:
    admitted = {}
    for service, policy in policies().items():
        for key, rule in policy.rules.items():
            assert rule.problem() is None, (service, key)
            if Role.service in rule.roles:
                assert rule.services, (service, key)
                admitted[(service, key)] = set(rule.services)
            else:
                assert not rule.services, (service, key)
    assert admitted == SERVICE_CALLS


@pytest.mark.parametrize(
    "rule",
    [
        allow(Role.service),
        allow(Role.familienbuero, Role.service),
        Rule(roles=frozenset({Role.familienbuero}), services=frozenset({"visits"})),
    ],
)
def test_a_rule_admitting_services_without_names_stops_the_start(
    rule: Rule, broker: Broker, sqlite_url: str, topic_prefix: str
) -> None:
    from fastapi import APIRouter
    from lotse_intake.settings import IntakeSettings
    from lotse_runtime.app import create_service_app

    with pytest.raises(PolicyError, match="GET /things"):
        AccessPolicy({"GET /things": rule})

    # Also a rule slipped into a built policy is refused when the app binds it.
    router = APIRouter()

    @router.get("/things")
    async def things() -> dict[str, str]:
        return {}

    policy = AccessPolicy({"GET /things": allow(Role.familienbuero)})
    policy.rules["GET /things"] = rule
    settings = IntakeSettings(
        kafka_bootstrap=broker.bootstrap,
        database_url=sqlite_url,
        topic_prefix=topic_prefix,
        create_topics=False,
    )
    with pytest.raises(PolicyError, match="GET /things"):
        create_service_app(settings, title="t", description="", routers=[router], policy=policy)


def test_a_service_token_opens_only_what_its_service_calls(intake: Intake) -> None:
    client = intake.client
    case_id = intake.register()["case_id"]
    before = intake.stored_state()

    # `sub: reporting` (or any other service name) may not erase, read, register or get keys.
    for stranger in (REPORTING_SERVICE, bearer("service", subject="intake"), CITIZENS_OFFICE):
        refused = [
            client.post(f"/cases/{case_id}/erasure", json=ERASURE_REQUEST, headers=stranger),
            client.get(f"/cases/{case_id}", headers=stranger),
            client.get(f"/cases/{case_id}/screenings", headers=stranger),
            client.get(f"/cases/{case_id}/consents", headers=stranger),
            client.get(f"/keyring/cases/{case_id}/keys/contact", headers=stranger),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert all(r.json() == {"detail": "not permitted"} for r in refused)
    for stranger in (REPORTING_SERVICE, REFERRALS_SERVICE):
        move_in = registration(channel="move_in", family={"family_name": "Fremd"})
        assert client.post("/cases", json=move_in, headers=stranger).status_code == 403
    # The keyring client gets no case read either: it reads the blocks with its key.
    assert client.get(f"/cases/{case_id}", headers=REFERRALS_SERVICE).status_code == 403
    assert intake.stored_state() == before
    assert client.get(f"/cases/{case_id}/erasure", headers=DPO).json()["erased"] is False

    # The named callers do what they are there for.
    contact_key = client.get(f"/keyring/cases/{case_id}/keys/contact", headers=VISITS_SERVICE)
    assert contact_key.status_code == 200
    move_in = registration(
        channel="move_in",
        family={"family_name": "Zugezogen"},
        children=[{"birth_date": "2021-06-01"}],
        address={"street": "Evinger Str.", "house_number": "5", "postcode": "44339"},
    )
    assert client.post("/cases", json=move_in, headers=CITIZENS_OFFICE).status_code == 201


# -- the catalogue: a Träger its own entry, city-wide coordination all -------------------------


@pytest.fixture
def referrals(broker: Broker, tmp_path: Path, topic_prefix: str) -> Iterator[TestClient]:
    from tests.referrals.helpers import running

    database = f"sqlite+aiosqlite:///{tmp_path / 'referrals.db'}"
    with running(broker.bootstrap, database, topic_prefix, ready=False) as service:
        yield service.client


def test_catalogue_edits_stay_in_scope(referrals: TestClient) -> None:
    from lotse_contracts.city import load_city

    city = load_city("dortmund")
    hoerde_team = bearer("bezirksteam", subject="bt-1", bezirk="hoerde")
    serving_hoerde = [t.slug for t in city.traeger if "*" in t.bezirke or "hoerde" in t.bezirke]
    elsewhere = [t.slug for t in city.traeger if t.slug not in serving_hoerde]
    own, other = serving_hoerde[0], serving_hoerde[1]
    attempts: list[tuple[str, dict[str, str], dict[str, Any]]] = [
        # A Bezirksteam: not another Bezirk's Träger, not even one serving its own Bezirk
        # (capacity and availability hold city-wide).
        *[(slug, hoerde_team, {"active": False}) for slug in (*elsewhere[:1], own)],
        (own, hoerde_team, {"capacity_per_month": 0}),
        # A Träger: not another Träger's entry, nor its own modules or Bezirke.
        (other, bearer("traeger", subject="tr-x", traeger=own), {"capacity_per_month": 0}),
        (own, bearer("traeger", subject="tr-x", traeger=own), {"bezirke": ["*"]}),
        # No service, no Familienbüro, no analyst.
        (own, bearer("service", subject="referrals"), {"active": False}),
        (own, bearer("familienbuero", subject="fb-1", bezirk="hoerde"), {"active": False}),
        (own, bearer("analyst", subject="an-1"), {"active": False}),
    ]
    anyone = bearer("analyst", subject="an-1")
    before = referrals.get("/catalogue/traeger", headers=anyone).json()
    for slug, headers, body in attempts:
        answer = referrals.patch(f"/catalogue/traeger/{slug}", json=body, headers=headers)
        assert answer.status_code == 403, (slug, body, answer.text)
    assert referrals.get("/catalogue/traeger", headers=anyone).json() == before

    # The Träger itself and city-wide coordination may.
    mine = referrals.patch(
        f"/catalogue/traeger/{own}",
        json={"capacity_per_month": 7},
        headers=bearer("traeger", subject="tr-x", traeger=own),
    )
    assert mine.status_code == 200
    coordinated = referrals.patch(
        f"/catalogue/traeger/{other}",
        json={"active": False},
        headers=bearer("koordination", subject="koord-1"),
    )
    assert coordinated.status_code == 200
    assert coordinated.json()["active"] is False


# -- erasure with four eyes --------------------------------------------------------------------


def _request(client: TestClient, case_id: str, headers: dict[str, str]) -> str:
    answer = client.post(f"/cases/{case_id}/erasure", json=ERASURE_REQUEST, headers=headers)
    assert answer.status_code == 202, answer.text
    assert answer.json()["state"] == "pending"
    request_id: str = answer.json()["request_id"]
    return request_id


def _confirm(client: TestClient, case_id: str, request_id: str, headers: dict[str, str]) -> Any:
    return client.post(f"/cases/{case_id}/erasure/{request_id}/confirm", headers=headers)


def _key_released(intake: Intake, case_id: str) -> bool:
    response = intake.client.get(f"/keyring/cases/{case_id}/keys/contact", headers=VISITS_SERVICE)
    released: bool = response.status_code == 200
    return released


def test_an_erasure_request_alone_erases_nothing(intake: Intake) -> None:
    client = intake.client
    case_id = intake.register()["case_id"]
    request_id = _request(client, case_id, DPO)
    status = client.get(f"/cases/{case_id}/erasure", headers=DPO).json()
    assert status["erased"] is False
    assert status["pending_request"]["request_id"] == request_id
    assert status["pending_request"]["note"] == ERASURE_REQUEST["note"]
    assert _key_released(intake, case_id)
    assert "de.lotse.intake.family-erased.v1" not in intake.outbox_types()
    assert client.get(f"/cases/{case_id}", headers=BABYLOTSE).json()["personal"] is not None
    # A second request while one is pending is refused with the reason.
    again = client.post(f"/cases/{case_id}/erasure", json=ERASURE_REQUEST, headers=SECOND_DPO)
    assert again.status_code == 409
    assert request_id in again.json()["errors"][0]["reason"]
    # No reason, no request.
    bare = client.post(f"/cases/{case_id}/erasure", json={"reason": "request"}, headers=DPO)
    assert bare.status_code == 422


def test_the_requester_cannot_confirm_a_second_dpo_can(intake: Intake) -> None:
    client = intake.client
    case_id = intake.register()["case_id"]
    request_id = _request(client, case_id, DPO)
    before = intake.stored_state()

    same = _confirm(client, case_id, request_id, DPO)
    assert same.status_code == 409
    assert "four eyes" in same.json()["errors"][0]["reason"]
    # Another token of the same person (another role claim) is the same person.
    assert _confirm(client, case_id, request_id, bearer("dpo", subject="dsb-1")).status_code == 409
    # Only a data-protection officer confirms: not staff, not a service.
    for other in (FAMILIENBUERO_HOERDE, BABYLOTSE, REFERRALS_SERVICE):
        assert _confirm(client, case_id, request_id, other).status_code == 403
    assert intake.stored_state() == before
    assert _key_released(intake, case_id)

    erased = _confirm(client, case_id, request_id, SECOND_DPO)
    assert erased.status_code == 200, erased.text
    assert (erased.json()["erased"], erased.json()["reason"]) == (True, "request")
    assert not _key_released(intake, case_id)
    assert intake.outbox_types().count("de.lotse.intake.family-erased.v1") == 2
    # Settled: it cannot be confirmed or withdrawn again.
    assert _confirm(client, case_id, request_id, SECOND_DPO).status_code in (200, 409)
    withdraw = client.post(f"/cases/{case_id}/erasure/{request_id}/withdraw", headers=DPO)
    assert withdraw.status_code == 409

    trail = {(row.subject, row.action, row.purpose) for row in trail_of(client)}
    assert ("dsb-1", "change", "erasure requested: request") in trail
    assert ("dsb-2", "change", "erasure confirmed (four eyes)") in trail
    assert ("dsb-2", "erase", "erasure: request") in trail


def test_staff_request_for_their_own_family_and_withdrawal(intake: Intake) -> None:
    client = intake.client
    case_id = intake.register()["case_id"]  # Hörde, registered by the Babylotse's clinic
    # Staff of another Bezirk may not even request it.
    foreign = client.post(
        f"/cases/{case_id}/erasure", json=ERASURE_REQUEST, headers=FAMILIENBUERO_EVING
    )
    assert foreign.status_code == 403
    request_id = _request(client, case_id, FAMILIENBUERO_HOERDE)
    # Another person of another Bezirk may not withdraw it; the requester may.
    other = client.post(
        f"/cases/{case_id}/erasure/{request_id}/withdraw", headers=FAMILIENBUERO_EVING
    )
    assert other.status_code == 403
    withdrawn = client.post(
        f"/cases/{case_id}/erasure/{request_id}/withdraw", headers=FAMILIENBUERO_HOERDE
    )
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["state"] == "withdrawn"
    # A withdrawn request cannot be confirmed; the family stays.
    assert _confirm(client, case_id, request_id, DPO).status_code == 409
    assert _key_released(intake, case_id)
    status = client.get(f"/cases/{case_id}/erasure", headers=DPO).json()
    assert (status["erased"], status["pending_request"]) == (False, None)
    trail = {(row.subject, row.purpose) for row in trail_of(client)}
    assert ("fb-3", "erasure request withdrawn") in trail

    # A new request by the Familienbüro, confirmed by a data-protection officer.
    request_id = _request(client, case_id, FAMILIENBUERO_HOERDE)
    assert _confirm(client, case_id, request_id, DPO).status_code == 200
    assert not _key_released(intake, case_id)


# -- Idempotency-Keys are scoped to subject, role and scope ------------------------------------


def test_an_idempotency_key_is_not_replayed_into_another_scope(intake: Intake) -> None:
    client = intake.client
    key = {"Idempotency-Key": f"reg-{uuid.uuid4()}"}
    body = registration(family={"family_name": "Schlüssel"})
    first = client.post("/cases", json=body, headers={**BABYLOTSE, **key})
    assert first.status_code == 201, first.text
    case_id = first.json()["case_id"]
    # The same subject (bl-7) with a token of another clinic, same key and body: not the
    # stored answer (which names the other clinic's case), but a refusal naming the key.
    before = intake.stored_state()
    other_clinic = bearer("babylotse", subject="bl-7", clinic="klinikum-nord")
    replay = client.post("/cases", json=body, headers={**other_clinic, **key})
    assert replay.status_code == 422
    assert case_id not in replay.text
    assert replay.json()["errors"][0]["field"] == "Idempotency-Key"
    assert "Idempotent-Replayed" not in replay.headers
    # The same subject in another role and scope (a Familienbüro of another Bezirk, which
    # may not see the case at all), on a changing route of the case: no replay of the
    # stored answer past the case check, nothing stored changes.
    consent_key = {"Idempotency-Key": f"con-{uuid.uuid4()}"}
    consent = {"scope": "screening_data_use"}
    path = f"/cases/{case_id}/consents"
    assert client.post(path, json=consent, headers={**BABYLOTSE, **consent_key}).status_code == 201
    before = intake.stored_state()
    as_office = bearer("familienbuero", subject="bl-7", bezirk="eving")
    crossed = client.post(path, json=consent, headers={**as_office, **consent_key})
    assert crossed.status_code == 422
    assert "consent_id" not in crossed.text
    assert "Idempotent-Replayed" not in crossed.headers
    assert intake.stored_state() == before
    # In its own scope the replay still answers as before.
    again = client.post("/cases", json=body, headers={**BABYLOTSE, **key})
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
