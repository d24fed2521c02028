"""The access matrix: every role (and no token) against every route of every service, built
as the service's own tests build it, asserting allow or deny exactly as the service's
declared access policy says; every allowed personal-data call leaves an audit entry.

"Allowed" means the route's role gate let the caller through: the route may still refuse a
case that is not the caller's (the made-up ids used here belong to nobody), which is the
route's scope check and looks the same from outside. The two are told apart by the audit
log, where the gate's refusals carry their own purpose.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from lotse_runtime.audit import AuditEntry
from lotse_runtime.identity import ACCESS_DENIED_DETAIL, CallerDep, Role
from lotse_runtime.policy import REFUSED_BY_POLICY, AccessPolicy, Rule, route_keys
from sqlmodel import select

from tests.conftest import Broker
from tests.support import bearer

pytestmark = pytest.mark.integration

CLINIC = "st-josefs-hospital-hoerde"
TRAEGER = "hebammenzentrum-dortmund"
BEZIRK = "hoerde"

#: The scope claims each role's token needs.
SCOPE: dict[Role, dict[str, str]] = {
    Role.babylotse: {"clinic": CLINIC},
    Role.familienbuero: {"bezirk": BEZIRK},
    Role.bezirksteam: {"bezirk": BEZIRK},
    Role.traeger: {"traeger": TRAEGER},
}

#: A value for every path parameter of every service; a new parameter fails the test here.
SAMPLE_PARAMS: dict[str, str] = {
    "case_id": "0c5f5d4e-1111-4aaa-8bbb-123456789abc",
    "consent_id": "1c5f5d4e-1111-4aaa-8bbb-123456789abc",
    "visit_id": "2c5f5d4e-1111-4aaa-8bbb-123456789abc",
    "referral_id": "3c5f5d4e-1111-4aaa-8bbb-123456789abc",
    "request_id": "4c5f5d4e-1111-4aaa-8bbb-123456789abc",
    "bezirk": BEZIRK,
    "slug": TRAEGER,
    "purpose": "contact",
    "duplicate_id": "4c5f5d4e-1111-4aaa-8bbb-123456789abc",
    "year": "2025",
    "wish_id": "5c5f5d4e-1111-4aaa-8bbb-123456789abc",
}

#: Routes whose successful answer never ends (a server-sent-event stream): only refusals
#: are tried there.
ENDLESS = {"GET /dashboard/stream"}


def _common(broker: Broker, database_url: str, prefix: str) -> dict[str, Any]:
    return {
        "kafka_bootstrap": broker.bootstrap,
        "database_url": database_url,
        "topic_prefix": prefix,
        "create_topics": False,  # the matrix needs HTTP only
        "relay_poll_interval_s": 0.05,
    }


def intake_app(broker: Broker, database_url: str, prefix: str) -> FastAPI:
    from lotse_intake.app import create_app

    from tests.intake.helpers import Clock, intake_settings

    return create_app(
        intake_settings(broker, database_url, prefix, create_topics=False), clock=Clock()
    )


def visits_app(broker: Broker, database_url: str, prefix: str) -> FastAPI:
    from lotse_visits.app import create_app
    from lotse_visits.settings import VisitsSettings

    from tests.visits.harness import Clock

    return create_app(VisitsSettings(**_common(broker, database_url, prefix)), clock=Clock())


def referrals_app(broker: Broker, database_url: str, prefix: str) -> FastAPI:
    from lotse_referrals.app import create_app
    from lotse_referrals.keyring import StaticKeyring

    from tests.referrals.helpers import Clock, settings

    return create_app(
        settings(broker.bootstrap, database_url, prefix, create_topics=False),
        clock=Clock(),
        keyring=StaticKeyring(),
    )


def reporting_app(broker: Broker, database_url: str, prefix: str) -> FastAPI:
    from lotse_reporting.app import create_app

    from tests.reporting.conftest import settings_for

    # With a login required, the dashboard is part of the matrix like every other route.
    return create_app(settings_for(broker, prefix, database_url, dashboard_public=False))


SERVICES: dict[str, Callable[[Broker, str, str], FastAPI]] = {
    "intake": intake_app,
    "visits": visits_app,
    "referrals": referrals_app,
    "reporting": reporting_app,
}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: SAMPLE_PARAMS[m.group(1)], path)


def subjects(policy: AccessPolicy, number: int, role: Role | None) -> list[str]:
    """Who tries a route in a role: for ``service``, every service some rule of the policy
    names (as a service names itself in its token's subject) and one no rule names."""
    anonymous = f"matrix-{number}-{role or 'anonymous'}"
    if role is not Role.service:
        return [anonymous]
    named = sorted({name for rule in policy.rules.values() for name in rule.services})
    return [*named, anonymous]


@dataclass
class Call:
    key: str
    role: Role | None
    subject: str
    status: int
    body: Any


def call_route(client: TestClient, key: str, role: Role | None, subject: str) -> Call:
    method, path = key.split(" ", 1)
    headers = bearer(role.value, subject=subject, **SCOPE.get(role, {})) if role else {}
    # An empty JSON body: the gate answers before the body is validated.
    body: dict[str, Any] | None = {} if method in ("POST", "PUT", "PATCH") else None
    response = client.request(method, concrete(path), headers=headers, json=body)
    try:
        payload = response.json()
    except ValueError:
        payload = response.text[:200]
    return Call(key, role, subject, response.status_code, payload)


def audit_rows(client: TestClient) -> list[AuditEntry]:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]

    async def load() -> list[AuditEntry]:
        async with runtime.db.transaction() as session:
            return list((await session.execute(select(AuditEntry))).scalars())

    rows: list[AuditEntry] = client.portal.call(load)  # type: ignore[union-attr]
    return rows


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_role_against_every_route(
    service: str, broker: Broker, sqlite_url: str, topic_prefix: str
) -> None:
    app = SERVICES[service](broker, sqlite_url, topic_prefix)
    policy: AccessPolicy = app.state.access_policy
    routes = [key for key, _ in route_keys(app)]
    # Every route has its rule and every rule its route (the app would not build otherwise).
    assert sorted(routes) == sorted(policy), "routes and access policy differ"

    calls: list[Call] = []
    with TestClient(app) as client:
        for number, key in enumerate(routes):
            for role in [*Role, None]:
                for subject in subjects(policy, number, role):
                    if key in ENDLESS and policy.rules[key].permits(role, subject):
                        continue
                    calls.append(call_route(client, key, role, subject))
        trail = audit_rows(client)

    refused_by_gate = {(row.subject, row.path) for row in trail if row.purpose == REFUSED_BY_POLICY}
    problems = []
    for call in calls:
        rule: Rule = policy.rules[call.key]
        who = f"{call.key} as {call.role or 'anonymous'} ({call.subject})"
        gate_refused = (call.subject, call.key.split(" ", 1)[1]) in refused_by_gate
        if rule.public:
            if call.status in (401, 403):
                problems.append(f"{who}: public route answered {call.status}")
        elif call.role is None:
            if call.status != 401:
                problems.append(f"{who}: {call.status} without a token, expected 401")
        elif rule.permits(call.role, call.subject):
            if call.status == 401 or gate_refused:
                problems.append(f"{who}: refused ({call.status}) but the policy allows it")
            if call.status >= 500:
                problems.append(f"{who}: {call.status} {call.body}")
        else:
            if call.status != 403 or call.body != {"detail": ACCESS_DENIED_DETAIL}:
                problems.append(f"{who}: {call.status} {call.body}, expected the 403")
            elif not gate_refused:
                problems.append(f"{who}: refused, but not by the route policy")
    assert not problems, "\n".join(problems)

    # Every allowed, successful personal-data call is in the trail, under its route.
    entries = {(row.subject, row.path) for row in trail}
    unaudited = [
        f"{call.key} as {call.role}"
        for call in calls
        if call.status < 400
        and policy.rules[call.key].audits(call.role)
        and (call.subject, call.key.split(" ", 1)[1]) not in entries
    ]
    assert not unaudited, unaudited
    # And every refusal too.
    refused = {call.subject for call in calls if call.status in (401, 403) and call.role}
    assert refused <= {row.subject for row in trail if row.action == "denied"}


def test_analysts_never_get_a_single_case() -> None:
    """No route taking a case, visit or referral id admits the analyst role."""
    from lotse_intake.policy import POLICY as INTAKE
    from lotse_referrals.policy import POLICY as REFERRALS
    from lotse_reporting.policy import POLICY as REPORTING
    from lotse_visits.policy import POLICY as VISITS

    single = re.compile(r"\{(case_id|visit_id|referral_id)\}")
    for policy in (INTAKE, VISITS, REFERRALS, REPORTING):
        for key, rule in policy.rules.items():
            if single.search(key) or rule.personal:
                assert not rule.permits(Role.analyst), key


def test_the_policy_names_every_route_at_start(
    broker: Broker, sqlite_url: str, topic_prefix: str
) -> None:
    """A route added to a service without a rule stops the app from starting."""
    from lotse_runtime.policy import PolicyError

    app = intake_app(broker, sqlite_url, topic_prefix)

    async def leak(case_id: str) -> dict[str, str]:
        return {"case_id": case_id}

    app.add_api_route("/cases/{case_id}/everything", leak, methods=["GET"])
    with (
        pytest.raises(PolicyError, match=r"GET /cases/\{case_id\}/everything"),
        TestClient(app),
    ):
        pass


def test_start_is_refused_for_a_route_without_rule_and_a_rule_without_route(
    broker: Broker, sqlite_url: str, topic_prefix: str
) -> None:
    from fastapi import APIRouter
    from lotse_intake.settings import IntakeSettings
    from lotse_runtime.app import create_service_app
    from lotse_runtime.policy import PolicyError, allow

    router = APIRouter()

    @router.get("/cases/{case_id}/extra")
    async def extra(case_id: str) -> dict[str, str]:
        return {"case_id": case_id}

    settings = IntakeSettings(**_common(broker, sqlite_url, topic_prefix))
    stale = AccessPolicy({"GET /cases": allow(Role.familienbuero)})
    with pytest.raises(PolicyError) as refused:
        create_service_app(settings, title="t", description="", routers=[router], policy=stale)
    message = str(refused.value)
    assert "routes without an access-policy rule: GET /cases/{case_id}/extra" in message
    assert "access-policy rules without a route: GET /cases" in message


def test_a_case_scoped_route_that_skips_its_scope_check_answers_nothing(
    broker: Broker, sqlite_url: str, topic_prefix: str
) -> None:
    """Fail closed: the runtime withholds the answer of a case-scoped route that never
    checked the case against the caller, and audits nothing as read."""
    from fastapi import APIRouter
    from lotse_intake.settings import IntakeSettings
    from lotse_runtime.app import create_service_app
    from lotse_runtime.policy import Access, personal

    router = APIRouter()

    @router.get("/cases/{case_id}")
    async def forgetful(case_id: str) -> dict[str, str]:
        return {"family_name": "Mustermann"}

    settings = IntakeSettings(**_common(broker, sqlite_url, topic_prefix))
    policy = AccessPolicy(
        {"GET /cases/{case_id}": personal(Role.familienbuero, purpose="p", access=Access.read)}
    )
    app = create_service_app(settings, title="t", description="", routers=[router], policy=policy)
    with TestClient(app) as client:
        response = client.get(
            f"/cases/{uuid.uuid4()}", headers=bearer("familienbuero", bezirk=BEZIRK)
        )
        trail = audit_rows(client)
    assert response.status_code == 500
    assert "Mustermann" not in response.text
    assert [row.action for row in trail] == []


def test_a_central_audit_entry_needs_no_help_from_the_route(
    broker: Broker, database_url: str, topic_prefix: str
) -> None:
    """A personal-data route that records nothing itself is audited by the runtime: who,
    when, which case (from the path), which purpose, read or change."""
    from fastapi import APIRouter
    from lotse_intake.settings import IntakeSettings
    from lotse_runtime.app import create_service_app
    from lotse_runtime.identity import CaseScope, ensure_may_access_case
    from lotse_runtime.policy import Access, personal

    router = APIRouter()

    @router.post("/cases/{case_id}/notes")
    async def note(case_id: str, caller: CallerDep) -> dict[str, str]:
        ensure_may_access_case(caller, CaseScope(bezirk=BEZIRK), personal_data=True)
        return {"case_id": case_id}

    settings = IntakeSettings(**_common(broker, database_url, topic_prefix))
    policy = AccessPolicy(
        {
            "POST /cases/{case_id}/notes": personal(
                Role.familienbuero, purpose="welcome visit notes", access=Access.change
            )
        }
    )
    app = create_service_app(settings, title="t", description="", routers=[router], policy=policy)
    case_id = str(uuid.uuid4())
    before = datetime.now(UTC)
    with TestClient(app) as client:
        ok = client.post(
            f"/cases/{case_id}/notes",
            headers=bearer("familienbuero", subject="fb-1", bezirk=BEZIRK),
        )
        trail = audit_rows(client)
    assert ok.status_code == 200
    (entry,) = trail
    assert (entry.subject, entry.role, entry.action, entry.case_id, entry.purpose, entry.path) == (
        "fb-1",
        "familienbuero",
        "change",
        case_id,
        "welcome visit notes",
        "/cases/{case_id}/notes",
    )
    at = entry.at if entry.at.tzinfo else entry.at.replace(tzinfo=UTC)
    assert at >= before.replace(microsecond=0)
