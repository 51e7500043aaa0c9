from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import sqlalchemy as sa

from app.jobs.models import Job
from app.jobs.schemas import JobCreate
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_dataset, upload_model
from tests.reports import assert_report_complete, recompute_cosines


def test_health_and_readiness(api: Harness) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "workers": "ok", "broker": "ok"}
    api.queue.fail = True
    r = api.client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unreachable")


def test_upload_describes_model_and_dataset(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["tf"])
    assert m["format"] == "onnx" and m["filename"] == "tf.onnx"
    assert m["sha256"] == hashlib.sha256(zoo["tf"].read_bytes()).hexdigest()
    assert m["size_bytes"] == zoo["tf"].stat().st_size
    assert m["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", 16]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", 16]},
    ]
    assert m["outputs"][0]["name"] == "logits"
    assert api.client.get(f"/api/v1/models/{m['id']}").json()["sha256"] == m["sha256"]
    d = upload_dataset(api.client, zoo["tf_data"])
    assert d["num_samples"] == 24
    assert d["arrays"]["input_ids"] == {"dtype": "int64", "shape": [24, 16]}


def test_static_job_end_to_end(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["conv"])
    d = upload_dataset(api.client, zoo["conv_data"])
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_static",
               options={"method": "entropy", "batch_size": 4})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["options"]["method"] == "entropy"
    assert job["links"] == {
        "self": f"/api/v1/jobs/{job['id']}", "artifact": f"/api/v1/jobs/{job['id']}/artifact",
        "report": f"/api/v1/jobs/{job['id']}/report", "page": f"/jobs/{job['id']}",
    }
    assert api.queue.committed_before_enqueue == [True]
    assert api.client.get(f"/api/v1/jobs/{job['id']}/artifact").status_code == 409
    assert api.run_queued() == ["succeeded"]

    done = api.client.get(job["links"]["self"]).json()
    assert done["status"] == "succeeded" and done["progress"] == 100 and done["error"] is None
    assert done["started_at"] and done["finished_at"] and done["finished_at"] >= done["started_at"]
    report = api.client.get(job["links"]["report"]).json()
    assert_report_complete(report, "int8_static")
    assert report["job_id"] == job["id"] and report["calibration"]["method"] == "entropy"

    art = api.client.get(job["links"]["artifact"])
    assert art.status_code == 200
    assert art.headers["content-type"] == "application/octet-stream"
    assert art.headers["content-disposition"].startswith("attachment")
    assert "conv.int8_static.onnx" in art.headers["content-disposition"]
    sha = hashlib.sha256(art.content).hexdigest()
    assert art.headers["etag"] == f'"{sha}"'
    assert len(art.content) == report["size"]["quantized_bytes"]
    assert api.client.get(job["links"]["artifact"], headers={"if-none-match": f'"{sha}"'}).status_code == 304

    # The downloaded artifact runs, and reproduces the report's accuracy on the held-out samples.
    out = Path(api.settings.data_dir) / "downloaded.onnx"
    out.write_bytes(art.content)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(zoo["conv_data"])["image"]
    held = x[len(x) - report["accuracy"]["samples"]:]
    cos = recompute_cosines(zoo["conv"], out, [{"image": held[i:i + 4]} for i in range(0, len(held), 4)])
    assert abs(cos[0] - report["accuracy"]["outputs"][0]["cosine"]) < 1e-5

    page = api.client.get(job["links"]["page"])
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert str(report["size"]["quantized_bytes"]) in page.text
    assert str(report["accuracy"]["outputs"][0]["cosine"]) in page.text
    assert "conv.onnx" in page.text
    assert job["id"] in api.client.get("/").text


def test_dynamic_job_on_transformer_with_int64_inputs(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["tf"])
    d = upload_dataset(api.client, zoo["tf_data"])
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_dynamic")
    assert r.status_code == 202, r.text
    assert api.run_queued() == ["succeeded"], api.client.get(f"/api/v1/jobs/{r.json()['id']}").json()["error"]
    report = api.client.get(f"/api/v1/jobs/{r.json()['id']}/report").json()
    assert_report_complete(report, "int8_dynamic")
    assert report["accuracy"]["outputs"][0]["cosine"] > 0.99


def test_one_shot_multipart_submission(api: Harness, zoo: dict[str, Path]) -> None:
    files = {
        "model": ("mlp.onnx", zoo["mlp"].read_bytes()),
        "calibration": ("cal.npz", zoo["mlp_data"].read_bytes()),
        "eval": ("eval.npz", zoo["mlp_data"].read_bytes()),
    }
    cfg = {"recipe": "int8_static", "options": {"method": "percentile", "percentile": 99.9},
           "accuracy_target": {"metric": "label_accuracy", "max_drop": 0.05}}
    r = api.client.post("/api/v1/jobs", files=files, data={"config": json.dumps(cfg)})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["calibration_dataset_id"] and job["eval_dataset_id"] and job["model_id"]
    assert job["accuracy_target"] == {"metric": "label_accuracy", "max_drop": 0.05}
    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{job['id']}/report").json()
    assert report["accuracy"]["source"] == "eval_set"
    assert report["accuracy"]["labels"] is not None
    tgt = report["accuracy_target"]
    assert tgt["value"] == report["accuracy"]["labels"]["quantized"]
    assert tgt["met"] == (report["accuracy"]["labels"]["original"] - tgt["value"] <= 0.05)


def test_list_with_cursor_pagination_and_status_filter(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    ids = []
    for _ in range(5):
        r = submit(api.client, model_id=m["id"], recipe="int8_dynamic")
        assert r.status_code == 202
        ids.append(r.json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = api.client.get("/api/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == 3 and seen == list(reversed(ids))
    api.client.post(f"/api/v1/jobs/{ids[0]}/cancel")
    cancelled = api.client.get("/api/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert error_of(api.client.get("/api/v1/jobs", params={"cursor": "!!nonsense"})) == "invalid_cursor"
    assert error_of(api.client.get("/api/v1/jobs", params={"status": "done"})) == "invalid_status"


def test_cancel_queued_job_is_never_run(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    job = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()
    r = api.client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert api.run_queued() == ["skipped"]
    assert api.client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    r = api.client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and error_of(r) == "job_finished"


def test_redelivered_message_does_not_run_a_job_twice(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    job = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()
    api.queue.enqueued.append(api.queue.enqueued[0])  # the broker delivers the message twice
    assert api.run_queued() == ["succeeded", "skipped"]
    with api.factory() as s:
        row = s.get(Job, job["id"])
        assert row is not None and row.attempts == 1 and row.status == "succeeded"


def test_delete_removes_job_artifact_and_report(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    job = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()
    api.run_queued()
    with api.factory() as s:
        row = s.get(Job, job["id"])
        assert row is not None and row.artifact_path
        artifact = Path(row.artifact_path)
    assert artifact.exists()
    assert api.client.delete(f"/api/v1/jobs/{job['id']}").status_code == 204
    assert not artifact.exists()
    for path in ("", "/report", "/artifact"):
        r = api.client.get(f"/api/v1/jobs/{job['id']}{path}")
        assert r.status_code == 404 and error_of(r) == "job_not_found"
    with api.factory() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


def test_model_onnxruntime_cannot_run_becomes_a_failed_job(api: Harness, tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save_model

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "odd.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.example", 1)]), str(path))
    m = upload_model(api.client, path)
    job = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()
    assert api.run_queued() == ["failed"]
    got = api.client.get(f"/api/v1/jobs/{job['id']}").json()
    assert got["status"] == "failed"
    assert got["error"]["code"] == "model_not_runnable" and "Frobnicate" in got["error"]["message"]
    page = api.client.get(f"/jobs/{job['id']}").text
    assert "model_not_runnable" in page
    assert api.client.get(f"/api/v1/jobs/{job['id']}/report").status_code == 409


def test_broker_down_gives_503_and_a_recorded_failure(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    api.queue.fail = True
    r = submit(api.client, model_id=m["id"], recipe="int8_dynamic")
    assert r.status_code == 503 and error_of(r) == "broker_unavailable"
    items = api.client.get("/api/v1/jobs").json()["items"]
    assert len(items) == 1 and items[0]["status"] == "failed"
    assert items[0]["error"]["code"] == "broker_unavailable"


def test_second_job_on_the_same_data_uses_the_calibration_cache(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["conv"])
    d = upload_dataset(api.client, zoo["conv_data"])
    ids = []
    for method in ("mse", "entropy"):
        r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_static",
                   options={"method": method})
        ids.append(r.json()["id"])
    assert api.run_queued() == ["succeeded", "succeeded"]
    cals = [api.client.get(f"/api/v1/jobs/{i}/report").json()["calibration"] for i in ids]
    assert [c["cache_used"] for c in cals] == [False, True]
    assert [c["method"] for c in cals] == ["mse", "entropy"]


def test_int4_and_fp16_jobs_end_to_end(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["tf"])
    d = upload_dataset(api.client, zoo["tf_data"])
    ids = {}
    for recipe, options in (("int4_weight_only", {"block_size": 16}), ("fp16", {})):
        r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe=recipe, options=options)
        assert r.status_code == 202, r.text
        ids[recipe] = r.json()["id"]
    assert api.run_queued() == ["succeeded", "succeeded"]
    for recipe, job_id in ids.items():
        report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
        assert_report_complete(report, recipe)
        art = api.client.get(f"/api/v1/jobs/{job_id}/artifact")
        path = Path(api.settings.data_dir) / f"{recipe}.onnx"
        path.write_bytes(art.content)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.load(zoo["tf_data"])
        (out,) = sess.run(None, {"input_ids": x["input_ids"][:2], "attention_mask": x["attention_mask"][:2]})
        assert out.shape == (2, 16, 1000)
    int4 = api.client.get(f"/api/v1/jobs/{ids['int4_weight_only']}/report").json()
    assert int4["calibration"]["algorithm"] == "clip_search"
    assert int4["accuracy"]["baselines"][0]["algorithm"] == "rtn"
    assert int4["size"]["bits_per_weight"] == 6.0


def test_jobs_interrupted_by_a_server_stop_are_queued_again_then_failed(api: Harness, zoo: dict[str, Path]) -> None:
    from app.jobs.service import recover_interrupted

    m = upload_model(api.client, zoo["mlp"])
    ids = [submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"] for _ in range(2)]
    api.queue.enqueued.clear()
    with api.factory.begin() as s:  # as if a worker had claimed both and then died
        for job_id, attempts in zip(ids, (1, 3), strict=True):
            row = s.get(Job, job_id)
            assert row is not None
            row.status, row.stage, row.attempts = "running", "calibrating", attempts
    with api.factory() as s:
        requeued, failed = recover_interrupted(s)
        s.commit()
    assert requeued == [(ids[0], "cpu")] and failed == [ids[1]]
    first, second = (api.client.get(f"/api/v1/jobs/{i}").json() for i in ids)
    assert first["status"] == "queued" and first["stage"] is None
    assert second["status"] == "failed" and second["error"]["code"] == "worker_lost"
    # The re-queued job then runs normally.
    api.queue.enqueued.append((ids[0], "cpu"))
    assert api.run_queued() == ["succeeded"]


def test_a_stale_heartbeat_requeues_the_job_and_the_old_attempt_steps_aside(api: Harness,
                                                                           zoo: dict[str, Path]) -> None:
    from datetime import timedelta

    from app.db import utcnow
    from worker.runner import LeaseLost, Watch
    from worker.sweeper import sweep_stale
    from worker.tasks import claim

    m = upload_model(api.client, zoo["mlp"])
    job_id = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    api.queue.enqueued.clear()
    assert claim(api.factory, job_id) == 1  # attempt 1 starts, then its worker goes silent
    job_dir = Path(api.settings.data_dir) / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "keep").write_text("files of whichever attempt owns the job")
    assert sweep_stale(api.factory, 60, lambda *a: None) == []  # fresh heartbeat: left alone
    with api.factory.begin() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.heartbeat_at = utcnow() - timedelta(seconds=120)
    requeued: list[tuple[str, str]] = []
    assert sweep_stale(api.factory, 60, lambda *a: requeued.append(a)) == [job_id]
    assert requeued == [(job_id, "cpu")]
    assert api.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued"
    # The old attempt wakes up: it must stop without touching the job's files.
    with pytest.raises(LeaseLost):
        Watch(api.factory, job_id, attempt=1)("validating", 0.5)
    assert (job_dir / "keep").exists()
    api.queue.enqueued.extend(requeued)
    assert api.run_queued() == ["succeeded"]
    with api.factory() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.attempts == 2 and row.status == "succeeded"


def test_a_job_that_keeps_losing_its_worker_fails_after_three_attempts(api: Harness, zoo: dict[str, Path]) -> None:
    from datetime import timedelta

    from app.db import utcnow
    from worker.sweeper import sweep_stale

    m = upload_model(api.client, zoo["mlp"])
    job_id = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    with api.factory.begin() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.status, row.attempts, row.heartbeat_at = "running", 3, utcnow() - timedelta(seconds=600)
    assert sweep_stale(api.factory, 60, lambda *a: None) == []
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"


def test_device_and_queue_are_separate_fields(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    gpu = submit(api.client, model_id=m["id"], recipe="int8_dynamic", device="gpu").json()
    assert (gpu["device"], gpu["queue"]) == ("gpu", "gpu")
    plain = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()
    assert (plain["device"], plain["queue"]) == ("cpu", "cpu")  # LOWBIT_DEFAULT_QUEUE, and the device it means
    assert api.queue.enqueued == [(gpu["id"], "gpu"), (plain["id"], "cpu")]
    with api.factory() as s:
        row = s.get(Job, gpu["id"])
        assert row is not None and (row.device, row.queue) == ("gpu", "gpu")
    out = api.client.get("/openapi.json").json()["components"]["schemas"]["JobOut"]["properties"]
    assert "hardware" in out["device"]["description"] and "queue" in out["queue"]["description"]
    assert "hardware" in JobCreate.model_json_schema()["properties"]["device"]["description"]


def test_route_picks_the_queue_from_the_device_in_one_place() -> None:
    from app.jobs.service import route
    from app.settings import Settings

    s = Settings(default_queue="gpu")
    assert route("cpu", settings=s) == ("cpu", "cpu")
    assert route("gpu", settings=s) == ("gpu", "gpu")
    assert route(None, settings=s) == ("gpu", "gpu")
    assert route(None, settings=Settings(default_queue="cpu")) == ("cpu", "cpu")


# None: the worker's own device (LOWBIT_WORKER_DEVICE).
@pytest.mark.parametrize("device, queue, engine", [("gpu", "big-memory", "cuda"), ("cpu", "gpu", None)])
def test_the_engine_device_comes_from_the_jobs_device_not_its_queue(api: Harness, zoo: dict[str, Path],
                                                                    monkeypatch: pytest.MonkeyPatch, device: str,
                                                                    queue: str, engine: str | None) -> None:
    from worker import runner
    from worker.engine.config import QuantizeConfig
    from worker.engine.errors import EngineError

    asked: list[str] = []

    def fake_engine(cfg: QuantizeConfig, *args: object, **kwargs: object) -> object:
        asked.append(cfg.device)
        raise EngineError("invalid_model", "stopped by the test once the device was seen")

    monkeypatch.setattr(runner, "run_engine", fake_engine)
    m = upload_model(api.client, zoo["mlp"])
    job_id = submit(api.client, model_id=m["id"], recipe="int8_dynamic", device=device).json()["id"]
    with api.factory.begin() as s:  # routed elsewhere later (e.g. by memory): what it asked for stays
        row = s.get(Job, job_id)
        assert row is not None
        row.queue = queue
    assert api.run_queued() == ["failed"]
    assert asked == [engine or api.settings.worker_device] and api.settings.worker_device != "cuda"
