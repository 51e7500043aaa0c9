"""The bridge between a job's attempt and its sandboxed engine: ``run_engine`` runs the engine in a child
process (``worker/sandbox.py``) with the job's limits, and ``Watch`` is the engine's progress callback, which
records progress and the heartbeat and stops the engine once the job is cancelled or no longer this
attempt's. Plain jobs (``worker/tasks.py``) and auto candidates (``worker/auto_tasks.py``) both run through it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.datasets.models import Dataset
from app.db import make_engine, make_sessionmaker
from app.jobs import lifecycle
from app.jobs.lifecycle import Transition
from app.jobs.models import GPU_DEVICE, Job
from app.modelfiles.models import ModelFile
from app.queue import CeleryQueue
from app.settings import Settings, get_settings
from worker import sandbox
from worker.engine.errors import JobCancelled

if TYPE_CHECKING:  # the engine's heavy imports stay out of the worker's main process
    from worker.engine.config import QuantizeConfig
    from worker.engine.pipeline import QuantizeResult

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5
# While the engine runs, the job row's cancel flag is read (and the heartbeat written) at least this often.
CANCEL_POLL_S = 1.0
# What the sandbox child imports before it is given a job (see sandbox._spares): the engine, and ONNX
# Runtime's quantization tools (whose shape inference imports torch, seconds on its own), the way the engine
# imports them (runtime.ort_quantization).
ENGINE_PRELOAD = ("worker.engine.pipeline", "worker.engine.runtime:ort_quantization",
                  "onnxruntime.tools.symbolic_shape_infer")
# Set by SIGTERM in a pool process while it runs a job: stop the engine and hand the job back.
handing_back = threading.Event()


@lru_cache(maxsize=1)
def sessions() -> sessionmaker[Session]:
    """This process's sessions on the configured database."""
    return make_sessionmaker(make_engine(get_settings().resolved_database_url))


def worker_id() -> str:
    """This process, as the job row's ``worker`` names it: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


class Watch:
    """The engine's progress callback for one attempt of a job: refreshes the job's heartbeat, and stops the
    engine when the job is cancelled or deleted (JobCancelled) or no longer this attempt's (LeaseLost).

    With ``record_progress`` (a plain job) it writes the engine's stage and progress too, at most every
    PROGRESS_INTERVAL_S per stage, and the stage times through ``timer``. Without it (an auto candidate: the
    job's stage and progress count candidates, not one candidate's stages) it only beats, at most every
    CANCEL_POLL_S."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, attempt: int = 1,
                 timer: StageTimer | None = None, *, record_progress: bool = True) -> None:
        self.factory, self.job_id, self.attempt = factory, job_id, attempt
        self.timer = timer or StageTimer("preparing", time.time())
        self.record_progress = record_progress
        self.last_stage: str | None = None
        self.last_write = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if self.record_progress:
            if stage == self.last_stage and now - self.last_write < PROGRESS_INTERVAL_S and fraction < 1.0:
                return
        elif now - self.last_write < CANCEL_POLL_S:
            return
        self.last_stage, self.last_write = stage, now
        with self.factory.begin() as s:
            if self.record_progress:
                # lazy: the engine's pipeline loads ONNX Runtime, kept out of the worker's main process
                from worker.engine.pipeline import progress_percent

                times = self.timer.snapshot() if self.timer.enter(stage) else None
                moved = lifecycle.progress(s, self.job_id, self.attempt, stage=stage,
                                           percent=progress_percent(stage, fraction), stage_times=times)
            else:
                moved = lifecycle.heartbeat(s, self.job_id, self.attempt)
            cancelled = lifecycle.cancel_requested(s, self.job_id)
        if moved is Transition.LOST_TO_ANOTHER_ATTEMPT:
            raise LeaseLost()
        if moved is not Transition.APPLIED or cancelled is None or cancelled:
            raise JobCancelled()


class Heartbeat:
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
                    lifecycle.heartbeat(s, self.job_id, self.attempt)
            except Exception:  # a missed beat is retried at the next one
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def job_files(sess: Session, job: Job) -> tuple[Path | None, Path | None, Path | None]:
    """Where the job's model, calibration set and evaluation set are stored (None: not given, or the row is
    gone)."""
    model = sess.get(ModelFile, job.model_id)
    calib = sess.get(Dataset, job.calibration_dataset_id) if job.calibration_dataset_id else None
    ev = sess.get(Dataset, job.eval_dataset_id) if job.eval_dataset_id else None
    m, c, e = (Path(row.storage_path) if row else None for row in (model, calib, ev))
    return m, c, e


def engine_device(device: str, s: Settings) -> str:
    """The device the engine runs a job on (``QuantizeConfig.device``: ONNX Runtime's execution providers,
    PyTorch's device for qat_int8), from the hardware the job asked for (``Job.device``, not the queue that
    carried it): a job that asked for the gpu gets CUDA (ONNX Runtime without it refuses, gpu_unavailable,
    rather than run on the CPU unasked); a cpu job runs on the worker's LOWBIT_WORKER_DEVICE ('auto': CUDA
    when present, else the CPU)."""
    return "cuda" if device == GPU_DEVICE else s.worker_device


def job_limits(device: str, s: Settings, *, file_limit: bool = True) -> sandbox.Limits:
    """A job's sandbox limits. CUDA maps tens of GB of address space before it allocates anything: an
    address-space limit would stop every GPU job, so on a machine with an NVIDIA device a job that may use it
    runs without one."""
    gpu = device != "cpu" and Path("/dev/nvidiactl").exists()
    return sandbox.Limits(memory_mb=0 if gpu else s.job_memory_limit_mb, cpu_s=s.job_cpu_limit_s,
                          timeout_s=s.job_timeout_s, file_mb=s.job_file_limit_mb if file_limit else 0)


def on_sigterm(signum: int, frame: Any) -> None:
    """A pool process told to stop while the engine runs: hand the job back (the run loop sees the flag
    within a fraction of a second) instead of dying with it."""
    handing_back.set()


def run_engine(cfg: QuantizeConfig, progress: Any, settings: Settings | None = None) -> QuantizeResult:
    """Run ``pipeline.run(cfg)`` in a sandboxed child process (memory, CPU-time and wall-clock limits from
    ``settings``) and return its result. ``progress(stage, fraction)`` receives the engine's progress, and is
    called again with the latest values at least every CANCEL_POLL_S so that it can notice a cancellation
    (raise JobCancelled) or a lost lease: whatever it raises kills the child at once and propagates. A crash,
    a limit or the timeout raises EngineError (engine_crashed, out_of_memory, cpu_time_exceeded,
    job_timeout); an EngineError of the engine is raised as is. SIGTERM on this process while it runs
    (a worker shutting down) stops the child and raises HandedBack."""
    s = settings or get_settings()
    limits = job_limits(cfg.device, s)
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
        if handing_back.is_set():
            raise HandedBack()
        if time.monotonic() - last_call[0] >= CANCEL_POLL_S:
            report(latest[0], latest[1])

    # Billiard installs its own SIGTERM handler (exit at once) after the pool's initializer, so ours goes in
    # for the length of the run, and only where signals can be handled: the main thread.
    previous = None
    if threading.current_thread() is threading.main_thread():
        handing_back.clear()
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        data = sandbox.run("worker.sandbox:quantize", cfg, limits, on_event, tick, preload=ENGINE_PRELOAD,
                           spare=True)
        result: QuantizeResult = sandbox.result_from(data)
        return result
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def hand_back(factory: sessionmaker[Session], s: Settings, job_id: str, attempt: int, queue: str) -> None:
    """Put a job this worker stops running (it is shutting down) back in the queue, as if this attempt had
    never started, and publish it again: the worker's own message is acked as the task returns."""

    with factory.begin() as sess:
        moved = lifecycle.hand_back(sess, job_id, attempt)
    if moved is not Transition.APPLIED:
        return  # cancelled, deleted or taken over meanwhile: nothing to hand back
    try:
        CeleryQueue(s).enqueue(job_id, queue)
    except Exception:  # the reconciler publishes it once the broker is back (enqueued_at stays NULL)
        log.warning("job %s: handed back, but publishing it failed", job_id, exc_info=True)
        return
    with factory.begin() as sess:
        lifecycle.mark_published(sess, job_id)
    log.warning("job %s: worker shutting down; the job was handed back to the queue", job_id)
