"""The audit log may lose entries older than a year, and only those.

The retention job deletes entries past ``retention_audit_days`` (ten years by default);
the triggers still refuse every update and every delete of a younger entry, so neither the
service nor anyone with its database credentials can rewrite the recent trail.

Revision ID: runtime_0003
Revises: runtime_0002
Create Date: 2026-11-23 12:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "runtime_0003"
down_revision: str | Sequence[str] | None = "runtime_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REFUSE = "audit_log is append-only"
#: Younger entries can never be deleted; retention_audit_days must be longer.
FLOOR_DAYS = 365


def _postgres_function(allow_old_deletes: bool) -> str:
    allow = (
        f"IF TG_OP = 'DELETE' AND OLD.at < now() - interval '{FLOOR_DAYS} days' "
        "THEN RETURN OLD; END IF; "
        if allow_old_deletes
        else ""
    )
    return (
        "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger "
        f"LANGUAGE plpgsql AS $$ BEGIN {allow}RAISE EXCEPTION '{_REFUSE}'; END $$"
    )


def _sqlite_delete_trigger(allow_old_deletes: bool) -> str:
    # SQLite stores the times as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC), which compares as text.
    when = f" WHEN OLD.at >= datetime('now', '-{FLOOR_DAYS} days')" if allow_old_deletes else ""
    return (
        f"CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log{when} "
        f"BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_postgres_function(allow_old_deletes=True))
    else:
        op.execute("DROP TRIGGER audit_log_no_delete")
        op.execute(_sqlite_delete_trigger(allow_old_deletes=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_postgres_function(allow_old_deletes=False))
    else:
        op.execute("DROP TRIGGER audit_log_no_delete")
        op.execute(_sqlite_delete_trigger(allow_old_deletes=False))
