"""``GET /audit``: the audit log (audit.py) for the data-protection officer.

Apart from audit.py because its ``since`` parameter is one of the input windows of inputs.py,
whose guard in turn writes audit entries: audit ← inputs ← audit_api, one way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import select
from sqlmodel import col

from lotse_runtime.audit import AuditAction, AuditEntry, record
from lotse_runtime.identity import CallerDep
from lotse_runtime.inputs import AUDIT_SINCE, AuditSince


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    service: str
    subject: str | None
    role: str | None
    action: str
    case_id: str | None
    purpose: str
    path: str | None
    trace_id: str | None


def audit_router() -> APIRouter:
    """``GET /audit`` for the data-protection officer (the role is the runtime's policy:
    ``RUNTIME_POLICY`` in policy.py)."""
    router = APIRouter(tags=["audit"])

    @router.get(
        "/audit",
        response_model=list[AuditEntryPublic],
        summary="Audit trail of personal-data access (data-protection officer only)",
    )
    async def read_audit(
        request: Request,
        caller: CallerDep,
        case_id: Annotated[str | None, Query(description="Only this case.")] = None,
        subject: Annotated[str | None, Query(description="Only this caller.")] = None,
        since: Annotated[
            AuditSince | None,
            Query(
                description="Entries at or after this date-time, with its time-zone offset "
                f"(e.g. 2026-01-01T00:00:00Z). {AUDIT_SINCE.text}."
            ),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[AuditEntryPublic]:
        runtime = request.app.state.runtime
        query = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
        if case_id is not None:
            query = query.where(col(AuditEntry.case_id) == case_id)
        if subject is not None:
            query = query.where(col(AuditEntry.subject) == subject)
        if since is not None:
            query = query.where(col(AuditEntry.at) >= since)
        async with runtime.db.transaction() as session:
            rows = (await session.execute(query)).scalars().all()
            record(
                session,
                service=runtime.service,
                caller=caller,
                action=AuditAction.read,
                case_id=case_id,
                purpose="data-protection audit",
                path="/audit",
            )
        return [AuditEntryPublic.model_validate(row, from_attributes=True) for row in rows]

    return router
