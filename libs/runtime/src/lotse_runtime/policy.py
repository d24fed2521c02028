"""Who may call which route, and which calls are audited: one declarative table per service,
enforced by the runtime for every route of the app, so no route can forget it.

A service declares an :class:`AccessPolicy`, usually in its ``policy.py``: for every route,
keyed ``"METHOD /path/{template}"``, a :class:`Rule` naming the roles that may call it and,
for routes touching personal data, the audit purpose and whether the route reads or changes
it. :func:`install_policy` (called by ``create_service_app``) enforces it:

* **Fail closed at start.** When the app is built and again when it starts, every route must
  have a rule and every rule a route; otherwise :class:`PolicyError` names the routes. Only
  the runtime's health probes and FastAPI's documentation (``/openapi.json``, ``/docs``,
  ``/redoc``) are public, and they are so explicitly (:data:`RUNTIME_POLICY`, ``docs_paths``).
* **Roles, in one place.** An app-wide dependency runs before the route's own parameters are
  read: it resolves the caller (401 without a valid token) and refuses a role the rule does not
  name with the platform's one 403 answer, audited as :data:`REFUSED_BY_POLICY`.
* **Services by name.** A token with role ``service`` is another system calling with its own
  identity, and its subject names it (``referrals``, ``buergerbuero``). A rule that admits
  :attr:`Role.service` names the services it admits (``services=("referrals",)``); any other
  service subject gets the same 403. A rule admitting ``Role.service`` without naming one
  (or naming services without admitting the role) is a :class:`PolicyError` when the policy
  is built, so it fails start-up like a route without a rule. :data:`PERSON_ROLES` is every
  role but ``service``, for routes open to every person.
* **Case scope stays with the route, verified centrally.** Whether a caller may see *this*
  case (own Stadtbezirk, referrals addressed to its Träger, families of its clinic) depends on
  the case's data, which the route loads anyway, often by a visit or referral id and under a
  lock in its own transaction. A central scope loader would load it a second time outside
  that transaction (a race) and need one loader per kind of id, so routes keep calling
  ``ensure_may_access_case``. A rule with ``case_scoped=True`` makes the runtime check that
  they did: a successful answer of such a route that never passed the check is replaced by
  a 500 before it leaves. A forgotten check is a bug the access-matrix test finds, never a
  leak. (An idempotent replay of an answer the same caller already got counts as checked:
  ``identity.scope_checked_earlier``.)
* **Audit of every personal-data access.** For each successful (status < 400) call of a rule
  with a ``purpose``, the audit log gets one entry: caller subject and role, time, case id (the
  path parameter ``case_param``, else the case the route's scope check named), purpose, read
  or change, route template — ids only, never values. A route that records its own entry
  inside its transaction (``audit.record``, e.g. with a finer action such as ``key_release``)
  has thereby audited the call, and the runtime adds none. Otherwise the runtime writes the
  entry in its own transaction right after the route succeeded and *before* the answer is
  sent, so no personal data leaves unaudited; if the entry cannot be written the client gets
  503 instead of the data (for a change, the change itself has committed by then).
* Refusals (401/403) are audited by the app factory (``app._audit_refusals``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lotse_runtime import audit
from lotse_runtime.identity import (
    AccessDenied,
    Caller,
    CaseScope,
    Role,
    current_access_observer,
    current_caller,
    observe_access,
    stop_observing,
)
from lotse_runtime.ports import RequestRuntime

__all__ = [
    "ALL_ROLES",
    "PERSON_ROLES",
    "REFUSED_BY_POLICY",
    "RUNTIME_POLICY",
    "Access",
    "AccessPolicy",
    "PolicyError",
    "RouteNotPermitted",
    "Rule",
    "allow",
    "check_policy",
    "docs_paths",
    "install_policy",
    "personal",
    "policy_gate",
    "public",
    "route_keys",
]

_log = logging.getLogger(__name__)

ALL_ROLES: frozenset[Role] = frozenset(Role)
#: Every role of a person (or a person's organisation): all but ``service``.
PERSON_ROLES: frozenset[Role] = ALL_ROLES - {Role.service}
#: Audit purpose of a refusal by the route policy (a role the route's rule does not name).
REFUSED_BY_POLICY = "refused by route policy"

_KEY = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) (/\S*)$")


class Access(StrEnum):
    """What a personal-data route does with the data (the audit entry's action)."""

    read = "read"
    change = "change"


@dataclass(frozen=True)
class Rule:
    """Who may call one route, and how a call is audited."""

    roles: frozenset[Role] = frozenset()
    purpose: str | None = None
    """Audit purpose; set exactly for routes touching personal data."""
    access: Access | None = None
    case_scoped: bool = False
    """The route must pass ``ensure_may_access_case`` before it answers successfully."""
    case_param: str | None = None
    """Path parameter holding the case id (for the audit entry)."""
    audit_roles: frozenset[Role] | None = None
    """Roles whose calls are audited, where only they get personal data from the route
    (None: every role's)."""
    public: bool = False
    """No caller needed (health probes); only the runtime declares these."""
    open_when: Callable[[Request], bool] | None = field(default=None, compare=False)
    """No caller needed while this says so (e.g. a dashboard a setting makes public)."""
    services: frozenset[str] = frozenset()
    """Subjects of the ``service`` tokens admitted; required exactly when ``roles`` has
    :attr:`Role.service` (checked by :class:`AccessPolicy`, so that start-up fails)."""

    def __post_init__(self) -> None:
        if (self.purpose is None) != (self.access is None):
            raise ValueError("a personal-data rule needs both purpose and access")
        if not self.public and not self.roles:
            raise ValueError("a rule names at least one role (or is public)")

    def problem(self) -> str | None:
        """Why this rule may not be used, or None."""
        if Role.service in self.roles and not self.services:
            return "admits role service without naming the services (services=...)"
        if self.services and Role.service not in self.roles:
            return "names services but does not admit role service"
        return None

    @property
    def personal(self) -> bool:
        return self.purpose is not None

    def audits(self, role: Role | None) -> bool:
        """Whether a successful call by `role` is a personal-data access to audit."""
        if not self.personal:
            return False
        return self.audit_roles is None or role in self.audit_roles

    def permits(self, role: Role | None, subject: str | None = None) -> bool:
        """Whether the role gate lets `role` (None: no caller) through; a ``service`` caller
        only with a `subject` the rule names."""
        if self.public:
            return True
        if role is None or role not in self.roles:
            return False
        return role is not Role.service or subject in self.services

    def admits(self, caller: Caller) -> bool:
        """Whether the role gate lets `caller` through."""
        return self.permits(caller.role, caller.subject)


def allow(*roles: Role, case_scoped: bool = False, services: Iterable[str] = ()) -> Rule:
    """A route without personal data, callable by `roles` (of services: by `services`)."""
    return Rule(roles=frozenset(roles), case_scoped=case_scoped, services=frozenset(services))


def personal(
    *roles: Role,
    purpose: str,
    access: Access,
    case_scoped: bool = True,
    case_param: str | None = "case_id",
    audit_roles: Iterable[Role] | None = None,
    services: Iterable[str] = (),
) -> Rule:
    """A route reading or changing personal data: audited with `purpose` on every success
    (of the `audit_roles` only, where only they get personal data from it). Of the
    ``service`` callers only `services` (their token subjects) are admitted."""
    return Rule(
        roles=frozenset(roles),
        purpose=purpose,
        access=access,
        case_scoped=case_scoped,
        case_param=case_param,
        audit_roles=None if audit_roles is None else frozenset(audit_roles),
        services=frozenset(services),
    )


def public() -> Rule:
    return Rule(public=True)


class PolicyError(RuntimeError):
    """The app's routes and its access policy do not match (raised at build and start)."""


class AccessPolicy:
    """Rules keyed ``"METHOD /path/{template}"``, one per route of the app."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        for key in rules:
            if not _KEY.match(key):
                raise PolicyError(f"policy key {key!r} is not 'METHOD /path'")
        _check_rules(rules)
        self.rules: dict[str, Rule] = dict(rules)

    def __or__(self, other: AccessPolicy) -> AccessPolicy:
        clash = sorted(set(self.rules) & set(other.rules))
        if clash:
            raise PolicyError(f"routes with two rules: {', '.join(clash)}")
        return AccessPolicy({**self.rules, **other.rules})

    def get(self, key: str) -> Rule | None:
        return self.rules.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rules)


def _check_rules(rules: Mapping[str, Rule]) -> None:
    problems = [f"{key} {problem}" for key, rule in rules.items() if (problem := rule.problem())]
    if problems:
        raise PolicyError("; ".join(sorted(problems)))


#: The routes every service app gets from the runtime.
RUNTIME_POLICY = AccessPolicy(
    {
        "GET /healthz": public(),
        "GET /readyz": public(),
        "GET /audit": allow(Role.dpo),
    }
)


class RouteNotPermitted(AccessDenied):
    """The caller's role is not in the route's rule (answered like every other 403)."""


# -- enforcement ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bound:
    key: str
    path: str
    rule: Rule


def docs_paths(app: FastAPI) -> set[str]:
    """FastAPI's own documentation routes, public by design (no data behind them)."""
    paths = {app.openapi_url, app.docs_url, app.redoc_url}
    paths.add(getattr(app.state, "docs_assets_url", None))  # lotse_runtime.docs: their assets
    paths.update(getattr(app.state, "contract_docs_paths", ()))  # lotse_runtime.contract_docs
    if app.docs_url:
        paths.add(app.swagger_ui_oauth2_redirect_url)
    return {path for path in paths if path}


def route_keys(app: FastAPI) -> list[tuple[str, APIRoute]]:
    """Every API route of `app` as (``"METHOD /path"``, route), included routers flattened."""
    keys = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            for method in sorted(route.methods or ()):
                keys.append((f"{method} {context.path}", route))
    return keys


def _bind(app: FastAPI, policy: AccessPolicy) -> dict[tuple[int, str], _Bound]:
    """Match every route of `app` to its rule, or raise PolicyError naming the mismatches."""
    _check_rules(policy.rules)  # again: the rules dict may have been changed since
    bound: dict[tuple[int, str], _Bound] = {}
    missing: list[str] = []
    seen: set[str] = set()
    public_docs = docs_paths(app)
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        path = context.path or "?"
        if not isinstance(route, APIRoute):
            if path not in public_docs:
                methods = ",".join(sorted(context.methods or ())) or "ANY"
                missing.append(f"{methods} {path}")
            continue
        for method in sorted(route.methods or ()):
            key = f"{method} {path}"
            rule = policy.get(key)
            if rule is None:
                missing.append(key)
                continue
            if (id(route), method) in bound:
                # One route object included twice under different paths: the request only
                # tells us the route object, so the two could not be told apart.
                raise PolicyError(f"route {key} is included twice; give each its own route")
            seen.add(key)
            bound[(id(route), method)] = _Bound(key=key, path=path, rule=rule)
    stale = sorted(set(policy) - seen)
    problems = []
    if missing:
        problems.append("routes without an access-policy rule: " + ", ".join(sorted(missing)))
    if stale:
        problems.append("access-policy rules without a route: " + ", ".join(stale))
    if problems:
        raise PolicyError("; ".join(problems))
    return bound


@dataclass
class _RequestAccess:
    """What the policy layer learns about one request while the route runs."""

    bound: _Bound | None = None
    caller: Caller | None = None
    case_id: str | None = None
    scope_checked: bool = False
    audited: bool = False

    def case_checked(self, scope: CaseScope | None) -> None:
        self.scope_checked = True
        if self.case_id is None and scope is not None:
            self.case_id = scope.case_id

    def recorded(self, case_id: str | None) -> None:
        self.audited = True


async def policy_gate(request: Request) -> None:
    """App-wide dependency (``FastAPI(dependencies=[Depends(policy_gate)])``): the role gate
    of the route's rule, before the route's own parameters are read."""
    bound_rules: dict[tuple[int, str], _Bound] = request.app.state.access_rules
    bound = bound_rules.get((id(request.scope.get("route")), request.method))
    if bound is None:
        # A route added after the app started: no rule, no access.
        raise AccessDenied("route without access-policy rule")
    rule = bound.rule
    if rule.public or (rule.open_when is not None and rule.open_when(request)):
        return
    caller = await current_caller(request)
    if caller.role not in rule.roles:
        raise RouteNotPermitted(f"role {caller.role} not permitted on {bound.key}")
    if not rule.admits(caller):
        raise RouteNotPermitted(f"service {caller.subject!r} not permitted on {bound.key}")
    access = current_access_observer()
    if isinstance(access, _RequestAccess):
        access.bound = bound
        access.caller = caller
        if rule.case_param is not None:
            value = request.path_params.get(rule.case_param)
            access.case_id = str(value) if value is not None else None


class _PolicyMiddleware:
    """Around each request: collects what the route did, and settles scope check and audit
    when a successful answer is about to leave."""

    def __init__(self, app: ASGIApp, runtime: RequestRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        access = _RequestAccess()
        replaced = False

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the route's own answer was withheld
            if (
                message["type"] == "http.response.start"
                and access.bound is not None
                and message["status"] < 400
            ):
                refusal = await self._settle(access)
                if refusal is not None:
                    replaced = True
                    await refusal(scope, receive, send)
                    return
            await send(message)

        token = observe_access(access)
        try:
            await self.app(scope, receive, guarded_send)
        finally:
            stop_observing(token)

    async def _settle(self, access: _RequestAccess) -> JSONResponse | None:
        bound = access.bound
        assert bound is not None
        rule = bound.rule
        if rule.case_scoped and not access.scope_checked:
            _log.error(
                "case-scoped route answered without a scope check", extra={"route": bound.key}
            )
            return JSONResponse({"detail": "internal error"}, status_code=500)
        caller_role = access.caller.role if access.caller is not None else None
        if rule.audits(caller_role) and not access.audited:
            try:
                async with self.runtime.db.transaction() as session:
                    audit.record(
                        session,
                        service=self.runtime.service,
                        caller=access.caller,
                        action=(
                            audit.AuditAction.change
                            if rule.access is Access.change
                            else audit.AuditAction.read
                        ),
                        case_id=access.case_id,
                        purpose=rule.purpose or "",
                        path=bound.path,
                    )
            except Exception:
                _log.exception("could not audit a personal-data access; answer withheld")
                return JSONResponse({"detail": "audit log unavailable"}, status_code=503)
        return None


def check_policy(app: FastAPI) -> None:
    """Bind the app's routes to its policy again (at start: routes added after the build)."""
    app.state.access_rules = _bind(app, app.state.access_policy)


def install_policy(app: FastAPI, runtime: RequestRuntime, policy: AccessPolicy) -> None:
    """Enforce `policy` (plus the runtime's own routes) on every route of `app`.

    Call after all routers are included; the app must have been created with
    ``dependencies=[Depends(policy_gate)]`` so that the gate runs for every route.
    """
    app.state.access_policy = policy | RUNTIME_POLICY
    check_policy(app)
    app.add_middleware(_PolicyMiddleware, runtime=runtime)
