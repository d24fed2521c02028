"""What the visits service hears: the intake events, one typed handler each, and the
periodic overdue check. Each handler hands its event to the use case in operations.py,
inside the transaction the runtime's consumer opened for it (with the inbox claim and the
outbox rows of what it publishes)."""

from __future__ import annotations

from functools import partial

from lotse_contracts import topics
from lotse_contracts.events.intake import (
    CasesMerged,
    ConsentChanged,
    FamilyErased,
    FamilyRegistered,
)
from lotse_runtime.consumer import Delivery
from lotse_runtime.handlers import Handlers

from lotse_visits import operations
from lotse_visits.settings import VisitsRuntime


async def family_registered(runtime: VisitsRuntime, delivery: Delivery[FamilyRegistered]) -> None:
    # The queries of one event never need to see its own new rows, so they are written in
    # one flush at its end (a round trip per row saved) — before the next event of a batch,
    # which shares the transaction and must see them.
    with delivery.session.no_autoflush:
        await operations.register_family(runtime, delivery.session, delivery.data)
    await delivery.session.flush()


async def consent_changed(runtime: VisitsRuntime, delivery: Delivery[ConsentChanged]) -> None:
    with delivery.session.no_autoflush:
        await operations.change_consent(runtime, delivery.session, delivery.data)
    await delivery.session.flush()


async def family_erased(runtime: VisitsRuntime, delivery: Delivery[FamilyErased]) -> None:
    await operations.erase_family(runtime, delivery.session, delivery.data)


async def cases_merged(runtime: VisitsRuntime, delivery: Delivery[CasesMerged]) -> None:
    await operations.merge_cases(runtime, delivery.session, delivery.data)


def intake_handlers(runtime: VisitsRuntime) -> Handlers:
    """The handlers of the ``main`` consumer (``lotse.intake``), bound to ``runtime``."""
    handlers = Handlers()
    handlers.on(FamilyRegistered)(partial(family_registered, runtime))
    handlers.on(ConsentChanged)(partial(consent_changed, runtime))
    handlers.on(FamilyErased)(partial(family_erased, runtime))
    handlers.on(CasesMerged)(partial(cases_merged, runtime))
    return handlers


def wire(runtime: VisitsRuntime) -> None:
    """Register the intake consumer and the overdue check."""
    runtime.add_consumer("main", [topics.INTAKE], intake_handlers(runtime))
    runtime.add_job(
        "overdue", runtime.settings.overdue_check_interval_s, operations.check_overdue, once=True
    )
