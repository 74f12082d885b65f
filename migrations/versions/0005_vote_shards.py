"""Voting shards: a round's stage 1 split over workers on the `voting` queue.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 08:10:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "vote_shards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("pairs", sa.JSON(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_pairs", sa.Integer(), server_default="0", nullable=False),
        sa.Column("votes", sa.JSON(), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'done', 'cancelled')", name=op.f("ck_vote_shards_state")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["evolution_rounds.id"],
            name=op.f("fk_vote_shards_round_id_evolution_rounds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vote_shards")),
        sa.UniqueConstraint("round_id", "shard", name=op.f("uq_vote_shards_round_id")),
    )


def downgrade() -> None:
    op.drop_table("vote_shards")
