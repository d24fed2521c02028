"""Audit log: entries commit with the access they record, refusals are recorded, only the
data-protection officer reads the trail, and nobody can rewrite it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient
from lotse_runtime import audit
from lotse_runtime.app import ServiceRuntime, create_service_app, runtime_of
from lotse_runtime.db import Database
from lotse_runtime.identity import AccessDenied, CallerDep, Role
from lotse_runtime.migrations import create_schema
from lotse_runtime.policy import Access, AccessPolicy, personal
from lotse_runtime.settings import ServiceSettings
from lotse_tooling.embedded import free_port
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tests.support import bearer

pytestmark = pytest.mark.integration


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


FB = bearer("familienbuero", subject="fb-1", bezirk="eving")
DPO = bearer("dpo", subject="dpo-1")


def client_for(database_url: str) -> TestClient:
    router = APIRouter()

    @router.get("/cases/{case_id}")
    async def read_case(case_id: str, request: Request, caller: CallerDep) -> dict[str, str]:
        if case_id == "not-yours":
            raise AccessDenied("other Bezirk")
        runtime: ServiceRuntime[Any] = runtime_of(request)
        async with runtime.db.transaction() as session:
            audit.record(
                session,
                service=runtime.service,
                caller=caller,
                action=audit.AuditAction.read,
                case_id=case_id,
                purpose="welcome visit",
                path="/cases/{case_id}",
            )
        return {"case_id": case_id}

    settings = ProbeSettings(kafka_bootstrap=f"127.0.0.1:{free_port()}", database_url=database_url)
    # The route records its own entry in its transaction, so the runtime adds none.
    policy = AccessPolicy(
        {
            "GET /cases/{case_id}": personal(
                Role.familienbuero, purpose="welcome visit", access=Access.read, case_scoped=False
            )
        }
    )
    return TestClient(
        create_service_app(settings, title="p", description="", routers=[router], policy=policy)
    )


def test_reads_and_refusals_are_in_the_trail_for_the_dpo_only(database_url: str) -> None:
    with client_for(database_url) as client:
        assert client.get("/cases/c-1", headers=FB).status_code == 200
        assert client.get("/cases/not-yours", headers=FB).status_code == 403
        assert client.get("/cases/c-1").status_code == 401
        assert client.get("/audit", headers=FB).status_code == 403  # staff cannot read it
        trail = client.get("/audit", headers=DPO).json()
        only_c1 = client.get("/audit", params={"case_id": "c-1"}, headers=DPO).json()
    actions = [(e["action"], e["case_id"], e["subject"]) for e in reversed(trail)]
    assert actions == [
        ("read", "c-1", "fb-1"),
        ("denied", "not-yours", "fb-1"),
        ("unauthenticated", "c-1", None),
        ("denied", None, "fb-1"),
    ]
    assert [e["action"] for e in only_c1] == ["unauthenticated", "read"]
    assert trail[-1]["purpose"] == "welcome visit"


async def test_the_trail_cannot_be_rewritten(database_url: str, tmp_path: Path) -> None:
    db = Database(database_url)
    await create_schema(db, [])
    async with db.transaction() as session:
        audit.record(
            session,
            service="probe",
            caller=None,
            action=audit.AuditAction.read,
            case_id="c-1",
            purpose="test",
        )
    for statement in ("UPDATE audit_log SET case_id = 'c-2'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            async with db.transaction() as session:
                await session.execute(text(statement))
    async with db.transaction() as session:
        rows = (await session.execute(text("SELECT case_id FROM audit_log"))).all()
    assert [r[0] for r in rows] == ["c-1"]
    await db.dispose()
