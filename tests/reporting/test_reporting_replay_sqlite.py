"""How the rebuild writes to SQLite straight through the driver: its rows must hold the text
the live path (SQLAlchemy's dialect) writes, and the wider page cache of its transaction
must not outlive it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from lotse_reporting.replay_rebuild import sqlite_cache
from lotse_reporting.tables import TABLES
from lotse_runtime.db import Database
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.migrations import create_schema
from sqlalchemy import insert, text

from tests.reporting.replay_data import bench_events, consumer_record, new_rebuild


async def _stored_times(url: str) -> tuple[set[str], set[str], str]:
    """(processed_at of the rebuild's inbox rows, ``at`` of its facts, processed_at of a row
    SQLAlchemy wrote), as the raw text SQLite holds."""
    db = Database(url)
    try:
        await create_schema(db, TABLES, service="reporting")
        rebuild = new_rebuild()
        records = [consumer_record(e, offset) for offset, e in enumerate(bench_events(300, 5))]
        async with db.transaction() as session:
            await rebuild.apply_batch(session, records)
            await rebuild.write_rows(session)
            await session.execute(
                insert(InboxEntry).values(
                    consumer="live",
                    source="/lotse/test",
                    event_id="1",
                    event_type="t",
                    topic="t",
                    partition=0,
                    offset=0,
                    # Not UTC: the dialect stores it converted.
                    processed_at=datetime(2025, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1))),
                )
            )
        async with db.transaction() as session:
            inbox = {
                str(t)
                for (t,) in await session.execute(
                    text("SELECT processed_at FROM inbox WHERE consumer = 'reporting.main'")
                )
            }
            facts = {
                str(t)
                for (t,) in await session.execute(
                    text("SELECT at FROM reporting_fact WHERE at IS NOT NULL")
                )
            }
            live = await session.scalar(
                text("SELECT processed_at FROM inbox WHERE consumer = 'live'")
            )
        return inbox, facts, str(live)
    finally:
        await db.dispose()


def test_the_rebuild_stores_times_as_the_dialect_does(sqlite_url: str) -> None:
    inbox, facts, live = asyncio.run(_stored_times(sqlite_url))
    assert live == "2025-03-01 12:00:00.000000"
    assert len(inbox) == 1  # one fetch, one time
    for stored in inbox | facts:
        moment = datetime.fromisoformat(stored)
        assert moment.tzinfo is None
        assert stored == moment.isoformat(" ", "microseconds")
    assert facts


async def _cache_sizes(url: str) -> tuple[int, int, int]:
    db = Database(url)
    try:
        async with db.transaction() as session:
            connection = await session.connection()
            size = "PRAGMA cache_size"
            before = (await connection.exec_driver_sql(size)).scalar_one()
            async with sqlite_cache(session, 4096):
                inside = (await connection.exec_driver_sql(size)).scalar_one()
            after = (await connection.exec_driver_sql(size)).scalar_one()
        return before, inside, after
    finally:
        await db.dispose()


def test_the_wider_cache_is_the_transactions_only(sqlite_url: str) -> None:
    before, inside, after = asyncio.run(_cache_sizes(sqlite_url))
    assert inside == -4096
    assert after == before != inside


def test_the_cache_is_left_alone_elsewhere(postgres_url: str) -> None:
    async def run() -> None:
        db = Database(postgres_url)
        try:
            async with db.transaction() as session, sqlite_cache(session):
                await session.execute(text("SELECT 1"))
        finally:
            await db.dispose()

    asyncio.run(run())  # PostgreSQL would refuse a PRAGMA
