"""jobs.heartbeat_at: a worker's lease on a running job

Revision ID: 0003_job_heartbeat
Revises: 0002_webhooks_stage_times
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_heartbeat"
down_revision = "0002_webhooks_stage_times"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("heartbeat_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("jobs", "heartbeat_at")
