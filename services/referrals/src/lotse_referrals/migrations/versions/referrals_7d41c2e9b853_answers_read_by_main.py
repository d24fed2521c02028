"""answers read by the main consumer: the Träger's answers applied so far stay known

The Träger's answers are read by the consumer ``main`` now, no longer by ``partners`` of its
own. Its first start reads the answer topics from their beginning (the group has no offsets
on them yet); the inbox entries of the answers already applied move to ``main`` so that each
is found there and skipped, instead of applied a second time (refused by the referral's
lifecycle, dead-lettered, and a notice sent to the Träger for an answer it gave correctly).
An answer's source is its Träger's own, never intake's or visits', so no entry collides.

Revision ID: 7d41c2e9b853
Revises: c887c88d04a6
Create Date: 2026-12-07 06:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "7d41c2e9b853"
down_revision: str | Sequence[str] | None = "c887c88d04a6"
branch_labels: str | Sequence[str] | None = None
# The inbox is the runtime's table: its revisions must have run first.
depends_on: str | Sequence[str] | None = "runtime_0004"

FORMER = "referrals.partners"
NOW = "referrals.main"


def upgrade() -> None:
    op.execute(f"UPDATE inbox SET consumer = '{NOW}' WHERE consumer = '{FORMER}'")


def downgrade() -> None:
    # Only the answers' entries go back: their sources are the Träger's partner sources.
    op.execute(
        f"UPDATE inbox SET consumer = '{FORMER}' "
        f"WHERE consumer = '{NOW}' AND source LIKE '/partner/%'"
    )
