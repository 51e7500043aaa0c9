"""Learned rounding (int8_static option adaround, issue #18): known answers on models built to show its effect."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from app.pages import present
from tests.builders import save_npz
from tests.reports import assert_report_complete
from tests.worker.engine.test_equalize import biased_rounding_conv
from worker.engine import adaround, runtime
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.pipeline import run
from worker.engine.report import Report

# The weights' integer range the jobs here use: reduce_range, left unset, follows the CPU (7-bit weights where
# ONNX Runtime's int8 kernels overflow 8-bit ones); the planted rounding errors are built on that grid.
QMAX = 64 if runtime.int8_overflows_here() else 127


def _run(model: object, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum()))


def _quantize(tmp, model, calib, tag: str, **options: object) -> dict:
    cfg = QuantizeConfig(model_path=model, output_path=tmp / f"{tag}.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"equalize": "off", "bias_correction": "off",
                                                               "smoothquant": "off", **options}),
                         calibration_path=calib, threads=1, device="cpu", work_dir=tmp / f"work-{tag}")
    return run(cfg).report


def biased_rounding_matmul(path, seed: int = 0, k: int = 16, n: int = 8, qmax: int = QMAX):
    """[N, k] -> MatMul [k, n] -> [N, n]: every weight 0.45 of an int8 step above a level (each column's
    largest at exactly ``qmax`` steps), so nearest rounding moves every weight of a column down together."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(-(qmax - 7), qmax - 7, (k, n)).astype(np.float64) + 0.45
    steps[0, :] = float(qmax)
    w = steps * rng.uniform(0.002, 0.01, (1, n))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return path


def test_learned_rounding_lowers_a_convs_output_error_on_held_out_inputs(tmp_path) -> None:
    model = biased_rounding_conv(tmp_path / "m.onnx", qmax=QMAX)
    calib = save_npz(tmp_path / "c.npz", x=np.random.default_rng(1).uniform(2, 4, (64, 8, 6, 6)).astype(np.float32))
    x = np.random.default_rng(2).uniform(2, 4, (32, 8, 6, 6)).astype(np.float32)
    ref = _run(model, x)
    plain = _quantize(tmp_path, model, calib, "plain")
    learned = _quantize(tmp_path, model, calib, "learned", adaround="on", adaround_seconds=20)
    assert "adaround" not in plain  # off by default: no section
    assert_report_complete(learned, "int8_static")
    db = {k: _sqnr(ref, _run(tmp_path / f"{k}.onnx", x)) for k in ("plain", "learned")}
    # Measured (onnxruntime 1.32, torch 2.13, 1 thread): 23.31 dB with nearest rounding, 43.06 dB learned (8-bit
    # weights, a CPU with VNNI); 16.88 dB and 38.65 dB (7-bit, an AVX2-only AMD EPYC).
    assert db["plain"] < 25.0 and db["learned"] > 38.0, db
    section = learned["adaround"]
    assert section["enabled"] and section["layers_kept"] == 1 and section["weights"] == 288
    assert 0 < section["weights_rounded_other_way"] < 288  # some rounded up, not all
    layer = section["layers"][0]
    assert layer["output_mse_learned"] < 0.05 * layer["output_mse_nearest"], layer
    # Only the int8 weight values changed: same nodes, same scales.
    a, b = onnx.load(str(tmp_path / "plain.onnx")), onnx.load(str(tmp_path / "learned.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    changed = [t.name for t, u in zip(a.graph.initializer, b.graph.initializer, strict=True)
               if t.raw_data != u.raw_data]
    assert len(changed) == 1 and numpy_helper.to_array(
        next(t for t in b.graph.initializer if t.name == changed[0])).dtype == np.int8
    line = present.adaround_line(Report.from_stored(learned).adaround)
    assert line.startswith("On (on): option adaround is on. 1 of 1 layer(s) kept a learned rounding"), line


def test_learned_rounding_of_a_matmul_and_auto_keeps_it_only_where_it_helps(tmp_path) -> None:
    model = biased_rounding_matmul(tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    calib = save_npz(tmp_path / "c.npz", x=rng.uniform(1, 3, (256, 16)).astype(np.float32))
    x = np.random.default_rng(4).uniform(1, 3, (128, 16)).astype(np.float32)
    ref = _run(model, x)
    plain = _quantize(tmp_path, model, calib, "plain")
    auto = _quantize(tmp_path, model, calib, "auto", adaround="auto", adaround_seconds=20)
    db = {k: _sqnr(ref, _run(tmp_path / f"{k}.onnx", x)) for k in ("plain", "auto")}
    # Measured (onnxruntime 1.32, torch 2.13, 1 thread): 33.50 dB nearest, 44.34 dB learned (8-bit weights, a
    # CPU with VNNI); 27.36 dB and 42.80 dB (7-bit, an AVX2-only AMD EPYC).
    assert db["auto"] > db["plain"] + 10.0, db
    section = auto["adaround"]
    assert section["enabled"] and section["compare"]["sqnr_db_with"] > section["compare"]["sqnr_db_without"]
    assert plain.get("adaround") is None


def test_weights_already_on_their_levels_keep_nearest_rounding(tmp_path) -> None:
    """Nothing to learn: every weight sits on an int8 level, nearest rounding is exact, and the layer keeps it."""
    rng = np.random.default_rng(5)
    steps = rng.integers(-QMAX, QMAX + 1, (16, 8)).astype(np.float64)
    steps[0, :] = float(QMAX)
    w = (steps * 0.01).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "exact",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(w, "w")])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(model))
    calib = save_npz(tmp_path / "c.npz", x=rng.uniform(-1, 1, (64, 16)).astype(np.float32))
    rep = _quantize(tmp_path, model, calib, "exact", adaround="auto", adaround_seconds=5)
    section = rep["adaround"]
    assert not section["enabled"] and section["layers_kept"] == 0 and section["weights_rounded_other_way"] == 0


def test_the_time_budget_is_shared_and_every_layer_gets_its_minimum_steps(tmp_path) -> None:
    """Four layers, a 2 s budget: the optimisation stops near it, each layer after at least MIN_STEPS steps."""
    rng = np.random.default_rng(6)
    nodes, inits = [], []
    prev = "x"
    for k in range(4):
        w = (rng.normal(0, 0.1, (64, 64))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{k}"], [f"m{k}"], name=f"mm{k}"))
        nodes.append(helper.make_node("Relu", [f"m{k}"], [f"r{k}"], name=f"relu{k}"))
        prev = f"r{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 64])], inits)
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(model))
    calib = save_npz(tmp_path / "c.npz", x=rng.normal(0, 1, (128, 64)).astype(np.float32))
    rep = _quantize(tmp_path, model, calib, "budget", adaround="on", adaround_seconds=2)
    section = rep["adaround"]
    assert section["layers_learned"] == 4
    assert all(la["steps"] >= adaround.MIN_STEPS for la in section["layers"]), section["layers"]
    # The optimisation keeps to its budget (each layer checks its share every 10 steps after the first 50); the
    # passes that fetch the inputs and the PyTorch child's start come on top of it.
    assert sum(la["seconds"] for la in section["layers"]) < 2.0 * 1.5, section["layers"]
