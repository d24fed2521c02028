"""Audit log: who read or changed which case's personal data, when, and for what purpose.

Every service database holds an append-only ``audit_log`` table (database triggers refuse
UPDATE, and DELETE of entries younger than a year; older ones go by retention, see
:mod:`lotse_runtime.retention`). Entries carry ids, roles and purposes — never personal
data values — so the log itself may be shown to a data-protection officer (role ``dpo``)
through ``GET /audit``, which every service app serves. Refused access (401/403) is recorded
too, and so is refused input (413/422, action ``invalid``: route and case id, never the values).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Query, Request
from opentelemetry import trace
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import Field, SQLModel, col

from lotse_runtime.identity import Caller, CallerDep, current_access_observer
from lotse_runtime.inputs import AUDIT_SINCE, AuditSince


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditAction(StrEnum):
    read = "read"
    create = "create"
    change = "change"
    erase = "erase"
    export = "export"
    key_release = "key_release"
    """A family's data key was handed to another service."""
    denied = "denied"
    unauthenticated = "unauthenticated"
    invalid = "invalid"
    """A request refused as bad input (413, 422); see inputs.py."""


class AuditEntry(SQLModel, table=True):
    """One access to a case's personal data (or a refused attempt)."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=_utcnow, index=True)
    service: str = Field(description="Service that served the access.")
    subject: str | None = Field(default=None, description="Pseudonymous caller id.")
    role: str | None = Field(default=None, description="Caller's role.")
    action: str = Field(description="read, create, change, erase, export, key_release, denied.")
    case_id: str | None = Field(default=None, index=True, description="Pseudonymous case id.")
    purpose: str = Field(description="Why, e.g. 'welcome visit', 'referral to Träger'.")
    path: str | None = Field(default=None, description="HTTP route template or consumer name.")
    trace_id: str | None = Field(default=None, description="Trace of the request.")


def _trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def record(
    session: AsyncSession,
    *,
    service: str,
    caller: Caller | None,
    action: AuditAction,
    case_id: str | None,
    purpose: str,
    path: str | None = None,
) -> AuditEntry:
    """Add an entry to the caller's transaction (it commits with the access it records).

    Inside a request this also tells the policy layer that the route audited the access
    itself, so the runtime adds no second entry for it (see policy.py)."""
    entry = AuditEntry(
        service=service,
        subject=caller.subject if caller else None,
        role=str(caller.role) if caller else None,
        action=str(action),
        case_id=case_id,
        purpose=purpose,
        path=path,
        trace_id=_trace_id(),
    )
    session.add(entry)
    observer = current_access_observer()
    if observer is not None:
        observer.recorded(case_id)
    return entry


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
