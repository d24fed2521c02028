"""children's data in a block of its own, under the family's children key

Revision ID: 5e1b7c0d9a2f
Revises: 1c22f3adc8c4
Create Date: 2026-12-06 20:30:00

Cases registered before keep their children's fields inside ``personal``, sealed under the
family secret itself; intake still opens those (``FamilyKeys.open``), no other service can.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5e1b7c0d9a2f"
down_revision: str | Sequence[str] | None = "1c22f3adc8c4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("intake_case", sa.Column("children", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("intake_case", "children")
