"""Every transition of a job's life cycle (app/jobs/lifecycle.py), allowed and refused, on SQLite and on
PostgreSQL with the migrations applied: each case starts from one row, makes one change, and checks what the
change returned and the row afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, utcnow
from app.jobs import lifecycle
from app.jobs.lifecycle import MAX_ATTEMPTS, Requeue, Transition
from app.jobs.models import Job
from app.migrate import upgrade
from app.modelfiles.models import ModelFile

# A value the row must have, whatever it is (a timestamp the change wrote).
SET = object()
PUBLISHED = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
OLD = utcnow() - timedelta(hours=1)
# The row each case starts from unless it says otherwise: attempt 1 of a job, running on host:1.
RUNNING_ROW: dict[str, Any] = {"status": "running", "attempts": 1, "worker": "host:1", "stage": "calibrating",
                               "progress": 40, "started_at": OLD, "heartbeat_at": OLD}
QUEUED_ROW: dict[str, Any] = {"status": "queued", "attempts": 0, "worker": None, "stage": None, "progress": 0,
                              "enqueued_at": PUBLISHED}
# The row of a running job after a refused change: as it was.
UNCHANGED_RUNNING: dict[str, Any] = {"status": "running", "attempts": 1, "worker": "host:1", "stage": "calibrating",
                                     "progress": 40, "finished_at": None, "error_code": None}
REQUEUED: dict[str, Any] = {"status": "queued", "stage": None, "progress": 0, "started_at": None, "heartbeat_at": None,
                            "worker": None, "finished_at": None}
STAGE_TIMES = {"preparing": {"started": 1.0, "finished": 2.0}, "calibrating": {"started": 2.0}}
Change = Callable[[Session, str], Transition]


@dataclass
class Case:
    name: str
    start: dict[str, Any] | None  # None: there is no such job
    change: Change
    result: Transition
    after: dict[str, Any] = field(default_factory=dict)


def running(**values: Any) -> dict[str, Any]:
    return {**RUNNING_ROW, **values}


def queued(**values: Any) -> dict[str, Any]:
    return {**QUEUED_ROW, **values}


A, L, W, N, R = (Transition.APPLIED, Transition.LOST_TO_ANOTHER_ATTEMPT, Transition.WRONG_STATE,
                 Transition.NOT_FOUND, Transition.REQUESTED)


def _succeed(attempt: int) -> Change:
    return lambda db, j: lifecycle.succeed(db, j, attempt, report={"ok": True}, artifact_path="/a.onnx",
                                           artifact_sha256="f" * 64, artifact_bytes=123, stage_times=STAGE_TIMES)


CASES = [
    # claim: queued -> running, a new attempt
    Case("claim a queued job", queued(), lambda db, j: lifecycle.claim(db, j, "host:2", STAGE_TIMES), A,
         {"status": "running", "attempts": 1, "worker": "host:2", "stage": "preparing", "progress": 0,
          "started_at": SET, "heartbeat_at": SET, "stage_times": STAGE_TIMES}),
    Case("claim a running job (a duplicate message)", running(), lambda db, j: lifecycle.claim(db, j, "host:2"), W,
         UNCHANGED_RUNNING),
    Case("claim a cancelled job", queued(status="cancelled", cancel_requested=True),
         lambda db, j: lifecycle.claim(db, j, "host:2"), W, {"status": "cancelled", "attempts": 0}),
    Case("claim a deleted job", None, lambda db, j: lifecycle.claim(db, j, "host:2"), N),
    # take_over: the attempt's process died; the next attempt runs the job
    Case("take over from a dead process", running(),
         lambda db, j: lifecycle.take_over(db, j, 1, "host:1", "host:2"), A,
         {"status": "running", "attempts": 2, "worker": "host:2", "stage": "preparing", "progress": 0}),
    Case("take over from a process that is not the one seen", running(worker="host:3"),
         lambda db, j: lifecycle.take_over(db, j, 1, "host:1", "host:2"), W, {"attempts": 1, "worker": "host:3"}),
    Case("take over a job another attempt took over first", running(attempts=2, worker="host:3"),
         lambda db, j: lifecycle.take_over(db, j, 1, "host:1", "host:2"), L, {"attempts": 2, "worker": "host:3"}),
    # heartbeat and progress of the running attempt
    Case("heartbeat", running(), lambda db, j: lifecycle.heartbeat(db, j, 1), A,
         {**UNCHANGED_RUNNING, "heartbeat_at": SET}),
    Case("heartbeat of an attempt whose job was queued again", queued(attempts=1),
         lambda db, j: lifecycle.heartbeat(db, j, 1), L, {"status": "queued", "heartbeat_at": None}),
    Case("heartbeat of an attempt a newer one replaced", running(attempts=2),
         lambda db, j: lifecycle.heartbeat(db, j, 1), L, {"attempts": 2}),
    Case("heartbeat of a finished job", running(status="succeeded"), lambda db, j: lifecycle.heartbeat(db, j, 1), W,
         {"status": "succeeded"}),
    Case("progress", running(),
         lambda db, j: lifecycle.progress(db, j, 1, stage="validating", percent=70, stage_times=STAGE_TIMES), A,
         {"status": "running", "stage": "validating", "progress": 70, "stage_times": STAGE_TIMES}),
    Case("progress of an old attempt of a job being cancelled", queued(attempts=1, cancel_requested=True),
         lambda db, j: lifecycle.progress(db, j, 1, percent=70), W, {"status": "queued", "progress": 0}),
    Case("progress of a deleted job", None, lambda db, j: lifecycle.progress(db, j, 1, percent=70), N),
    # an auto job's search rounds
    Case("start an auto search", running(stage="preparing", progress=0),
         lambda db, j: lifecycle.start_search(db, j, 1), A,
         {"auto_round": 1, "stage": "calibrating", "progress": 5}),
    Case("start the search of a job that was queued again", queued(attempts=1),
         lambda db, j: lifecycle.start_search(db, j, 1), L, {"auto_round": None, "stage": None}),
    Case("finish round 1", running(auto_round=1), lambda db, j: lifecycle.advance_round(db, j, 1, 1), A,
         {"auto_round": 2}),
    Case("finish round 1 once more (another candidate won)", running(auto_round=2),
         lambda db, j: lifecycle.advance_round(db, j, 1, 1), W, {"auto_round": 2}),
    # the attempt's end
    Case("succeed", running(), _succeed(1), A,
         {"status": "succeeded", "stage": None, "progress": 100, "report": {"ok": True}, "artifact_path": "/a.onnx",
          "artifact_sha256": "f" * 64, "artifact_bytes": 123, "finished_at": SET, "stage_times": STAGE_TIMES}),
    Case("succeed after a cancel", running(status="cancelled", cancel_requested=True), _succeed(1), W,
         {"status": "cancelled", "artifact_path": None}),
    Case("succeed after the job was deleted", None, _succeed(1), N),
    Case("succeed after losing the job to a newer attempt", running(attempts=2), _succeed(1), L,
         {"status": "running", "artifact_path": None}),
    Case("fail, in the stage it failed in", running(),
         lambda db, j: lifecycle.fail(db, j, 1, "engine_crashed", "it crashed"), A,
         {"status": "failed", "stage": "calibrating", "error_code": "engine_crashed", "error_message": "it crashed",
          "finished_at": SET}),
    Case("fail outside the engine's stages", running(),
         lambda db, j: lifecycle.fail(db, j, 1, "storage_quota_exceeded", "full", keep_stage=False,
                                      report={"best": 1}), A,
         {"status": "failed", "stage": None, "error_code": "storage_quota_exceeded", "report": {"best": 1}}),
    Case("fail after the job was queued again", queued(attempts=1),
         lambda db, j: lifecycle.fail(db, j, 1, "engine_crashed", "it crashed"), L,
         {"status": "queued", "error_code": None}),
    Case("fail a finished job", running(status="succeeded"),
         lambda db, j: lifecycle.fail(db, j, 1, "engine_crashed", "it crashed"), W,
         {"status": "succeeded", "error_code": None}),
    Case("stop a cancelled job", running(cancel_requested=True),
         lambda db, j: lifecycle.finish_cancelled(db, j, 1, STAGE_TIMES), A,
         {"status": "cancelled", "stage": None, "finished_at": SET, "stage_times": STAGE_TIMES}),
    Case("stop a job that was queued again", queued(attempts=1),
         lambda db, j: lifecycle.finish_cancelled(db, j, 1), L, {"status": "queued"}),
    # back to the queue
    Case("hand back (a worker shutting down)", running(enqueued_at=PUBLISHED),
         lambda db, j: lifecycle.hand_back(db, j, 1), A, {**REQUEUED, "attempts": 0, "enqueued_at": None}),
    Case("hand back a job cancelled meanwhile", running(status="cancelled"),
         lambda db, j: lifecycle.hand_back(db, j, 1), W, {"status": "cancelled", "attempts": 1}),
    Case("hand back a job another attempt took over", running(attempts=2),
         lambda db, j: lifecycle.hand_back(db, j, 1), L, {"status": "running", "attempts": 2}),
    Case("queue again a job whose worker was lost", running(),
         lambda db, j: lifecycle.requeue(db, j, 1, Requeue.WORKER_LOST), A,
         {**REQUEUED, "attempts": 1, "enqueued_at": SET}),
    # a job whose worker is gone, seen by a sweeper, a redelivery or the supervisor
    Case("worker lost: queued again", running(),
         lambda db, j: lifecycle.worker_lost(db, j, 1, cancel_requested=False, worker="host:1",
                                             stale_before=utcnow()), A,
         {**REQUEUED, "attempts": 1, "enqueued_at": SET}),
    Case("worker lost once too often: failed", running(attempts=MAX_ATTEMPTS),
         lambda db, j: lifecycle.worker_lost(db, j, MAX_ATTEMPTS, cancel_requested=False), A,
         {"status": "failed", "stage": None, "error_code": "worker_lost", "finished_at": SET,
          "error_message": lifecycle.worker_lost_message(MAX_ATTEMPTS)}),
    Case("worker lost while being cancelled: cancelled", running(cancel_requested=True),
         lambda db, j: lifecycle.worker_lost(db, j, 1, cancel_requested=True), A,
         {"status": "cancelled", "stage": None, "finished_at": SET, "error_code": None}),
    Case("worker lost, but another process runs the job now", running(worker="host:3"),
         lambda db, j: lifecycle.worker_lost(db, j, 1, cancel_requested=False, worker="host:1"), W,
         {**UNCHANGED_RUNNING, "worker": "host:3"}),
    Case("worker lost, but the heartbeat is fresh again", running(heartbeat_at=utcnow()),
         lambda db, j: lifecycle.worker_lost(db, j, 1, cancel_requested=False, stale_before=OLD), W,
         UNCHANGED_RUNNING),
    Case("worker lost, but a cancel came in meanwhile", running(cancel_requested=True),
         lambda db, j: lifecycle.worker_lost(db, j, 1, cancel_requested=False), W,
         {**UNCHANGED_RUNNING, "cancel_requested": True}),
    Case("worker lost, but a newer attempt runs the job", running(attempts=2),
         lambda db, j: lifecycle.worker_lost(db, j, 1, cancel_requested=False), L, {"status": "running"}),
    # the API's changes
    Case("cancel a queued job", queued(), lambda db, j: lifecycle.cancel(db, j), A,
         {"status": "cancelled", "stage": None, "cancel_requested": True, "finished_at": SET}),
    Case("cancel a running job", running(), lambda db, j: lifecycle.cancel(db, j), R,
         {**UNCHANGED_RUNNING, "cancel_requested": True}),
    Case("cancel a finished job", running(status="failed"), lambda db, j: lifecycle.cancel(db, j), W,
         {"status": "failed", "cancel_requested": False, "finished_at": None}),
    Case("cancel a deleted job", None, lambda db, j: lifecycle.cancel(db, j), N),
    Case("the broker refused the job", queued(enqueued_at=None),
         lambda db, j: lifecycle.enqueue_failed(db, j, "ConnectionError"), A,
         {"status": "failed", "error_code": "broker_unavailable", "finished_at": SET,
          "error_message": lifecycle.broker_unavailable_message("ConnectionError")}),
    Case("the broker refused a job already running", running(),
         lambda db, j: lifecycle.enqueue_failed(db, j, "ConnectionError"), W, UNCHANGED_RUNNING),
    Case("published", queued(enqueued_at=None), lambda db, j: lifecycle.mark_published(db, j), A,
         {"status": "queued", "enqueued_at": SET}),
    Case("published after a worker claimed it", running(enqueued_at=None),
         lambda db, j: lifecycle.mark_published(db, j), A, {"status": "running", "enqueued_at": SET}),
    Case("published after a worker claimed it, marked already", running(enqueued_at=PUBLISHED),
         lambda db, j: lifecycle.mark_published(db, j), W, {"status": "running", "enqueued_at": PUBLISHED}),
    Case("published again by the reconciler", queued(), lambda db, j: lifecycle.republish(db, j, PUBLISHED), A,
         {"status": "queued", "enqueued_at": SET}),
    Case("published again, never published before", queued(enqueued_at=None),
         lambda db, j: lifecycle.republish(db, j, None), A, {"status": "queued", "enqueued_at": SET}),
    Case("published again by another reconciler first", queued(enqueued_at=PUBLISHED + timedelta(seconds=5)),
         lambda db, j: lifecycle.republish(db, j, PUBLISHED), W,
         {"enqueued_at": PUBLISHED + timedelta(seconds=5)}),
]


@dataclass
class Db:
    factory: sessionmaker[Session]
    model_id: str  # the jobs' model (PostgreSQL checks the foreign key)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """A migrated database (a SQLite file, or the session's PostgreSQL database) with one model for the jobs."""
    if request.param == "postgres":
        url = request.getfixturevalue("migrated_postgres")
    else:
        url = f"sqlite:///{tmp_path / 'lifecycle.db'}"
        upgrade(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    model_id = str(uuid.uuid4())
    with factory.begin() as s:
        s.add(ModelFile(id=model_id, filename="m.onnx", format="onnx", size_bytes=1, sha256="0" * 64, opset=17,
                        inputs=[], outputs=[], storage_path="/nowhere/m.onnx"))
    try:
        yield Db(factory, model_id)
    finally:  # the PostgreSQL database is shared by the session's tests
        with factory.begin() as s:
            s.execute(sa.delete(Job).where(Job.model_id == model_id))
            s.execute(sa.delete(ModelFile).where(ModelFile.id == model_id))
        engine.dispose()


def _add(db: Db, values: dict[str, Any]) -> str:
    job_id = str(uuid.uuid4())
    with db.factory.begin() as s:
        s.add(Job(id=job_id, model_id=db.model_id, recipe="int8_dynamic", options={},
                  queue="cpu", created_at=utcnow(), **{"cancel_requested": False, **values}))
    return job_id


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transition(db: Db, case: Case) -> None:
    job_id = _add(db, case.start) if case.start is not None else str(uuid.uuid4())
    with db.factory.begin() as s:  # as its callers do: the change in a transaction of theirs, which they commit
        assert case.change(s, job_id) is case.result
    with db.factory() as s:
        row = s.get(Job, job_id)
        if case.start is None:
            assert row is None
            return
        assert row is not None
        for column, expected in case.after.items():
            got = getattr(row, column)
            if expected is SET:
                assert got is not None, column
            else:
                assert got == expected, column


def test_every_transition_has_its_cases() -> None:
    """Each public change of the module is walked above, both where it applies and where it is refused."""
    import inspect

    changes = {name for name, fn in vars(lifecycle).items() if inspect.isfunction(fn)
               and not name.startswith("_") and inspect.signature(fn).return_annotation in ("Transition", Transition)}
    source = "\n".join(inspect.getsource(c.change) for c in CASES)
    assert {name for name in changes if f"lifecycle.{name}(" not in source} == set()
    results = {c.result for c in CASES}
    assert results == set(Transition)


def test_a_change_never_commits(db: Db) -> None:
    """Services never commit: a change rolled back with its caller's transaction leaves the row as it was."""
    job_id = _add(db, queued())
    with db.factory() as s:
        assert lifecycle.claim(s, job_id, "host:2") is Transition.APPLIED
        s.rollback()
    with db.factory() as s:
        row = s.get(Job, job_id)
        assert row is not None and (row.status, row.attempts) == ("queued", 0)
