"""Base class, type naming and the catalogue of versioned event models.

One Pydantic model per event and major version is the source of truth. Its CloudEvents
``type`` is ``de.lotse.<domain>.<event>.v<major>``. Models ignore unknown fields so that a
reader built against an older minor revision keeps working when optional fields are
added (the FULL_TRANSITIVE rule within a major version).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from lotse_contracts.cloudevents import CloudEvent

TYPE_PATTERN = re.compile(
    r"^de\.lotse\.(?P<domain>[a-z]+)\.(?P<name>[a-z][a-z0-9-]*)\.v(?P<major>[1-9][0-9]*)$"
)
#: Where the schemas lie below the contracts' root: ``contracts/schemas`` in the repository,
#: ``<base>/schemas`` below a deployment's contracts base URL.
SCHEMA_DIR = "/contracts/schemas"
#: The contracts base URL the committed example payloads show (an example domain: a
#: deployment configures its own, see :func:`schema_uri`).
EXAMPLE_CONTRACTS_BASE = "https://lotse.example/contracts"


class UnknownEventType(LookupError):
    """No model exists for this event type in any version."""


class UnknownEventVersion(LookupError):
    """The event is known, but not in this major version (and no upcaster reaches one)."""


class EventDataInvalid(ValueError):
    """The event data does not satisfy its model; ``reason`` names the field and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EventModel(BaseModel):
    """Base of every Lotse event payload (the CloudEvents ``data``).

    Subclasses set ``event_type`` (full CloudEvents type), ``topic`` (the domain topic it is
    published to) and ``source`` (the producing service). ``subject_field``,
    ``bezirk_field`` and ``traeger_field`` name the payload fields that fill the
    CloudEvents ``subject`` and the ``bezirk`` / ``traeger`` extension attributes.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, use_enum_values=False)

    event_type: ClassVar[str]
    topic: ClassVar[str]
    source: ClassVar[str]
    subject_field: ClassVar[str] = "case_id"
    bezirk_field: ClassVar[str | None] = "bezirk"
    traeger_field: ClassVar[str | None] = None

    @classmethod
    def schema_file(cls) -> str:
        """Repository path of this model's generated JSON Schema (its ``$id``; the
        ``dataschema`` of events written before it became an absolute URI)."""
        return f"{SCHEMA_DIR}/{cls.event_type}.json"

    @classmethod
    def schema_uri(cls, base: str | None = None) -> str:
        """The ``dataschema``: this model's schema below the contracts base URL ``base``
        (e.g. ``https://lotse.example/contracts``); without one, the repository path."""
        return schema_uri(cls.event_type, base)

    @classmethod
    def example(cls) -> EventModel:
        """A realistic instance, used for the committed example payloads and docs."""
        raise NotImplementedError(f"{cls.__name__} has no example")

    def to_cloudevent(
        self,
        *,
        event_id: str | None = None,
        time: datetime | None = None,
        source: str | None = None,
        schema_base: str | None = None,
    ) -> CloudEvent:
        """Wrap this payload in a CloudEvent with subject and extension attributes set;
        ``schema_base`` (the contracts base URL) makes ``dataschema`` an absolute URI."""
        data = self.model_dump(mode="json", exclude_none=True)
        return CloudEvent(
            id=event_id or str(uuid.uuid4()),
            source=source or self.source,
            type=self.event_type,
            subject=_str_or_none(data.get(self.subject_field)),
            time=time or datetime.now(UTC),
            dataschema=self.schema_uri(schema_base),
            bezirk=_str_or_none(data.get(self.bezirk_field)) if self.bezirk_field else None,
            traeger=_str_or_none(data.get(self.traeger_field)) if self.traeger_field else None,
            data=data,
        )


def schema_uri(event_type: str, base: str | None = None) -> str:
    """``<base>/schemas/<type>.json``, the URI a partner resolves to get the JSON Schema of
    an event's data; without ``base`` the repository path ``/contracts/schemas/<type>.json``.
    Readers accept both (and any base): the type, not the ``dataschema``, picks the model."""
    if base is None:
        return f"{SCHEMA_DIR}/{event_type}.json"
    return f"{base.rstrip('/')}/schemas/{event_type}.json"


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def split_type(event_type: str) -> tuple[str, str, int]:
    """(domain, name, major) of a Lotse event type; raises UnknownEventType if malformed."""
    match = TYPE_PATTERN.match(event_type)
    if not match:
        raise UnknownEventType(
            f"event type {event_type!r} does not follow de.lotse.<domain>.<event>.v<major>"
        )
    return match["domain"], match["name"], int(match["major"])


E = TypeVar("E", bound=type[EventModel])
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class EventCatalogue:
    """All event models by type, plus upcasters from retired majors to current ones."""

    def __init__(self) -> None:
        self._models: dict[str, type[EventModel]] = {}
        self._upcasters: dict[str, tuple[str, Upcaster]] = {}

    def register(self, model: E) -> E:
        """Class decorator: add a model to the catalogue (type must be unique)."""
        split_type(model.event_type)
        if model.event_type in self._models:
            raise ValueError(f"event type {model.event_type} registered twice")
        self._models[model.event_type] = model
        return model

    def upcaster(self, from_type: str, to_type: str) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning data of ``from_type`` into data of ``to_type``."""

        def decorate(fn: Upcaster) -> Upcaster:
            self._upcasters[from_type] = (to_type, fn)
            return fn

        return decorate

    @property
    def models(self) -> dict[str, type[EventModel]]:
        return dict(self._models)

    def model_for(self, event_type: str) -> type[EventModel]:
        """The model for exactly this type; distinguishes unknown event from unknown major."""
        if event_type in self._models:
            return self._models[event_type]
        domain, name, major = split_type(event_type)
        known = sorted(t for t in self._models if split_type(t)[:2] == (domain, name))
        if known:
            raise UnknownEventVersion(
                f"event type {event_type!r}: major version {major} is unknown "
                f"(known: {', '.join(known)})"
            )
        raise UnknownEventType(f"event type {event_type!r} is unknown")

    def parse(self, event: CloudEvent) -> EventModel:
        """Validate an event's data against its model, upcasting retired majors first."""
        event_type, data = event.type, event.data
        seen: set[str] = set()
        while event_type not in self._models and event_type in self._upcasters:
            if event_type in seen:
                raise UnknownEventVersion(f"upcaster cycle at {event_type}")
            seen.add(event_type)
            # An upcaster only understands objects; anything else must dead-letter as invalid
            # data instead of escaping as a TypeError from dict().
            if not isinstance(data, dict):
                raise EventDataInvalid(f"data of {event.type} must be a JSON object")
            event_type, fn = self._upcasters[event_type][0], self._upcasters[event_type][1]
            data = fn(dict(data))
        model = self.model_for(event_type)
        if not isinstance(data, dict):
            raise EventDataInvalid(f"data of {event.type} must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise EventDataInvalid(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    """'field: reason; field: reason' — short enough for a dead-letter header."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "data"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


#: The one catalogue of Lotse events. Event modules register into it on import.
CATALOGUE = EventCatalogue()
