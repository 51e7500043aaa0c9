"""Every kind of bad input gets a 4xx with a stable error code and a message; nothing is queued."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests import builders
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_dataset, upload_model


def _post_model(api: Harness, name: str, data: bytes):
    return api.client.post("/api/v1/models", files={"file": (name, data)})


def _post_dataset(api: Harness, name: str, data: bytes):
    return api.client.post("/api/v1/datasets", files={"file": (name, data)})


def _no_leftovers(api: Harness) -> None:
    root = Path(api.settings.data_dir)
    leftovers = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".part", ".onnx", ".npz")]
    assert leftovers == []


@pytest.mark.parametrize(
    "name, data, code",
    [
        ("model.onnx", b"this is plainly not an onnx file", "invalid_model"),
        ("model.onnx", b"<html><script>alert(1)</script></html>", "invalid_model"),
        ("model.onnx", b"PK\x03\x04" + b"\x00" * 64, "invalid_model"),
        ("model.onnx", b"", "invalid_model"),
        ("model.pt", b"\x80\x04\x95 pickled", "unsupported_model_format"),
        ("model.pt2", b"PK\x03\x04archive", "invalid_model"),
    ],
)
def test_not_a_model(api: Harness, name: str, data: bytes, code: str) -> None:
    r = _post_model(api, name, data)
    assert r.status_code == 422 and error_of(r) == code
    _no_leftovers(api)


def test_truncated_model(api: Harness, zoo: dict[str, Path]) -> None:
    data = zoo["conv"].read_bytes()
    r = _post_model(api, "conv.onnx", data[: len(data) - 5000])
    assert r.status_code == 422 and error_of(r) == "invalid_model"
    _no_leftovers(api)


def test_model_upload_without_file_field(api: Harness) -> None:
    r = api.client.post("/api/v1/models", files={"other": ("x", b"1")})
    assert r.status_code == 422 and error_of(r) == "invalid_request"
    assert "file" in r.json()["error"]["message"]


def test_upload_over_the_size_limit(api: Harness, zoo: dict[str, Path]) -> None:
    api.client.app.state.settings = api.settings.model_copy(update={"max_upload_bytes": 1000})  # type: ignore[attr-defined]
    r = _post_model(api, "conv.onnx", zoo["conv"].read_bytes())
    assert r.status_code == 413 and error_of(r) == "upload_too_large"
    _no_leftovers(api)


@pytest.mark.parametrize(
    "arrays, code",
    [
        ({"x": np.array([{"a": 1}, None], dtype=object)}, "invalid_dataset"),
        ({"x": np.zeros((0, 20), np.float32)}, "empty_dataset"),
        ({"x": np.array(["a", "b"])}, "invalid_dataset"),
        ({"x": np.zeros((3, 2)), "labels": np.zeros((3, 2))}, "invalid_dataset"),
    ],
)
def test_bad_datasets(api: Harness, arrays: dict[str, np.ndarray], code: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    r = _post_dataset(api, "d.npz", buf.getvalue())
    assert r.status_code == 422 and error_of(r) == code
    _no_leftovers(api)


def test_dataset_that_is_not_an_npz(api: Harness) -> None:
    r = _post_dataset(api, "d.npz", b"col1,col2\n1,2\n")
    assert r.status_code == 422 and error_of(r) == "invalid_dataset"


@pytest.fixture
def mlp_ids(api: Harness, zoo: dict[str, Path]) -> dict[str, str]:
    return {"model": upload_model(api.client, zoo["mlp"])["id"],
            "data": upload_dataset(api.client, zoo["mlp_data"])["id"]}


def _dataset(api: Harness, tmp_path: Path, **arrays: np.ndarray) -> str:
    p = builders.save_npz(tmp_path / f"{uuid.uuid4().hex}.npz", **arrays)
    return upload_dataset(api.client, p)["id"]


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"wrong_name": np.zeros((10, 20), np.float32)}, "missing array"),
        ({"features": np.zeros((10, 20), np.float32), "extra": np.zeros((10, 3), np.float32)}, "match no model input"),
        ({"features": np.zeros((10, 20), np.float64)}, "dtype float64"),
        ({"features": np.zeros((10, 21), np.float32)}, "shape [10, 21]"),
    ],
)
def test_dataset_that_does_not_fit_the_model(api: Harness, mlp_ids: dict[str, str], tmp_path: Path,
                                             arrays: dict[str, np.ndarray], needle: str) -> None:
    ds = _dataset(api, tmp_path, **arrays)
    for key in ("calibration_dataset_id", "eval_dataset_id"):
        r = submit(api.client, model_id=mlp_ids["model"], recipe="int8_static",
                   **{"calibration_dataset_id": mlp_ids["data"], key: ds})
        assert r.status_code == 422 and error_of(r) == "dataset_mismatch"
        assert needle in r.json()["error"]["message"]
    assert api.queue.enqueued == [] and api.client.get("/api/v1/jobs").json()["items"] == []


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"recipe": "int3_magic"}, 422, "unknown_recipe"),
        ({"recipe": "auto"}, 422, "invalid_request"),  # auto without an accuracy_target
        ({"recipe": "int4_weight_only", "options": {"block_size": 48}}, 422, "invalid_option"),
        ({"recipe": "int4_weight_only", "options": {"method": "entropy"}}, 422, "invalid_option"),  # int8 part only
        ({"recipe": "int4_weight_only", "options": {"algorithm": "gptq"}, "no_calibration": True}, 422,
         "calibration_required"),
        ({"recipe": "int8_static", "options": {"bogus": 1}}, 422, "unknown_option"),
        ({"recipe": "int8_static", "options": {"method": "vibes"}}, 422, "invalid_option"),
        ({"recipe": "int8_static", "options": {"batch_size": 0}}, 422, "invalid_option"),
        ({"recipe": "int8_static", "options": {"percentile": 120}}, 422, "invalid_option"),
        ({"recipe": "int8_static", "options": {"per_channel": "yes"}}, 422, "invalid_option"),
        ({"recipe": "int8_dynamic", "options": {"method": "entropy"}}, 422, "unknown_option"),
        ({"recipe": "int8_static", "no_calibration": True}, 422, "calibration_required"),
        ({"recipe": "int8_static", "accuracy_target": {"metric": "cosine", "min": 0.9, "max_drop": 0.1}}, 422,
         "invalid_request"),
        ({"recipe": "int8_static", "accuracy_target": {"metric": "vibes", "min": 0.9}}, 422, "invalid_request"),
        ({"recipe": "int8_static", "accuracy_target": {"metric": "sqnr_db", "max_drop": 3}}, 422, "invalid_request"),
        ({"recipe": "int8_static", "accuracy_target": {"metric": "cosine", "min": float("nan")}}, 422,
         "invalid_request"),
        ({"recipe": "int8_static", "surprise": 1}, 422, "invalid_request"),
        ({"recipe": "int8_static", "model_id": str(uuid.uuid4())}, 404, "model_not_found"),
        ({"recipe": "int8_static", "model_id": "../../etc/passwd"}, 404, "model_not_found"),
        ({"recipe": "int8_static", "calibration_dataset_id": str(uuid.uuid4())}, 404, "dataset_not_found"),
        ({"recipe": "int8_static", "eval_dataset_id": str(uuid.uuid4())}, 404, "dataset_not_found"),
        ({"recipe": "int8_dynamic", "device": "tpu"}, 422, "invalid_request"),
    ],
)
def test_bad_job_requests(api: Harness, mlp_ids: dict[str, str], body: dict, status: int, code: str) -> None:
    req = {"model_id": mlp_ids["model"], "calibration_dataset_id": mlp_ids["data"], **body}
    if req.pop("no_calibration", False):
        req.pop("calibration_dataset_id")
    r = submit(api.client, **req)
    assert r.status_code == status, r.text
    assert error_of(r) == code
    assert api.queue.enqueued == []


def test_label_target_without_labels(api: Harness, zoo: dict[str, Path], tmp_path: Path) -> None:
    model = upload_model(api.client, zoo["mlp"])["id"]
    ds = _dataset(api, tmp_path, features=np.zeros((20, 20), np.float32))
    r = submit(api.client, model_id=model, calibration_dataset_id=ds, recipe="int8_static",
               accuracy_target={"metric": "label_accuracy", "max_drop": 0.01})
    assert r.status_code == 422 and error_of(r) == "labels_required"


def test_too_few_samples_to_hold_out(api: Harness, zoo: dict[str, Path], tmp_path: Path) -> None:
    model = upload_model(api.client, zoo["mlp"])["id"]
    ds = _dataset(api, tmp_path, features=np.zeros((1, 20), np.float32))
    r = submit(api.client, model_id=model, calibration_dataset_id=ds, recipe="int8_static")
    assert r.status_code == 422 and error_of(r) == "not_enough_samples"


def test_malformed_json_and_content_type(api: Harness) -> None:
    r = api.client.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and error_of(r) == "invalid_json"
    r = api.client.post("/api/v1/jobs", content=b"recipe=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and error_of(r) == "unsupported_media_type"


def test_multipart_problems(api: Harness, zoo: dict[str, Path]) -> None:
    r = api.client.post("/api/v1/jobs", data={"config": json.dumps({"recipe": "int8_dynamic"})},
                        files={"calibration": ("c.npz", zoo["mlp_data"].read_bytes())})
    assert r.status_code == 422 and error_of(r) == "missing_field"
    r = api.client.post("/api/v1/jobs", data={"config": "{oops"}, files={"model": ("m.onnx", zoo["mlp"].read_bytes())})
    assert r.status_code == 422 and error_of(r) == "invalid_config"
    # A failed one-shot submission stores nothing: the whole request is one transaction.
    r = api.client.post("/api/v1/jobs", data={"config": json.dumps({"recipe": "int8_static"})},
                        files={"model": ("m.onnx", zoo["mlp"].read_bytes())})
    assert r.status_code == 422 and error_of(r) == "calibration_required"
    assert api.client.get("/api/v1/jobs").json()["items"] == []
    # ...and neither the rows nor the files of what was uploaded stay behind.
    bad = builders.npz_bytes(features=np.zeros((10, 7), np.float32))
    r = api.client.post("/api/v1/jobs", data={"config": json.dumps({"recipe": "int8_static"})},
                        files={"model": ("m.onnx", zoo["mlp"].read_bytes()), "calibration": ("c.npz", bad)})
    assert r.status_code == 422 and error_of(r) == "dataset_mismatch"
    _no_leftovers(api)


@pytest.mark.parametrize("path", ["/api/v1/jobs/{id}", "/api/v1/jobs/{id}/report", "/api/v1/jobs/{id}/artifact",
                                  "/api/v1/models/{id}", "/api/v1/datasets/{id}", "/jobs/{id}"])
def test_unknown_ids_are_404(api: Harness, path: str) -> None:
    for bad in (str(uuid.uuid4()), "not-a-uuid"):
        r = api.client.get(path.format(id=bad))
        assert r.status_code == 404
        assert error_of(r).endswith("not_found")


def test_unknown_route_is_a_json_404(api: Harness) -> None:
    r = api.client.get("/api/v1/nothing-here")
    assert r.status_code == 404 and error_of(r) == "not_found"


def _stateful_model(path: Path) -> Path:
    """silero-VAD-like inputs: audio x [batch, 4], a recurrent state h [2, batch, 8] and a 0-d int64 sample rate sr;
    y = x @ w + mean(h) + sr (as float)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((4, 8), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="fc"),
         helper.make_node("ReduceMean", ["h"], ["hm"], keepdims=0, name="state_mean"),
         helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="rate"),
         helper.make_node("Add", ["xw", "hm"], ["a"], name="add_state"),
         helper.make_node("Add", ["a", "srf"], ["y"], name="add_rate")],
        "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, "batch", 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize(
    "arrays",
    [
        # sr missing
        {"x": np.zeros((16, 4), np.float32), "h": np.zeros((16, 2, 1, 8), np.float32)},
        # sr as float: wrong dtype
        {"x": np.zeros((16, 4), np.float32), "h": np.zeros((16, 2, 1, 8), np.float32),
         "sr": np.full(16, 16000.0, np.float32)},
        # h with a fixed dim that does not fit (3 layers where the model has 2), and x of the wrong rank
        {"x": np.zeros((16, 4, 1), np.float32), "h": np.zeros((16, 3, 1, 8), np.float32),
         "sr": np.full(16, 16000, np.int64)},
        # sr as [samples, 2]: neither one value per sample ([samples]) nor anything else a 0-d input takes
        {"x": np.zeros((16, 4), np.float32), "h": np.zeros((16, 2, 1, 8), np.float32),
         "sr": np.full((16, 2), 16000, np.int64)},
    ],
)
def test_a_dataset_that_cannot_feed_state_and_scalar_inputs_is_refused_at_submit(
        api: Harness, tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Refused by the job-creation API with exactly the message the worker's engine would fail the job with, so
    # nothing waits in the queue to fail later.
    from worker.engine.errors import EngineError
    from worker.engine.feeds import plan_feeds
    from worker.engine.inspect import inspect_model_file
    from worker.engine.npz import inspect_npz

    model = _stateful_model(tmp_path / "stateful.onnx")
    data = builders.save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EngineError) as engine:
        plan_feeds(inspect_model_file(model).inputs, inspect_npz(data), 8, "calibration")
    m = upload_model(api.client, model)
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=upload_dataset(api.client, data)["id"],
               recipe="int8_static")
    assert r.status_code == 422 and error_of(r) == engine.value.code == "dataset_mismatch"
    assert r.json()["error"]["message"] == engine.value.message
    assert api.queue.enqueued == [] and api.client.get("/api/v1/jobs").json()["items"] == []


def test_complete_feeds_for_state_and_one_value_per_sample_for_a_0d_input_are_accepted(
        api: Harness, tmp_path: Path) -> None:
    # The README's dataset format: h [samples, 2, 1, 8] holds one complete feed per sample (its rank is the
    # input's + 1), sr [samples] one value per sample.
    model = upload_model(api.client, _stateful_model(tmp_path / "stateful.onnx"))
    rng = np.random.default_rng(0)
    data = builders.save_npz(tmp_path / "good.npz", x=rng.standard_normal((16, 4)).astype(np.float32),
                             h=rng.standard_normal((16, 2, 1, 8)).astype(np.float32),
                             sr=np.full(16, 16000, np.int64))
    r = submit(api.client, model_id=model["id"], calibration_dataset_id=upload_dataset(api.client, data)["id"],
               recipe="int8_dynamic")
    assert r.status_code == 202, r.text
    assert api.queue.enqueued == [(r.json()["id"], "cpu")]
