"""int8_static option four_bit_weights (worker/engine/four_bit_weights.py): the int8 model's weights stored in 4
bits, run by the same int8 kernels; and auto's 4-bit weight branch."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.pages import present
from tests import builders
from worker.engine import auto, pipeline
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError
from worker.engine.four_bit_weights import (
    four_bit_int,
    layer_inputs,
    narrow_weights,
    output_shift,
    pack_int4,
    prepare,
    relative_error,
)
from worker.engine.labels import candidate_name
from worker.engine.report import Report


def _static(tmp: Path, model: Path, data: Path, name: str, **options: Any) -> pipeline.QuantizeResult:
    cfg = QuantizeConfig(model_path=model, output_path=tmp / f"{name}.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"latency_runs": 2, **options}),
                         calibration_path=data, threads=1, device="cpu", work_dir=tmp / f"work-{name}")
    return pipeline.run(cfg)


def _outputs(path: Path, feed: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feed)[0], dtype=np.float64)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    """``graph`` saved as a model at ``path`` (IR version 8, the default domain at ``opset``)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def test_four_bit_levels_clip_each_channel_where_that_leaves_less_error() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    w[0, 0] = 40.0  # channel 0: one weight far out, which clipping trades for finer levels for the other 63
    q, scale = four_bit_int(w, axis=0)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and scale.shape == (4,)
    # Without clipping (the largest magnitude on level 7) the error is larger on every channel.
    plain = np.abs(w).max(axis=1) / 7.0
    q_plain = np.clip(np.rint(w / plain[:, None]), -8, 7)
    for c in range(4):
        err = ((w[c] - q[c] * scale[c]) ** 2).sum()
        err_plain = ((w[c] - q_plain[c] * plain[c]) ** 2).sum()
        assert err <= err_plain + 1e-9
    # Gaussian weights in 4 bits per channel: about 1 % relative squared error (measured 0.0095 here).
    assert 0.005 < relative_error(w[1:], q[1:], scale[1:], axis=0) < 0.02
    # The axis is the output channels' wherever it is (a MatMul weight [K, N]: axis 1).
    q_t, scale_t = four_bit_int(w.T, axis=1)
    assert np.array_equal(q_t, q.T) and np.allclose(scale_t, scale)


def test_4_bit_values_are_packed_two_a_byte_as_onnx_reads_them() -> None:
    q = np.random.default_rng(9).integers(-8, 8, (7, 5, 3)).astype(np.int8)  # an odd count: the last byte is half
    t = helper.make_tensor("w", TensorProto.INT4, q.shape, pack_int4(q), raw=True)
    assert len(t.raw_data) == (q.size + 1) // 2 and not t.int32_data
    assert np.array_equal(numpy_helper.to_array(t).astype(np.int8), q)


def test_conv_net_weights_in_4_bits_run_as_the_int8_kernels_at_about_half_the_weight_bytes(
        tmp_path: Path, zoo: dict[str, Path]) -> None:
    int8 = _static(tmp_path, zoo["conv"], zoo["conv_data"], "int8", method="minmax")
    four = _static(tmp_path, zoo["conv"], zoo["conv_data"], "w4", method="minmax", four_bit_weights=True)
    model = onnx.load(str(four.artifact_path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    int4 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    layers = {layer["name"]: layer for layer in four.report["layers"]}
    weighted = [n for n, layer in layers.items() if layer.get("weight_bits") is not None]
    # Three convs and the Linear (Gemm): every int8 weight is now 4-bit, read through a Cast to int8.
    assert len(int4) == len(casts) == len(weighted) == 4
    assert all(layers[n]["weight_bits"] == 4 for n in weighted)
    section = four.report["four_bit_weights"]
    assert section["layers_4bit"] == 4 and section["layers_8bit"] == []
    assert section["weight_bytes_after"] * 2 == pytest.approx(section["weight_bytes_int8"], abs=4)
    assert four.artifact_bytes < int8.artifact_bytes
    # ONNX Runtime folds the Casts at load and fuses each layer into its int8 kernel, as in the int8 model.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(four.artifact_path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Cast" not in ops and ops.count("QLinearConv") == 3
    # The fused kernels read the int32 biases at input scale x the new weight scale: they were requantized, so
    # the fused model computes what the unfused QDQ graph says (a bias left at the int8 weight scale would not).
    feed = {"image": np.load(zoo["conv_eval"])["image"][:8]}
    fused, unfused = _outputs(four.artifact_path, feed), _outputs(four.artifact_path, feed, optimize=False)
    assert np.abs(fused - unfused).max() <= 0.05 * np.abs(unfused).max()
    # And it stays near the float model (measured: cosine 0.9990 against the int8 model's 0.9999).
    ref = _outputs(zoo["conv"], feed, optimize=False)
    assert _cos(ref, fused) > 0.995


def _two_branch(path: Path) -> Path:
    """y = x @ loud + x @ lossy: ``loud``'s Gaussian weights (small 4-bit error) make an output 100x larger than
    ``lossy``'s, whose weights have a spike in every column (large 4-bit error). The output's noise is loud's."""
    rng = np.random.default_rng(0)
    loud = rng.standard_normal((64, 64)) * 10.0
    lossy = rng.standard_normal((64, 64)) / 10.0
    lossy[::16, :] *= 20.0
    inits = [numpy_helper.from_array(loud.astype(np.float32), "loud.weight"),
             numpy_helper.from_array(lossy.astype(np.float32), "lossy.weight")]
    nodes = [helper.make_node("MatMul", ["x", "loud.weight"], ["a"], name="loud"),
             helper.make_node("MatMul", ["x", "lossy.weight"], ["b"], name="lossy"),
             helper.make_node("Add", ["a", "b"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "two_branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], inits)
    return _save(graph, path)


def test_the_layer_kept_in_8_bits_is_the_one_whose_4_bits_cost_the_output_most(tmp_path: Path) -> None:
    model = _two_branch(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    data = builders.save_npz(tmp_path / "c.npz", x=rng.standard_normal((48, 64)).astype(np.float32))
    res = _static(tmp_path, model, data, "keep1", method="minmax", four_bit_weights=True, int8_most_sensitive=1)
    section = res.report["four_bit_weights"]
    errors = section["relative_error"]
    # ONNX Runtime's pre-processing fuses lossy's MatMul with the Add into a Gemm, under a name of its own.
    lossy = next(name for name in errors if name.startswith("lossy"))
    # By their own weights, lossy loses most in 4 bits (measured 0.0289 against 0.0090) ...
    assert errors[lossy] > 2.5 * errors["loud"]
    # ... but measured at the output, loud alone in 4 bits costs more (measured 20.2 dB against 36.7): it is the
    # one kept in 8 bits.
    ranking = section["ranking"]
    assert [r["name"] for r in ranking] == ["loud", lossy]
    assert ranking[0]["output_sqnr_db"] < ranking[1]["output_sqnr_db"] - 10
    assert section["layers_8bit"] == ["loud"] and section["layers_4bit"] == 1 and section["samples"] == 32
    bits = {layer["name"]: layer.get("weight_bits") for layer in res.report["layers"]}
    assert bits["loud"] == 8 and bits[lossy] == 4
    # The job page's line says the same.
    line = present.four_bit_weights_line(Report.from_stored(res.report).four_bit_weights)
    assert line.startswith("1 layer(s) with 4-bit weights") and "1 kept in 8 bits" in line and ": loud" in line, line
    assert "8,192 -> 6,144 weight bytes" in line and "converted from opset 17 to 21" in line, line


def test_int8_most_sensitive_needs_four_bit_weights_on_int8_static() -> None:
    with pytest.raises(EngineError) as err:
        parse_options("int8_static", {"int8_most_sensitive": 2})
    assert err.value.code == "invalid_option" and "four_bit_weights: true" in err.value.message
    opts = parse_options("int8_static", {"four_bit_weights": True, "int8_most_sensitive": 2})
    assert opts.to_dict("int8_static")["int8_most_sensitive"] == 2


def _done(cand: auto.Candidate, size: int, metric: float, met: bool, **report: Any) -> auto.CandidateResult:
    return auto.CandidateResult(cand, "done", size_bytes=size, metric=metric, met_target=met, report=report or None)


def _w4(base: auto.CandidateResult, n: int, size: int, metric: float, met: bool,
        layers_4bit: int = 10) -> auto.CandidateResult:
    opts: dict[str, Any] = {**base.candidate.options, "four_bit_weights": True}
    if n:
        opts["int8_most_sensitive"] = n
    return _done(dataclasses.replace(base.candidate, options=opts), size, metric, met,
                 four_bit_weights={"layers_4bit": layers_4bit})


def _w4_steps(results: list[auto.CandidateResult], max_steps: int = 8, float_only: bool = False) -> list[int]:
    return [c.eight_bit_layers for c in auto.next_candidates(results, max_steps=max_steps, float_only=float_only)
            if c.options.get("four_bit_weights")]


def test_auto_stores_the_weights_of_the_static_candidate_that_met_the_target_in_4_bits() -> None:
    minmax = _done(auto.Candidate("int8_static", {"method": "minmax"}), 1000, 0.9980, True)
    percentile = _done(auto.Candidate("int8_static", {"method": "percentile"}), 1000, 0.9986, True)
    # The analysis candidate's ranking: what float steps would keep in float.
    entropy = _done(auto.Candidate("int8_static", {"method": "entropy"}), 1000, 0.96, False,
                    sensitivity={"ranking": ["mm1"]}, layers=[{"name": "mm1", "op_type": "MatMul"}])
    fp16 = _done(auto.Candidate("fp16", {}), 2000, 1.0, True)
    first = [c for c in auto.next_candidates([entropy, minmax, percentile, fp16], max_steps=8)
             if c.options.get("four_bit_weights")]
    # Of the static candidates as small as each other, the one with the most to spare; all layers in 4 bits.
    assert [(c.options["method"], c.eight_bit_layers) for c in first] == [("percentile", 0)]
    assert parse_options("int8_static", first[0].config()["options"]).four_bit_weights
    assert candidate_name(first[0].recipe, first[0].options) == "int8_static + 4-bit weights (percentile)"
    # int8_dynamic has a branch of its own, from its own smallest model that met the target ...
    dynamic = _done(auto.Candidate("int8_dynamic", {}), 900, 0.995, True)
    both = [(c.recipe, c.options) for c in auto.next_candidates([entropy, minmax, percentile, dynamic, fp16], 8)
            if c.options.get("four_bit_weights")]
    assert both == [("int8_static", {"method": "percentile", "four_bit_weights": True}),
                    ("int8_dynamic", {"four_bit_weights": True})]
    # A dynamic model whose int8 layers are all convs (ConvInteger, whose weights the option leaves) gets none.
    convs = dataclasses.replace(dynamic, report={"layers": [{"name": "c", "op_type": "Conv", "precision": "int8"}]})
    assert [c.recipe for c in auto.next_candidates([entropy, minmax, percentile, convs, fp16], 8)
            if c.options.get("four_bit_weights")] == ["int8_static"]
    # A 4-bit weight step that missed is no float branch's base: the dynamic model met the target, so its float
    # branch has no step, and its 4-bit one goes on with a layer in 8 bits (whatever the order of the results).
    missed = _w4(dynamic, 0, 600, 0.97, False)
    after = auto.next_candidates([entropy, minmax, percentile, missed, dynamic, fp16], 8)
    assert not [c for c in after if c.recipe == "int8_dynamic" and c.excluded_nodes]
    assert [(c.recipe, c.eight_bit_layers) for c in after if c.recipe == "int8_dynamic"] == [("int8_dynamic", 1)]
    # ... except where it is slower than fp32 and a static model is not (its 4-bit weights run on its kernels),
    # unless the job chooses by size alone.
    slow = dataclasses.replace(dynamic, latency_ms_p50=5.0, fp32_latency_ms_p50=1.0)
    assert [c.recipe for c in auto.next_candidates([entropy, minmax, percentile, slow, fp16], 8)
            if c.options.get("four_bit_weights")] == ["int8_static"]
    assert [c.recipe for c in auto.next_candidates([entropy, minmax, percentile, slow, fp16], 8, prefer="size")
            if c.options.get("four_bit_weights")] == ["int8_static", "int8_dynamic"]
    # Float fallback alone has no such step, nor has a search where no int8 candidate met the target.
    assert _w4_steps([entropy, minmax, percentile, fp16], float_only=True) == []
    assert _w4_steps([entropy, fp16]) == []
    # Missing: 1, 2, 4 layers in 8 bits (the most costly, ranked by int8_static), then halving the gap back.
    chain = [percentile, fp16, _w4(percentile, 0, 500, 0.77, False)]
    for n, size, metric in ((1, 510, 0.96), (2, 520, 0.97), (4, 540, 0.98)):
        assert _w4_steps(chain) == [n]
        chain.append(_w4(percentile, n, size, metric, False))
    assert _w4_steps(chain) == [8]
    chain.append(_w4(percentile, 8, 580, 0.993, True))
    assert _w4_steps(chain) == [6]
    named = candidate_name(chain[-1].candidate.recipe, chain[-1].candidate.options)
    assert named == "int8_static + 4-bit weights (percentile) + 8 layers in 8 bits"
    # A step no larger than the one before goes on (a first conv's 4-bit weight saves fewer bytes than its
    # tensors' names add); a step with no layer left in 4 bits ends the branch, as does max_steps.
    assert _w4_steps([percentile, fp16, _w4(percentile, 0, 500, 0.77, False),
                      _w4(percentile, 1, 499, 0.96, False)]) == [2]
    assert _w4_steps([percentile, fp16, _w4(percentile, 0, 500, 0.77, False),
                      _w4(percentile, 1, 520, 0.96, False, layers_4bit=0)]) == []
    assert _w4_steps(chain, max_steps=4) == []
    # All in 4 bits met the target: nothing more to try.
    assert _w4_steps([percentile, fp16, _w4(percentile, 0, 500, 0.995, True)]) == []


def test_output_shift_is_what_the_weight_change_adds_to_a_grouped_conv_on_its_mean_input() -> None:
    rng = np.random.default_rng(2)
    delta = rng.standard_normal((4, 2, 3, 3))  # 4 outputs, 2 groups of 2 input channels
    mean = rng.standard_normal(4)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2)
    shift = output_shift(conv, delta, mean)
    # Brute force: the conv of delta over an image holding each channel's mean (no padding) is the shift.
    image = np.broadcast_to(mean[:, None, None], (4, 5, 5))
    for o in range(4):
        g = o // 2
        patch = image[2 * g:2 * g + 2, :3, :3]
        assert shift is not None and shift[o] == pytest.approx(float((delta[o] * patch).sum()))
    # Gemm with transB: [N, K] weights; a layer without a bias has nothing to correct.
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    d2 = rng.standard_normal((3, 5))
    m2 = rng.standard_normal(5)
    got = output_shift(gemm, d2, m2)
    assert got is not None and np.allclose(got, d2 @ m2)
    assert output_shift(helper.make_node("Conv", ["x", "w"], ["y"]), delta, mean) is None


def _offset_conv(path: Path) -> Path:
    """One Conv (3 -> 16 channels, 3x3, no padding, with a bias) and nothing else: what 4-bit weights shift its
    output by on average is their change times the input's mean, which the bias can take back exactly."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")
    graph = helper.make_graph([conv], "offset_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 6, 6])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return _save(graph, path)


def test_bias_correction_takes_the_4_bit_weights_mean_shift_out_of_the_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    # Inputs far from zero on average (each channel its own mean), as after a ReLU.
    x = (np.array([4.0, -2.0, 6.0])[None, :, None, None] + rng.standard_normal((64, 3, 8, 8))).astype(np.float32)
    data = builders.save_npz(tmp_path / "c.npz", x=x)
    model_path = _offset_conv(tmp_path / "m.onnx")
    int8 = _static(tmp_path, model_path, data, "int8", method="minmax")
    corrected = _static(tmp_path, model_path, data, "w4", method="minmax", four_bit_weights=True)
    assert corrected.report["four_bit_weights"]["bias_corrected"] == 1
    # Its input means come from the calibration samples (64 less the fifth held out to validate).
    assert corrected.report["four_bit_weights"]["mean_samples"] == corrected.report["calibration"]["samples"] == 51
    model = onnx.load(str(int8.artifact_path))
    assert list(layer_inputs(model).values()) == ["x"]
    planned, _ = prepare(model)  # no means: no correction
    narrow_weights(model, planned, set())
    onnx.save_model(model, str(tmp_path / "uncorrected.onnx"))
    feed = {"x": x[:32]}
    ref = _outputs(int8.artifact_path, feed)

    def shift(path: Path) -> float:
        """The mean output error per channel against the int8 model's, averaged over the channels."""
        return float(np.abs((_outputs(path, feed) - ref).mean(axis=(0, 2, 3))).mean())

    # Measured: 1.221 uncorrected, 0.0063 corrected (what is left: the activations' own rounding, and the means
    # differing between the calibration and these samples).
    assert shift(corrected.artifact_path) < 0.02 * shift(tmp_path / "uncorrected.onnx")


def _dynamic(tmp: Path, model: Path, data: Path | None, name: str, **options: Any) -> pipeline.QuantizeResult:
    cfg = QuantizeConfig(model_path=model, output_path=tmp / f"{name}.onnx", recipe="int8_dynamic",
                         options=parse_options("int8_dynamic", {"latency_runs": 2, **options}),
                         calibration_path=data, threads=1, device="cpu", work_dir=tmp / f"work-{name}")
    return pipeline.run(cfg)


def _reduce_mean_mlp(path: Path, opset: int = 13) -> Path:
    """MatMul -> ReduceMean(axes=[1] as an attribute, as below opset 18) -> MatMul, and a MatMul in an If branch
    (which int8_dynamic quantizes too): raising it to opset 21 must move the axes to an input and leave the
    branch's weight as it is."""
    rng = np.random.default_rng(6)
    w1 = numpy_helper.from_array((rng.standard_normal((32, 64)) / 6).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "w2")
    wb = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "wb")
    branch = helper.make_graph([helper.make_node("MatMul", ["h2", "wb"], ["yb"], name="in_branch")], "then",
                               [], [helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["n", 64])], [wb])
    other = helper.make_graph([helper.make_node("Identity", ["h2"], ["yo"], name="pass")], "else",
                              [], [helper.make_tensor_value_info("yo", TensorProto.FLOAT, ["n", 64])])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="first"),
             helper.make_node("ReduceMean", ["h1"], ["m"], axes=[1], keepdims=1, name="mean"),
             helper.make_node("Sub", ["h1", "m"], ["h1c"], name="centre"),
             helper.make_node("MatMul", ["h1c", "w2"], ["h2"], name="second"),
             helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other, name="branch")]
    graph = helper.make_graph(nodes, "reduce_mean_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def test_dynamic_int8_matmul_weights_in_4_bits_with_the_opset_raised_where_meanings_changed(tmp_path: Path) -> None:
    model = _reduce_mean_mlp(tmp_path / "m.onnx")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((48, 32)).astype(np.float32)
    data = builders.save_npz(tmp_path / "c.npz", x=x, flag=np.ones((48,), dtype=bool))
    int8 = _dynamic(tmp_path, model, data, "int8")
    four = _dynamic(tmp_path, model, data, "w4", four_bit_weights=True)
    section = four.report["four_bit_weights"]
    # The main graph's two MatMuls (MatMulInteger); the one in the If branch stays int8.
    assert section["layers_4bit"] == 2 and section["opset_converted_from"] == 13, section
    out = onnx.load(str(four.artifact_path))
    assert next(o.version for o in out.opset_import if o.domain == "") == 21 and out.ir_version >= 10
    mean = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    assert not mean.attribute or all(a.name != "axes" for a in mean.attribute)
    assert len(mean.input) == 2 and numpy_helper.to_array(
        next(t for t in out.graph.initializer if t.name == mean.input[1])).tolist() == [1]
    assert four.artifact_bytes < int8.artifact_bytes
    feed = {"x": x[:16], "flag": np.array(True)}
    ref = _outputs(model, feed, optimize=False)
    # ONNX Runtime folds the Casts: no Cast is left for the MatMulInteger weights once loaded.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(four.artifact_path), so, providers=["CPUExecutionProvider"])
    assert "Cast" not in {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node
                          if n.input and n.input[0].endswith("_int4")}
    # Measured: cosine 0.9922 (int8: 0.9999).
    assert _cos(ref, _outputs(four.artifact_path, feed)) > 0.99
    # Keeping layers in 8 bits ranks them on calibration samples, which int8_dynamic then needs.
    with pytest.raises(EngineError) as err:
        _dynamic(tmp_path, model, None, "no-data", four_bit_weights=True, int8_most_sensitive=1)
    assert err.value.code == "calibration_required"
    kept = _dynamic(tmp_path, model, data, "kept", four_bit_weights=True, int8_most_sensitive=1)
    assert kept.report["four_bit_weights"]["layers_4bit"] == 1 and len(kept.report["four_bit_weights"]["ranking"]) == 2


def test_the_page_tells_a_4_bit_weight_step_from_the_int8_model_it_starts_from() -> None:
    from worker.engine.report import Candidate as CandidateRow

    base = _done(auto.Candidate("int8_static", {"method": "minmax"}), 1000, 0.998, True)
    step = _w4(base, 0, 600, 0.995, True)
    keys = {present.candidate_key(CandidateRow.model_validate(r.summary())) for r in (base, step)}
    assert len(keys) == 2


def test_a_model_whose_operators_changed_meaning_goes_through_the_converter_without_growing(tmp_path: Path) -> None:
    """DFT's axis became an input at opset 20: ONNX's version converter rewrites it. The converter records every
    inferred shape as value_info; only the annotations the model had are kept (fracast's int8 model came out larger
    with its weights in 4 bits than without)."""
    from worker.engine.four_bit_weights import _to_opset

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("DFT", ["r"], ["f"], axis=1, name="dft"),
             helper.make_node("Abs", ["f"], ["y"], name="abs")]
    graph = helper.make_graph(nodes, "dft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 2])],
                              value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 16, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    x = np.random.default_rng(8).standard_normal((2, 16, 1)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert _to_opset(model) == 18
    assert next(o.version for o in model.opset_import if o.domain == "") == 21 and model.ir_version >= 10
    dft = next(n for n in model.graph.node if n.op_type == "DFT")
    assert len(dft.input) == 3 and not any(a.name == "axis" for a in dft.attribute)  # the axis is an input now
    assert [vi.name for vi in model.graph.value_info] == ["r"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)


def _conv_matmul_gemm(path: Path) -> Path:
    """Conv (3 -> 4 channels) -> Relu -> Reshape [n, 4, 16] -> MatMul (K 16, any leading axes) -> Reshape [n, 20]
    -> Gemm (K 20): one layer of each kind whose input means the 4-bit weights' bias correction reads."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "cb"),
             numpy_helper.from_array(np.array([0, 4, 16], np.int64), "s1"),
             numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "mw"),
             numpy_helper.from_array(np.array([0, 20], np.int64), "s2"),
             numpy_helper.from_array(rng.standard_normal((20, 3)).astype(np.float32), "gw"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "gb")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "s1"], ["r3"], name="rows"),
             helper.make_node("MatMul", ["r3", "mw"], ["m"], name="matmul"),
             helper.make_node("Reshape", ["m", "s2"], ["m2"], name="flat"),
             helper.make_node("Gemm", ["m2", "gw", "gb"], ["y"], name="gemm")]
    graph = helper.make_graph(nodes, "conv_matmul_gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    return _save(graph, path)


def test_the_input_means_are_summed_inside_onnx_runtime_per_channel_of_each_layer_kind(tmp_path: Path) -> None:
    """_sums_delta: a ReduceSum per layer input (a conv's channels on axis 1, a MatMul's K after any leading axes,
    a Gemm's K on axis 1) and its shape, so a run hands back vectors instead of activations; the means they give
    are those of the activations themselves."""
    from worker.engine import calibrate
    from worker.engine.four_bit_weights import _sums_delta

    rng = np.random.default_rng(9)
    x = (1.5 + rng.standard_normal((40, 3, 6, 6))).astype(np.float32)
    data = builders.save_npz(tmp_path / "c.npz", x=x)
    int8 = _static(tmp_path, _conv_matmul_gemm(tmp_path / "m.onnx"), data, "int8", method="minmax")
    model = onnx.load(str(int8.artifact_path))
    inputs = layer_inputs(model)
    assert sorted(inputs) == ["conv", "gemm", "matmul"]
    delta, sums_of, shape_of, axis_of = _sums_delta(model, inputs)
    session = calibrate.session_with(int8.artifact_path, delta, ["CPUExecutionProvider"], 1)
    feed = {"x": x[:8]}
    fetch = [*sums_of.values(), *shape_of.values()]
    got = dict(zip(fetch, session.run(fetch, feed), strict=True))
    # The activations themselves, from the int8 model with the same tensors as outputs.
    probe = onnx.load(str(int8.artifact_path))
    for t in inputs.values():
        if t != "x":
            probe.graph.output.append(onnx.ValueInfoProto(name=t))
    fetched = [t for t in inputs.values() if t != "x"]
    ran = dict(zip(fetched, ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        fetched, feed), strict=True))
    acts = [feed["x"] if t == "x" else ran[t] for t in inputs.values()]
    channel_axis = {"conv": 1, "matmul": -1, "gemm": 1}
    for (name, t), act in zip(inputs.items(), acts, strict=True):
        axis = channel_axis[name]
        assert axis_of[t] == axis
        assert [int(d) for d in got[shape_of[t]]] == list(act.shape)
        want = np.moveaxis(act.astype(np.float64), axis, -1).reshape(-1, act.shape[axis]).sum(axis=0)
        np.testing.assert_allclose(got[sums_of[t]], want, rtol=1e-5, atol=1e-4)
