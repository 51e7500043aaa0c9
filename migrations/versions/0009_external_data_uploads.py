"""models.external_data_bytes (bundle uploads of models with external data) and the uploads table
(resumable uploads of large files)

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


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("external_data_bytes")
