"""jobs.device: the hardware a job asked for ('cpu' | 'gpu'), apart from jobs.queue (where it is routed)

Until now the API's `device` was stored as the queue name and the worker read the hardware from the queue.
Existing rows get the device their queue meant: 'gpu' for the gpu queue, else 'cpu'.

Revision ID: 0008_job_device
Revises: 0007_storage_bounds
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_job_device"
down_revision = "0007_storage_bounds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The server default fills the existing rows with 'cpu' (corrected below for the gpu queue's), and rows that
    # an older API still writes during a deploy: their worker then runs them on LOWBIT_WORKER_DEVICE.
    op.add_column("jobs", sa.Column("device", sa.String(8), nullable=False, server_default="cpu"))
    jobs = sa.table("jobs", sa.column("queue", sa.String), sa.column("device", sa.String))
    op.execute(jobs.update().where(jobs.c.queue == "gpu").values(device="gpu"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("device")
