"""Taking over a job whose attempt died with its process (a redelivered message), on a real SQLite database."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.jobs.lifecycle import MAX_ATTEMPTS
from app.jobs.models import Job
from app.migrate import upgrade
from worker.runner import worker_id
from worker.tasks import claim


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    engine = sa.create_engine(url)  # no foreign keys: the jobs need no model rows here
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def _job(factory: sessionmaker[Session], **values: object) -> str:
    values = {"heartbeat_at": utcnow(), "recipe": "int8_dynamic", **values}
    with factory.begin() as s:
        job = Job(id="0" * 8 + "-0000-4000-8000-" + "0" * 12, model_id="m", options={},
                  queue="cpu", status="running", progress=10, attempts=1, cancel_requested=False,
                  created_at=utcnow(), **values)
        s.add(job)
        return job.id


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _row(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_a_live_attempt_keeps_its_job(factory: sessionmaker[Session]) -> None:
    job_id = _job(factory, worker=worker_id())  # this very process, heartbeat fresh
    assert claim(factory, job_id, heartbeat_s=10) == 0
    assert _row(factory, job_id).attempts == 1


def test_a_dead_process_on_this_host_is_taken_over_at_once(factory: sessionmaker[Session]) -> None:
    host = worker_id().rsplit(":", 1)[0]
    job_id = _job(factory, worker=f"{host}:{_dead_pid()}")  # heartbeat still fresh
    assert claim(factory, job_id, heartbeat_s=10) == 2
    row = _row(factory, job_id)
    assert (row.status, row.attempts, row.worker, row.stage) == ("running", 2, worker_id(), "preparing")
    assert claim(factory, job_id, heartbeat_s=10) == 0  # the next duplicate finds attempt 2 alive


def test_a_stale_heartbeat_from_another_host_is_taken_over(factory: sessionmaker[Session]) -> None:
    job_id = _job(factory, worker="elsewhere:1", heartbeat_at=utcnow() - timedelta(seconds=30))
    assert claim(factory, job_id, heartbeat_s=60) == 0  # within two intervals: maybe only slow
    assert claim(factory, job_id, heartbeat_s=10) == 2


def test_the_last_attempt_lost_fails_the_job(factory: sessionmaker[Session]) -> None:
    host = worker_id().rsplit(":", 1)[0]
    job_id = _job(factory, worker=f"{host}:{_dead_pid()}")
    with factory.begin() as s:
        s.execute(sa.update(Job).values(attempts=MAX_ATTEMPTS))
    assert claim(factory, job_id, heartbeat_s=10) == 0
    row = _row(factory, job_id)
    assert (row.status, row.error_code) == ("failed", "worker_lost")
    assert f"died {MAX_ATTEMPTS} times" in (row.error_message or "")


def test_an_auto_job_waiting_for_its_queued_candidates_is_not_stale(factory: sessionmaker[Session]) -> None:
    from app.jobs.models import AutoCandidate
    from worker.sweeper import sweep_stale

    old = utcnow() - timedelta(seconds=600)
    job_id = _job(factory, recipe="auto", heartbeat_at=old)
    with factory.begin() as s:
        s.add(AutoCandidate(id="c" * 8 + "-0000-4000-8000-" + "0" * 12, job_id=job_id, attempt=1, idx=1, round=1,
                            candidate={"recipe": "int8_dynamic"}, status="pending"))
    enqueued: list[str] = []
    asked: list[set[str]] = []

    def held(queues: set[str]) -> set[str]:
        asked.append(queues)
        return {job_id}

    # The broker still carries its candidates' messages: they wait for a free worker.
    assert sweep_stale(factory, 120, lambda j, q: enqueued.append(j), held) == []
    assert asked == [{"cpu"}] and _row(factory, job_id).status == "running"
    # The messages are gone (a broker that lost its data): the job is queued again.
    assert sweep_stale(factory, 120, lambda j, q: enqueued.append(j), lambda q: set()) == [job_id]
    assert enqueued == [job_id] and _row(factory, job_id).status == "queued"


def test_a_stale_job_of_another_recipe_is_requeued_whatever_the_broker_holds(factory: sessionmaker[Session]) -> None:
    from worker.sweeper import sweep_stale

    job_id = _job(factory, heartbeat_at=utcnow() - timedelta(seconds=600))
    assert sweep_stale(factory, 120, lambda j, q: None, lambda q: {job_id}) == [job_id]
