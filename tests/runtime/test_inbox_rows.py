"""The consumer's batch path writes inbox entries as plain tuples through the driver: what it
stores must be what an entry written by the ORM holds, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from lotse_contracts.events.visits import VisitScheduled
from lotse_runtime import inbox
from lotse_runtime.db import Database
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.migrations import create_schema
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_schema(database, [])
    yield database
    await database.dispose()


def _events(count: int) -> list[VisitScheduled]:
    return [
        VisitScheduled.example().model_copy(update={"visit_id": f"v-{n}", "staff_id": f"s-{n}"})
        for n in range(count)
    ]


async def test_batch_rows_store_what_an_orm_entry_holds(db: Database) -> None:
    events = [e.to_cloudevent() for e in _events(3)]
    before = datetime.now(UTC)
    async with db.transaction() as session:
        await inbox.record_rows(
            session, [inbox.row("visits.c", e, "t", 1, 10 + n) for n, e in enumerate(events[:2])]
        )
        inbox.record(
            session, consumer="visits.c", event=events[2], topic="t", partition=1, offset=12
        )
    async with db.transaction() as session:
        stored = (
            (await session.execute(select(InboxEntry).order_by(col(InboxEntry.offset))))
            .scalars()
            .all()
        )
        seen = await inbox.already_processed(session, consumer="visits.c", events=events)
    assert [
        (s.source, s.event_id, s.event_type, s.topic, s.partition, s.offset) for s in stored
    ] == [(e.source, e.id, e.type, "t", 1, 10 + n) for n, e in enumerate(events)]
    assert [s.data_sha256 for s in stored] == [inbox.fingerprint(e) for e in events]
    assert seen == {(e.source, e.id): inbox.fingerprint(e) for e in events}
    batch_time, orm_time = stored[0].processed_at, stored[2].processed_at
    assert stored[1].processed_at == batch_time  # one time for the batch's transaction
    # Read back like the ORM's own entry: same type, same awareness, taken in this test.
    assert type(batch_time) is type(orm_time)
    assert (batch_time.tzinfo is None) == (orm_time.tzinfo is None)
    aware = batch_time if batch_time.tzinfo else batch_time.replace(tzinfo=UTC)
    assert before <= aware <= datetime.now(UTC)


async def test_a_batch_row_keeps_the_primary_key(db: Database) -> None:
    event = _events(1)[0].to_cloudevent()
    async with db.transaction() as session:
        await inbox.record_rows(session, [inbox.row("visits.c", event, "t", 0, 1)])
    with pytest.raises(IntegrityError):
        async with db.transaction() as session:
            await inbox.record_rows(session, [inbox.row("visits.c", event, "t", 0, 2)])
    async with db.transaction() as session:
        await inbox.record_rows(session, [])
        entries = (await session.execute(select(InboxEntry))).scalars().all()
    assert [(e.offset, e.data_sha256) for e in entries] == [(1, inbox.fingerprint(event))]


async def test_the_batch_lookup_finds_entries_of_every_source_and_only_those(db: Database) -> None:
    first, second = (e.to_cloudevent() for e in _events(2))
    other = first.model_copy(update={"source": "/lotse/intake", "id": second.id})
    async with db.transaction() as session:
        await inbox.record_rows(
            session,
            [inbox.row("visits.c", first, "t", 0, 1), inbox.row("visits.c", other, "t", 0, 2)],
        )
        inbox.record(
            session, consumer="visits.other", event=second, topic="t", partition=0, offset=3
        )
    async with db.transaction() as session:
        seen = await inbox.already_processed(
            session, consumer="visits.c", events=[first, second, other]
        )
    # (visits, second.id) shares its id with the intake entry but was never applied here.
    assert seen == {
        (first.source, first.id): inbox.fingerprint(first),
        (other.source, other.id): inbox.fingerprint(other),
    }


async def test_the_batch_lookup_seeks_each_key_instead_of_walking_the_consumers_entries(
    sqlite_url: str,
) -> None:
    # Without the sources in the query SQLite can use only the key's first column: every batch
    # then reads each entry the consumer ever wrote.
    database = Database(sqlite_url)
    await create_schema(database, [])
    lookups: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM inbox" in statement:
            lookups.append((statement, parameters))

    event.listen(database.engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with database.transaction() as session:
            events = [e.to_cloudevent() for e in _events(3)]
            await inbox.already_processed(session, consumer="visits.c", events=events)
            [(statement, parameters)] = lookups
            connection = await session.connection()
            plan = await connection.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, tuple(parameters)
            )
            details = [str(row[-1]) for row in plan.all()]
    finally:
        await database.dispose()
    assert any("consumer=? AND source=? AND event_id=?" in d for d in details), details
