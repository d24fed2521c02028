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

import gc
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRecord
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.reporting import KpiUpdated
from lotse_runtime.app import ServiceRuntime
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import DateTime, Table, func, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlmodel import SQLModel, col

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
from lotse_reporting.operations import add_kpi_events
from lotse_reporting.records import KpiRecords
from lotse_reporting.replay_cells import CellsByYear, sum_stored
from lotse_reporting.replay_input import Decoded, Decoder, Skipped
from lotse_reporting.settings import ReportingSettings
from lotse_reporting.tables import ReportingFact, ReportingKpi

#: Rows per INSERT statement (executemany): large, so the database sees few round trips.
ROWS_PER_INSERT = 5000

#: SQLite's page cache for the replay's transaction, in KiB. At SQLite's default (2 MB)
#: the primary-key indexes of the inbox and the facts (random ids) soon outgrow it, and
#: every insert then reads pages back and spills others into the WAL again and again:
#: 64 MB took a 200,000-event replay's database work from 2.8 to 1.6 CPU seconds, and
#: costs at most that much resident memory.
REBUILD_CACHE_KIB = 64 * 1024

_INBOX: Table = InboxEntry.__table__  # type: ignore[attr-defined]
_OUTBOX: Table = OutboxMessage.__table__  # type: ignore[attr-defined]
_MODELS: dict[str, type[SQLModel]] = {
    "reporting_kpi": ReportingKpi,
    "reporting_fact": ReportingFact,
}


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


class SeenFilter:
    """Which events may have been applied already: a Bloom filter (two bits per event in a
    fixed bitmap of 16 MiB) over their (source, id). It never misses an applied event; a hit
    may be wrong (about 1 in 5,000 at a million events) and is confirmed against the inbox
    rows, so duplicates are found exactly while the memory stays the same for any number of
    events (a set of a million keys would take 60 MB and more)."""

    def __init__(self, bits: int = 1 << 27) -> None:
        self._bits = bytearray(bits // 8)
        self._mask = bits - 1

    def _positions(self, key: tuple[str, str]) -> tuple[int, int]:
        hashed = hash(key)
        return hashed & self._mask, (hashed >> 32) & self._mask

    def add(self, key: tuple[str, str]) -> None:
        for position in self._positions(key):
            self._bits[position >> 3] |= 1 << (position & 7)

    def __contains__(self, key: tuple[str, str]) -> bool:
        # Asked once per record: spelled out, without a generator (half the cost).
        low, high = self._positions(key)
        bits = self._bits
        return bool(bits[low >> 3] & (1 << (low & 7)) and bits[high >> 3] & (1 << (high & 7)))


class ShardWitness:
    """What a shard of a rebuild (``replay.Shard``) saw that another shard may also need:
    each shard applies the records of its families only, which gives one process's verdicts
    as long as no event reaches into another family. Events name their family by their
    subject (the record's key, which picks the shard) and other families' rows only by a
    visit or referral id; so the shards' verdicts are one process's when every record's key
    is its event's subject (``foreign`` counts those that are not) and no visit or referral
    id is named in two shards (``refs``)."""

    _REFS = ("visit_id", "referral_id")

    def __init__(self) -> None:
        self.foreign = 0
        self.refs: set[str] = set()

    def see(self, key: bytes | None, event: EventModel) -> None:
        subject = getattr(event, event.subject_field, None)
        if subject is None or key != str(subject).encode():
            self.foreign += 1
        for name in self._REFS:
            ref = getattr(event, name, None)
            if ref is not None:
                self.refs.add(ref)


class Rebuild:
    """Applies fetched records to in-memory projections, as the live consumer would."""

    def __init__(
        self,
        decoder: Decoder,
        rules: Rules,
        *,
        inbox_consumer: str,
        counts: Counter[str],
        witness: ShardWitness | None = None,
    ) -> None:
        self.decoder = decoder
        self.rules = rules
        self.inbox_consumer = inbox_consumer
        self.snapshot = domain.Snapshot()
        self.counts = counts
        """records, applied, duplicates, skipped, invalid:<kind>, rejected:<reason kind>."""
        self.witness = witness
        """Set when this is one shard of a rebuild."""
        self._applied = SeenFilter()

    async def apply_batch(
        self, session: AsyncSession, records: Sequence[ConsumerRecord[Any, Any]]
    ) -> None:
        """Apply records in partition order; their inbox entries go in with one statement."""
        counts, snapshot, rules, witness = self.counts, self.snapshot, self.rules, self.witness
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
            if witness is not None:
                witness.see(record.key, outcome.data)
            key = outcome.dedup_key
            if key in self._applied and (key in pending or await self._in_inbox(session, key)):
                counts["duplicates"] += 1
                continue
            try:
                domain.apply(outcome.data, snapshot, rules)
            except domain.ImpossibleEvent as exc:
                counts[f"rejected:{exc.reason.split(':', 1)[0]}"] += 1
                continue
            counts["applied"] += 1
            self._applied.add(key)
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
        await self._store_unchecked(session)
        _share_strings(snapshot)
        # What apply marks for the live publisher means nothing here: cells are summed at
        # the end, and the sets would only grow.
        snapshot.reset_touched()
        snapshot.fact_years.clear()
        await _insert(session, _INBOX, entries)

    async def _store_unchecked(self, session: AsyncSession) -> None:
        """Write this batch's facts that no check reads back and let them go: they are most
        of a family's rows, and at a million events holding them until the end took the
        replay over 500 MB. A later event may replace one (same kind and ref): the row is
        then updated, as the in-memory fact would have been."""
        snapshot = self.snapshot
        unchecked = [key for key in snapshot.touched_facts if key[0] not in domain.CHECKED_KINDS]
        if unchecked:
            facts = snapshot.facts
            await _insert(
                session,
                store.FACTS,
                (_row(facts.pop(key)) for key in unchecked),
                replace_on=("kind", "ref"),
            )
            snapshot.touched_facts.difference_update(unchecked)
        # Consents too: the only check on them (an older statement never overrides a newer
        # one) is then the stored row's, in the upsert's condition.
        consents = snapshot.consents
        await _insert(
            session,
            store.CONSENTS,
            (_row(consents.pop(key)) for key in snapshot.touched_consents),
            replace_on=("case_id", "consent_id"),
            unless_newer="at",
        )
        snapshot.touched_consents.clear()

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

    def release(self) -> None:
        """Drop the in-memory projections (after they were written), and collect what
        cyclic garbage the fetches left (none was found, but :func:`collector_off` holds the
        collector's own passes back)."""
        self.snapshot = domain.Snapshot()
        gc.collect()

    async def cells(self, session: AsyncSession) -> dict[CellKey, Accumulated]:
        """Every family's share of every cell, summed from the stored rows (after
        :meth:`write_rows`; the in-memory rows no longer hold every fact)."""
        return await sum_stored(session, self.rules.zone)

    async def stored_cells(self, session: AsyncSession) -> dict[CellKey, Accumulated]:
        """Store the rows, then sum the cells from the tables, one family at a time: the
        rows' memory is given back first (:meth:`release`) and reused for the sums."""
        await self.write_rows(session)
        self.release()
        return await self.cells(session)


@contextmanager
def collector_off() -> Iterator[None]:
    """No automatic garbage collection while inside (a rebuild). Its objects live until the
    rows are written or die by their reference count: the collector's passes found next to
    nothing, yet each full pass walked every object alive, the more the further the replay
    got (at 200,000 events 2 of 14 CPU seconds; freezing the projections after each fetch,
    as before, still left a pass over each fetch's objects). :meth:`Rebuild.release`
    collects once."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@asynccontextmanager
async def sqlite_cache(session: AsyncSession, kib: int = REBUILD_CACHE_KIB) -> AsyncIterator[None]:
    """On SQLite, a page cache of ``kib`` for the session's connection while inside, then
    the one it had (the connection goes back to the pool); other databases: nothing."""
    connection = await session.connection()
    if connection.dialect.name != "sqlite":
        yield
        return
    before = (await connection.exec_driver_sql("PRAGMA cache_size")).scalar_one()
    await connection.exec_driver_sql(f"PRAGMA cache_size=-{int(kib)}")
    try:
        yield
    finally:
        await connection.exec_driver_sql(f"PRAGMA cache_size={int(before)}")


async def horizon(session: AsyncSession) -> tuple[str, str] | None:
    """(oldest month, newest month) with any stored fact or registration, None without."""
    months: list[str] = []
    for column in (store.FACTS.c.month, store.CASES.c.registered_month):
        low, high = (await session.execute(select(func.min(column), func.max(column)))).one()
        months += [m for m in (low, high) if m is not None]
    return (min(months), max(months)) if months else None


def _share_strings(snapshot: domain.Snapshot) -> None:
    """Make the rows touched in this batch share one string object per case id, Bezirk,
    month, scope, module and status: each event brings its own copies, and a replay keeps
    every family's rows (at a million events, a hundred MB of duplicate strings)."""
    share = sys.intern
    for case_id in snapshot.touched_cases:
        case = snapshot.cases[case_id]
        case.case_id = share(case.case_id)
        if case.bezirk is not None:
            case.bezirk = share(case.bezirk)
        if case.registered_month is not None:
            case.registered_month = share(case.registered_month)
        if case.channel is not None:
            case.channel = share(case.channel)
    for key in snapshot.touched_facts:
        fact = snapshot.facts[key]
        fact.case_id = share(fact.case_id)
        fact.bezirk = share(fact.bezirk)
        fact.month = share(fact.month)
        if fact.dimension is not None:
            fact.dimension = share(fact.dimension)
    for pair in snapshot.touched_consents:
        consent = snapshot.consents[pair]
        consent.case_id = share(consent.case_id)
        consent.scope = share(consent.scope)
    for referral_id in snapshot.touched_referrals:
        referral = snapshot.referrals[referral_id]
        referral.case_id = share(referral.case_id)
        referral.bezirk = share(referral.bezirk)
        referral.module = share(referral.module)
        referral.status = share(referral.status)


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


def _is_time(table: Table, name: str) -> bool:
    kind = table.c[name].type
    # UTCDateTime (a TypeDecorator around DateTime) says ``object`` as its python_type.
    return isinstance(kind, DateTime) or isinstance(getattr(kind, "impl", None), DateTime)


def _sqlite_time(moment: datetime) -> str:
    """A time as SQLAlchemy's SQLite dialect stores it: UTC text, six-digit fraction, no
    offset (the driver's own adapter would write an offset the rows of the live path lack)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _sqlite_rows(table: Table, names: list[str], chunk: list[dict[str, Any]]) -> list[Any]:
    """The rows' values as SQLAlchemy's SQLite dialect stores them (times: UTC text without
    an offset; the rest as they are)."""
    times = [i for i, name in enumerate(names) if _is_time(table, name)]
    if not times:
        return [tuple(row.values()) for row in chunk]
    values: list[Any] = []
    # Rows of one statement often share one time object (a fetch's processed_at, a
    # publication's computed_at): it is formatted once.
    last: datetime | None = None
    text = ""
    for row in chunk:
        plain = list(row.values())
        for i in times:
            moment = plain[i]
            if moment is not None:
                if moment is not last:
                    last, text = moment, _sqlite_time(moment)
                plain[i] = text
        values.append(plain)
    return values


async def _insert(
    session: AsyncSession,
    table: Table,
    rows: Iterable[dict[str, Any]],
    *,
    replace_on: Sequence[str] = (),
    unless_newer: str | None = None,
) -> int:
    """Insert rows (all with the same keys) in statements of ROWS_PER_INSERT (``replace_on``:
    update the row with that key instead, unless its ``unless_newer`` column is later than
    the new row's); returns how many. On SQLite straight through the
    driver's ``executemany``: SQLAlchemy's per-value bind processing would cost more than
    everything else a replay does per row."""
    connection = await session.connection()
    sqlite = connection.dialect.name == "sqlite"
    written = 0
    for chunk in store.chunks(rows, ROWS_PER_INSERT):
        if sqlite:
            names = list(chunk[0])
            statement = "INSERT INTO {} ({}) VALUES ({})".format(
                table.name,
                ", ".join(f'"{name}"' for name in names),
                ", ".join("?" for _ in names),
            )
            if replace_on:
                statement += " ON CONFLICT ({}) DO UPDATE SET {}".format(
                    ", ".join(f'"{name}"' for name in replace_on),
                    ", ".join(
                        f'"{name}" = excluded."{name}"' for name in names if name not in replace_on
                    ),
                )
                if unless_newer is not None:
                    # UTC text of one format on SQLite: ordered as the times are.
                    statement += (
                        f' WHERE NOT ("{table.name}"."{unless_newer}" > excluded."{unless_newer}")'
                    )
            values = _sqlite_rows(table, names, chunk)
            driver = await _driver(connection)
            cursor = await driver.executemany(statement, values)
            await cursor.close()
        elif unless_newer is not None:
            upsert = postgresql.insert(table)
            await connection.execute(
                upsert.on_conflict_do_update(
                    index_elements=list(replace_on),
                    set_={n: upsert.excluded[n] for n in chunk[0] if n not in replace_on},
                    where=~(table.c[unless_newer] > upsert.excluded[unless_newer]),
                ),
                chunk,
            )
        elif replace_on:
            await store.upsert(session, _MODELS[table.name], chunk)
        else:
            await connection.execute(insert(table), list(chunk))
        written += len(chunk)
    return written


#: The tables a shard's process fills (``replay.Shard``): copied into the rebuild's.
SHARD_TABLES: tuple[Table, ...] = (
    _INBOX,
    store.CASES,
    store.CONSENTS,
    store.FACTS,
    store.REFERRALS,
)


class ShardsOverlap(Exception):
    """The shards of a rebuild may have judged an event otherwise than one process reading
    everything (:class:`ShardWitness`; or two shards wrote a row with the same key): the
    rebuild is rolled back and done by one process."""


async def copy_shard(session: AsyncSession, path: Path) -> None:
    """Copy the rows of a shard's SQLite file into the session's SQLite database. Both were
    written the same way (:func:`_insert`), so the stored values are copied as they are,
    by the driver's own thread reading the file (no row passes through Python objects of
    this process's loop); :class:`ShardsOverlap` on a duplicate key."""
    driver = await _driver(await session.connection())
    # Read in the driver's thread, not this one's: allowed explicitly.
    source = sqlite3.connect(path, check_same_thread=False)
    try:
        for table in SHARD_TABLES:
            names = ", ".join(f'"{column.name}"' for column in table.columns)
            marks = ", ".join("?" for _ in table.columns)
            rows = source.execute(f"SELECT {names} FROM {table.name}")
            try:
                cursor = await driver.executemany(
                    f"INSERT INTO {table.name} ({names}) VALUES ({marks})", rows
                )
            except sqlite3.IntegrityError as exc:
                raise ShardsOverlap(f"{table.name}: {exc}") from exc
            await cursor.close()
    finally:
        source.close()


async def _driver(connection: AsyncConnection) -> Any:
    """The SQLite connection's own driver (aiosqlite), for statements that skip
    SQLAlchemy's per-value processing."""
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    return driver


async def write_cells(session: AsyncSession, cells: dict[CellKey, Accumulated]) -> None:
    """Store the cells' sums and median histograms (empty tables: plain inserts)."""
    await _insert(session, store.CELLS, store.cell_rows(cells))
    await _insert(session, store.NUMBERS, store.number_rows(cells))


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
    inputs = CellsByYear(cells)
    for year in range(domain.year_of(oldest), domain.year_of(newest) + 1):
        in_year, stock = inputs.of(year)
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
    revision = await store.revision(session) + 1
    await _insert(
        session,
        store.KPIS,
        (
            {
                "bezirk": cell.bezirk,
                "period": cell.period,
                "figure": cell.figure.value,
                "dimension": cell.dimension or "",
                "value": cell.value,
                "suppressed": cell.suppressed,
                "unit": cell.unit.value,
                "computed_at": now,
                "revision": revision,
            }
            for cell in changed
        ),
        replace_on=("bezirk", "period", "figure", "dimension"),
    )
    await store.set_state(session, store.REVISION, str(revision))
    outbox = runtime.outbox
    if KpiUpdated.event_type in runtime.registry.routed_types():
        # Audience copies are the outbox's business: the live publisher's way.
        add_kpi_events(runtime, session, changed, now)
        return len(changed)
    writer = KpiRecords(source=outbox.source, schema_base=outbox.schema_base, now=now)
    topic = outbox.topic_prefix + KpiUpdated.topic
    await _insert(session, _OUTBOX, (writer.outbox_row(cell, topic) for cell in changed))
    return len(changed)
