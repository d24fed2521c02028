"""Identity: caller resolution from development headers, 401/403 mapping, the case access matrix."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Depends, FastAPI
from lotse_runtime.identity import (
    AccessDenied,
    Caller,
    CallerDep,
    CaseScope,
    DevelopmentCallerResolver,
    Role,
    ensure_may_access_case,
    ensure_role,
    install_identity,
    require_role,
)
from pydantic import ValidationError

CASES = {
    "c-eving": CaseScope(
        bezirk="eving", traeger={"awo-elternschule"}, registered_by_clinic="klinikum-nord"
    ),
    "c-hoerde": CaseScope(bezirk="hoerde", traeger=None),
}


def _app() -> FastAPI:
    app = FastAPI()
    install_identity(app, DevelopmentCallerResolver())

    @app.get("/cases/{case_id}")
    async def read_case(case_id: str, caller: CallerDep) -> dict[str, str]:
        # Unknown ids go through the same policy call, so they are denied like foreign cases.
        ensure_may_access_case(caller, CASES.get(case_id), personal_data=True)
        return {"case_id": case_id}

    @app.get("/cases/{case_id}/audit")
    async def read_audit(case_id: str, caller: CallerDep) -> dict[str, str]:
        ensure_may_access_case(caller, CASES.get(case_id), personal_data=False)
        return {"case_id": case_id, "audit": "[]"}

    @app.get("/kpis", dependencies=[Depends(require_role(Role.analyst, Role.service))])
    async def kpis() -> dict[str, int]:
        return {"families_reached": 42}

    @app.get("/me")
    async def me(caller: CallerDep) -> dict[str, str | None]:
        return caller.model_dump(mode="json")

    return app


def _headers(role: str, subject: str = "u-1", **scope: str) -> dict[str, str]:
    headers = {"X-Lotse-Role": role, "X-Lotse-Subject": subject}
    headers.update({f"X-Lotse-{key.capitalize()}": value for key, value in scope.items()})
    return headers


async def _get(path: str, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


FAMILIENBUERO_EVING = _headers("familienbuero", bezirk="eving")
CALLERS = {
    "familienbuero-eving": FAMILIENBUERO_EVING,
    "familienbuero-hoerde": _headers("familienbuero", bezirk="hoerde"),
    "bezirksteam-eving": _headers("bezirksteam", bezirk="eving"),
    "bezirksteam-mengede": _headers("bezirksteam", bezirk="mengede"),
    "traeger-awo": _headers("traeger", traeger="awo-elternschule"),
    "traeger-other": _headers("traeger", traeger="familienhebammen-dortmund"),
    "babylotse-nord": _headers("babylotse", clinic="klinikum-nord"),
    "babylotse-other": _headers("babylotse", clinic="st-johannes"),
    "analyst": _headers("analyst"),
    "dpo": _headers("dpo"),
    "service": _headers("service", subject="svc-visits"),
}

# (caller, path, expected status)
MATRIX = [
    ("familienbuero-eving", "/cases/c-eving", 200),
    ("familienbuero-hoerde", "/cases/c-eving", 403),
    ("familienbuero-hoerde", "/cases/c-hoerde", 200),
    ("bezirksteam-eving", "/cases/c-eving", 200),
    ("bezirksteam-mengede", "/cases/c-eving", 403),
    ("traeger-awo", "/cases/c-eving", 200),
    ("traeger-awo", "/cases/c-hoerde", 403),
    ("traeger-other", "/cases/c-eving", 403),
    ("babylotse-nord", "/cases/c-eving", 200),
    ("babylotse-nord", "/cases/c-hoerde", 403),
    ("babylotse-other", "/cases/c-eving", 403),
    ("analyst", "/cases/c-eving", 403),
    ("analyst", "/cases/c-eving/audit", 403),
    ("dpo", "/cases/c-eving", 403),
    ("dpo", "/cases/c-eving/audit", 200),
    ("service", "/cases/c-eving", 200),
    ("service", "/cases/c-hoerde/audit", 200),
    ("familienbuero-eving", "/cases/c-eving/audit", 200),
    ("familienbuero-hoerde", "/cases/c-eving/audit", 403),
    ("analyst", "/kpis", 200),
    ("service", "/kpis", 200),
    ("familienbuero-eving", "/kpis", 403),
    ("dpo", "/kpis", 403),
]


@pytest.mark.parametrize(("caller", "path", "status"), MATRIX)
async def test_access_matrix(caller: str, path: str, status: int) -> None:
    response = await _get(path, CALLERS[caller])
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json() == {"detail": "not permitted"}


async def test_foreign_case_and_unknown_case_look_the_same() -> None:
    foreign = await _get("/cases/c-hoerde", FAMILIENBUERO_EVING)
    unknown = await _get("/cases/c-does-not-exist", FAMILIENBUERO_EVING)
    assert foreign.status_code == unknown.status_code == 403
    assert foreign.content == unknown.content
    assert foreign.headers.get("content-length") == unknown.headers.get("content-length")


async def test_unknown_case_is_denied_even_for_services() -> None:
    response = await _get("/cases/c-does-not-exist", CALLERS["service"])
    assert response.status_code == 403


async def test_resolved_caller() -> None:
    response = await _get("/me", _headers("traeger", subject="p-9", traeger="awo-elternschule"))
    assert response.status_code == 200
    assert response.json() == {
        "subject": "p-9",
        "role": "traeger",
        "bezirk": None,
        "traeger": "awo-elternschule",
        "clinic": None,
    }


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing X-Lotse-Role header"),
        ({"X-Lotse-Role": "  "}, "missing X-Lotse-Role header"),
        ({"X-Lotse-Role": "admin", "X-Lotse-Subject": "u"}, "X-Lotse-Role is not a known role"),
        ({"X-Lotse-Role": "analyst"}, "missing X-Lotse-Subject header"),
        (_headers("familienbuero"), "role familienbuero requires the X-Lotse-Bezirk header"),
        (_headers("bezirksteam"), "role bezirksteam requires the X-Lotse-Bezirk header"),
        (_headers("traeger"), "role traeger requires the X-Lotse-Traeger header"),
        (_headers("babylotse"), "role babylotse requires the X-Lotse-Clinic header"),
        (_headers("familienbuero", bezirk="Eving; DROP"), "invalid X-Lotse-Bezirk header"),
        (_headers("analyst", subject="u" * 500), "invalid X-Lotse-Subject header"),
    ],
)
async def test_unauthenticated(headers: dict[str, str], reason: str) -> None:
    response = await _get("/cases/c-eving", headers)
    assert response.status_code == 401
    assert response.json() == {"detail": reason}
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_missing_resolver_is_a_wiring_error() -> None:
    app = FastAPI()

    @app.get("/me")
    async def me(caller: CallerDep) -> str:
        return caller.subject

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(RuntimeError, match="install_identity"):
            await client.get("/me", headers=_headers("analyst"))


def test_caller_validation() -> None:
    caller = Caller(subject="u", role=Role.familienbuero, bezirk="innenstadt-west")
    with pytest.raises(ValidationError):
        caller.bezirk = "eving"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="requires bezirk"):
        Caller(subject="u", role=Role.bezirksteam)
    with pytest.raises(ValidationError, match="requires traeger"):
        Caller(subject="u", role=Role.traeger, bezirk="eving")
    with pytest.raises(ValidationError, match="requires clinic"):
        Caller(subject="u", role=Role.babylotse)
    with pytest.raises(ValidationError):
        Caller(subject="", role=Role.analyst)
    assert Caller.model_validate({"subject": "u", "role": "dpo"}).role is Role.dpo


def test_policy_helpers_directly() -> None:
    analyst = Caller(subject="u", role=Role.analyst)
    ensure_role(analyst, Role.analyst)
    with pytest.raises(AccessDenied):
        ensure_role(analyst, Role.service, Role.dpo)
    with pytest.raises(AccessDenied):
        ensure_role(analyst)
    scope = CaseScope(bezirk="eving")
    assert scope.traeger == frozenset()
    traeger = Caller(subject="u", role=Role.traeger, traeger="awo-elternschule")
    with pytest.raises(AccessDenied):
        ensure_may_access_case(traeger, scope, personal_data=False)
    dpo = Caller(subject="u", role=Role.dpo)
    ensure_may_access_case(dpo, scope, personal_data=False)
    with pytest.raises(AccessDenied):
        ensure_may_access_case(dpo, scope, personal_data=True)
    # A babylotse never matches a case without a registering clinic.
    babylotse = Caller(subject="u", role=Role.babylotse, clinic="klinikum-nord")
    with pytest.raises(AccessDenied):
        ensure_may_access_case(babylotse, scope, personal_data=True)


def test_every_role_has_a_case_policy() -> None:
    scope = CaseScope(bezirk="eving", traeger={"t"}, registered_by_clinic="c")
    callers = {
        Role.babylotse: Caller(subject="u", role=Role.babylotse, clinic="c"),
        Role.familienbuero: Caller(subject="u", role=Role.familienbuero, bezirk="eving"),
        Role.bezirksteam: Caller(subject="u", role=Role.bezirksteam, bezirk="eving"),
        Role.traeger: Caller(subject="u", role=Role.traeger, traeger="t"),
        Role.analyst: Caller(subject="u", role=Role.analyst),
        Role.dpo: Caller(subject="u", role=Role.dpo),
        Role.service: Caller(subject="u", role=Role.service),
    }
    assert set(callers) == set(Role)
    denied: dict[Role, str] = {}
    for role, caller in callers.items():
        try:
            ensure_may_access_case(caller, scope, personal_data=True)
        except AccessDenied as exc:
            denied[role] = exc.reason
    assert set(denied) == {Role.analyst, Role.dpo}
    assert not any(reason.startswith("no case policy") for reason in denied.values())
