"""int8_static option activations_16bit (issue #18, A16W8): the named activations get 16-bit QDQ.

Known answer: a small MLP whose hidden activation gets a constant +1000 on one channel (an Add with a large offset,
as a residual stream with an outlier channel). One uint8 range over [min, ~1000] has a step of about 4, which
wipes out the other channels (tanh outputs, within +-1); the next MatMul ignores the large channel, so the output is
almost all rounding noise in uint8. In 16 bits the step is about 0.016 and the output comes back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError
from worker.engine.ort_quant import a16_tensors
from worker.engine.pipeline import QuantizeResult, run

WIDTH = 8


def _offset_mlp(path: Path) -> Path:
    """x[N, 8] -> MatMul w1 -> Tanh -> Add (+1000 on channel 0: node 'offset', tensor 'shifted') -> MatMul w2
    -> y[N, 4]; w2's row 0 is zero, so y depends only on the small channels. (The Tanh keeps the Add from being
    fused into the first MatMul as a Gemm bias when the model is prepared.)"""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = rng.standard_normal((WIDTH, 4)).astype(np.float32)
    w2[0] = 0.0
    offset = np.zeros(WIDTH, dtype=np.float32)
    offset[0] = 1000.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Tanh", ["h"], ["t"], name="act"),
         helper.make_node("Add", ["t", "off"], ["shifted"], name="offset"),
         helper.make_node("MatMul", ["shifted", "w2"], ["y"], name="fc2")],
        "offset_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(offset, "off")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run(tmp: Path, **options: object) -> tuple[QuantizeResult, Path]:
    model = _offset_mlp(tmp / "offset.onnx")
    data = tmp / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((64, WIDTH)).astype(np.float32))
    tag = "a16" if options else "a8"
    out = tmp / f"offset.{tag}.onnx"
    cfg = QuantizeConfig(model_path=model, output_path=out, recipe="int8_static",
                         options=parse_options("int8_static", {"smoothquant": "off", **options}),
                         calibration_path=data, threads=1, device="cpu")
    return run(cfg), out


def _cosine(report: dict) -> float:
    return float(report["accuracy"]["outputs"][0]["cosine"])


def _layer(report: dict, name: str) -> dict:
    return next(layer for layer in report["layers"] if layer["name"] == name)


def test_16bit_activations_recover_what_uint8_loses(tmp_path: Path) -> None:
    plain, _ = _run(tmp_path)
    # Measured (onnxruntime 1.32, 1 thread): cosine 0.0 in uint8 (fc2's SQNR 0.0 dB: its input is all rounding).
    assert _cosine(plain.report) < 0.5
    assert _layer(plain.report, "offset")["activation_bits"] == 8

    wide, path = _run(tmp_path, activations_16bit=["shifted"])
    # Measured: cosine 0.999901 with 'shifted' in 16 bits (fc2's SQNR 35.8 dB).
    assert _cosine(wide.report) > 0.999
    offset = _layer(wide.report, "offset")
    assert offset["activation_bits"] == 16 and offset["precision"] == "int8"
    fc2 = _layer(wide.report, "fc2")
    assert fc2["activation_bits"] == 8 and fc2["weight_bits"] == 8
    assert wide.report["calibration"]["activations_16bit"] == 1

    # The artifact loads and runs in ONNX Runtime on the CPU, with 16-bit Q/DQ (opset 21).
    model = onnx.load(str(path))
    zero_points = {t.data_type for t in model.graph.initializer if t.name.endswith("zero_point")}
    assert TensorProto.UINT16 in zero_points
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((2, WIDTH), dtype=np.float32)})
    assert y.shape == (2, 4) and np.isfinite(y).all()


def test_a_node_name_selects_its_outputs(tmp_path: Path) -> None:
    by_node, _ = _run(tmp_path, activations_16bit=["offset"])
    assert _layer(by_node.report, "offset")["activation_bits"] == 16


def test_unknown_names_are_refused_with_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as err:
        _run(tmp_path, activations_16bit=["shifted", "nope"])
    assert err.value.code == "invalid_option"
    assert "'nope'" in str(err.value) and "offset" in str(err.value)


def test_names_a_rewritten_model_lacks_are_skipped_there(tmp_path: Path) -> None:
    """quantize_static reads the names leniently: the recipe checked them on the prepared model, and a rewritten
    copy of it (equalization folds BatchNormalization nodes) may have lost some."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(_offset_mlp(tmp_path / "m.onnx"))))
    assert a16_tensors(model, ["offset", "gone"], strict=False) == ["shifted"]
    with pytest.raises(EngineError):
        a16_tensors(model, ["offset", "gone"])


def test_the_option_is_a_list_of_strings() -> None:
    assert parse_options("int8_static", {"activations_16bit": ["a"]}).activations_16bit == ("a",)
    with pytest.raises(EngineError):
        parse_options("int8_static", {"activations_16bit": "a"})
    with pytest.raises(EngineError):
        parse_options("int8_dynamic", {"activations_16bit": ["a"]})
