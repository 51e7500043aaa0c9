from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, object_session

from app import workers
from app.broker import CPU_QUEUE, GPU_QUEUE
from app.datasets import service as datasets
from app.db import utcnow
from app.errors import Conflict, Gone, Invalid, NotFound, from_engine
from app.jobs import lifecycle
from app.jobs.models import (
    CANCELLED,
    CANDIDATE_RUNNING,
    CPU_DEVICE,
    FAILED,
    GPU_DEVICE,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    AutoCandidate,
    Job,
)
from app.jobs.schemas import DeliveryOut, JobCreate, JobError, JobLinks, JobOut
from app.modelfiles import service as models
from app.modelfiles.models import ModelFile
from app.settings import Settings
from app.tenants import service as tenants
from app.uploads import is_uuid, new_id
from worker.engine import streaming
from worker.engine.config import RECIPES_NEEDING_PYTORCH, RecipeOptions, parse_options
from worker.engine.errors import EngineError
from worker.engine.inspect import TensorInfo
from worker.engine.preflight import check_target, plan_split
from worker.engine.pt2 import HOW_TO_MAKE_PT2

STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


def create_job(db: Session, req: JobCreate, *, settings: Settings, tenant_id: str) -> Job:
    """Pre-flight everything that can be known before running, then record a queued job.

    Nothing is enqueued here: the caller enqueues after its commit.
    """
    model = models.get_model(db, req.model_id, tenant_id=tenant_id)
    calib = datasets.get_dataset(db, req.calibration_dataset_id, tenant_id=tenant_id, role="calibration dataset") \
        if req.calibration_dataset_id else None
    ev = datasets.get_dataset(db, req.eval_dataset_id, tenant_id=tenant_id, role="evaluation dataset") \
        if req.eval_dataset_id else None
    try:
        opts = parse_options(req.recipe, req.options)
        if req.recipe in RECIPES_NEEDING_PYTORCH and model.format != "pt2":
            raise EngineError(
                "pytorch_model_required",
                f"recipe {req.recipe} fine-tunes the model in PyTorch and needs it uploaded as a torch.export "
                f"archive (.pt2); this model is {model.format}; {HOW_TO_MAKE_PT2}",
            )
        if model.external_data_bytes:
            opts = _for_external_data(req.recipe, opts)
        inputs = [TensorInfo(i["name"], i["dtype"], tuple(i["shape"])) for i in model.inputs]
        calib_info = datasets.dataset_info(calib) if calib else None
        eval_info = datasets.dataset_info(ev) if ev else None
        plan_split(req.recipe, opts, inputs, calib_info, eval_info)
        target = req.accuracy_target.model_dump(exclude_none=True) if req.accuracy_target else None
        check_target(target, calib_info, eval_info)
    except EngineError as exc:
        raise from_engine(exc) from exc
    tenants.check_active_jobs(db, tenant_id, settings=settings)
    tenants.check_storage_quota(db, tenant_id, settings=settings, adding=0, what="this job's artifact")
    device, queue = route(req.device, settings=settings)
    queue = route_by_memory(db, queue, estimate_mb=memory_estimate_mb(model))
    job = Job(
        id=new_id(),
        tenant_id=tenant_id,
        model_id=model.id,
        calibration_dataset_id=calib.id if calib else None,
        eval_dataset_id=ev.id if ev else None,
        recipe=req.recipe,
        options=opts.to_dict(req.recipe),
        accuracy_target=target,
        device=device,
        queue=queue,
        status=QUEUED,
        stage=None,
        progress=0,
        cancel_requested=False,
        attempts=0,
        created_at=utcnow(),
        callback_url=req.callback_url,
        deliveries=[],
    )
    db.add(job)
    db.flush()
    return job


def _for_external_data(recipe: str, opts: RecipeOptions) -> RecipeOptions:
    """A model with external data runs on the streaming engine (worker/engine/streaming.py): refused now
    (422) for a recipe or option it does not run."""
    why = streaming.refusal(recipe, opts.to_dict(recipe))
    if why is not None:
        raise EngineError("external_data_not_supported", why)
    return opts


def get_job(db: Session, job_id: str, *, tenant_id: str) -> Job:
    """The tenant's job; another tenant's answers exactly like a missing one."""
    job = db.get(Job, job_id) if is_uuid(job_id) else None
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job with id '{job_id}'", code="job_not_found")
    return job


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, job_id = raw.split("|", 1)
        when = datetime.fromisoformat(ts)
        if when.tzinfo is not None:
            when = when.astimezone(UTC)  # out-of-range offsets fail here, not in the database layer
        return when, job_id
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError) as exc:
        raise Invalid("the cursor is not valid; use the next_cursor value of a previous page", code="invalid_cursor") \
            from exc


def list_jobs(db: Session, status: str | None, *, limit: int, cursor: str | None,
              tenant_id: str, id_prefix: str | None = None) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paginated on (created_at, id) so pages stay stable while jobs are added. With
    ``id_prefix``, only the jobs whose id starts with it (the client resolves the pages' short ids so)."""
    if status is not None and status not in STATUSES:
        raise Invalid(f"unknown status '{status}'; one of {', '.join(STATUSES)}", code="invalid_status")
    q = sa.select(Job).where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    if id_prefix is not None:
        prefix = id_prefix.lower()
        if not prefix or len(prefix) > 36 or set(prefix) - set("0123456789abcdef-"):
            raise Invalid(f"id_prefix '{id_prefix}' cannot begin a job id (hex digits and '-', at most 36)",
                          code="invalid_id_prefix")
        q = q.where(Job.id.startswith(prefix, autoescape=True))
    if cursor:
        ts, last_id = _decode_cursor(cursor)
        q = q.where(sa.or_(Job.created_at < ts, sa.and_(Job.created_at == ts, Job.id < last_id)))
    rows = list(db.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def cancel_job(db: Session, job_id: str, *, tenant_id: str) -> Job:
    """Queued jobs are cancelled at once; running ones stop at the worker's next progress check."""
    job = get_job(db, job_id, tenant_id=tenant_id)
    done = lifecycle.cancel(db, job_id)
    db.refresh(job)  # the UPDATE changed the row, not this session's copy of it
    if done is lifecycle.Transition.WRONG_STATE:
        raise Conflict(f"job is already {job.status}; only queued or running jobs can be cancelled",
                       code="job_finished")
    return job


def delete_job(db: Session, job_id: str, *, tenant_id: str) -> None:
    """Delete the row; the caller removes the files after its commit (a failed commit keeps both)."""
    job = get_job(db, job_id, tenant_id=tenant_id)
    if job.status == RUNNING:
        # The worker notices the missing row when it records its result and discards its output.
        job.cancel_requested = True
    db.delete(job)
    db.flush()


def artifact_for(db: Session, job_id: str, *, tenant_id: str) -> Job:
    job = get_job(db, job_id, tenant_id=tenant_id)
    if job.status != SUCCEEDED or not job.artifact_path:
        raise Conflict(f"the job is {job.status}; an artifact exists only for succeeded jobs", code="no_artifact")
    if job.artifact_expired_at is not None:
        raise Gone(expired_message(job), code="artifact_expired")
    return job


def expired_message(job: Job) -> str:
    when = job.artifact_expired_at
    return (f"the job's files were removed on {when:%Y-%m-%d} by the retention (LOWBIT_RETENTION_DAYS); its report "
            "and settings stay: submit the job again for a new artifact")


def report_for(db: Session, job_id: str, *, tenant_id: str) -> dict[str, Any]:
    job = get_job(db, job_id, tenant_id=tenant_id)
    if job.report is None:
        raise Conflict(f"the job is {job.status}; its report is written when it succeeds", code="no_report")
    return job.report


def waiting_reason(job: Job) -> str | None:
    """Why a queued job is not running, when the answer is that no live worker consumes its queue."""


    db = object_session(job)
    if job.status != QUEUED or db is None or job.queue in workers.live_queues(db):
        return None
    return workers.waiting_reason(job.queue)


# The queue that carries a job asking for each device.
QUEUE_FOR_DEVICE = {CPU_DEVICE: CPU_QUEUE, GPU_DEVICE: GPU_QUEUE}


def route(device: str | None, *, settings: Settings) -> tuple[str, str]:
    """(device, queue) of a new job: the hardware it asks for, and the queue its messages go to. The one place
    a job's queue is chosen: today the queue named after the device (the server's default queue when the job
    names none), so routing can change later (e.g. by memory) without changing what a job asked for."""
    if device is None:
        queue = settings.default_queue
        return (GPU_DEVICE if queue == GPU_QUEUE else CPU_DEVICE), queue
    return device, QUEUE_FOR_DEVICE[device]


# A rough estimate of a job's peak memory from the model's declared size. A model with external data is streamed
# and validated one model at a time (benchmarks/scale.py: the validating process peaked at about the model's size);
# a self-contained one goes through the whole-model pipeline, where ONNX Runtime's quantizers and the two
# sessions validated side by side hold several copies.
STREAMED_FACTOR, WHOLE_MODEL_FACTOR, BASE_MB = 1.2, 4.0, 512


def memory_estimate_mb(model: ModelFile) -> int:
    factor = STREAMED_FACTOR if model.external_data_bytes else WHOLE_MODEL_FACTOR
    return int(BASE_MB + factor * model.size_bytes / 2**20)


def route_by_memory(db: Session, queue: str, *, estimate_mb: int) -> str:
    """The queue for a job needing about ``estimate_mb``: its own when a live worker there has that much (or
    declares nothing), else a queue of the same kind (``queue`` or ``queue-*``, e.g. cpu-large) whose live worker
    does; refused (422) when live workers exist and none has enough. With no live worker at all, the job waits
    on its queue as any job does."""
    alive = [(queues, mem) for queues, mem in workers.live_memory(db)
             if any(q == queue or q.startswith(queue + "-") for q in queues)]
    if not alive:
        return queue
    if any(queue in queues and (mem is None or mem >= estimate_mb) for queues, mem in alive):
        return queue
    for queues, mem in sorted(alive, key=lambda qm: qm[1] or 0):
        if mem is not None and mem >= estimate_mb:
            return next(q for q in queues if q == queue or q.startswith(queue + "-"))
    largest = max(mem or 0 for _queues, mem in alive)
    raise Invalid(
        f"this job needs about {estimate_mb} MB (estimated from the model's size) and the largest live worker for "
        f"queue {queue} declares {largest} MB; start one with more, e.g. 'lowbit worker --queues {queue}-large "
        f"--memory-gb {-(-estimate_mb // 1024)}'", code="not_enough_worker_memory",
        extra={"estimate_mb": estimate_mb, "largest_worker_mb": largest})


def to_out(job: Job) -> JobOut:
    base = f"/api/v1/jobs/{job.id}"
    return JobOut(
        id=job.id,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        recipe=job.recipe,
        options=job.options,
        accuracy_target=job.accuracy_target,
        model_id=job.model_id,
        calibration_dataset_id=job.calibration_dataset_id,
        eval_dataset_id=job.eval_dataset_id,
        device=job.device,
        queue=job.queue,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        links=JobLinks(self=base, artifact=f"{base}/artifact", report=f"{base}/report", page=f"/jobs/{job.id}"),
        callback_url=job.callback_url,
        deliveries=[DeliveryOut.model_validate(d) for d in job.deliveries],
        waiting_reason=waiting_reason(job),
        artifact_expired_at=job.artifact_expired_at,
    )


def mark_enqueue_failed(db: Session, job_id: str, *, reason: str) -> None:
    lifecycle.enqueue_failed(db, job_id, reason)


def recover_interrupted(db: Session) -> tuple[list[tuple[str, str]], list[str]]:
    """Jobs left 'running' by a worker that is known to be gone: back to 'queued' (the caller enqueues
    them after committing), or 'failed' once they have been interrupted MAX_ATTEMPTS times."""
    return requeue_lost(db, lambda worker: True, whole_jobs=True)


def requeue_lost(db: Session, gone: Callable[[str | None], bool],
                 *, whole_jobs: bool = False) -> tuple[list[tuple[str, str]], list[str]]:
    """Running jobs whose process ``gone`` says is dead (`lowbit serve` saw its embedded worker die, and it is
    the only one on its data directory): back to 'queued' at once instead of after the lease (the caller
    enqueues them after committing; the next attempt takes over), cancelled if asked, failed after
    MAX_ATTEMPTS. Each change is a conditional UPDATE on (status, attempts, worker), so a job that a worker
    moved on meanwhile is left alone. An auto job is lost when its own task died before it planned candidates,
    or a candidate of its attempt was running in a process that is gone; candidates waiting in the broker are
    not lost (the stale-job sweep covers the rest). ``whole_jobs``: every running job is lost, whatever its
    candidates (`lowbit serve` starting again, its workers gone with the server before it)."""

    requeued: list[tuple[str, str]] = []
    failed: list[str] = []
    rows = db.execute(sa.select(Job.id, Job.attempts, Job.worker, Job.queue, Job.recipe, Job.cancel_requested)
                      .where(Job.status == RUNNING).order_by(Job.created_at, Job.id)).all()
    for job_id, attempts, worker, queue, recipe, cancel in rows:
        if whole_jobs:
            lost = True
        elif recipe == "auto":
            candidates = db.execute(sa.select(AutoCandidate.status, AutoCandidate.worker).where(
                AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempts)).all()
            lost = any(st == CANDIDATE_RUNNING and gone(w) for st, w in candidates) or \
                (not candidates and gone(worker))
        else:
            lost = gone(worker)
        if not lost:
            continue
        moved = lifecycle.worker_lost(db, job_id, attempts, cancel_requested=bool(cancel), worker=worker)
        if moved is not lifecycle.Transition.APPLIED:
            continue
        status = lifecycle.after_worker_lost(attempts, bool(cancel))
        if status == QUEUED:
            requeued.append((job_id, queue))
        elif status == FAILED:
            failed.append(job_id)
    db.flush()
    return requeued, failed
