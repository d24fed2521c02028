"""The service factory: one error shape for bad HTTP input, identity wired into every app."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from fastapi import APIRouter
from fastapi.testclient import TestClient
from lotse_runtime.app import create_service_app
from lotse_runtime.embedded import free_port
from lotse_runtime.identity import CallerDep
from lotse_runtime.settings import ServiceSettings
from pydantic import BaseModel, Field


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


class Registration(BaseModel):
    children: int = Field(ge=1, le=12)
    postcode: str = Field(pattern=r"^\d{5}$")


def app_with_routes(tmp_path: Path) -> TestClient:
    router = APIRouter()

    @router.post("/cases")
    async def register(body: Registration, caller: CallerDep) -> dict[str, str]:
        return {"registered_by": caller.subject}

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
    )
    return TestClient(create_service_app(settings, title="probe", description="", routers=[router]))


HEADERS = {"X-Lotse-Role": "babylotse", "X-Lotse-Subject": "bl-1", "X-Lotse-Clinic": "klinikum"}


def test_bad_body_names_each_field_and_reason(tmp_path: Path) -> None:
    with app_with_routes(tmp_path) as client:
        response = client.post("/cases", json={"children": 0, "postcode": "4413"}, headers=HEADERS)
    assert response.status_code == 422
    errors = {e["field"]: e["reason"] for e in response.json()["errors"]}
    assert set(errors) == {"children", "postcode"}
    assert "greater than or equal to 1" in errors["children"]
    assert "pattern" in errors["postcode"]


def test_caller_is_resolved_in_one_place(tmp_path: Path) -> None:
    with app_with_routes(tmp_path) as client:
        anonymous = client.post("/cases", json={"children": 1, "postcode": "44137"})
        known = client.post("/cases", json={"children": 1, "postcode": "44137"}, headers=HEADERS)
    assert anonymous.status_code == 401
    assert "X-Lotse-Role" in anonymous.json()["detail"]
    assert known.json() == {"registered_by": "bl-1"}
