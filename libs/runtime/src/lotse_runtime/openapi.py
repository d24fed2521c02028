"""The error answers every service gives, as its OpenAPI document states them.

FastAPI documents a 422 in its own shape (``detail`` as a list) while the runtime answers
``{"detail": ..., "errors": [{"field", "reason"}]}``, and it does not know about the 401 and
403 of the identity hook and access policy, nor the 404 of a path naming nothing, nor the
413 and 422 of the input guard (inputs.py: body size, control characters in path or query). Clients
generated from the document, and schemathesis, must see what really comes back, so the
document is corrected here once for every service. A body that is not even decodable (FastAPI
answers a bare 400) is answered like every other invalid request: 422 naming the body.

The document also says how to authenticate: the bearer scheme (a JWT of the configured issuer,
``components.securitySchemes.bearerAuth``) and, on every operation that needs a caller,
``security: [{bearerAuth: []}]``. Public routes (health probes) carry none; a route a setting
may open (reporting's dashboard) lists the token as optional (``[{bearerAuth: []}, {}]``). So
Swagger UI shows its Authorize button and generated clients send the token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

#: FastAPI's answer to a body it could not decode (e.g. bytes that are not UTF-8).
_UNPARSEABLE_BODY = "There was an error parsing the body"

FIELD_ERROR = "FieldError"
PROBLEM = "Problem"
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

_SCHEMAS: dict[str, dict[str, Any]] = {
    FIELD_ERROR: {
        "title": FIELD_ERROR,
        "type": "object",
        "description": "One reason a request was refused, and the field it concerns.",
        "properties": {
            "field": {"type": "string", "description": "e.g. body.children.0.birth_date"},
            "reason": {"type": "string"},
        },
        "required": ["field", "reason"],
    },
    PROBLEM: {
        "title": PROBLEM,
        "type": "object",
        "description": "A refused request: a summary, and for invalid input each field and why.",
        "properties": {
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"$ref": f"#/components/schemas/{FIELD_ERROR}"}},
        },
        "required": ["detail"],
    },
    # FastAPI's name for the 422 body, kept so that every reference to it stays valid.
    "HTTPValidationError": {
        "title": "HTTPValidationError",
        "type": "object",
        "description": "Invalid input: each offending field and the reason.",
        "properties": {
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"$ref": f"#/components/schemas/{FIELD_ERROR}"}},
        },
        "required": ["detail", "errors"],
    },
}

BEARER = "bearerAuth"
_BEARER_SCHEME: dict[str, Any] = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": "JWT",
    "description": (
        "An OAuth2/OIDC access token (JWT) of the configured issuer (LOTSE_AUTH_ISSUER, keys "
        "from LOTSE_AUTH_JWKS, audience LOTSE_AUTH_AUDIENCE); its claims lotse_role and "
        "lotse_bezirk / lotse_traeger / lotse_clinic say who is calling."
    ),
}

_ANSWERS = {
    "401": "No valid bearer token.",
    "403": "The caller's role or scope does not allow this.",
    "404": "The path names nothing that exists (or nothing the caller may know of).",
    "413": "The request body is larger than the service takes (max_request_body_bytes, "
    "64 KiB by default); nothing was read or changed.",
    "422": "Invalid input: each offending field and the reason; nothing was changed.",
    "503": "The database is busy or unreachable; nothing was changed. Retry after Retry-After.",
}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{PROBLEM}"}}},
    }


def describe_errors(
    schema: dict[str, Any],
    *,
    is_public: Callable[[str, str], bool],
    may_be_open: Callable[[str, str], bool] | None = None,
) -> dict[str, Any]:
    """Add the platform's error answers and its bearer scheme to an OpenAPI document (in
    place; returned).

    ``is_public(method, path)`` tells the routes that need no caller (no 401/403 there, no
    ``security``); ``may_be_open`` those a setting can open (the token becomes optional)."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(_SCHEMAS)
    components.setdefault("securitySchemes", {})[BEARER] = _BEARER_SCHEME
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            wanted = []
            if not is_public(method.upper(), path):
                wanted += ["401", "403", "503"]
                operation["security"] = [{BEARER: []}]
                if may_be_open is not None and may_be_open(method.upper(), path):
                    operation["security"].append({})
            if "{" in path:
                wanted.append("404")
            if "requestBody" in operation:
                wanted.append("413")
            if "requestBody" in operation or operation.get("parameters"):
                wanted.append("422")  # control characters in the path or query (inputs.py)
            for status in wanted:
                responses.setdefault(status, _problem(_ANSWERS[status]))
    return schema


async def _unparseable_body(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _UNPARSEABLE_BODY:
        return JSONResponse(
            {
                "detail": "invalid request",
                "errors": [{"field": "body", "reason": "the body is not decodable JSON"}],
            },
            status_code=422,
        )
    return await http_exception_handler(request, exc)


def _public_by_policy(app: FastAPI) -> Callable[[str, str], bool]:
    def is_public(method: str, path: str) -> bool:
        policy = getattr(app.state, "access_policy", None)
        rule = policy.get(f"{method} {path}") if policy is not None else None
        return bool(rule is not None and rule.public)

    return is_public


def _open_when_by_policy(app: FastAPI) -> Callable[[str, str], bool]:
    def may_be_open(method: str, path: str) -> bool:
        policy = getattr(app.state, "access_policy", None)
        rule = policy.get(f"{method} {path}") if policy is not None else None
        return bool(rule is not None and rule.open_when is not None)

    return may_be_open


def document_errors(app: FastAPI, *, is_public: Callable[[str, str], bool] | None = None) -> None:
    """Make ``app.openapi()`` state the error answers; answer undecodable bodies with 422.

    Routes are public where the app's access policy says so, unless ``is_public`` says."""
    is_public = is_public or _public_by_policy(app)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_errors(
                generate(), is_public=is_public, may_be_open=_open_when_by_policy(app)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(StarletteHTTPException, _unparseable_body)
