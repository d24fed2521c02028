"""Schema migrations: the runtime's revisions and a service's own, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from lotse_runtime.db import Database
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.migrations import (
    RUNTIME_BASELINE,
    RUNTIME_VERSIONS,
    MigrationError,
    TableLike,
    check_migrations,
    create_schema,
    make_revision,
    runtime_tables,
    target_metadata,
)
from lotse_runtime.migrations.__main__ import main as migrations_cli
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel, col

RUNTIME_HEAD = "runtime_0004"  # audit log, its retention, the inbox fingerprint follow the baseline

pytestmark = pytest.mark.integration


class MigrationProbeItem(SQLModel, table=True):
    """A table of the imaginary service "probe", created by its revision probe_0001."""

    __tablename__ = "migration_probe_item"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)


class MigrationProbeNote(SQLModel, table=True):
    """Created by the probe's second revision, probe_0002."""

    __tablename__ = "migration_probe_note"

    id: int | None = Field(default=None, primary_key=True)
    body: str | None = None


class MigrationProbeDraft(SQLModel, table=True):
    """Declared by a service, but no revision creates it."""

    __tablename__ = "migration_probe_draft"

    id: int | None = Field(default=None, primary_key=True)


PROBE_TABLES: list[TableLike] = [MigrationProbeItem]

REVISION_1 = '''
    """Probe items."""

    import sqlalchemy as sa
    from alembic import op

    revision = "probe_0001"
    down_revision = None
    branch_labels = ("probe",)
    depends_on = None


    def upgrade() -> None:
        op.create_table(
            "migration_probe_item",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("name", sa.String(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index("ix_migration_probe_item_name", "migration_probe_item", ["name"])


    def downgrade() -> None:
        op.drop_index("ix_migration_probe_item_name", table_name="migration_probe_item")
        op.drop_table("migration_probe_item")
'''

REVISION_2 = '''
    """Probe notes."""

    import sqlalchemy as sa
    from alembic import op

    revision = "probe_0002"
    down_revision = "probe_0001"
    branch_labels = None
    depends_on = None


    def upgrade() -> None:
        op.create_table(
            "migration_probe_note",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("body", sa.String(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )


    def downgrade() -> None:
        op.drop_table("migration_probe_note")
'''


def write_revision(versions: Path, name: str, source: str) -> None:
    versions.mkdir(parents=True, exist_ok=True)
    (versions / name).write_text(textwrap.dedent(source).lstrip())


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


@pytest.fixture
def probe_versions(tmp_path: Path) -> Path:
    versions = tmp_path / "probe_versions"
    write_revision(versions, "probe_0001_items.py", REVISION_1)
    return versions


async def inspect_db(db: Database) -> dict[str, Any]:
    """Tables, their columns and indexes, and alembic_version, as the database reports them."""

    def read(conn: Connection) -> dict[str, Any]:
        inspector = inspect(conn)
        tables = set(inspector.get_table_names())
        versions: set[str] = set()
        if "alembic_version" in tables:
            versions = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
        return {
            "tables": tables,
            "columns": {t: {c["name"] for c in inspector.get_columns(t)} for t in tables},
            "indexes": {t: {i["name"] for i in inspector.get_indexes(t)} for t in tables},
            "pk": {t: inspector.get_pk_constraint(t)["constrained_columns"] for t in tables},
            "versions": versions,
        }

    async with db.engine.connect() as conn:
        found: dict[str, Any] = await conn.run_sync(read)
    return found


async def test_upgrade_creates_outbox_and_inbox_exactly(db: Database) -> None:
    result = await create_schema(db, [])
    schema = await inspect_db(db)
    assert schema["tables"] == {"outbox", "inbox", "audit_log", "alembic_version"}
    assert schema["columns"]["outbox"] == set(OutboxMessage.__table__.columns.keys())  # type: ignore[attr-defined]
    assert schema["columns"]["inbox"] == set(InboxEntry.__table__.columns.keys())  # type: ignore[attr-defined]
    assert schema["indexes"]["outbox"] == {"ix_outbox_sent_at"}
    assert schema["pk"]["inbox"] == ["consumer", "source", "event_id"]
    assert schema["pk"]["outbox"] == ["id"]
    assert schema["versions"] == {RUNTIME_HEAD}
    assert result.before == ()
    assert result.heads == (RUNTIME_HEAD,)
    assert result.unmigrated == []

    # The migrated tables work with the models: autoincrement ids, aware datetimes.
    async with db.transaction() as session:
        session.add(OutboxMessage(topic="t", headers="[]", event_id="e1", event_type="x"))
        session.add(OutboxMessage(topic="t", headers="[]", event_id="e2", event_type="x"))
        session.add(
            InboxEntry(
                consumer="c", source="/s", event_id="e1", event_type="x", topic="t",
                partition=0, offset=7,
            )
        )  # fmt: skip
    async with db.transaction() as session:
        query = select(col(OutboxMessage.id)).order_by(col(OutboxMessage.id))
        ids = list((await session.execute(query)).scalars())
        entry = await session.get(InboxEntry, ("c", "/s", "e1"))
    assert ids == [1, 2]
    assert entry is not None
    assert entry.offset == 7
    assert entry.processed_at.tzinfo is not None
    assert entry.processed_at <= datetime.now(UTC)


async def test_running_twice_is_a_no_op(db: Database) -> None:
    first = await create_schema(db, [])
    async with db.transaction() as session:
        session.add(OutboxMessage(topic="t", headers="[]", event_id="e1", event_type="x"))
    before = await inspect_db(db)
    second = await create_schema(db, [])
    assert second.before == first.heads == second.heads == (RUNTIME_HEAD,)
    assert await inspect_db(db) == before
    async with db.transaction() as session:
        assert len(list((await session.execute(select(OutboxMessage))).scalars())) == 1


async def test_migrated_runtime_tables_match_the_models(db: Database) -> None:
    await create_schema(db, [])
    assert await check_migrations(db, [], upgrade_first=False) == []

    # Not vacuous: a model the revisions do not create shows up.
    diffs = await check_migrations(db, [MigrationProbeDraft], upgrade_first=False)
    assert [(d[0], d[1].name) for d in diffs] == [("add_table", "migration_probe_draft")]


async def test_service_revisions_are_applied(db: Database, probe_versions: Path) -> None:
    result = await create_schema(db, PROBE_TABLES, service="probe", versions_dir=probe_versions)
    schema = await inspect_db(db)
    assert schema["tables"] == {
        "outbox",
        "inbox",
        "audit_log",
        "alembic_version",
        "migration_probe_item",
    }
    assert schema["indexes"]["migration_probe_item"] == {"ix_migration_probe_item_name"}
    assert schema["versions"] == {RUNTIME_HEAD, "probe_0001"}
    assert result.heads == tuple(sorted([RUNTIME_HEAD, "probe_0001"]))
    assert result.unmigrated == []
    diffs = await check_migrations(
        db, PROBE_TABLES, service="probe", versions_dir=probe_versions, upgrade_first=False
    )
    assert diffs == []

    # A later revision of the service is applied to the existing database.
    async with db.transaction() as session:
        session.add(MigrationProbeItem(name="kept"))
    write_revision(probe_versions, "probe_0002_notes.py", REVISION_2)
    tables: list[TableLike] = [MigrationProbeItem, MigrationProbeNote]
    again = await create_schema(db, tables, service="probe", versions_dir=probe_versions)
    assert again.before == result.heads
    assert set(again.heads) == {RUNTIME_HEAD, "probe_0002"}
    schema = await inspect_db(db)
    assert "migration_probe_note" in schema["tables"]
    assert schema["versions"] == {RUNTIME_HEAD, "probe_0002"}
    assert await check_migrations(db, tables, service="probe", versions_dir=probe_versions) == []
    async with db.transaction() as session:
        names = list((await session.execute(select(col(MigrationProbeItem.name)))).scalars())
    assert names == ["kept"]


async def test_unmigrated_tables_are_created_with_a_warning(
    db: Database, probe_versions: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tables: list[TableLike] = [MigrationProbeItem, MigrationProbeDraft]
    with caplog.at_level(logging.WARNING, logger="lotse_runtime.migrations"):
        result = await create_schema(db, tables, service="probe", versions_dir=probe_versions)
    assert result.unmigrated == ["migration_probe_draft"]
    assert any("migration_probe_draft" in r.getMessage() for r in caplog.records)
    schema = await inspect_db(db)
    assert {"migration_probe_item", "migration_probe_draft"} <= schema["tables"]
    # Only the revisions' heads are recorded: the draft table is no revision's.
    assert schema["versions"] == {RUNTIME_HEAD, "probe_0001"}


async def test_strict_upgrade_leaves_unmigrated_tables_out(db: Database) -> None:
    result = await create_schema(db, [MigrationProbeDraft], create_unmigrated=False)
    assert result.unmigrated == []
    assert "migration_probe_draft" not in (await inspect_db(db))["tables"]


async def test_other_tables_in_the_process_are_never_created(db: Database) -> None:
    assert "migration_probe_item" in SQLModel.metadata.tables  # imported, yet not this service's
    await create_schema(db, [], service="other")
    assert (await inspect_db(db))["tables"] == {"outbox", "inbox", "audit_log", "alembic_version"}


async def test_another_services_database_is_refused(db: Database, probe_versions: Path) -> None:
    await create_schema(db, PROBE_TABLES, service="probe", versions_dir=probe_versions)
    with pytest.raises(MigrationError, match="probe_0001"):
        await create_schema(db, [], service="other")


async def test_database_from_before_migrations_is_adopted(db: Database) -> None:
    async with db.engine.begin() as conn:
        # What create_all made before migrations existed: outbox and inbox only (the inbox
        # without its later fingerprint column).
        baseline = [t for t in runtime_tables() if t.name in ("outbox", "inbox")]
        metadata = target_metadata(baseline)
        inbox = metadata.tables["inbox"]
        inbox._columns.remove(inbox.c.data_sha256)
        await conn.run_sync(metadata.create_all)
        await conn.execute(
            text(
                "INSERT INTO outbox (topic, headers, event_id, event_type, created_at) "
                "VALUES ('t', '[]', 'e1', 'x', CURRENT_TIMESTAMP)"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO inbox (consumer, source, event_id, event_type, topic, partition, "
                "\"offset\", processed_at) VALUES ('c', '/s', 'e1', 'x', 't', 0, 7, "
                "CURRENT_TIMESTAMP)"
            )
        )
    result = await create_schema(db, [])
    assert result.adopted
    assert result.heads == (RUNTIME_HEAD,)
    assert (await inspect_db(db))["versions"] == {RUNTIME_HEAD}
    async with db.transaction() as session:
        assert len(list((await session.execute(select(OutboxMessage))).scalars())) == 1
        # runtime_0004 keeps the entries applied before it; they have no fingerprint.
        entry = await session.get(InboxEntry, ("c", "/s", "e1"))
    assert entry is not None
    assert (entry.offset, entry.data_sha256) == (7, None)


async def test_autogenerated_revision_creates_the_models(db: Database, tmp_path: Path) -> None:
    versions = tmp_path / "generated"
    path = await make_revision("probe", "probe items", tables=PROBE_TABLES, versions_dir=versions)
    source = path.read_text()
    assert path.parent == versions.resolve()
    assert path.name.startswith("probe_")
    assert "branch_labels: str | Sequence[str] | None = ('probe',)" in source
    assert "migration_probe_item" in source
    assert "outbox" not in source  # the runtime's tables are the runtime's revisions'
    assert "sqlmodel" not in source  # SQLModel's types are rendered as SQLAlchemy's

    result = await create_schema(db, PROBE_TABLES, service="probe", versions_dir=versions)
    assert result.unmigrated == []
    assert "migration_probe_item" in (await inspect_db(db))["tables"]
    assert await check_migrations(db, PROBE_TABLES, service="probe", versions_dir=versions) == []

    with pytest.raises(MigrationError, match="nothing to generate"):
        await make_revision("probe", "again", tables=PROBE_TABLES, versions_dir=versions)

    # The next revision follows the branch head.
    tables: list[TableLike] = [MigrationProbeItem, MigrationProbeNote]
    second = await make_revision("probe", "notes", tables=tables, versions_dir=versions)
    first_id = path.name.split("_")[1]
    assert f"down_revision: str | Sequence[str] | None = {first_id!r}" in second.read_text()
    await create_schema(db, tables, service="probe", versions_dir=versions)
    assert await check_migrations(db, tables, service="probe", versions_dir=versions) == []


def test_cli_writes_and_checks_a_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    versions = tmp_path / "cli_versions"
    spec = f"{__name__}:PROBE_TABLES"
    common = ["probe", "--versions-dir", str(versions), "--tables", spec]
    assert migrations_cli(["check", *common]) == 1  # no revision creates the table yet
    assert migrations_cli(["revision", *common, "-m", "probe items"]) == 0
    written = sorted(versions.glob("probe_*.py"))
    assert len(written) == 1
    assert migrations_cli(["check", *common]) == 0
    assert migrations_cli(["revision", *common, "-m", "nothing"]) == 2
    capsys.readouterr()
    assert migrations_cli(["history", *common]) == 0
    history = capsys.readouterr().out
    assert RUNTIME_BASELINE in history
    assert written[0].name.split("_")[1] in history


def test_runtime_revisions_match_the_runtime_models() -> None:
    assert migrations_cli(["check", "runtime"]) == 0
    assert sorted(p.name for p in RUNTIME_VERSIONS.glob("*.py") if p.name != "__init__.py") == [
        "runtime_0001_outbox_and_inbox.py",
        "runtime_0002_audit_log.py",
        "runtime_0003_audit_log_retention.py",
        "runtime_0004_inbox_fingerprint.py",
    ]
