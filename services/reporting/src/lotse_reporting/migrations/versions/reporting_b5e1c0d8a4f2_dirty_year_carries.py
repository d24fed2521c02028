"""dirty year carries: whether the open-escalation stock changed in a dirty year

Only the stock carries over into later years; a mark without it lets the publisher recompute
that year alone instead of every later one as well.

Revision ID: b5e1c0d8a4f2
Revises: 7c41e2b9a5d3
Create Date: 2026-12-07 02:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b5e1c0d8a4f2"
down_revision: str | Sequence[str] | None = "7c41e2b9a5d3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Marks already there may stem from a stock change: they carry, as every mark did.
    with op.batch_alter_table("reporting_dirty_year") as batch:
        batch.add_column(
            sa.Column("carries", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("reporting_dirty_year") as batch:
        batch.drop_column("carries")
