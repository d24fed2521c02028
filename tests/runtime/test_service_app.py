"""The service factory: one error shape for bad HTTP input, identity wired into every app."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from fastapi import APIRouter, Request
from fastapi.testclient import TestClient
from lotse_runtime.app import create_service_app
from lotse_runtime.identity import CallerDep, Role
from lotse_runtime.policy import AccessPolicy, allow
from lotse_runtime.settings import ServiceSettings
from lotse_tooling.embedded import free_port
from pydantic import BaseModel, Field

from tests.support import bearer


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
    policy = AccessPolicy({"POST /cases": allow(Role.babylotse)})
    return TestClient(
        create_service_app(settings, title="probe", description="", routers=[router], policy=policy)
    )


HEADERS = bearer("babylotse", subject="bl-1", clinic="klinikum")


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
    assert anonymous.json()["detail"] == "missing bearer token"
    assert known.json() == {"registered_by": "bl-1"}


def test_one_trace_runs_from_the_request_through_database_and_outbox(tmp_path: Path) -> None:
    import json
    import uuid

    from lotse_contracts.events.visits import VisitScheduled
    from lotse_runtime.app import ServiceRuntime, runtime_of
    from lotse_runtime.outbox import OutboxMessage
    from lotse_runtime.telemetry import TelemetryConfig, setup_telemetry
    from sqlmodel import select

    telemetry = setup_telemetry(TelemetryConfig(service_name="probe", in_memory=True))
    router = APIRouter()

    @router.post("/visits")
    async def schedule(request: Request, caller: CallerDep) -> dict[str, str]:
        runtime: ServiceRuntime[Any] = runtime_of(request)
        event = VisitScheduled.example().model_copy(update={"case_id": str(uuid.uuid4())})
        async with runtime.db.transaction() as session:
            runtime.outbox.add(session, event)
        return {"ok": caller.subject}

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
    )
    app = create_service_app(
        settings,
        title="probe",
        description="",
        routers=[router],
        telemetry=telemetry,
        policy=AccessPolicy({"POST /visits": allow(Role.babylotse)}),
    )
    incoming = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    with TestClient(app) as client:
        response = client.post("/visits", headers={**HEADERS, "traceparent": incoming})
        assert response.status_code == 200

        async def outbox_rows() -> list[OutboxMessage]:
            async with app.state.runtime.db.transaction() as session:
                return list((await session.execute(select(OutboxMessage))).scalars())

        rows = client.portal.call(outbox_rows)  # type: ignore[union-attr]
    assert rows
    for row in rows:
        headers = dict(json.loads(row.headers))
        assert headers["traceparent"].split("-")[1] == "ab" * 16  # the caller's trace goes on
    assert telemetry.span_exporter is not None
    spans = telemetry.span_exporter.get_finished_spans()
    server = [s for s in spans if s.kind.name == "SERVER"]
    database = [s for s in spans if s.attributes and "db.system" in s.attributes]
    trace_id = int("ab" * 16, 16)
    assert [s.context.trace_id for s in server] == [trace_id]
    in_request = [s for s in database if s.context.trace_id == trace_id]
    assert any("INSERT" in s.name for s in in_request), [s.name for s in in_request]
    telemetry.shutdown()


def test_periodic_jobs_run_with_the_injected_clock_and_survive_failures(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from lotse_runtime.app import ServiceRuntime

    fixed = datetime(2025, 3, 17, 8, 0, tzinfo=UTC)
    seen: list[datetime] = []

    async def check_overdue(runtime: ServiceRuntime[Any]) -> None:
        seen.append(runtime.clock())
        if len(seen) == 1:
            raise RuntimeError("first run fails")

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
    )
    app = create_service_app(
        settings,
        title="probe",
        description="",
        clock=lambda: fixed,
        wire=lambda runtime: runtime.add_job("overdue", 0.01, check_overdue),
    )
    job = app.state.runtime.jobs[0]
    with TestClient(app):
        deadline = time.monotonic() + 10
        while job.runs < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert job.runs >= 3
    assert job.failures == 1
    assert job.last_error is None  # later runs succeeded
    assert set(seen) == {fixed}


def test_a_busy_database_answers_503_with_retry_after_and_other_database_errors_500(
    tmp_path: Path,
) -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    router = APIRouter()

    @router.post("/locked")
    async def locked() -> None:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))

    @router.post("/broken")
    async def broken() -> None:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("no such table: cases"))

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
    )
    policy = AccessPolicy(
        {"POST /locked": allow(Role.babylotse), "POST /broken": allow(Role.babylotse)}
    )
    app = create_service_app(
        settings, title="probe", description="", routers=[router], policy=policy
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        busy = client.post("/locked", headers=HEADERS)
        failed = client.post("/broken", headers=HEADERS)
        documented = client.get("/openapi.json").json()["paths"]["/locked"]["post"]["responses"]
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "1"
    assert "retry" in busy.json()["detail"]
    assert failed.status_code == 500
    assert "503" in documented
