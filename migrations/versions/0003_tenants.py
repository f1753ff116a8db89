"""Tenants: each platform's items, keys, buckets, events token and callback secret are its own.

Moves an existing deployment onto one tenant named ``default`` (a fixed id, see ``dfmod.db.DEFAULT_TENANT_ID``)
with nothing lost: every item joins it; every key holding the ``ingest`` scope joins it (and may review it),
while keys without ``ingest`` stay global, seeing what they saw before. The default tenant keeps reading its
callback URL, callback secret and events token from the DFMOD_CALLBACK_* / DFMOD_S3_EVENT_TOKEN settings
until an operator sets its own, so nothing has to be reconfigured at upgrade.

Downgrade drops the tenant columns and tables; items, verdicts, reviews and keys stay (tenants made after
the upgrade, their buckets and their secrets are lost).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DEFAULT_TENANT_ID = "00000000-0000-0000-0000-000000000000"


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("callback_url", sa.String(length=2048), nullable=True),
        sa.Column("callback_secret_encrypted", sa.Text(), nullable=True),
        sa.Column("previous_secret_encrypted", sa.Text(), nullable=True),
        sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("events_token_hash", sa.String(length=64), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("review_band", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
        sa.UniqueConstraint("events_token_hash", name=op.f("uq_tenants_events_token_hash")),
    )
    tenants = sa.table(
        "tenants",
        sa.column("id", sa.String), sa.column("name", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)), sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        tenants.insert().values(
            id=DEFAULT_TENANT_ID, name="default", created_at=sa.func.current_timestamp(),
            updated_at=sa.func.current_timestamp(),
        )
    )

    op.create_table(
        "tenant_buckets",
        sa.Column("bucket", sa.String(length=255), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_buckets_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("bucket", name=op.f("pk_tenant_buckets")),
    )
    op.create_index("ix_tenant_buckets_tenant_id", "tenant_buckets", ["tenant_id"], unique=False)

    # The server default stays (expand/contract, docs/operations.md): the previous release's pods, still serving
    # while this one rolls out, insert items without naming a tenant; those land in the default tenant. A later
    # release may drop the default once no pre-tenant code can run against this schema.
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tenant_id", sa.String(length=36), nullable=False, server_default=DEFAULT_TENANT_ID)
        )
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.create_foreign_key(op.f("fk_items_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"])
        batch_op.create_index("ix_items_tenant_created", ["tenant_id", "created_at", "id"], unique=False)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.String(length=36), nullable=True))
        batch_op.create_foreign_key(op.f("fk_api_keys_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"])

    op.create_table(
        "api_key_tenants",
        sa.Column("key_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_api_key_tenants_key_id_api_keys"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_api_key_tenants_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("key_id", "tenant_id", name=op.f("pk_api_key_tenants")),
    )
    # Ingest keys record into the default tenant and review it; keys without ingest stay global.
    ingest = "(',' || scopes || ',') LIKE '%,ingest,%'"
    op.execute(f"UPDATE api_keys SET tenant_id = '{DEFAULT_TENANT_ID}' WHERE {ingest}")
    op.execute(
        f"INSERT INTO api_key_tenants (key_id, tenant_id) SELECT id, '{DEFAULT_TENANT_ID}' FROM api_keys WHERE {ingest}"
    )


def downgrade() -> None:
    op.drop_table("api_key_tenants")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_api_keys_tenant_id_tenants"), type_="foreignkey")
        batch_op.drop_column("tenant_id")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_tenant_created")
        batch_op.drop_constraint(op.f("fk_items_tenant_id_tenants"), type_="foreignkey")
        batch_op.drop_column("tenant_id")
    op.drop_index("ix_tenant_buckets_tenant_id", table_name="tenant_buckets")
    op.drop_table("tenant_buckets")
    op.drop_table("tenants")
