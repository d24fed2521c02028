"""Who may call which intake route, and how each call is audited (enforced by the runtime,
see ``lotse_runtime.policy``). The per-case check (own clinic, own Stadtbezirk) is the
route's ``call.authorise`` / ``ensure_may_access_case``; ``case_scoped`` makes the runtime
verify it ran."""

from __future__ import annotations

from lotse_runtime.identity import Role
from lotse_runtime.policy import Access, AccessPolicy, personal

from lotse_intake.domain import CHANNEL_ROLES
from lotse_intake.duplicates import DECIDE
from lotse_intake.operations import (
    CHANGE_CONSENT,
    ERASE,
    HAND_OVER,
    READ_CASE,
    READ_CONSENT,
    SCREEN,
)

#: Anyone who may register through some channel; the route narrows it to the channel's roles.
REGISTER = tuple(sorted({role for roles in CHANNEL_ROLES.values() for role in roles}))

POLICY = AccessPolicy(
    {
        "POST /cases": personal(*REGISTER, purpose="register family", access=Access.change),
        "GET /cases/{case_id}": personal(*READ_CASE, purpose="read case", access=Access.read),
        "GET /cases/{case_id}/consents": personal(
            *READ_CONSENT, purpose="read consents", access=Access.read
        ),
        "POST /cases/{case_id}/consents": personal(
            *CHANGE_CONSENT, purpose="consent given", access=Access.change
        ),
        "POST /cases/{case_id}/consents/{consent_id}/withdraw": personal(
            *CHANGE_CONSENT, purpose="consent withdrawn", access=Access.change
        ),
        "POST /cases/{case_id}/screenings": personal(
            *SCREEN, purpose="screening", access=Access.change
        ),
        "GET /cases/{case_id}/screenings": personal(
            *SCREEN, purpose="read screening", access=Access.read
        ),
        "POST /cases/{case_id}/handovers": personal(
            *HAND_OVER, purpose="warm handover", access=Access.change
        ),
        "POST /cases/{case_id}/erasure": personal(*ERASE, purpose="erasure", access=Access.change),
        "GET /cases/{case_id}/erasure": personal(
            *ERASE, purpose="erasure status", access=Access.read
        ),
        # Possible duplicates: the Familienbüro of the existing case's Stadtbezirk (the route
        # checks the Bezirk of the flag); ids only, every access audited by the route.
        "GET /bezirke/{bezirk}/possible-duplicates": personal(
            *DECIDE, purpose="read possible duplicates", access=Access.read, case_param=None
        ),
        "POST /possible-duplicates/{duplicate_id}/merge": personal(
            *DECIDE, purpose="merge cases", access=Access.change, case_param=None
        ),
        "POST /possible-duplicates/{duplicate_id}/dismiss": personal(
            *DECIDE, purpose="dismiss possible duplicate", access=Access.change, case_param=None
        ),
        # Keyring: Lotse services only, and of those only the configured keyring clients (the
        # route checks the subject). Every key release is audited by the route itself.
        "GET /keyring/cases/{case_id}": personal(
            Role.service, purpose="data key release", access=Access.read, case_scoped=False
        ),
        "GET /keyring/keys/{kid}": personal(
            Role.service,
            purpose="data key release",
            access=Access.read,
            case_scoped=False,
            case_param=None,
        ),
    }
)
