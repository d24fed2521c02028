"""The revision that moves the Träger's answers into the main consumer's inbox: the answers
applied before the change are found by ``main`` (and skipped when its first start reads the
answer topics from their beginning), nothing else moves, and the downgrade gives them back."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator

import pytest
from alembic.migration import MigrationContext
from alembic.operations import Operations
from lotse_runtime.db import Database
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.migrations import create_schema, service_tables
from sqlalchemy import Connection, select

pytestmark = pytest.mark.integration

REVISION = importlib.import_module(
    "lotse_referrals.migrations.versions.referrals_7d41c2e9b853_answers_read_by_main"
)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_schema(database, service_tables("referrals"), service="referrals")
    yield database
    await database.dispose()


def _entry(consumer: str, source: str, event_id: str) -> InboxEntry:
    return InboxEntry(
        consumer=consumer, source=source, event_id=event_id, event_type="x", topic="t",
        partition=0, offset=1,
    )  # fmt: skip


async def _run(db: Database, step: str) -> None:
    def run(conn: Connection) -> None:
        with Operations.context(MigrationContext.configure(conn)):
            getattr(REVISION, step)()

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def _entries(db: Database) -> set[tuple[str, str, str]]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(InboxEntry.consumer, InboxEntry.source, InboxEntry.event_id)  # type: ignore[call-overload]
        )
        return {(c, s, e) for c, s, e in rows}


async def test_answers_applied_before_are_known_to_the_main_consumer(db: Database) -> None:
    async with db.transaction() as session:
        session.add(_entry("referrals.partners", "/partner/awo-dortmund", "answer-1"))
        session.add(_entry("referrals.main", "/lotse/intake", "registered-1"))
        session.add(_entry("visits.main", "/partner/awo-dortmund", "answer-1"))  # not ours
    await _run(db, "upgrade")
    assert await _entries(db) == {
        ("referrals.main", "/partner/awo-dortmund", "answer-1"),
        ("referrals.main", "/lotse/intake", "registered-1"),
        ("visits.main", "/partner/awo-dortmund", "answer-1"),
    }
    await _run(db, "downgrade")
    assert await _entries(db) == {
        ("referrals.partners", "/partner/awo-dortmund", "answer-1"),
        ("referrals.main", "/lotse/intake", "registered-1"),
        ("visits.main", "/partner/awo-dortmund", "answer-1"),
    }
