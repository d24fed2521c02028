"""wishes wait visibly and escalate, catalogue follows its city

Revision ID: c887c88d04a6
Revises: 348ea7dabb9d
Create Date: 2026-12-06 21:19:41.044519

An open wish records what it waits for and when it was escalated to the Bezirksteam. The
catalogue remembers its city (a start with another city's configuration is refused), which
Träger the city file no longer names (``retired``), the file's values as last applied
(``seeded``) and which fields were changed through the API (``edited_fields``). A Träger
edited before this revision keeps all its API edits (every editable field counts as
edited), as it did before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c887c88d04a6"
down_revision: str | Sequence[str] | None = "348ea7dabb9d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "referrals_city",
        sa.Column("slug", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("seeded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("slug"),
    )
    with op.batch_alter_table("referrals_traeger", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("retired", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("edited_fields", sa.JSON(), server_default="[]", nullable=False)
        )
        batch_op.add_column(sa.Column("seeded", sa.JSON(), nullable=True))
    op.execute(
        "UPDATE referrals_traeger SET edited_fields = "
        """'["name", "contact", "modules", "bezirke", "capacity_per_month", "active"]' """
        "WHERE edited"
    )

    with op.batch_alter_table("referrals_wish", schema=None) as batch_op:
        batch_op.add_column(sa.Column("waiting_for", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("referrals_wish", schema=None) as batch_op:
        batch_op.drop_column("escalated_at")
        batch_op.drop_column("waiting_for")

    with op.batch_alter_table("referrals_traeger", schema=None) as batch_op:
        batch_op.drop_column("seeded")
        batch_op.drop_column("edited_fields")
        batch_op.drop_column("retired")

    op.drop_table("referrals_city")
