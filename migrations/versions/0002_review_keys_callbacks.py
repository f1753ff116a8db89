"""Trust-and-safety review: API keys, reviews, callback deliveries, and the review columns on items.

Items get a copy of their newest verdict (score, label, threshold, model version: what reviewers filter,
sort and page on), their current review decision and their review-queue lease. Existing items are
backfilled from their newest verdict, so a database upgraded with classified items is reviewable at once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("label", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("threshold", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("model_version", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("decision", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("decided_by", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("claimed_key_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_items_score", ["score", "id"], unique=False)
        batch_op.create_index("ix_items_decision_score", ["decision", "score"], unique=False)

    # Backfill from the newest verdict of each item (highest id: verdicts are only ever inserted).
    # Correlated subqueries rather than UPDATE ... FROM, which SQLite before 3.33 lacks.
    newest = "(SELECT MAX(v2.id) FROM verdicts v2 WHERE v2.item_id = items.id)"
    columns = {"score": "fake_probability", "label": "label", "threshold": "threshold", "model_version": "model_version"}
    assignments = ", ".join(
        f"{target} = (SELECT v.{source} FROM verdicts v WHERE v.id = {newest})" for target, source in columns.items()
    )
    op.execute(f"UPDATE items SET {assignments} WHERE EXISTS (SELECT 1 FROM verdicts v3 WHERE v3.item_id = items.id)")

    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("scopes", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(
        "uq_api_keys_active_name", "api_keys", ["name"], unique=True,
        postgresql_where=sa.text("revoked_at IS NULL"), sqlite_where=sa.text("revoked_at IS NULL"),
    )

    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.String(length=36), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(length=255), nullable=False),
        sa.Column("key_id", sa.String(length=36), nullable=True),
        sa.Column("retracts_id", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("model_label", sa.String(length=16), nullable=True),
        sa.Column("model_score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_reviews_item_id_items"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sa.UniqueConstraint("key_id", "request_id", name="uq_reviews_key_request"),
    )
    op.create_index("ix_reviews_item", "reviews", ["item_id", "id"], unique=False)

    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("item_id", sa.String(length=36), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_deliveries")),
    )
    op.create_index("ix_callback_deliveries_event", "callback_deliveries", ["event_id", "attempt"], unique=False)
    op.create_index("ix_callback_deliveries_item", "callback_deliveries", ["item_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_callback_deliveries_item", table_name="callback_deliveries")
    op.drop_index("ix_callback_deliveries_event", table_name="callback_deliveries")
    op.drop_table("callback_deliveries")
    op.drop_index("ix_reviews_item", table_name="reviews")
    op.drop_table("reviews")
    op.drop_index("uq_api_keys_active_name", table_name="api_keys")
    op.drop_table("api_keys")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_decision_score")
        batch_op.drop_index("ix_items_score")
        for column in (
            "claimed_until", "claimed_by", "claimed_key_id", "decided_by", "decided_at", "decision",
            "model_version", "threshold", "label", "score",
        ):
            batch_op.drop_column(column)
