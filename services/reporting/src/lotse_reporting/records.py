"""The ``kpi-updated`` records of published cells, built from plain values.

A publication pass writes one record per changed cell, often hundreds: building the contract
model, its CloudEvent and the Kafka record for each cost more than computing the cell. The
records here are the contract's byte for byte (``tests/reporting/test_reporting_records.py``
holds them to the model path and the committed JSON Schema).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _text
from typing import Any

from lotse_contracts.events.reporting import KpiUpdated
from lotse_contracts.figures import FIGURE_UNITS, KpiFigure

from lotse_reporting.domain import Cell


class KpiRecords:
    """The Kafka record of a cell's ``kpi-updated`` event, built from plain values: the same
    bytes and headers as ``KpiUpdated.to_cloudevent`` and ``to_kafka_binary`` give, without a
    model per cell; the live publisher's and the replay's. Strings are JSON-encoded as
    ``json.dumps`` encodes them (ASCII, escaped)."""

    def __init__(
        self,
        *,
        source: str,
        schema_base: str | None,
        now: datetime,
        extra_headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """``extra_headers`` follow the CloudEvent's, as ``to_kafka_binary`` puts them (the
        trace context of the pass that publishes)."""
        self.stamp = now.astimezone(UTC).isoformat().replace("+00:00", "Z")
        self._now = now
        # The values of extra headers are fixed text here, not placeholders.
        extra = "".join(
            f", [{_text(name)}, {_text(value.decode())}]".replace("{", "{{").replace("}", "}}")
            for name, value in extra_headers
        )
        # The headers' JSON (as the outbox stores it) around the four values that vary.
        self._headers = (
            '[["ce_specversion", "1.0"], ["ce_id", {}], '
            f'["ce_source", {_text(source)}], ["ce_type", {_text(KpiUpdated.event_type)}], '
            '["ce_subject", {}], '
            f'["ce_time", {_text(self.stamp)}], ["ce_datacontenttype", "application/json"], '
            f'["ce_dataschema", {_text(KpiUpdated.schema_uri(schema_base))}], '
            f'["ce_bezirk", {{}}], ["content-type", "application/json"]{extra}]'
        )
        self._tail = f',"computed_at":{_text(self.stamp)}}}'

    def headers(self, subject: str, bezirk: str, event_id: str) -> str:
        """The headers as the outbox stores them (JSON ``[[name, value], ...]``)."""
        return self._headers.format(_text(event_id), _text(subject), _text(bezirk))

    def value(self, cell: Cell) -> tuple[str, bytes]:
        """(subject, data as JSON) of the cell's event."""
        figure, unit = _NAMES[cell.figure]
        subject = f"{cell.bezirk}/{cell.period}/{figure}"
        parts = [
            f'{{"bezirk":{_text(cell.bezirk)},"period":{_text(cell.period)},'
            f'"figure":{_text(figure)}'
        ]
        if cell.dimension is not None:
            subject = f"{subject}/{cell.dimension}"
            parts.append(f',"dimension":{_text(cell.dimension)}')
        if cell.value is not None:
            parts.append(f',"value":{float(cell.value)!r}')
        parts.append(',"suppressed":true' if cell.suppressed else ',"suppressed":false')
        parts.append(f',"unit":{_text(unit)}')
        parts.append(self._tail)
        return subject, "".join(parts).encode()

    def outbox_row(self, cell: Cell, topic: str) -> dict[str, Any]:
        event_id = str(uuid.uuid4())
        subject, value = self.value(cell)
        return {
            "topic": topic,
            "record_key": subject,
            "value": value,
            "headers": self.headers(subject, cell.bezirk, event_id),
            "event_id": event_id,
            "event_type": KpiUpdated.event_type,
            "created_at": self._now,
            "sent_at": None,
        }


_NAMES = {figure: (figure.value, FIGURE_UNITS[figure].value) for figure in KpiFigure}
