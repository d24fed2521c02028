"""What one database statement costs the calling service, layer by layer, on SQLite and PostgreSQL.

The services spend much of their CPU per family in database statements (see
docs/performance.md): this names the floor under each way of issuing one, measured in the
same run, on a real table of the referrals service (``referrals_case``), inside a
transaction, as the services issue them:

  driver          the database's own driver: sqlite3 on the event loop's thread (as Lotse's
                  SQLite connection runs statements inside a transaction), asyncpg with its
                  statement cache
  core prebuilt   SQLAlchemy Core through the service's AsyncSession, the statement built once
                  (bound parameters)
  core per call   the same statement built at every call, as most service code does
  orm get         ``session.get(Model, key)`` for a row not yet in the session
  orm select      ``select(Model).where(...)`` and ``scalar_one()``
  insert …        one row: the driver, a Core INSERT built once, the same through
                  ``lotse_runtime.db.run_prebuilt`` (Lotse's own path to the driver),
                  ``session.add`` + ``flush``
  transaction     a whole transaction of one prebuilt read (``Database.transaction``), against
                  BEGIN, the read and COMMIT on the driver

CPU is this process's (user and kernel, ``time.process_time``) per statement, the median of
three rounds; a PostgreSQL server's own CPU is not in it (SQLite runs in the process, so it
is). Services run on uvloop, so this does too.

Usage:  uv run --frozen python bench/statement_cost.py [--calls 2000]
                                                       [--database sqlite|postgresql|both]
Prints a table and writes bench/results/statement_cost.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from lotse_referrals.tables import TABLES, Case  # noqa: TID251 - one real service table
from lotse_runtime.audit import AuditEntry
from lotse_runtime.db import Database, add_at_commit, run_prebuilt
from lotse_runtime.migrations import create_schema
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import bindparam, insert, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlmodel import col
from stack import DEFAULT_POSTGRES, RESULTS_DIR, machine

ROUNDS = 3
_TABLE = Case.__table__  # type: ignore[attr-defined]
_READ = select(_TABLE).where(_TABLE.c.case_id == bindparam("case_id"))
_INSERT = insert(_TABLE)
_COLUMNS = ("case_id", "bezirk", "registered_at")


def _row(case_id: str) -> dict[str, Any]:
    return {"case_id": case_id, "bezirk": "innenstadt-west", "registered_at": datetime.now(UTC)}


class Target:
    """One database: the service's Database (SQLAlchemy) and the driver beside it."""

    def __init__(self, kind: str, url: str, sqlite_path: str | None) -> None:
        self.kind = kind
        self.url = url
        self.sqlite_path = sqlite_path
        self.db = Database(url)
        self.ids: list[str] = []

    @property
    def placeholder(self) -> str:
        return "?" if self.kind == "sqlite" else "$1"

    async def prepare(self, rows: int) -> None:
        await create_schema(self.db, TABLES, service="referrals")
        self.ids = _new_ids(rows)
        async with self.db.transaction() as session:
            await session.execute(_INSERT, [_row(i) for i in self.ids])


def _new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


Layer = Callable[[Target, list[str]], Awaitable[None]]


async def _in_session(
    target: Target, ids: list[str], each: Callable[[AsyncSession, str], Any]
) -> None:
    async with target.db.transaction() as session:
        for case_id in ids:
            await each(session, case_id)


async def core_prebuilt(target: Target, ids: list[str]) -> None:
    async def each(session: AsyncSession, case_id: str) -> None:
        (await session.execute(_READ, {"case_id": case_id})).one()

    await _in_session(target, ids, each)


async def core_per_call(target: Target, ids: list[str]) -> None:
    async def each(session: AsyncSession, case_id: str) -> None:
        (await session.execute(select(_TABLE).where(_TABLE.c.case_id == case_id))).one()

    await _in_session(target, ids, each)


async def orm_get(target: Target, ids: list[str]) -> None:
    async def each(session: AsyncSession, case_id: str) -> None:
        assert await session.get(Case, case_id) is not None

    await _in_session(target, ids, each)


async def orm_select(target: Target, ids: list[str]) -> None:
    async def each(session: AsyncSession, case_id: str) -> None:
        (await session.execute(select(Case).where(col(Case.case_id) == case_id))).scalar_one()

    await _in_session(target, ids, each)


async def insert_core(target: Target, ids: list[str]) -> None:
    async def each(session: AsyncSession, case_id: str) -> None:
        await session.execute(_INSERT, _row(case_id))

    await _in_session(target, ids, each)


async def insert_driver_path(target: Target, ids: list[str]) -> None:
    async def each(session: AsyncSession, case_id: str) -> None:
        await run_prebuilt(session, _INSERT, [_row(case_id)])

    await _in_session(target, ids, each)


async def insert_orm(target: Target, ids: list[str]) -> None:
    async def each(session: AsyncSession, case_id: str) -> None:
        session.add(Case(**_row(case_id)))
        await session.flush()

    await _in_session(target, ids, each)


async def transaction_core(target: Target, ids: list[str]) -> None:
    for case_id in ids:
        async with target.db.transaction() as session:
            (await session.execute(_READ, {"case_id": case_id})).one()


async def transaction_rows_at_commit(target: Target, ids: list[str]) -> None:
    """What a use case's commit writes: its own row, an audit entry and an outbox row, the
    three added at commit (lotse_runtime.db.add_at_commit)."""
    for case_id in ids:
        now = datetime.now(UTC)
        async with target.db.transaction() as session:
            add_at_commit(
                session,
                Case(**_row(case_id)),
                AuditEntry(
                    at=now, service="bench", action="create", case_id=case_id, purpose="bench"
                ),
                OutboxMessage(
                    topic="lotse.referrals",
                    record_key=case_id,
                    value=b'{"case_id": "' + case_id.encode() + b'"}',
                    headers="[]",
                    event_id=case_id,
                    event_type="bench",
                    created_at=now,
                ),
            )


async def _driver(
    target: Target, ids: list[str], statement: str, write: bool, per_tx: bool
) -> None:
    """The same work on the bare driver: one transaction (or one per statement)."""
    if target.kind == "sqlite":
        assert target.sqlite_path is not None
        connection = sqlite3.connect(target.sqlite_path, isolation_level=None)
        try:
            if not per_tx:
                connection.execute("BEGIN IMMEDIATE")
            for case_id in ids:
                if per_tx:
                    connection.execute("BEGIN IMMEDIATE")
                if write:
                    row = _row(case_id)
                    connection.execute(statement, [row[c] for c in _COLUMNS])
                else:
                    assert connection.execute(statement, (case_id,)).fetchone() is not None
                if per_tx:
                    connection.execute("COMMIT")
            if not per_tx:
                connection.execute("ROLLBACK" if write else "COMMIT")
        finally:
            connection.close()
        return
    pg = await asyncpg.connect(target.url)
    try:
        if per_tx:
            for case_id in ids:
                async with pg.transaction():
                    assert await pg.fetchrow(statement, case_id) is not None
            return
        transaction = pg.transaction()
        await transaction.start()
        for case_id in ids:
            if write:
                row = _row(case_id)
                await pg.execute(statement, *[row[c] for c in _COLUMNS])
            else:
                assert await pg.fetchrow(statement, case_id) is not None
        await transaction.rollback()
    finally:
        await pg.close()


def _driver_read(per_tx: bool) -> Layer:
    async def run(target: Target, ids: list[str]) -> None:
        statement = f"SELECT * FROM referrals_case WHERE case_id = {target.placeholder}"
        await _driver(target, ids, statement, write=False, per_tx=per_tx)

    return run


async def driver_insert(target: Target, ids: list[str]) -> None:
    marks = ", ".join("?" if target.kind == "sqlite" else f"${n + 1}" for n in range(len(_COLUMNS)))
    statement = f"INSERT INTO referrals_case ({', '.join(_COLUMNS)}) VALUES ({marks})"
    await _driver(target, ids, statement, write=True, per_tx=False)


#: (name, layer, the driver layer it is compared with)
LAYERS: list[tuple[str, Layer, str]] = [
    ("read: driver", _driver_read(per_tx=False), "read: driver"),
    ("read: core prebuilt", core_prebuilt, "read: driver"),
    ("read: core per call", core_per_call, "read: driver"),
    ("read: orm get", orm_get, "read: driver"),
    ("read: orm select", orm_select, "read: driver"),
    ("insert: driver", driver_insert, "insert: driver"),
    ("insert: core prebuilt", insert_core, "insert: driver"),
    ("insert: lotse run_prebuilt", insert_driver_path, "insert: driver"),
    ("insert: orm add+flush", insert_orm, "insert: driver"),
    (
        "transaction of one read: driver",
        _driver_read(per_tx=True),
        "transaction of one read: driver",
    ),
    ("transaction of one read: core", transaction_core, "transaction of one read: driver"),
    (
        "transaction, rows at commit in 3 tables",
        transaction_rows_at_commit,
        "transaction of one read: driver",
    ),
]


async def measure(target: Target, calls: int) -> dict[str, Any]:
    await target.prepare(calls)
    figures: dict[str, Any] = {}
    try:
        for name, layer, _base in LAYERS:
            # Inserts need fresh keys each round; reads use the same rows.
            rounds = []
            for _round in range(ROUNDS):
                fresh = "insert" in name or "at commit" in name
                await layer(target, _new_ids(50) if fresh else target.ids[:50])  # warm caches
                ids = _new_ids(calls) if fresh else target.ids
                started = time.process_time()
                await layer(target, ids)
                rounds.append(1e6 * (time.process_time() - started) / len(ids))
            figures[name] = round(statistics.median(rounds), 1)
    finally:
        await target.db.dispose()
    return {
        name: {
            "us_per_statement": figures[name],
            "x_driver": round(figures[name] / figures[base], 1),
        }
        for name, _layer, base in LAYERS
    }


async def _postgres_database(admin_url: str) -> tuple[str, Callable[[], Awaitable[None]]]:
    """A database of its own on the server of ``admin_url``, and how to drop it."""
    name = f"bench_stmt_{uuid.uuid4().hex[:8]}"
    server = make_url(admin_url).set(drivername="postgresql")
    admin = create_async_engine(
        server.set(drivername="postgresql+asyncpg"), isolation_level="AUTOCOMMIT"
    )
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))

    async def drop() -> None:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()

    return server.set(database=name).render_as_string(hide_password=False), drop


async def run(databases: list[str], calls: int, postgres_url: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in databases:
        if kind == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "statements.db")
                results[kind] = await measure(Target(kind, f"sqlite:///{path}", path), calls)
        else:
            url, drop = await _postgres_database(postgres_url)
            try:
                results[kind] = await measure(Target(kind, url, None), calls)
            finally:
                await drop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="statements per layer and round")
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES,
        help="a PostgreSQL server's database to create the bench's own database from",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "statement_cost.json")
    args = parser.parse_args()
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    load = os.getloadavg()
    results = uvloop.run(run(databases, args.calls, args.postgres_url))
    document = {
        "benchmark": "statement_cost",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_at_start": [round(x, 2) for x in load],
        "calls_per_layer": args.calls,
        "rounds": ROUNDS,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"µs of this process's CPU per statement (median of {ROUNDS} rounds of {args.calls}),")
    print(f"and the multiple of the bare driver; load {load[0]:.2f} at start")
    names = [name for name, _layer, _base in LAYERS]
    print(f"{'':36}" + "".join(f"{kind:>22}" for kind in databases))
    for name in names:
        figures = [results[kind][name] for kind in databases]
        cells = "".join(f"{f['us_per_statement']:>13.1f} ({f['x_driver']:>4.1f}×)" for f in figures)
        print(f"{name:36}{cells}")


if __name__ == "__main__":
    main()
