"""Who may call which delivery route (enforced by the runtime, see ``lotse_runtime.policy``).

A Träger and a Bezirksteam manage their own webhook subscriptions: the operations take the
owner from the token (``lotse_traeger`` / ``lotse_bezirk``), never from the request, so a
Träger only ever sees and changes its own, a Bezirksteam only its Bezirk's; another owner's
subscription id is answered like an unknown one (403). Only a Träger answers referrals, and
only as itself (``/traeger/{slug}`` must be its own slug). The routes carry no personal data
(subscriptions hold ids, URLs and codes); creating, changing and deleting a subscription and
every answer are audited by the operations in their own transaction. No service calls
delivery over HTTP, so ``service`` tokens get nothing here."""

from __future__ import annotations

from lotse_runtime.identity import Role
from lotse_runtime.policy import AccessPolicy, allow

#: Roles that hold webhook subscriptions (their audiences in the subscription registry).
SUBSCRIBERS = (Role.traeger, Role.bezirksteam)

POLICY = AccessPolicy(
    {
        "POST /subscriptions": allow(*SUBSCRIBERS),
        "GET /subscriptions": allow(*SUBSCRIBERS),
        "GET /subscriptions/{subscription_id}": allow(*SUBSCRIBERS),
        "PATCH /subscriptions/{subscription_id}": allow(*SUBSCRIBERS),
        "DELETE /subscriptions/{subscription_id}": allow(*SUBSCRIBERS),
        "POST /subscriptions/{subscription_id}/secret": allow(*SUBSCRIBERS),
        "GET /subscriptions/{subscription_id}/deliveries": allow(*SUBSCRIBERS),
        "POST /subscriptions/{subscription_id}/redeliver": allow(*SUBSCRIBERS),
        "POST /traeger/{traeger}/answers": allow(Role.traeger),
    }
)
