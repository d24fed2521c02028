"""How the replay reads a Kafka record: the live consumer's verdicts, at a fraction of its cost.

The live consumer (``lotse_runtime.consumer``) reads every record with
:func:`~lotse_contracts.cloudevents.from_kafka` (a pydantic ``CloudEvent`` around the
``json.loads`` of the value) and then validates the data of a handled type with
:meth:`~lotse_contracts.events.base.EventCatalogue.parse`. A replay reads millions of records,
so :func:`decode` takes a short cut where it can prove the same outcome:

* **Accept fast, reject slowly.** The short cut only ever *accepts*: a binary-mode record
  whose headers are the plain CloudEvents attributes Lotse writes, and whose data the
  contract model itself validates straight from the JSON bytes (pydantic-core's
  ``validate_json``, no ``json.loads``, no envelope model). Whatever it is not sure about —
  structured mode, extension attributes, undecodable headers, a schema violation, an unknown
  type — goes through :func:`decode_full`, the live consumer's own calls, which then gives
  the verdict and its reason. So a rejection is the live consumer's by construction, and an
  acceptance is at least as strict (``tests/reporting/test_reporting_replay_input.py`` runs
  both over the benchmark's records and the poison corpus).
* Known types the projections do not use are skipped as the live consumer skips them: after
  the envelope check (their JSON must parse, as ``from_kafka`` parses it), their data is not
  validated.
* The model instance a handled record validates into is what the replay applies, so no
  object is built only to be thrown away.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum

from lotse_contracts.cloudevents import (
    CONTENT_TYPE_HEADER,
    HEADER_PREFIX,
    JSON_CONTENT_TYPE,
    SPEC_VERSION,
    InvalidCloudEvent,
    from_kafka,
)
from lotse_contracts.events.base import (
    CATALOGUE,
    EventDataInvalid,
    EventModel,
    UnknownEventType,
    UnknownEventVersion,
)
from pydantic import ValidationError

Headers = Sequence[tuple[str, bytes | None]]


class Rejection(StrEnum):
    """Why the live consumer dead-letters a record (its verdict kinds)."""

    ENVELOPE = "envelope"
    """Not a valid CloudEvent (size, headers, JSON, required attributes)."""
    TYPE = "type"
    """An event type (or major version) nobody knows."""
    SCHEMA = "schema"
    """The data does not satisfy the type's contract model."""


class Skipped(StrEnum):
    SKIPPED = "skipped"
    """A known event the projections do not use."""


class Decoded:
    """A record of a handled type, validated: what the replay applies. (A plain class with
    slots: a frozen dataclass's ``__init__`` costs several times more, once per record.)"""

    __slots__ = ("data", "id", "source", "type")

    def __init__(self, source: str, event_id: str, event_type: str, data: EventModel) -> None:
        self.source = source
        self.id = event_id
        self.type = event_type
        self.data = data

    @property
    def dedup_key(self) -> tuple[str, str]:
        return (self.source, self.id)


Outcome = Decoded | Skipped | Rejection

# Attributes the short cut understands; any other ``ce_`` header (an extension attribute)
# goes the full way, which checks its name.
_PLAIN_ATTRIBUTES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "bezirk",
        "traeger",
    }
)
_PLAIN_HEADERS = frozenset(
    {HEADER_PREFIX + name for name in _PLAIN_ATTRIBUTES}
    | {CONTENT_TYPE_HEADER, "traceparent", "tracestate"}
)
"""Headers the short cut reads: the attributes, the content type, and the trace context
(outside ``ce_``, ``from_kafka`` only requires it to be UTF-8)."""
_JSON = JSON_CONTENT_TYPE.encode()
_SPEC_VERSION = SPEC_VERSION.encode()


class Decoder:
    """Decodes records for a set of handled models (the projections' types)."""

    def __init__(self, handled: Sequence[type[EventModel]], *, max_bytes: int) -> None:
        self.handled: Mapping[str, type[EventModel]] = {m.event_type: m for m in handled}
        self.known = frozenset(CATALOGUE.models)
        self.max_bytes = max_bytes

    def decode(self, value: bytes | None, headers: Headers) -> Outcome:
        """The live consumer's verdict on one record, by the short cut where it applies."""
        fast = self.shortcut(value, headers)
        return fast if fast is not None else self.decode_full(value, headers)

    def decode_full(self, value: bytes | None, headers: Headers) -> Outcome:
        """The verdict by the live consumer's own calls (the reference the short cut keeps)."""
        try:
            event = from_kafka(value, [(k, v or b"") for k, v in headers], max_bytes=self.max_bytes)
        except InvalidCloudEvent:
            return Rejection.ENVELOPE
        if event.type not in self.handled:
            try:
                CATALOGUE.model_for(event.type)
            except (UnknownEventType, UnknownEventVersion):
                return Rejection.TYPE
            return Skipped.SKIPPED
        try:
            data = CATALOGUE.parse(event)
        except EventDataInvalid:
            return Rejection.SCHEMA
        except (UnknownEventType, UnknownEventVersion):
            return Rejection.TYPE
        return Decoded(event.source, event.id, event.type, data)

    def shortcut(self, value: bytes | None, headers: Headers) -> Outcome | None:
        """The verdict where it is certain without the full path, else None."""
        if not value:
            return None  # no data: the full path says what that means for the type
        attrs = dict(headers)
        # Only the plain names Lotse writes, each once: anything else (capitals, extension
        # attributes, repeated headers) is for the full path to judge.
        if len(attrs) != len(headers) or not _PLAIN_HEADERS.issuperset(attrs):
            return None
        try:
            # Every value must be UTF-8; the newlines keep one value's bytes from
            # completing another's.
            joined = b"\n".join(attrs.values())  # type: ignore[arg-type]
            joined.decode("utf-8")
        except (TypeError, UnicodeDecodeError):
            return None
        size = len(value) + len(joined) - len(attrs) + 1 + len("".join(attrs))
        if size > self.max_bytes:
            return None
        if (
            attrs.get("ce_datacontenttype", _JSON) != _JSON
            or attrs.get(CONTENT_TYPE_HEADER, _JSON) != _JSON
        ):
            return None
        if attrs.get("ce_specversion") != _SPEC_VERSION:
            return None
        source, event_id = attrs.get("ce_source"), attrs.get("ce_id")
        event_type = attrs.get("ce_type")
        if not source or not event_id or not event_type:
            return None
        raw_time = attrs.get("ce_time")
        if raw_time is not None and not _is_aware_time(raw_time.decode()):
            return None
        name = event_type.decode()
        model = self.handled.get(name)
        if model is None:
            if name not in self.known:
                return None
            return Skipped.SKIPPED if _is_json(value) else None
        try:
            data = model.model_validate_json(value)
        except ValidationError:
            return None
        return Decoded(source.decode(), event_id.decode(), name, data)


def _is_aware_time(raw: str) -> bool:
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return False
    return parsed.tzinfo is not None


def _is_json(value: bytes) -> bool:
    try:
        json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def verdict_kind(outcome: Outcome) -> str:
    """accepted / skipped / the rejection's kind: what the equivalence test compares."""
    if isinstance(outcome, Decoded):
        return "accepted"
    return outcome.value
