"""A replay into empty projections, in memory, written once.

After ``replay`` dropped the facts and the live consumer's inbox entries, nothing needs to be
read back from the database: every row an event's checks look at was made by an earlier
event of the same replay. So :class:`Rebuild` keeps the projections' rows in one
:class:`~lotse_reporting.domain.Snapshot` and applies each event with the live consumer's own
rules (:func:`lotse_reporting.domain.apply`, the same verdicts on impossible events), writes
the inbox entries of each fetch with one ``executemany``, and at the end writes the rows, the
cells (:mod:`lotse_reporting.replay_cells`) and the published figures with their outbox rows.

All of it is one database transaction: the inbox entries commit together with the effects
they stand for (a replay that fails leaves the dropped, empty projections behind and is run
again), and the outbox rows commit with the ``reporting_kpi`` rows that record them as
published, so the relay publishes exactly what the table says, as the live publisher does.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord
from lotse_contracts.cloudevents import CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE, SPEC_VERSION
from lotse_contracts.events.reporting import KpiUpdated
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_reporting import domain, store
from lotse_reporting.domain import (
    Accumulated,
    CaseFacts,
    Cell,
    CellKey,
    ConsentFacts,
    Fact,
    Layout,
    ReferralFacts,
    Rules,
)
from lotse_reporting.replay_cells import sum_families, year_inputs
from lotse_reporting.replay_input import Decoded, Decoder, Skipped
from lotse_reporting.settings import ReportingSettings

#: Rows per INSERT statement (executemany): large, so the database sees few round trips.
ROWS_PER_INSERT = 5000

_INBOX: Table = InboxEntry.__table__  # type: ignore[attr-defined]
_OUTBOX: Table = OutboxMessage.__table__  # type: ignore[attr-defined]


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


class Rebuild:
    """Applies fetched records to in-memory projections, as the live consumer would."""

    def __init__(
        self, decoder: Decoder, rules: Rules, *, inbox_consumer: str, counts: Counter[str]
    ) -> None:
        self.decoder = decoder
        self.rules = rules
        self.inbox_consumer = inbox_consumer
        self.snapshot = domain.Snapshot()
        self.counts = counts
        """records, applied, duplicates, skipped, invalid:<kind>, rejected:<reason kind>."""
        # Hashes of the applied events' (source, id): a hit is confirmed against the inbox
        # rows themselves, so the set stays small (an int per event) and is never wrong.
        self._applied: set[int] = set()

    async def apply_batch(
        self, session: AsyncSession, records: Sequence[ConsumerRecord[Any, Any]]
    ) -> None:
        """Apply records in partition order; their inbox entries go in with one statement."""
        counts, snapshot, rules = self.counts, self.snapshot, self.rules
        counts["records"] += len(records)
        entries: list[dict[str, Any]] = []
        pending: set[tuple[str, str]] = set()
        now = datetime.now(UTC)
        for record in records:
            outcome = self.decoder.decode(record.value, record.headers or ())
            if not isinstance(outcome, Decoded):
                if outcome is Skipped.SKIPPED:
                    counts["skipped"] += 1
                else:
                    counts[f"invalid:{outcome.value}"] += 1
                continue
            key = outcome.dedup_key
            hashed = hash(key)
            if hashed in self._applied and (key in pending or await self._in_inbox(session, key)):
                counts["duplicates"] += 1
                continue
            try:
                domain.apply(outcome.data, snapshot, rules)
            except domain.ImpossibleEvent as exc:
                counts[f"rejected:{exc.reason.split(':', 1)[0]}"] += 1
                continue
            counts["applied"] += 1
            self._applied.add(hashed)
            pending.add(key)
            entries.append(
                {
                    "consumer": self.inbox_consumer,
                    "source": outcome.source,
                    "event_id": outcome.id,
                    "event_type": outcome.type,
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "processed_at": now,
                }
            )
        # What apply marks for the live publisher means nothing here: cells are summed at
        # the end, and the sets would only grow.
        snapshot.reset_touched()
        snapshot.fact_years.clear()
        for chunk in _chunks(entries):
            await session.execute(insert(_INBOX), chunk)

    async def _in_inbox(self, session: AsyncSession, key: tuple[str, str]) -> bool:
        found = await session.scalar(
            select(col(InboxEntry.event_id)).where(
                col(InboxEntry.consumer) == self.inbox_consumer,
                col(InboxEntry.source) == key[0],
                col(InboxEntry.event_id) == key[1],
            )
        )
        return found is not None

    async def write_rows(self, session: AsyncSession) -> None:
        """Store the projections' rows (the tables are empty: plain inserts)."""
        snapshot = self.snapshot
        await _insert(session, store.CASES, (_row(c) for c in snapshot.cases.values()))
        await _insert(session, store.CONSENTS, (_row(c) for c in snapshot.consents.values()))
        await _insert(session, store.FACTS, (_row(f) for f in snapshot.facts.values()))
        await _insert(session, store.REFERRALS, (_row(r) for r in snapshot.referrals.values()))

    def cells(self) -> dict[CellKey, Accumulated]:
        return sum_families(self.snapshot, self.rules.zone)

    def horizon(self) -> tuple[str, str] | None:
        """(oldest month, newest month) with any fact or registration, None without."""
        months = {f.month for f in self.snapshot.facts.values()}
        months |= {c.registered_month for c in self.snapshot.cases.values() if c.registered_month}
        return (min(months), max(months)) if months else None


_COLUMNS: dict[type[Any], tuple[str, ...]] = {
    kind: tuple(f.name for f in fields(kind))
    for kind in (CaseFacts, ConsentFacts, Fact, ReferralFacts)
}


def _row(facts: CaseFacts | ConsentFacts | Fact | ReferralFacts) -> dict[str, Any]:
    row = {name: getattr(facts, name) for name in _COLUMNS[type(facts)]}
    for name in ("at", "until"):
        if name in row:
            row[name] = _utc(row[name])
    return row


def _chunks(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), ROWS_PER_INSERT):
        yield rows[start : start + ROWS_PER_INSERT]


async def _insert(session: AsyncSession, table: Table, rows: Any) -> int:
    """Insert rows from an iterable in statements of ROWS_PER_INSERT; returns how many."""
    chunk: list[dict[str, Any]] = []
    written = 0
    for row in rows:
        chunk.append(row)
        if len(chunk) >= ROWS_PER_INSERT:
            await session.execute(insert(table), chunk)
            written += len(chunk)
            chunk = []
    if chunk:
        await session.execute(insert(table), chunk)
        written += len(chunk)
    return written


async def write_cells(session: AsyncSession, cells: dict[CellKey, Accumulated]) -> None:
    """Store the cells' sums and median histograms (empty tables: plain inserts)."""
    await _insert(
        session,
        store.CELLS,
        (
            {
                "bezirk": key[0],
                "period": key[1],
                "figure": key[2],
                "dimension": key[3],
                "families": acc.families,
                "value": acc.value,
                "hits": acc.hits,
                "weight": acc.weight,
            }
            for key, acc in sorted(cells.items())
        ),
    )
    await _insert(
        session,
        store.NUMBERS,
        (
            {
                "bezirk": key[0],
                "period": key[1],
                "figure": key[2],
                "dimension": key[3],
                "number": number,
                "count": count,
            }
            for key, acc in sorted(cells.items())
            for number, count in sorted(acc.numbers.items())
        ),
    )


async def publish(
    runtime: ServiceRuntime[ReportingSettings],
    session: AsyncSession,
    layout: Layout,
    cells: dict[CellKey, Accumulated],
    span: tuple[str, str] | None,
    *,
    republish: bool,
) -> int:
    """Derive and protect every year's cells, record the changed ones as published and add
    their ``kpi-updated`` events to the outbox, all in ``session``; returns how many."""
    if span is None:
        return 0
    oldest, newest = span
    changed: list[Cell] = []
    for year in range(domain.year_of(oldest), domain.year_of(newest) + 1):
        in_year, stock = year_inputs(cells, year)
        derived = domain.year_cells(year, newest, layout, in_year, stock)
        if republish:
            changed.extend(derived)
        else:
            before = await store.published_cells(session, year)
            changed.extend(domain.changed_cells(derived, before))
    await store.set_state(session, store.HORIZON, newest)
    if not changed:
        return 0
    now = runtime.clock().astimezone(UTC)
    await store.save_cells(session, changed, now, await store.revision(session) + 1)
    outbox = runtime.outbox
    if KpiUpdated.event_type in runtime.registry.routed_types():
        # Audience copies are the outbox's business: let it route each event.
        for cell in changed:
            event = kpi_updated(cell, now).to_cloudevent(
                source=outbox.source, schema_base=outbox.schema_base
            )
            outbox.add_cloudevent(session, event, KpiUpdated.topic)
        return len(changed)
    writer = KpiRecords(source=outbox.source, schema_base=outbox.schema_base)
    topic = outbox.topic_prefix + KpiUpdated.topic
    await _insert(session, _OUTBOX, (writer.outbox_row(cell, now, topic) for cell in changed))
    return len(changed)


def kpi_updated(cell: Cell, now: datetime) -> KpiUpdated:
    """The contract model of a cell (the reference :class:`KpiRecords` is held to)."""
    return KpiUpdated(
        bezirk=cell.bezirk,
        period=cell.period,
        figure=cell.figure,
        dimension=cell.dimension,
        value=cell.value,
        suppressed=cell.suppressed,
        unit=cell.unit,
        computed_at=now,
    )


class KpiRecords:
    """The Kafka record of a cell's ``kpi-updated`` event, built from plain values: the same
    bytes and headers as ``KpiUpdated.to_cloudevent`` and ``to_kafka_binary`` give (held to
    them by ``tests/reporting/test_reporting_replay_output.py``), without a model per cell."""

    def __init__(self, *, source: str, schema_base: str | None) -> None:
        self.source = source
        self.dataschema = KpiUpdated.schema_uri(schema_base)

    def record(
        self, cell: Cell, now: datetime, event_id: str
    ) -> tuple[str, bytes, list[tuple[str, bytes]]]:
        """(key, value, headers) of the cell's event."""
        stamp = now.astimezone(UTC).isoformat().replace("+00:00", "Z")
        data: dict[str, Any] = {
            "bezirk": cell.bezirk,
            "period": cell.period,
            "figure": cell.figure.value,
        }
        subject = f"{cell.bezirk}/{cell.period}/{cell.figure.value}"
        if cell.dimension is not None:
            data["dimension"] = cell.dimension
            subject = f"{subject}/{cell.dimension}"
        if cell.value is not None:
            data["value"] = float(cell.value)
        data["suppressed"] = cell.suppressed
        data["unit"] = cell.unit.value
        data["computed_at"] = stamp
        headers = [
            ("ce_specversion", SPEC_VERSION.encode()),
            ("ce_id", event_id.encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", KpiUpdated.event_type.encode()),
            ("ce_subject", subject.encode()),
            ("ce_time", stamp.encode()),
            ("ce_datacontenttype", JSON_CONTENT_TYPE.encode()),
            ("ce_dataschema", self.dataschema.encode()),
            ("ce_bezirk", cell.bezirk.encode()),
            (CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE.encode()),
        ]
        value = json.dumps(data, separators=(",", ":")).encode()
        return subject, value, headers

    def outbox_row(self, cell: Cell, now: datetime, topic: str) -> dict[str, Any]:
        event_id = str(uuid.uuid4())
        key, value, headers = self.record(cell, now, event_id)
        return {
            "topic": topic,
            "record_key": key,
            "value": value,
            "headers": json.dumps([[name, raw.decode()] for name, raw in headers]),
            "event_id": event_id,
            "event_type": KpiUpdated.event_type,
            "created_at": datetime.now(UTC),
            "sent_at": None,
        }
