from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.reports import assert_report_complete, recompute_cosines
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError, JobCancelled
from worker.engine.pipeline import run


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _cfg(
    zoo: dict[str, Path], tmp: Path, model: str, recipe: str, data: str | None, **options: object
) -> QuantizeConfig:
    return QuantizeConfig(
        model_path=zoo[model],
        output_path=tmp / f"{model}.{recipe}.onnx",
        recipe=recipe,
        options=parse_options(recipe, dict(options)),
        calibration_path=zoo[data] if data else None,
        threads=1,
        device="cpu",
    )


CASES = [
    ("conv", "conv_data", "Conv"),
    ("mlp", "mlp_data", "Gemm"),
    ("tf", "tf_data", "MatMul"),
    ("const", "const_data", "MatMul"),
]


# SQNR floors of int8_static on each test model, 3 dB under what it measures (onnxruntime 1.32, numpy 2.4,
# 1 thread): conv 45.29 dB, mlp 40.64 dB, tf 28.01 dB, const 30.92 dB. Widening every calibrated range 4x
# measures conv 36.41, mlp 30.63, tf 20.60, const 27.34 dB: each below its floor (the mutation test below).
SQNR_FLOORS = {"conv": 42.3, "mlp": 37.6, "tf": 25.0, "const": 27.9}
# Cosine measured: conv 0.999986, mlp 0.999959, tf 0.999208, const 0.999621.
COSINE_FLOORS = {"conv": 0.9999, "mlp": 0.9998, "tf": 0.998, "const": 0.999}


def static_quality_holds(model: str, report: dict) -> bool:
    return all(o["sqnr_db"] is not None and o["sqnr_db"] >= SQNR_FLOORS[model] and o["cosine"] >= COSINE_FLOORS[model]
               for o in report["accuracy"]["outputs"])


@pytest.mark.parametrize("model, data, main_op", CASES)
def test_widened_ranges_fail_the_int8_static_quality_floors(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, data: str, main_op: str
) -> None:
    """Mutation test: calibration that picked every range 4x too wide must not pass the floors above."""
    from worker.engine import calibrate

    written = calibrate.write_ort_ranges

    def widened(ranges: dict, path: Path) -> None:
        written({k: (4 * lo, 4 * hi) for k, (lo, hi) in ranges.items()}, path)

    # int8_static's handler imports write_ort_ranges from calibrate when it runs; conv_refine (equalization and
    # bias correction, which write the ranges of the model they keep) imported it when it was first loaded.
    from worker.engine import conv_refine

    monkeypatch.setattr(calibrate, "write_ort_ranges", widened)
    monkeypatch.setattr(conv_refine, "write_ort_ranges", widened)
    rep = run(_cfg(zoo, tmp_path, model, "int8_static", data)).report
    assert not static_quality_holds(model, rep), rep["accuracy"]["outputs"]


@pytest.mark.parametrize("model, data, main_op", CASES)
def test_int8_static(zoo: dict[str, Path], tmp_path: Path, model: str, data: str, main_op: str) -> None:
    stages: list[str] = []
    res = run(_cfg(zoo, tmp_path, model, "int8_static", data), lambda s, f: stages.append(s))
    rep = res.report
    assert_report_complete(rep, "int8_static")
    ops = _ops(res.artifact_path)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    # Every weight of the main operator is stored as int8.
    q = onnx.load(str(res.artifact_path))
    int8_inits = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8]
    assert int8_inits
    assert not [t for t in q.graph.initializer if t.data_type == TensorProto.FLOAT and t.name.endswith("weight")]
    assert any(layer["op_type"] == main_op and layer["precision"] == "int8" for layer in rep["layers"])
    assert static_quality_holds(model, rep), rep["accuracy"]["outputs"]
    assert rep["accuracy"]["source"] == "calibration_holdout"
    # Holdout samples are never used for calibration.
    n = int(np.load(zoo[data])[next(iter(np.load(zoo[data]).files))].shape[0])
    assert rep["calibration"]["samples"] + rep["accuracy"]["samples"] <= n
    assert list(dict.fromkeys(stages)) == ["preparing", "calibrating", "quantizing", "validating", "reporting"]
    assert res.artifact_sha256 == rep["model"]["quantized_sha256"]


@pytest.mark.parametrize("model, data, main_op", CASES)
def test_int8_dynamic(zoo: dict[str, Path], tmp_path: Path, model: str, data: str, main_op: str) -> None:
    res = run(_cfg(zoo, tmp_path, model, "int8_dynamic", data))
    rep = res.report
    assert_report_complete(rep, "int8_dynamic")
    ops = _ops(res.artifact_path)
    assert ops["DynamicQuantizeLinear"] + ops["MatMulInteger"] + ops["ConvInteger"] + ops["DynamicQuantizeMatMul"] > 0
    assert rep["calibration"] is None
    assert rep["accuracy"]["source"] == "calibration_set"
    for o in rep["accuracy"]["outputs"]:
        assert o["cosine"] > 0.99, o


def test_report_numbers_match_an_independent_recomputation(zoo: dict[str, Path], tmp_path: Path) -> None:
    res = run(_cfg(zoo, tmp_path, "conv", "int8_static", "conv_data", batch_size=4))
    rep = res.report
    x = np.load(zoo["conv_data"])["image"]
    held = x[x.shape[0] - rep["accuracy"]["samples"]:]
    cos = recompute_cosines(zoo["conv"], res.artifact_path, [{"image": held[i:i + 4]} for i in range(0, len(held), 4)])
    assert cos[0] == pytest.approx(rep["accuracy"]["outputs"][0]["cosine"], abs=1e-5)
    assert rep["size"]["quantized_bytes"] == res.artifact_path.stat().st_size


def test_labels_give_label_accuracy(zoo: dict[str, Path], tmp_path: Path) -> None:
    rep = run(_cfg(zoo, tmp_path, "mlp", "int8_static", "mlp_data")).report
    lab = rep["accuracy"]["labels"]
    assert lab is not None and lab["samples"] == rep["accuracy"]["samples"]
    # Labels were made from the float model with 10% flipped: accuracy is well above chance (20%).
    assert lab["original"] > 0.6
    assert lab["delta"] == pytest.approx(lab["quantized"] - lab["original"], abs=1e-6)


def test_eval_set_is_used_when_given(zoo: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(zoo, tmp_path, "conv", "int8_static", "conv_data")
    cfg = QuantizeConfig(**{**cfg.__dict__, "eval_path": zoo["conv_eval"]})
    rep = run(cfg).report
    assert rep["accuracy"]["source"] == "eval_set" and rep["accuracy"]["samples"] == 24
    assert rep["calibration"]["samples"] == 48
    assert rep["accuracy"]["labels"]["samples"] == 24
    assert rep["accuracy"]["overlap"] == {"evaluation_samples": 24, "shared_with_calibration": 0,
                                          "identical_to_calibration": False}
    assert not any("calibration set" in w for w in rep["warnings"])


def test_an_eval_set_equal_to_the_calibration_set_draws_a_warning(zoo: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(zoo, tmp_path, "conv", "int8_static", "conv_data")
    cfg = QuantizeConfig(**{**cfg.__dict__, "eval_path": zoo["conv_data"]})
    rep = run(cfg).report
    ov = rep["accuracy"]["overlap"]
    assert ov["identical_to_calibration"] is True and ov["shared_with_calibration"] == ov["evaluation_samples"]
    assert any("the evaluation set is the calibration set" in w for w in rep["warnings"])


def test_each_calibration_method_gives_a_different_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    shas = {}
    for method in ("minmax", "entropy", "percentile", "mse"):
        out = tmp_path / method
        out.mkdir()
        res = run(_cfg(zoo, out, "conv", "int8_static", "conv_data", method=method))
        assert res.report["calibration"]["method"] == method
        assert res.report["accuracy"]["outputs"][0]["cosine"] > 0.98
        shas[method] = res.artifact_sha256
    assert len(set(shas.values())) == 4


def test_constant_weights_and_old_opset_are_normalised(zoo: dict[str, Path], tmp_path: Path) -> None:
    assert _ops(zoo["const"])["Constant"] == 3
    res = run(_cfg(zoo, tmp_path, "const", "int8_static", "const_data"))
    steps = " ".join(res.report["model"]["preprocessing"])
    assert "Constant" in steps and "opset 11 -> 13" in steps
    q = onnx.load(str(res.artifact_path))
    assert _ops(res.artifact_path)["Constant"] == 0
    assert max(i.version for i in q.opset_import if i.domain in ("", "ai.onnx")) >= 13
    # Pre-processing may fuse MatMul+Add into Gemm; either way both weight layers run in int8.
    weight_layers = [x for x in res.report["layers"] if x["op_type"] in ("MatMul", "Gemm")]
    assert len(weight_layers) == 2 and all(x["precision"] == "int8" for x in weight_layers)
    assert all(x["sqnr_db"] is not None and x["sqnr_db"] > 20 for x in weight_layers)


def test_dynamic_without_data_validates_on_synthetic_inputs_and_says_so(zoo: dict[str, Path], tmp_path: Path) -> None:
    rep = run(_cfg(zoo, tmp_path, "mlp", "int8_dynamic", None)).report
    assert rep["accuracy"]["source"] == "synthetic"
    assert any("synthetic" in w for w in rep["warnings"])


def test_static_without_calibration_data_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EngineError) as e:
        run(_cfg(zoo, tmp_path, "mlp", "int8_static", None))
    assert e.value.code == "calibration_required"


def test_cancellation_from_the_progress_callback_stops_the_run(zoo: dict[str, Path], tmp_path: Path) -> None:
    def progress(stage: str, _: float) -> None:
        if stage == "calibrating":
            raise JobCancelled()

    cfg = _cfg(zoo, tmp_path, "conv", "int8_static", "conv_data")
    with pytest.raises(JobCancelled):
        run(cfg, progress)
    assert not cfg.output_path.exists()


def test_model_onnxruntime_cannot_run_fails_clearly(tmp_path: Path) -> None:
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "odd.onnx"
    onnx.save_model(m, str(path))
    cfg = QuantizeConfig(model_path=path, output_path=tmp_path / "o.onnx", recipe="int8_dynamic", threads=1)
    with pytest.raises(EngineError) as e:
        run(cfg)
    assert e.value.code == "model_not_runnable"
    assert "Frobnicate" in e.value.message


def test_artifact_runs_in_onnxruntime(zoo: dict[str, Path], tmp_path: Path) -> None:
    res = run(_cfg(zoo, tmp_path, "tf", "int8_static", "tf_data"))
    sess = ort.InferenceSession(str(res.artifact_path), providers=["CPUExecutionProvider"])
    d = np.load(zoo["tf_data"])
    (out,) = sess.run(None, {"input_ids": d["input_ids"][:2], "attention_mask": d["attention_mask"][:2]})
    assert out.shape == (2, 16, 1000)


def test_fixed_batch_one_model_is_fed_one_sample_at_a_time(tmp_path: Path) -> None:
    import torch

    from tests import builders

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    model = builders._export(net, (torch.randn(1, 12),), tmp_path / "b1.onnx", ["x"], ["y"])
    assert onnx.load(str(model)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    data = builders.save_npz(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((30, 12)).astype("f4"))
    cfg = QuantizeConfig(model_path=model, output_path=tmp_path / "q.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"batch_size": 8}), calibration_path=data, threads=1)
    rep = run(cfg).report
    assert rep["calibration"]["samples"] == 24 and rep["accuracy"]["samples"] == 6
    assert rep["latency"]["batch_size"] == 1
    assert rep["accuracy"]["outputs"][0]["cosine"] > 0.99


def test_second_run_on_same_model_and_data_reuses_calibration(zoo: dict[str, Path], tmp_path: Path) -> None:
    def cfg(method: str, out: str) -> QuantizeConfig:
        return QuantizeConfig(model_path=zoo["conv"], output_path=tmp_path / out, recipe="int8_static",
                              options=parse_options("int8_static", {"method": method}),
                              calibration_path=zoo["conv_data"], threads=1, cache_dir=tmp_path / "cache")

    first = run(cfg("entropy", "a.onnx")).report["calibration"]
    second = run(cfg("percentile", "b.onnx")).report["calibration"]
    assert first["cache_used"] is False and second["cache_used"] is True
    assert first["samples"] == second["samples"] and second["passes"] == 0
    # The cached statistics give the same model as a fresh calibration with that method.
    fresh = run(QuantizeConfig(**{**cfg("percentile", "c.onnx").__dict__, "cache_dir": None}))
    assert fresh.report["calibration"]["cache_used"] is False
    assert fresh.artifact_sha256 == run(cfg("percentile", "d.onnx")).artifact_sha256


def test_onnxruntime_calibrator_is_selectable(zoo: dict[str, Path], tmp_path: Path) -> None:
    res = run(_cfg(zoo, tmp_path, "conv", "int8_static", "conv_data", calibrator="ort", method="percentile"))
    cal = res.report["calibration"]
    assert cal["calibrator"] == "ort" and cal["method"] == "percentile" and cal["samples"] > 0
    assert res.report["accuracy"]["outputs"][0]["cosine"] > 0.98
    with pytest.raises(EngineError) as e:
        parse_options("int8_static", {"calibrator": "ort", "method": "mse"})
    assert e.value.code == "invalid_option"


def test_masks_with_infinities_give_finite_honest_numbers(tmp_path: Path) -> None:
    """x + mask(-inf) -> Softmax -> MatMul: the original itself has -inf activations."""
    import json

    from tests import builders

    rng = np.random.default_rng(0)
    mask = np.zeros((1, 8), np.float32)
    mask[0, 6:] = -np.inf
    w = rng.standard_normal((8, 5)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "mask"], ["masked"], name="add"),
         helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
         helper.make_node("MatMul", ["p", "W"], ["y"], name="proj")],
        "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5]),
         helper.make_tensor_value_info("masked", TensorProto.FLOAT, ["batch", 8])],
        [onnx.numpy_helper.from_array(mask, "mask"), onnx.numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, str(tmp_path / "m.onnx"))
    data = builders.save_npz(tmp_path / "d.npz", x=rng.standard_normal((30, 8)).astype(np.float32))
    cfg = QuantizeConfig(model_path=tmp_path / "m.onnx", output_path=tmp_path / "q.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {}), calibration_path=data, threads=1)
    rep = run(cfg).report
    json.dumps(rep, allow_nan=False)  # no NaN or infinity anywhere
    masked = next(o for o in rep["accuracy"]["outputs"] if o["name"] == "masked")
    assert masked["cosine"] > 0.99
    assert any("non-finite" in w and "masked" in w for w in rep["warnings"])


def test_an_artifact_larger_than_the_original_draws_a_warning(tmp_path: Path) -> None:
    """A model with few weights and many layers (basic-pitch's CQT front end is one) grows under QDQ: each
    quantized layer adds its nodes and scales, more than its 8-bit weights save. The report says so."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 16, 16])
    nodes, inits, prev = [], [], "x"
    rng = np.random.default_rng(0)
    for i in range(12):
        w = f"a_rather_long_weight_name_as_converters_write_them_{i}"
        inits.append(helper.make_tensor(w, TensorProto.FLOAT, [1, 1, 1, 1], [float(rng.uniform(0.5, 1.5))]))
        out = f"a_rather_long_activation_name_as_converters_write_them_{i}"
        nodes.append(helper.make_node("Conv", [prev, w], [out], name=f"conv_{i}"))
        prev = out
    y = helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", 1, 16, 16])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 1, 16, 16)).astype(np.float32))
    res = run(QuantizeConfig(model_path=tmp_path / "m.onnx", output_path=tmp_path / "q.onnx", recipe="int8_static",
                             options=parse_options("int8_static", {}), calibration_path=tmp_path / "c.npz",
                             work_dir=tmp_path / "w", threads=1))
    size = res.report["size"]
    assert size["quantized_bytes"] > size["original_bytes"]
    assert any("larger than the original" in w and f"{size['ratio']:.2f}x" in w for w in res.report["warnings"])
