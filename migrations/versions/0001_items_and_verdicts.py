"""Items and verdicts: the moderation pipeline's tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 01:25:22.463648
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('items',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('bucket', sa.String(length=255), nullable=False),
    sa.Column('key', sa.String(length=1024), nullable=False),
    sa.Column('version', sa.String(length=255), nullable=False),
    sa.Column('etag', sa.String(length=255), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('content_type', sa.String(length=255), nullable=True),
    sa.Column('source', sa.String(length=255), nullable=False),
    sa.Column('ingest', sa.String(length=32), nullable=False),
    sa.Column('status', sa.Enum('queued', 'processing', 'classified', 'failed', name='item_status', native_enum=False, length=16), nullable=False),
    sa.Column('failure_reason', sa.String(length=64), nullable=True),
    sa.Column('failure_detail', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('classified_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_items')),
    sa.UniqueConstraint('bucket', 'key', 'version', name='uq_items_bucket_key_version')
    )
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.create_index('ix_items_created', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_items_sha256', ['sha256'], unique=False)
        batch_op.create_index('ix_items_status_updated', ['status', 'updated_at'], unique=False)

    op.create_table('verdicts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('item_id', sa.String(length=36), nullable=False),
    sa.Column('label', sa.String(length=16), nullable=False),
    sa.Column('fake_probability', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('model_version', sa.String(length=128), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('inference_ms', sa.Float(), nullable=True),
    sa.Column('batch_size', sa.Integer(), nullable=True),
    sa.Column('device', sa.String(length=16), nullable=True),
    sa.Column('reused_from_item_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_verdicts_item_id_items'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_verdicts')),
    sa.UniqueConstraint('item_id', 'model_version', name='uq_verdicts_item_model')
    )
    with op.batch_alter_table('verdicts', schema=None) as batch_op:
        batch_op.create_index('ix_verdicts_model_sha', ['model_version', 'sha256'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('verdicts', schema=None) as batch_op:
        batch_op.drop_index('ix_verdicts_model_sha')

    op.drop_table('verdicts')
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_status_updated')
        batch_op.drop_index('ix_items_sha256')
        batch_op.drop_index('ix_items_created')

    op.drop_table('items')
