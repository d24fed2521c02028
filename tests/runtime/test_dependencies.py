"""Every route and dependency of every service is a coroutine: FastAPI runs a plain ``def``
in its thread pool, a thread hand-off (two thread switches and a trip through the event loop)
per dependency and request. Intake's registration had three: 6 % of its CPU in
``bench/pipeline.py``."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from tests.runtime.test_openapi_security import SERVICES, build_app


def _runs_in_thread_pool(call: Any) -> bool:
    if inspect.isroutine(call):
        return not inspect.iscoroutinefunction(call)
    # A callable object (security schemes, require_role's checker): its __call__ decides.
    dunder = getattr(call, "__call__", None)  # noqa: B004 - the method itself is inspected
    return dunder is not None and not inspect.iscoroutinefunction(dunder)


def _calls(dependant: Dependant, path: str) -> Iterator[tuple[str, Any]]:
    if dependant.call is not None:
        yield path, dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub, f"{path} > {getattr(sub.call, '__name__', sub.call)}")


def _api_routes(
    routes: Sequence[BaseRoute], included: tuple[Any, ...] = ()
) -> Iterator[tuple[APIRoute, tuple[Any, ...]]]:
    """The app's API routes with the dependencies their routers were included with. FastAPI
    keeps an included router as a route of its own that holds the original router."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route, included
        elif (router := getattr(route, "original_router", None)) is not None:
            context = getattr(route, "include_context", None)
            added = tuple(depends.dependency for depends in getattr(context, "dependencies", ()))
            yield from _api_routes(router.routes, included + added)


@pytest.mark.parametrize("service", SERVICES)
def test_no_route_or_dependency_runs_in_the_thread_pool(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build_app(service, tmp_path, monkeypatch)
    routes = list(_api_routes(app.router.routes))
    assert len(routes) > 3  # the walk found the service's own routes, not only the probes
    threaded = [
        f"{sorted(route.methods or ())} {route.path}: {where}"
        for route, included in routes
        for where, call in [
            *_calls(route.dependant, route.name),
            *((f"{route.name} < {getattr(c, '__name__', c)}", c) for c in included),
        ]
        if _runs_in_thread_pool(call)
    ]
    assert threaded == []


def test_the_check_sees_a_plain_def() -> None:
    def plain() -> None: ...

    async def coroutine() -> None: ...

    assert _runs_in_thread_pool(plain)
    assert not _runs_in_thread_pool(coroutine)
