"""The Celery task that runs one job.

Claim the row with a conditional UPDATE (queued -> running): a redelivered or duplicate message
finds the row already claimed and does nothing. Run the engine with no transaction open; record
progress, stage start/end times and the result in short transactions of their own. Once the result is
committed, deliver the job's webhook, if it has a callback_url (outside any transaction; a webhook never
changes the job's outcome).

The engine itself runs in a sandboxed child process (``run_engine``, ``worker/sandbox.py``): a model that
crashes, hangs or balloons fails its own job and the worker lives on. Faults around it:
- the pool process dies mid-job: the message comes back (``reject_on_worker_lost``) and the next attempt
  takes the job over at once when the row names a process on this host that is gone, or its heartbeat
  is older than two intervals (``claim``); after MAX_ATTEMPTS such losses the job fails;
- the whole worker dies: another worker's sweeper re-queues the job once its lease runs out;
- a queued job that no broker message carries (the API died before publishing it, the broker lost its
  data) is published again by the sweeper's reconciler (``app/queue.py``);
- SIGTERM (a deploy): the running job is stopped and handed back to the queue, not lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.orm import Session, sessionmaker

from app.datasets.models import Dataset
from app.db import make_engine, make_sessionmaker, utcnow
from app.jobs.models import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from app.models.models import ModelFile
from app.procs import children, process_gone
from app.settings import Settings, get_settings
from app.storage import Storage
from app.webhooks import notify
from worker import sandbox
from worker.celery_app import TASK_RUN_JOB, celery_app
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError, JobCancelled

if TYPE_CHECKING:  # the engine's heavy imports stay out of the worker's main process
    from worker.engine.pipeline import QuantizeResult

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5
# While the engine runs, the job row's cancel flag is read (and the heartbeat written) at least this often.
CANCEL_POLL_S = 1.0
# What the sandbox child imports before it is given a job (see sandbox._spares): the engine, and ONNX
# Runtime's quantization tools (whose shape inference imports torch, seconds on its own).
ENGINE_PRELOAD = ("worker.engine.pipeline", "onnxruntime.quantization", "onnxruntime.tools.symbolic_shape_infer")
# Set by SIGTERM in a pool process while it runs a job: stop the engine and hand the job back.
_handing_back = threading.Event()


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


class HandedBack(Exception):
    """The worker is shutting down (SIGTERM): the running job goes back to the queue for another worker."""


def worker_id() -> str:
    """This process, as the job row's ``worker`` names it: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(worker: str | None) -> bool:
    """True when ``worker`` names a process on this host that no longer exists."""
    return process_gone(worker)


def claim(factory: sessionmaker[Session], job_id: str, timer: StageTimer | None = None,
          heartbeat_s: float | None = None) -> int:
    """queued -> running. Returns this attempt's number (the job's new ``attempts``), 0 if not claimable.

    A job still 'running' under a worker that is gone (a process on this host that no longer exists, or a
    heartbeat older than two intervals) is taken over with a conditional UPDATE on its attempt number: this
    is a message redelivered after its pool process was killed, and waiting for the lease would only
    delay it. After MAX_ATTEMPTS lost attempts the job fails instead."""
    from app.jobs.service import MAX_ATTEMPTS

    started = {"stage": "preparing", "progress": 0, "started_at": utcnow(), "attempts": Job.attempts + 1,
               "heartbeat_at": utcnow(), "worker": worker_id(), "stage_times": timer.snapshot() if timer else None}
    with factory.begin() as s:
        res = s.execute(sa.update(Job).where(Job.id == job_id, Job.status == QUEUED)
                        .values(status=RUNNING, **started))
        if res.rowcount:  # type: ignore[attr-defined]
            return int(s.execute(sa.select(Job.attempts).where(Job.id == job_id)).scalar_one())
    with factory() as s:
        row = s.execute(sa.select(Job.status, Job.attempts, Job.worker, Job.heartbeat_at, Job.cancel_requested)
                        .where(Job.id == job_id)).first()
    if row is None or row.status != RUNNING:
        return 0
    stale = heartbeat_s is not None and (
        row.heartbeat_at is None or row.heartbeat_at < utcnow() - timedelta(seconds=2 * heartbeat_s))
    if not (stale or _process_gone(row.worker)):
        return 0  # a live attempt runs it: this is a duplicate message
    if row.cancel_requested:
        _finish(factory, job_id, row.attempts, status=CANCELLED, stage=None)
        return 0
    if row.attempts >= MAX_ATTEMPTS:
        _finish(factory, job_id, row.attempts, status=FAILED, stage=None, error_code="worker_lost",
                error_message=f"the process running this job died {row.attempts} times before it finished "
                "(killed, out of memory, or crashed by the model); submit it again, and check the workers' memory "
                "and the model")
        log.warning("job %s: its worker died %d times; failed", job_id, row.attempts)
        return 0
    with factory.begin() as s:
        res = s.execute(sa.update(Job).where(_mine(job_id, row.attempts), Job.worker == row.worker).values(**started))
        if not res.rowcount:  # type: ignore[attr-defined]
            return 0  # another redelivery or a sweeper won
    log.warning("job %s: attempt %d died with its process (%s); attempt %d takes over", job_id, row.attempts,
                row.worker, row.attempts + 1)
    return int(row.attempts) + 1


def _mine(job_id: str, attempt: int) -> Any:
    return sa.and_(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)


def _finish(factory: sessionmaker[Session], job_id: str, attempt: int, **values: Any) -> bool:
    """Record the attempt's end (if the attempt still owns the job). The database may be briefly away (a
    restart): keep trying for a while rather than leave a finished job 'running' for the sweeper."""
    for delay in (0.5, 1, 2, 4, 8, 15, 30):
        try:
            with factory.begin() as s:
                res = s.execute(sa.update(Job).where(_mine(job_id, attempt)).values(finished_at=utcnow(), **values))
                return bool(res.rowcount)  # type: ignore[attr-defined]
        except sa.exc.OperationalError:
            log.warning("job %s: the database is unreachable; recording the result again in %s s", job_id, delay)
            time.sleep(delay)
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


def sweep_stale(factory: sessionmaker[Session], lease_s: float, enqueue: Any,
                held: Callable[[set[str]], set[str] | None] | None = None) -> list[str]:
    """Re-queue running jobs whose heartbeat is older than ``lease_s`` (their worker died), or fail them
    after MAX_ATTEMPTS. Safe to run from several workers at once: each change is a conditional UPDATE
    on (status, attempts), and only the one that wins it enqueues. Returns the re-queued job ids.

    An ``auto`` job has no process of its own while its candidates wait for a free worker: it is not
    stale while candidates of its attempt are pending and the broker still carries messages for it
    (``held``: the job ids the broker holds in the given queues, None if it cannot tell)."""
    from app.jobs.models import CANDIDATE_PENDING, AutoCandidate
    from app.jobs.service import MAX_ATTEMPTS

    cutoff = utcnow() - timedelta(seconds=lease_s)
    with factory() as s:
        stale = s.execute(
            sa.select(Job.id, Job.attempts, Job.queue, Job.cancel_requested, Job.recipe)
            .where(Job.status == RUNNING, sa.or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None)))
        ).all()
        waiting = {
            job_id for (job_id,) in s.execute(
                sa.select(AutoCandidate.job_id).join(Job, Job.id == AutoCandidate.job_id)
                .where(AutoCandidate.job_id.in_([row.id for row in stale if row.recipe == "auto"]),
                       AutoCandidate.attempt == Job.attempts, AutoCandidate.status == CANDIDATE_PENDING)
                .distinct())
        } if any(row.recipe == "auto" for row in stale) else set()
    carried = (held({row.queue for row in stale if row.id in waiting}) if held and waiting else None) or set()
    requeued: list[str] = []
    for job_id, attempts, queue, cancel, _ in stale:
        if job_id in waiting and job_id in carried and not cancel:
            continue  # its candidates are queued behind other work, not lost
        if cancel:
            values: dict[str, Any] = {"status": CANCELLED, "stage": None, "finished_at": utcnow()}
        elif attempts >= MAX_ATTEMPTS:
            values = {"status": FAILED, "stage": None, "finished_at": utcnow(), "error_code": "worker_lost",
                      "error_message": f"the worker running this job stopped responding {attempts} times before "
                      "it finished (killed, out of memory, or its machine went away); submit it again, and check "
                      "the workers' memory"}
        else:
            values = {"status": QUEUED, "stage": None, "progress": 0, "started_at": None, "heartbeat_at": None,
                      "enqueued_at": utcnow()}
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


def run_engine(cfg: QuantizeConfig, progress: Any, settings: Settings | None = None) -> QuantizeResult:
    """Run ``pipeline.run(cfg)`` in a sandboxed child process (memory, CPU-time and wall-clock limits from
    ``settings``) and return its result. ``progress(stage, fraction)`` receives the engine's progress, and is
    called again with the latest values at least every CANCEL_POLL_S so that it can notice a cancellation
    (raise JobCancelled) or a lost lease: whatever it raises kills the child at once and propagates. A crash,
    a limit or the timeout raises EngineError (engine_crashed, out_of_memory, cpu_time_exceeded,
    job_timeout); an EngineError of the engine is raised as is. SIGTERM on this process while it runs
    (a worker shutting down) stops the child and raises HandedBack."""
    s = settings or get_settings()
    # CUDA maps tens of GB of address space before it allocates anything: an address-space limit would stop
    # every GPU job, so on a machine with an NVIDIA device a job that may use it runs without one.
    gpu = cfg.device != "cpu" and Path("/dev/nvidiactl").exists()
    limits = sandbox.Limits(memory_mb=0 if gpu else s.job_memory_limit_mb, cpu_s=s.job_cpu_limit_s,
                            timeout_s=s.job_timeout_s, file_mb=s.job_file_limit_mb)
    latest: list[Any] = ["preparing", 0.0]
    last_call = [time.monotonic()]

    def report(stage: str, fraction: float) -> None:
        latest[:] = [stage, fraction]
        last_call[0] = time.monotonic()
        try:
            progress(stage, fraction)
        except (JobCancelled, LeaseLost):
            raise
        except sa.exc.OperationalError:  # the database is away for a moment: the engine keeps going
            log.warning("job %s: progress not recorded (database unreachable)", cfg.job_id)

    def on_event(event: Any) -> None:
        report(str(event[0]), float(event[1]))

    def tick() -> None:
        if _handing_back.is_set():
            raise HandedBack()
        if time.monotonic() - last_call[0] >= CANCEL_POLL_S:
            report(latest[0], latest[1])

    # Billiard installs its own SIGTERM handler (exit at once) after the pool's initializer, so ours goes in
    # for the length of the run, and only where signals can be handled: the main thread.
    previous = None
    if threading.current_thread() is threading.main_thread():
        _handing_back.clear()
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        data = sandbox.run("worker.sandbox:quantize", cfg, limits, on_event, tick, preload=ENGINE_PRELOAD,
                           spare=True)
        result: QuantizeResult = sandbox.result_from(data)
        return result
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
    attempt = claim(factory, job_id, timer, s.job_heartbeat_s)
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
    if recipe == "auto":  # its candidates run as sub-tasks of their own, on any worker (worker/auto_tasks.py)
        from worker import auto_tasks

        return auto_tasks.start(job_id, attempt, s, factory)
    job_dir = storage.job_dir(job_id)
    # Per attempt: a stale attempt that is still running somewhere can never overwrite a newer one's files.
    artifact = job_dir / f"model.quantized.{attempt}.onnx"
    work_dir = job_dir / f"work-{attempt}"
    for earlier in range(1, attempt):  # what attempts that died with their process left behind
        _cleanup_work(job_dir / f"work-{earlier}")
        (job_dir / f"model.quantized.{earlier}.onnx").unlink(missing_ok=True)
    try:
        if model_path is None or not model_path.exists():
            raise EngineError("model_missing", "the job's model file is gone from storage; upload it again")
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
            accuracy_target=target,  # the engine reports against it (report.accuracy_target)
        )
        with _Heartbeat(factory, job_id, attempt, s.job_heartbeat_s):
            result = run_engine(cfg, _Progress(factory, job_id, timer, attempt), s)
    except HandedBack:
        _hand_back(factory, s, job_id, attempt, queue)
        artifact.unlink(missing_ok=True)
        return "handed_back"
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
        artifact.unlink(missing_ok=True)  # a failed job keeps no artifact, whole or partial (disk_full)
        _finish(factory, job_id, attempt, status=FAILED, error_code=exc.code, error_message=exc.message,
                stage_times=timer.close())
        return FAILED
    except Exception as exc:  # a bug or an environment problem: still a recorded, readable failure
        log.exception("job %s crashed", job_id)
        artifact.unlink(missing_ok=True)
        if isinstance(exc, sandbox.ChildFailed):
            log.error("job %s: the engine's traceback:\n%s", job_id, exc.trace)
        kind, text = (exc.type_name, exc.message) if isinstance(exc, sandbox.ChildFailed) else \
            (type(exc).__name__, str(exc))
        _finish(factory, job_id, attempt, status=FAILED, error_code="internal_error",
                error_message=f"unexpected error while quantizing ({kind}: {text[:300]}); "
                "this is a lowbit problem, not your model's, please report it", stage_times=timer.close())
        return FAILED
    finally:
        _cleanup_work(work_dir)
    try:
        from worker.engine.validate import finite_or_none

        report = result.report
        over = _over_quota(factory, s, job_id, int(result.artifact_bytes))
        if over is not None:  # keeping the artifact would take its tenant past the storage quota
            artifact.unlink(missing_ok=True)
            _finish(factory, job_id, attempt, status=FAILED, stage=None, error_code="storage_quota_exceeded",
                    error_message=over, stage_times=timer.close())
            return FAILED
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


def _over_quota(factory: sessionmaker[Session], s: Settings, job_id: str, artifact_bytes: int) -> str | None:
    """Why the job's artifact may not be kept (its tenant's storage quota), or None."""
    from app.errors import StorageQuotaExceeded
    from app.tenants.service import check_storage_quota

    with factory() as db:
        tenant_id = db.scalar(sa.select(Job.tenant_id).where(Job.id == job_id))
        if tenant_id is None:
            return None
        try:
            check_storage_quota(db, tenant_id, s, artifact_bytes, "this job's artifact")
        except StorageQuotaExceeded as exc:
            return exc.message
    return None


def _hand_back(factory: sessionmaker[Session], s: Settings, job_id: str, attempt: int, queue: str) -> None:
    """Put a job this worker stops running (it is shutting down) back in the queue, as if this attempt had
    never started, and publish it again: the worker's own message is acked as the task returns."""
    from app.queue import CeleryQueue

    with factory.begin() as sess:
        res = sess.execute(sa.update(Job).where(_mine(job_id, attempt)).values(
            status=QUEUED, stage=None, progress=0, started_at=None, heartbeat_at=None, worker=None,
            attempts=Job.attempts - 1, enqueued_at=None))
    if not res.rowcount:  # type: ignore[attr-defined]
        return  # cancelled, deleted or taken over meanwhile: nothing to hand back
    try:
        CeleryQueue(s).enqueue(job_id, queue)
    except Exception:  # the reconciler publishes it once the broker is back (enqueued_at stays NULL)
        log.warning("job %s: handed back, but publishing it failed", job_id, exc_info=True)
        return
    with factory.begin() as sess:
        sess.execute(sa.update(Job).where(Job.id == job_id, Job.status == QUEUED).values(enqueued_at=utcnow()))
    log.warning("job %s: worker shutting down; the job was handed back to the queue", job_id)


def _cleanup_work(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@celery_app.task(name=TASK_RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    log.info("worker pid %s running job %s", os.getpid(), job_id)
    return execute(job_id)


def _start_sweeper(**_: Any) -> None:
    """Each worker's main process re-queues jobs whose worker died (stale heartbeat) and publishes queued
    jobs that no broker message carries, every lease/3 s (or job_reconcile_after_s, if shorter); and applies
    the retention of finished jobs' files and removes stray files (app/gc.py) at start and every gc_interval_s."""
    settings = get_settings()

    def loop() -> None:
        from app import gc
        from app.queue import CeleryQueue, reconcile

        queue = CeleryQueue(settings)
        next_gc = time.monotonic()  # once at start, then every gc_interval_s
        while True:
            if time.monotonic() >= next_gc:
                next_gc = time.monotonic() + settings.gc_interval_s
                try:
                    gc.collect(_sessions(), Storage(settings.data_dir), settings)
                except Exception:
                    log.warning("retention / stray-file collection failed", exc_info=True)
            time.sleep(max(1.0, min(settings.job_lease_s / 3, settings.job_reconcile_after_s)))
            try:
                sweep_stale(_sessions(), settings.job_lease_s, queue.enqueue, queue.held_job_ids)
            except Exception:
                log.warning("stale-job sweep failed", exc_info=True)
            try:
                reconcile(_sessions(), queue, settings.job_reconcile_after_s)
            except Exception:
                log.warning("queue reconciliation failed", exc_info=True)

    threading.Thread(target=loop, name="lowbit-sweeper", daemon=True).start()


def _on_sigterm(signum: int, frame: Any) -> None:
    """A pool process told to stop while the engine runs: hand the job back (the run loop sees the flag
    within a fraction of a second) instead of dying with it."""
    _handing_back.set()


def _pool_processes() -> list[int]:
    """This process's children (in a worker's main process: its pool processes)."""
    return children(os.getpid())


# The worker's consumer (set when the worker is ready): a worker shutting down stops taking messages through it.
_consumer: list[Any] = []


def _keep_consumer(sender: Any = None, **_: Any) -> None:
    _consumer[:] = [sender]


# Set when the worker stops: its heartbeat row goes, and no beat may put it back.
_beat_stopped = threading.Event()


def _start_beat(sender: Any = None, **_: Any) -> None:
    """The main process keeps its row in ``workers`` fresh (app/workers.py): what /readyz, /metrics and a queued
    job's waiting_reason read to tell whether anyone consumes a queue."""
    from app import workers

    settings = get_settings()
    try:
        queues = sorted({q.name for q in sender.task_consumer.queues})
    except AttributeError:
        queues = [q.strip() for q in settings.worker_queues.split(",") if q.strip()]
    me = worker_id()

    def loop() -> None:
        while not _beat_stopped.is_set():
            try:
                workers.beat(_sessions(), me, queues, settings.worker_heartbeat_s)
            except Exception:  # the database may be away: the next beat tries again
                log.warning("worker heartbeat failed", exc_info=True)
            _beat_stopped.wait(settings.worker_heartbeat_s)

    threading.Thread(target=loop, name="lowbit-worker-beat", daemon=True).start()


def _stop_beat(**_: Any) -> None:
    """A worker shutting down stops counting as one at once (it takes no more jobs)."""
    from app import workers

    _beat_stopped.set()
    with contextlib.suppress(Exception):
        workers.forget(_sessions(), [worker_id()])


def _stop_consuming() -> None:
    """Stop taking messages: the filesystem transport keeps delivering through a warm shutdown, and this
    worker would otherwise take back the very job it just handed back, or start another one, only to be
    killed with it."""
    for consumer in _consumer:
        try:
            for queue in list(consumer.task_consumer.queues):
                consumer.cancel_task_queue(queue.name)
        except Exception:  # best effort: a job it still takes is handed back or re-queued like any other
            log.warning("could not stop consuming before shutdown", exc_info=True)


def _on_worker_shutting_down(**_: Any) -> None:
    """Celery's warm shutdown waits for running tasks to finish, which may take an hour: tell the pool
    processes instead, so each hands its job back to the queue and the worker exits within seconds."""
    _stop_consuming()
    _stop_beat()
    for pid in _pool_processes():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


def _forget_inherited_connections(**_: Any) -> None:
    """A pool process forked after the main process's sweeper opened database connections must not use
    them (two processes on one socket corrupt each other's sessions): give it a pool of its own, leaving
    the inherited connections untouched for the main process."""
    if _sessions.cache_info().currsize:
        _sessions().kw["bind"].dispose(close=False)


def _stop_with_supervisor(**_: Any) -> None:
    """A worker started by `lowbit serve` (LOWBIT_SUPERVISOR_PID) gets SIGTERM when the server dies, even by
    SIGKILL: it hands its running job back and exits instead of living on unsupervised."""
    parent = os.environ.get("LOWBIT_SUPERVISOR_PID", "")
    if not parent.isdigit():
        return
    sandbox._prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the server died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


worker_init.connect(_stop_with_supervisor, weak=False)
worker_ready.connect(_start_sweeper, weak=False)
worker_ready.connect(_keep_consumer, weak=False)
worker_ready.connect(_start_beat, weak=False)
worker_shutdown.connect(_stop_beat, weak=False)
worker_process_init.connect(_forget_inherited_connections, weak=False)
worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
