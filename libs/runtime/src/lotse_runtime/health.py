"""Kubernetes probes: `/healthz` (the process answers) and `/readyz` (its dependencies answer).

Liveness deliberately checks nothing external: a database outage must take the pod out of the
Service (readiness), not make Kubernetes restart it in a loop (liveness).

Both routes need no authentication; the security setup excludes them by tag "health". The
readiness body names failing checks with their error class and a short message so ops can see
why a pod is not ready, so checks must not raise errors that carry credentials or personal data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

__all__ = [
    "HEALTH_TAG",
    "Liveness",
    "Readiness",
    "ReadinessCheck",
    "health_router",
    "run_checks",
]

ReadinessCheck = Callable[[], Awaitable[None]]
"""Returns when the dependency is usable, raises otherwise."""

HEALTH_TAG = "health"
OK = "ok"
TIMEOUT = "timeout"
MAX_MESSAGE_CHARS = 200

# Probes are polled by machines; a cached answer would hide a state change.
_NO_STORE = {"Cache-Control": "no-store"}

_log = logging.getLogger(__name__)


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]


async def run_checks(checks: Mapping[str, ReadinessCheck], timeout_s: float) -> dict[str, str]:
    """Run all checks concurrently; each gets `timeout_s`. Maps name to "ok" or the failure."""
    names = list(checks)
    results = await asyncio.gather(*(_run_one(checks[name], timeout_s) for name in names))
    return dict(zip(names, results, strict=True))


async def _run_one(check: ReadinessCheck, timeout_s: float) -> str:
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            await check()
    except TimeoutError as exc:
        # A check may raise TimeoutError itself (a driver's connect timeout); only our own
        # deadline is reported as the bare word "timeout".
        if deadline.expired():
            return TIMEOUT
        return _describe(exc)
    except Exception as exc:
        return _describe(exc)
    return OK


def _describe(exc: Exception) -> str:
    message = " ".join(str(exc).split())  # one line, so it reads well in JSON and in logs
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS]
    return f"{type(exc).__name__}: {message}"


def health_router(checks: Mapping[str, ReadinessCheck], timeout_s: float = 2.0) -> APIRouter:
    """Routes GET /healthz and GET /readyz; `checks` are typically "database" and "broker"."""
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    # Copied so a caller mutating its dict later does not change what readiness means.
    registered = dict(checks)
    router = APIRouter(tags=[HEALTH_TAG])

    @router.get("/healthz", response_model=Liveness, summary="Liveness probe")
    async def healthz() -> JSONResponse:
        return JSONResponse(Liveness().model_dump(), headers=_NO_STORE)

    @router.get(
        "/readyz",
        response_model=Readiness,
        summary="Readiness probe: all dependencies reachable",
        responses={503: {"model": Readiness, "description": "A dependency is not reachable"}},
    )
    async def readyz() -> JSONResponse:
        results = await run_checks(registered, timeout_s)
        failing = sorted(name for name, result in results.items() if result != OK)
        if failing:
            _log.warning("readiness check failed", extra={"failing_checks": failing})
            body = Readiness(status="not ready", checks=results)
            return JSONResponse(body.model_dump(), status_code=503, headers=_NO_STORE)
        body = Readiness(status="ready", checks=results)
        return JSONResponse(body.model_dump(), headers=_NO_STORE)

    return router
