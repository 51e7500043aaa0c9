"""An auto job on PostgreSQL and Redis with two real `lowbit worker` processes: its candidates are Celery
sub-tasks on the job's queue, so both workers run some of them (the report records who ran each)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import builders
from tests.e2e.conftest import Proc, env_for, lowbit_cmd, start_serve, wait_job

pytestmark = pytest.mark.slow


def test_candidates_run_on_two_workers(postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = env_for(data, LOWBIT_DATABASE_URL=postgres_url, LOWBIT_BROKER_URL=redis_url.rsplit("/", 1)[0] + "/13")
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    api, client = start_serve(data, tmp_path / "api.log", "--no-worker", "--no-migrate", env=env)
    workers = [Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env, tmp_path / f"worker{i}.log")
               for i in (1, 2)]
    try:
        # One round of candidates (no fallback steps): which model wins is the engine tests' business.
        model = builders.mlp(tmp_path / "mlp.onnx")
        calib = builders.mlp_data(tmp_path / "mlp.npz")
        # 40 evaluation samples: the candidates see the first 24, the chosen model is confirmed on the last 16 in
        # a sandboxed run of its own on the worker that concludes the search.
        ev = builders.mlp_data(tmp_path / "eval.npz", n=40, seed=3)
        # (By size only: on a model this small every quantized candidate is slower than fp32.)
        config = {"recipe": "auto", "options": {"latency_runs": 3, "max_fallback_steps": 0, "prefer": "size"},
                  "accuracy_target": {"metric": "cosine", "min": 0.99}}
        r = client.post("/api/v1/jobs", files={"model": ("mlp.onnx", model.read_bytes()),
                                               "calibration": ("mlp.npz", calib.read_bytes()),
                                               "eval": ("eval.npz", ev.read_bytes())},
                        data={"config": json.dumps(config)})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"], workers[0], timeout=240)
        assert job["status"] == "succeeded", (job["error"], workers[0].tail(), workers[1].tail())
        report = client.get(f"/api/v1/jobs/{job['id']}/report").json()
        assert report["chosen"]["recipe"] in ("int8_static", "int8_dynamic", "int4_weight_only")
        assert report["accuracy_target"]["met"] is True and report["accuracy_target"]["confirmed"] is True
        conf = report["auto"]["confirmation"]
        assert (report["auto"]["selection"]["samples"], conf["samples"], conf["same_artifact"]) == (24, 16, True)
        assert report["accuracy"]["samples"] == 16
        ran_by = {row["worker"] for row in report["candidates"]}
        assert len(ran_by) >= 2, report["candidates"]
        assert report["auto"]["workers"] == sorted(ran_by)
        # The same names are in the candidates table, one row per candidate, all finished.
        engine = sa.create_engine(postgres_url)
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT worker, status FROM auto_candidates WHERE job_id = :i"),
                             {"i": job["id"]}).all()
        engine.dispose()
        assert len(rows) == len(report["candidates"])
        assert {w for w, _ in rows} == ran_by and {s for _, s in rows} == {"done"}
        # Each worker's log shows the candidates it ran.
        assert all("running candidate" in w.tail(200_000) for w in workers)
    finally:
        client.close()
        api.stop()
        for w in workers:
            w.stop()
