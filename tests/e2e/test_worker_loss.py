"""A Celery worker SIGKILLed mid-job on Redis and PostgreSQL: its heartbeat goes stale, another worker's
sweeper queues the job again, and it succeeds exactly once (one report, attempts recorded)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.e2e.conftest import Proc, env_for, lowbit_cmd, start_serve, wait_job

pytestmark = pytest.mark.slow


def test_killed_worker_job_is_requeued_by_the_lease(postgres_url: str, redis_url: str, big: dict[str, Path],
                                                    tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = env_for(data, LOWBIT_DATABASE_URL=postgres_url, LOWBIT_BROKER_URL=redis_url.rsplit("/", 1)[0] + "/12",
                  LOWBIT_JOB_LEASE_S="3", LOWBIT_JOB_HEARTBEAT_S="0.5")
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    api, client = start_serve(data, tmp_path / "api.log", "--no-worker", "--no-migrate", env=env)
    first = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env, tmp_path / "first.log")
    second: Proc | None = None
    try:
        deadline = time.monotonic() + 60
        files = {"model": ("t.onnx", big["tf"].read_bytes()), "calibration": ("d.npz", big["tf_data"].read_bytes())}
        r = client.post("/api/v1/jobs", files=files,
                        data={"config": '{"recipe": "int8_dynamic", "options": {"latency_runs": 400}}'})
        job_id = r.json()["id"]
        while client.get(f"/api/v1/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline + 60, first.tail()
            time.sleep(0.1)
        os.killpg(first.p.pid, signal.SIGKILL)  # the worker and its child die mid-job; Redis keeps the message
        first.p.wait()
        second = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env, tmp_path / "second.log")
        job = wait_job(client, job_id, second, timeout=180)
        assert job["status"] == "succeeded", (job["error"], second.tail())
        assert "queued again" in second.tail(200_000)
        engine = sa.create_engine(postgres_url)
        with engine.connect() as c:
            attempts, report = c.execute(sa.text("SELECT attempts, report IS NOT NULL FROM jobs WHERE id = :i"),
                                         {"i": job_id}).one()
        engine.dispose()
        assert (attempts, report) == (2, True)
        artifacts = list((data / "jobs" / job_id).glob("model.quantized.*.onnx"))
        assert len(artifacts) == 1
    finally:
        client.close()
        api.stop()
        first.stop()
        if second is not None:
            second.stop()
