"""Event handlers: every domain event the projections use goes through :func:`handle`, which
loads the rows the event needs, lets :func:`lotse_reporting.domain.apply` decide, and stores
the result in the delivery's transaction (the inbox entry is in the same one)."""

from __future__ import annotations

from typing import Any

from lotse_runtime.consumer import Delivery, EventRejected, Handler

from lotse_reporting import domain, store
from lotse_reporting.domain import Rules

CONSUMER = "main"
"""Name of the live consumer; the replay writes inbox entries under the same name, so the
live consumer finds what a replay already applied."""


def handlers(rules: Rules) -> dict[str, Handler]:
    """One handler for every event type the projections use."""

    async def handle(delivery: Delivery[Any]) -> None:
        snapshot = await store.load_snapshot(delivery.session, domain.needs_of(delivery.data))
        try:
            domain.apply(delivery.data, snapshot, rules)
        except domain.ImpossibleEvent as exc:
            raise EventRejected(exc.reason) from exc
        await store.save_snapshot(delivery.session, snapshot)

    return {model.event_type: handle for model in domain.HANDLED}
