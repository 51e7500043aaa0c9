"""workers: each worker's heartbeat and queues, so the API can tell a queue that nobody consumes

Revision ID: 0006_workers
Revises: 0005_auto_candidates
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_workers"
down_revision = "0005_auto_candidates"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("queues", sa.String(255), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_workers_expires_at", "workers", ["expires_at"])


def downgrade() -> None:
    op.drop_table("workers")
