"""Tenants and their API keys; every model, dataset and job belongs to a tenant. Jobs also record when
they were handed to the broker and which worker runs them.

Revision ID: 0004_tenants_keys
Revises: 0003_job_heartbeat
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_tenants_keys"
down_revision = "0003_job_heartbeat"
branch_labels = None
depends_on = None

# Rows that existed before tenants belong to the keyless local tenant.
LOCAL = "local"


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("max_active_jobs", sa.Integer),
        sa.Column("uploads_per_minute", sa.Integer),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(sa.text("INSERT INTO tenants (id, name, created_at) VALUES (:id, :name, CURRENT_TIMESTAMP)")
               .bindparams(id=LOCAL, name=LOCAL))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False, index=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    for table in ("models", "datasets", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(36), nullable=False, server_default=LOCAL))
            batch.create_foreign_key(f"fk_{table}_tenant", "tenants", ["tenant_id"], ["id"], ondelete="RESTRICT")
            batch.create_index(f"ix_{table}_tenant_id", ["tenant_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("worker", sa.String(255)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker")
        batch.drop_column("enqueued_at")
    for table in ("jobs", "datasets", "models"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_tenant_id")
            batch.drop_constraint(f"fk_{table}_tenant", type_="foreignkey")
            batch.drop_column("tenant_id")
    op.drop_table("api_keys")
    op.drop_table("tenants")
