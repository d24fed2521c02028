"""Identity: caller resolution from bearer tokens, 401/403 mapping, the case access matrix."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Depends, FastAPI
from lotse_runtime.identity import (
    AccessDenied,
    Caller,
    CallerDep,
    CaseScope,
    Role,
    ensure_may_access_case,
    ensure_role,
    install_identity,
    observe_access,
    require_role,
    scope_checked_earlier,
    stop_observing,
)
from pydantic import ValidationError

from tests.support import bearer, run_issuer

CASES = {
    "c-eving": CaseScope(
        bezirk="eving", traeger={"awo-elternschule"}, registered_by_clinic="klinikum-nord"
    ),
    "c-hoerde": CaseScope(bezirk="hoerde", traeger=None),
}


def _app() -> FastAPI:
    app = FastAPI()
    install_identity(app, run_issuer().resolver())

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
    return bearer(role, subject=subject, **scope)


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


LACKS_SCOPE = "token lacks a valid Lotse role or scope"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer "}, "missing bearer token"),
        ({"Authorization": "Basic dTpw"}, "missing bearer token"),
        ({"Authorization": "Bearer not-a-jwt"}, "invalid token"),
        (_headers("admin"), LACKS_SCOPE),
        (_headers("familienbuero"), LACKS_SCOPE),
        (_headers("bezirksteam"), LACKS_SCOPE),
        (_headers("traeger"), LACKS_SCOPE),
        (_headers("babylotse"), LACKS_SCOPE),
        (
            _headers("familienbuero", bezirk="Eving; DROP"),
            LACKS_SCOPE,
        ),
        (_headers("analyst", subject="u" * 500), LACKS_SCOPE),
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
        Role.koordination: Caller(subject="u", role=Role.koordination),
        Role.service: Caller(subject="u", role=Role.service),
    }
    assert set(callers) == set(Role)
    denied: dict[Role, str] = {}
    for role, caller in callers.items():
        try:
            ensure_may_access_case(caller, scope, personal_data=True)
        except AccessDenied as exc:
            denied[role] = exc.reason
    assert set(denied) == {Role.analyst, Role.dpo, Role.koordination}
    assert not any(reason.startswith("no case policy") for reason in denied.values())


class _Observer:
    def __init__(self) -> None:
        self.checked: list[CaseScope | None] = []
        self.entries: list[str | None] = []

    def case_checked(self, scope: CaseScope | None) -> None:
        self.checked.append(scope)

    def recorded(self, case_id: str | None) -> None:
        self.entries.append(case_id)


def test_the_policy_layer_hears_only_passed_case_checks() -> None:
    """What the runtime's policy layer relies on to verify a case-scoped route checked."""
    observer = _Observer()
    token = observe_access(observer)
    try:
        staff = Caller(subject="fb-1", role=Role.familienbuero, bezirk="eving")
        scope = CaseScope(bezirk="eving", case_id="c-1")
        ensure_may_access_case(staff, scope, personal_data=True)
        with pytest.raises(AccessDenied):
            ensure_may_access_case(staff, CaseScope(bezirk="hoerde"), personal_data=True)
        with pytest.raises(AccessDenied):
            ensure_may_access_case(staff, None, personal_data=True)
        scope_checked_earlier()
    finally:
        stop_observing(token)
    assert observer.checked == [scope, None]
    ensure_may_access_case(
        Caller(subject="s", role=Role.service), CaseScope(bezirk="eving"), personal_data=True
    )
    assert len(observer.checked) == 2  # no longer observed
