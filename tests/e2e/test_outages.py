"""Server outages against private servers started by the tests (never the shared ones): Redis restarted with
all its data lost while jobs run and wait, and PostgreSQL stopped and started under a running job."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import builders
from tests.e2e.conftest import Proc, env_for, lowbit_cmd, start_serve, wait_job
from tests.e2e.servers import PrivatePostgres, PrivateRedis, fresh_database, private_postgres, private_redis  # noqa: F401
from tests.e2e.test_faults import SLOW, until

pytestmark = pytest.mark.slow
QUICK = '{"recipe": "int8_dynamic", "options": {"latency_runs": 2}}'


def _submit(client: object, model: Path, data: Path, config: str) -> str:
    files = {"model": (model.name, model.read_bytes()), "calibration": (data.name, data.read_bytes())}
    r = client.post("/api/v1/jobs", files=files, data={"config": config})  # type: ignore[attr-defined]
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _status(engine: sa.Engine, job_id: str) -> str:
    with engine.connect() as c:
        return str(c.execute(sa.text("SELECT status FROM jobs WHERE id = :i"), {"i": job_id}).scalar_one())


def test_redis_losing_its_data_loses_no_job(private_redis: PrivateRedis, fresh_database: str,  # noqa: F811
                                            big: dict[str, Path], zoo: dict[str, Path], tmp_path: Path,
                                            procs: list[Proc]) -> None:
    data = tmp_path / "data"
    env = env_for(data, LOWBIT_DATABASE_URL=fresh_database, LOWBIT_BROKER_URL=private_redis.url,
                  LOWBIT_JOB_LEASE_S="60", LOWBIT_JOB_HEARTBEAT_S="0.5", LOWBIT_JOB_RECONCILE_AFTER_S="2")
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    api, client = start_serve(data, tmp_path / "api.log", "--no-worker", "--no-migrate", env=env)
    procs.append(api)
    worker = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env, tmp_path / "worker.log")
    procs.append(worker)
    engine = sa.create_engine(fresh_database)
    try:
        running = _submit(client, big["tf"], big["tf_data"], SLOW)
        waiting = [_submit(client, zoo["mlp"], zoo["mlp_data"], QUICK) for _ in range(2)]
        until("the first job to run", lambda: _status(engine, running) == "running", 90, worker)
        assert all(_status(engine, j) == "queued" for j in waiting)
        import redis

        before = redis.Redis.from_url(private_redis.url).info("server")["run_id"]
        private_redis.restart_empty()  # the queued jobs' messages are gone with it
        # A new server process, started without persistence, so empty by construction. (Counting its keys
        # would race the worker's reconnection, which declares its queue again at once.)
        assert redis.Redis.from_url(private_redis.url).info("server")["run_id"] != before
        for job_id in (running, *waiting):
            job = wait_job(client, job_id, worker, timeout=180)
            assert job["status"] == "succeeded", (job["error"], worker.tail())
        assert "no broker message carried it" in worker.tail(200_000)
    finally:
        client.close()
        engine.dispose()


def test_postgres_outage_is_503_and_leaves_nothing_half_written(private_postgres: PrivatePostgres,  # noqa: F811
                                                                 redis_url: str, big: dict[str, Path],
                                                                 tmp_path: Path, procs: list[Proc]) -> None:
    data = tmp_path / "data"
    broker = redis_url.rsplit("/", 1)[0] + "/14"
    import redis

    redis.Redis.from_url(broker).flushdb()
    env = env_for(data, LOWBIT_DATABASE_URL=private_postgres.url, LOWBIT_BROKER_URL=broker,
                  LOWBIT_JOB_LEASE_S="60", LOWBIT_JOB_HEARTBEAT_S="0.5", LOWBIT_JOB_RECONCILE_AFTER_S="2")
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    api, client = start_serve(data, tmp_path / "api.log", "--no-worker", "--no-migrate", env=env)
    procs.append(api)
    worker = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env, tmp_path / "worker.log")
    procs.append(worker)
    engine = sa.create_engine(private_postgres.url, pool_pre_ping=True)
    try:
        # A job that outlasts the outage: calibrating on 4,000 samples takes about 25 s with one thread, where
        # SLOW (3.7 s on a CPU with VNNI) could end while PostgreSQL was down and fail to record its result.
        many = builders.token_data(tmp_path / "many_tokens.npz", n=4000, vocab=8000, seq=32)
        job_id = _submit(client, big["tf"], many, '{"recipe": "int8_static", "options": {"method": "percentile", '
                         '"max_calibration_samples": 4000, "latency_runs": 400}}')
        until("the job to run", lambda: _status(engine, job_id) == "running", 90, worker)
        engine.dispose()
        private_postgres.stop()
        for method, path in (("GET", f"/api/v1/jobs/{job_id}"), ("GET", "/api/v1/jobs"),
                             ("POST", f"/api/v1/jobs/{job_id}/cancel")):
            r = client.request(method, path)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "database_unavailable" and r.headers["retry-after"] == "5"
        assert client.get("/readyz").status_code == 503
        time.sleep(3)  # the worker's heartbeats and progress writes fail meanwhile; the engine goes on
        private_postgres.start()
        job = wait_job(client, job_id, worker, timeout=180)
        assert job["status"] == "succeeded", (job["error"], worker.tail())
        art = client.get(job["links"]["artifact"])
        assert art.status_code == 200 and art.headers["etag"] == f'"{hashlib.sha256(art.content).hexdigest()}"'
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT status, artifact_path, report IS NOT NULL, cancel_requested "
                                     "FROM jobs")).all()
        assert [r[0] for r in rows] == ["succeeded"]
        assert Path(rows[0][1]).is_file() and rows[0][2] and not rows[0][3]
        assert client.get("/readyz").status_code == 200
    finally:
        client.close()
        engine.dispose()
