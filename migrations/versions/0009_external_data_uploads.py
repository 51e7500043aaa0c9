"""models.external_data_bytes (bundle uploads of models with external data), the uploads and upload_parts
tables (resumable uploads of large files) and workers.memory_mb (routing jobs by their memory estimate)

Revision ID: 0009_external_data_uploads
Revises: 0008_job_device
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_external_data_uploads"
down_revision = "0008_job_device"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("external_data_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("workers", sa.Column("memory_mb", sa.Integer(), nullable=True))
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("part_bytes", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model_id", sa.String(36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_uploads_tenant_id", "uploads", ["tenant_id"])
    op.create_table(
        "upload_parts",
        sa.Column("upload_id", sa.String(36), sa.ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("index", sa.Integer(), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("upload_parts")
    op.drop_index("ix_uploads_tenant_id", table_name="uploads")
    op.drop_table("uploads")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("memory_mb")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("external_data_bytes")
