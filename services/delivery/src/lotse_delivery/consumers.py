"""What the delivery service hears: the domain topics, one typed handler per event type
the subscription registry routes to some audience. Each handler stores the registry's
projection for every matching subscription (operations.enqueue) inside the transaction the
runtime's consumer opened for it, with the inbox claim: the webhook path's outbox.

One kind of event is not on any domain topic: a Träger's refused answer
(``answer-refused``) goes to that Träger's feed only; a second consumer reads the Träger
feeds for it alone.

Why the domain topics and not the audience topics: the audience copies are projections
that often drop fields the published schema requires (their ``dataschema`` is removed), so
the runtime's consumer, which validates every event against its model, would refuse them;
one consumer group over three topics also serves every Bezirk and Träger of the city.
The projection is the same function (``SubscriptionRegistry.route``) that fills the
audience topics, applied before anything is stored, so a webhook carries exactly what the
audience's Kafka feed carries."""

from __future__ import annotations

from functools import partial

from lotse_contracts import topics
from lotse_contracts.events.base import CATALOGUE, EventModel
from lotse_contracts.events.referrals import AnswerRefused
from lotse_runtime.consumer import Delivery
from lotse_runtime.handlers import Handlers

from lotse_delivery import operations
from lotse_delivery.settings import DeliveryRuntime

#: The domain topics the routed events come from.
SOURCES = [topics.INTAKE, topics.VISITS, topics.REFERRALS]


async def routed_event(runtime: DeliveryRuntime, delivery: Delivery[EventModel]) -> None:
    await operations.enqueue(runtime, delivery.session, delivery.event)


def feed_handlers(runtime: DeliveryRuntime) -> Handlers:
    """A handler for every event type the registry routes to a Bezirksteam or a Träger."""
    handlers = Handlers()
    for event_type in runtime.registry.routed_types():
        handlers.on(CATALOGUE.model_for(event_type))(partial(routed_event, runtime))
    return handlers


def notice_handlers(runtime: DeliveryRuntime) -> Handlers:
    """Notices that exist on audience feeds only (no fact of the domain, so not on a domain
    topic): a Träger's refused answer (``answer-refused``), on that Träger's feed. Every
    other type on the feeds is a copy of a domain event and has no handler here (skipped)."""
    handlers = Handlers()
    handlers.on(AnswerRefused)(partial(routed_event, runtime))
    return handlers


def wire(runtime: DeliveryRuntime) -> None:
    runtime.add_consumer("main", SOURCES, feed_handlers(runtime))
    # A Träger answering over HTTP hears of a refused answer like one answering on Kafka.
    feeds = [topics.partner_referrals(slug) for slug in runtime.city.traeger_slugs]
    runtime.add_consumer("notices", feeds, notice_handlers(runtime))
