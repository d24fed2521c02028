"""Who may call which reporting route (enforced by the runtime, see
``lotse_runtime.policy``). Reporting holds anonymised aggregates only, so every
authenticated person may read them and no call is a personal-data access; the dashboard needs
no login at all while the ``dashboard_public`` setting says so. No other service calls
reporting, so ``service`` tokens get nothing here."""

from __future__ import annotations

from fastapi import Request
from lotse_runtime.app import runtime_of
from lotse_runtime.policy import PERSON_ROLES, AccessPolicy, Rule, allow


def dashboard_is_public(request: Request) -> bool:
    public: bool = runtime_of(request).settings.dashboard_public
    return public


AGGREGATES = allow(*PERSON_ROLES)
DASHBOARD = Rule(roles=PERSON_ROLES, open_when=dashboard_is_public)

POLICY = AccessPolicy(
    {
        "GET /kpis": AGGREGATES,
        "GET /kpis/figures": AGGREGATES,
        "GET /kpis/bezirke": AGGREGATES,
        "GET /reports/annual/{year}.csv": AGGREGATES,
        "GET /reports/annual/{year}.html": AGGREGATES,
        "GET /dashboard": DASHBOARD,
        "GET /dashboard/dashboard.js": DASHBOARD,
        "GET /dashboard/data": DASHBOARD,
        "GET /dashboard/stream": DASHBOARD,
        "GET /dashboard/annual/{year}.csv": DASHBOARD,
        "GET /dashboard/annual/{year}.html": DASHBOARD,
    }
)
