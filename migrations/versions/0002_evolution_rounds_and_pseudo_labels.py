"""Evolution rounds (the round state machine) and their pseudo-labels.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 19:32:23.985639+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evolution_rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("lock", sa.Integer(), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("result_version_id", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("gate", sa.JSON(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'voting', 'training', 'evaluating', 'swapping', "
            "'succeeded', 'rejected', 'failed', 'cancelled')",
            name=op.f("ck_evolution_rounds_state"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["model_versions.id"],
            name=op.f("fk_evolution_rounds_parent_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["result_version_id"],
            ["model_versions.id"],
            name=op.f("fk_evolution_rounds_result_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evolution_rounds")),
        sa.UniqueConstraint("lock", name=op.f("uq_evolution_rounds_lock")),
    )
    with op.batch_alter_table("evolution_rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evolution_rounds_state"), ["state"], unique=False)

    op.create_table(
        "pseudo_labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("image_a_id", sa.Integer(), nullable=False),
        sa.Column("image_b_id", sa.Integer(), nullable=False),
        sa.Column("votes_a", sa.Integer(), nullable=False),
        sa.Column("votes_b", sa.Integer(), nullable=False),
        sa.Column("invalid_votes", sa.Integer(), nullable=False),
        sa.Column("p_star", sa.Double(), nullable=False),
        sa.Column("holdout", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_a_id"], ["images.id"], name=op.f("fk_pseudo_labels_image_a_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["image_b_id"], ["images.id"], name=op.f("fk_pseudo_labels_image_b_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["evolution_rounds.id"],
            name=op.f("fk_pseudo_labels_round_id_evolution_rounds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pseudo_labels")),
    )
    with op.batch_alter_table("pseudo_labels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pseudo_labels_round_id"), ["round_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("pseudo_labels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pseudo_labels_round_id"))

    op.drop_table("pseudo_labels")
    with op.batch_alter_table("evolution_rounds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evolution_rounds_state"))

    op.drop_table("evolution_rounds")
