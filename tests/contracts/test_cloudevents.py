"""CloudEvents envelope: Kafka binary and structured mode, and every way input can be bad."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from lotse_contracts.cloudevents import (
    CloudEvent,
    InvalidCloudEvent,
    from_kafka,
    to_kafka_binary,
    to_structured,
)

CASE_ID = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"
STRUCTURED = [("content-type", b"application/cloudevents+json; charset=utf-8")]


def _event(**overrides: object) -> CloudEvent:
    fields: dict[str, object] = {
        "id": "evt-0001",
        "source": "/lotse/intake",
        "type": "de.lotse.intake.family-registered.v1",
        "subject": CASE_ID,
        # Not UTC and with microseconds: both must survive the round trip.
        "time": datetime(2025, 3, 3, 9, 15, 7, 123456, tzinfo=timezone(timedelta(hours=1))),
        "dataschema": "/contracts/schemas/de.lotse.intake.family-registered.v1.json",
        "bezirk": "hoerde",
        "traeger": "awo-dortmund",
        "extensions": {"partitionkey": CASE_ID, "tenant": "dortmund"},
        "data": {"bezirk": "hoerde", "note": "Hörde – Straße, 👶, عربى", "n": [1, 2.5, None]},
    }
    fields.update(overrides)
    return CloudEvent.model_validate(fields)


def _binary_headers(**attrs: str) -> list[tuple[str, bytes]]:
    base = {
        "ce_specversion": "1.0",
        "ce_id": "evt-1",
        "ce_source": "/lotse/visits",
        "ce_type": "de.lotse.visits.visit-missed.v1",
    }
    base.update(attrs)
    return [(k, v.encode()) for k, v in base.items() if v != ""]


def test_binary_round_trip_is_lossless() -> None:
    event = _event()
    record = to_kafka_binary(event, extra_headers=[("traceparent", b"00-" + b"a" * 32 + b"-")])
    parsed = from_kafka(record.value, record.headers)
    assert parsed == event
    assert parsed.time == event.time
    assert parsed.extensions == {"partitionkey": CASE_ID, "tenant": "dortmund"}
    assert parsed.data["note"] == "Hörde – Straße, 👶, عربى"


def test_binary_record_layout() -> None:
    record = to_kafka_binary(_event())
    headers = dict(record.headers)
    assert record.key == CASE_ID.encode()
    assert headers["ce_type"] == b"de.lotse.intake.family-registered.v1"
    assert headers["ce_bezirk"] == b"hoerde"
    assert headers["ce_traeger"] == b"awo-dortmund"
    assert headers["ce_time"] == b"2025-03-03T08:15:07.123456Z"
    assert headers["content-type"] == b"application/json"
    assert json.loads(record.value or b"") == _event().data


def test_binary_round_trip_without_data_or_optional_attributes() -> None:
    event = CloudEvent(id="1", source="/lotse/reporting", type="de.lotse.reporting.x.v1")
    record = to_kafka_binary(event, key="stadt/2025/reach_rate")
    assert record.value is None
    assert record.key == b"stadt/2025/reach_rate"
    assert from_kafka(record.value, record.headers) == event


def test_structured_mode_is_read() -> None:
    event = _event()
    parsed = from_kafka(to_structured(event), STRUCTURED)
    assert parsed == event


def test_structured_mode_from_hand_written_json() -> None:
    body = {
        "specversion": "1.0",
        "id": "a-1",
        "source": "/partner/awo-dortmund",
        "type": "de.lotse.partner.referral-answer.v1",
        "time": "2025-03-04T09:30:00+01:00",
        "traeger": "awo-dortmund",
        "data": {"answer": "accepted"},
    }
    parsed = from_kafka(json.dumps(body).encode(), STRUCTURED)
    assert parsed.traeger == "awo-dortmund"
    assert parsed.time == datetime(2025, 3, 4, 8, 30, tzinfo=UTC)
    assert parsed.data == {"answer": "accepted"}
    assert parsed.dedup_key == ("/partner/awo-dortmund", "a-1")


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        pytest.param(b"{}", _binary_headers(ce_type=""), "ce_type", id="missing-ce_type"),
        pytest.param(b"{not json", _binary_headers(), "not valid JSON", id="bad-json"),
        pytest.param(
            b"{}", _binary_headers(ce_specversion="0.3"), "specversion", id="wrong-specversion"
        ),
        pytest.param(
            b"{}",
            [*_binary_headers(), ("ce_bezirk", b"h\xf6rde")],
            "not valid UTF-8",
            id="header-not-utf8",
        ),
        pytest.param(b"{}", [("content-type", b"application/json")], "no ce_*", id="no-ce"),
        pytest.param(
            b"{}", _binary_headers(ce_time="yesterday"), "RFC 3339", id="time-not-rfc3339"
        ),
        pytest.param(
            b"{}", _binary_headers(ce_time="2025-03-03T10:00:00"), "timezone", id="naive-time"
        ),
        pytest.param(
            b"<xml/>",
            [*_binary_headers(), ("content-type", b"application/xml")],
            "not JSON",
            id="not-json-content-type",
        ),
        pytest.param(b"{}", _binary_headers(ce_Bad_Name="x"), "extension", id="bad-ext-name"),
        pytest.param(
            json.dumps({"specversion": "1.0", "id": 5, "source": "/s", "type": "t"}).encode(),
            STRUCTURED,
            "'id' must be a string",
            id="structured-non-string-attribute",
        ),
        pytest.param(b"[1, 2]", STRUCTURED, "not a JSON object", id="structured-not-object"),
        pytest.param(b"", STRUCTURED, "empty body", id="structured-empty"),
        pytest.param(
            json.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}).encode()[
                :-1
            ],
            STRUCTURED,
            "not valid JSON",
            id="structured-bad-json",
        ),
    ],
)
def test_invalid_input_gives_a_reason(
    value: bytes, headers: list[tuple[str, bytes]], reason: str
) -> None:
    with pytest.raises(InvalidCloudEvent) as caught:
        from_kafka(value, headers)
    assert reason in caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_too_large_is_rejected_before_parsing() -> None:
    value = json.dumps({"blob": "x" * 2000}).encode()
    with pytest.raises(InvalidCloudEvent, match="exceeds the limit of 1024 bytes"):
        from_kafka(value, _binary_headers(), max_bytes=1024)


def test_time_must_be_aware_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="timezone"):
        _event(time=datetime(2025, 3, 3, 9, 15))
