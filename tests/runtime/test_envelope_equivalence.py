"""The consumer's envelope reader (``from_kafka``) was rewritten to read the headers in one
pass, and the inbox fingerprint shares one JSON encoder; neither's results may change.

Every record here goes through the reader and through a copy of it as it was before (kept
below as the reference): the same event, with its attributes in the same order, or the same
reason, for valid events of every catalogued type, the poison corpus of every consumed topic,
and hand-made edge cases of the header rules.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest
from lotse_contracts import cloudevents
from lotse_contracts.cloudevents import (
    CloudEvent,
    InvalidCloudEvent,
    from_kafka,
    to_kafka_binary,
    to_structured,
)
from lotse_contracts.events.base import CATALOGUE
from lotse_runtime import inbox
from pydantic import ValidationError

from tests.hardening.test_poison import MAX_EVENT_BYTES, PROBE, poison_for

Headers = list[tuple[str, bytes]]

# -- the reader before the rewrite (reference) ----------------------------------------------------


def _reference_from_attributes(attrs: dict[str, str], data: Any, *, prefix: str = "") -> CloudEvent:
    missing = [prefix + name for name in cloudevents._REQUIRED if not attrs.get(name)]
    if missing:
        raise InvalidCloudEvent(f"required attribute(s) missing: {', '.join(missing)}")
    if attrs["specversion"] != cloudevents.SPEC_VERSION:
        raise InvalidCloudEvent(
            f"unsupported specversion {attrs['specversion']!r}, "
            f"expected {cloudevents.SPEC_VERSION!r}"
        )
    defined = cloudevents._CORE_ATTRIBUTES | cloudevents._LOTSE_EXTENSIONS
    fields: dict[str, Any] = {k: v for k, v in attrs.items() if k in defined}
    if "time" in fields:
        fields["time"] = cloudevents._parse_time(fields["time"])
    extensions = {k: v for k, v in attrs.items() if k not in defined}
    fields.setdefault("datacontenttype", None)
    try:
        return CloudEvent(**fields, extensions=extensions, data=data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "event"
        raise InvalidCloudEvent(f"attribute {where!r}: {first['msg']}") from exc


def _reference_structured(value: bytes | None) -> CloudEvent:
    if not value:
        raise InvalidCloudEvent("structured-mode event has an empty body")
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCloudEvent(f"structured-mode body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidCloudEvent("structured-mode body is not a JSON object")
    if "data_base64" in doc:
        raise InvalidCloudEvent("data_base64 is not supported: Lotse events carry JSON data")
    data = doc.pop("data", None)
    attrs: dict[str, str] = {}
    for name, attr in doc.items():
        if not isinstance(attr, str):
            raise InvalidCloudEvent(f"attribute {name!r} must be a string")
        attrs[name] = attr
    return _reference_from_attributes(attrs, data)


def _reference_from_kafka(value: bytes | None, headers: Headers, *, max_bytes: int) -> CloudEvent:
    size = len(value or b"") + sum(len(k) + len(v or b"") for k, v in headers)
    if size > max_bytes:
        raise InvalidCloudEvent(f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    decoded: dict[str, str] = {}
    for name, raw in headers:
        try:
            decoded[name.lower()] = (raw or b"").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidCloudEvent(f"header {name!r} is not valid UTF-8") from exc
    content_type = decoded.get("content-type", "")
    if content_type.split(";")[0].strip() == cloudevents.STRUCTURED_CONTENT_TYPE:
        return _reference_structured(value)
    attrs = {name[3:]: text for name, text in decoded.items() if name.startswith("ce_")}
    if not attrs:
        raise InvalidCloudEvent(
            "no ce_* headers and no content-type application/cloudevents+json: not a CloudEvent"
        )
    if "datacontenttype" not in attrs and content_type:
        attrs["datacontenttype"] = content_type
    data = cloudevents._decode_json(value, attrs.get("datacontenttype"))
    return _reference_from_attributes(attrs, data, prefix="ce_")


# -- comparing verdicts ---------------------------------------------------------------------------


def _verdict(reader: Any, value: bytes | None, headers: Headers) -> tuple[str, Any]:
    try:
        event = reader(value, headers, max_bytes=MAX_EVENT_BYTES)
    except InvalidCloudEvent as exc:
        return ("invalid", exc.reason)
    # The attributes in order: a republished event's headers come out in this order; the set
    # fields and the dump too (the reader may build the event without validating it again).
    return (
        "event",
        (
            event,
            list(event.attributes().items()),
            event.model_fields_set,
            event.model_dump(mode="json", exclude_unset=True),
            event.model_dump_json(),
        ),
    )


def _assert_same(value: bytes | None, headers: Headers) -> str:
    ours = _verdict(from_kafka, value, headers)
    assert ours == _verdict(_reference_from_kafka, value, headers), (value, headers)
    return ours[0]


def _valid_records() -> list[tuple[bytes | None, Headers]]:
    records = []
    for model in CATALOGUE.models.values():
        event = model.example().to_cloudevent()
        binary = to_kafka_binary(event, extra_headers=[("traceparent", b"00-" + b"a" * 32)])
        records.append((binary.value, binary.headers))
        records.append((to_structured(event), [("content-type", b"application/cloudevents+json")]))
    return records


def test_valid_events_of_every_type_read_the_same() -> None:
    records = _valid_records()
    assert len(records) >= 2 * len(PROBE)
    assert {_assert_same(value, headers) for value, headers in records} == {"event"}


@pytest.mark.parametrize("topic", sorted(PROBE))
def test_the_poison_corpus_gets_the_same_verdicts(topic: str) -> None:
    verdicts = [
        _assert_same(p.value, p.headers) for p in poison_for(topic, 300, random.Random(topic))
    ]
    assert "invalid" in verdicts  # the corpus reached the envelope's refusals


def _headers(**attrs: str) -> Headers:
    return [(k, v.encode()) for k, v in attrs.items()]


BASE = {
    "ce_specversion": "1.0",
    "ce_id": "evt-1",
    "ce_source": "/lotse/visits",
    "ce_type": "de.lotse.visits.visit-missed.v1",
}

EDGE_CASES: list[tuple[bytes | None, Headers]] = [
    # Header names in any case, repeated headers (the last counts, in its first position).
    (b"{}", [("CE_ID", b"a"), *_headers(**BASE), ("Ce_Id", b"b"), ("ce_subject", b"s")]),
    (b"{}", [*_headers(**BASE), ("Content-Type", b"application/json"), ("content-type", b"x")]),
    (b"{}", [("content-type", b"text/plain"), *_headers(**BASE)]),
    (b"{}", [*_headers(**BASE), ("ce_datacontenttype", b"application/vnd.x+json; v=1")]),
    # Extensions: allowed, badly named, shadowing, empty name, and a header without a value.
    (b"{}", [*_headers(**BASE), ("ce_tenant", b"dortmund"), ("ce_zz9", b"1")]),
    (b"{}", [*_headers(**BASE), ("ce_Bad-Name", b"1")]),
    (b"{}", [*_headers(**BASE), ("ce_", b"1")]),
    (b"{}", [*_headers(**BASE), ("ce_extensions", b"1")]),
    (b"{}", [*_headers(**BASE), ("ce_data", b"1")]),
    (b"{}", [*_headers(**BASE), ("ce_traeger", b""), ("x-none", None)]),  # type: ignore[list-item]
    # Times: with offset, without, not a time; specversion and required attributes.
    (b"{}", [*_headers(**BASE), ("ce_time", b"2026-01-02T03:04:05.123+01:00")]),
    (b"{}", [*_headers(**BASE), ("ce_time", b"2026-01-02T03:04:05")]),
    (b"{}", [*_headers(**BASE), ("ce_time", b"yesterday")]),
    (b"{}", [*_headers(**{**BASE, "ce_specversion": "0.3"})]),
    (b"{}", [*_headers(**{**BASE, "ce_id": "", "ce_type": ""})]),
    (b"{}", [("ce_source", b"/x")]),
    # Size: exactly at the limit and one byte over (headers count).
    (b"x" * (MAX_EVENT_BYTES - 9), [("ce_id", b"1234")]),
    (b"x" * (MAX_EVENT_BYTES - 8), [("ce_id", b"1234")]),
    # Undecodable header after a valid one; a structured body with a charset parameter.
    (b"{}", [*_headers(**BASE), ("x-junk", b"\xff")]),
    (
        b'{"specversion":"1.0","id":"1","source":"/x","type":"t","data":{"a":1}}',
        [("content-type", b"application/cloudevents+json; charset=utf-8")],
    ),
    (
        b'{"specversion":"1.0","id":"1","source":"/x","type":"t","bad name":"x"}',
        [("Content-Type", b" application/cloudevents+json ")],
    ),
    (
        b'{"specversion":"1.0","id":"1","source":"/x","type":"t","time":"2026-01-02T03:04:05Z",'
        b'"subject":"c","bezirk":"b","tenant":"d","data":null}',
        [("content-type", b"application/cloudevents+json")],
    ),
    (
        b'{"specversion":"1.0","id":"1","source":"/x","type":"t","traeger":"x","Tenant":"d"}',
        [("content-type", b"application/cloudevents+json")],
    ),
    (b"[1]", [*_headers(**BASE), ("ce_time", b"2026-01-02T03:04:05.5-02:30"), ("ce_t1", b"")]),
    (None, []),
    (b"", _headers(**BASE)),
]


@pytest.mark.parametrize("case", range(len(EDGE_CASES)))
def test_edge_cases_of_the_header_rules_read_the_same(case: int) -> None:
    value, headers = EDGE_CASES[case]
    _assert_same(value, headers)


# -- the inbox fingerprint ------------------------------------------------------------------------


def _reference_fingerprint(event: CloudEvent) -> str:
    canonical = json.dumps(
        [event.type, event.subject, event.data],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def test_inbox_fingerprints_stay_what_stored_entries_hold() -> None:
    """Entries already stored keep telling redeliveries from conflicts: the fingerprint of an
    event is what it was before the encoder was shared."""
    events = [from_kafka(value, headers) for value, headers in _valid_records()]
    odd = {
        "ü": "Straße 👶",
        "n": [1, 2.5, 1e16, None, True],
        "z": {"b": 1, "a": [{}]},
        "big": 10**30,
    }
    events.append(CloudEvent(id="1", source="/x", type="de.lotse.x.y.v1", data=odd))
    for event in events:
        assert inbox.fingerprint(event) == _reference_fingerprint(event)
    assert (
        inbox.fingerprint(events[-1])
        == hashlib.sha256(
            '["de.lotse.x.y.v1",null,{"big":1000000000000000000000000000000,'
            '"n":[1,2.5,1e+16,null,true],"z":{"a":[{}],"b":1},"ü":"Straße 👶"}]'.encode()
        ).hexdigest()
    )


# -- the data's JSON ------------------------------------------------------------------------------


def _reference_decode(value: bytes) -> tuple[str, str]:
    try:
        return ("data", repr(json.loads(value)))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return ("invalid", f"data is not valid JSON: {exc}")
    except ValueError as exc:  # more digits than int() takes: neither reader catches it
        return ("error", str(exc))


def _decode(value: bytes) -> tuple[str, str]:
    try:
        return ("data", repr(cloudevents._decode_json(value, "application/json")))
    except InvalidCloudEvent as exc:
        return ("invalid", exc.reason)
    except ValueError as exc:
        return ("error", str(exc))


def _documents(rng: random.Random) -> list[bytes]:
    """Numbers near the limits of float and int, text with escapes, surrogates and every
    kind of white space, repeated keys, nesting, and broken documents of each kind."""
    numbers = [
        repr(rng.uniform(-1e6, 1e6)),
        f"{rng.random():.{rng.randint(15, 40)}f}",
        f"{rng.randint(1, 9)}.{rng.randint(0, 10**20)}e{rng.randint(-330, 310)}",
        str(rng.randint(-(10**40), 10**40)),
        "1e400", "-1e400", "5e-324", "2.4e-324", "-0", "-0.0", "1E2", "1e-7",
        "NaN", "Infinity", "-Infinity", "nan", "1.", ".5", "+1", "01", "1" * 4301,
    ]  # fmt: skip
    texts = [
        '"\\ud800"', '"\\udc00x\\ud83d\\ude00"', '"\\uD834\\uDD1E"', '"Stra\\u00dfe \\u00e9"',
        '"\x7f"', '"a\nb"', '"a\x01"', '"\\x"', '"\\u12"', '"\\/\\b\\f\\n\\r\\t"',
    ]  # fmt: skip
    documents = [n.encode() for n in numbers] + [t.encode() for t in texts]
    documents += [
        '"Straße 👶"'.encode(), b'"\xff"', b'"\xed\xa0\x80"', b"\xef\xbb\xbf{}",
        '{"a":1}'.encode("utf-16-le"), b'{"a":1,"b":2,"a":3}', b'{"a":1,}', b"[1,]",
        b" \t\n\r[1, 2 ,3 ] ", b"\x0c{}", b'{"a":[]}\x00', b"tru", b"[" * 300 + b"]" * 300,
        b"[" * 150 + b"]" * 150, b'{"\\u0000":1}', b"",
    ]  # fmt: skip
    for _ in range(200):
        doc = {
            rng.choice("abcxyzüß"): rng.choice([*numbers[:4], *texts[:4], "null", "true", "[]"])
            for _ in range(rng.randint(0, 6))
        }
        documents.append(("{" + ",".join(f'"{k}":{v}' for k, v in doc.items()) + "}").encode())
    return documents


def test_the_data_reads_as_json_loads_reads_it() -> None:
    for value in _documents(random.Random(20)):
        if value == b"":
            continue  # no data: None before either parser is asked
        assert _decode(value) == _reference_decode(value), value


def test_inbox_fingerprints_are_the_same_without_the_c_encoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = [from_kafka(value, headers) for value, headers in _valid_records()]
    expected = [_reference_fingerprint(event) for event in events]
    monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    inbox._canonical_json.cache_clear()
    try:
        assert [inbox.fingerprint(event) for event in events] == expected
    finally:
        inbox._canonical_json.cache_clear()
