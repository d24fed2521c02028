"""Health routes: liveness never checks dependencies, readiness runs all checks with a timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import httpx
import pytest
from fastapi import FastAPI
from lotse_runtime.health import ReadinessCheck, health_router


def _app(checks: Mapping[str, ReadinessCheck], timeout_s: float = 2.0) -> FastAPI:
    app = FastAPI()
    app.include_router(health_router(checks, timeout_s=timeout_s))
    return app


async def _ok() -> None:
    return None


async def _broken() -> None:
    raise ConnectionRefusedError("connect to 127.0.0.1:5432 refused")


async def _hangs() -> None:
    await asyncio.Event().wait()


# httpx over ASGI rather than TestClient: Starlette deprecates TestClient on plain httpx.
async def _get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)


async def test_ready_and_alive() -> None:
    app = _app({"database": _ok, "broker": _ok})
    alive = await _get(app, "/healthz")
    ready = await _get(app, "/readyz")
    assert alive.status_code == 200
    assert alive.json() == {"status": "alive"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
    assert ready.headers["cache-control"] == "no-store"


async def test_liveness_does_not_run_checks() -> None:
    calls: list[str] = []

    async def counted() -> None:
        calls.append("database")
        raise RuntimeError("down")

    response = await _get(_app({"database": counted}), "/healthz")
    assert response.status_code == 200
    assert calls == []


async def test_failing_check_is_named() -> None:
    response = await _get(_app({"database": _broken, "broker": _ok}), "/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not ready",
        "checks": {
            "database": "ConnectionRefusedError: connect to 127.0.0.1:5432 refused",
            "broker": "ok",
        },
    }


async def test_long_error_message_is_truncated() -> None:
    async def verbose() -> None:
        raise RuntimeError("x" * 1000)

    response = await _get(_app({"database": verbose}), "/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "RuntimeError: " + "x" * 200


async def test_hanging_check_times_out_without_blocking_the_others() -> None:
    started = time.monotonic()
    response = await _get(
        _app({"broker": _hangs, "database": _ok, "cache": _broken}, timeout_s=0.2), "/readyz"
    )
    assert time.monotonic() - started < 2.0
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"] == "timeout"
    assert checks["database"] == "ok"
    assert checks["cache"].startswith("ConnectionRefusedError: ")


async def test_checks_run_concurrently() -> None:
    # Each check waits for the other: only concurrent execution can make both pass in time.
    first_started, second_started = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        first_started.set()
        await second_started.wait()

    async def second() -> None:
        second_started.set()
        await first_started.wait()

    response = await _get(_app({"first": first, "second": second}, timeout_s=1.0), "/readyz")
    assert response.status_code == 200


async def test_timeout_error_raised_by_a_check_is_not_our_timeout() -> None:
    async def driver_timeout() -> None:
        raise TimeoutError("connect timed out")

    response = await _get(_app({"database": driver_timeout}), "/readyz")
    assert response.json()["checks"]["database"] == "TimeoutError: connect timed out"


async def test_no_checks_means_ready() -> None:
    response = await _get(_app({}), "/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {}}


def test_routes_are_tagged_health_in_openapi() -> None:
    schema = _app({"database": _ok}).openapi()
    for path in ("/healthz", "/readyz"):
        assert schema["paths"][path]["get"]["tags"] == ["health"]
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        health_router({}, timeout_s=0)
