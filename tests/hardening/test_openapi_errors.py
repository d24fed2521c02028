"""Regressions of what schemathesis found: the OpenAPI document states the error answers the
runtime really gives (422 in the platform's shape, 401/403 where a caller is needed, 404 where
a path names something), and an undecodable body is a 422 naming the body, not a bare 400."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import jsonschema
from fastapi import APIRouter
from fastapi.testclient import TestClient
from lotse_runtime.app import create_service_app
from lotse_runtime.identity import CallerDep, Role
from lotse_runtime.policy import AccessPolicy, allow
from lotse_runtime.settings import ServiceSettings
from lotse_tooling.embedded import free_port
from pydantic import BaseModel, Field

from tests.support import bearer

HEADERS = bearer("familienbuero", subject="fb-1", bezirk="hoerde")


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


class Note(BaseModel):
    children: int = Field(ge=1, le=12)


def probe_app(tmp_path: Path) -> TestClient:
    router = APIRouter()

    @router.post("/cases/{case_id}/notes")
    async def note(case_id: str, body: Note, caller: CallerDep) -> dict[str, str]:
        return {"case_id": case_id, "by": caller.subject}

    @router.get("/offices")
    async def offices(caller: CallerDep, limit: int = 10) -> list[str]:
        return ["hoerde"][:limit]

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'probe.db'}",
    )
    policy = AccessPolicy(
        {
            "POST /cases/{case_id}/notes": allow(Role.familienbuero),
            "GET /offices": allow(Role.familienbuero),
        }
    )
    return TestClient(
        create_service_app(settings, title="probe", description="", routers=[router], policy=policy)
    )


def answer_schema(document: dict[str, Any], path: str, method: str, status: str) -> Any:
    """The documented JSON body schema of one answer, resolvable against the document."""
    answer = document["paths"][path][method]["responses"][status]
    schema = answer["content"]["application/json"]["schema"]
    return {**schema, "components": document["components"]}


def test_a_422_answer_matches_its_documented_schema(tmp_path: Path) -> None:
    with probe_app(tmp_path) as client:
        document = client.get("/openapi.json").json()
        bad_body = client.post("/cases/c-1/notes", json={"children": 0}, headers=HEADERS)
        bad_query = client.get("/offices?limit=many", headers=HEADERS)
    for response, path, method in (
        (bad_body, "/cases/{case_id}/notes", "post"),
        (bad_query, "/offices", "get"),
    ):
        assert response.status_code == 422
        jsonschema.validate(response.json(), answer_schema(document, path, method, "422"))
    assert bad_query.json()["errors"][0]["field"] == "query.limit"


def test_refusals_and_unknown_paths_are_documented(tmp_path: Path) -> None:
    with probe_app(tmp_path) as client:
        document = client.get("/openapi.json").json()
        refused = client.get("/offices", headers=bearer("analyst", subject="an-1"))
        anonymous = client.get("/offices")
    notes = document["paths"]["/cases/{case_id}/notes"]["post"]["responses"]
    offices = document["paths"]["/offices"]["get"]["responses"]
    assert {"401", "403", "404", "422"} <= set(notes)
    assert {"401", "403"} <= set(offices)
    assert "404" not in offices  # no path parameter, nothing to be missing
    # The runtime's public probes need no caller, so they are never refused.
    assert not {"401", "403"} & set(document["paths"]["/healthz"]["get"]["responses"])
    for response, status in ((refused, "403"), (anonymous, "401")):
        assert response.status_code == int(status)
        jsonschema.validate(response.json(), answer_schema(document, "/offices", "get", status))


def test_an_undecodable_body_is_a_422_naming_the_body(tmp_path: Path) -> None:
    with probe_app(tmp_path) as client:
        response = client.post(
            "/cases/c-1/notes",
            content=b"\x8d\xb3/qnF\x9f",
            headers={**HEADERS, "Content-Type": "application/json"},
        )
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "body", "reason": "the body is not decodable JSON"}
    ]
