"""JSON logging: one object per line, trace ids from the current span, personal data redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from lotse_runtime.logging import REDACTED, PersonalDataFilter, configure_logging
from lotse_runtime.telemetry import TelemetryConfig, setup_telemetry

LEADING = ["timestamp", "level", "logger", "message", "service", "trace_id", "span_id"]


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging("lotse-test", level="debug", stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_json_with_the_standard_fields(stream: io.StringIO) -> None:
    log = logging.getLogger("lotse.visits.scheduler")
    log.info("visit proposed", extra={"case_id": "c-17", "event_type": "de.lotse.visits.v1"})
    log.debug("multi\nline message with %s", "args")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("handler failed")

    lines = _lines(stream)
    assert len(lines) == 3
    first = lines[0]
    assert list(first)[: len(LEADING)] == LEADING
    assert first["level"] == "INFO"
    assert first["logger"] == "lotse.visits.scheduler"
    assert first["message"] == "visit proposed"
    assert first["service"] == "lotse-test"
    assert first["case_id"] == "c-17"
    assert first["event_type"] == "de.lotse.visits.v1"
    assert first["timestamp"].endswith("+00:00")
    assert first["trace_id"] == ""
    assert first["span_id"] == ""
    assert lines[1]["message"] == "multi\nline message with args"
    assert lines[1]["level"] == "DEBUG"
    assert "ValueError: boom" in lines[2]["exc_info"]


def test_line_inside_a_span_carries_its_ids(stream: io.StringIO) -> None:
    telemetry = setup_telemetry(TelemetryConfig(service_name="lotse-test", in_memory=True))
    try:
        with telemetry.tracer.start_as_current_span("handle") as span:
            logging.getLogger("lotse.test").info("inside")
        logging.getLogger("lotse.test").info("outside")
    finally:
        telemetry.shutdown()

    inside, outside = _lines(stream)
    span_context = span.get_span_context()
    assert inside["trace_id"] == f"{span_context.trace_id:032x}"
    assert inside["span_id"] == f"{span_context.span_id:016x}"
    assert outside["trace_id"] == ""


def test_personal_data_is_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("lotse.intake")
    log.warning(
        "registration rejected",
        extra={
            "case_id": "c-1",
            "family_name": "Yılmaz",
            "Email": "a@example.org",
            "birth_date": "2025-01-02",
            "screening": {"need": "acute"},
            "payload": {"data": {"given_name": "Ada"}, "street": "Hauptstr. 1", "ok": 1},
            "rows": [{"phone": "0231 123"}, {"id": 2}],
        },
    )
    log.info({"event": "dict message", "address": "Hauptstr. 1", "postcode": "44135"})
    log.info("hello %(name)s from %(bezirk)s", {"name": "Ada", "bezirk": "eving"})

    structured, as_dict, as_mapping = _lines(stream)
    assert structured["case_id"] == "c-1"
    for key in ("family_name", "Email", "birth_date", "screening"):
        assert structured[key] == REDACTED
    assert structured["payload"] == {"data": REDACTED, "street": REDACTED, "ok": 1}
    assert structured["rows"] == [{"phone": REDACTED}, {"id": 2}]
    assert as_dict["event"] == "dict message"
    assert as_dict["address"] == REDACTED
    assert as_dict["postcode"] == REDACTED
    assert as_mapping["message"] == f"hello {REDACTED} from eving"
    raw = stream.getvalue()
    for secret in ("Yılmaz", "a@example.org", "Ada", "Hauptstr", "0231", "acute", "44135"):
        assert secret not in raw


def test_redaction_does_not_mutate_the_callers_objects() -> None:
    payload = {"email": "a@example.org", "case_id": "c-1"}
    record = logging.makeLogRecord({"msg": "m", "payload": payload})
    assert PersonalDataFilter().filter(record) is True
    assert vars(record)["payload"] == {"email": REDACTED, "case_id": "c-1"}
    assert payload["email"] == "a@example.org"


def test_custom_deny_list() -> None:
    record = logging.makeLogRecord({"msg": "m", "nickname": "Ada", "email": "kept"})
    PersonalDataFilter(deny_keys={"NickName"}).filter(record)
    assert vars(record)["nickname"] == REDACTED
    assert vars(record)["email"] == "kept"


def test_configure_twice_replaces_the_handler_and_keeps_others(stream: io.StringIO) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    try:
        second = io.StringIO()
        configure_logging("other", level="WARNING", stream=second)
        logging.getLogger("lotse.test").info("dropped by level")
        logging.getLogger("lotse.test").warning("kept")
        assert foreign in root.handlers
        assert stream.getvalue() == ""
        assert [line["service"] for line in _lines(second)] == ["other"]
    finally:
        root.removeHandler(foreign)
