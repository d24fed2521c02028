"""The runtime's database layer: which errors count as a busy database, and SQLite under
concurrent writers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from lotse_runtime.db import (
    Database,
    add_at_commit,
    on_postgres,
    one_of,
    run_on_sqlite,
    transient_error,
)
from lotse_runtime.migrations import create_schema
from sqlalchemy import JSON, Column, event, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Field, SQLModel, UTCDateTime, col, func, select


class Tally(SQLModel, table=True):
    __tablename__ = "test_tally"

    id: int | None = Field(default=None, primary_key=True)
    seen_before: int


class Counted(SQLModel, table=True):
    """Sums an upsert adds to, by a key of text."""

    __tablename__ = "test_counted"

    key: str = Field(primary_key=True)
    n: int
    at: datetime = Field(sa_type=UTCDateTime)


class Stamped(SQLModel, table=True):
    """Columns with bind processors: a UTC time, a flag, a JSON document."""

    __tablename__ = "test_stamped"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=32)
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    flag: bool = False
    document: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def _wrapped(kind: type[Exception], orig: Exception) -> Exception:
    return kind("UPDATE x", {}, orig)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_wrapped(OperationalError, sqlite3.OperationalError("database is locked")), True),
        (_wrapped(OperationalError, sqlite3.OperationalError("database table is locked")), True),
        (_wrapped(OperationalError, sqlite3.OperationalError("no such table: x")), False),
        (_wrapped(OperationalError, sqlite3.OperationalError("too many SQL variables")), False),
        (_wrapped(IntegrityError, sqlite3.IntegrityError("UNIQUE constraint failed")), False),
        (_wrapped(OperationalError, _PgError("40001")), True),  # serialization_failure
        (_wrapped(OperationalError, _PgError("40P01")), True),  # deadlock_detected
        (_wrapped(OperationalError, _PgError("08006")), True),  # connection_failure
        (_wrapped(OperationalError, _PgError("57P01")), True),  # admin_shutdown
        (_wrapped(ProgrammingError, _PgError("42P01")), False),  # undefined_table
        (_wrapped(IntegrityError, _PgError("23505")), False),  # unique_violation
        (PoolTimeoutError("QueuePool limit reached"), True),
        (ConnectionError("keyring did not answer"), False),  # not the database's to judge
        (ValueError("bad data"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_which_errors_mean_a_busy_or_unreachable_database(
    error: Exception, transient: bool
) -> None:
    assert transient_error(error) is transient


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_schema(database, [Tally])
    yield database
    await database.dispose()


async def test_concurrent_read_then_write_transactions_all_commit(db: Database) -> None:
    """The pattern of nearly every Lotse transaction (read, then write inbox/outbox/audit).
    On SQLite a DEFERRED transaction fails at once with "database is locked" when another
    writer committed between its read and its write; opened IMMEDIATE, writers queue."""

    async def read_then_write() -> None:
        async with db.transaction() as session:
            seen = (await session.execute(select(func.count()).select_from(Tally))).scalar_one()
            await asyncio.sleep(0.01)  # another writer commits meanwhile
            session.add(Tally(seen_before=seen))

    await asyncio.gather(*(read_then_write() for _ in range(30)))
    async with db.transaction() as session:
        rows = list((await session.execute(select(Tally))).scalars())
    assert len(rows) == 30
    if not db.is_postgres:
        # Serialised: each transaction saw every earlier one.
        assert sorted(row.seen_before for row in rows) == list(range(30))


async def test_the_wal_checkpoint_after_an_erasure_empties_the_log(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every other transaction is opened IMMEDIATE; the checkpoint must not be (inside a
    transaction SQLite cannot truncate the log)."""
    db = Database(sqlite_url)
    wal = Path(sqlite_url.removeprefix("sqlite+aiosqlite:///") + "-wal")
    try:
        await create_schema(db, [Tally])
        async with db.transaction() as session:
            session.add(Tally(seen_before=0))
            db.forget_after_commit(session)
        assert db._background  # scheduled on commit
        await asyncio.gather(*db._background)
        # The pool's connections are still open, so the log file stays, emptied.
        assert await asyncio.to_thread(os.path.getsize, wal) == 0
        assert "WAL checkpoint after erasure failed" not in caplog.text
    finally:
        await db.dispose()


async def test_the_pool_holds_no_more_connections_than_configured(postgres_url: str) -> None:
    """Replicas x (pool size + overflow) must fit the server's max_connections: a transaction
    beyond the limit waits for a connection instead of opening another."""
    db = Database(postgres_url, pool_size=2, max_overflow=1)
    try:
        backends = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"

        async def hold(seconds: float) -> int:
            async with db.transaction() as session:
                await asyncio.sleep(seconds)
                return int((await session.execute(text(backends))).scalar_one())

        counts = await asyncio.gather(*(hold(0.3) for _ in range(6)))
        assert max(counts) <= 3
        assert db.engine.pool.size() == 2  # type: ignore[attr-defined]
    finally:
        await db.dispose()


async def test_statements_inside_a_sqlite_transaction_take_no_thread_hand_off(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a transaction (begun IMMEDIATE, so holding the write lock) statements run in the
    event loop's thread; only what may wait goes to the connection's thread (COMMIT here)."""
    import aiosqlite

    db = Database(sqlite_url)
    try:
        await create_schema(db, [Tally])
        handed_off: list[str] = []
        original = aiosqlite.Connection._execute

        async def counting(self: aiosqlite.Connection, fn: object, *args: object) -> object:
            handed_off.append(getattr(fn, "__name__", repr(fn)))
            return await original(self, fn, *args)  # type: ignore[no-untyped-call]

        monkeypatch.setattr(aiosqlite.Connection, "_execute", counting)
        async with db.transaction() as session:
            for seen in range(3):
                session.add(Tally(seen_before=seen))
                await session.flush()
            rows = (await session.execute(select(func.count()).select_from(Tally))).scalar_one()
        assert rows == 3
        assert handed_off == ["commit"]
    finally:
        await db.dispose()


def _statements_seen(db: Database) -> list[str]:
    """The first word of every statement SQLAlchemy executes on ``db`` from now on."""
    from sqlalchemy import event

    executed: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        executed.append(statement.split()[0].upper())

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    return executed


async def test_a_sqlite_transaction_begins_on_the_driver_when_the_lock_is_free(
    sqlite_url: str,
) -> None:
    """BEGIN IMMEDIATE does not go through SQLAlchemy's statement machinery when the write
    lock is free: SQLAlchemy executes only the transaction's own statements (held, see the
    next test)."""
    db = Database(sqlite_url)
    try:
        await create_schema(db, [Tally])
        executed = _statements_seen(db)
        async with db.transaction() as session:
            session.add(Tally(seen_before=0))
        assert executed == ["INSERT"]
        async with db.transaction() as session:
            assert (await session.execute(select(func.count()).select_from(Tally))).scalar() == 1
        assert executed == ["INSERT", "SELECT"]
    finally:
        await db.dispose()


async def test_a_transaction_waiting_for_the_sqlite_write_lock_leaves_the_event_loop_free(
    sqlite_url: str,
) -> None:
    """BEGIN IMMEDIATE runs in the event loop's thread only when the lock is free at once;
    held by another connection, it takes SQLAlchemy's statement path and waits in the
    connection's thread (busy_timeout)."""
    db = Database(sqlite_url)
    path = sqlite_url.removeprefix("sqlite+aiosqlite:///")
    try:
        await create_schema(db, [Tally])
        executed = _statements_seen(db)
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")

        async def write() -> None:
            async with db.transaction() as session:
                session.add(Tally(seen_before=0))

        writer = asyncio.create_task(write())
        ticks = 0
        while ticks < 20:  # the loop keeps turning while the writer waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert not writer.done()
        holder.execute("COMMIT")
        holder.close()
        await writer
        assert executed == ["BEGIN", "INSERT"]
        async with db.transaction() as session:
            count = (await session.execute(select(func.count()).select_from(Tally))).scalar_one()
        assert count == 1
    finally:
        await db.dispose()


async def _end_pooled_sessions(postgres_url: str) -> int:
    """What a database restart does to a pool: every session it holds is gone."""
    admin = Database(postgres_url)
    try:
        async with admin.autocommit() as conn:
            ended = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            return len(ended.scalars().all())
    finally:
        await admin.dispose()


@contextlib.asynccontextmanager
async def _pinging(postgres_url: str, after_s: float) -> AsyncIterator[Database]:
    """A PostgreSQL database whose pool pings connections idle for ``after_s``."""
    db = Database(postgres_url, ping_after_idle_s=after_s)
    try:
        await create_schema(db, [Tally])
        yield db
    finally:
        await db.dispose()


async def _count(db: Database) -> int:
    async with db.transaction() as session:
        return int((await session.execute(select(func.count()).select_from(Tally))).scalar_one())


async def test_a_connection_idle_past_the_ping_age_is_pinged_and_replaced(
    postgres_url: str,
) -> None:
    async with _pinging(postgres_url, after_s=0.2) as db:
        assert await _count(db) == 0  # a connection now waits in the pool
        assert await _end_pooled_sessions(postgres_url) >= 1
        await asyncio.sleep(0.3)
        # Pinged at checkout, found dead, replaced: the transaction never sees it.
        assert await _count(db) == 0


async def test_a_connection_broken_before_its_ping_age_fails_one_transaction_as_transient(
    postgres_url: str,
) -> None:
    """No ping under load: the first transaction on a broken connection fails as transient
    (retried by consumers, 503 with Retry-After over HTTP), and the whole pool is renewed, so
    the next transaction works and nothing was written by the failed one."""
    async with _pinging(postgres_url, after_s=3600) as db:

        async def four_at_once() -> None:
            async def hold() -> None:
                async with db.transaction() as session:
                    await session.execute(text("SELECT pg_sleep(0.05)"))

            await asyncio.gather(*(hold() for _ in range(4)))

        await four_at_once()  # four connections wait in the pool
        assert await _end_pooled_sessions(postgres_url) >= 4
        with pytest.raises(DBAPIError) as failed:
            async with db.transaction() as session:
                session.add(Tally(seen_before=1))
        assert transient_error(failed.value)
        await four_at_once()  # every connection of the pool was replaced, none fails
        assert await _count(db) == 0


async def test_rows_added_at_commit_get_generated_keys_and_go_with_a_rolled_back_savepoint(
    db: Database,
) -> None:
    class Undone(Exception):
        pass

    async with db.transaction() as session:
        add_at_commit(session, Tally(seen_before=1), Tally(seen_before=2))
        with contextlib.suppress(Undone):
            async with session.begin_nested():
                add_at_commit(session, Tally(seen_before=3))
                raise Undone
        # Not flushed: nothing of them is in the database before the commit.
        assert await session.scalar(select(func.count()).select_from(Tally)) == 0
    async with db.transaction() as session:
        rows = list((await session.execute(select(Tally).order_by(col(Tally.id)))).scalars())
    assert [row.seen_before for row in rows] == [1, 2]
    assert all(row.id is not None for row in rows)
    assert len({row.id for row in rows}) == 2


async def test_rows_added_at_commit_go_to_the_driver_and_store_what_the_orm_stores(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At commit the rows go straight to the driver (SQLAlchemy executes no INSERT of its
    own: on SQLite on the connection, on PostgreSQL through the asyncpg adapter's cursor),
    through the columns' own bind processors: stored as the ORM stores the same values."""
    from sqlalchemy.engine import Connection

    db = Database(database_url)
    at = datetime(2025, 3, 3, 9, 15, 0, 123456, tzinfo=timezone(timedelta(hours=1)))

    def stamped(key: str) -> Stamped:
        return Stamped(key=key, at=at, flag=True, document={"zone": "Hörde", "n": [1, 2]})

    try:
        await create_schema(db, [Stamped])
        # Seen where SQLAlchemy hands statements to the driver (an engine listener would
        # itself send the rows SQLAlchemy's way, so that tracing sees them).
        # Counted where SQLAlchemy executes a statement (an engine listener would itself
        # send the rows SQLAlchemy's way, so that tracing sees them).
        executed: list[str] = []
        original = Connection._execute_context

        def counting(
            self: Connection, dialect: Any, constructor: Any, statement: Any, *a: Any, **k: Any
        ) -> Any:
            executed.append(str(statement).split()[0].upper())
            return original(self, dialect, constructor, statement, *a, **k)

        monkeypatch.setattr(Connection, "_execute_context", counting)
        async with db.transaction() as session:
            session.add(stamped("orm"))
        assert executed == ["INSERT"]
        async with db.transaction() as session:
            add_at_commit(session, stamped("at-commit"))
            add_at_commit(session, stamped("at-commit-2"))
        assert executed == ["INSERT"]  # none more
        async with db.autocommit() as conn:
            stored = (
                await conn.exec_driver_sql(
                    "SELECT key, at, flag, document FROM test_stamped ORDER BY id"
                )
            ).all()
        assert [row[0] for row in stored] == ["orm", "at-commit", "at-commit-2"]
        assert stored[1][1:] == stored[0][1:] == stored[2][1:]
        async with db.transaction() as session:
            read = (
                await session.execute(select(Stamped).where(col(Stamped.key) == "at-commit"))
            ).scalar_one()
        assert read.at == at.astimezone(UTC)
        assert (read.flag, read.document) == (True, {"zone": "Hörde", "n": [1, 2]})
    finally:
        await db.dispose()


async def test_a_taken_key_at_commit_fails_the_transaction_as_sqlalchemy_reports_it(
    database_url: str,
) -> None:
    """On both databases: an IntegrityError (what callers catch for a lost race), and
    nothing of the transaction stays."""
    db = Database(database_url)
    at = datetime(2025, 3, 3, 8, 15, tzinfo=UTC)
    try:
        await create_schema(db, [Stamped, Tally])
        async with db.transaction() as session:
            add_at_commit(session, Stamped(key="taken", at=at))

        async def clash() -> None:
            async with db.transaction() as session:
                session.add(Tally(seen_before=7))
                add_at_commit(session, Stamped(key="free", at=at), Stamped(key="taken", at=at))

        with pytest.raises(IntegrityError):
            await clash()
        async with db.transaction() as session:
            keys = (await session.execute(select(col(Stamped.key)))).scalars().all()
        assert keys == ["taken"]
        assert await _count(db) == 0
    finally:
        await db.dispose()


async def test_rows_added_at_commit_are_seen_by_statement_listeners(sqlite_url: str) -> None:
    """While statements are observed (tracing's engine hooks), the INSERT at commit goes
    SQLAlchemy's way, so it is seen like every other statement."""
    db = Database(sqlite_url)
    try:
        await create_schema(db, [Stamped])
        executed = _statements_seen(db)
        async with db.transaction() as session:
            add_at_commit(session, Stamped(key="seen", at=datetime(2025, 3, 3, tzinfo=UTC)))
        assert executed == ["INSERT"]
    finally:
        await db.dispose()


async def test_prebuilt_upserts_and_updates_run_on_the_sqlite_driver_as_sqlalchemy_runs_them(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upsert that adds to a row and an UPDATE with bound parameters (as reporting's cells
    and dirty marks are written) give the same rows on the driver as through SQLAlchemy; a
    statement that needs what the rows do not hold is left to SQLAlchemy."""
    from sqlalchemy import bindparam, update
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    table = Tally.__table__  # type: ignore[attr-defined]
    upsert = sqlite_insert(table)
    adding = upsert.on_conflict_do_update(
        index_elements=["id"],
        set_={"seen_before": table.c.seen_before + upsert.excluded.seen_before},
    )
    doubling = (
        update(table)
        .where(table.c.id == bindparam("key"))
        .values(seen_before=table.c.seen_before * bindparam("factor"))
    )
    rows = [{"id": 1, "seen_before": 2}, {"id": 2, "seen_before": 5}, {"id": 1, "seen_before": 3}]

    async def written(url: str, on_driver: bool) -> list[tuple[Any, ...]]:
        db = Database(url)
        try:
            await create_schema(db, [Tally])
            async with db.transaction() as session:
                sync = (await session.connection()).sync_connection
                assert sync is not None
                for statement, values in ((adding, rows), (doubling, [{"key": 1, "factor": 10}])):
                    if not on_driver:
                        await session.execute(statement, values)
                    else:
                        assert run_on_sqlite(sync, statement, values)
                # Wants "factor", which the row does not hold: SQLAlchemy's to run.
                assert not run_on_sqlite(sync, doubling, [{"key": 2}])
            async with db.transaction() as session:
                found = await session.execute(select(col(Tally.id), col(Tally.seen_before)))
                return sorted(tuple(row) for row in found.all())
        finally:
            await db.dispose()

    through_sqlalchemy = await written(sqlite_url, on_driver=False)
    assert through_sqlalchemy == [(1, 50), (2, 5)]
    assert (
        await written(sqlite_url.replace(".db", "-driver.db"), on_driver=True) == through_sqlalchemy
    )


@pytest.fixture
def executemany_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of every asyncpg executemany from now on (counted, then run as it is)."""
    import asyncpg

    calls: list[str] = []
    original = asyncpg.Connection.executemany

    async def counted(self: asyncpg.Connection, command: str, args: Any, **kw: Any) -> Any:
        calls.append(command)
        return await original(self, command, args, **kw)

    monkeypatch.setattr(asyncpg.Connection, "executemany", counted)
    return calls


async def test_rows_for_several_tables_go_to_postgresql_in_one_statement(
    postgres_url: str, executemany_calls: list[str]
) -> None:
    """On PostgreSQL the rows added at commit to several tables go in one round trip (the
    tables' INSERTs as data-modifying CTEs of one statement): stored as the ORM stores them,
    each table's generated ids in the order the rows were added, and a taken key fails the
    whole transaction as before."""
    calls = executemany_calls
    db = Database(postgres_url)
    at = datetime(2025, 3, 3, 9, 15, 0, 123456, tzinfo=timezone(timedelta(hours=1)))

    def stamped(key: str, document: dict[str, Any] | None = None) -> Stamped:
        return Stamped(key=key, at=at, flag=True, document=document)

    try:
        await create_schema(db, [Stamped, Tally])
        async with db.transaction() as session:
            session.add(stamped("orm", {"zone": "Hörde"}))
        calls.clear()
        async with db.transaction() as session:
            add_at_commit(session, stamped("b", {"zone": "Hörde"}), stamped("a"))
            add_at_commit(session, Tally(seen_before=1))
            add_at_commit(session, stamped("c"), Tally(seen_before=2))
        assert len(calls) == 1
        assert calls[0].startswith("WITH")
        async with db.autocommit() as conn:
            stored = (
                await conn.exec_driver_sql(
                    "SELECT key, at, flag, document FROM test_stamped ORDER BY id"
                )
            ).all()
            tallies = (
                await conn.exec_driver_sql("SELECT seen_before FROM test_tally ORDER BY id")
            ).all()
        assert [row[0] for row in stored] == ["orm", "b", "a", "c"]
        assert stored[1][1:] == stored[0][1:]  # as the ORM stored the same values
        assert stored[2][1:3] == stored[0][1:3]
        assert list(stored[2])[3] is None
        assert [row[0] for row in tallies] == [1, 2]

        async def clash() -> None:
            async with db.transaction() as session:
                add_at_commit(session, Tally(seen_before=3), stamped("free"), stamped("a"))

        calls.clear()
        with pytest.raises(IntegrityError):
            await clash()
        assert len(calls) == 1
        async with db.transaction() as session:
            keys = (await session.execute(select(col(Stamped.key)))).scalars().all()
            count = await session.scalar(select(func.count()).select_from(Tally))
        assert sorted(keys) == ["a", "b", "c", "orm"]
        assert count == 2
    finally:
        await db.dispose()


async def test_rows_of_plain_columns_go_as_arrays_whatever_their_number(
    postgres_url: str, executemany_calls: list[str]
) -> None:
    """Rows of plain columns go as one array per column (the statement's SQL is the same
    for any number of rows), in the order they were added; rows that need a VALUES list
    (a JSON column here) are combined up to TOGETHER_MAX_ROWS, past it each table goes on
    its own."""
    calls = executemany_calls
    from lotse_runtime import db as db_module

    db = Database(postgres_url)
    at = datetime(2025, 3, 3, tzinfo=UTC)
    try:
        await create_schema(db, [Stamped, Tally])
        many = 3 * db_module.TOGETHER_MAX_ROWS
        for count in (1, many):
            calls.clear()
            async with db.transaction() as session:
                add_at_commit(session, *(Tally(seen_before=n) for n in range(count)))
                add_at_commit(session, Stamped(key=f"one-{count}", at=at, document={"n": count}))
            assert len(calls) == 1
            assert "unnest" in calls[0]
        assert len({call for call in calls}) == 1
        async with db.autocommit() as conn:
            seen = (
                await conn.exec_driver_sql("SELECT seen_before FROM test_tally ORDER BY id")
            ).all()
        assert [row[0] for row in seen] == [0, *range(many)]

        listed = db_module.TOGETHER_MAX_ROWS + 1
        calls.clear()
        async with db.transaction() as session:
            add_at_commit(session, Tally(seen_before=-1))
            add_at_commit(session, *(Stamped(key=f"k{n}", at=at) for n in range(listed)))
        assert len(calls) == 2
        assert not any(call.startswith("WITH") for call in calls)
        async with db.transaction() as session:
            stored = await session.scalar(select(func.count()).select_from(Stamped))
        assert stored == 2 + listed
    finally:
        await db.dispose()


async def test_upserts_of_several_tables_run_together_as_one_after_the_other(
    database_url: str, executemany_calls: list[str]
) -> None:
    """run_prebuilt_together: an upsert and a plain INSERT of two tables change the rows as
    the two statements one after the other do (on PostgreSQL in one round trip)."""
    calls = executemany_calls
    from lotse_runtime.db import run_prebuilt_together
    from sqlalchemy import insert as plain_insert
    from sqlalchemy.dialects import postgresql, sqlite

    db = Database(database_url)
    at = datetime(2025, 3, 3, 8, 15, tzinfo=UTC)
    table = Stamped.__table__  # type: ignore[attr-defined]
    tally = Tally.__table__  # type: ignore[attr-defined]

    try:
        await create_schema(db, [Stamped, Tally])
        flavour = postgresql if db.is_postgres else sqlite
        upsert = flavour.insert(table)
        upsert = upsert.on_conflict_do_update(
            index_elements=["key"], set_={"flag": upsert.excluded.flag, "at": upsert.excluded.at}
        )
        async with db.transaction() as session:
            add_at_commit(session, Stamped(key="kept", at=at), Stamped(key="changed", at=at))
        later = at + timedelta(hours=1)
        calls.clear()
        async with db.transaction() as session:
            await run_prebuilt_together(
                session,
                [
                    (
                        upsert,
                        [
                            {"key": "changed", "at": later, "flag": True, "document": None},
                            {"key": "new", "at": later, "flag": True, "document": {"a": 1}},
                        ],
                    ),
                    (plain_insert(tally), [{"seen_before": 4}]),
                    (plain_insert(tally).values(seen_before=0), []),  # nothing: left out
                ],
            )
        assert len(calls) == (1 if db.is_postgres else 0)
        async with db.transaction() as session:
            rows = (await session.execute(select(Stamped).order_by(col(Stamped.key)))).scalars()
            stored = {s.key: (s.at, s.flag, s.document) for s in rows}
            seen = (await session.execute(select(col(Tally.seen_before)))).scalars().all()
        assert stored == {
            "changed": (later, True, None),
            "kept": (at, False, None),
            "new": (later, True, {"a": 1}),
        }
        assert seen == [4]
    finally:
        await db.dispose()


async def test_a_list_parameter_finds_the_same_rows_and_on_postgresql_keeps_one_sql(
    database_url: str,
) -> None:
    """``one_of``: IN a list bound when the statement runs. On PostgreSQL the list is one
    array, so lists of any length share one SQL text (asyncpg prepares each text once per
    connection); SQLite expands the list."""
    db = Database(database_url)
    sent: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "test_tally" in statement and statement.lstrip().startswith("SELECT"):
            sent.append(statement)

    try:
        await create_schema(db, [Tally])
        async with db.transaction() as session:
            session.add_all(Tally(seen_before=n) for n in range(10))
        event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
        found: dict[int, list[int]] = {}
        for wanted in ([], [3], [1, 4, 7, 99], [9, 0]):
            async with db.transaction() as session:
                postgres = on_postgres(session)
                query = select(col(Tally.seen_before)).where(
                    one_of(col(Tally.seen_before), "wanted", postgres=postgres)
                )
                rows = await session.execute(query, {"wanted": wanted})
                found[len(wanted)] = sorted(rows.scalars())
        assert found == {0: [], 1: [3], 4: [1, 4, 7], 2: [0, 9]}
        assert postgres == database_url.startswith("postgresql")
        if postgres:
            assert len(sent) == 4
            assert len(set(sent)) == 1
            assert "ANY" in sent[0]
        else:
            assert len(set(sent)) == 4  # one IN list per length
    finally:
        await db.dispose()


async def test_an_upsert_of_many_rows_runs_once_as_arrays_and_adds_as_one_per_row_would(
    database_url: str, executemany_calls: list[str]
) -> None:
    """run_prebuilt of an upsert that adds to the stored sums (as reporting's cells do): on
    PostgreSQL rows naming each key once go as one array per column, executed once, not once
    per row; rows naming a key twice go one per row, each seeing the one before. Both store
    what one statement per row stores."""
    from lotse_runtime.db import run_prebuilt
    from sqlalchemy.dialects import postgresql, sqlite

    calls = executemany_calls
    db = Database(database_url)
    table = Counted.__table__  # type: ignore[attr-defined]
    at = datetime(2025, 3, 3, 8, 15, tzinfo=UTC)
    try:
        await create_schema(db, [Counted])
        flavour = postgresql if db.is_postgres else sqlite
        adding = flavour.insert(table)
        adding = adding.on_conflict_do_update(
            index_elements=["key"],
            set_={"n": table.c.n + adding.excluded.n, "at": adding.excluded.at},
        )
        later = at + timedelta(minutes=5)
        async with db.transaction() as session:
            await run_prebuilt(session, adding, [{"key": "a", "n": 1, "at": at}])
        calls.clear()
        async with db.transaction() as session:
            await run_prebuilt(
                session,
                adding,
                [{"key": k, "n": n, "at": later} for k, n in (("a", 10), ("b", 2), ("c", 3))],
            )
        distinct_calls = list(calls)
        calls.clear()
        async with db.transaction() as session:
            await run_prebuilt(
                session,
                adding,
                [{"key": "b", "n": 5, "at": later}, {"key": "b", "n": 7, "at": later}],
            )
        async with db.transaction() as session:
            rows = (await session.execute(select(Counted).order_by(col(Counted.key)))).scalars()
            stored = {r.key: (r.n, r.at) for r in rows}
        assert stored == {"a": (11, later), "b": (14, later), "c": (3, later)}
        if db.is_postgres:
            assert len(distinct_calls) == 1
            assert "unnest" in distinct_calls[0]
            assert "ON CONFLICT" in distinct_calls[0]
            assert len(calls) == 1
            assert "unnest" not in calls[0]
    finally:
        await db.dispose()
