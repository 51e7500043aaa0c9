"""The Celery task that runs one job.

Claim the row with a conditional UPDATE (queued -> running): a redelivered or duplicate message
finds the row already claimed and does nothing. Run the engine with no transaction open; record
progress, stage start/end times and the result in short transactions of their own. Once the result is
committed, deliver the job's webhook, if it has a callback_url (outside any transaction; a webhook never
changes the job's outcome).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery.signals import worker_ready
from sqlalchemy.orm import Session, sessionmaker

from app.datasets.models import Dataset
from app.db import make_engine, make_sessionmaker, utcnow
from app.jobs.models import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from app.models.models import ModelFile
from app.settings import Settings, get_settings
from app.storage import Storage
from app.webhooks import notify
from worker.celery_app import TASK_RUN_JOB, celery_app
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError, JobCancelled

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5


@lru_cache(maxsize=1)
def _sessions() -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(get_settings().resolved_database_url))


class StageTimer:
    """When each stage started and finished (unix seconds), as stored in ``jobs.stage_times``."""

    def __init__(self, stage: str, started: float) -> None:
        self.times: dict[str, dict[str, float]] = {stage: {"started": round(started, 3)}}
        self.current: str | None = stage

    def enter(self, stage: str) -> bool:
        """Note that ``stage`` has begun; True if that is a change."""
        if stage == self.current:
            return False
        now = round(time.time(), 3)
        if self.current is not None:
            self.times[self.current]["finished"] = now
        # A stage entered again keeps its first start and spans until its last end.
        self.times.setdefault(stage, {"started": now}).pop("finished", None)
        self.current = stage
        return True

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self.times.items()}

    def close(self) -> dict[str, dict[str, float]]:
        if self.current is not None:
            self.times[self.current]["finished"] = round(time.time(), 3)
            self.current = None
        return self.snapshot()


class LeaseLost(Exception):
    """This attempt's claim on the job was taken over (its heartbeat went stale and the job was
    re-queued): stop, and leave the job and its files to the attempt that owns them now."""


def claim(factory: sessionmaker[Session], job_id: str, timer: StageTimer | None = None) -> int:
    """queued -> running. Returns this attempt's number (the job's new ``attempts``), 0 if not claimable."""
    with factory.begin() as s:
        res = s.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.status == QUEUED)
            .values(status=RUNNING, stage="preparing", progress=0, started_at=utcnow(), attempts=Job.attempts + 1,
                    heartbeat_at=utcnow(), stage_times=timer.snapshot() if timer else None)
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            return 0
        return int(s.execute(sa.select(Job.attempts).where(Job.id == job_id)).scalar_one())


def _mine(job_id: str, attempt: int) -> Any:
    return sa.and_(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)


def _finish(factory: sessionmaker[Session], job_id: str, attempt: int, **values: Any) -> bool:
    with factory.begin() as s:
        res = s.execute(sa.update(Job).where(_mine(job_id, attempt)).values(finished_at=utcnow(), **values))
        return bool(res.rowcount)  # type: ignore[attr-defined]


def _lost_to_another_attempt(factory: sessionmaker[Session], job_id: str, attempt: int) -> bool:
    """The job was re-queued (stale heartbeat) or is running under a newer attempt: not ours any more."""
    with factory() as s:
        row = s.execute(sa.select(Job.status, Job.attempts, Job.cancel_requested).where(Job.id == job_id)).first()
    if row is None or row.cancel_requested:
        return False
    return bool(row.status == QUEUED or (row.status == RUNNING and row.attempts != attempt))


class _Heartbeat:
    """Refreshes the job's heartbeat every ``interval`` seconds while the engine runs, from a thread (some
    stages report no progress for minutes). A stale heartbeat lets a sweeper re-queue the job."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, attempt: int, interval: float) -> None:
        self.factory, self.job_id, self.attempt, self.interval = factory, job_id, attempt, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                with self.factory.begin() as s:
                    s.execute(sa.update(Job).where(_mine(self.job_id, self.attempt)).values(heartbeat_at=utcnow()))
            except Exception:  # a missed beat is retried at the next one
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def sweep_stale(factory: sessionmaker[Session], lease_s: float, enqueue: Any) -> list[str]:
    """Re-queue running jobs whose heartbeat is older than ``lease_s`` (their worker died), or fail them
    after MAX_ATTEMPTS. Safe to run from several workers at once: each change is a conditional UPDATE
    on (status, attempts), and only the one that wins it enqueues. Returns the re-queued job ids."""
    from app.jobs.service import MAX_ATTEMPTS

    cutoff = utcnow() - timedelta(seconds=lease_s)
    with factory() as s:
        stale = s.execute(
            sa.select(Job.id, Job.attempts, Job.queue, Job.cancel_requested)
            .where(Job.status == RUNNING, sa.or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None)))
        ).all()
    requeued: list[str] = []
    for job_id, attempts, queue, cancel in stale:
        if cancel:
            values: dict[str, Any] = {"status": CANCELLED, "stage": None, "finished_at": utcnow()}
        elif attempts >= MAX_ATTEMPTS:
            values = {"status": FAILED, "stage": None, "finished_at": utcnow(), "error_code": "worker_lost",
                      "error_message": f"the worker running this job stopped responding {attempts} times before "
                      "it finished (killed, out of memory, or its machine went away); submit it again, and check "
                      "the workers' memory"}
        else:
            values = {"status": QUEUED, "stage": None, "progress": 0, "started_at": None, "heartbeat_at": None}
        with factory.begin() as s:
            res = s.execute(sa.update(Job).where(_mine(job_id, attempts),
                                                 sa.or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None)))
                            .values(**values))
        if res.rowcount and values["status"] == QUEUED:  # type: ignore[attr-defined]
            enqueue(job_id, queue)
            requeued.append(job_id)
            log.warning("job %s: worker lost (no heartbeat for %.0f s); queued again", job_id, lease_s)
    return requeued


class _Progress:
    """Writes stage/progress at most every PROGRESS_INTERVAL_S and notices cancellation."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, timer: StageTimer | None = None,
                 attempt: int = 1) -> None:
        self.factory = factory
        self.job_id = job_id
        self.attempt = attempt
        self.timer = timer or StageTimer("preparing", time.time())
        self.last_stage: str | None = None
        self.last_write = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        from worker.engine.pipeline import progress_percent

        now = time.monotonic()
        if stage == self.last_stage and now - self.last_write < PROGRESS_INTERVAL_S and fraction < 1.0:
            return
        self.last_stage, self.last_write = stage, now
        values: dict[str, Any] = {"stage": stage, "progress": progress_percent(stage, fraction),
                                  "heartbeat_at": utcnow()}
        if self.timer.enter(stage):
            values["stage_times"] = self.timer.snapshot()
        with self.factory.begin() as s:
            res = s.execute(sa.update(Job).where(_mine(self.job_id, self.attempt)).values(**values))
            cancelled = s.execute(sa.select(Job.cancel_requested).where(Job.id == self.job_id)).scalar()
        if not res.rowcount and _lost_to_another_attempt(self.factory, self.job_id, self.attempt):  # type: ignore[attr-defined]
            raise LeaseLost()
        if not res.rowcount or cancelled is None or cancelled:  # type: ignore[attr-defined]
            raise JobCancelled()


def execute(job_id: str, settings: Settings | None = None, factory: sessionmaker[Session] | None = None) -> str:
    """Run job ``job_id`` to an end state; returns that state (or 'skipped' when not claimable). Then deliver
    its webhook: also for a job cancelled while queued, whose message still arrives here and is skipped."""
    s = settings or get_settings()
    factory = factory or _sessions()
    state = _run(job_id, s, factory)
    notify(factory, s, job_id)  # at most once per job; never raises
    return state


def _run(job_id: str, s: Settings, factory: sessionmaker[Session]) -> str:
    timer = StageTimer("preparing", time.time())
    attempt = claim(factory, job_id, timer)
    if not attempt:
        log.info("job %s is not queued (already claimed, cancelled or deleted); nothing to do", job_id)
        return "skipped"
    storage = Storage(s.data_dir)
    with factory() as sess:
        job = sess.get(Job, job_id)
        if job is None:
            return "skipped"
        model = sess.get(ModelFile, job.model_id)
        calib = sess.get(Dataset, job.calibration_dataset_id) if job.calibration_dataset_id else None
        ev = sess.get(Dataset, job.eval_dataset_id) if job.eval_dataset_id else None
        recipe, options, target, queue = job.recipe, dict(job.options), job.accuracy_target, job.queue
        model_path = Path(model.storage_path) if model else None
        calib_path = Path(calib.storage_path) if calib else None
        eval_path = Path(ev.storage_path) if ev else None
    job_dir = storage.job_dir(job_id)
    # Per attempt: a stale attempt that is still running somewhere can never overwrite a newer one's files.
    artifact = job_dir / f"model.quantized.{attempt}.onnx"
    work_dir = job_dir / f"work-{attempt}"
    try:
        if model_path is None or not model_path.exists():
            raise EngineError("model_missing", "the job's model file is gone from storage; upload it again")
        from worker.engine import pipeline

        cfg = QuantizeConfig(
            model_path=model_path,
            output_path=artifact,
            recipe=recipe,
            options=parse_options(recipe, options),
            calibration_path=calib_path,
            eval_path=eval_path,
            work_dir=work_dir,
            threads=s.worker_threads,
            device="cuda" if queue == "gpu" else s.worker_device,
            job_id=job_id,
            cache_dir=s.data_dir / "cache" / "calibration",
            export_cache_dir=s.data_dir / "cache" / "pt2-export",
        )
        with _Heartbeat(factory, job_id, attempt, s.job_heartbeat_s):
            result = pipeline.run(cfg, _Progress(factory, job_id, timer, attempt))
    except LeaseLost:
        log.warning("job %s: attempt %d lost its claim to a newer attempt; stopping", job_id, attempt)
        artifact.unlink(missing_ok=True)
        return "lost"
    except JobCancelled:
        if _finish(factory, job_id, attempt, status=CANCELLED, stage=None, stage_times=timer.close()) or \
                not _lost_to_another_attempt(factory, job_id, attempt):
            storage.remove_job(job_id)
        return CANCELLED
    except EngineError as exc:
        log.info("job %s failed: %s", job_id, exc)
        _finish(factory, job_id, attempt, status=FAILED, error_code=exc.code, error_message=exc.message,
                stage_times=timer.close())
        return FAILED
    except Exception as exc:  # a bug or an environment problem: still a recorded, readable failure
        log.exception("job %s crashed", job_id)
        _finish(factory, job_id, attempt, status=FAILED, error_code="internal_error",
                error_message=f"unexpected error while quantizing ({type(exc).__name__}: {str(exc)[:300]}); "
                "this is a lowbit problem, not your model's, please report it", stage_times=timer.close())
        return FAILED
    finally:
        _cleanup_work(work_dir)
    try:
        from worker.engine.validate import finite_or_none

        report = result.report
        if target:
            report["accuracy_target"] = evaluate_target(target, report)
        recorded = _finish(
            factory, job_id, attempt, status=SUCCEEDED, stage=None, progress=100, report=finite_or_none(report),
            artifact_path=str(result.artifact_path), artifact_sha256=result.artifact_sha256,
            artifact_bytes=result.artifact_bytes, stage_times=timer.close(),
        )
    except Exception as exc:  # recording the result failed: the job must still end, readably
        log.exception("job %s: recording the result failed", job_id)
        artifact.unlink(missing_ok=True)
        _finish(factory, job_id, attempt, status=FAILED, error_code="internal_error",
                error_message=f"the model was quantized but the result could not be recorded ({type(exc).__name__}: "
                f"{str(exc)[:300]}); submit the job again", stage_times=timer.close())
        return FAILED
    if not recorded:
        if _lost_to_another_attempt(factory, job_id, attempt):
            artifact.unlink(missing_ok=True)  # a newer attempt owns the job now
            return "lost"
        # Deleted or cancelled while the engine ran: do not leave an orphaned artifact behind.
        storage.remove_job(job_id)
        return CANCELLED
    return SUCCEEDED


def _cleanup_work(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def evaluate_target(target: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Was the user's accuracy target met? Int8 recipes do not search for it; they report against it."""
    metric = target["metric"]
    acc = report["accuracy"]
    original: float | None
    if metric == "label_accuracy":
        labels = acc.get("labels")
        value = labels["quantized"] if labels else None
        original = labels["original"] if labels else None
    else:
        vals = [o[metric] for o in acc["outputs"] if o.get(metric) is not None]
        if metric == "sqnr_db":
            # sqnr_db is null for an output reproduced exactly (infinite SQNR): it meets any minimum.
            exact = [o for o in acc["outputs"] if o.get("sqnr_db") is None and o.get("max_abs_error") == 0]
            if exact and len(exact) == len(acc["outputs"]):
                return {**target, "value": None, "met": True, "note": "every output reproduced exactly"}
        value = min(vals) if vals else None
        original = {"cosine": 1.0, "top1_agreement": 1.0}.get(metric)
    met: bool | None = None
    if value is not None:
        if target.get("min") is not None:
            met = value >= float(target["min"])
        elif target.get("max_drop") is not None and original is not None:
            met = (original - value) <= float(target["max_drop"])
    return {**target, "value": value, "met": met}


@celery_app.task(name=TASK_RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    log.info("worker pid %s running job %s", os.getpid(), job_id)
    return execute(job_id)


def _start_sweeper(**_: Any) -> None:
    """Each worker's main process re-queues jobs whose worker died (stale heartbeat), every lease/3 s."""
    settings = get_settings()

    def loop() -> None:
        from app.queue import CeleryQueue

        queue = CeleryQueue(settings)
        while True:
            time.sleep(max(1.0, settings.job_lease_s / 3))
            try:
                sweep_stale(_sessions(), settings.job_lease_s, queue.enqueue)
            except Exception:
                log.warning("stale-job sweep failed", exc_info=True)

    threading.Thread(target=loop, name="lowbit-sweeper", daemon=True).start()


worker_ready.connect(_start_sweeper, weak=False)
