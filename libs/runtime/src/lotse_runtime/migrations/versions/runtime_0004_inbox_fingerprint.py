"""The inbox keeps a fingerprint of each applied event, to tell a redelivery from a
conflicting duplicate (same source and id, other content).

Existing entries keep no fingerprint (NULL): their events count as redeliveries, as before.

Revision ID: runtime_0004
Revises: runtime_0003
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "runtime_0004"
down_revision: str | Sequence[str] | None = "runtime_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A database adopted at the baseline may have been created from today's models already.
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("inbox")}
    if "data_sha256" in columns:
        return
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("data_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.drop_column("data_sha256")
