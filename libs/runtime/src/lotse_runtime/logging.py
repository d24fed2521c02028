"""JSON logging for Lotse services: one JSON object per line, with trace ids, without personal data.

Rules for everyone who logs in Lotse:

* Log messages carry only ids (pseudonymous case ids, event ids, referral ids), event types,
  topics, outcomes and counts — never names, addresses, phone numbers, dates of birth, screening
  answers or free text from a family. Logs go to the ops team, who may not see personal data.
* Put variable facts into `extra={...}`, not into the message text, so they stay machine-readable
  and so `PersonalDataFilter` can catch a mistake: any extra (or dict message, or %-mapping
  argument) whose key is on its deny list is replaced by "[redacted]", also inside nested dicts.
  The filter cannot look into free message text; that part is the author's responsibility.
* Do not log exception messages of code that handles personal data without thinking about what
  they contain (validation errors, for instance, can echo input values).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "DEFAULT_DENY_KEYS",
    "REDACTED",
    "LotseJsonFormatter",
    "PersonalDataFilter",
    "TraceContextFilter",
    "configure_logging",
]

REDACTED = "[redacted]"

DEFAULT_DENY_KEYS: frozenset[str] = frozenset(
    {
        "family_name",
        "given_name",
        "name",
        "address",
        "street",
        "postcode",
        "phone",
        "email",
        "birth_date",
        "personal",
        "screening",
        "data",
    }
)

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_RECORD_ATTRS: frozenset[str] = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None))
) | {"message", "asctime", "taskName", "trace_id", "span_id"}

_LEADING_FIELDS = ("timestamp", "level", "logger", "message", "service", "trace_id", "span_id")

# Marks the handler configure_logging installed, so a second call replaces it instead of
# doubling every line, while handlers installed by others (pytest's caplog) stay untouched.
_HANDLER_MARK = "_lotse_json_handler"


class PersonalDataFilter(logging.Filter):
    """Replaces the value of deny-listed keys in a record's extras with "[redacted]".

    Attach it to a handler (as `configure_logging` does), not to a logger: logger filters only
    see records created on that very logger, handler filters see everything that propagates.
    Keys are matched case-insensitively; nested mappings and lists are searched as well.
    """

    def __init__(self, deny_keys: Iterable[str] = DEFAULT_DENY_KEYS) -> None:
        super().__init__()
        self.deny_keys = frozenset(key.lower() for key in deny_keys)

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in list(vars(record).items()):
            if key in _STANDARD_RECORD_ATTRS:
                continue
            if key.lower() in self.deny_keys:
                setattr(record, key, REDACTED)
            else:
                redacted = self._redact(value)
                if redacted is not value:
                    setattr(record, key, redacted)
        if isinstance(record.msg, Mapping):
            record.msg = self._redact(record.msg)
        if isinstance(record.args, Mapping):
            record.args = self._redact(record.args)
        return True

    def _redact(self, value: Any) -> Any:
        """A copy of `value` with deny-listed keys redacted, or `value` itself if none matched.

        Copies rather than mutates because the caller may still hold and use the object.
        """
        if isinstance(value, Mapping):
            changed = False
            result: dict[Any, Any] = {}
            for key, item in value.items():
                if isinstance(key, str) and key.lower() in self.deny_keys:
                    result[key] = REDACTED
                    changed = True
                else:
                    new_item = self._redact(item)
                    changed = changed or new_item is not item
                    result[key] = new_item
            return result if changed else value
        if isinstance(value, list | tuple):
            items = [self._redact(item) for item in value]
            if any(new is not old for new, old in zip(items, value, strict=True)):
                # Plain tuple even for named tuples: JSON renders both as arrays anyway.
                return tuple(items) if isinstance(value, tuple) else items
            return value
        return value


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` and `span_id` (lower-case hex, "" outside a span) to every record.

    Runs as a handler filter, i.e. synchronously in the thread and context that logged, which is
    where the current span is known.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        else:
            record.trace_id = ""
            record.span_id = ""
        return True


class LotseJsonFormatter(JsonFormatter):
    """JSON with the fields timestamp, level, logger, message, service, trace_id, span_id first."""

    def __init__(self, service: str) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service},
            timestamp=True,
        )

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        # Records logged outside a Lotse handler (e.g. formatter used directly) lack the ids.
        for field in ("trace_id", "span_id"):
            if log_data.get(field) is None:
                log_data[field] = ""
        # Stable leading fields make lines easy to scan; extras follow in logging order.
        ordered = {field: log_data.pop(field) for field in _LEADING_FIELDS if field in log_data}
        ordered.update(log_data)
        log_data.clear()
        log_data.update(ordered)


def configure_logging(service: str, level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Install the Lotse JSON handler on the root logger (replacing one installed earlier).

    `stream` defaults to the current `sys.stdout`, looked up at call time so captured streams in
    tests work.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()

    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    setattr(handler, _HANDLER_MARK, True)
    # Redaction first, so nothing later in the chain ever sees the raw values.
    handler.addFilter(PersonalDataFilter())
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(LotseJsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
