"""Bad input: the limits every request of every service is held to, in one place.

Every HTTP request of every service passes the runtime's :class:`InputGuard` before any route
sees it, and every request body is a :class:`RequestModel`. Together they refuse what must
never be stored or reach the database:

* **Body size.** A request body above ``max_request_body_bytes`` (setting, default
  :data:`DEFAULT_MAX_BODY_BYTES` = 64 KiB) is answered 413 before it is parsed: at once when
  ``Content-Length`` says so, else (chunked) as soon as the bytes read pass the limit.
* **Unknown fields.** A request body with a field the model does not know is a 422 naming
  it (``extra="forbid"``); a misspelt field never passes silently. (Event contracts are not
  request models: they keep accepting unknown fields, as partners' newer minors need.)
* **Text.** No control character (Unicode category Cc: NUL, tab, line breaks, DEL, C1) and no
  lone surrogate in any text of a body, a path or a query parameter: 422 naming the field.
* **Dates and times.** Given as ISO 8601 text (numbers are not taken for Unix timestamps);
  date-times with a time-zone offset (a naive one is a 422 naming the field); every one
  between :data:`EARLIEST` and :data:`LATEST`, and each field within its window of
  plausibility around the service's clock (:data:`WINDOWS`).

Refusals are answered in the platform's one shape (``{"detail", "errors": [{"field",
"reason"}]}``), change nothing, and are written to the audit log (action ``invalid``, no
values) like the refusals of the access policy.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi.routing import iter_route_contexts
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lotse_runtime import audit
from lotse_runtime.identity import Caller
from lotse_runtime.ports import RequestRuntime

_log = logging.getLogger(__name__)

#: Default of the ``max_request_body_bytes`` setting.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
#: How far ahead of the service's clock a client's clock may run.
CLOCK_SKEW = timedelta(minutes=1)
#: No date or time before or after these is taken anywhere.
EARLIEST = date(1900, 1, 1)
LATEST = date(2199, 12, 31)
#: How long before the registration a consent or screening of the family may be dated
#: (a consent form signed during pregnancy, a screening before the birth).
BEFORE_REGISTRATION = timedelta(days=365)


# -- the service's clock during a request ---------------------------------------------------------

_request_now: ContextVar[datetime | None] = ContextVar("lotse_request_now", default=None)


def request_now() -> datetime:
    """The service's clock when the current request arrived (aware UTC); outside a request,
    the wall clock. Windows are judged against it, so tests and the simulator can move it."""
    now = _request_now.get()
    return now if now is not None else datetime.now(UTC)


# -- windows of plausibility ----------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """How far before and after the service's clock a field's value may lie."""

    name: str
    before: timedelta | None
    """How far back; None: back to :data:`EARLIEST`."""
    after: timedelta | None
    """How far ahead; None: up to :data:`LATEST`."""
    floor: date = EARLIEST
    """Never before this day, whatever the clock says."""

    @property
    def text(self) -> str:
        """The window in words, for field descriptions and the README."""
        back = (
            f"not before {self.floor.isoformat()}"
            if self.before is None
            else f"at most {_span(self.before)} before now"
        )
        ahead = (
            "not in the future"
            if self.after is not None and self.after <= CLOCK_SKEW
            else "no later than "
            + (_span(self.after) + " ahead" if self.after else LATEST.isoformat())
        )
        return f"{self.name}: {back}, {ahead}"

    def check_moment(self, value: datetime) -> datetime:
        now = request_now()
        if self.before is not None and value < now - self.before:
            _refuse("too_early", f"lies more than {_span(self.before)} back ({self.text})")
        if value < datetime(self.floor.year, self.floor.month, self.floor.day, tzinfo=UTC):
            _refuse("too_early", f"lies before {self.floor.isoformat()} ({self.text})")
        if self.after is not None and value > now + self.after:
            if self.after <= CLOCK_SKEW:
                _refuse("too_late", f"lies in the future ({self.text})")
            _refuse("too_late", f"lies more than {_span(self.after)} ahead ({self.text})")
        return value

    def check_day(self, value: date) -> date:
        today = request_now().date()
        if value < self.floor or (self.before is not None and value < today - self.before):
            _refuse("too_early", f"lies too far back ({self.text})")
        if self.after is not None and value > today + max(self.after, timedelta(days=1)):
            _refuse("too_late", f"lies too far ahead ({self.text})")
        return value


def _span(delta: timedelta) -> str:
    if delta >= timedelta(days=365) and delta.days % 365 == 0:
        years = delta.days // 365
        return f"{years} year{'s' if years > 1 else ''}"
    if delta >= timedelta(days=1):
        return f"{delta.days} day{'s' if delta.days > 1 else ''}"
    return f"{int(delta.total_seconds() // 60)} minutes"


def _refuse(kind: str, reason: str) -> None:
    raise PydanticCustomError(kind, reason)


BIRTH_DATE = Window("birth date", before=None, after=timedelta(0))
RECORDED = Window(
    "time something happened (consent given or withdrawn, screening, visit completed)",
    before=timedelta(days=5 * 365),
    after=CLOCK_SKEW,
)
APPOINTMENT = Window("appointment", before=timedelta(days=1), after=timedelta(days=365))
FIRST_CONTACT = Window(
    "planned first contact", before=timedelta(days=365), after=timedelta(days=365)
)
CALENDAR_DAY = Window(
    "calendar day", before=timedelta(days=10 * 365), after=timedelta(days=2 * 365)
)
AUDIT_SINCE = Window(
    "audit entries since", before=None, after=timedelta(days=1), floor=date(2000, 1, 1)
)

#: Every window, for the documentation (README "Bad input") and tests.
WINDOWS: tuple[Window, ...] = (
    BIRTH_DATE,
    RECORDED,
    APPOINTMENT,
    FIRST_CONTACT,
    CALENDAR_DAY,
    AUDIT_SINCE,
)


# -- date and time types --------------------------------------------------------------------------

_NUMBER = re.compile(r"^\s*[+-]?\d+(\.\d*)?\s*$")


def _iso_text(value: Any) -> Any:
    """Refuse numbers (and numeric text), which pydantic would read as Unix timestamps."""
    if isinstance(value, bool | int | float) or (isinstance(value, str) and _NUMBER.match(value)):
        raise PydanticCustomError(
            "iso_8601_text",
            "give an ISO 8601 text such as 2025-03-03 or 2025-03-03T09:15:00+01:00; "
            "numbers are not taken as dates",
        )
    return value


def _moment_in_range(value: datetime) -> datetime:
    # Compared by the wall-clock year first: converting year 1 or 9999 to UTC overflows.
    if not (EARLIEST.year <= value.year <= LATEST.year):
        raise PydanticCustomError(
            "date_range",
            f"lies outside {EARLIEST.isoformat()} to {LATEST.isoformat()}",
        )
    return value


def _day_in_range(value: date) -> date:
    if not (EARLIEST <= value <= LATEST):
        raise PydanticCustomError(
            "date_range",
            f"lies outside {EARLIEST.isoformat()} to {LATEST.isoformat()}",
        )
    return value


#: An aware date-time given as ISO 8601 text, between EARLIEST and LATEST.
Moment = Annotated[AwareDatetime, BeforeValidator(_iso_text), AfterValidator(_moment_in_range)]
#: A date given as ISO 8601 text, between EARLIEST and LATEST.
Day = Annotated[date, BeforeValidator(_iso_text), AfterValidator(_day_in_range)]

RecordedMoment = Annotated[Moment, AfterValidator(RECORDED.check_moment)]
AppointmentMoment = Annotated[Moment, AfterValidator(APPOINTMENT.check_moment)]
AuditSince = Annotated[Moment, AfterValidator(AUDIT_SINCE.check_moment)]
BirthDate = Annotated[Day, AfterValidator(BIRTH_DATE.check_day)]
FirstContactDay = Annotated[Day, AfterValidator(FIRST_CONTACT.check_day)]
CalendarDay = Annotated[Day, AfterValidator(CALENDAR_DAY.check_day)]


# -- text -----------------------------------------------------------------------------------------


def bad_character(text: str) -> str | None:
    """The first control character or lone surrogate in ``text``, as ``U+XXXX``."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs"):
            return f"U+{ord(char):04X}"
    return None


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)


def text_reason(char: str) -> str:
    return f"contains the control character {char}; text takes printable characters only"


class RequestModel(BaseModel):
    """Base of every HTTP request body: unknown fields are refused, and no text of it holds a
    control character. Nested request models must derive from it too."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _printable(cls, value: Any) -> Any:
        for text in _texts(value):
            char = bad_character(text)
            if char is not None:
                raise PydanticCustomError("control_character", text_reason(char))
        return value


# -- the guard in front of every route ------------------------------------------------------------


def _problem(status: int, field: str, reason: str, detail: str) -> tuple[int, bytes]:
    body = {"detail": detail, "errors": [{"field": field, "reason": reason}]}
    return status, json.dumps(body).encode()


class InputGuard:
    """ASGI middleware of every service (installed by ``create_service_app``): sets the
    request's clock, refuses oversized bodies (413) and control characters in the path or
    query (422) before the app parses anything, and audits every 413 and 422 the service
    gives."""

    def __init__(self, app: ASGIApp, runtime: RequestRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.limit = runtime.settings.max_request_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _request_now.set(self.runtime.clock())
        try:
            await self._guard(scope, receive, send)
        finally:
            _request_now.reset(token)

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._path_or_query(scope)
        if refusal is None:
            declared = _content_length(scope)
            if declared is not None and declared > self.limit:
                refusal = self._too_large()
        buffered: list[Message] = []
        if refusal is None:
            total = 0
            while True:
                message = await receive()
                buffered.append(message)
                if message["type"] != "http.request":
                    break
                total += len(message.get("body", b""))
                if total > self.limit:
                    refusal = self._too_large()
                    break
                if not message.get("more_body", False):
                    break
        if refusal is not None:
            status, body = refusal
            await self._audit(scope, status)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def replay() -> Message:
            if buffered:
                return buffered.pop(0)
            return await receive()

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (413, 422):
                await self._audit(scope, message["status"])
            await send(message)

        await self.app(scope, replay, watched)

    def _too_large(self) -> tuple[int, bytes]:
        reason = f"the request body is larger than {self.limit} bytes"
        return _problem(413, "body", reason, "request body too large")

    def _path_or_query(self, scope: Scope) -> tuple[int, bytes] | None:
        path = scope.get("path", "")
        char = bad_character(path)
        if char is not None:
            return _problem(422, "path", text_reason(char), "invalid request")
        raw = scope.get("query_string", b"")
        try:
            pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return _problem(422, "query", "the query string is not valid UTF-8", "invalid request")
        for name, value in pairs:
            char = bad_character(name) or bad_character(value)
            if char is not None:
                field = f"query.{name}" if bad_character(name) is None else "query"
                return _problem(422, field, text_reason(char), "invalid request")
        return None

    async def _audit(self, scope: Scope, status: int) -> None:
        """An audit entry for a refused request: who (if known), which route, which case
        (the path's ``case_id``), why — never the values sent."""
        state = scope.get("state") or {}
        caller = state.get("caller")
        request = Request(scope)
        if not isinstance(caller, Caller):
            caller = None
            resolver = getattr(getattr(scope.get("app"), "state", None), "caller_resolver", None)
            if resolver is not None and "authorization" in request.headers:
                try:
                    caller = await resolver.resolve(request)
                except Exception:
                    caller = None
        route_path, params = _route_of(scope)
        case_id = params.get("case_id")
        if case_id is not None and bad_character(str(case_id)) is not None:
            case_id = None
        try:
            async with self.runtime.db.transaction() as session:
                audit.record(
                    session,
                    service=self.runtime.service,
                    caller=caller,
                    action=audit.AuditAction.invalid,
                    case_id=str(case_id)[:36] if case_id is not None else None,
                    purpose="refused: body too large"
                    if status == 413
                    else "refused: invalid input",
                    path=route_path,
                )
        except Exception:
            _log.exception("could not audit a refused request")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _route_of(scope: Scope) -> tuple[str | None, dict[str, Any]]:
    """The route template (with its routers' prefixes) and path parameters of a request
    (None: no route matches)."""
    app = scope.get("app")
    routes = getattr(app, "routes", None)
    if routes is None:
        return None, {}
    for context in iter_route_contexts(routes):
        try:
            match, child = context.matches(scope)
        except Exception:  # a context that cannot match this kind of scope
            continue
        if match is Match.FULL:
            params = scope.get("path_params") or child.get("path_params") or {}
            return context.path, dict(params)
    return None, {}
