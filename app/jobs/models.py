from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.broker import CPU_QUEUE
from app.db import Base, JSONType, UTCDateTime, utcnow
from app.tenants.models import LOCAL_TENANT

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)

# The hardware a job asks for (Job.device): 'gpu' runs its engine on CUDA, 'cpu' on the worker's own device
# (LOWBIT_WORKER_DEVICE). Which queue carries it is a separate choice (Job.queue, made by the API's service).
CPU_DEVICE, GPU_DEVICE = "cpu", "gpu"
DEVICES = (CPU_DEVICE, GPU_DEVICE)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (sa.Index("ix_jobs_created_id", "created_at", "id"), sa.Index("ix_jobs_status", "status"))

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="RESTRICT"), index=True,
                                           default=LOCAL_TENANT)
    model_id: Mapped[str] = mapped_column(sa.ForeignKey("models.id", ondelete="RESTRICT"))
    calibration_dataset_id: Mapped[str | None] = mapped_column(sa.ForeignKey("datasets.id", ondelete="RESTRICT"))
    eval_dataset_id: Mapped[str | None] = mapped_column(sa.ForeignKey("datasets.id", ondelete="RESTRICT"))
    recipe: Mapped[str] = mapped_column(sa.String(32))
    options: Mapped[dict[str, Any]] = mapped_column(JSONType)
    accuracy_target: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # The broker queue the job's messages are routed to (workers consume queues by name).
    queue: Mapped[str] = mapped_column(sa.String(32), default=CPU_QUEUE)
    # The hardware the job asked for (CPU_DEVICE or GPU_DEVICE); the worker picks the engine's device from it.
    device: Mapped[str] = mapped_column(sa.String(8), default=CPU_DEVICE, server_default=CPU_DEVICE)
    status: Mapped[str] = mapped_column(sa.String(16), default=QUEUED)
    stage: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    progress: Mapped[int] = mapped_column(sa.Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    artifact_path: Mapped[str | None] = mapped_column(sa.String(512), nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    artifact_bytes: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    # When the retention (LOWBIT_RETENTION_DAYS) removed the job's files; the report and metadata stay.
    artifact_expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Where to POST the job's summary when it finishes (http or https), if anywhere.
    callback_url: Mapped[str | None] = mapped_column(sa.String(2048), nullable=True)
    # When each stage the job went through started and ended: {stage: {"started": unix_s, "finished": unix_s}}.
    stage_times: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # Refreshed by the worker while the job runs; a stale one means the worker is gone.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the API handed the job to the broker (None: committed but not yet published).
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The worker (hostname:pid) running the current attempt.
    worker: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    # auto jobs: the search round in progress. Whichever candidate sub-task finishes a round last moves it on
    # with a conditional UPDATE of this column, so exactly one of them plans the next round (or concludes).
    auto_round: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    deliveries: Mapped[list[WebhookDelivery]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin",
        order_by="WebhookDelivery.created_at",
    )


# Delivery states of a webhook (stored in webhook_deliveries.status): still being tried, delivered, and given up
# on after its last attempt ("failed", as rows and the API's deliveries have always said).
PENDING, DELIVERED, DELIVERY_FAILED = "pending", "delivered", "failed"


class WebhookDelivery(Base):
    """One webhook POST for one event of a job (at most one per job and event), with its retries."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (sa.Index("ix_webhook_deliveries_job_event", "job_id", "event", unique=True),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(sa.String(32))
    url: Mapped[str] = mapped_column(sa.String(2048))
    status: Mapped[str] = mapped_column(sa.String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    job: Mapped[Job] = relationship(back_populates="deliveries")


# States of an auto job's candidate.
CANDIDATE_PENDING, CANDIDATE_RUNNING = "pending", "running"
CANDIDATE_FINISHED = ("done", "failed", "skipped")


class AutoCandidate(Base):
    """One configuration an auto job tries, run as its own queue sub-task, with its measured result."""

    __tablename__ = "auto_candidates"
    __table_args__ = (sa.Index("ix_auto_candidates_job_attempt_idx", "job_id", "attempt", "idx", unique=True),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    # The job attempt that planned it: a re-queued job starts its search over, ignoring older rows.
    attempt: Mapped[int] = mapped_column(sa.Integer)
    idx: Mapped[int] = mapped_column(sa.Integer)
    round: Mapped[int] = mapped_column(sa.Integer)
    # {recipe, options, excluded_nodes, activations_16bit}
    candidate: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(sa.String(16), default=CANDIDATE_PENDING)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # hostname:pid of the worker process that ran it
    worker: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Worker(Base):
    """A worker's main process and the queues it consumes, alive until ``expires_at``: it refreshes the row every
    LOWBIT_WORKER_HEARTBEAT_S and deletes it when it stops. The API reads it to tell whether a queue with jobs
    waiting has anyone to run them (/readyz, /metrics, a queued job's ``waiting_reason``)."""

    __tablename__ = "workers"

    # hostname:pid of the main process
    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(sa.String(255))
    # comma-separated queue names
    queues: Mapped[str] = mapped_column(sa.String(255))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The worker declares how long its last beat holds (three intervals), so readers need none of its settings.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The memory the worker declares (`lowbit worker --memory-gb`, else the machine's total): jobs whose estimate
    # exceeds it are routed to a queue whose workers have enough, or refused (app/jobs/service.py's route).
    memory_mb: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
