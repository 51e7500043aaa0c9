"""auto jobs: one row per candidate configuration (run as its own sub-task), and the search round on the job

Revision ID: 0005_auto_candidates
Revises: 0004_tenants_keys
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005_auto_candidates"
down_revision = "0004_tenants_keys"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("auto_round", sa.Integer()))
    op.create_table(
        "auto_candidates",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("candidate", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", JSON),
        sa.Column("worker", sa.String(255)),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
    )
    op.create_index("ix_auto_candidates_job_attempt_idx", "auto_candidates", ["job_id", "attempt", "idx"],
                    unique=True)


def downgrade() -> None:
    op.drop_table("auto_candidates")
    op.drop_column("jobs", "auto_round")
