"""Event handlers: every domain event type the projections use is registered with
:class:`~lotse_runtime.handlers.Handlers` and goes the same way, through
:func:`lotse_reporting.operations.apply_event` (load the rows the event needs, let the domain
decide, store the result in the delivery's transaction, with the inbox entry in the same
one). A batch's families are read in one query first (:func:`operations.prepare_events`)
and what its events change is written when it commits. An impossible event is rejected, so
the consumer dead-letters it with its reason."""

from __future__ import annotations

from collections.abc import Callable

from lotse_contracts.events.base import EventModel
from lotse_runtime.consumer import Delivery, EventRejected
from lotse_runtime.handlers import Handlers
from sqlalchemy import event
from sqlalchemy.orm import Session

from lotse_reporting import domain, operations
from lotse_reporting.domain import Rules

CONSUMER = "main"
"""Name of the live consumer; the replay writes inbox entries under the same name, so the
live consumer finds what a replay already applied."""

_TELLS = "lotse_reporting_tells_publisher"


async def project(delivery: Delivery[EventModel], rules: Rules) -> None:
    """Apply one event to the projections, or reject it as impossible."""
    try:
        await operations.apply_event(delivery.session, delivery.data, rules)
    except domain.ImpossibleEvent as exc:
        raise EventRejected(exc.reason) from exc


def handlers(rules: Rules, on_applied: Callable[[], None] | None = None) -> Handlers:
    """One typed registration for every event type in :data:`domain.HANDLED`;
    ``on_applied`` is told of every applied event once its transaction has committed (the
    publisher's trigger)."""
    table = Handlers()

    def tell(session: Session) -> None:
        session.info.pop(_TELLS, None)
        if on_applied is not None:
            on_applied()

    async def with_rules(delivery: Delivery[EventModel]) -> None:
        await project(delivery, rules)
        sync = delivery.session.sync_session
        if on_applied is not None and _TELLS not in sync.info:
            # Told after the commit, so the publisher's pass sees the event; once per
            # transaction, not per event of a batch (each listen costs more than the call).
            sync.info[_TELLS] = True
            event.listen(sync, "after_commit", tell, once=True)

    for model in domain.HANDLED:
        table.on(model)(with_rules)
    return table
