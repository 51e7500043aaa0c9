"""tenants.storage_quota_bytes (a tenant's own storage quota) and jobs.artifact_expired_at (retention)

Revision ID: 0007_storage_bounds
Revises: 0006_workers
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_storage_bounds"
down_revision = "0006_workers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("storage_quota_bytes", sa.BigInteger()))
    op.add_column("jobs", sa.Column("artifact_expired_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("artifact_expired_at")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("storage_quota_bytes")
