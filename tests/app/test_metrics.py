"""GET /metrics: Prometheus text that a Prometheus parser reads, with counts that match the jobs run."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import builders
from tests.app.conftest import Harness
from tests.app.helpers import submit, upload_dataset, upload_model


def _parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _seconds(job: dict[str, str]) -> float:
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


def test_metrics_match_the_jobs_run(api: Harness, zoo: dict[str, Path], tmp_path: Path) -> None:
    r = api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    empty = _parse(r.text)
    assert empty["lowbit_queue_depth"] == {(("queue", "cpu"),): 0, (("queue", "gpu"),): 0}
    assert empty["lowbit_upload_bytes"] == {(("kind", "dataset"),): 0, (("kind", "model"),): 0}

    mlp = upload_model(api.client, zoo["mlp"])
    bad = upload_model(api.client, builders.mismatched_mlp(tmp_path / "mismatched.onnx"))
    data = upload_dataset(api.client,
                          builders.save_npz(tmp_path / "features.npz", x=np.ones((20, 20), np.float32)))
    ok = submit(api.client, model_id=mlp["id"], recipe="int8_dynamic").json()
    failed = submit(api.client, model_id=bad["id"], calibration_dataset_id=data["id"], recipe="int8_static",
                    options={"batch_size": 4}).json()
    cancelled = submit(api.client, model_id=mlp["id"], recipe="int8_dynamic").json()
    api.client.post(f"/api/v1/jobs/{cancelled['id']}/cancel")
    assert api.run_queued() == ["succeeded", "failed", "skipped"]
    waiting = submit(api.client, model_id=mlp["id"], recipe="int8_dynamic", device="gpu").json()
    assert waiting["queue"] == "gpu"

    m = _parse(api.client.get("/metrics").text)
    jobs = m["lowbit_jobs"]
    assert jobs[(("recipe", "int8_dynamic"), ("status", "succeeded"))] == 1
    assert jobs[(("recipe", "int8_dynamic"), ("status", "cancelled"))] == 1
    assert jobs[(("recipe", "int8_dynamic"), ("status", "queued"))] == 1
    assert jobs[(("recipe", "int8_static"), ("status", "failed"))] == 1
    assert sum(jobs.values()) == 4
    assert m["lowbit_queue_depth"] == {(("queue", "cpu"),): 0, (("queue", "gpu"),): 1}

    # Job durations: the two jobs a worker ran (the cancelled one never started), each in its own series.
    done = {j["id"]: api.client.get(f"/api/v1/jobs/{j['id']}").json() for j in (ok, failed)}
    for job, recipe, status in ((ok, "int8_dynamic", "succeeded"), (failed, "int8_static", "failed")):
        labels = (("recipe", recipe), ("status", status))
        assert m["lowbit_job_duration_seconds_count"][labels] == 1
        assert m["lowbit_job_duration_seconds_sum"][labels] == pytest.approx(_seconds(done[job["id"]]), abs=1e-3)
        assert m["lowbit_job_duration_seconds_bucket"][(("le", "+Inf"), *labels)] == 1
    assert sum(m["lowbit_job_duration_seconds_count"].values()) == 2

    # Stage durations: every stage each job went through, once.
    stages = {dict(k)["stage"]: v for k, v in m["lowbit_job_stage_duration_seconds_count"].items()
              if dict(k)["recipe"] == "int8_dynamic"}
    assert stages == {"preparing": 1, "quantizing": 1, "validating": 1, "reporting": 1}
    static = {dict(k)["stage"]: v for k, v in m["lowbit_job_stage_duration_seconds_count"].items()
              if dict(k)["recipe"] == "int8_static"}
    assert static == {"preparing": 1, "calibrating": 1}  # it failed while calibrating
    assert done[failed["id"]]["stage"] == "calibrating"
    buckets = m["lowbit_job_stage_duration_seconds_bucket"]
    series = sorted((float(dict(k)["le"]), v) for k, v in buckets.items()
                    if dict(k)["stage"] == "validating" and dict(k)["recipe"] == "int8_dynamic")
    assert [v for _, v in series] == sorted(v for _, v in series) and series[-1] == (float("inf"), 1)

    model_bytes = zoo["mlp"].stat().st_size + (tmp_path / "mismatched.onnx").stat().st_size
    assert m["lowbit_upload_bytes"] == {(("kind", "dataset"),): (tmp_path / "features.npz").stat().st_size,
                                        (("kind", "model"),): model_bytes}
    assert m["lowbit_uploads"] == {(("kind", "dataset"),): 1, (("kind", "model"),): 2}
    assert m["lowbit_webhook_deliveries"] == {(("status", s),): 0 for s in ("delivered", "failed", "pending")}
