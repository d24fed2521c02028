"""Who may call which referrals route, and how each call is audited (enforced by the
runtime, see ``lotse_runtime.policy``).

The catalogue is open to every person's role (it names organisations, never people). Who
changes it is scoped (the route checks the entry): a Träger its own entry's contact,
capacity and availability; city-wide coordination (``koordination``) any entry. A
Bezirksteam changes nothing there: a Träger's capacity, availability, modules and Bezirke
are one city-wide setting (the catalogue has no per-Bezirk offers), so an edit by one
Bezirk's team would change the offer of every other Bezirk. No other service calls
referrals over HTTP (they follow its events), so ``service`` tokens get nothing here.

Referrals are
made by the requesting side (Babylotse, Familienbüro, Bezirksteam), answered by the Träger
they are addressed to, and read by both and the data-protection officer; analysts see no
single referral. Whether a referral or case is the caller's (Stadtbezirk, clinic, addressed
Träger) is the route's ``ensure_may_access_case``, which ``case_scoped`` makes the runtime
verify; a Träger's own list and catalogue entry are checked by slug in the route."""

from __future__ import annotations

from lotse_runtime.identity import Role
from lotse_runtime.policy import PERSON_ROLES, Access, AccessPolicy, allow, personal

from lotse_referrals.operations import REQUESTER_ROLES

PURPOSE = "referral to a Träger"

#: Who follows a referral: both sides and the data-protection officer.
FOLLOWERS = (*REQUESTER_ROLES, Role.traeger, Role.dpo)
#: Who takes lifecycle steps: the addressed Träger answers, the requesting side cancels.
STEP_TAKERS = (*REQUESTER_ROLES, Role.traeger)
#: Who reads a Stadtbezirk's lists.
BEZIRK_ROLES = (Role.familienbuero, Role.bezirksteam)

POLICY = AccessPolicy(
    {
        "GET /catalogue/modules": allow(*PERSON_ROLES),
        "GET /catalogue/traeger": allow(*PERSON_ROLES),
        "GET /catalogue/traeger/{slug}": allow(*PERSON_ROLES),
        "PATCH /catalogue/traeger/{slug}": allow(Role.koordination, Role.traeger),
        "GET /catalogue/suggestions": allow(*PERSON_ROLES),
        "POST /catalogue/reconcile": allow(Role.koordination),
        "POST /referrals": personal(
            *REQUESTER_ROLES, purpose=PURPOSE, access=Access.change, case_param=None
        ),
        "GET /referrals/{referral_id}": personal(
            *FOLLOWERS, purpose=PURPOSE, access=Access.read, case_param=None
        ),
        "POST /referrals/{referral_id}/steps": personal(
            *STEP_TAKERS, purpose=PURPOSE, access=Access.change, case_param=None
        ),
        "GET /referrals/{referral_id}/disclosure-key": personal(
            Role.traeger,
            purpose="open a referral's disclosure",
            access=Access.read,
            case_param=None,
        ),
        "GET /cases/{case_id}/referrals": personal(*FOLLOWERS, purpose=PURPOSE, access=Access.read),
        "GET /bezirke/{bezirk}/referrals": personal(
            *BEZIRK_ROLES, purpose=PURPOSE, access=Access.read, case_param=None
        ),
        "GET /bezirke/{bezirk}/escalations": personal(
            *BEZIRK_ROLES, purpose=PURPOSE, access=Access.read, case_param=None
        ),
        "GET /bezirke/{bezirk}/retired-traeger/referrals": personal(
            *BEZIRK_ROLES, purpose=PURPOSE, access=Access.read, case_param=None
        ),
        "GET /bezirke/{bezirk}/wishes": personal(
            *BEZIRK_ROLES, purpose=PURPOSE, access=Access.read, case_param=None
        ),
        "POST /wishes/{wish_id}/placement": personal(
            *BEZIRK_ROLES, purpose=PURPOSE, access=Access.change, case_param=None
        ),
        "GET /traeger/{slug}/referrals": personal(
            Role.traeger,
            purpose=PURPOSE,
            access=Access.read,
            case_scoped=False,
            case_param=None,
        ),
    }
)
