"""Who is calling, and what may they see: the one place where HTTP callers are resolved.

Routes never look at headers or tokens themselves. They take a `CallerDep` parameter and ask
the policy helpers (`ensure_role`, `ensure_may_access_case`) before touching data, so the rules
of the architecture card ("Who uses it") live here and nowhere else:

* Familienbüro and Bezirksteam: cases of their own Stadtbezirk only.
* Träger: only cases with a referral addressed to them (which fields they get is the route's
  job, limited to what the family consented to).
* Babylotse: only families registered by their clinic.
* Analyst (Jugendhilfeplanung, dashboards): never a single case, only aggregates.
* DPO: audit and erasure status of a case, never its personal data.
* Service (another Lotse service): everything.

Denials are answered with 403 {"detail": "not permitted"} whether the case exists or not, and
routes treat an unknown case id the same way (pass `scope=None`), so probing ids reveals nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ACCESS_DENIED_DETAIL",
    "AccessDenied",
    "Caller",
    "CallerDep",
    "CallerResolver",
    "CaseScope",
    "DevelopmentCallerResolver",
    "NotAuthenticated",
    "Role",
    "current_caller",
    "ensure_may_access_case",
    "ensure_role",
    "install_identity",
    "require_role",
]

ACCESS_DENIED_DETAIL = "not permitted"
DEFAULT_CHALLENGE = 'Bearer realm="lotse"'

# Slugs end up in topic names (lotse.bezirk.<slug>) and ACLs, hence the narrow alphabet.
_SLUG_PATTERN = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
_SLUG_MAX = 64

_log = logging.getLogger(__name__)


class Role(StrEnum):
    babylotse = "babylotse"
    familienbuero = "familienbuero"
    bezirksteam = "bezirksteam"
    traeger = "traeger"
    analyst = "analyst"
    dpo = "dpo"
    """Data-protection officer: may read audit trails, not case contents."""
    service = "service"
    """Another Lotse service calling with its own identity."""


_NEEDS_BEZIRK = frozenset({Role.familienbuero, Role.bezirksteam})


class Caller(BaseModel):
    """The authenticated caller of one request. Carries no personal data, only ids and scope."""

    model_config = ConfigDict(frozen=True)

    subject: str = Field(min_length=1, max_length=200, description="Pseudonymous user id.")
    role: Role
    bezirk: str | None = Field(
        default=None, pattern=_SLUG_PATTERN, max_length=_SLUG_MAX, description="Stadtbezirk slug."
    )
    traeger: str | None = Field(
        default=None, pattern=_SLUG_PATTERN, max_length=_SLUG_MAX, description="Träger slug."
    )
    clinic: str | None = Field(
        default=None, pattern=_SLUG_PATTERN, max_length=_SLUG_MAX, description="Clinic slug."
    )

    @model_validator(mode="after")
    def _scope_matches_role(self) -> Caller:
        if self.role in _NEEDS_BEZIRK and self.bezirk is None:
            raise ValueError(f"role {self.role} requires bezirk")
        if self.role is Role.traeger and self.traeger is None:
            raise ValueError("role traeger requires traeger")
        if self.role is Role.babylotse and self.clinic is None:
            raise ValueError("role babylotse requires clinic")
        return self


class NotAuthenticated(Exception):
    """The caller could not be identified; answered with 401 and `reason` as detail.

    `reason` goes to the client, so it must not echo header or token contents.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AccessDenied(Exception):
    """The caller may not do this; answered with a generic 403.

    `reason` is for logs only (never sent to the client) and must contain no personal data.
    """

    def __init__(self, reason: str = "denied") -> None:
        super().__init__(reason)
        self.reason = reason


class CallerResolver(Protocol):
    async def resolve(self, request: Request) -> Caller:
        """Identify the caller of `request` or raise `NotAuthenticated`."""
        ...


class DevelopmentCallerResolver:
    """DEVELOPMENT ONLY: trusts plain request headers to say who the caller is.

    Headers: X-Lotse-Role, X-Lotse-Subject, and X-Lotse-Bezirk / X-Lotse-Traeger / X-Lotse-Clinic
    as the role requires. Anyone can set these, so this must never face a real network; it is
    replaced by JWT verification behind the same `CallerResolver` protocol.
    """

    ROLE = "X-Lotse-Role"
    SUBJECT = "X-Lotse-Subject"
    BEZIRK = "X-Lotse-Bezirk"
    TRAEGER = "X-Lotse-Traeger"
    CLINIC = "X-Lotse-Clinic"

    def __init__(self) -> None:
        _log.warning("development caller resolver in use: callers are trusted by header")

    async def resolve(self, request: Request) -> Caller:
        headers = request.headers
        role_value = headers.get(self.ROLE, "").strip()
        if not role_value:
            raise NotAuthenticated(f"missing {self.ROLE} header")
        try:
            role = Role(role_value)
        except ValueError:
            # The value is not echoed: reasons go back to the client and into logs.
            raise NotAuthenticated(f"{self.ROLE} is not a known role") from None
        field_headers = {
            "subject": self.SUBJECT,
            "bezirk": self.BEZIRK,
            "traeger": self.TRAEGER,
            "clinic": self.CLINIC,
        }
        values = {
            field: headers.get(header, "").strip() or None
            for field, header in field_headers.items()
        }
        if values["subject"] is None:
            raise NotAuthenticated(f"missing {self.SUBJECT} header")
        required = _REQUIRED_SCOPE.get(role)
        if required is not None and values[required] is None:
            raise NotAuthenticated(f"role {role} requires the {field_headers[required]} header")
        try:
            return Caller.model_validate({"role": role, **values})
        except ValidationError as exc:
            fields = sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]})
            names = ", ".join(field_headers.get(field, field) for field in fields)
            raise NotAuthenticated(f"invalid {names or 'identity'} header") from None


_REQUIRED_SCOPE: dict[Role, str] = {
    Role.familienbuero: "bezirk",
    Role.bezirksteam: "bezirk",
    Role.traeger: "traeger",
    Role.babylotse: "clinic",
}


# -- FastAPI integration -------------------------------------------------------------------------


def install_identity(
    app: FastAPI, resolver: CallerResolver, *, challenge: str = DEFAULT_CHALLENGE
) -> None:
    """Make `resolver` answer `current_caller` and map identity errors to 401/403."""
    app.state.caller_resolver = resolver

    async def not_authenticated(request: Request, exc: Exception) -> Response:
        reason = exc.reason if isinstance(exc, NotAuthenticated) else "not authenticated"
        return JSONResponse(
            {"detail": reason}, status_code=401, headers={"WWW-Authenticate": challenge}
        )

    async def access_denied(request: Request, exc: Exception) -> Response:
        caller = getattr(request.state, "caller", None)
        _log.info(
            "access denied",
            extra={
                "caller_subject": caller.subject if isinstance(caller, Caller) else None,
                "caller_role": str(caller.role) if isinstance(caller, Caller) else None,
                "reason": exc.reason if isinstance(exc, AccessDenied) else "denied",
                "path": request.url.path,
            },
        )
        # Identical for "exists but not yours" and "does not exist" (see module docstring).
        return JSONResponse({"detail": ACCESS_DENIED_DETAIL}, status_code=403)

    app.add_exception_handler(NotAuthenticated, not_authenticated)
    app.add_exception_handler(AccessDenied, access_denied)


async def current_caller(request: Request) -> Caller:
    """FastAPI dependency: the caller of this request (resolved once, kept on request.state)."""
    cached = getattr(request.state, "caller", None)
    if isinstance(cached, Caller):
        return cached
    resolver: CallerResolver | None = getattr(request.app.state, "caller_resolver", None)
    if resolver is None:
        # A wiring bug, not the client's fault: fail loudly rather than answer 401.
        raise RuntimeError("install_identity(app, resolver) was not called")
    caller = await resolver.resolve(request)
    request.state.caller = caller
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


# -- access policy --------------------------------------------------------------------------------


class CaseScope(BaseModel):
    """What the policy needs to know about one case; built by the route from its own tables."""

    model_config = ConfigDict(frozen=True)

    bezirk: str
    traeger: frozenset[str] = Field(
        default_factory=frozenset,
        description="Träger that a referral of this case is addressed to.",
    )
    registered_by_clinic: str | None = None

    @field_validator("traeger", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return frozenset() if value is None else value


def ensure_role(caller: Caller, *roles: Role) -> None:
    """Raise AccessDenied unless the caller has one of `roles`."""
    if caller.role not in roles:
        raise AccessDenied(f"role {caller.role} not in {sorted(str(role) for role in roles)}")


def require_role(*roles: Role) -> Callable[[Caller], Awaitable[Caller]]:
    """Dependency for a route or router: `dependencies=[Depends(require_role(Role.analyst))]`."""

    async def dependency(caller: CallerDep) -> Caller:
        ensure_role(caller, *roles)
        return caller

    return dependency


def ensure_may_access_case(caller: Caller, scope: CaseScope | None, *, personal_data: bool) -> None:
    """Raise AccessDenied unless `caller` may read the case described by `scope`.

    `scope=None` means the case does not exist; it is denied like a foreign case so that the
    answer does not tell whether a case id is in use. `personal_data` says whether the route
    returns anything personal (names, address, screening) or only ids and statuses (audit).
    """
    if scope is None:
        raise AccessDenied("unknown case")
    match caller.role:
        case Role.service:
            return
        case Role.familienbuero | Role.bezirksteam:
            if caller.bezirk is not None and caller.bezirk == scope.bezirk:
                return
            raise AccessDenied("case of another bezirk")
        case Role.traeger:
            if caller.traeger is not None and caller.traeger in scope.traeger:
                return
            raise AccessDenied("no referral addressed to this traeger")
        case Role.babylotse:
            if caller.clinic is not None and caller.clinic == scope.registered_by_clinic:
                return
            raise AccessDenied("case registered by another clinic")
        case Role.dpo:
            if not personal_data:
                return
            raise AccessDenied("dpo may not read personal data")
        case Role.analyst:
            raise AccessDenied("analysts see aggregates only")
    # Unreachable while every role is handled above; a new role is denied until it is added.
    raise AccessDenied(f"no case policy for role {caller.role}")
