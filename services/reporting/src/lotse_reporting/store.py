"""Database side of the projections: load the rows events need, store what they changed, and
load the facts a year's figures are computed from. Used alike by the live consumer (one
event per transaction) and by the replay (a batch of events per transaction)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from lotse_contracts.events.reporting import KpiFigure
from lotse_runtime.db import (
    on_postgres,
    one_of,
    run_prebuilt,
    run_prebuilt_now,
    run_prebuilt_together,
    run_prebuilt_together_now,
)
from sqlalchemy import (
    Boolean,
    CompoundSelect,
    Float,
    Integer,
    Select,
    String,
    Table,
    and_,
    bindparam,
    cast,
    delete,
    event,
    false,
    func,
    literal,
    null,
    or_,
    select,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.types import TypeEngine
from sqlmodel import SQLModel, col

from lotse_reporting import domain
from lotse_reporting.domain import (
    STOCK_DELTA,
    Accumulated,
    CaseFacts,
    Cell,
    CellDelta,
    CellKey,
    ConsentFacts,
    Fact,
    FactKind,
    Needs,
    ReferralFacts,
    Snapshot,
    YearInputs,
)
from lotse_reporting.tables import (
    FACT_TABLES,
    ReportingCase,
    ReportingCell,
    ReportingCellNumber,
    ReportingConsent,
    ReportingDirtyYear,
    ReportingFact,
    ReportingKpi,
    ReportingReferral,
    ReportingState,
)

#: Bound parameters per IN list; well below SQLite's and asyncpg's limits.
CHUNK = 2000


def chunks(values: Iterable[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    """``values`` in lists of ``size``, read as they come (the replay streams millions)."""
    chunk: list[Any] = []
    for value in values:
        chunk.append(value)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _table(model: type[SQLModel]) -> Table:
    table = getattr(model, "__table__", None)
    assert isinstance(table, Table)
    return table


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite stores wall-clock text without a zone: always store UTC.
    return None if moment is None else moment.astimezone(UTC)


@functools.cache
def _upsert_statement(table: Table, dialect: str) -> Insert:
    """Insert, or update where the primary key exists; built once per table and backend
    (building it costs more than running it for one row)."""
    keys = [c.name for c in table.primary_key.columns]
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    update = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    if update:
        return stmt.on_conflict_do_update(index_elements=keys, set_=update)
    return stmt.on_conflict_do_nothing(index_elements=keys)


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


async def upsert(
    session: AsyncSession, model: type[SQLModel], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Insert rows, or update them where the primary key exists (one statement per batch)."""
    if not rows:
        return
    statement = _upsert_statement(_table(model), _dialect(session))
    for chunk in chunks(rows, 1000):
        await run_prebuilt(session, statement, chunk)


CASES = _table(ReportingCase)
CONSENTS = _table(ReportingConsent)
FACTS = _table(ReportingFact)
REFERRALS = _table(ReportingReferral)
KPIS = _table(ReportingKpi)
CELLS = _table(ReportingCell)
NUMBERS = _table(ReportingCellNumber)

# --- rows <-> facts (ORM objects or plain rows: both have the columns as attributes) ---

F = TypeVar("F", CaseFacts, ConsentFacts, Fact, ReferralFacts)
_COLUMNS: dict[type[Any], tuple[str, ...]] = {
    kind: tuple(f.name for f in fields(kind))
    for kind in (CaseFacts, ConsentFacts, Fact, ReferralFacts)
}


def _facts(kind: type[F], row: Any) -> F:
    """The facts of one row: the dataclass's fields are the table's columns."""
    return kind(**{name: getattr(row, name) for name in _COLUMNS[kind]})


def _case(row: Any) -> CaseFacts:
    return _facts(CaseFacts, row)


def _consent(row: Any) -> ConsentFacts:
    assert row.at is not None
    return _facts(ConsentFacts, row)


def _fact(row: Any) -> Fact:
    return _facts(Fact, row)


def _referral(row: Any) -> ReferralFacts:
    return _facts(ReferralFacts, row)


def _row(facts: CaseFacts | ConsentFacts | Fact | ReferralFacts) -> dict[str, Any]:
    """The row of some facts, times in UTC."""
    row = {name: getattr(facts, name) for name in _COLUMNS[type(facts)]}
    return {k: _utc(v) if isinstance(v, datetime) else v for k, v in row.items()}


# --- loading and storing what events touch ---------------------------------------------------


@functools.cache
def _where_in(table: Table, column: str, postgres: bool) -> Select[Any]:
    """The rows whose ``column`` is in the list bound as ``ids``; built once per dialect."""
    return select(table).where(one_of(table.c[column], "ids", postgres=postgres))


@functools.cache
def _facts_of_kind(postgres: bool) -> Select[Any]:
    return select(FACTS).where(
        FACTS.c.kind == bindparam("kind"), one_of(FACTS.c.ref, "ids", postgres=postgres)
    )


async def _rows_in(
    session: AsyncSession, table: Table, column: str, values: Iterable[str]
) -> list[Any]:
    rows: list[Any] = []
    for ids in chunks(values):
        rows.extend(
            await session.execute(_where_in(table, column, on_postgres(session)), {"ids": ids})
        )
    return rows


_CASE, _CONSENT, _FACT, _REFERRAL = range(4)
#: The union's columns: a tag saying which table a row comes from, then a slot per column.
_SLOTS = ("s0", "s1", "s2", "s3", "s4", "s5", "n", "b0", "b1", "d0", "d1")
_ROW_SLOTS: dict[int, tuple[tuple[str, str], ...]] = {
    _CASE: (
        ("case_id", "s0"),
        ("bezirk", "s1"),
        ("channel", "s2"),
        ("registered_month", "s3"),
        ("erased", "b0"),
        ("excluded", "b1"),
    ),
    _CONSENT: (
        ("case_id", "s0"),
        ("consent_id", "s1"),
        ("scope", "s2"),
        ("given", "b0"),
        ("at", "d0"),
    ),
    _FACT: (
        ("kind", "s0"),
        ("ref", "s1"),
        ("case_id", "s2"),
        ("bezirk", "s3"),
        ("month", "s4"),
        ("dimension", "s5"),
        ("number", "n"),
        ("at", "d0"),
        ("until", "d1"),
    ),
    _REFERRAL: (
        ("referral_id", "s0"),
        ("case_id", "s1"),
        ("bezirk", "s2"),
        ("module", "s3"),
        ("status", "s4"),
        ("open_escalation", "s5"),
    ),
}


@functools.cache
def _family_rows(postgres: bool) -> CompoundSelect[Any]:
    """Every row of the families bound as ``ids`` from the four tables in one statement (one
    round trip instead of four; on PostgreSQL the same SQL for any number of families). The
    fact select comes first: its columns give the union's types (times as UTC, booleans
    typed explicitly)."""
    tables = {_CASE: CASES, _CONSENT: CONSENTS, _FACT: FACTS, _REFERRAL: REFERRALS}
    typed: dict[str, TypeEngine[Any]] = {
        "s0": String(),
        "n": Float(),
        "b0": Boolean(),
        "b1": Boolean(),
        "d0": FACTS.c.at.type,
        "d1": FACTS.c.until.type,
    }
    selects = []
    for tag in (_FACT, _CASE, _CONSENT, _REFERRAL):
        table = tables[tag]
        filled = {slot: table.c[name] for name, slot in _ROW_SLOTS[tag]}
        columns = [literal(tag, Integer()).label("tag")]
        for slot in _SLOTS:
            column = filled.get(slot)
            kind = typed.get(slot, String())
            # A typed NULL: PostgreSQL matches the union's column types by them.
            filler = cast(null(), kind) if column is None else type_coerce(column, kind)
            columns.append(filler.label(slot))
        selects.append(select(*columns).where(one_of(table.c.case_id, "ids", postgres=postgres)))
    return union_all(*selects)


async def _load_families(session: AsyncSession, snapshot: Snapshot, ids: Iterable[str]) -> None:
    """Every row of these families into ``snapshot``."""
    await _load_family_rows(session, ids, lambda _case_id: snapshot)


async def load_families_apart(session: AsyncSession, ids: Collection[str]) -> dict[str, Snapshot]:
    """Every row of these families, in one query (per chunk of ids), each family in a
    snapshot of its own: what :func:`load_snapshot` loads for an event of that family
    alone, fact years left to :func:`note_fact_years`."""
    apart = {case_id: Snapshot() for case_id in ids}
    await _load_family_rows(session, ids, apart.__getitem__)
    return apart


async def _load_family_rows(
    session: AsyncSession, ids: Iterable[str], snapshot_of: Callable[[str], Snapshot]
) -> None:
    for chunk in chunks(ids, CHUNK // 4):
        for row in await session.execute(_family_rows(on_postgres(session)), {"ids": chunk}):
            mapping = row._mapping
            values = {name: mapping[slot] for name, slot in _ROW_SLOTS[mapping["tag"]]}
            snapshot = snapshot_of(values["case_id"])
            if mapping["tag"] == _FACT:
                fact = Fact(**values)
                snapshot.facts[fact.key] = fact
            elif mapping["tag"] == _CASE:
                snapshot.cases[values["case_id"]] = CaseFacts(**values)
            elif mapping["tag"] == _CONSENT:
                consent = ConsentFacts(**values)
                snapshot.consents[(consent.case_id, consent.consent_id)] = consent
            else:
                referral = ReferralFacts(**values)
                snapshot.referrals[referral.referral_id] = referral


async def load_snapshot(session: AsyncSession, needs: Needs) -> Snapshot:
    """The rows ``needs`` names (those that exist)."""
    snapshot = Snapshot()
    families = needs.families
    if families and needs.case_ids <= families and needs.consent_case_ids <= families:
        # The live consumer's event: its families' rows are all it needs.
        await _load_families(session, snapshot, families)
        note_fact_years(snapshot, needs)
        return snapshot
    for case_row in await _rows_in(session, CASES, "case_id", needs.case_ids):
        snapshot.cases[case_row.case_id] = _case(case_row)
    # A family's share is computed from all of its rows. Ids are pseudonymous UUIDs: the
    # consents, referrals and facts an event names belong to its family, whose rows are all
    # loaded here; only rows of other cases need a query of their own.
    consent_cases = needs.families | needs.consent_case_ids
    for consent_row in await _rows_in(session, CONSENTS, "case_id", consent_cases):
        consent = _consent(consent_row)
        snapshot.consents[(consent.case_id, consent.consent_id)] = consent
    if needs.families:
        referral_rows = await _rows_in(session, REFERRALS, "case_id", needs.families)
    else:
        referral_rows = await _rows_in(session, REFERRALS, "referral_id", needs.referral_ids)
    for referral_row in referral_rows:
        referral = _referral(referral_row)
        snapshot.referrals[referral.referral_id] = referral
    for fact_row in await _rows_in(session, FACTS, "case_id", needs.families):
        fact = _fact(fact_row)
        snapshot.facts[fact.key] = fact
    fact_keys: set[tuple[str, str]] = set()
    if not needs.families:
        fact_keys = {(str(kind), ref) for kind, ref in needs.fact_keys}
        fact_keys |= {
            (FactKind.ESCALATED.value, r.open_escalation)
            for r in snapshot.referrals.values()
            if r.open_escalation is not None
        }
    by_kind: dict[str, set[str]] = {}
    for kind, ref in fact_keys:
        by_kind.setdefault(str(kind), set()).add(ref)
    for kind, refs in by_kind.items():
        for chunk in chunks(refs):
            for fact_row in await session.execute(
                _facts_of_kind(on_postgres(session)), {"kind": kind, "ids": chunk}
            ):
                fact = _fact(fact_row)
                snapshot.facts[fact.key] = fact
    note_fact_years(snapshot, needs)
    return snapshot


def note_fact_years(snapshot: Snapshot, needs: Needs) -> None:
    """The years the families ``needs`` asks for have facts in, from their rows (all in
    ``snapshot``)."""
    for fact in snapshot.facts.values():
        if fact.case_id in needs.fact_years_of:
            snapshot.fact_years.setdefault(fact.case_id, set()).add(domain.year_of(fact.month))


async def save_snapshot(session: AsyncSession, snapshot: Snapshot) -> None:
    """Store the rows ``apply`` touched (on PostgreSQL the tables' upserts in one statement
    where they are few, as after one event: :func:`lotse_runtime.db.run_together`)."""
    pending = _RowsAtCommit()
    pending.add(snapshot)
    await run_prebuilt_together(session, pending.batches(_dialect(session)))


_ROWS_AT_COMMIT = "lotse_reporting_rows_at_commit"


@dataclass
class _RowsAtCommit:
    """Rows to store, by table and primary key: the last values a row was given."""

    by_table: dict[Table, dict[Any, dict[str, Any]]] = field(
        default_factory=lambda: {CASES: {}, CONSENTS: {}, FACTS: {}, REFERRALS: {}}
    )

    def add(self, snapshot: Snapshot) -> None:
        cases, consents = self.by_table[CASES], self.by_table[CONSENTS]
        facts, referrals = self.by_table[FACTS], self.by_table[REFERRALS]
        for case_id in snapshot.touched_cases:
            cases[case_id] = _row(snapshot.cases[case_id])
        for consent_key in snapshot.touched_consents:
            consents[consent_key] = _row(snapshot.consents[consent_key])
        for fact_key in snapshot.touched_facts:
            facts[fact_key] = _row(snapshot.facts[fact_key])
        for referral_id in snapshot.touched_referrals:
            referrals[referral_id] = _row(snapshot.referrals[referral_id])

    def batches(self, dialect: str) -> list[tuple[Insert, list[dict[str, Any]]]]:
        # In key order: two replicas' transactions take the rows' locks in the same order.
        return [
            (_upsert_statement(table, dialect), [rows[key] for key in sorted(rows)])
            for table, rows in self.by_table.items()
        ]


def save_snapshot_at_commit(session: AsyncSession, snapshot: Snapshot) -> None:
    """:func:`save_snapshot` when the transaction commits, for the live consumer's batch: a
    row several of its events touched is written once, with its last values, and each table's
    rows go together. Until then the rows are not in the database: whoever reads them inside
    the transaction writes them first (:func:`save_rows_now`)."""
    _held_until_commit(session, _ROWS_AT_COMMIT, _RowsAtCommit, _write_rows).add(snapshot)


_Held = TypeVar("_Held")


def _held_until_commit(
    session: AsyncSession, key: str, new: Callable[[], _Held], write: Callable[[Session], None]
) -> _Held:
    """What the transaction gathers under ``key`` for ``write`` to store before it commits:
    made, and the session's hooks registered, at first use; a rollback drops it."""
    sync = session.sync_session
    held: _Held | None = sync.info.get(key)
    if held is None:
        held = sync.info[key] = new()
        if not event.contains(sync, "before_commit", write):
            event.listen(sync, "before_commit", write)
        if not event.contains(sync, "after_transaction_end", _forget_held):
            event.listen(sync, "after_transaction_end", _forget_held)
    return held


def _forget_held(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_ROWS_AT_COMMIT, None)
        session.info.pop(_AT_COMMIT, None)


async def save_rows_now(session: AsyncSession) -> None:
    """Write what :func:`save_snapshot_at_commit` holds, before the transaction reads rows."""
    pending: _RowsAtCommit | None = session.sync_session.info.pop(_ROWS_AT_COMMIT, None)
    if pending is not None:
        await run_prebuilt_together(session, pending.batches(_dialect(session)))


def _write_rows(session: Session) -> None:
    pending: _RowsAtCommit | None = session.info.pop(_ROWS_AT_COMMIT, None)
    if pending is not None:
        run_prebuilt_together_now(session, pending.batches(session.get_bind().dialect.name))


async def mark_dirty(
    session: AsyncSession, years: Iterable[int], carrying: Iterable[int] = ()
) -> None:
    """Ask the publisher to recompute these years; in ``carrying`` the open-escalation stock
    changed, so every later year follows."""
    rows = _dirty_rows(years, carrying)
    if rows:
        await run_prebuilt(session, _mark_dirty_statement(_dialect(session)), rows)


def _dirty_rows(years: Iterable[int], carrying: Iterable[int]) -> list[dict[str, Any]]:
    carries = set(carrying)
    return [
        {"year": y, "version": 1, "carries": y in carries} for y in sorted(set(years) | carries)
    ]


@functools.cache
def _mark_dirty_statement(dialect: str) -> Insert:
    table = _table(ReportingDirtyYear)
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    return stmt.on_conflict_do_update(
        index_elements=["year"],
        set_={
            "version": table.c.version + 1,
            "carries": or_(table.c.carries, stmt.excluded.carries),
        },
    )


async def dirty_years(session: AsyncSession) -> dict[int, int]:
    """Years to recompute, with the version of their mark."""
    return {year: version for year, (version, _) in (await dirty_marks(session)).items()}


async def dirty_marks(session: AsyncSession) -> dict[int, tuple[int, bool]]:
    """Years to recompute: the version of their mark, and whether later years follow."""
    table = _table(ReportingDirtyYear)
    rows = await session.execute(
        select(table.c.year, table.c.version, table.c.carries).where(
            table.c.version != table.c.cleared
        )
    )
    return {year: (version, bool(carries)) for year, version, carries in rows}


@functools.cache
def _clear_statement() -> Update:
    table = _table(ReportingDirtyYear)
    return (
        update(table)
        .where(table.c.year == bindparam("y"), table.c.version == bindparam("v"))
        .values(cleared=table.c.version, carries=false())
    )


async def clear_dirty(session: AsyncSession, seen: Mapping[int, int]) -> None:
    """Clear the marks as read; a mark changed since then stays for the next pass. The row
    stays too, so its version never starts again at one (see :class:`ReportingDirtyYear`)."""
    if seen:
        rows = [{"y": year, "v": version} for year, version in sorted(seen.items())]
        await run_prebuilt(session, _clear_statement(), rows)


async def drop_facts(session: AsyncSession) -> None:
    """Forget every projected fact (before a rebuild)."""
    models: list[type[SQLModel]] = [*FACT_TABLES, ReportingDirtyYear]
    for model in models:
        await session.execute(delete(model))


# --- the cells: sums kept up to date by every event ------------------------------------------


async def add_to_cells(session: AsyncSession, deltas: Mapping[CellKey, CellDelta]) -> None:
    """Add to the cells (and their histograms) in the database itself: replicas applying
    events at the same time each add their part, none overwrites another's. Rows go in key
    order, so two transactions lock shared cells in the same order."""
    adding, adding_numbers = _add_statements(_dialect(session))
    for chunk in chunks(cell_rows(deltas), 1000):
        await run_prebuilt(session, adding, chunk)
    for chunk in chunks(number_rows(deltas), 1000):
        await run_prebuilt(session, adding_numbers, chunk)


def cell_rows(
    deltas: Mapping[CellKey, CellDelta | Accumulated],
) -> list[dict[str, Any]]:
    """Rows of the cells table: what to add to each cell, or (replay) its whole sums."""
    return [
        {
            "bezirk": key[0],
            "period": key[1],
            "figure": key[2],
            "dimension": key[3],
            "families": delta.families,
            "value": delta.value,
            "hits": delta.hits,
            "weight": delta.weight,
        }
        for key, delta in sorted(deltas.items())
    ]


def number_rows(
    deltas: Mapping[CellKey, CellDelta | Accumulated],
) -> list[dict[str, Any]]:
    """Rows of the histogram table, in the cells' key order."""
    return [
        {
            "bezirk": key[0],
            "period": key[1],
            "figure": key[2],
            "dimension": key[3],
            "number": number,
            "count": count,
        }
        for key, delta in sorted(deltas.items())
        for number, count in sorted(delta.numbers.items())
    ]


_AT_COMMIT = "lotse_reporting_cells_at_commit"


@dataclass
class _CellsAtCommit:
    deltas: dict[CellKey, CellDelta] = field(default_factory=dict)
    years: set[int] = field(default_factory=set)
    carrying: set[int] = field(default_factory=set)


def add_to_cells_at_commit(
    session: AsyncSession,
    deltas: Mapping[CellKey, CellDelta],
    years: Iterable[int],
    carrying: Iterable[int],
) -> None:
    """:func:`add_to_cells` and :func:`mark_dirty` when the transaction commits, summed over
    every event applied in it (the consumer applies a batch per transaction): one statement
    per table instead of three per event, and every transaction takes the cell locks in key
    order and the dirty marks last, so two replicas' batches cannot deadlock on them. Nothing
    reads the cells inside an applying transaction, and reporting's handlers open no
    savepoints; a rollback drops what was gathered."""
    pending = _held_until_commit(session, _AT_COMMIT, _CellsAtCommit, _flush_cells)
    for key, delta in deltas.items():
        found = pending.deltas.get(key)
        if found is None:
            found = pending.deltas[key] = CellDelta()
        found.families += delta.families
        found.value += delta.value
        found.hits += delta.hits
        found.weight += delta.weight
        for number, count in delta.numbers.items():
            found.numbers[number] = found.numbers.get(number, 0) + count
    pending.years.update(years)
    pending.carrying.update(carrying)


def _flush_cells(session: Session) -> None:
    pending: _CellsAtCommit | None = session.info.pop(_AT_COMMIT, None)
    if pending is None:
        return
    deltas = {}
    for key, delta in pending.deltas.items():
        delta.numbers = {n: c for n, c in delta.numbers.items() if c}
        if not delta.is_zero():
            deltas[key] = delta
    dialect = session.get_bind().dialect.name
    adding, adding_numbers = _add_statements(dialect)
    for chunk in chunks(cell_rows(deltas), 1000):
        run_prebuilt_now(session, adding, chunk)
    for chunk in chunks(number_rows(deltas), 1000):
        run_prebuilt_now(session, adding_numbers, chunk)
    run_prebuilt_now(
        session, _mark_dirty_statement(dialect), _dirty_rows(pending.years, pending.carrying)
    )


@functools.cache
def _add_statements(dialect: str) -> tuple[Insert, Insert]:
    """Upserts that add to a cell's sums and to its histogram; built once per backend."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    cells = insert(CELLS)
    numbers = insert(NUMBERS)
    return (
        cells.on_conflict_do_update(
            index_elements=["bezirk", "period", "figure", "dimension"],
            set_={
                name: CELLS.c[name] + cells.excluded[name]
                for name in ("families", "value", "hits", "weight")
            },
        ),
        numbers.on_conflict_do_update(
            index_elements=["bezirk", "period", "figure", "dimension", "number"],
            set_={"count": NUMBERS.c["count"] + numbers.excluded["count"]},
        ),
    )


async def year_cells(
    session: AsyncSession, year: int
) -> tuple[dict[CellKey, Accumulated], dict[tuple[str, str], Accumulated]]:
    """The cells of ``year``'s periods, and the open-escalation deltas of every month up to
    the year's end (the stock carries over from earlier years).

    One statement, so one snapshot of the database: a replica applying events meanwhile
    commits whole events, and the publisher sees each of them entirely or not at all (with
    separate statements, a median could come from a later state than its count)."""
    # Typed NULLs, so both backends agree on the union's column types.
    no_int, no_float = cast(null(), Integer), cast(null(), Float)
    sums = select(
        CELLS.c.bezirk,
        CELLS.c.period,
        CELLS.c.figure,
        CELLS.c.dimension,
        CELLS.c.families,
        CELLS.c.value,
        CELLS.c.hits,
        CELLS.c.weight,
        no_float.label("number"),
        no_int.label("count"),
    ).where(
        or_(
            and_(CELLS.c.period.like(f"{year}%"), CELLS.c.figure != STOCK_DELTA),
            and_(CELLS.c.figure == STOCK_DELTA, CELLS.c.period <= f"{year}-12"),
        )
    )
    histograms = select(
        NUMBERS.c.bezirk,
        NUMBERS.c.period,
        NUMBERS.c.figure,
        NUMBERS.c.dimension,
        no_int,
        no_float,
        no_int,
        no_float,
        NUMBERS.c.number,
        NUMBERS.c["count"],
    ).where(NUMBERS.c.period.like(f"{year}%"), NUMBERS.c["count"] != 0)
    cells: dict[CellKey, Accumulated] = {}
    stock: dict[tuple[str, str], Accumulated] = {}
    for row in await session.execute(union_all(sums, histograms)):
        bezirk, period, figure, dimension, families, value, hits, weight, number, count = row
        if figure == STOCK_DELTA:
            stock[(bezirk, period)] = Accumulated(families=families, value=value)
            continue
        found = cells.setdefault((bezirk, period, figure, dimension), Accumulated())
        if number is None:
            found.families, found.value, found.hits, found.weight = families, value, hits, weight
        else:
            found.numbers[number] = count
    return cells, stock


# --- state values ----------------------------------------------------------------------------

REVISION = "kpi_revision"
"""State key: the number of the last publication pass that published anything."""
HORIZON = "horizon"
"""State key: the newest month the published figures reach."""


STATE = _table(ReportingState)


@functools.cache
def _state_value() -> Select[Any]:
    return select(STATE.c.value).where(STATE.c.key == bindparam("key"))


async def get_state(session: AsyncSession, key: str) -> str | None:
    # A Core select, not Session.get: no ORM object to build and track for one value.
    value: str | None = await session.scalar(_state_value(), {"key": key})
    return value


async def set_state(session: AsyncSession, key: str, value: str) -> None:
    await upsert(session, ReportingState, [{"key": key, "value": value}])


async def revision(session: AsyncSession) -> int:
    """The revision of the last publication (0 before the first)."""
    return int(await get_state(session, REVISION) or 0)


# --- what the figures are computed from ------------------------------------------------------


async def horizon(session: AsyncSession) -> str | None:
    """The newest month with any fact (``YYYY-MM``), None without facts."""
    newest_fact = await session.scalar(select(func.max(col(ReportingFact.month))))
    newest_case = await session.scalar(select(func.max(ReportingCase.registered_month)))
    found = [m for m in (newest_fact, newest_case) if m]
    return max(found) if found else None


@functools.cache
def _bounds() -> Select[Any]:
    return select(
        select(func.max(FACTS.c.month)).scalar_subquery(),
        select(func.max(CASES.c.registered_month)).scalar_subquery(),
        select(func.min(FACTS.c.month)).scalar_subquery(),
        select(func.min(CASES.c.registered_month)).scalar_subquery(),
        select(STATE.c.value).where(STATE.c.key == HORIZON).scalar_subquery(),
    )


async def bounds(session: AsyncSession) -> tuple[str | None, int | None, str | None]:
    """:func:`horizon`, :func:`oldest_year` and the ``HORIZON`` state (the month the
    published figures reach) in one statement: a publication pass starts with them."""
    newest_fact, newest_case, oldest_fact, oldest_case, known = (
        await session.execute(_bounds())
    ).one()
    newest = [m for m in (newest_fact, newest_case) if m]
    oldest = [m for m in (oldest_fact, oldest_case) if m]
    return (
        max(newest) if newest else None,
        domain.year_of(min(oldest)) if oldest else None,
        known,
    )


async def oldest_year(session: AsyncSession) -> int | None:
    """The oldest year with any fact."""
    oldest_fact = await session.scalar(select(func.min(ReportingFact.month)))
    oldest_case = await session.scalar(select(func.min(ReportingCase.registered_month)))
    found = [m for m in (oldest_fact, oldest_case) if m]
    return domain.year_of(min(found)) if found else None


_CONTACTS = [FactKind.COMPLETED.value, FactKind.FIRST_CONTACT.value]


# Over 60 lines: one query per kind of input of compute_year, in the order YearInputs
# lists them; splitting them would only pass the same filters around.
async def load_year(session: AsyncSession, year: int, newest: str) -> YearInputs:
    """Every fact the figures of ``year`` depend on; facts of duplicate cases left out.

    Plain rows (Core selects), not ORM objects: a year of a big city is a lot of rows.
    """
    in_year = f"{year}-%"
    cohort_case = and_(CASES.c.registered_month.like(in_year), CASES.c.excluded == false())
    # Facts of a family nobody registered (yet) count; those of a duplicate never do.
    counted = or_(CASES.c.excluded.is_(None), CASES.c.excluded == false())
    with_case = FACTS.outerjoin(CASES, CASES.c.case_id == FACTS.c.case_id)
    cohort = [_case(row) for row in await session.execute(select(CASES).where(cohort_case))]
    consents = [
        _consent(row)
        for row in await session.execute(
            select(CONSENTS).join(CASES, CASES.c.case_id == CONSENTS.c.case_id).where(cohort_case)
        )
    ]
    cohort_contacts = [
        _fact(row)
        for row in await session.execute(
            select(FACTS)
            .join(CASES, CASES.c.case_id == FACTS.c.case_id)
            .where(cohort_case, FACTS.c.kind.in_(_CONTACTS))
        )
    ]
    activity: list[Fact] = []
    channels: dict[str, str] = {}
    for row in await session.execute(
        select(FACTS, CASES.c.channel.label("channel"))
        .select_from(with_case)
        .where(FACTS.c.month.like(in_year), FACTS.c.kind != FactKind.ESCALATED.value, counted)
    ):
        activity.append(_fact(row))
        if row.channel is not None:
            channels[row.case_id] = row.channel
    statuses: dict[str, str] = {}
    for referral_id, status in await session.execute(
        select(REFERRALS.c.referral_id, REFERRALS.c.status)
        .join(
            FACTS,
            and_(
                FACTS.c.ref == REFERRALS.c.referral_id,
                FACTS.c.kind == FactKind.REQUESTED.value,
            ),
        )
        .where(FACTS.c.month.like(in_year))
    ):
        statuses[referral_id] = status
    # Closed before the year began: cannot be open at any of its month ends.
    closed_before = datetime(year, 1, 1, tzinfo=UTC) - timedelta(days=1)
    escalations = [
        fact
        for fact in (
            _fact(row)
            for row in await session.execute(
                select(FACTS)
                .select_from(with_case)
                .where(
                    FACTS.c.kind == FactKind.ESCALATED.value,
                    FACTS.c.month <= f"{year}-12",
                    counted,
                )
            )
        )
        if fact.until is None or fact.until >= closed_before
    ]
    return YearInputs(
        year=year,
        horizon=newest,
        cohort=cohort,
        consents=consents,
        cohort_contacts=cohort_contacts,
        activity=activity,
        channels=channels,
        statuses=statuses,
        escalations=escalations,
    )


async def published_cells(
    session: AsyncSession, year: int, figures: Iterable[KpiFigure] | None = None
) -> dict[CellKey, tuple[float | None, bool]]:
    """What the reporting stream says for the periods of ``year`` (of ``figures`` only)."""
    statement = select(
        KPIS.c.bezirk,
        KPIS.c.period,
        KPIS.c.figure,
        KPIS.c.dimension,
        KPIS.c.value,
        KPIS.c.suppressed,
    ).where(KPIS.c.period.like(f"{year}%"))
    if figures is not None:
        statement = statement.where(KPIS.c.figure.in_(sorted(f.value for f in figures)))
    rows = await session.execute(statement)
    return {(b, p, f, d): (v, bool(s)) for b, p, f, d, v, s in rows}


async def save_cells(
    session: AsyncSession, cells: Sequence[Cell], now: datetime, revision: int
) -> None:
    """Record cells as published at ``now`` with ``revision``."""
    rows = [
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
        for cell in cells
    ]
    await upsert(session, ReportingKpi, rows)
    await set_state(session, REVISION, str(revision))


# --- what the API and the dashboard read: the published cells only ---------------------------


@dataclass(frozen=True)
class KpiFilter:
    """Which published cells a query wants (None: any)."""

    bezirk: str | None = None
    period: str | None = None
    year: int | None = None
    figure: KpiFigure | None = None
    dimension: str | None = None
    breakdowns: bool = True
    limit: int | None = None
    offset: int = 0


async def query_kpis(session: AsyncSession, wanted: KpiFilter) -> list[ReportingKpi]:
    """Published cells matching the filter, ordered by Bezirk, period, figure, dimension."""
    statement = select(ReportingKpi)
    if wanted.bezirk is not None:
        statement = statement.where(col(ReportingKpi.bezirk) == wanted.bezirk)
    if wanted.period is not None:
        statement = statement.where(col(ReportingKpi.period) == wanted.period)
    if wanted.year is not None:
        statement = statement.where(col(ReportingKpi.period).like(f"{wanted.year}%"))
    if wanted.figure is not None:
        statement = statement.where(col(ReportingKpi.figure) == wanted.figure.value)
    if wanted.dimension is not None:
        statement = statement.where(col(ReportingKpi.dimension) == wanted.dimension)
    elif not wanted.breakdowns:
        statement = statement.where(col(ReportingKpi.dimension) == "")
    statement = statement.order_by(
        col(ReportingKpi.bezirk),
        col(ReportingKpi.period),
        col(ReportingKpi.figure),
        col(ReportingKpi.dimension),
    ).offset(wanted.offset)
    if wanted.limit is not None:
        statement = statement.limit(wanted.limit)
    return list(await session.scalars(statement))


async def years_with_figures(session: AsyncSession) -> list[int]:
    periods = await session.scalars(select(func.substr(ReportingKpi.period, 1, 4)).distinct())
    return sorted({int(p) for p in periods})


async def published_since(session: AsyncSession, revision: int) -> list[ReportingKpi]:
    """Cells published after ``revision``, oldest first."""
    return list(
        await session.scalars(
            select(ReportingKpi)
            .where(col(ReportingKpi.revision) > revision)
            .order_by(col(ReportingKpi.revision))
        )
    )
