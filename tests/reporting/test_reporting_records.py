"""The live publisher and the replay write their ``kpi-updated`` records from plain values
(``KpiRecords``): they must be the contract's, byte for byte what the model path gives (trace
headers included), and valid against the model and the committed JSON Schema."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.reporting import KpiUpdated
from lotse_reporting import domain
from lotse_reporting.operations import kpi_updated
from lotse_reporting.records import KpiRecords
from lotse_reporting.replay_cells import CellsByYear, sum_families

from tests.reporting.replay_data import dortmund_rules, mixed_events

SCHEMA = (
    Path(__file__).resolve().parents[2] / "contracts" / "schemas" / f"{KpiUpdated.event_type}.json"
)


def _cells() -> list[domain.Cell]:
    rules = dortmund_rules()
    snapshot = domain.Snapshot()
    for event in mixed_events():
        with contextlib.suppress(domain.ImpossibleEvent):
            domain.apply(event, snapshot, rules)
    summed = sum_families(snapshot, rules.zone)
    layout = domain.Layout(
        bezirke=tuple(sorted(rules.bezirke)),
        modules=tuple(sorted(rules.modules)),
        k=5,
        zone=rules.zone,
    )
    in_year, stock = CellsByYear(summed).of(2025)
    return domain.year_cells(2025, "2025-06", layout, in_year, stock)


def test_kpi_records_are_the_model_paths_bytes() -> None:
    cells = _cells()
    assert any(c.suppressed for c in cells)
    assert any(c.value for c in cells)
    assert any(c.dimension for c in cells)
    now = datetime(2026, 12, 7, 3, 4, 5, 678901, tzinfo=UTC)
    source, base = "/lotse/reporting", "https://lotse.example/contracts"
    writer = KpiRecords(source=source, schema_base=base, now=now)
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for n, cell in enumerate(cells):
        event_id = f"id-{n}"
        expected = to_kafka_binary(
            kpi_updated(cell, now).to_cloudevent(
                event_id=event_id, time=now, source=source, schema_base=base
            )
        )
        subject, value = writer.value(cell)
        headers = json.loads(writer.headers(subject, cell.bezirk, event_id))
        assert subject.encode() == expected.key
        assert value == expected.value
        assert headers == [[k, v.decode()] for k, v in expected.headers]
        if n % 7 == 0:
            data = json.loads(value)
            validator.validate(data)
            assert KpiUpdated.model_validate_json(value).cell() == subject


def test_a_whole_second_counts_as_the_model_writes_it() -> None:
    """Pydantic leaves out zero microseconds; the records must too."""
    cell = _cells()[0]
    now = datetime(2026, 12, 7, 3, 4, 5, tzinfo=UTC)
    writer = KpiRecords(source="/lotse/reporting", schema_base=None, now=now)
    expected = to_kafka_binary(
        kpi_updated(cell, now).to_cloudevent(event_id="x", time=now, source="/lotse/reporting")
    )
    assert writer.value(cell)[1] == expected.value


def test_trace_headers_follow_as_the_model_path_puts_them() -> None:
    cell = next(c for c in _cells() if c.dimension)
    now = datetime(2026, 12, 7, 3, 4, 5, 678901, tzinfo=UTC)
    trace = [
        ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("tracestate", b'vendor={"odd":"braces"}'),
    ]
    writer = KpiRecords(source="/lotse/reporting", schema_base=None, now=now, extra_headers=trace)
    expected = to_kafka_binary(
        kpi_updated(cell, now).to_cloudevent(event_id="e-1", time=now, source="/lotse/reporting"),
        extra_headers=trace,
    )
    subject, _value = writer.value(cell)
    headers = json.loads(writer.headers(subject, cell.bezirk, "e-1"))
    assert headers == [[k, v.decode()] for k, v in expected.headers]
