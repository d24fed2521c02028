"""dirty year cleared: marks stay, a pass records the version it cleared

A mark used to be deleted when a pass cleared it, so the next change inserted it again at
version 1: a pass of another replica that had read version 1 before could then delete that
new mark, and the change was never published. Now the version only grows and a clean year
is one whose ``cleared`` caught up with it.

Revision ID: e3a9d47c1b60
Revises: b5e1c0d8a4f2
Create Date: 2026-12-07 05:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e3a9d47c1b60"
down_revision: str | Sequence[str] | None = "b5e1c0d8a4f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Marks already there are dirty: nothing has cleared them (cleared 0, version >= 1).
    with op.batch_alter_table("reporting_dirty_year") as batch:
        batch.add_column(sa.Column("cleared", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    # The old schema knows only dirty rows: the clean ones go.
    op.execute("DELETE FROM reporting_dirty_year WHERE version = cleared")
    with op.batch_alter_table("reporting_dirty_year") as batch:
        batch.drop_column("cleared")
