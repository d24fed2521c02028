"""Typed handler registration: a consumer's handlers are declared per event model, and each
handler receives the concrete model it was registered for.

    handlers = Handlers()

    @handlers.on(FamilyRegistered)
    async def family_registered(delivery: Delivery[FamilyRegistered]) -> None:
        delivery.data.case_id  # a FamilyRegistered, checked once here, not in every handler

    runtime.add_consumer("intake", [topics.INTAKE], handlers)

The consumer looks a handler up by the CloudEvents ``type`` and parses the data with the
event catalogue; registration checks once, centrally, that what arrives is the model the
handler asked for, so handlers need no ``assert isinstance``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from lotse_contracts.events.base import EventModel

from lotse_runtime.consumer import Delivery, Handler

M = TypeVar("M", bound=EventModel)
TypedHandler = Callable[[Delivery[M]], Awaitable[None]]


class Handlers(Mapping[str, Handler]):
    """The handler table of one consumer: event type → handler, built with :meth:`on`."""

    def __init__(self) -> None:
        self._by_type: dict[str, Handler] = {}

    def on(self, model: type[M]) -> Callable[[TypedHandler[M]], TypedHandler[M]]:
        """Register the decorated function for ``model``'s event type (one handler each)."""

        def register(handler: TypedHandler[M]) -> TypedHandler[M]:
            event_type = model.event_type
            if event_type in self._by_type:
                raise ValueError(f"a handler for {event_type} is registered already")

            async def checked(delivery: Delivery[Any]) -> None:
                if not isinstance(delivery.data, model):
                    raise TypeError(
                        f"{event_type} parsed as {type(delivery.data).__name__}, "
                        f"not {model.__name__}"
                    )
                await handler(delivery)

            checked.__name__ = getattr(handler, "__name__", event_type)
            checked.__qualname__ = getattr(handler, "__qualname__", event_type)
            self._by_type[event_type] = checked
            return handler

        return register

    def __getitem__(self, event_type: str) -> Handler:
        return self._by_type[event_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_type)

    def __len__(self) -> int:
        return len(self._by_type)
