"""Who may call which visits route, and how each call is audited (enforced by the runtime,
see ``lotse_runtime.policy``).

Familienbüro staff act on and read the visits of their own Stadtbezirk; the Bezirksteam
reads an office's calendar and cases; the Babylotse of the registering clinic and the
data-protection officer read a single case (without personal data); Träger and analysts get
nothing here. Whether a case is the caller's (Stadtbezirk, clinic) is the route's
``ensure_may_access_case``, which ``case_scoped`` makes the runtime verify. Reads are audited
for the office roles, the only ones that get staff ids and the sealed personal block.
No other service calls visits over HTTP (they follow its events), so ``service`` tokens get
nothing here."""

from __future__ import annotations

from lotse_runtime.identity import Role
from lotse_runtime.policy import Access, AccessPolicy, Rule, personal

PURPOSE = "welcome visit"

#: Roles that may act on visits (and see staff ids and the sealed personal block).
OFFICE_ROLES = (Role.familienbuero,)
#: Roles that may read an office's calendar and due list.
CALENDAR_ROLES = (Role.familienbuero, Role.bezirksteam)
#: Roles that may read a single case or visit.
CASE_READERS = (Role.babylotse, Role.familienbuero, Role.bezirksteam, Role.dpo)


def _read(roles: tuple[Role, ...], *, case_param: str | None) -> Rule:
    return personal(
        *roles,
        purpose=PURPOSE,
        access=Access.read,
        case_param=case_param,
        audit_roles=OFFICE_ROLES,
    )


def _act(case_param: str | None = None) -> Rule:
    return personal(*OFFICE_ROLES, purpose=PURPOSE, access=Access.change, case_param=case_param)


POLICY = AccessPolicy(
    {
        "GET /offices/{bezirk}/calendar": _read(CALENDAR_ROLES, case_param=None),
        "GET /offices/{bezirk}/due": _read(CALENDAR_ROLES, case_param=None),
        "GET /visits/{visit_id}": _read(CASE_READERS, case_param=None),
        "GET /cases/{case_id}": _read(CASE_READERS, case_param="case_id"),
        "POST /visits/{visit_id}/reschedule": _act(),
        "POST /visits/{visit_id}/no-show": _act(),
        "POST /visits/{visit_id}/decline": _act(),
        "POST /visits/{visit_id}/cancel": _act(),
        "POST /visits/{visit_id}/complete": _act(),
        "POST /cases/{case_id}/decline": _act("case_id"),
        "POST /cases/{case_id}/visits": _act("case_id"),
    }
)
