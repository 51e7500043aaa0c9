"""Chaos: 30 jobs of mixed recipes on small models (20 on PostgreSQL and Redis, 10 on the embedded server) while
a driver SIGKILLs a random engine child, pool process or worker main process in the middle of a job every few
seconds (a bounded number of times, for a bounded time): on PostgreSQL and Redis with `lowbit worker` processes
(restarted by the test after a main-process kill, as a container's restart policy would), and on the embedded
`lowbit serve` (which restarts its workers itself). Afterwards every job has ended exactly once (succeeded with
one artifact and its report, or failed with a code), none is left running, no file is left that no job owns, and
the broker holds nothing the database does not expect.

Run time is dominated by each job's engine child importing the engine: on a 2-core machine shared with other
work (load average 9) that alone took 11-18 s per job, and a run took about 4 minutes; the waits allow for it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from app.queue import _filesystem_held, _redis_held
from tests import builders
from tests.e2e.conftest import Proc, env_for, lowbit_cmd, start_serve
from tests.e2e.servers import fresh_database  # noqa: F401 - a fixture
from tests.e2e.test_faults import alive, children, sandbox_children
from tests.httpd import Receiver, receiver

pytestmark = pytest.mark.slow
FAST = {"latency_runs": 2}
# (model, data, recipe, options): small models from tests/builders.py, every recipe family.
MIX = [
    ("mlp", "mlp_data", "int8_dynamic", FAST),
    ("mlp", "mlp_data", "int8_static", {**FAST, "method": "minmax"}),
    ("conv", "conv_data", "int8_static", {**FAST, "batch_size": 8, "max_calibration_samples": 16}),
    ("mlp", "mlp_data", "fp16", FAST),
    ("const", "const_data", "int8_dynamic", FAST),
    ("mlp", "mlp_data", "int4_weight_only", {**FAST, "algorithm": "rtn"}),
]
# What a job killed from outside may end with: its engine child killed, or its worker lost three times.
KILL_CODES = {"engine_crashed", "worker_lost"}
ENV = {"LOWBIT_JOB_HEARTBEAT_S": "0.5", "LOWBIT_JOB_LEASE_S": "6", "LOWBIT_JOB_RECONCILE_AFTER_S": "2",
       "LOWBIT_WORKER_HEARTBEAT_S": "1", "LOWBIT_WEBHOOK_ALLOW_PRIVATE": "true",
       "LOWBIT_WEBHOOK_RETRY_DELAYS_S": "[0, 0.5, 1]"}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chaos-models")
    z = {"mlp": builders.mlp(d / "mlp.onnx"), "conv": builders.conv_net(d / "conv.onnx", width=8),
         "const": builders.constant_weights_opset11(d / "const.onnx")}
    z["mlp_data"] = builders.mlp_data(d / "mlp_data.npz", n=32, labels=True, model=z["mlp"])
    z["conv_data"] = builders.image_data(d / "conv_data.npz", n=24)
    import numpy as np

    x = np.random.default_rng(3).standard_normal((32, 16)).astype(np.float32)
    z["const_data"] = builders.save_npz(d / "const_data.npz", x=x)
    return z


@dataclass
class Chaos:
    """Every ``period`` seconds, SIGKILL one process of a kind picked at random (among those that exist now):
    an engine child running a job, a pool process, or a worker's main process."""

    mains: Callable[[], list[int]]
    on_main_killed: Callable[[int], None]
    seed: int
    period: float = 4.0
    max_kills: int = 8
    max_s: float = 75.0
    kills: list[tuple[str, int, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def _targets(self) -> dict[str, list[int]]:
        """Processes in the middle of a job: engine children running one, the pool processes that started them,
        and those pools' worker main processes (killing a worker that is still starting up tests nothing)."""
        busy: dict[str, list[int]] = {"engine": [], "pool": [], "main": []}
        for main in self.mains():
            for pool in children(main):
                engines = sandbox_children(pool)
                if engines and alive(pool):
                    busy["engine"] += engines
                    busy["pool"].append(pool)
                    busy["main"].append(main)
        return {k: sorted(set(v)) for k, v in busy.items()}

    def _run(self) -> None:
        rng = random.Random(self.seed)
        started = time.monotonic()
        wait = self.period
        while not self.stop.wait(wait) and len(self.kills) < self.max_kills and \
                time.monotonic() - started < self.max_s:
            targets = self._targets()
            kinds = [k for k in ("engine", "pool", "main") if targets[k]]
            if not kinds:
                # Nothing is mid-job right now: look again soon rather than a whole period later (a job's
                # engine child may live only a few seconds, and a run that mostly looks between jobs kills
                # too seldom to test anything).
                wait = 0.25
                continue
            wait = self.period
            kind = rng.choice(kinds)
            pid = rng.choice(targets[kind])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append((kind, pid, round(time.monotonic() - started, 1)))
            if kind == "main":
                self.on_main_killed(pid)

    def __enter__(self) -> Chaos:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def submit_all(client: httpx.Client, small: dict[str, Path], n: int, hook: str) -> dict[str, str]:
    """n jobs cycling through MIX, each with a webhook; job id -> recipe."""
    ids: dict[str, str] = {}
    uploaded: dict[str, str] = {}
    for key in ("mlp", "conv", "const"):
        uploaded[key] = client.post("/api/v1/models", files={"file": (f"{key}.onnx", small[key].read_bytes())}
                                    ).json()["id"]
    for key in ("mlp_data", "conv_data", "const_data"):
        uploaded[key] = client.post("/api/v1/datasets", files={"file": (f"{key}.npz", small[key].read_bytes())}
                                    ).json()["id"]
    for i in range(n):
        model, data, recipe, options = MIX[i % len(MIX)]
        r = client.post("/api/v1/jobs", json={"model_id": uploaded[model], "calibration_dataset_id": uploaded[data],
                                              "recipe": recipe, "options": options, "callback_url": f"{hook}/{i}"})
        assert r.status_code == 202, r.text
        ids[r.json()["id"]] = recipe
    return ids


def _quiet(log: str) -> str:
    """A log without the HTTP access lines."""
    return "\n".join(line for line in log.splitlines() if '"GET ' not in line and '"POST ' not in line)


def wait_all(client: httpx.Client, ids: dict[str, str], timeout: float, logs: Callable[[], str]) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j: client.get(f"/api/v1/jobs/{j}").json() for j in ids}
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            stuck = {k: (v["status"], v["stage"]) for k, v in jobs.items() if v["status"] in ("queued", "running")}
            pytest.fail(f"jobs did not end within {timeout} s: {stuck}\n{_quiet(logs())[-8000:]}")
        time.sleep(0.5)


def check_invariants(client: httpx.Client, db: sa.Engine, data: Path, ids: dict[str, str], jobs: dict[str, Any],
                     rec: Receiver, held: set[str], chaos: Chaos) -> dict[str, int]:
    with db.connect() as c:
        rows = {r.id: r for r in c.execute(sa.text(
            "SELECT id, status, attempts, artifact_path, artifact_sha256, report IS NOT NULL AS has_report, "
            "error_code FROM jobs"))}
    assert set(rows) == set(ids)
    assert not [j for j, r in rows.items() if r.status in ("queued", "running")]
    expected_files: set[Path] = set()
    for job_id, row in rows.items():
        job = jobs[job_id]
        assert job["status"] == row.status
        if row.status == "succeeded":
            assert row.has_report and row.artifact_path, (job_id, row)
            artifact = Path(row.artifact_path)
            # The artifact of the attempt that recorded the result, and no other attempt's.
            assert artifact.name == f"model.quantized.{row.attempts}.onnx", (job_id, row)
            assert hashlib.sha256(artifact.read_bytes()).hexdigest() == row.artifact_sha256
            assert client.get(f"/api/v1/jobs/{job_id}/report").status_code == 200
            expected_files.add(artifact.resolve())
        else:
            assert row.status == "failed" and row.error_code in KILL_CODES, (job_id, row, chaos.kills)
            assert not row.has_report
    # No file that no job owns: the uploads, the succeeded jobs' artifacts, and nothing else (no partial
    # artifacts of killed attempts, no work folders, no half-received uploads).
    stray = [p for p in (data / "jobs").rglob("*") if p.is_file() and p.resolve() not in expected_files]
    assert not stray, stray
    assert not [p for p in (data / "incoming").glob("*") if p.is_file()]
    # Each job ended once: one webhook POST per job, for its final state. A worker killed between recording
    # a job's end and sending its webhook leaves that to the sweep (every few seconds), so wait a little.
    expected = {j: [f"job.{rows[j].status}"] for j in ids}
    deadline = time.monotonic() + 20
    while True:
        per_job: dict[str, list[str]] = {}
        for r in list(rec.received):
            body = json.loads(r.body)
            per_job.setdefault(body["job"]["id"], []).append(body["event"])
        got = {j: per_job.get(j) for j in ids}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expected, chaos.kills
    # The broker holds nothing waiting to run: what it still carries (a killed worker's unacknowledged
    # message) names jobs that have ended, which a redelivery leaves alone.
    assert held <= {j for j, r in rows.items() if r.status in ("succeeded", "failed")}
    return {"succeeded": sum(r.status == "succeeded" for r in rows.values()),
            "failed": sum(r.status == "failed" for r in rows.values())}


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    with receiver() as rec:
        yield rec


def test_chaos_on_postgres_and_redis(fresh_database: str, redis_url: str, small: dict[str, Path],  # noqa: F811
                                     tmp_path: Path, hooks: Receiver) -> None:
    data = tmp_path / "data"
    broker = redis_url.rsplit("/", 1)[0] + "/14"
    import redis

    redis.Redis.from_url(broker).flushdb()
    env = env_for(data, LOWBIT_DATABASE_URL=fresh_database, LOWBIT_BROKER_URL=broker, **ENV)
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    api, client = start_serve(data, tmp_path / "api.log", "--no-worker", "--no-migrate", env=env)
    workers: list[Proc] = []
    lock = threading.Lock()

    def start_worker() -> None:
        with lock:
            workers.append(Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env,
                                tmp_path / f"worker-{len(workers)}.log"))

    def restart_after(pid: int) -> None:  # a container's restart policy, a moment later
        time.sleep(1.0)
        start_worker()

    def logs() -> str:
        return "\n".join(w.tail(3000) for w in workers[-2:])

    db = sa.create_engine(fresh_database)
    started = time.monotonic()
    try:
        start_worker()
        start_worker()
        ids = submit_all(client, small, 20, hooks.url)
        with Chaos(lambda: [w.p.pid for w in workers if w.alive()], restart_after, seed=7) as chaos:
            jobs = wait_all(client, ids, 420, logs)
        held = _redis_held(broker, {"cpu"})
        client_redis = redis.Redis.from_url(broker)
        assert client_redis.llen("cpu") == 0  # nothing left waiting in the queue itself
        counts = check_invariants(client, db, data, ids, jobs, hooks, held, chaos)
        kinds = {k for k, _, _ in chaos.kills}
        assert len(chaos.kills) >= 3 and len(kinds) >= 2, chaos.kills  # it really was chaotic
        print(f"chaos (PostgreSQL + Redis): {len(ids)} jobs, kills {chaos.kills}, {counts}, "
              f"{time.monotonic() - started:.0f} s")
    finally:
        client.close()
        api.stop()
        for w in workers:
            w.stop()
        db.dispose()


def test_chaos_on_the_embedded_server(small: dict[str, Path], tmp_path: Path, hooks: Receiver) -> None:
    from tests.e2e.test_supervision import worker_mains

    data = tmp_path / "lowbit-data"
    serve, client = start_serve(data, tmp_path / "serve.log", "--workers", "2", env=env_for(data, **ENV))
    db = sa.create_engine(f"sqlite:///{data / 'lowbit.db'}")
    started = time.monotonic()
    try:
        ids = submit_all(client, small, 10, hooks.url)
        with Chaos(lambda: worker_mains(serve), lambda pid: None, seed=11) as chaos:
            jobs = wait_all(client, ids, 420, lambda: serve.tail(400_000))
        held = _filesystem_held(data / "broker" / "queue")
        counts = check_invariants(client, db, data, ids, jobs, hooks, held, chaos)
        assert len(chaos.kills) >= 3, chaos.kills
        restarts = sum(k == "main" for k, _, _ in chaos.kills)
        assert f"lowbit_worker_restarts_total {restarts}.0" in client.get("/metrics").text
        print(f"chaos (embedded): {len(ids)} jobs, kills {chaos.kills}, {counts}, {time.monotonic() - started:.0f} s")
        # The server still stops cleanly: no process of it is left.
        everything = {serve.p.pid, *worker_mains(serve)}
        everything |= {c for m in list(everything) for c in children(m)}
        os.kill(serve.p.pid, signal.SIGTERM)
        serve.p.wait(timeout=60)
        assert not [p for p in everything if alive(p)]
    finally:
        client.close()
        serve.stop()
        db.dispose()
