"""The replay's short cut through a record gives the live consumer's verdict: run both paths
(``Decoder.decode_full`` is the live consumer's ``from_kafka`` + ``CATALOGUE.parse``) over the
benchmark's records, the test city's, the poison corpus and a few odd envelopes."""

from __future__ import annotations

import json
import random

import pytest
from lotse_contracts import topics
from lotse_contracts.cloudevents import to_kafka_binary, to_structured
from lotse_contracts.events.intake import FamilyRegistered
from lotse_contracts.events.visits import VisitCompleted, VisitOverdue
from lotse_reporting import domain
from lotse_reporting.replay_input import Decoded, Decoder, Rejection, Skipped, verdict_kind

from tests.hardening.test_poison import MAX_EVENT_BYTES, poison_for
from tests.reporting.replay_data import mixed_events

Headers = list[tuple[str, bytes | None]]


def _odd_records() -> list[tuple[bytes | None, Headers]]:
    """Envelopes the short cut must hand to the full path, or judge as it would."""
    event = VisitCompleted.example().to_cloudevent()
    record = to_kafka_binary(event)
    value = record.value
    headers: Headers = list(record.headers)
    data = json.loads(value or b"{}")

    def replaced(name: str, new: bytes | None) -> Headers:
        kept: Headers = [(k, v) for k, v in headers if k != name]
        return kept if new is None else [*kept, (name, new)]

    skipped = to_kafka_binary(VisitOverdue.example().to_cloudevent())
    return [
        (value, headers),
        (to_structured(event), [("content-type", b"application/cloudevents+json")]),
        (value, [*headers, ("ce_partnerref", b"abc")]),  # an extension attribute
        (value, [*headers, ("ce_Bad-Name", b"abc")]),  # an extension the spec forbids
        (value, [(k.upper(), v) for k, v in headers]),  # header names in capitals
        (value, replaced("ce_time", b"2025-03-01T10:00:00")),  # no offset
        (value, replaced("ce_time", b"yesterday")),
        (value, replaced("content-type", b"text/plain")),
        (value, replaced("ce_datacontenttype", b"application/xml")),
        (value, replaced("ce_specversion", b"0.3")),
        (value, replaced("ce_id", b"")),
        (value, replaced("ce_subject", None)),
        (value, [*headers, ("x-trace", b"\xff\xfe")]),  # not UTF-8, outside ce_*
        (value, replaced("ce_type", VisitCompleted.event_type.replace("v1", "v7").encode())),
        (json.dumps({**data, "days_since_reference": float("nan")}).encode(), headers),
        (json.dumps({**data, "days_since_reference": 3.0}).encode(), headers),
        (json.dumps({**data, "days_since_reference": 3.5}).encode(), headers),
        (json.dumps({**data, "days_since_reference": "3"}).encode(), headers),
        (b'{"case_id": "x", ' + (value or b"")[1:], headers),  # a key twice
        ((value or b"") + b" \n", headers),
        ((value or b"")[:-1] + b', "extra": "\\ud800"}', headers),  # a lone surrogate
        (b"\xef\xbb\xbf" + (value or b""), headers),  # a byte-order mark
        (value, [*headers, ("ce_bezirk", b"\xc3\x28")]),
        (skipped.value, list(skipped.headers)),
        (b"{not json", list(skipped.headers)),
        (b"", list(skipped.headers)),
        (None, headers),
    ]


def _all_records() -> list[tuple[bytes | None, Headers]]:
    records: list[tuple[bytes | None, Headers]] = []
    for event in mixed_events():
        record = to_kafka_binary(event.to_cloudevent())
        records.append((record.value, list(record.headers)))
    rng = random.Random(19)
    for topic in topics.DOMAIN_TOPICS:
        for poison in poison_for(topic, 90, rng):
            records.append((poison.value, list(poison.headers)))
    return [*records, *_odd_records()]


def test_the_short_cut_gives_the_live_consumers_verdicts() -> None:
    decoder = Decoder(domain.HANDLED, max_bytes=MAX_EVENT_BYTES)
    kinds: dict[str, int] = {}
    for value, headers in _all_records():
        fast = decoder.decode(value, headers)
        full = decoder.decode_full(value, headers)
        assert verdict_kind(fast) == verdict_kind(full), (value, headers)
        if isinstance(fast, Decoded):
            assert isinstance(full, Decoded)
            assert (fast.source, fast.id, fast.type) == (full.source, full.id, full.type)
            assert fast.data == full.data
        kinds[verdict_kind(full)] = kinds.get(verdict_kind(full), 0) + 1
    # Every verdict occurs, so no side of the comparison is empty.
    assert set(kinds) == {"accepted", "skipped", "envelope", "type", "schema"}, kinds


def test_the_short_cut_takes_every_well_formed_record() -> None:
    """The benchmark's records never need the full path (or the short cut saves nothing)."""
    decoder = Decoder(domain.HANDLED, max_bytes=MAX_EVENT_BYTES)
    for event in mixed_events()[:3000]:
        record = to_kafka_binary(event.to_cloudevent())
        outcome = decoder.shortcut(record.value, list(record.headers))
        if type(event) in domain.HANDLED:
            assert isinstance(outcome, Decoded)
            assert outcome.data == event
        else:
            assert outcome is Skipped.SKIPPED


@pytest.mark.parametrize(
    ("field", "value"),
    [("children_count", 0), ("bezirk", "Not A Slug"), ("registered_at", "2025-01-01T10:00:00")],
)
def test_a_schema_violation_is_the_schema_verdict(field: str, value: object) -> None:
    decoder = Decoder(domain.HANDLED, max_bytes=MAX_EVENT_BYTES)
    record = to_kafka_binary(FamilyRegistered.example().to_cloudevent())
    data = {**json.loads(record.value or b"{}"), field: value}
    spoiled = json.dumps(data).encode()
    assert decoder.shortcut(spoiled, list(record.headers)) is None
    assert decoder.decode(spoiled, list(record.headers)) is Rejection.SCHEMA
