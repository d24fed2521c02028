"""Intake keeps the one shape of a Lotse service: routes at module level calling use cases,
use cases and rules that know nothing of HTTP, no function too long to read alone."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import lotse_intake
from fastapi.routing import APIRoute
from lotse_intake import api

PACKAGE = Path(lotse_intake.__file__).parent
#: Modules of use cases and rules: no HTTP (status codes only through Refusal / Conflict).
NO_HTTP = ("domain.py", "operations.py", "erasure.py", "duplicates.py", "releases.py")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_use_cases_and_rules_know_nothing_of_http() -> None:
    for name in NO_HTTP:
        http = {m for m in _imports(PACKAGE / name) if m.split(".")[0] in ("fastapi", "starlette")}
        assert not http, f"{name} imports {sorted(http)}"


def test_every_route_is_a_module_level_function_of_api() -> None:
    routes = [r for r in api.router.routes if isinstance(r, APIRoute)]
    assert len(routes) == 18
    for route in routes:
        endpoint = route.endpoint
        assert getattr(api, endpoint.__name__) is endpoint, route.path
        assert "<locals>" not in endpoint.__qualname__, route.path


def test_route_functions_are_short() -> None:
    for route in api.router.routes:
        assert isinstance(route, APIRoute)
        source = inspect.getsource(route.endpoint)
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.AsyncFunctionDef)
        docstring = ast.get_docstring(body) is not None
        statements = body.body[1:] if docstring else body.body
        assert len(statements) <= 3, f"{route.path}: the work belongs in a use case"


def test_no_function_over_60_lines() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.lineno} {node.name} has {length} lines"
