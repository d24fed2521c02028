"""Who is calling, and what may they see: the one place where HTTP callers are resolved.

Routes never look at headers or tokens themselves. They take a `CallerDep` parameter; which
roles may call a route is their service's declared access policy (`lotse_runtime.policy`), and
before touching a case they ask `ensure_may_access_case`, so the rules of the architecture card
("Who uses it") live here and nowhere else:

* Familienbüro and Bezirksteam: cases of their own Stadtbezirk only.
* Träger: only cases with a referral addressed to them (which fields they get is the route's
  job, limited to what the family consented to).
* Babylotse: only families registered by their clinic.
* Analyst (Jugendhilfeplanung, dashboards): never a single case, only aggregates.
* DPO: audit and erasure status of a case, never its personal data.
* Service (another Lotse service): everything.

Denials are answered with 403 {"detail": "not permitted"} whether the case exists or not, and
routes treat an unknown case id the same way (pass `scope=None`), so probing ids reveals nothing.

Which roles may call a route at all is not decided here but in each service's declarative
access policy (`lotse_runtime.policy`), enforced by the runtime for every route. The per-case
check stays with the route, which has the case's data at hand; the runtime watches (through
`observe_access`) that a case-scoped route really made it before its answer leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from enum import StrEnum
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from lotse_contracts.events.common import Role as EventRole
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ACCESS_DENIED_DETAIL",
    "AccessDenied",
    "AccessObserver",
    "Caller",
    "CallerDep",
    "CallerResolver",
    "CaseScope",
    "NotAuthenticated",
    "Role",
    "current_access_observer",
    "current_caller",
    "ensure_may_access_case",
    "ensure_role",
    "install_identity",
    "may_access_case",
    "observe_access",
    "require_role",
    "scope_checked_earlier",
    "stop_observing",
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
    koordination = "koordination"
    """City-wide coordination of the prevention chain (e.g. in the Jugendhilfeplanung): keeps
    the offer catalogue city-wide; sees no case."""
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
    case_id: str | None = Field(
        default=None,
        description="The case, where the route knows it (its audit entry names it).",
    )
    traeger: frozenset[str] = Field(
        default_factory=frozenset,
        description="Träger that a referral of this case is addressed to.",
    )
    registered_by_clinic: str | None = None

    @field_validator("traeger", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return frozenset() if value is None else value


class AccessObserver(Protocol):
    """What the runtime's policy layer wants to hear about one request (see policy.py)."""

    def case_checked(self, scope: CaseScope | None) -> None:
        """The route passed `ensure_may_access_case` for `scope` (None: scope settled
        earlier, e.g. an idempotent replay of an answer the same caller got before)."""
        ...

    def recorded(self, case_id: str | None) -> None:
        """The route wrote its own audit entry for this access (in its transaction)."""
        ...


_access_observer: ContextVar[AccessObserver | None] = ContextVar(
    "lotse_access_observer", default=None
)


def observe_access(observer: AccessObserver | None) -> Token[AccessObserver | None]:
    """Make `observer` hear this request's case checks and audit entries (runtime only)."""
    return _access_observer.set(observer)


def stop_observing(token: Token[AccessObserver | None]) -> None:
    _access_observer.reset(token)


def current_access_observer() -> AccessObserver | None:
    return _access_observer.get()


def scope_checked_earlier() -> None:
    """Tell the policy layer that this request's case scope was checked by an earlier request
    (an idempotent replay repeats the answer the same caller got then, after the check)."""
    observer = _access_observer.get()
    if observer is not None:
        observer.case_checked(None)


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
    _check_case_access(caller, scope, personal_data=personal_data)
    observer = _access_observer.get()
    if observer is not None:
        observer.case_checked(scope)


def may_access_case(caller: Caller, scope: CaseScope, *, personal_data: bool) -> bool:
    """Whether `caller` may read the case described by `scope`, by the same rules as
    `ensure_may_access_case`, without raising and without counting as the route's scope
    check (for look-ups that must answer only with what the caller may see)."""
    try:
        _check_case_access(caller, scope, personal_data=personal_data)
    except AccessDenied:
        return False
    return True


def _check_case_access(caller: Caller, scope: CaseScope | None, *, personal_data: bool) -> None:
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
        case Role.koordination:
            raise AccessDenied("city-wide coordination sees no case")
    # Unreachable while every role is handled above; a new role is denied until it is added.
    raise AccessDenied(f"no case policy for role {caller.role}")


# -- the role events name ------------------------------------------------------------------------

_EVENT_ROLES: dict[Role, EventRole] = {
    Role.babylotse: EventRole.BABYLOTSE,
    Role.familienbuero: EventRole.FAMILIENBUERO,
    Role.bezirksteam: EventRole.BEZIRKSTEAM,
    Role.traeger: EventRole.TRAEGER,
}


def event_role(role: Role, *, service_acts_as: EventRole | None = None) -> EventRole:
    """The role an event names for a caller: events carry roles, never people.

    A Lotse service acts for the platform (``system``) unless the use case says whom it
    speaks for (``service_acts_as``: the citizens' office filing a move-in notice). Roles
    that never act on a family (analyst, dpo, koordination) appear as ``system`` too.
    """
    if role is Role.service and service_acts_as is not None:
        return service_acts_as
    return _EVENT_ROLES.get(role, EventRole.SYSTEM)
