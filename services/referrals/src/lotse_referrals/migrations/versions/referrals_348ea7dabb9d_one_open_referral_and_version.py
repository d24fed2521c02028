"""one open referral per family and module, and per handover; row version of a referral

Revision ID: 348ea7dabb9d
Revises: e1b6f1621c37
Create Date: 2026-12-08 10:00:00.000000

Two partial unique indexes (PostgreSQL and SQLite both know ``CREATE UNIQUE INDEX ...
WHERE``): at most one running referral (requested, received, accepted, in-progress) per
(case, module) and per handover. A database that already holds two running referrals of one
family for one module (possible before this revision, under concurrent requests) is not
changed behind anyone's back: the upgrade stops and names them, and the requesting side
cancels the surplus ones through the API (which tells the Träger) before upgrading again.

``version`` counts a referral's changes; the ORM writes every change ``WHERE version =
<read>`` (optimistic locking), so of two concurrent lifecycle steps exactly one commits.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "348ea7dabb9d"
down_revision: str | Sequence[str] | None = "e1b6f1621c37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('requested', 'received', 'accepted', 'in-progress')"
HANDOVER_OPEN = f"handover_id IS NOT NULL AND {OPEN}"


def _refuse_duplicates() -> None:
    bind = op.get_bind()
    checks = {
        "family and module": (
            "SELECT case_id, module, COUNT(*) FROM referrals_referral "
            f"WHERE {OPEN} GROUP BY case_id, module HAVING COUNT(*) > 1"
        ),
        "handover": (
            "SELECT handover_id, COUNT(*) FROM referrals_referral "
            f"WHERE {HANDOVER_OPEN} GROUP BY handover_id HAVING COUNT(*) > 1"
        ),
    }
    for what, query in checks.items():
        rows = bind.execute(sa.text(query)).all()
        if rows:
            shown = "; ".join(", ".join(str(v) for v in row[:-1]) for row in rows[:10])
            raise RuntimeError(
                f"{len(rows)} {what} combination(s) have more than one running referral "
                f"(e.g. {shown}); cancel the surplus referrals (POST "
                "/referrals/{id}/steps, step cancelled, reason duplicate) and upgrade again"
            )


def upgrade() -> None:
    _refuse_duplicates()
    with op.batch_alter_table("referrals_referral", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False)
        )
    op.create_index(
        "uq_referrals_referral_open_case_module",
        "referrals_referral",
        ["case_id", "module"],
        unique=True,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    op.create_index(
        "uq_referrals_referral_open_handover",
        "referrals_referral",
        ["handover_id"],
        unique=True,
        postgresql_where=sa.text(HANDOVER_OPEN),
        sqlite_where=sa.text(HANDOVER_OPEN),
    )


def downgrade() -> None:
    op.drop_index("uq_referrals_referral_open_handover", table_name="referrals_referral")
    op.drop_index("uq_referrals_referral_open_case_module", table_name="referrals_referral")
    with op.batch_alter_table("referrals_referral", schema=None) as batch_op:
        batch_op.drop_column("version")
