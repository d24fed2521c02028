"""Possible duplicates across scopes, and merging two cases of one family.

The duplicate guard of ``POST /cases`` answers only with cases the registrar may read. A
match outside that scope (another clinic's family, another Stadtbezirk's) is registered as
a new case, answered exactly like a new family, and flagged here for the Familienbüro of the
Stadtbezirk responsible for the *existing* case. That office sees its flags
(``GET /bezirke/{bezirk}/possible-duplicates``) and either merges the two cases or dismisses
the flag. A merge:

* keeps one case (normally the existing one) and marks the other merged: nothing more is
  recorded for it (409 naming the survivor);
* carries the merged case's consents still in force over to the survivor where the
  survivor has none with the same terms (new consent ids, the family's original dates,
  ``consent-changed`` of the survivor), so that what the family agreed to still holds;
* moves the duplicate guard's hashes to the survivor;
* publishes ``cases-merged``, keyed by the merged case, on which visits, referrals and
  reporting count and visit the family once.
"""

from __future__ import annotations

import uuid

from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.intake import CasesMerged, Channel
from lotse_runtime.audit import AuditAction
from lotse_runtime.identity import (
    CaseScope,
    Role,
    ensure_may_access_case,
    ensure_role,
    event_role,
)
from lotse_runtime.refusal import Conflict, Refusal
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_intake import domain
from lotse_intake import operations as ops
from lotse_intake.domain import ConsentTerms, DuplicateStatus
from lotse_intake.operations import Outcome
from lotse_intake.tables import (
    IntakeCase,
    IntakeConsent,
    IntakeMatchKey,
    IntakePossibleDuplicate,
    MergeCreate,
    PossibleDuplicatePublic,
)

#: Who decides on possible duplicates: the Familienbüro of the existing case's Stadtbezirk.
DECIDE = (Role.familienbuero,)


def _public(flag: IntakePossibleDuplicate, new_case: IntakeCase) -> PossibleDuplicatePublic:
    return PossibleDuplicatePublic(
        duplicate_id=flag.duplicate_id,
        case_id=flag.case_id,
        existing_case_id=flag.existing_case_id,
        bezirk=flag.bezirk,
        case_bezirk=new_case.bezirk,
        channel=Channel(new_case.channel),
        created_at=flag.created_at,
        status=flag.status,
        decided_at=flag.decided_at,
        merged_case_id=flag.merged_case_id,
        surviving_case_id=flag.surviving_case_id,
    )


async def _authorised_flag(
    session: AsyncSession, call: ops.Call, duplicate_id: str
) -> IntakePossibleDuplicate:
    """The flag, if the caller is the Familienbüro of its Bezirk (else 403, also for an
    unknown id: whether a flag exists is not for others to learn)."""
    ensure_role(call.caller, *DECIDE)
    query = (
        select(IntakePossibleDuplicate)
        .where(col(IntakePossibleDuplicate.duplicate_id) == duplicate_id)
        .with_for_update()
    )
    flag = (await session.execute(query)).scalar_one_or_none()
    scope = None if flag is None else CaseScope(bezirk=flag.bezirk, case_id=flag.existing_case_id)
    ensure_may_access_case(call.caller, scope, personal_data=False)
    assert flag is not None
    return flag


def _ensure_open(flag: IntakePossibleDuplicate) -> None:
    if flag.status != DuplicateStatus.OPEN.value:
        raise Conflict("duplicate_id", f"this flag is {flag.status} already")


async def list_flags(
    session: AsyncSession, call: ops.Call, bezirk: str, status: DuplicateStatus | None
) -> list[PossibleDuplicatePublic]:
    ensure_role(call.caller, *DECIDE)
    ensure_may_access_case(call.caller, CaseScope(bezirk=bezirk), personal_data=False)
    query = (
        select(IntakePossibleDuplicate, IntakeCase)
        .join(IntakeCase, col(IntakeCase.case_id) == col(IntakePossibleDuplicate.case_id))
        .where(col(IntakePossibleDuplicate.bezirk) == bezirk)
        .order_by(col(IntakePossibleDuplicate.created_at))
    )
    if status is not None:
        query = query.where(col(IntakePossibleDuplicate.status) == status.value)
    rows = (await session.execute(query)).all()
    call.audit(session, AuditAction.read, None, f"possible duplicates of {bezirk}")
    return [_public(flag, case) for flag, case in rows]


async def dismiss(session: AsyncSession, call: ops.Call, duplicate_id: str) -> Outcome:
    flag = await _authorised_flag(session, call, duplicate_id)
    _ensure_open(flag)
    flag.status = DuplicateStatus.DISMISSED.value
    _decided(flag, call)
    session.add(flag)
    for case_id in (flag.case_id, flag.existing_case_id):
        call.audit(
            session, AuditAction.change, case_id, f"possible duplicate {duplicate_id} dismissed"
        )
    new_case = await ops.load_case(session, flag.case_id)
    assert new_case is not None
    return Outcome(200, _public(flag, new_case), flag.existing_case_id)


def _decided(flag: IntakePossibleDuplicate, call: ops.Call) -> None:
    flag.decided_at = call.now()
    flag.decided_by_role = event_role(call.caller.role).value
    flag.decided_by_subject = call.caller.subject


async def _ensure_mergeable(session: AsyncSession, case: IntakeCase) -> None:
    if case.erased_at is not None:
        raise Conflict("duplicate_id", f"case {case.case_id} was erased; nothing to merge")
    other = await ops.surviving_case_of(session, case.case_id)
    if other is not None:
        raise Conflict("duplicate_id", f"case {case.case_id} was merged into case {other} already")


async def merge(
    session: AsyncSession, call: ops.Call, duplicate_id: str, body: MergeCreate
) -> Outcome:
    flag = await _authorised_flag(session, call, duplicate_id)
    _ensure_open(flag)
    survivor_id = body.surviving_case_id or flag.existing_case_id
    if survivor_id not in (flag.case_id, flag.existing_case_id):
        raise Refusal("surviving_case_id", "must be one of the two cases of this flag")
    merged_id = flag.case_id if survivor_id == flag.existing_case_id else flag.existing_case_id
    # Both locked in a fixed order, so two merges touching the same cases cannot deadlock.
    locked = {
        case_id: await ops.load_case(session, case_id, for_update=True)
        for case_id in sorted((survivor_id, merged_id))
    }
    survivor, merged = locked[survivor_id], locked[merged_id]
    assert survivor is not None
    assert merged is not None
    for case in (survivor, merged):
        await _ensure_mergeable(session, case)
    now = call.now()
    role = event_role(call.caller.role)
    await _carry_consents(session, call, merged, survivor, role)
    await session.execute(
        update(IntakeMatchKey)
        .where(col(IntakeMatchKey.case_id) == merged_id)
        .values(case_id=survivor_id)
    )
    flag.status = DuplicateStatus.MERGED.value
    flag.merged_case_id = merged_id
    flag.surviving_case_id = survivor_id
    _decided(flag, call)
    session.add(flag)
    call.runtime.outbox.add(
        session,
        CasesMerged(
            merged_case_id=merged_id,
            surviving_case_id=survivor_id,
            bezirk=survivor.bezirk,
            merged_bezirk=merged.bezirk,
            merged_at=now,
            merged_by_role=role,
        ),
        time=now,
    )
    for case_id in (merged_id, survivor_id):
        call.audit(
            session,
            AuditAction.change,
            case_id,
            f"possible duplicate {duplicate_id}: case {merged_id} merged into {survivor_id}",
        )
    await session.flush()
    new_case = await ops.load_case(session, flag.case_id)
    assert new_case is not None
    return Outcome(200, _public(flag, new_case), survivor_id)


async def _carry_consents(
    session: AsyncSession,
    call: ops.Call,
    merged: IntakeCase,
    survivor: IntakeCase,
    role: EventRole,
) -> None:
    """Consents of the merged case in force and not yet in force on the survivor are
    given on the survivor too (new ids, the family's original dates)."""
    in_force = {
        ConsentTerms(ConsentScope(row.scope), row.traeger, row.purpose)
        for row in await ops.consent_rows(session, survivor.case_id)
        if row.state == ConsentState.GIVEN.value
    }
    for row in await ops.consent_rows(session, merged.case_id):
        terms = ConsentTerms(ConsentScope(row.scope), row.traeger, row.purpose)
        if row.state != ConsentState.GIVEN.value or terms in in_force:
            continue
        if terms.traeger is not None or terms.purpose is not None:
            try:  # a Träger consent must fit the survivor's Bezirk, as if given there
                domain.check_consent(terms, call.runtime.city, survivor.bezirk, "")
            except Refusal:
                continue
        in_force.add(terms)
        carried = IntakeConsent(
            consent_id=str(uuid.uuid4()),
            case_id=survivor.case_id,
            scope=row.scope,
            traeger=row.traeger,
            purpose=row.purpose,
            state=ConsentState.GIVEN.value,
            given_at=row.given_at,
        )
        session.add(carried)
        ops.consent_changed(session, call, survivor, carried, carried.given_at, role)
