"""Who may call which intake route, and how each call is audited (enforced by the runtime,
see ``lotse_runtime.policy``). The per-case check (own clinic, own Stadtbezirk) is the
route's ``call.authorise`` / ``ensure_may_access_case``; ``case_scoped`` makes the runtime
verify it ran."""

from __future__ import annotations

from lotse_runtime.identity import Role
from lotse_runtime.policy import Access, AccessPolicy, personal

from lotse_intake.domain import CHANNEL_ROLES
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
        # Keyring: Lotse services only; which service gets which purpose's key is
        # keyring.RELEASES, checked by the route. Every release is audited by the route.
        "GET /keyring/cases/{case_id}/keys/{purpose}": personal(
            Role.service, purpose="key release", access=Access.read, case_scoped=False
        ),
        "POST /keyring/cases/{case_id}/disclosures": personal(
            Role.service, purpose="disclosure sealed", access=Access.read, case_scoped=False
        ),
        "GET /keyring/cases/{case_id}/disclosures/{referral_id}/key": personal(
            Role.service, purpose="key release", access=Access.read, case_scoped=False
        ),
    }
)
