"""Initial schema: model versions, images, predictions, comparisons.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 19:22:11+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=1000), nullable=False),
        sa.Column("base_path", sa.String(length=1000), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="registered", nullable=False),
        sa.Column("untrained", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("manifest", sa.JSON(), nullable=True),
        sa.CheckConstraint("kind IN ('base', 'lora', 'full')", name=op.f("ck_model_versions_kind")),
        sa.CheckConstraint(
            "status IN ('registered', 'active', 'retired', 'failed')", name=op.f("ck_model_versions_status")
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["model_versions.id"], name=op.f("fk_model_versions_parent_id_model_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("name", name=op.f("uq_model_versions_name")),
    )

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.String(length=200), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("times_seen", sa.Integer(), server_default="1", nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("sha256", name=op.f("uq_images_sha256")),
    )
    op.create_index(op.f("ix_images_last_seen_at"), "images", ["last_seen_at"])

    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("score_std", sa.Double(), nullable=True),
        sa.Column("valid_samples", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("prompt_profile", sa.String(length=32), nullable=False),
        sa.Column("sampling_key", sa.String(length=200), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("completions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_predictions_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_predictions_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    op.create_index(
        op.f("ix_predictions_cache_lookup"),
        "predictions",
        ["image_id", "model_version_id", "sampling_key", "created_at"],
    )

    op.create_table(
        "comparisons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_a_id", sa.Integer(), nullable=False),
        sa.Column("image_b_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("votes_a", sa.Integer(), nullable=False),
        sa.Column("votes_b", sa.Integer(), nullable=False),
        sa.Column("invalid_votes", sa.Integer(), nullable=False),
        sa.Column("prob_a_better", sa.Double(), nullable=True),
        sa.Column("prompt_profile", sa.String(length=32), nullable=False),
        sa.Column("sampling_key", sa.String(length=200), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("completions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_a_id"], ["images.id"], name=op.f("fk_comparisons_image_a_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["image_b_id"], ["images.id"], name=op.f("fk_comparisons_image_b_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_comparisons_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_comparisons")),
    )
    op.create_index(op.f("ix_comparisons_image_a_id"), "comparisons", ["image_a_id"])
    op.create_index(op.f("ix_comparisons_image_b_id"), "comparisons", ["image_b_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes too; children before parents for the foreign keys.
    op.drop_table("comparisons")
    op.drop_table("predictions")
    op.drop_table("images")
    op.drop_table("model_versions")
