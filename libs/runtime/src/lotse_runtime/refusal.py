"""One way for every service to say no: a refusal names the field (or state) at fault and
the reason, and carries the HTTP status it is answered with.

Domain rules raise :class:`Refusal` (422: a value that cannot be right) or :class:`Conflict`
(409: a value that clashes with what is stored); a dependency that did not answer raises
:class:`Unavailable` (503 with Retry-After: the same request may work later). The app factory
turns each into the one error shape of the platform, ``{"detail", "errors": [{"field",
"reason"}]}``, so no route writes an ``HTTPException`` of its own. A consumer that meets a
refusal dead-letters the event with the same reason (``EventRejected`` in consumer.py).

The reason goes back to the caller and into logs: it never repeats a personal value.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

#: Seconds a client is asked to wait before retrying after :class:`Unavailable`.
RETRY_AFTER_S = 2


class Refusal(Exception):
    """A request the rules refuse: ``field`` at fault, ``reason`` why, HTTP ``status``."""

    status = 422

    def __init__(self, field: str, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        if status is not None:
            self.status = status

    def body(self) -> dict[str, object]:
        return {"detail": self.reason, "errors": [{"field": self.field, "reason": self.reason}]}


class Conflict(Refusal):
    """Well-formed, but it clashes with the state of things (HTTP 409)."""

    status = 409


class Unavailable(Exception):
    """A dependency (another service, the keyring) did not answer usefully; try again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _refused(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refusal)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _unavailable(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Unavailable)
    return JSONResponse(
        {"detail": f"try again later: {exc.reason}"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def install_refusals(app: FastAPI) -> None:
    """Answer refusals and unavailable dependencies in the platform's one shape."""
    app.add_exception_handler(Refusal, _refused)
    app.add_exception_handler(Unavailable, _unavailable)
