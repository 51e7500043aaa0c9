"""PyTorch models through the API: .pt2 uploads, jobs on them (int8_static and qat_int8), hostile files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import pt2_builders as pb
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_dataset, upload_model
from tests.reports import assert_report_complete

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_pt2_conv_net_and_transformer_through_int8_static_and_qat_int8(sqlite_api: Harness,
                                                                       pt2_zoo: dict[str, Path]) -> None:
    api = sqlite_api
    conv = upload_model(api.client, pt2_zoo["conv"])
    assert conv["format"] == "pt2" and conv["filename"] == "conv.pt2"
    assert conv["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert [(o["dtype"], o["shape"]) for o in conv["outputs"]] == [("float32", ["batch", 10])]
    tf = upload_model(api.client, pt2_zoo["tf"])
    assert tf["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 16]},
                            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", 16]}]
    assert api.client.get(f"/api/v1/models/{tf['id']}").json()["format"] == "pt2"

    jobs: dict[tuple[str, str], str] = {}
    for name, model in (("conv", conv), ("tf", tf)):
        data = upload_dataset(api.client, pt2_zoo[f"{name}_data"])
        # The transformer trains each batch in parts of one sample (what one sample saves is above 0.0001 MB).
        parts = {"train_memory_mb": 0.0001} if name == "tf" else {}
        for recipe, options in (("int8_static", {}), ("qat_int8", {"steps": 20, "batch_size": 8, **parts})):
            r = submit(api.client, model_id=model["id"], calibration_dataset_id=data["id"], recipe=recipe,
                       options=options)
            assert r.status_code == 202, r.text
            jobs[(name, recipe)] = r.json()["id"]
            if recipe == "qat_int8":  # recorded with every default filled in
                recorded = r.json()["options"]
                assert recorded["steps"] == 20 and recorded["learning_rate"] == 0.05
                assert recorded["train_activation_ranges"] is True and recorded["train_weight_ranges"] is False
    assert api.run_queued() == ["succeeded"] * 4, [
        api.client.get(f"/api/v1/jobs/{j}").json()["error"] for j in jobs.values()]

    feeds = {
        "conv": {"image": np.load(pt2_zoo["conv_data"])["image"][:3]},
        "tf": {k: np.load(pt2_zoo["tf_data"])[k][:3] for k in ("input_ids", "attention_mask")},
    }
    for (name, recipe), job_id in jobs.items():
        report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
        assert_report_complete(report, recipe)
        model = report["model"]
        assert model["source_format"] == "pt2"
        export = model["export"]
        assert export["opset"] >= 13 and export["dynamic_dims"] and export["check"]["samples"] > 0
        assert all(o["rel_l2_error"] < 1e-3 for o in export["check"]["outputs"])
        # The second job on a model reuses the first one's export.
        assert export["cache_used"] is (recipe == "qat_int8")
        assert report["accuracy"]["labels"] is not None, (name, recipe, report["warnings"])
        assert report["accuracy"]["outputs"][0]["cosine"] > 0.95, report["accuracy"]
        if recipe == "qat_int8":
            training = report["training"]
            assert training["steps"] == 20 and training["seconds"] > 0 and training["loss_curve"]
            assert training["fake_quantized"]["weights"] and training["fake_quantized"]["activations"]
            (base,) = report["accuracy"]["baselines"]
            assert base["recipe"] == "int8_static" and base["labels"]["samples"] == report["accuracy"]["samples"]
            # The page draws the loss curve and puts post-training int8 next to QAT.
            page = api.client.get(f"/jobs/{job_id}").text
            assert 'id="training"' in page and "<polyline" in page and "What training bought" in page
            assert training["samples_per_backward_pass"] == (1 if name == "tf" else 8)
            assert ("each batch of 8 in parts of 1 sample(s) per backward pass" in " ".join(page.split())) is (
                name == "tf")
            assert "post-training int8_static (minmax)" in page
            assert f'data-key="accuracy.baselines.0.outputs.0.cosine">{base["outputs"][0]["cosine"]}' in page
        art = api.client.get(f"/api/v1/jobs/{job_id}/artifact")
        assert art.status_code == 200 and f"{name}.{recipe}.onnx" in art.headers["content-disposition"]
        path = Path(api.settings.data_dir) / f"{name}.{recipe}.onnx"
        path.write_bytes(art.content)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert {i.name for i in sess.get_inputs()} == set(feeds[name])
        (out,) = sess.run(None, feeds[name])  # batch 3: the dynamic batch axis survived export and quantization
        assert out.shape == (3, 10 if name == "conv" else 5)
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def _hostile(kind: str, tmp: Path, conv: Path, canary: Path) -> tuple[str, bytes]:
    if kind == "pickle named .pt":
        return "model.pt", pb.pickle_payload(canary)
    if kind == "pickle named .pt2":
        return "model.pt2", pb.pickle_payload(canary)
    if kind == "pickle named .onnx":
        return "model.onnx", pb.pickle_payload(canary)
    if kind == "TorchScript named .pt2":
        return "model.pt2", pb.torchscript_file(tmp / "ts.pt").read_bytes()
    if kind == "TorchScript named .pth":
        return "model.pth", pb.torchscript_file(tmp / "ts.pt").read_bytes()
    if kind == "torch.save checkpoint named .pt2":
        return "model.pt2", pb.torch_save_checkpoint(tmp / "ck.pt", canary).read_bytes()
    if kind == "zip posing as .pt2":
        return "model.pt2", pb.zip_posing_as_pt2(tmp / "z.zip").read_bytes()
    if kind == ".pt2 with a use_pickle weight":
        return "model.pt2", pb.pt2_with_pickled_weight(conv, tmp / "w.pt2", canary).read_bytes()
    raise AssertionError(kind)


HOSTILE = [
    ("pickle named .pt", "unsupported_model_format", "torch.export.save"),
    ("pickle named .pt2", "unsupported_model_format", "torch.export.save"),
    ("pickle named .onnx", "invalid_model", "pickle"),
    ("TorchScript named .pt2", "unsupported_model_format", "torch.export.save"),
    ("TorchScript named .pth", "unsupported_model_format", "torch.export.save"),
    ("torch.save checkpoint named .pt2", "unsupported_model_format", "torch.export.save"),
    ("zip posing as .pt2", "invalid_model", "torch.export"),
    (".pt2 with a use_pickle weight", "unsafe_model", "use_pickle"),
]


@pytest.mark.parametrize("kind, code, words", HOSTILE)
def test_hostile_pytorch_uploads_are_refused(api: Harness, pt2_zoo: dict[str, Path], tmp_path: Path, kind: str,
                                             code: str, words: str) -> None:
    canary = tmp_path / "canary"
    name, data = _hostile(kind, tmp_path, pt2_zoo["conv"], canary)
    r = api.client.post("/api/v1/models", files={"file": (name, data)})
    assert 400 <= r.status_code < 500 and error_of(r) == code, r.text
    assert words in r.json()["error"]["message"]
    assert not canary.exists()
    stored = [p for p in Path(api.settings.data_dir).rglob("*")
              if p.is_file() and "lowbit.db" not in p.name and p.name != "session_secret"]
    assert stored == [], stored


def test_a_pt2_whose_sample_inputs_are_a_payload_is_loaded_without_them(sqlite_api: Harness,
                                                                      pt2_zoo: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """torch.export.load falls back to an unrestricted torch.load for the sample inputs; lowbit loads a copy
    whose sample-inputs file is empty, so the upload is accepted and the payload never runs."""
    canary = tmp_path / "canary"
    path = pb.pt2_with_sample_inputs_payload(pt2_zoo["conv"], tmp_path / "conv.pt2", canary)
    m = upload_model(sqlite_api.client, path)
    assert m["format"] == "pt2" and m["inputs"][0]["name"] == "image"
    assert not canary.exists()


def test_qat_needs_a_pt2_upload(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    d = upload_dataset(api.client, zoo["mlp_data"])
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="qat_int8")
    assert r.status_code == 422 and error_of(r) == "pytorch_model_required"
    assert "torch.export.save" in r.json()["error"]["message"]
    r = submit(api.client, model_id=m["id"], recipe="qat_int8", options={"steps": 10})
    assert r.status_code == 422
    assert api.queue.enqueued == []
