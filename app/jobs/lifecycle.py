"""A job's life cycle: every change of a job's status, and the bookkeeping that goes with one, in one place.

    queued --claim--> running --succeed / fail / finish_cancelled--> succeeded / failed / cancelled
    queued --cancel--> cancelled            running --cancel--> running, cancel requested
    queued --enqueue_failed--> failed       running --hand_back--> queued (as if the attempt never started)
    running --take_over--> running, attempt + 1 (the attempt before died with its process)
    running --worker_lost--> queued, or failed after MAX_ATTEMPTS, or cancelled when that was asked for

Each transition is one conditional UPDATE fenced on the job's id, the status(es) it may leave and, for the
changes a worker makes, the attempt it belongs to: two workers, a sweeper and the API may all try to move
one job at once, and exactly one of them wins. The loser learns why from the returned ``Transition``.

Functions take the caller's session and never commit: the caller decides what else goes in the same
transaction (candidate rows, files removed after the commit, the publish after it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs.models import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job

# How many attempts a job gets before losing its worker once more fails it with worker_lost.
MAX_ATTEMPTS = 3


class Transition(enum.Enum):
    """What became of an attempted change of a job."""

    APPLIED = "applied"
    # A cancel of a running job: the flag is set, and the attempt running the job stops it.
    REQUESTED = "requested"
    NOT_FOUND = "not_found"  # no such job (deleted)
    WRONG_STATE = "wrong_state"  # the job is not in a state this change leaves (finished, cancelled, moved on)
    # The attempt making the change no longer owns the job: it was queued again or runs under a newer attempt.
    LOST_TO_ANOTHER_ATTEMPT = "lost_to_another_attempt"


class Requeue(enum.Enum):
    """Why a running job goes back to the queue."""

    WORKER_LOST = "worker_lost"  # its worker died: the attempt counts towards MAX_ATTEMPTS
    HANDED_BACK = "handed_back"  # its worker stopped it (SIGTERM): as if the attempt had never started


def worker_lost_message(attempts: int) -> str:
    """The error message of a job failed with worker_lost, whoever noticed the loss."""
    return (f"the worker running this job died {attempts} times before it finished (killed, out of memory, "
            "crashed by the model, or its machine went away); submit it again, and check the workers' memory "
            "and the model")


def broker_unavailable_message(reason: str) -> str:
    return f"the job could not be queued ({reason}); submit it again when the broker is back"


def _back_to_queued(reason: Requeue) -> dict[str, Any]:
    """A running job's row as a queued one's: nothing of the attempt that ran it stays but its count (which a
    hand-back gives back, and whose message the caller publishes after its commit)."""
    values: dict[str, Any] = {"status": QUEUED, "stage": None, "progress": 0, "started_at": None,
                              "heartbeat_at": None, "worker": None}
    if reason is Requeue.HANDED_BACK:
        # Not published yet: enqueued_at is set once the broker has it (mark_published), or the reconciler
        # publishes it.
        return {**values, "attempts": Job.attempts - 1, "enqueued_at": None}
    return {**values, "enqueued_at": utcnow()}  # the caller publishes it right after its commit


def _started(worker: str, stage_times: dict[str, Any] | None) -> dict[str, Any]:
    """A new attempt's start."""
    now = utcnow()
    return {"stage": "preparing", "progress": 0, "started_at": now, "attempts": Job.attempts + 1,
            "heartbeat_at": now, "worker": worker, "stage_times": stage_times}


def _mine(job_id: str, attempt: int) -> sa.ColumnElement[bool]:
    """The job, while it runs under this attempt."""
    return sa.and_(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)


def _why_not(db: Session, job_id: str, attempt: int | None) -> Transition:
    """Why a conditional UPDATE changed nothing."""
    row = db.execute(sa.select(Job.status, Job.attempts, Job.cancel_requested).where(Job.id == job_id)).first()
    if row is None:
        return Transition.NOT_FOUND
    # A job being cancelled is not lost to anyone: the attempt that sees the flag stops it and removes its files.
    if attempt is not None and not row.cancel_requested and (
            row.status == QUEUED or (row.status == RUNNING and row.attempts != attempt)):
        return Transition.LOST_TO_ANOTHER_ATTEMPT
    return Transition.WRONG_STATE


def _apply(db: Session, job_id: str, attempt: int | None, where: Iterable[sa.ColumnElement[bool]],
           values: dict[str, Any]) -> Transition:
    stmt = sa.update(Job).where(Job.id == job_id, *where).values(**values)
    # The ORM objects in the caller's session are not touched (a caller that holds one refreshes it).
    res = db.execute(stmt.execution_options(synchronize_session=False))
    if res.rowcount:  # type: ignore[attr-defined]
        return Transition.APPLIED
    return _why_not(db, job_id, attempt)


def _running(attempt: int) -> list[sa.ColumnElement[bool]]:
    return [Job.status == RUNNING, Job.attempts == attempt]


# --- the API's changes ---------------------------------------------------------------------------------------

def mark_published(db: Session, job_id: str) -> Transition:
    """A queued job's message is in the broker: a queued job without ``enqueued_at`` is one whose publisher
    died before publishing, which the reconciler then publishes. A worker may claim the job between the
    publish and this call: the message was published all the same, so a job that moved on with no
    ``enqueued_at`` gets it too (what it says stays true), and one that has it keeps it."""
    return _apply(db, job_id, None, [sa.or_(Job.status == QUEUED, Job.enqueued_at.is_(None))],
                  {"enqueued_at": utcnow()})


def republish(db: Session, job_id: str, seen: datetime | None) -> Transition:
    """The reconciler is about to publish a queued job again: fenced on the ``enqueued_at`` it saw, so of
    several reconcilers exactly one publishes."""
    same = Job.enqueued_at.is_(None) if seen is None else Job.enqueued_at == seen
    return _apply(db, job_id, None, [Job.status == QUEUED, same], {"enqueued_at": utcnow()})


def enqueue_failed(db: Session, job_id: str, reason: str) -> Transition:
    """queued -> failed (broker_unavailable): the broker refused the job's message; it must not wait for ever."""
    return _apply(db, job_id, None, [Job.status == QUEUED], {
        "status": FAILED, "error_code": "broker_unavailable", "error_message": broker_unavailable_message(reason),
        "finished_at": utcnow()})


def cancel(db: Session, job_id: str) -> Transition:
    """A user's cancel: a queued job is cancelled at once (APPLIED); a running one gets the flag its attempt
    reads at least every second (REQUESTED); a finished one is left alone (WRONG_STATE)."""
    done = _apply(db, job_id, None, [Job.status == QUEUED],
                  {"status": CANCELLED, "stage": None, "finished_at": utcnow(), "cancel_requested": True})
    if done is not Transition.WRONG_STATE:
        return done
    asked = _apply(db, job_id, None, [Job.status == RUNNING], {"cancel_requested": True})
    return Transition.REQUESTED if asked is Transition.APPLIED else asked


# --- a worker's changes to the job it runs ----------------------------------------------------------------------

def claim(db: Session, job_id: str, worker: str, stage_times: dict[str, Any] | None = None) -> Transition:
    """queued -> running under a new attempt (``attempts`` + 1) by ``worker`` (hostname:pid). A duplicate
    message finds the job claimed already (WRONG_STATE)."""
    return _apply(db, job_id, None, [Job.status == QUEUED], {"status": RUNNING, **_started(worker, stage_times)})


def take_over(db: Session, job_id: str, attempt: int, previous_worker: str | None, worker: str,
              stage_times: dict[str, Any] | None = None) -> Transition:
    """running (``attempt`` under ``previous_worker``, which died) -> running under attempt + 1 by ``worker``."""
    same = Job.worker.is_(None) if previous_worker is None else Job.worker == previous_worker
    return _apply(db, job_id, attempt, [*_running(attempt), same], _started(worker, stage_times))


def attempt_of(db: Session, job_id: str) -> int:
    """The job's current attempt number (0 if there is no such job)."""
    return int(db.scalar(sa.select(Job.attempts).where(Job.id == job_id)) or 0)


def cancel_requested(db: Session, job_id: str) -> bool | None:
    """Whether the job's cancel was asked for; None if the job is gone (deleted)."""
    flag = db.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id))
    return None if flag is None else bool(flag)


def heartbeat(db: Session, job_id: str, attempt: int) -> Transition:
    """The attempt is alive: a heartbeat older than the lease lets a sweeper queue the job again."""
    return _apply(db, job_id, attempt, _running(attempt), {"heartbeat_at": utcnow()})


def progress(db: Session, job_id: str, attempt: int, *, stage: str | None = None, percent: int | None = None,
             stage_times: dict[str, Any] | None = None) -> Transition:
    """The running attempt's stage and/or progress (None: unchanged); refreshes the heartbeat too."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if stage is not None:
        values["stage"] = stage
    if percent is not None:
        values["progress"] = percent
    if stage_times is not None:
        values["stage_times"] = stage_times
    return _apply(db, job_id, attempt, _running(attempt), values)


def start_search(db: Session, job_id: str, attempt: int) -> Transition:
    """An auto job's first round of candidates is planned: round 1, calibrating (the analysis candidate)."""
    return _apply(db, job_id, attempt, _running(attempt), {"auto_round": 1, "stage": "calibrating", "progress": 5})


def advance_round(db: Session, job_id: str, attempt: int, finished_round: int) -> Transition:
    """An auto job's round ``finished_round`` is over: of the candidates that finish it, exactly one wins this
    and moves the search on."""
    return _apply(db, job_id, attempt, [*_running(attempt), Job.auto_round == finished_round],
                  {"auto_round": finished_round + 1})


def succeed(db: Session, job_id: str, attempt: int, *, report: dict[str, Any] | None, artifact_path: str,
            artifact_sha256: str, artifact_bytes: int, stage_times: dict[str, Any] | None = None) -> Transition:
    """running -> succeeded, with the artifact and the report."""
    values: dict[str, Any] = {"status": SUCCEEDED, "stage": None, "progress": 100, "report": report,
                              "artifact_path": artifact_path, "artifact_sha256": artifact_sha256,
                              "artifact_bytes": artifact_bytes, "finished_at": utcnow()}
    if stage_times is not None:
        values["stage_times"] = stage_times
    return _apply(db, job_id, attempt, _running(attempt), values)


def fail(db: Session, job_id: str, attempt: int, code: str, message: str, *, keep_stage: bool = True,
         report: dict[str, Any] | None = None, stage_times: dict[str, Any] | None = None) -> Transition:
    """running -> failed with ``code`` and ``message``. ``keep_stage``: the job keeps the stage it failed in,
    which the client, the page and the metrics show ("failed while calibrating"); False for a failure outside
    the engine's stages."""
    values: dict[str, Any] = {"status": FAILED, "error_code": code, "error_message": message,
                              "finished_at": utcnow()}
    if not keep_stage:
        values["stage"] = None
    if report is not None:
        values["report"] = report
    if stage_times is not None:
        values["stage_times"] = stage_times
    return _apply(db, job_id, attempt, _running(attempt), values)


def finish_cancelled(db: Session, job_id: str, attempt: int,
                     stage_times: dict[str, Any] | None = None) -> Transition:
    """running -> cancelled: the attempt saw the cancel flag and stopped."""
    values: dict[str, Any] = {"status": CANCELLED, "stage": None, "finished_at": utcnow()}
    if stage_times is not None:
        values["stage_times"] = stage_times
    return _apply(db, job_id, attempt, _running(attempt), values)


def requeue(db: Session, job_id: str, attempt: int, reason: Requeue) -> Transition:
    """running (this attempt) -> queued; the caller publishes the job after its commit."""
    return _apply(db, job_id, attempt, _running(attempt), _back_to_queued(reason))


def hand_back(db: Session, job_id: str, attempt: int) -> Transition:
    """A worker shutting down stops the job it runs: back to the queue as if this attempt had never started."""
    return requeue(db, job_id, attempt, Requeue.HANDED_BACK)


# --- someone else's changes to a job whose worker is gone ----------------------------------------------------------

def after_worker_lost(attempts: int, cancel_requested: bool) -> str:
    """The status a running job whose worker is gone moves to: cancelled if that was asked for, failed once it
    has lost MAX_ATTEMPTS workers, queued again otherwise."""
    if cancel_requested:
        return CANCELLED
    return FAILED if attempts >= MAX_ATTEMPTS else QUEUED


_ANY_WORKER = object()


def worker_lost(db: Session, job_id: str, attempt: int, *, cancel_requested: bool,
                worker: str | None | object = _ANY_WORKER, stale_before: datetime | None = None) -> Transition:
    """A running job's attempt lost its worker: the job moves to ``after_worker_lost(attempt, cancel_requested)``.
    Fenced on the attempt and the cancel flag the caller saw, and on what made the caller decide the worker
    was gone: the process named ``worker`` died, or the heartbeat is older than ``stale_before``."""
    fence = [*_running(attempt), Job.cancel_requested.is_(cancel_requested)]
    if worker is not _ANY_WORKER:
        fence.append(Job.worker.is_(None) if worker is None else Job.worker == worker)
    if stale_before is not None:
        fence.append(sa.or_(Job.heartbeat_at < stale_before, Job.heartbeat_at.is_(None)))
    status = after_worker_lost(attempt, cancel_requested)
    if status == QUEUED:
        values = _back_to_queued(Requeue.WORKER_LOST)
    elif status == FAILED:
        values = {"status": FAILED, "stage": None, "finished_at": utcnow(), "error_code": "worker_lost",
                  "error_message": worker_lost_message(attempt)}
    else:
        values = {"status": CANCELLED, "stage": None, "finished_at": utcnow()}
    return _apply(db, job_id, attempt, fence, values)
