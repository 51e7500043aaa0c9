"""Per-layer sensitivity: each layer quantized alone, ranked by what it does to the model's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tests import builders
from worker.engine import pipeline
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.sensitivity import activation_qparams, analyse, fake_quant_weight, quantize_one


def test_static_report_ranks_the_planted_layers_first(tmp_path: Path) -> None:
    model = builders.planted_outlier_mlp(tmp_path / "p.onnx")
    data = builders.planted_data(tmp_path / "p.npz")
    cfg = QuantizeConfig(model_path=model, output_path=tmp_path / "q.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"latency_runs": 2}), calibration_path=data,
                         threads=1, device="cpu")
    report = pipeline.run(cfg).report
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(report["sensitivity"]["ranking"][:2]) == set(builders.PLANTED_SENSITIVE)
    for name in builders.PLANTED_SENSITIVE:
        # Alone in int8, a planted layer loses most of the output; its own output is a few dB at best.
        assert layers[name]["sensitivity"] > 0.1
        assert layers[name]["isolated_sqnr_db"] < 10
    for name in ("fc1", "expand1", "head"):
        assert layers[name]["sensitivity"] < 1e-3
        assert layers[name]["isolated_sqnr_db"] > 30
    # Turned off, the report carries no sensitivity (auto's later candidates skip the cost).
    off = pipeline.run(QuantizeConfig(**{**cfg.__dict__, "layer_sensitivity": False})).report
    assert "sensitivity" not in off and "sensitivity" not in off["layers"][0]


def test_other_recipes_do_not_report_sensitivity(tmp_path: Path) -> None:
    model = builders.mlp(tmp_path / "m.onnx")
    cfg = QuantizeConfig(model_path=model, output_path=tmp_path / "q.onnx", recipe="int8_dynamic",
                         options=parse_options("int8_dynamic", {"latency_runs": 2}),
                         calibration_path=builders.mlp_data(tmp_path / "d.npz"), threads=1, device="cpu")
    assert "sensitivity" not in pipeline.run(cfg).report


def test_quantize_one_touches_only_that_node(tmp_path: Path) -> None:
    model = onnx.load(str(builders.planted_outlier_mlp(tmp_path / "p.onnx")))
    ranges = {"expand1.out": (-500.0, 500.0)}
    q = quantize_one(model, "squeeze1", ranges)
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 2 and all("squeeze1" in o for n in qdq for o in n.output)
    assert "squeeze1.out" in {o.name for o in q.graph.output}
    # Every other weight is the float original.
    orig = {t.name for t in model.graph.initializer}
    assert {t.name for t in q.graph.initializer} - orig == {
        "squeeze1.weight__fq_squeeze1", "expand1.out__q_squeeze1_scale", "expand1.out__q_squeeze1_zp"}
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_fake_quant_weight_is_per_channel_int8() -> None:
    w = np.array([[1.0, 100.0], [-0.5, 50.0], [0.25, -25.0]], np.float32)
    q = fake_quant_weight(w, axis=1)  # MatMul weights: one scale per output column
    assert np.allclose(q[:, 0], np.round(w[:, 0] / (1 / 127)) * (1 / 127))
    assert np.abs(q - w).max() <= 100 / 127 / 2 + 1e-6
    assert len(np.unique(np.round(q[:, 1] / (100 / 127)))) == 3


def test_activation_qparams_keep_zero_exact() -> None:
    scale, zp = activation_qparams(0.5, 2.0)  # zero is inside the range whatever the data says
    assert zp == 0 and scale == 2.0 / 255
    scale, zp = activation_qparams(-1.0, 1.0)
    assert abs(-1.0 + scale * zp) < scale  # zero maps to an integer level
    assert analyse(onnx.ModelProto(), {}, [], ["CPUExecutionProvider"], 1, ["MatMul"], 0).layers == {}
