"""The Celery task that runs one job (``lowbit.run_job``), and the worker's process-level signal handlers.

Claim the row with a conditional UPDATE (queued -> running): a redelivered or duplicate message
finds the row already claimed and does nothing. Run the engine with no transaction open; record
progress, stage start/end times and the result in short transactions of their own. Once the result is
committed, deliver the job's webhook, if it has a callback_url (outside any transaction; a webhook never
changes the job's outcome). Every change of the job's status goes through ``app/jobs/lifecycle.py``.

The engine itself runs in a sandboxed child process (``worker/runner.py``'s ``run_engine``,
``worker/sandbox.py``): a model that crashes, hangs or balloons fails its own job and the worker lives on.
Faults around it:
- the pool process dies mid-job: the message comes back (``reject_on_worker_lost``) and the next attempt
  takes the job over at once when the row names a process on this host that is gone, or its heartbeat
  is older than two intervals (``claim``); after MAX_ATTEMPTS such losses the job fails;
- the whole worker dies: another worker's sweeper (``worker/sweeper.py``) re-queues the job once its lease
  runs out;
- a queued job that no broker message carries (the API died before publishing it, the broker lost its
  data) is published again by the sweeper's reconciler (``app/queue.py``);
- SIGTERM (a deploy): the running job is stopped and handed back to the queue, not lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.orm import Session, sessionmaker

from app import workers
from app.broker import TASK_RUN_JOB
from app.db import utcnow
from app.errors import StorageQuotaExceeded
from app.jobs import lifecycle
from app.jobs.lifecycle import Transition
from app.jobs.models import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from app.procs import children, process_gone
from app.settings import Settings, get_settings
from app.storage import Storage
from app.tenants.service import check_storage_quota
from app.webhooks import notify
from worker import auto_tasks, runner, sandbox, sweeper
from worker.celery_app import celery_app
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError, JobCancelled
from worker.runner import HandedBack, LeaseLost, StageTimer, worker_id

if TYPE_CHECKING:  # the engine's heavy imports stay out of the worker's main process
    from worker.engine.pipeline import QuantizeResult

log = logging.getLogger(__name__)


def claim(factory: sessionmaker[Session], job_id: str, timer: StageTimer | None = None,
          heartbeat_s: float | None = None) -> int:
    """queued -> running. Returns this attempt's number (the job's new ``attempts``), 0 if not claimable.

    A job still 'running' under a worker that is gone (a process on this host that no longer exists, or a
    heartbeat older than two intervals) is taken over with a conditional UPDATE on its attempt number: this
    is a message redelivered after its pool process was killed, and waiting for the lease would only
    delay it. After MAX_ATTEMPTS lost attempts the job fails instead."""
    me, times = worker_id(), timer.snapshot() if timer else None
    with factory.begin() as s:
        if lifecycle.claim(s, job_id, me, times) is Transition.APPLIED:
            return lifecycle.attempt_of(s, job_id)
    with factory() as s:
        row = s.execute(sa.select(Job.status, Job.attempts, Job.worker, Job.heartbeat_at, Job.cancel_requested)
                        .where(Job.id == job_id)).first()
    if row is None or row.status != RUNNING:
        return 0
    stale = heartbeat_s is not None and (
        row.heartbeat_at is None or row.heartbeat_at < utcnow() - timedelta(seconds=2 * heartbeat_s))
    if not (stale or process_gone(row.worker)):
        return 0  # a live attempt runs it: this is a duplicate message
    attempts, cancel = int(row.attempts), bool(row.cancel_requested)
    outcome = lifecycle.after_worker_lost(attempts, cancel)
    if outcome != QUEUED:  # cancelled, as was asked, or failed: it lost its worker once too often
        moved = _record(factory, job_id, lambda db: lifecycle.worker_lost(
            db, job_id, attempts, cancel_requested=cancel, worker=row.worker))
        if moved is Transition.APPLIED and outcome == FAILED:
            log.warning("job %s: its worker died %d times; failed", job_id, attempts)
        return 0
    with factory.begin() as s:
        if lifecycle.take_over(s, job_id, attempts, row.worker, me, times) is not Transition.APPLIED:
            return 0  # another redelivery or a sweeper won
    log.warning("job %s: attempt %d died with its process (%s); attempt %d takes over", job_id, attempts,
                row.worker, attempts + 1)
    return attempts + 1


def _record(factory: sessionmaker[Session], job_id: str, change: Callable[[Session], Transition]) -> Transition:
    """Record the attempt's end (``change``: a lifecycle transition, which applies only while the attempt
    still owns the job). The database may be briefly away (a restart): keep trying for a while rather than
    leave a finished job 'running' for the sweeper."""
    for delay in (0.5, 1, 2, 4, 8, 15, 30):
        try:
            with factory.begin() as s:
                return change(s)
        except sa.exc.OperationalError:
            log.warning("job %s: the database is unreachable; recording the result again in %s s", job_id, delay)
            time.sleep(delay)
    with factory.begin() as s:
        return change(s)


def execute(job_id: str, settings: Settings | None = None, factory: sessionmaker[Session] | None = None) -> str:
    """Run job ``job_id`` to an end state; returns that state (or 'skipped' when not claimable). Then deliver
    its webhook: also for a job cancelled while queued, whose message still arrives here and is skipped."""
    s = settings or get_settings()
    factory = factory or runner.sessions()
    state = _run(job_id, s, factory)
    notify(factory, s, job_id)  # at most once per job; never raises
    return state


def _run(job_id: str, s: Settings, factory: sessionmaker[Session]) -> str:
    timer = StageTimer("preparing", time.time())
    number = claim(factory, job_id, timer, s.job_heartbeat_s)
    if not number:
        log.info("job %s is not queued (already claimed, cancelled or deleted); nothing to do", job_id)
        return "skipped"
    storage = Storage(s.data_dir)
    job = _read_job(factory, job_id)
    if job is None:
        return "skipped"
    if job.recipe == "auto":  # its candidates run as sub-tasks of their own, on any worker (worker/auto_tasks.py)
        return auto_tasks.start(job_id, number, s, factory)
    attempt = _start_attempt(factory, job_id, number, timer, storage)
    result = _quantize(attempt, job, s)
    if isinstance(result, str):  # the attempt ended without a model to keep
        return result
    return _keep(attempt, result, s)


@dataclass(frozen=True)
class _JobInputs:
    """What an attempt reads from the job's rows, in one short session: none stays open while the engine runs."""

    recipe: str
    options: dict[str, Any]
    target: dict[str, Any] | None
    queue: str  # where it is handed back to
    device: str  # the hardware it asked for (Job.device)
    model_path: Path | None
    calib_path: Path | None
    eval_path: Path | None


def _read_job(factory: sessionmaker[Session], job_id: str) -> _JobInputs | None:
    """The job's recipe, options, queue and file paths; None when the job is gone."""
    with factory() as sess:
        job = sess.get(Job, job_id)
        if job is None:
            return None
        model_path, calib_path, eval_path = runner.job_files(sess, job)
        return _JobInputs(recipe=job.recipe, options=dict(job.options), target=job.accuracy_target,
                          queue=job.queue, device=job.device, model_path=model_path, calib_path=calib_path,
                          eval_path=eval_path)


@dataclass(frozen=True)
class _Attempt:
    """One attempt at a plain (not auto) job: what its steps share."""

    factory: sessionmaker[Session]
    job_id: str
    number: int
    timer: StageTimer
    storage: Storage
    artifact: Path
    work_dir: Path

    def fail(self, code: str, message: str, *, keep_stage: bool = True) -> Transition:
        """Record running -> failed, with the stage times up to now."""
        times = self.timer.close()
        return _record(self.factory, self.job_id, lambda db: lifecycle.fail(
            db, self.job_id, self.number, code, message, keep_stage=keep_stage, stage_times=times))


def _start_attempt(factory: sessionmaker[Session], job_id: str, number: int, timer: StageTimer,
                   storage: Storage) -> _Attempt:
    """The attempt's files, after removing what attempts that died with their process left behind."""
    job_dir = storage.job_dir(job_id)
    # Per attempt: a stale attempt that is still running somewhere can never overwrite a newer one's files.
    artifact = job_dir / f"model.quantized.{number}.onnx"
    work_dir = job_dir / f"work-{number}"
    for earlier in range(1, number):
        _cleanup_work(job_dir / f"work-{earlier}")
        (job_dir / f"model.quantized.{earlier}.onnx").unlink(missing_ok=True)
    return _Attempt(factory, job_id, number, timer, storage, artifact, work_dir)


def _config(attempt: _Attempt, job: _JobInputs, s: Settings) -> QuantizeConfig:
    """The engine's configuration for this attempt; model_missing when the model file is gone."""
    if job.model_path is None or not job.model_path.exists():
        raise EngineError("model_missing", "the job's model file is gone from storage; upload it again")
    return QuantizeConfig(
        model_path=job.model_path,
        output_path=attempt.artifact,
        recipe=job.recipe,
        options=parse_options(job.recipe, job.options),
        calibration_path=job.calib_path,
        eval_path=job.eval_path,
        work_dir=attempt.work_dir,
        threads=s.worker_threads,
        device=runner.engine_device(job.device, s),
        job_id=attempt.job_id,
        cache_dir=s.data_dir / "cache" / "calibration",
        export_cache_dir=s.data_dir / "cache" / "pt2-export",
        accuracy_target=job.target,  # the engine reports against it (report.accuracy_target)
    )


def _quantize(attempt: _Attempt, job: _JobInputs, s: Settings) -> QuantizeResult | str:
    """Run the engine: its result, or the end state of an attempt that has none (recorded here)."""
    factory, job_id, number = attempt.factory, attempt.job_id, attempt.number
    try:
        cfg = _config(attempt, job, s)
        with runner.Heartbeat(factory, job_id, number, s.job_heartbeat_s):
            return runner.run_engine(cfg, runner.Watch(factory, job_id, number, attempt.timer), s)
    except HandedBack:
        runner.hand_back(factory, s, job_id, number, job.queue)
        _drop_artifacts(attempt)
        return "handed_back"
    except LeaseLost:
        log.warning("job %s: attempt %d lost its claim to a newer attempt; stopping", job_id, number)
        _drop_artifacts(attempt)
        return "lost"
    except JobCancelled:
        times = attempt.timer.close()
        ended = _record(factory, job_id, lambda db: lifecycle.finish_cancelled(db, job_id, number, times))
        if ended is not Transition.LOST_TO_ANOTHER_ATTEMPT:  # the files are this attempt's to remove
            attempt.storage.remove_job(job_id)
        return CANCELLED
    except EngineError as exc:
        log.info("job %s failed: %s", job_id, exc)
        _drop_artifacts(attempt)  # a failed job keeps no artifact, whole or partial (disk_full)
        attempt.fail(exc.code, exc.message)
        return FAILED
    except Exception as exc:  # a bug or an environment problem: still a recorded, readable failure
        return _crashed(attempt, exc)
    finally:
        _cleanup_work(attempt.work_dir)


def _drop_artifacts(attempt: _Attempt) -> None:
    """Remove what the attempt may have written: its .onnx artifact, or the .zip of a model with external data."""
    attempt.artifact.unlink(missing_ok=True)
    attempt.artifact.with_suffix(".zip").unlink(missing_ok=True)


def _crashed(attempt: _Attempt, exc: Exception) -> str:
    """Record an unexpected error around the engine as the job's failure (internal_error)."""
    log.exception("job %s crashed", attempt.job_id)
    _drop_artifacts(attempt)
    if isinstance(exc, sandbox.ChildFailed):
        log.error("job %s: the engine's traceback:\n%s", attempt.job_id, exc.trace)
    kind, text = (exc.type_name, exc.message) if isinstance(exc, sandbox.ChildFailed) else \
        (type(exc).__name__, str(exc))
    message = (f"unexpected error while quantizing ({kind}: {text[:300]}); "
               "this is a lowbit problem, not your model's, please report it")
    attempt.fail("internal_error", message)
    return FAILED


def _keep(attempt: _Attempt, result: QuantizeResult, s: Settings) -> str:
    """Record the quantized model as the job's result, unless the tenant's storage quota or a newer attempt,
    a cancellation or a deletion since the engine started says otherwise."""
    factory, job_id, number = attempt.factory, attempt.job_id, attempt.number
    artifact = Path(result.artifact_path)  # the .onnx, or the .zip of a model with external data
    try:
        # lazy: validate loads ONNX Runtime, kept out of the worker's main process (the sandbox child runs the engine)
        from worker.engine.validate import finite_or_none

        report = result.report
        over = _over_quota(factory, s, job_id, int(result.artifact_bytes))
        if over is not None:  # keeping the artifact would take its tenant past the storage quota
            artifact.unlink(missing_ok=True)
            attempt.fail("storage_quota_exceeded", over, keep_stage=False)
            return FAILED
        kept, times = finite_or_none(report), attempt.timer.close()
        recorded = _record(factory, job_id, lambda db: lifecycle.succeed(
            db, job_id, number, report=kept, artifact_path=str(result.artifact_path),
            artifact_sha256=result.artifact_sha256, artifact_bytes=result.artifact_bytes, stage_times=times))
    except Exception as exc:  # recording the result failed: the job must still end, readably
        log.exception("job %s: recording the result failed", job_id)
        artifact.unlink(missing_ok=True)
        attempt.fail("internal_error", f"the model was quantized but the result could not be recorded "
                                       f"({type(exc).__name__}: {str(exc)[:300]}); submit the job again")
        return FAILED
    if recorded is not Transition.APPLIED:
        if recorded is Transition.LOST_TO_ANOTHER_ATTEMPT:
            artifact.unlink(missing_ok=True)  # a newer attempt owns the job now
            return "lost"
        # Deleted or cancelled while the engine ran: do not leave an orphaned artifact behind.
        attempt.storage.remove_job(job_id)
        return CANCELLED
    return SUCCEEDED


def _over_quota(factory: sessionmaker[Session], s: Settings, job_id: str, artifact_bytes: int) -> str | None:
    """Why the job's artifact may not be kept (its tenant's storage quota), or None."""
    with factory() as db:
        tenant_id = db.scalar(sa.select(Job.tenant_id).where(Job.id == job_id))
        if tenant_id is None:
            return None
        try:
            check_storage_quota(db, tenant_id, settings=s, adding=artifact_bytes, what="this job's artifact")
        except StorageQuotaExceeded as exc:
            return exc.message
    return None


def _cleanup_work(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@celery_app.task(name=TASK_RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    log.info("worker pid %s running job %s", os.getpid(), job_id)
    return execute(job_id)


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
    settings = get_settings()
    try:
        queues = sorted({q.name for q in sender.task_consumer.queues})
    except AttributeError:
        queues = [q.strip() for q in settings.worker_queues.split(",") if q.strip()]
    me = worker_id()
    declared = settings.worker_memory_gb
    memory_mb = int(declared * 1024) if declared is not None else workers.machine_memory_mb()

    def loop() -> None:
        while not _beat_stopped.is_set():
            try:
                workers.beat(runner.sessions(), me, queues, settings.worker_heartbeat_s, memory_mb)
            except Exception:  # the database may be away: the next beat tries again
                log.warning("worker heartbeat failed", exc_info=True)
            _beat_stopped.wait(settings.worker_heartbeat_s)

    threading.Thread(target=loop, name="lowbit-worker-beat", daemon=True).start()


def _stop_beat(**_: Any) -> None:
    """A worker shutting down stops counting as one at once (it takes no more jobs)."""
    _beat_stopped.set()
    with contextlib.suppress(Exception):
        workers.forget(runner.sessions(), [worker_id()])


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
    if runner.sessions.cache_info().currsize:
        runner.sessions().kw["bind"].dispose(close=False)


def _stop_with_supervisor(**_: Any) -> None:
    """A worker started by `lowbit serve` (LOWBIT_SUPERVISOR_PID) gets SIGTERM when the server dies, even by
    SIGKILL: it hands its running job back and exits instead of living on unsupervised."""
    parent = os.environ.get("LOWBIT_SUPERVISOR_PID", "")
    if not parent.isdigit():
        return
    sandbox.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the server died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


worker_init.connect(_stop_with_supervisor, weak=False)
worker_ready.connect(sweeper.start, weak=False)
worker_ready.connect(_keep_consumer, weak=False)
worker_ready.connect(_start_beat, weak=False)
worker_shutdown.connect(_stop_beat, weak=False)
worker_process_init.connect(_forget_inherited_connections, weak=False)
worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
