"""Who may call which intake route, and how each call is audited (enforced by the runtime,
see ``lotse_runtime.policy``). The per-case check (own clinic, own Stadtbezirk) is the
route's ``call.authorise`` / ``ensure_may_access_case``; ``case_scoped`` makes the runtime
verify it ran.

``service`` tokens are admitted by name (their subject), each only where that service
calls: the citizens' office (``buergerbuero``) registers move-in notices; referrals fetches
data keys from the keyring. No other service calls intake over HTTP (they follow its
events)."""

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
#: The service that sends move-in notices (channel ``move_in``).
CITIZENS_OFFICE = "buergerbuero"

POLICY = AccessPolicy(
    {
        "POST /cases": personal(
            *REGISTER,
            purpose="register family",
            access=Access.change,
            services=(CITIZENS_OFFICE,),
        ),
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
        # Erasure with four eyes (lotse_intake.erasure): requested by one, confirmed by another
        # data-protection officer; each step audits itself.
        "POST /cases/{case_id}/erasure": personal(
            *ERASE, purpose="erasure requested", access=Access.change
        ),
        "POST /cases/{case_id}/erasure/{request_id}/confirm": personal(
            Role.dpo, purpose="erasure", access=Access.change
        ),
        "POST /cases/{case_id}/erasure/{request_id}/withdraw": personal(
            *ERASE, purpose="erasure request withdrawn", access=Access.change
        ),
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
        # Keyring: Lotse services only; which service gets which purpose's key is
        # keyring.RELEASES, checked by the route. Every release is audited by the route.
        "GET /keyring/cases/{case_id}/keys/{purpose}": personal(
            Role.service,
            purpose="key release",
            access=Access.read,
            case_scoped=False,
            services=("visits", "referrals"),
        ),
        "POST /keyring/cases/{case_id}/disclosures": personal(
            Role.service,
            purpose="disclosure sealed",
            access=Access.read,
            case_scoped=False,
            services=("referrals",),
        ),
        "GET /keyring/cases/{case_id}/disclosures/{referral_id}/key": personal(
            Role.service,
            purpose="key release",
            access=Access.read,
            case_scoped=False,
            services=("referrals",),
        ),
    }
)
