"""Idempotency-Key for intake's changing requests (IETF draft "The Idempotency-Key HTTP
Header Field").

A clinic on a flaky connection repeats a registration; with the same ``Idempotency-Key`` the
repeat gets the first answer again and creates nothing. The key is remembered per caller
(subject), together with a keyed fingerprint of method, path, body and the caller's role
and scope (clinic, Stadtbezirk, Träger: :func:`caller_scope`), so reusing a key for a
different request is refused (422) instead of answered with an unrelated result — and so is
the same request by the same subject acting in another role or scope (e.g. a token of
another clinic): the stored answer was given after the case checks of the first scope and
is never replayed into another. The key, the
state change and its events commit in one transaction; two racing requests with one key
cannot both commit (unique constraint), and the loser replays the winner's answer.

This is the HTTP side of a changing request: a route hands :func:`run_once` the use case
(an ``operations`` function bound to its arguments, taking the session) and gets the HTTP
answer back. The use case returns a plain :class:`~lotse_intake.operations.Outcome` and
knows nothing of keys, replays or responses.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from fastapi import Header
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response
from lotse_runtime.db import Database, add_at_commit
from lotse_runtime.identity import Caller, scope_checked_earlier
from lotse_runtime.refusal import Refusal
from pydantic import BaseModel
from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_intake.domain import fingerprint
from lotse_intake.operations import Call, Outcome
from lotse_intake.tables import ERASED_FINGERPRINT, IntakeIdempotency

REPLAY_HEADER = "Idempotent-Replayed"
_ATTEMPTS = 3

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description=(
            "Unique key of this request (e.g. a UUID). Repeating the request with the same key "
            "returns the first answer and changes nothing; the same key with another body is "
            "refused (422)."
        ),
    ),
]


JSON = "application/json"

#: Built once: every changing request asks it first, and building the expression cost more
#: than the lookup.
_STORED_ANSWER = select(IntakeIdempotency).where(
    col(IntakeIdempotency.subject) == bindparam("subject"),
    col(IntakeIdempotency.idempotency_key) == bindparam("key"),
)

#: A use case bound to its arguments: given the transaction's session, it does its work.
UseCase = Callable[[AsyncSession], Awaitable[Outcome]]


async def run_once(
    call: Call, key: str | None, body: BaseModel | None, use_case: UseCase
) -> Response:
    """Run a changing request's ``use_case`` in one transaction under its Idempotency-Key.
    A replay repeats the answer this same caller got when the case checks passed, so the
    runtime's policy layer counts them as made."""
    response = await respond(
        call.runtime.db,
        caller=call.caller,
        key=key,
        request_print=request_fingerprint(
            call.intake.secrets.match_key_secret, "POST", call.path, body, caller=call.caller
        ),
        now=call.runtime.clock,
        use_case=use_case,
    )
    if response.headers.get(REPLAY_HEADER):
        scope_checked_earlier()
    return response


def caller_scope(caller: Caller) -> str:
    """The role and scope a stored answer belongs to (with the subject it is stored under)."""
    return "|".join(
        (caller.role.value, caller.bezirk or "", caller.traeger or "", caller.clinic or "")
    )


def request_fingerprint(
    secret: bytes, method: str, path: str, body: BaseModel | None, *, caller: Caller
) -> str:
    """Keyed fingerprint of the request and of the role and scope it was made in."""
    canonical = (
        ""
        if body is None
        else json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    )
    return fingerprint(secret, method.upper(), path, canonical, caller_scope(caller))


async def respond(
    db: Database,
    *,
    caller: Caller,
    key: str | None,
    request_print: str,
    now: Callable[[], datetime],
    use_case: UseCase,
) -> Response:
    """Run ``use_case`` in one transaction, honouring ``key`` (see module docstring)."""
    for attempt in range(_ATTEMPTS):
        try:
            async with db.transaction() as session:
                if key is not None:
                    stored = (
                        await session.execute(
                            _STORED_ANSWER, {"subject": caller.subject, "key": key}
                        )
                    ).scalar_one_or_none()
                    if stored is not None:
                        return _replay(stored, request_print)
                outcome = await use_case(session)
                # Encoded once: the answer sent now and the one a repeat gets are the same bytes.
                answer = json.dumps(
                    jsonable_encoder(outcome.body), ensure_ascii=False, separators=(",", ":")
                )
                if key is not None:
                    add_at_commit(
                        session,
                        IntakeIdempotency.model_construct(
                            subject=caller.subject,
                            idempotency_key=key,
                            fingerprint=request_print,
                            status_code=outcome.status_code,
                            response=answer,
                            case_id=outcome.case_id,
                            created_at=now(),
                        ),
                    )
            return Response(answer, status_code=outcome.status_code, media_type=JSON)
        except IntegrityError:
            # A concurrent request won a unique key (same Idempotency-Key, or the same family
            # registered at the same moment); on the next attempt we see its result.
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _replay(stored: IntakeIdempotency, request_print: str) -> Response:
    if stored.fingerprint == ERASED_FINGERPRINT:
        raise Refusal(
            "Idempotency-Key",
            "this request concerned a family whose data has since been erased",
            status=410,
        )
    if stored.fingerprint != request_print:
        raise Refusal(
            "Idempotency-Key",
            "this Idempotency-Key was already used for a different request (or by you "
            "in another role or scope); send a new key with a new request",
        )
    return Response(
        content=stored.response,
        status_code=stored.status_code,
        media_type=JSON,
        headers={REPLAY_HEADER: "true"},
    )


async def forget_expired(session: AsyncSession, before: datetime) -> int:
    """Drop keys older than ``before``; a later repeat counts as a new request."""
    result = await session.execute(
        delete(IntakeIdempotency).where(col(IntakeIdempotency.created_at) < before)
    )
    return int(getattr(result, "rowcount", 0) or 0)
