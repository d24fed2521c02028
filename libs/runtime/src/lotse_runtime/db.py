"""Async database access for one service: PostgreSQL in production, SQLite embedded.

Every service owns its database. Its schema is the service's own tables plus the runtime's
outbox and inbox tables; :func:`lotse_runtime.migrations.create_schema` migrates to exactly
those (Alembic), so services that share one Python process (tests) never create each other's
tables. This module imports nothing of the migrations (they build on it, not the reverse).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import operator
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    Float,
    Insert,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Table,
    any_,
    bindparam,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.dml import OnConflictClause
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.util import immutabledict

_log = logging.getLogger(__name__)


class DatabaseConfigError(ValueError):
    """The database URL names a backend Lotse does not run on."""


def async_url(url: str) -> str:
    """Normalise a URL to the async driver: postgresql:// → asyncpg, sqlite:// → aiosqlite."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    else:
        raise DatabaseConfigError(
            f"database URL {parsed.render_as_string(hide_password=True)!r}: "
            "only postgresql and sqlite are supported"
        )
    return parsed.render_as_string(hide_password=False)


#: How long a SQLite transaction waits for the write lock before it fails as busy.
SQLITE_BUSY_TIMEOUT_MS = 15_000

_BEGIN = "BEGIN IMMEDIATE"

# SQLite's words for lock contention (SQLITE_BUSY, SQLITE_LOCKED); other OperationalErrors such
# as "no such table" or "too many SQL variables" would fail again the same way.
_SQLITE_BUSY_WORDS = ("database is locked", "database table is locked", "database is busy")


class _StatementResult:
    """What SQLAlchemy reads of a cursor after a statement, taken in the driver's thread."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        self.arraysize = cursor.arraysize


class _OneHandOffCursor(AsyncAdapt_aiosqlite_cursor):
    """A statement in one hand-off to the connection's thread.

    aiosqlite hands each cursor call to its thread on its own: open, execute, fetch and close
    are four round trips through the event loop per SELECT. Here the thread runs them as one
    call and returns the rows with what SQLAlchemy reads of the cursor afterwards.
    """

    __slots__ = ()

    def __init__(self, adapt_connection: AsyncAdapt_aiosqlite_connection) -> None:
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        # The slots SQLAlchemy's cursor adapter declares, holding plain values here: the
        # last statement's _StatementResult instead of a driver cursor.
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = immutabledict()
        self._rows = collections.deque()

    @property
    def description(self) -> Any:
        return None if self._cursor is None else self._cursor.description

    @property
    def rowcount(self) -> int:
        return -1 if self._cursor is None else self._cursor.rowcount

    @property
    def lastrowid(self) -> Any:
        return None if self._cursor is None else self._cursor.lastrowid

    async def _async_soft_close(self) -> None:
        return None  # nothing stays open in the thread

    def _inline_connection(self) -> sqlite3.Connection | None:
        """The sqlite3 connection, when a statement can run right here in the event loop's
        thread instead of being handed to the connection's own thread.

        That is inside a transaction: every Lotse transaction on SQLite begins IMMEDIATE
        (:func:`_sqlite_begin`), so it already holds the write lock and none of its statements
        can wait for a lock (in WAL mode readers never wait either). What may wait stays in
        the thread: BEGIN (the write lock, up to busy_timeout), COMMIT (its fsync), and
        statements outside a transaction. A hand-off costs more CPU than a typical statement
        of a service (a few tens of microseconds in SQLite), two thread switches and a trip
        through the event loop.
        """
        sqlite = self._driver()
        return sqlite if sqlite is not None and sqlite.in_transaction else None

    def _driver(self) -> sqlite3.Connection | None:
        """The sqlite3 connection (None once closed)."""
        sqlite: sqlite3.Connection | None = self._connection._connection
        return sqlite

    def close(self) -> None:
        self._rows.clear()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        async with self._adapt_connection._execute_mutex:
            sqlite = self._inline_connection()
            if sqlite is not None:
                result, rows = _run_statement(sqlite, operation, parameters)
            elif operation == _BEGIN and (began := _begin_if_free(self._driver())) is not None:
                result, rows = began, []
            else:
                result, rows = await self._in_thread(_run_statement, operation, parameters)
            self._cursor = result  # type: ignore[assignment]
            self._rows = collections.deque(rows)
            return None

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        async with self._adapt_connection._execute_mutex:
            sqlite = self._inline_connection()
            if sqlite is not None:
                result, _ = _run_statements(sqlite, operation, seq_of_parameters)
            else:
                result, _ = await self._in_thread(_run_statements, operation, seq_of_parameters)
            self._cursor = result  # type: ignore[assignment]
            return None

    async def _in_thread(self, fn: Any, *args: Any) -> tuple[_StatementResult, list[Any]]:
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        # aiosqlite's own queue to its thread (the sqlite3 connection is bound to that thread).
        return await connection._execute(fn, connection._conn, *args)  # type: ignore[no-untyped-call,no-any-return]


def _begin_if_free(sqlite: sqlite3.Connection | None) -> _StatementResult | None:
    """BEGIN IMMEDIATE right here if the write lock is free now, else None (then the
    connection's thread waits for it, up to busy_timeout, while the event loop runs on)."""
    if sqlite is None or sqlite.in_transaction:
        return None
    sqlite.execute("PRAGMA busy_timeout=0")
    try:
        result, _ = _run_statement(sqlite, _BEGIN, None)
    except sqlite3.OperationalError as exc:
        if not any(word in str(exc).lower() for word in _SQLITE_BUSY_WORDS):
            raise
        return None
    finally:
        sqlite.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    return result


def _run_statement(
    connection: sqlite3.Connection, operation: str, parameters: Sequence[Any] | None
) -> tuple[_StatementResult, list[Any]]:
    cursor = connection.cursor()
    try:
        cursor.execute(operation, () if parameters is None else parameters)
        rows = cursor.fetchall() if cursor.description else []
        return _StatementResult(cursor), rows
    finally:
        cursor.close()


def _run_statements(
    connection: sqlite3.Connection, operation: str, seq_of_parameters: Sequence[Any]
) -> tuple[_StatementResult, list[Any]]:
    cursor = connection.cursor()
    try:
        cursor.executemany(operation, seq_of_parameters)
        return _StatementResult(cursor), []
    finally:
        cursor.close()


class _OneHandOffConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = _OneHandOffCursor  # type: ignore[assignment]

    @property
    def isolation_level(self) -> str | None:
        return self._connection.isolation_level  # type: ignore[no-any-return]

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        # Set around every autocommit use (the outbox relay's passes). Outside a transaction
        # setting it does nothing that could wait, so no hand-off; inside one it commits,
        # which stays in the connection's thread.
        sqlite: sqlite3.Connection | None = self._connection._connection
        if sqlite is not None and not sqlite.in_transaction:
            sqlite.isolation_level = value  # type: ignore[assignment]
            return
        AsyncAdapt_aiosqlite_connection.isolation_level.fset(self, value)  # type: ignore[attr-defined]

    def rollback(self) -> None:
        # The pool rolls back every connection it gets back, mostly after a commit: with no
        # transaction open there is nothing to roll back, and no reason for a hand-off.
        sqlite: sqlite3.Connection | None = self._connection._connection
        if sqlite is not None and not sqlite.in_transaction:
            return
        super().rollback()


class _OneHandOffDbapi(AsyncAdapt_aiosqlite_dbapi):
    """aiosqlite as SQLAlchemy adapts it, with statements in one hand-off each."""

    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        # The connection's thread opens it; statements inside a transaction run in the event
        # loop's thread (see _OneHandOffCursor._inline_connection), never both at once: one
        # session uses a connection at a time and awaits each call.
        kw["check_same_thread"] = False
        adapted = super().connect(*arg, **kw)
        return _OneHandOffConnection(self, adapted._connection)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling would open transactions DEFERRED; _sqlite_begin
    # opens them instead (see there).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the relay read while a request writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Freed row space is zeroed instead of lingering in the file: an erased family's bytes
    # (and a destroyed data key) must not be recoverable from free pages.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    """Open every SQLite transaction IMMEDIATE, i.e. with the write lock.

    A DEFERRED transaction that reads and then writes must upgrade its lock; in WAL mode that
    upgrade fails at once with "database is locked" when another connection committed in
    between, and busy_timeout does not apply to it. Nearly every Lotse transaction writes
    (inbox, outbox, audit), so taking the lock up front makes writers queue for up to
    busy_timeout instead of failing under load. Connections asked for AUTOCOMMIT (the WAL
    checkpoint) stay outside any transaction.
    """
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    # Straight on the driver when the lock is free (nearly always): as a statement through
    # SQLAlchemy, BEGIN cost about as much CPU as the transaction's own first statement.
    # The session has just checked the connection out, so nothing else is using it.
    if _begin_if_free(_sqlite3_of(conn)) is not None:
        return
    conn.exec_driver_sql(_BEGIN)


def one_of(column: Any, name: str, *, postgres: bool) -> ColumnElement[bool]:
    """``column IN (...)`` for a list bound as ``name`` when the statement runs. On
    PostgreSQL ``column = ANY(:name)`` with the list as one array parameter: the SQL is then
    the same for any number of values, while an expanding IN renders new SQL for each list
    length, and asyncpg prepares each distinct SQL on each connection (a round trip, and the
    server parses and plans it). Elsewhere an expanding IN (SQLite has no arrays)."""
    if postgres:
        return column == any_(bindparam(name, type_=ARRAY(column.type)))  # type: ignore[no-any-return]
    return column.in_(bindparam(name, expanding=True))  # type: ignore[no-any-return]


def on_postgres(session: AsyncSession | Session) -> bool:
    """Whether ``session`` talks to PostgreSQL (its statements may use :func:`one_of`'s
    arrays)."""
    bind = session.bind
    return bind is not None and bind.dialect.name == "postgresql"


_DEFERRED_ROWS = "lotse_deferred_rows"

#: A deferred row: its table, its values, and the savepoint it was added in (None: outside any).
_Deferred = tuple[Table, dict[str, Any], SessionTransaction | None]


def insert_at_commit(session: AsyncSession, table: Table, row: dict[str, Any]) -> None:
    """Add ``row`` to ``table`` when ``session``'s transaction commits, in one INSERT per
    table with every other row so added (ids in the order the rows were added).

    For append-only rows nobody reads back in the same transaction (outbox, audit). The ORM
    inserts rows with an autoincrement key one statement at a time on SQLite, as it must
    learn each key; these rows need no key back. Rows added inside a savepoint that rolls
    back are dropped with it; a rolled-back transaction inserts none.
    """
    sync_session = session.sync_session
    if not isinstance(sync_session, _DeferringSession) and not event.contains(
        sync_session, "before_commit", _insert_deferred
    ):
        # A session from elsewhere than Database.session: the hooks on this one only.
        event.listen(sync_session, "before_commit", _insert_deferred)
        event.listen(sync_session, "after_soft_rollback", _drop_rolled_back)
        event.listen(sync_session, "after_transaction_end", _forget_at_end)
    rows: list[_Deferred] = sync_session.info.setdefault(_DEFERRED_ROWS, [])
    rows.append((table, row, sync_session.get_nested_transaction()))


def add_at_commit(session: AsyncSession, *rows: Any) -> None:
    """:func:`insert_at_commit` for rows built as table models (SQLModel ``table=True``): their
    column values, a generated key left to the database. The models stay outside the session
    (nothing in the transaction may read the rows back); the ORM's unit of work would cost
    more than the INSERT, per row.

    Build such rows with ``Model.model_construct(...)``: a table model's constructor validates
    nothing either, but it prepares the instance for a session it never joins (~30 µs a row
    against ~5); a constructed row handed to ``session.add`` fails loudly."""
    for row in rows:
        table: Table = type(row).__table__
        generated = table.autoincrement_column
        values = {column.key: getattr(row, column.key) for column in table.columns}
        if generated is not None and values.get(generated.key) is None:
            del values[generated.key]
        insert_at_commit(session, table, values)


def _insert_deferred(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: its rows go with the enclosing transaction
    rows: list[_Deferred] = session.info.pop(_DEFERRED_ROWS, [])
    by_table: dict[Table, list[dict[str, Any]]] = {}
    for table, row, _savepoint in rows:
        by_table.setdefault(table, []).append(row)
    run_prebuilt_together_now(
        session, [(_insert_of(table), rows) for table, rows in by_table.items()]
    )


@functools.cache
def _insert_of(table: Table) -> Insert:
    return insert(table)


#: Rows one combined statement (:func:`run_together`) holds at most; more go one statement
#: per INSERT.
TOGETHER_MAX_ROWS = 40

#: The statements of one :func:`run_together` call with their rows.
Batches = Sequence[tuple[Insert, Sequence[Mapping[str, Any]]]]

#: A combined statement's shape: per INSERT, the statement, its columns and how many rows
#: (None: any number, as arrays).
_Shape = tuple[tuple[Insert, tuple[str, ...], int | None], ...]


def run_together(connection: Connection, batches: Batches) -> bool:
    """On PostgreSQL, several INSERTs built once (plain or upserts, each for its own table)
    in one statement, each a data-modifying CTE of it: one round trip instead of one per
    INSERT. A registration adds rows to eight tables, and each statement cost the service
    ~120 µs of CPU on its own (``bench/statement_cost.py``); asyncpg needs ~60 µs more per
    statement, ~18 µs more per row. False, and nothing done, elsewhere (SQLite's
    executemany costs a few µs per statement), when two INSERTs share a table, or when one
    INSERT's rows differ in their columns.

    An INSERT of columns of plain types, plain or an upsert whose rows name each conflict
    target once, takes its rows as one array per column (``INSERT ... SELECT
    unnest($1::VARCHAR[]), ...``): its SQL is the same for any number of rows, so a
    consumer's batch of a hundred inbox and outbox rows is one statement prepared once.
    Other rows (a JSON column, an upsert naming a target twice) get a VALUES list instead,
    up to TOGETHER_MAX_ROWS of them (the SQL differs by count; more: one statement per
    INSERT). Either way each INSERT's rows keep their order (generated ids rise as the
    rows were added). As in one multi-row upsert, one upsert's rows must not share a
    conflict key (the callers' rows come from maps keyed by it). Lotse's tables have no
    foreign keys; PostgreSQL would check those at the statement's end."""
    if connection.dialect.driver != "asyncpg" or _observed(connection):
        return False
    batches = [(statement, rows) for statement, rows in batches if rows]
    if not batches:
        return True
    if len({statement.table for statement, _ in batches}) < len(batches):
        return False
    shape: list[tuple[Insert, tuple[str, ...], int | None]] = []
    values: dict[str, Any] = {}
    listed = 0
    for number, (statement, rows) in enumerate(batches):
        keys = rows[0].keys()
        if any(row.keys() != keys for row in rows):
            return False
        arrays = _array_values(statement, tuple(keys), rows, number)
        if arrays is not None:
            shape.append((statement, tuple(keys), None))
            values.update(arrays)
            continue
        listed += len(rows)
        shape.append((statement, tuple(keys), len(rows)))
        for index, row in enumerate(rows):
            for key, value in row.items():
                values[_together_name(number, index, key)] = value
    if listed > TOGETHER_MAX_ROWS:
        return False
    if len(shape) == 1 and shape[0][2] is not None:
        return run_on_driver(connection, batches[0][0], batches[0][1])
    return run_on_driver(connection, _together_statement(tuple(shape)), [values])


#: Column types whose values go to PostgreSQL as arrays as they are (asyncpg encodes
#: arrays of them natively); JSON and the like are left to a VALUES list.
_ARRAY_TYPES = (String, Integer, Boolean, DateTime, Date, LargeBinary, Float, Numeric)


@functools.lru_cache(maxsize=256)
def _as_arrays(statement: Insert, keys: tuple[str, ...]) -> bool:
    """Whether an INSERT's rows may go as one array per column: an INSERT without values of
    its own, plain or an upsert (``ON CONFLICT``, see :func:`_targets_distinct`), of columns
    of plain types."""
    table = statement.table
    if not isinstance(table, Table):
        return False
    clause = statement._post_values_clause
    if clause is not None and not isinstance(clause, OnConflictClause):
        return False
    if statement._values or statement._multi_values:
        return False
    for key in keys:
        kind = table.c[key].type
        kind = getattr(kind, "impl", kind)  # a TypeDecorator: what it stores as
        if not isinstance(kind, _ARRAY_TYPES):
            return False
    return True


def _array_values(
    statement: Insert, keys: tuple[str, ...], rows: Sequence[Mapping[str, Any]], number: int
) -> dict[str, list[Any]] | None:
    """The rows (each with ``keys``) as one array per column, named for statement ``number``
    of a combined statement; None where they may not go so (:func:`_as_arrays`,
    :func:`_targets_distinct`)."""
    if not (_as_arrays(statement, keys) and _targets_distinct(statement, rows)):
        return None
    return {_together_name(number, None, key): [row[key] for row in rows] for key in keys}


def _targets_distinct(statement: Insert, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an upsert's rows name each conflict target once (always true of a plain
    INSERT). One statement may not update a row twice; one execution per row (executemany)
    may, each seeing the one before."""
    clause = statement._post_values_clause
    if not isinstance(clause, OnConflictClause):
        return True
    names = [getattr(e, "key", e) for e in clause.inferred_target_elements or ()]
    if not names or any(not isinstance(name, str) for name in names):
        return False
    getter = operator.itemgetter(*names)
    try:
        return len({getter(row) for row in rows}) == len(rows)
    except KeyError:
        return False


async def run_prebuilt_together(session: AsyncSession, batches: Batches) -> None:
    """:func:`run_prebuilt` for several INSERTs, in one statement where :func:`run_together`
    can (PostgreSQL), else one after the other."""
    batches = [(statement, rows) for statement, rows in batches if rows]
    if len(batches) > 1:
        connection = await session.connection()
        if await connection.run_sync(run_together, batches):
            return
    for statement, rows in batches:
        await run_prebuilt(session, statement, rows)


def run_prebuilt_together_now(session: Session, batches: Batches) -> None:
    """:func:`run_prebuilt_together` from inside the session's own hooks
    (``before_commit``), like :func:`run_prebuilt_now`."""
    batches = [(statement, rows) for statement, rows in batches if rows]
    if run_together(session.connection(), batches):
        return
    for statement, rows in batches:
        run_prebuilt_now(session, statement, rows)


def _together_name(statement: int, row: int | None, key: str) -> str:
    return f"t{statement}_{key}" if row is None else f"t{statement}_{row}_{key}"


@functools.lru_cache(maxsize=256)
def _together_statement(shape: _Shape) -> Insert:
    """The combined statement of a shape, built once (its SQL is then compiled once, and
    asyncpg prepares it once per connection)."""
    inserts = []
    for number, (statement, keys, count) in enumerate(shape):
        table = statement.table
        assert isinstance(table, Table)
        if count is None:
            columns = [
                func.unnest(
                    bindparam(_together_name(number, None, key), type_=ARRAY(table.c[key].type))
                )
                for key in keys
            ]
            inserts.append(statement.from_select(list(keys), select(*columns)))
            continue
        inserts.append(
            statement.values(
                [
                    {
                        key: bindparam(_together_name(number, index, key), type_=table.c[key].type)
                        for key in keys
                    }
                    for index in range(count)
                ]
            )
        )
    if len(inserts) == 1:
        return inserts[0]
    *first, last = inserts
    return last.add_cte(*(statement.cte(f"rows_{n}") for n, statement in enumerate(first)))


def run_on_sqlite(
    connection: Connection, statement: UpdateBase, values: Sequence[Mapping[str, Any]]
) -> bool:
    """On SQLite, run a DML statement built once (an INSERT, an upsert, an UPDATE with bound
    parameters; no RETURNING) for each of the rows with the driver's own executemany, on the
    event loop's thread like every statement inside a Lotse transaction (it holds the write
    lock since BEGIN IMMEDIATE). False, and nothing done, elsewhere; when the statement needs
    a value the rows do not hold (a column default SQLAlchemy computes); or while statements
    are observed: then the caller runs it through SQLAlchemy.

    The values go through the parameters' own bind processors, so the stored values are what
    SQLAlchemy stores; an error is raised as SQLAlchemy raises it (an IntegrityError for a
    taken key). Through SQLAlchemy's execution path a statement cost 70-100 µs of CPU,
    several times SQLite's own work, at every commit of every service."""
    driver = _sqlite_driver(connection)
    if driver is None or not values:
        return False
    prepared = _prepare(connection, statement, values)
    if prepared is None:
        return False
    _executemany(driver, *prepared)
    return True


def executemany_on_sqlite(connection: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> bool:
    """SQL in SQLite's own terms (positional ``?``, values as the driver stores them) for
    each of the rows, on the driver inside the connection's transaction; False (nothing
    done) where :func:`run_on_sqlite` would not run."""
    driver = _sqlite_driver(connection)
    if driver is None:
        return False
    _executemany(driver, sql, rows)
    return True


def _executemany(driver: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    try:
        driver.executemany(sql, rows)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, rows, exc, sqlite3.Error) from exc


def _sqlite_driver(connection: Connection) -> sqlite3.Connection | None:
    """The sqlite3 connection when statements may go to it directly: SQLite, inside a
    transaction (begun IMMEDIATE, so holding the write lock), nobody observing statements."""
    if connection.dialect.name != "sqlite" or _observed(connection):
        return None
    driver = _sqlite3_of(connection)
    return driver if driver is not None and driver.in_transaction else None


def _sqlite3_of(connection: Connection) -> sqlite3.Connection | None:
    """The sqlite3 connection behind a SQLAlchemy connection on SQLite (None once closed)."""
    adapted: Any = connection.connection.dbapi_connection
    driver: sqlite3.Connection | None = adapted._connection._connection
    return driver


def run_on_driver(
    connection: Connection, statement: UpdateBase, values: Sequence[Mapping[str, Any]]
) -> bool:
    """:func:`run_on_sqlite` on SQLite; on PostgreSQL the same through the asyncpg adapter's
    own cursor (its lock, its BEGIN, its error translation), without SQLAlchemy's execution
    context around it, and several rows of an INSERT as one array per column where
    :func:`run_together` would take them so (one execution instead of one per row). On
    PostgreSQL it must run inside SQLAlchemy's greenlet (a session event, or
    :meth:`AsyncConnection.run_sync`): the cursor waits for asyncpg there."""
    if connection.dialect.name == "sqlite":
        return run_on_sqlite(connection, statement, values)
    if connection.dialect.driver != "asyncpg" or not values or _observed(connection):
        return False
    keys = tuple(values[0].keys())
    if (
        len(values) > 1
        and isinstance(statement, Insert)
        and all(row.keys() == values[0].keys() for row in values)
        and (arrays := _array_values(statement, keys, values, 0)) is not None
    ):
        # One execution with an array per column: executemany has the server execute the
        # statement once per row (an upsert of a thousand cells, a thousand times).
        statement, values = _together_statement(((statement, keys, None),)), [arrays]
    prepared = _prepare(connection, statement, values)
    if prepared is None:
        return False
    sql, rows = prepared
    adapted: Any = connection.connection.dbapi_connection
    cursor = adapted.cursor()
    try:
        cursor.executemany(sql, rows)
    except connection.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(sql, rows, exc, connection.dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()
    return True


async def run_prebuilt(
    session: AsyncSession, statement: UpdateBase, values: Sequence[Mapping[str, Any]]
) -> None:
    """A DML statement built once, for each of the rows, in the session's transaction: on
    the driver where :func:`run_on_driver` can, else through SQLAlchemy."""
    connection = await session.connection()
    sync = connection.sync_connection
    if sync is not None and sync.dialect.name == "sqlite":
        done = run_on_sqlite(sync, statement, values)
    else:
        done = await connection.run_sync(run_on_driver, statement, values)
    if not done:
        await session.execute(statement, values)


def run_prebuilt_now(
    session: Session, statement: UpdateBase, values: Sequence[Mapping[str, Any]]
) -> None:
    """:func:`run_prebuilt` from inside the session's own hooks (``before_commit``), where
    the session is the synchronous one and already runs in SQLAlchemy's greenlet."""
    if values and not run_on_driver(session.connection(), statement, values):
        session.execute(statement, values)


def _observed(connection: Connection) -> bool:
    """Whether statements on ``connection`` are observed (tracing exports, a test listens):
    then SQLAlchemy runs them, so each is seen like every other statement."""
    dispatch = connection.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)


def _prepare(
    connection: Connection, statement: UpdateBase, values: Sequence[Mapping[str, Any]]
) -> tuple[str, list[Sequence[Any]]] | None:
    """The statement's SQL for the driver and the rows' values in its parameter order,
    through the bind processors; None when the rows differ in their keys or the statement
    needs more than they hold."""
    keys = values[0].keys()
    prepared = _driver_statement(statement, tuple(keys), connection.dialect)
    if prepared is None or any(row.keys() != keys for row in values):
        return None
    sql, take, processors = prepared
    rows: list[Sequence[Any]] = []
    for row in values:
        taken = take(row)
        for index, process in processors:
            taken[index] = process(taken[index])
        rows.append(taken)
    return sql, rows


@functools.lru_cache(maxsize=512)
def _driver_statement(
    statement: UpdateBase, keys: tuple[str, ...], dialect: Dialect
) -> (
    tuple[str, Callable[[Mapping[str, Any]], list[Any]], list[tuple[int, Callable[[Any], Any]]]]
    | None
):
    """``statement`` as the dialect's driver takes it for rows with ``keys``: its SQL, how to
    take a row's values in its positional order, and the bind processors by position; None
    when it needs a parameter the rows do not hold or renders per call (an expanding IN)."""
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    names = list(compiled.positiontup or ())
    if (
        not set(names) <= set(keys)
        or compiled.literal_execute_params
        or compiled.post_compile_params
    ):
        return None
    processors: list[tuple[int, Callable[[Any], Any]]] = [
        (index, process)
        for index, name in enumerate(names)
        if (process := compiled.binds[name].type._cached_bind_processor(dialect)) is not None
    ]
    getter = operator.itemgetter(*names)
    if len(names) == 1:
        return str(compiled), lambda row: [getter(row)], processors
    return str(compiled), lambda row: list(getter(row)), processors


def _drop_rolled_back(session: Session, transaction: SessionTransaction) -> None:
    if not transaction.nested:
        return  # the transaction's end forgets them
    rows: list[_Deferred] = session.info.get(_DEFERRED_ROWS, [])
    rows[:] = [entry for entry in rows if not _inside(entry[2], transaction)]


def _forget_at_end(session: Session, transaction: SessionTransaction) -> None:
    # Committed (then already inserted), rolled back or closed: nothing carries over to the
    # session's next transaction.
    if transaction.parent is None:
        session.info.pop(_DEFERRED_ROWS, None)


class _DeferringSession(Session):
    """The sessions of :class:`Database`, with :func:`insert_at_commit`'s hooks on the class:
    registering them on each session cost more than the rows' one INSERT saved."""


event.listen(_DeferringSession, "before_commit", _insert_deferred)
event.listen(_DeferringSession, "after_soft_rollback", _drop_rolled_back)
event.listen(_DeferringSession, "after_transaction_end", _forget_at_end)


def _inside(savepoint: SessionTransaction | None, transaction: SessionTransaction) -> bool:
    """Whether ``savepoint`` is ``transaction`` or was opened within it."""
    while savepoint is not None:
        if savepoint is transaction:
            return True
        savepoint = savepoint.parent
    return False


def transient_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a database error saying the database is busy or unreachable rather
    than that the work is wrong: retrying the same work later can succeed (lock contention, a
    lost connection, an exhausted pool, a serialisation conflict or deadlock on PostgreSQL).
    Errors from elsewhere (a handler's own HTTP call, say) are not judged here."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, OperationalError) and any(
            word in str(exc.orig).lower() for word in _SQLITE_BUSY_WORDS
        ):
            return True
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        # 40001 serialization_failure, 40P01 deadlock_detected, 08xxx connection exceptions,
        # 57P0x operator intervention (shutdown), 53xxx insufficient resources.
        if isinstance(code, str) and (
            code in ("40001", "40P01") or code[:2] in ("08", "53") or code.startswith("57P0")
        ):
            return True
    return False


#: PostgreSQL: a pooled connection unused for this long is pinged before it is handed out.
DEFAULT_PING_AFTER_IDLE_S = 10.0

_IDLE_SINCE = "lotse_idle_since"


class _PingWhenIdle:
    """Pool events: ping a PostgreSQL connection only when it sat in the pool for a while.

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout, and its asyncpg ping is three
    round trips (BEGIN, a query, ROLLBACK). Under load connections come back within
    milliseconds, and a connection that a restart or failover broke in between fails its
    first statement as a disconnect: SQLAlchemy then replaces every connection of the pool,
    and that one transaction fails as a transient error (a consumer retries its batch, HTTP
    answers 503 with Retry-After). A connection that waited longer than ``after_s`` (the
    quiet hours, when a restart is most likely to pass unnoticed) is pinged as before.
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s

    def rested(self, _dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        """A connection made or given back: idle from now on."""
        record.info[_IDLE_SINCE] = time.monotonic()

    def checked_out(
        self, dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
    ) -> None:
        idle_since = record.info.get(_IDLE_SINCE, 0.0)
        if time.monotonic() - idle_since < self.after_s:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:
            # The pool discards this connection and checks out another (or connects anew).
            raise DisconnectionError("pooled connection did not answer its ping") from exc


class Database:
    """Engine and sessions of one service database."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        pool_size: int = 20,
        max_overflow: int = 0,
        ping_after_idle_s: float = DEFAULT_PING_AFTER_IDLE_S,
    ) -> None:
        self.url = async_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect == "sqlite":
            database = parsed.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["module"] = _OneHandOffDbapi(aiosqlite, sqlite3)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
        else:
            ping = _PingWhenIdle(ping_after_idle_s)
            pool = self.engine.sync_engine.pool
            event.listen(pool, "connect", ping.rested)
            event.listen(pool, "checkin", ping.rested)
            event.listen(pool, "checkout", ping.checked_out)
        self._sessions = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=_DeferringSession
        )
        self._background: set[asyncio.Task[None]] = set()

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def session(self) -> AsyncSession:
        """A new session; use ``async with db.session() as s, s.begin(): ...``."""
        return self._sessions()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection outside any transaction: each statement commits on its own. On SQLite
        a read this way takes no write lock (see :func:`_sqlite_begin`)."""
        async with self.engine.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    def forget_after_commit(self, session: AsyncSession) -> None:
        """After `session` commits, drop superseded page images from SQLite's write-ahead log.

        Erasure overwrites a family's rows, but the WAL still holds the earlier versions of
        those pages until a checkpoint; a truncating checkpoint right after the commit removes
        them from disk. (PostgreSQL keeps dead tuples until VACUUM; its files are not a
        service's to manage, see docs/operations.md.)
        """
        if self.dialect != "sqlite":
            return

        def schedule(_session: Any) -> None:
            task = asyncio.get_running_loop().create_task(self._checkpoint())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        event.listen(session.sync_session, "after_commit", schedule, once=True)

    async def _checkpoint(self) -> None:
        try:
            async with self.autocommit() as conn:
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception:
            _log.warning("WAL checkpoint after erasure failed; the next one will catch up")

    async def ping(self) -> None:
        """Raise if the database does not answer a trivial query."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.engine.dispose()
