"""The face stage: every face found in an item's image, per model version (box, detector score, fake
probability), for reviewers to see; the verdict keeps the most-fake face's score.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verdict_faces",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.String(length=36), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("face_index", sa.Integer(), nullable=False),
        sa.Column("x0", sa.Integer(), nullable=False),
        sa.Column("y0", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Integer(), nullable=False),
        sa.Column("y1", sa.Integer(), nullable=False),
        sa.Column("detector_score", sa.Float(), nullable=False),
        sa.Column("fake_probability", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("item_id", "model_version", "face_index", name="uq_verdict_faces_item_model_face"),
    )


def downgrade() -> None:
    op.drop_table("verdict_faces")
