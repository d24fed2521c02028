"""incremental cells: per-cell sums and median histograms

The cells are filled by applying events; a database holding facts from before this revision
gets them by a rebuild (``python -m lotse_reporting.replay``), which recomputes every
family's share.

Revision ID: 7c41e2b9a5d3
Revises: 3dfa69312973
Create Date: 2026-12-06 23:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c41e2b9a5d3"
down_revision: str | Sequence[str] | None = "3dfa69312973"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = ("bezirk", "period", "figure", "dimension")


def _key_columns() -> list[sa.Column[str]]:
    return [
        sa.Column("bezirk", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("figure", sa.String(length=40), nullable=False),
        sa.Column("dimension", sa.String(length=64), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "reporting_cell",
        *_key_columns(),
        sa.Column("families", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint(*_KEY),
    )
    op.create_table(
        "reporting_cell_number",
        *_key_columns(),
        sa.Column("number", sa.Float(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(*_KEY, "number"),
    )


def downgrade() -> None:
    op.drop_table("reporting_cell_number")
    op.drop_table("reporting_cell")
