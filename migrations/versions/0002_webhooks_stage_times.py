"""webhook deliveries; jobs.callback_url and jobs.stage_times

Revision ID: 0002_webhooks_stage_times
Revises: 0001_initial
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002_webhooks_stage_times"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("callback_url", sa.String(2048)))
    op.add_column("jobs", sa.Column("stage_times", JSON))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status_code", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_attempt_at", TS),
        sa.Column("delivered_at", TS),
    )
    op.create_index("ix_webhook_deliveries_job_event", "webhook_deliveries", ["job_id", "event"], unique=True)


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): the columns carry no index or constraint.
    op.drop_column("jobs", "stage_times")
    op.drop_column("jobs", "callback_url")
