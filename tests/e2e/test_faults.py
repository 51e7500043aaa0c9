"""Faults injected into real `lowbit worker` processes (Celery prefork pool) on PostgreSQL and Redis: hostile
models, a killed pool process, a killed sandbox child, a job that kills its worker every time, SIGTERM in
the middle of a job, cancel, and an API that died between committing a job and publishing it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from tests import builders
from tests.e2e.conftest import Proc, env_for, lowbit_cmd, start_serve, wait_job
from tests.e2e.servers import fresh_database  # noqa: F401 - a fixture
from tests.worker import faults

pytestmark = pytest.mark.slow
LIMITS = {"LOWBIT_JOB_MEMORY_LIMIT_MB": "2048", "LOWBIT_JOB_CPU_LIMIT_S": "60", "LOWBIT_JOB_TIMEOUT_S": "120"}
# The slow job: the 20 MB transformer, with enough latency runs to be caught mid-run.
SLOW = '{"recipe": "int8_dynamic", "options": {"latency_runs": 400}}'


@dataclass
class Stack:
    client: httpx.Client
    env: dict[str, str]
    data: Path
    db: sa.Engine
    logs: Path

    def worker(self, name: str, procs: list[Proc]) -> Proc:
        p = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), self.env, self.logs / f"{name}.log")
        procs.append(p)
        return p

    def row(self, job_id: str) -> Any:
        with self.db.connect() as c:
            return c.execute(sa.text("SELECT status, attempts, worker, enqueued_at, error_code, error_message, "
                                     "report IS NOT NULL AS has_report FROM jobs WHERE id = :i"), {"i": job_id}).one()

    def submit(self, model: Path, data: Path, config: str = SLOW) -> str:
        files = {"model": (model.name, model.read_bytes()), "calibration": (data.name, data.read_bytes())}
        r = self.client.post("/api/v1/jobs", files=files, data={"config": config})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def artifacts(self, job_id: str) -> list[Path]:
        return sorted((self.data / "jobs" / job_id).glob("model.quantized.*.onnx"))


@pytest.fixture(scope="module")
def stack(fresh_database: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # noqa: F811
    data = tmp_path_factory.mktemp("faults-data")
    logs = tmp_path_factory.mktemp("faults-logs")
    broker = redis_url.rsplit("/", 1)[0] + "/13"
    import redis

    redis.Redis.from_url(broker).flushdb()
    # A long lease: a job that moves on after its pool process died did so without waiting for it.
    env = env_for(data, LOWBIT_DATABASE_URL=fresh_database, LOWBIT_BROKER_URL=broker, LOWBIT_JOB_LEASE_S="60",
                  LOWBIT_JOB_HEARTBEAT_S="0.5", LOWBIT_JOB_RECONCILE_AFTER_S="2", **LIMITS)
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    api, client = start_serve(data, logs / "api.log", "--no-worker", "--no-migrate", env=env)
    db = sa.create_engine(fresh_database)
    try:
        yield Stack(client, env, data, db, logs)
    finally:
        client.close()
        api.stop()
        db.dispose()


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def sandbox_children(pid: int) -> list[int]:
    """The sandbox children of a pool process that run a job (not the idle spare, named lowbit-spare)."""
    found = []
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "lowbit-job":
                found.append(child)
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def until(what: str, check: Callable[[], Any], timeout: float, proc: Proc | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f":\n{proc.tail()}" if proc else ""))
        time.sleep(0.1)


def running_in(stack: Stack, job_id: str, worker: Proc) -> tuple[int, int]:
    """Wait until the job runs in a sandbox child: (pool pid, sandbox pid)."""
    def find() -> tuple[int, int] | None:
        row = stack.row(job_id)
        if row.status != "running" or not row.worker:
            return None
        pool = int(row.worker.rsplit(":", 1)[1])
        kids = sandbox_children(pool)
        return (pool, kids[0]) if kids else None

    found: tuple[int, int] = until(f"job {job_id} to run in a sandbox", find, 90, worker)
    return found


def test_hostile_models_fail_their_own_jobs_and_the_worker_runs_the_next(stack: Stack, zoo: dict[str, Path],
                                                                        tmp_path: Path, procs: list[Proc]) -> None:
    worker = stack.worker("hostile", procs)
    x = builders.save_npz(tmp_path / "x.npz", x=np.ones((16, 4), np.float32))
    balloon = faults.balloon_model(tmp_path / "balloon.onnx", gigabytes=40)
    endless = faults.endless_loop_model(tmp_path / "endless.onnx")
    config = '{"recipe": "int8_dynamic", "options": {"latency_runs": 2}}'
    first = wait_job(stack.client, stack.submit(balloon, x, config), worker, timeout=120)
    assert first["status"] == "failed" and first["error"]["code"] == "out_of_memory", first["error"]
    assert "2048 MB" in first["error"]["message"]
    env_cpu = dict(stack.env, LOWBIT_JOB_CPU_LIMIT_S="3")
    worker.stop()
    worker = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env_cpu, tmp_path / "cpu.log")
    procs.append(worker)
    second = wait_job(stack.client, stack.submit(endless, x, config), worker, timeout=120)
    assert second["status"] == "failed" and second["error"]["code"] == "cpu_time_exceeded", second["error"]
    pools = children(worker.p.pid)
    good = wait_job(stack.client, stack.submit(zoo["mlp"], zoo["mlp_data"], config), worker, timeout=120)
    assert good["status"] == "succeeded", good["error"]
    assert children(worker.p.pid) == pools  # the same pool process ran all three: nothing crashed it


def test_a_killed_sandbox_child_fails_only_its_job(stack: Stack, big: dict[str, Path], zoo: dict[str, Path],
                                                   procs: list[Proc]) -> None:
    worker = stack.worker("sandbox-kill", procs)
    job_id = stack.submit(big["tf"], big["tf_data"])
    pool, child = running_in(stack, job_id, worker)
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    job = wait_job(stack.client, job_id, worker, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "engine_crashed", job["error"]
    assert "SIGKILL" in job["error"]["message"] and "out-of-memory" in job["error"]["message"]
    assert stack.row(job_id).attempts == 1 and not stack.artifacts(job_id)
    # The pool process lived on and runs the next job.
    good = wait_job(stack.client, stack.submit(zoo["mlp"], zoo["mlp_data"],
                                               '{"recipe": "int8_dynamic", "options": {"latency_runs": 2}}'),
                    worker, timeout=120)
    assert good["status"] == "succeeded" and alive(pool)


def test_a_killed_pool_process_is_taken_over_at_once_and_succeeds_once(stack: Stack, big: dict[str, Path],
                                                                       procs: list[Proc]) -> None:
    worker = stack.worker("pool-kill", procs)
    job_id = stack.submit(big["tf"], big["tf_data"])
    pool, child = running_in(stack, job_id, worker)
    killed_at = time.monotonic()
    os.kill(pool, signal.SIGKILL)
    until("the orphaned sandbox child to die with its parent", lambda: not alive(child), 10, worker)
    # Redelivered (reject_on_worker_lost) to a new pool process, which takes over without the 60 s lease.
    until("attempt 2", lambda: stack.row(job_id).attempts == 2, 30, worker)
    assert time.monotonic() - killed_at < 30
    job = wait_job(stack.client, job_id, worker, timeout=180)
    assert job["status"] == "succeeded", (job["error"], worker.tail())
    row = stack.row(job_id)
    assert (row.attempts, row.has_report) == (2, True)
    assert [p.name for p in stack.artifacts(job_id)] == ["model.quantized.2.onnx"]
    assert not list((stack.data / "jobs" / job_id).glob("work-*"))
    assert "takes over" in worker.tail(200_000)


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(stack: Stack, big: dict[str, Path],
                                                                          procs: list[Proc]) -> None:
    from app.jobs.lifecycle import MAX_ATTEMPTS

    worker = stack.worker("every-time", procs)
    job_id = stack.submit(big["tf"], big["tf_data"])
    for attempt in range(1, MAX_ATTEMPTS + 1):
        until(f"attempt {attempt} to run", lambda a=attempt: (r := stack.row(job_id)).status == "running"  # type: ignore[misc]
              and r.attempts == a and r.worker, 60, worker)
        os.kill(int(stack.row(job_id).worker.rsplit(":", 1)[1]), signal.SIGKILL)
    job = wait_job(stack.client, job_id, worker, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job["error"]
    assert f"died {MAX_ATTEMPTS} times" in job["error"]["message"]
    assert stack.row(job_id).attempts == MAX_ATTEMPTS and worker.alive()


def test_sigterm_hands_the_running_job_back(stack: Stack, big: dict[str, Path], procs: list[Proc]) -> None:
    first = stack.worker("deploy-old", procs)
    job_id = stack.submit(big["tf"], big["tf_data"])
    pool, child = running_in(stack, job_id, first)
    first.p.send_signal(signal.SIGTERM)  # what a deploy sends the worker's main process
    stopped_at = time.monotonic()
    first.p.wait(timeout=30)
    assert time.monotonic() - stopped_at < 20, first.tail()
    assert not alive(child) and not alive(pool)
    row = stack.row(job_id)
    assert (row.status, row.attempts, row.worker) == ("queued", 0, None), first.tail()
    assert row.enqueued_at is not None  # published again before the worker went
    assert "handed back" in first.tail(200_000)
    second = stack.worker("deploy-new", procs)
    job = wait_job(stack.client, job_id, second, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert stack.row(job_id).attempts == 1 and len(stack.artifacts(job_id)) == 1


def test_cancel_stops_the_running_engine_within_seconds(stack: Stack, big: dict[str, Path],
                                                        procs: list[Proc]) -> None:
    worker = stack.worker("cancel", procs)
    job_id = stack.submit(big["tf"], big["tf_data"])
    pool, child = running_in(stack, job_id, worker)
    until("the work folder", lambda: list((stack.data / "jobs" / job_id).glob("work-*")), 30, worker)
    asked = time.monotonic()
    assert stack.client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    until("the sandbox child to stop", lambda: not alive(child), 5, worker)
    job = wait_job(stack.client, job_id, worker, timeout=10)
    assert job["status"] == "cancelled"
    assert time.monotonic() - asked < 5
    assert not (stack.data / "jobs" / job_id).exists() or not any((stack.data / "jobs" / job_id).iterdir())
    assert alive(pool)


def test_a_job_committed_but_never_published_runs(stack: Stack, zoo: dict[str, Path], procs: list[Proc]) -> None:
    """The API died between its commit and the publish: the worker's reconciler publishes the job."""
    import app.datasets.models
    import app.modelfiles.models  # noqa: F401 - the tables jobs refers to
    from app.jobs.models import Job

    model = stack.client.post("/api/v1/models", files={"file": ("m.onnx", zoo["mlp"].read_bytes())}).json()
    data = stack.client.post("/api/v1/datasets", files={"file": ("d.npz", zoo["mlp_data"].read_bytes())}).json()
    job_id = str(uuid.uuid4())
    from sqlalchemy.orm import Session

    with Session(stack.db) as s, s.begin():  # what create_job and the route's commit leave behind
        s.add(Job(id=job_id, model_id=model["id"], calibration_dataset_id=data["id"], recipe="int8_dynamic",
                  options={"latency_runs": 2}, queue="cpu", status="queued", progress=0, attempts=0,
                  cancel_requested=False, deliveries=[]))
    assert stack.row(job_id).enqueued_at is None
    worker = stack.worker("reconcile", procs)
    started = time.monotonic()
    job = wait_job(stack.client, job_id, worker, timeout=60)
    assert job["status"] == "succeeded", job["error"]
    assert time.monotonic() - started < 45
    assert stack.row(job_id).enqueued_at is not None
    assert "no broker message carried it" in worker.tail(200_000)
    # A job the API did publish is left alone: one message, one run.
    other = stack.submit(zoo["mlp"], zoo["mlp_data"], '{"recipe": "int8_dynamic", "options": {"latency_runs": 2}}')
    assert wait_job(stack.client, other, worker, timeout=60)["status"] == "succeeded"
    assert stack.row(other).enqueued_at is not None
    republished = [line for line in worker.tail(200_000).splitlines() if "no broker message" in line]
    assert len(republished) == 1 and job_id in republished[0]


def test_sigterm_hands_auto_candidates_back(stack: Stack, zoo: dict[str, Path], procs: list[Proc]) -> None:
    """SIGTERM while an auto job's first (analysis) candidate runs hands the whole job back; while a later
    candidate runs, only that candidate goes back to pending and is sent again: neither counts as a failure."""
    config = ('{"recipe": "auto", "options": {"latency_runs": 300, "max_fallback_steps": 0, "prefer": "size"}, '
              '"accuracy_target": {"metric": "cosine", "min": 0.9}}')
    job_id = stack.submit(zoo["mlp"], zoo["mlp_data"], config)

    def candidate_running(first: bool) -> Callable[[], Any]:
        def check() -> Any:
            with stack.db.connect() as c:
                rows = c.execute(sa.text("SELECT idx, worker FROM auto_candidates WHERE job_id = :i AND "
                                         "status = 'running'"), {"i": job_id}).all()
            for idx, worker in rows:
                if (idx == 0) == first and worker and sandbox_children(int(worker.rsplit(":", 1)[1])):
                    return (idx,)  # a tuple: candidate 0 must count as found
            return None
        return check

    def candidates() -> list[Any]:
        with stack.db.connect() as c:
            return list(c.execute(sa.text("SELECT idx, status, worker, result FROM auto_candidates WHERE "
                                          "job_id = :i ORDER BY idx"), {"i": job_id}).all())

    first = stack.worker("auto-old", procs)
    until("the analysis candidate", candidate_running(True), 90, first)
    first.p.send_signal(signal.SIGTERM)
    first.p.wait(timeout=30)
    row = stack.row(job_id)
    assert (row.status, row.attempts, row.worker) == ("queued", 0, None), first.tail()
    assert row.enqueued_at is not None and candidates() == []
    # A candidate of the tiny MLP lasts a second or two: on a loaded machine it may finish before the SIGTERM
    # reaches its pool process (it is then simply done). Up to three workers try to catch one mid-run.
    for attempt in range(3):
        second = stack.worker(f"auto-middle-{attempt}", procs)
        (idx,) = until("a later candidate", candidate_running(False), 120, second)
        second.p.send_signal(signal.SIGTERM)
        second.p.wait(timeout=30)
        assert stack.row(job_id).status == "running"  # the job goes on; its candidate waits for a worker
        handed = {r.idx: r for r in candidates()}[idx]
        if handed.status == "done" and "was handed back" not in second.tail(200_000):
            continue  # it finished before the signal landed: nothing was running to hand back
        assert (handed.status, handed.worker, handed.result) == ("pending", None, None), second.tail()
        assert f"candidate {idx} was handed back" in second.tail(200_000)
        break
    else:
        pytest.fail("three SIGTERMs each came after the running candidate had finished")
    third = stack.worker("auto-new", procs)
    job = wait_job(stack.client, job_id, third, timeout=240)
    assert job["status"] == "succeeded", (job["error"], third.tail())
    rows = candidates()
    assert {r.status for r in rows} == {"done"}, rows
    report = stack.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert not [c for c in report["candidates"] if (c.get("error") or {}).get("code") == "internal_error"]
    assert stack.row(job_id).attempts == 1
