"""int8_static option residual_16bit (issue #18): the residual stream of transformer blocks in 16 bits, Softmax in
float; and the opset bump that spares ONNX's version converter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.pages import present
from tests import builders
from tests.builders import save_npz
from tests.reports import assert_report_complete
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError
from worker.engine.normalize import normalize
from worker.engine.ort_quant import bump_to_opset21
from worker.engine.pipeline import run
from worker.engine.report import Report
from worker.engine.residual16 import residual_stream

FLOAT32_MIN = -3.4028234663852886e38


def _tokens(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 1000, (n, 16)).astype(np.int64)
    mask = np.ones((n, 16), np.int64)
    for i in range(n):
        mask[i, rng.integers(8, 16):] = 0
    return save_npz(path, input_ids=ids, attention_mask=mask)


def _quantize(tmp: Path, model: Path, tag: str, **options: object) -> dict:
    cfg = QuantizeConfig(model_path=model, output_path=tmp / f"{tag}.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"smoothquant": "off", **options}),
                         calibration_path=_tokens(tmp / "c.npz", 64, 1), eval_path=_tokens(tmp / "e.npz", 32, 2),
                         threads=1, device="cpu", work_dir=tmp / f"work-{tag}")
    return run(cfg).report


def test_the_residual_stream_of_each_block_is_found(tmp_path: Path) -> None:
    model = builders.tiny_transformer(tmp_path / "m.onnx", layers=2)
    prepared = onnx.load(str(normalize(model, tmp_path / "prep", per_channel=True).path))
    found = residual_stream(prepared)
    # Two blocks: two LayerNorms and two residual Adds each, one Softmax each.
    assert (found.layernorms, found.residual_adds, len(found.softmax_nodes)) == (4, 4, 2)
    softmax = {n.name: n for n in prepared.graph.node if n.op_type == "Softmax"}
    assert set(found.softmax_nodes) == set(softmax)
    assert not {n.input[0] for n in softmax.values()} & set(found.tensors)  # the scores + mask stay out
    norms = {n.input[0] for n in prepared.graph.node if n.op_type == "LayerNormalization"}
    # The LayerNorm inputs and residual Add outputs (5 distinct: the embeddings + positions, then each residual
    # Add's), the 4 projection bias Adds' outputs and the 4 MatMul outputs they read, the embedding Gather's
    # output (what the embeddings + positions Add reads besides its constant), 2 Softmax outputs: 16.
    assert norms <= set(found.tensors) and len(found.tensors) == 16
    conv = builders.conv_net(tmp_path / "conv.onnx")
    assert residual_stream(onnx.load(str(conv))).tensors == []


def test_int8_static_widens_the_residual_stream_where_it_helps(tmp_path: Path) -> None:
    """Two channels of the residual stream 30x the rest and a float32-minimum attention mask: plain int8 loses
    the small channels; the default (auto) widens the stream and keeps the Softmax in float."""
    model = builders.tiny_transformer(tmp_path / "m.onnx", layers=2, mask_value=FLOAT32_MIN, outliers=30.0)
    off = _quantize(tmp_path, model, "off", residual_16bit="off")
    auto = _quantize(tmp_path, model, "auto")
    assert_report_complete(auto, "int8_static")
    db = {k: r["accuracy"]["outputs"][0]["sqnr_db"] for k, r in (("off", off), ("auto", auto))}
    # Measured (onnxruntime 1.32, 1 thread): 21.49 dB plain, 31.29 dB with the residual stream in 16 bits.
    assert db["off"] < 23.0 and db["auto"] > 29.0, db
    section = auto["residual_16bit"]
    assert section["enabled"] and section["tensors_16bit"] == 15 and section["softmax_in_float"] == 2, section
    assert section["compare"]["sqnr_db_with"] > section["compare"]["sqnr_db_without"]
    assert off["residual_16bit"] == {"mode": "off", "enabled": False, "reason": "option residual_16bit is off"}
    assert any(la.get("activation_bits") == 16 for la in auto["layers"])
    assert auto["calibration"]["activations_16bit"] == 15
    # The weights stay int8: the artifact is within a few percent of the plain one's size.
    assert abs(auto["size"]["quantized_bytes"] / off["size"]["quantized_bytes"] - 1) < 0.05
    line = present.residual_16bit_line(Report.from_stored(auto).residual_16bit)
    assert line.startswith("On (auto): auto: output SQNR") and "15 activation(s) in 16 bits" in line, line



def test_the_16bit_candidate_reuses_the_int8_models_weight_parameters(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The 16-bit-residual candidate quantizes the same float model again: its weights take the scales and zero
    points the int8 model has (ort_quant.weight_params) instead of ONNX Runtime computing them channel by channel
    again, and the candidate is byte for byte what computing them gives."""
    import onnxruntime.quantization.qdq_quantizer as qdq

    import worker.engine.ort_quant as ort_quant

    model = builders.tiny_transformer(tmp_path / "m.onnx", layers=2, mask_value=FLOAT32_MIN, outliers=30.0)
    real, computed = ort_quant.quantize_static, qdq.compute_data_quant_params
    calls: list[str] = []
    seen: dict[str, Any] = {}

    def counting(*args, **kwargs):
        calls.append("param")
        return computed(*args, **kwargs)

    def spy(src, dest, ranges, opts, *args, **kwargs):
        if not opts.activations_16bit:
            return real(src, dest, ranges, opts, *args, **kwargs)
        calls.clear()
        forced = real(src, dest, ranges, opts, *args, **kwargs)
        seen["with"], seen["weights"] = len(calls), kwargs.get("weights")
        calls.clear()
        again = Path(dest).with_name("again.onnx")
        real(src, again, ranges, opts, *args, **{**kwargs, "weights": None})
        seen["without"] = len(calls)
        seen["same"] = Path(dest).read_bytes() == again.read_bytes()
        return forced

    monkeypatch.setattr(qdq, "compute_data_quant_params", counting)
    monkeypatch.setattr(ort_quant, "quantize_static", spy)
    auto = _quantize(tmp_path, model, "auto")
    assert auto["residual_16bit"]["enabled"]
    weights = seen["weights"]
    assert isinstance(weights, dict) and len(weights) >= 8  # the MatMul weights of both blocks
    # Measured: 2,168 parameter computations without the reuse, 16 with it (constants that are no weight of a
    # Conv/Gemm/MatMul, computed as before); the same bytes.
    assert seen["without"] > 1000 and seen["with"] <= 32, seen
    assert seen["same"]


def test_a_16bit_model_that_cannot_be_made_leaves_auto_with_the_int8_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """auto tries the residual stream in 16 bits where it may help; a try that fails (here: the quantizer refuses)
    keeps the int8 model and says why, where option "on" fails the job with the cause."""
    import worker.engine.ort_quant as ort_quant

    model = builders.tiny_transformer(tmp_path / "m.onnx", layers=2, mask_value=FLOAT32_MIN, outliers=30.0)
    real = ort_quant.quantize_static

    def refuse_16bit(src, dest, ranges, opts, *args, **kwargs):
        if opts.activations_16bit:
            raise EngineError("model_not_runnable", "ONNX Runtime cannot load the int8 model with 16-bit residuals")
        return real(src, dest, ranges, opts, *args, **kwargs)

    monkeypatch.setattr(ort_quant, "quantize_static", refuse_16bit)
    auto = _quantize(tmp_path, model, "auto")
    section = auto["residual_16bit"]
    assert not section["enabled"] and "could not be made or run (model_not_runnable" in section["reason"]
    assert auto["calibration"].get("activations_16bit") is None
    with pytest.raises(EngineError) as e:
        _quantize(tmp_path, model, "on", residual_16bit="on")
    assert e.value.code == "model_not_runnable"

def test_auto_leaves_alone_a_transformer_int8_keeps(tmp_path: Path) -> None:
    model = builders.tiny_transformer(tmp_path / "m.onnx", layers=1)
    rep = _quantize(tmp_path, model, "auto")
    section = rep["residual_16bit"]
    # Measured: 27.32 dB on the compare samples.
    assert not section["enabled"] and "not tried" in section["reason"], section
    assert section["compare"]["sqnr_db_without"] >= 25.0 and section["compare"]["sqnr_db_with"] is None
    assert "activations_16bit" not in rep["calibration"]
    conv = _conv_report(tmp_path)
    assert conv["residual_16bit"]["reason"].startswith("no transformer block")


def _conv_report(tmp_path: Path) -> dict:
    model = builders.conv_net(tmp_path / "conv.onnx")
    cfg = QuantizeConfig(model_path=model, output_path=tmp_path / "conv.int8.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {}),
                         calibration_path=builders.image_data(tmp_path / "img.npz", n=16), threads=1, device="cpu",
                         work_dir=tmp_path / "work-conv")
    return run(cfg).report


def _reduce_model(opset: int, op: str = "ReduceMean") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if op == "GroupNormalization":
        inits = [numpy_helper.from_array(np.ones(2, np.float32), "s"),
                 numpy_helper.from_array(np.zeros(2, np.float32), "b")]
        node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
    else:
        inits = [numpy_helper.from_array(np.array([2], np.int64), "axes")]
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", opset)])


def test_opset_18_to_20_is_declared_21_and_runs_the_same(tmp_path: Path) -> None:
    model = _reduce_model(18)
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert bump_to_opset21(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)] and model.ir_version >= 10
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(before[0], after[0])
    # Below 18 (Reduce axes were an attribute) and with an operator whose meaning changed, the converter is used.
    assert not bump_to_opset21(_reduce_model(17))
    assert not bump_to_opset21(_reduce_model(18, "GroupNormalization"))
    assert not bump_to_opset21(_reduce_model(21))
    # DFT's axis is an attribute up to opset 19 and an input from 20: declared 21, the model no longer loads.
    sig = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 16, 1])
    dft = helper.make_model(helper.make_graph(
        [helper.make_node("DFT", ["s"], ["f"], axis=1, onesided=1)], "fft", [sig],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 18)])
    ort.InferenceSession(dft.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not bump_to_opset21(dft)


def test_onnx_runtime_quantizer_notices_stay_off_the_terminal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ONNX Runtime's quantizer logs notices on the root logger (a LayerNorm scale it quantizes per tensor, its own
    opset update), which `lowbit quantize` printed as bare WARNING:root lines: they go to lowbit's log at debug."""
    model = builders.tiny_transformer(tmp_path / "m.onnx", layers=1)
    with caplog.at_level(logging.DEBUG, logger="worker.engine.ort_quant"):
        _quantize(tmp_path, model, "on", residual_16bit="on", latency_runs=2)
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "root"]
    assert not loud, loud
    quiet = [r.getMessage() for r in caplog.records if r.name == "worker.engine.ort_quant"]
    assert any("out-of-range for weight 'layers.0.ln1.weight'" in m for m in quiet), quiet
