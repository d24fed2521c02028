"""Erasure with four eyes: one person requests it with a recorded reason, a different
data-protection officer confirms it, and only then is the family's key destroyed.

* **Request** (``POST /cases/{case_id}/erasure``): a data-protection officer, or staff of the
  case's own scope (the Familienbüro of its Stadtbezirk, the Babylotse of its clinic) who
  took the family's request. The reason (``ErasureReason``) and a note (e.g. the reference
  of the family's written request; no personal data) are recorded; nothing is erased. One
  pending request per family at a time.
* **Confirm** (``.../erasure/{request_id}/confirm``): a data-protection officer whose subject
  differs from the requester's (the same person twice is refused with 409 and the reason).
  This erases the family (``operations.erase_case``) in the same transaction.
* **Withdraw** (``.../erasure/{request_id}/withdraw``): the requester, or any
  data-protection officer, while the request is pending.

Request, confirmation and withdrawal are each audited (who, when, which case) in the same
transaction. Without four eyes, only the system erases: the housekeeping job at the end of
the configured retention period (``retention_days``: a rule set once, not a decision about
one family), which records ``erasure: retention_expired`` with no caller.
"""

from __future__ import annotations

import uuid

from lotse_contracts.events.intake import ErasureReason
from lotse_runtime.audit import AuditAction
from lotse_runtime.identity import AccessDenied, Role
from lotse_runtime.refusal import Conflict, Refusal
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_intake import operations as ops
from lotse_intake.operations import Outcome
from lotse_intake.tables import (
    ErasureCreate,
    ErasurePublic,
    ErasureRequestPublic,
    IntakeCase,
    IntakeErasureRequest,
)

PENDING = "pending"
CONFIRMED = "confirmed"
WITHDRAWN = "withdrawn"

#: Who may request an erasure (the case check narrows staff to their own cases).
REQUESTERS = ops.ERASE
#: Who may confirm one: a data-protection officer other than the requester.
CONFIRMERS = (Role.dpo,)


def request_public(row: IntakeErasureRequest) -> ErasureRequestPublic:
    return ErasureRequestPublic(
        request_id=row.request_id,
        case_id=row.case_id,
        reason=ErasureReason(row.reason),
        note=row.note,
        state=row.state,
        requested_at=row.requested_at,
        requested_by_role=row.requested_by_role,
        decided_at=row.decided_at,
        decided_by_role=row.decided_by_role,
    )


async def pending_request(session: AsyncSession, case_id: str) -> IntakeErasureRequest | None:
    query = select(IntakeErasureRequest).where(
        col(IntakeErasureRequest.case_id) == case_id,
        col(IntakeErasureRequest.state) == PENDING,
    )
    return (await session.execute(query)).scalars().first()


async def status(session: AsyncSession, call: ops.Call, case_id: str) -> ErasurePublic:
    """The case's erasure status with a request still waiting for confirmation."""
    case = call.authorise(await ops.load_case(session, case_id), ops.ERASE, personal_data=False)
    call.audit(session, AuditAction.read, case_id, "erasure status")
    public = ops.erasure_public(case)
    pending = await pending_request(session, case.case_id)
    if pending is not None:
        public.pending_request = request_public(pending)
    return public


async def _load(
    session: AsyncSession, call: ops.Call, case_id: str, roles: tuple[Role, ...]
) -> IntakeCase:
    return call.authorise(
        await ops.load_case(session, case_id, for_update=True), roles, personal_data=False
    )


async def _request_of(session: AsyncSession, case_id: str, request_id: str) -> IntakeErasureRequest:
    row = await session.get(IntakeErasureRequest, request_id)
    if row is None or row.case_id != case_id:
        raise Refusal("request_id", "no such erasure request for this case", status=404)
    if row.state != PENDING:
        raise Conflict("request_id", f"this erasure request is {row.state} already")
    return row


async def request(
    session: AsyncSession, call: ops.Call, case_id: str, body: ErasureCreate
) -> Outcome:
    case = await _load(session, call, case_id, REQUESTERS)
    ops.ensure_not_erased(case)
    waiting = await pending_request(session, case_id)
    if waiting is not None:
        raise Conflict(
            "case_id",
            f"erasure request {waiting.request_id} is waiting for confirmation; confirm or "
            "withdraw it first",
        )
    row = IntakeErasureRequest(
        request_id=str(uuid.uuid4()),
        case_id=case_id,
        reason=body.reason.value,
        note=body.note,
        state=PENDING,
        requested_at=call.now(),
        requested_by_role=call.caller.role.value,
        requested_by_subject=call.caller.subject,
    )
    session.add(row)
    call.audit(session, AuditAction.change, case_id, f"erasure requested: {body.reason}")
    return Outcome(202, request_public(row), case_id)


async def confirm(session: AsyncSession, call: ops.Call, case_id: str, request_id: str) -> Outcome:
    case = await _load(session, call, case_id, CONFIRMERS)
    row = await _request_of(session, case_id, request_id)
    if row.requested_by_subject == call.caller.subject:
        raise Conflict(
            "request_id",
            "four eyes: the person who requested this erasure may not confirm it; a second "
            "data-protection officer must",
        )
    now = call.now()
    row.state, row.decided_at = CONFIRMED, now
    row.decided_by_role, row.decided_by_subject = call.caller.role.value, call.caller.subject
    session.add(row)
    call.audit(session, AuditAction.change, case_id, "erasure confirmed (four eyes)")
    if case.erased_at is None:  # erased meanwhile (retention): the request is settled too
        await ops.erase_case(
            session,
            call.runtime,
            call.intake.keyring,
            case,
            reason=ErasureReason(row.reason),
            caller=call.caller,
            path=call.route,
        )
    return Outcome(200, ops.erasure_public(case), case_id)


async def withdraw(session: AsyncSession, call: ops.Call, case_id: str, request_id: str) -> Outcome:
    await _load(session, call, case_id, REQUESTERS)
    row = await _request_of(session, case_id, request_id)
    if call.caller.role is not Role.dpo and row.requested_by_subject != call.caller.subject:
        raise AccessDenied("only the requester or a data-protection officer withdraws")
    row.state, row.decided_at = WITHDRAWN, call.now()
    row.decided_by_role, row.decided_by_subject = call.caller.role.value, call.caller.subject
    session.add(row)
    call.audit(session, AuditAction.change, case_id, "erasure request withdrawn")
    return Outcome(200, request_public(row), case_id)
