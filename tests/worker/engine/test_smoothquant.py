"""SmoothQuant (worker/engine/smoothquant.py): activation outliers of MatMul inputs moved into the weights before
int8_static calibrates, with the float model kept equal."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import builders
from worker.engine import ort_quant, pipeline, smoothquant
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.smoothquant import GraphIndex, Settings, find_groups, smooth

CPU = ["CPUExecutionProvider"]


def _cfg(work: Path, model: Path, data: Path, **options: Any) -> QuantizeConfig:
    return QuantizeConfig(model_path=model, output_path=work / "q.onnx", recipe="int8_static",
                          options=parse_options("int8_static", {"latency_runs": 2, **options}),
                          calibration_path=data, threads=1, device="cpu", work_dir=work / "work")


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in ort.InferenceSession(str(path), providers=CPU).run(None, feed)]


def _batches(x: dict[str, np.ndarray], per: int = 8) -> smoothquant.Batches:
    n = len(next(iter(x.values())))
    return lambda: (({k: v[i:i + per] for k, v in x.items()}, min(per, n - i)) for i in range(0, n, per))


def _save(path: Path, nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], inputs: list[tuple[str, int]],
          outputs: list[tuple[str, int]], opset: int) -> Path:
    graph = helper.make_graph(
        nodes, "smoothquant_test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", c]) for n, c in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", c] if c else None) for n, c in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_planted_outliers_collapse_without_smoothing_and_recover_with_it(tmp_path: Path) -> None:
    """planted_outlier_mlp: three channels of expand1/expand2's outputs are 300x the rest and the squeeze layers
    reading them barely use them. Per-tensor uint8 on those inputs loses the model; the default (auto) smooths
    exactly those two inputs, folding 1/s into the expand weights, and int8 recovers."""
    model = builders.planted_outlier_mlp(tmp_path / "p.onnx")
    data = builders.planted_data(tmp_path / "p.npz")
    off = pipeline.run(_cfg(tmp_path / "off", model, data, smoothquant="off")).report
    on = pipeline.run(_cfg(tmp_path / "on", model, data)).report
    sqnr_off, sqnr_on = off["accuracy"]["outputs"][0]["sqnr_db"], on["accuracy"]["outputs"][0]["sqnr_db"]
    cos_off, cos_on = off["accuracy"]["outputs"][0]["cosine"], on["accuracy"]["outputs"][0]["cosine"]
    assert sqnr_off < 5.0 and cos_off < 0.5  # measured: SQNR -0.09 dB, cosine 0.092
    assert sqnr_on > 18.0 and cos_on > 0.99  # measured: SQNR 22.7 dB, cosine 0.9973
    # The collapsed model succeeds, but says it is no replacement for the original.
    lost = [w for w in off["warnings"] if "has lost what the original computes" in w]
    assert len(lost) == 1 and f"cosine {cos_off:.3f}" in lost[0], off["warnings"]
    assert not any("has lost what the original computes" in w for w in on["warnings"])
    assert off["smoothquant"] == {"enabled": False, "reason": "option smoothquant is off", "mode": "off",
                                  "alpha": 0.5, "spread_threshold": smoothquant.SPREAD_THRESHOLD}
    sq = on["smoothquant"]
    assert sq["enabled"] is True and sq["mode"] == "auto" and sq["alpha"] == 0.5
    assert sq["matmuls_smoothed"] == 2 and sq["groups"] == 2 and sq["folded"] == 2 and sq["muls_inserted"] == 0
    assert sq["candidates"] == 7
    # measured: 494x before; after, the largest is an input left alone (3.4x)
    assert sq["largest_spread_before"] > 50.0 and sq["largest_spread_after"] < 10.0
    assert sq["check"]["passed"] is True and sq["check"]["max_relative_error"] < 1e-5
    # The layer table compares the quantized model with the smoothed float model whose tensors it carries:
    # expand1's output is divided by s there, and its SQNR against the unsmoothed one would be meaningless.
    layers = {layer["name"]: layer for layer in on["layers"]}
    for name in ("expand1", "squeeze1", "expand2", "squeeze2"):
        assert layers[name]["sqnr_db"] > 20.0, layers[name]  # measured: 37.7, 26.1, 25.1, 25.7 dB
    assert on["options"]["smoothquant"] == "auto" and on["options"]["smoothquant_alpha"] == 0.5


def _chain_and_layernorm(path: Path, rng: np.random.Generator) -> Path:
    """x -> MatMul(w1) -> Add(b1) -> Relu -> MatMul(w2) -> y1 (three channels of the Relu output 200x the
    rest), and x -> LayerNormalization (scale with three 100x channels) -> Gemm(transB) -> y2."""
    w1 = rng.standard_normal((16, 32)) / 4
    w1[:, :3] *= 200.0
    scale = np.ones(16)
    scale[[2, 7, 11]] = 100.0
    inits = {"w1": w1, "b1": rng.standard_normal(32), "w2": rng.standard_normal((32, 8)) / 6,
             "ln_scale": scale, "ln_bias": rng.standard_normal(16) * 0.1, "w3t": rng.standard_normal((8, 16)) / 4,
             "c3": rng.standard_normal(8)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="fc1_relu"),
        helper.make_node("MatMul", ["h", "w2"], ["y1"], name="fc2"),
        helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["ln"], name="ln", axis=-1),
        helper.make_node("Gemm", ["ln", "w3t", "c3"], ["y2"], name="proj", transB=1),
    ]
    return _save(path, nodes, inits, [("x", 16)], [("y1", 8), ("y2", 8)], opset=17)


def test_folding_into_the_producer_keeps_the_float_model_equal(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _chain_and_layernorm(tmp_path / "m.onnx", rng)
    model = onnx.load(str(path))
    x = rng.standard_normal((32, 16)).astype(np.float32)
    res = smooth(path, model, _batches({"x": x}), Settings("on", 0.5), CPU, 1, tmp_path / "s.onnx")
    sq = res.section
    # fc1 reads the graph input (nothing to fold into: a Mul), fc2 the Relu chain, proj the LayerNorm.
    assert sq["enabled"] is True and sq["groups"] == 3 and sq["folded"] == 2 and sq["muls_inserted"] == 1
    assert res.path is not None and res.muls == ("lowbit_smoothquant_mul0",)
    assert sq["check"]["passed"] and sq["check"]["max_relative_error"] < 1e-5
    # alpha 0.5 leaves sqrt of an outlier's excess where the weights do not absorb it (their rows are alike here).
    assert sq["largest_spread_before"] > 50.0 and sq["largest_spread_after"] < sq["largest_spread_before"] / 5
    smoothed = onnx.load(str(res.path))
    assert [n.op_type for n in smoothed.graph.node] == ["Mul", *[n.op_type for n in model.graph.node]]
    fresh = rng.standard_normal((64, 16)).astype(np.float32)  # samples the factors were not computed on
    for want, got in zip(_run(path, {"x": fresh}), _run(res.path, {"x": fresh}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    # The channel maxima ONNX Runtime reduced to are numpy's.
    groups = find_groups(model)
    maxima, samples = smoothquant.channel_maxima(path, model, groups, _batches({"x": x}, per=5), CPU, 1)
    h = np.maximum(x @ numpy_helper.to_array(_init(model, "w1")) + numpy_helper.to_array(_init(model, "b1")), 0)
    assert samples == 32
    np.testing.assert_allclose(maxima["h"], np.abs(h).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(maxima["x"], np.abs(x).max(axis=0), rtol=1e-6)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _qkv(path: Path, rng: np.random.Generator, residual: bool) -> Path:
    """x -> LayerNorm (three 100x channels) -> Q, K, V MatMuls, summed; with ``residual`` the sum also adds the
    LayerNorm's output, as a transformer block's residual does."""
    scale = np.ones(24)
    scale[[1, 5, 20]] = 100.0
    inits = {"ln_scale": scale, "ln_bias": rng.standard_normal(24) * 0.1}
    inits.update({f"w{k}": rng.standard_normal((24, 24)) / 5 for k in "qkv"})
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["ln"], name="ln", axis=-1)]
    nodes += [helper.make_node("MatMul", ["ln", f"w{k}"], [k], name=f"proj_{k}") for k in "qkv"]
    nodes += [helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
              helper.make_node("Add", ["qk", "v"], ["qkv" if residual else "y"], name="add_v")]
    if residual:
        nodes.append(helper.make_node("Add", ["qkv", "ln"], ["y"], name="residual"))
    return _save(path, nodes, inits, [("x", 24)], [("y", 24)], opset=18)


@pytest.mark.parametrize("residual", [False, True])
def test_q_k_v_reading_one_layernorm_share_one_factor(tmp_path: Path, residual: bool) -> None:
    rng = np.random.default_rng(1)
    path = _qkv(tmp_path / "qkv.onnx", rng, residual)
    model = onnx.load(str(path))
    groups = find_groups(model)
    assert [(g.tensor, sorted(s.node for s in g.sites)) for g in groups] == [("ln", ["proj_k", "proj_q", "proj_v"])]
    x = rng.standard_normal((40, 24)).astype(np.float32)
    res = smooth(path, model, _batches({"x": x}), Settings("auto", 0.5), CPU, 1, tmp_path / "s.onnx")
    assert res.model is not None and res.path is not None
    sq = res.section
    assert sq["enabled"] and sq["matmuls_smoothed"] == 3 and sq["groups"] == 1 and sq["check"]["passed"]
    # One s for the three: each weight's row j is multiplied by the same s_j.
    ratios = [numpy_helper.to_array(_init(res.model, f"w{k}")) / numpy_helper.to_array(_init(model, f"w{k}"))
              for k in "qkv"]
    s = ratios[0][:, 0]
    for r in ratios:
        np.testing.assert_allclose(r, np.repeat(s[:, None], 24, axis=1), rtol=1e-5)
    assert s[[1, 5, 20]].min() > 5 * np.median(s)  # the outlier channels get the large factors
    ln_ratio = numpy_helper.to_array(_init(res.model, "ln_scale")) / numpy_helper.to_array(_init(model, "ln_scale"))
    if residual:
        # The residual Add reads the LayerNorm's output too, so it keeps its scale: one Mul by 1/s feeds all three.
        assert sq["folded"] == 0 and sq["muls_inserted"] == 1 and res.muls == ("lowbit_smoothquant_mul0",)
        np.testing.assert_array_equal(ln_ratio, np.ones(24))
        mul = next(n for n in res.model.graph.node if n.op_type == "Mul")
        np.testing.assert_allclose(numpy_helper.to_array(_init(res.model, mul.input[1])), 1.0 / s, rtol=1e-5)
        assert {n.name for n in res.model.graph.node if mul.output[0] in n.input} == {"proj_q", "proj_k", "proj_v"}
    else:
        assert sq["folded"] == 1 and sq["muls_inserted"] == 0 and res.muls == ()
        np.testing.assert_allclose(ln_ratio, 1.0 / s, rtol=1e-5)
    want, got = _run(path, {"x": x}), _run(res.path, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4 * float(np.abs(want[0]).max()))


def test_a_smoothed_model_that_does_not_come_out_equal_is_not_used(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    path = _qkv(tmp_path / "qkv.onnx", rng, residual=False)
    real_apply = smoothquant.apply

    def broken(model: onnx.ModelProto, plan: smoothquant.Plan) -> tuple[onnx.ModelProto, list[str]]:
        out, muls = real_apply(model, plan)
        w = _init(out, "wq")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, "wq"))  # a 1% error
        return out, muls

    monkeypatch.setattr(smoothquant, "apply", broken)
    x = rng.standard_normal((16, 24)).astype(np.float32)
    res = smooth(path, onnx.load(str(path)), _batches({"x": x}), Settings("on", 0.5), CPU, 1, tmp_path / "s.onnx")
    assert res.path is None and res.model is None and not (tmp_path / "s.onnx").exists()
    assert res.section["enabled"] is False and res.section["check"]["passed"] is False
    assert "differs from the prepared one" in res.section["reason"]
    assert len(res.warnings) == 1 and res.warnings[0].startswith("SmoothQuant skipped")


def test_auto_leaves_models_without_outliers_alone(tmp_path: Path) -> None:
    path = builders.mlp(tmp_path / "mlp.onnx")
    model = onnx.load(str(path))
    x = np.asarray(np.load(builders.mlp_data(tmp_path / "d.npz"))["features"], np.float32)
    res = smooth(path, model, _batches({model.graph.input[0].name: x}), Settings("auto", 0.5), CPU, 1,
                 tmp_path / "s.onnx")
    assert res.path is None and res.section["enabled"] is False
    assert res.section["largest_spread_before"] < smoothquant.SPREAD_THRESHOLD
    assert "not above the threshold" in res.section["reason"]
    assert not (tmp_path / "s.onnx").exists()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_off_quantizes_the_prepared_model_byte_for_byte_as_before(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """smoothquant off: no pass over the data, the quantizer reads the prepared model itself, and the artifact is
    the one int8_static built before SmoothQuant existed (the step replaced by nothing at all)."""
    model = builders.planted_outlier_mlp(tmp_path / "p.onnx")
    data = builders.planted_data(tmp_path / "p.npz")
    read: list[tuple[Path, str]] = []
    real_quantize = ort_quant.quantize_static

    def recording(src: Path, *args: Any, **kwargs: Any) -> list[str]:
        read.append((Path(src), _sha(Path(src))))
        return real_quantize(src, *args, **kwargs)

    def no_pass(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("smoothquant off ran the channel pass")

    monkeypatch.setattr(ort_quant, "quantize_static", recording)
    monkeypatch.setattr(smoothquant, "channel_maxima", no_pass)
    off = pipeline.run(_cfg(tmp_path / "off", model, data, smoothquant="off"))
    prepared = tmp_path / "off" / "work" / "prep" / "normalized.onnx"
    assert read == [(prepared, _sha(prepared))]
    assert not (tmp_path / "off" / "work" / "smoothed.onnx").exists()

    def before(ctx: Any) -> tuple[Any, smoothquant.SmoothResult]:
        return ctx, smoothquant.SmoothResult({"enabled": False, "reason": "no SmoothQuant step", "mode": "off",
                                              "alpha": 0.5, "spread_threshold": 20.0})

    monkeypatch.setattr(smoothquant, "smooth_static", before)
    without = pipeline.run(_cfg(tmp_path / "before", model, data, smoothquant="off"))
    assert _sha(off.artifact_path) == _sha(without.artifact_path)


def test_graph_index_finds_only_own_constant_weights(tmp_path: Path) -> None:
    """A weight two MatMuls share is not smoothed (scaling it for one would change the other), nor is a MatMul
    whose 'weight' is an activation."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
             helper.make_node("MatMul", ["a", "w"], ["b"], name="m2"),
             helper.make_node("MatMul", ["b", "w2"], ["c"], name="m3"),
             helper.make_node("MatMul", ["c", "c_t"], ["y"], name="m4"),
             helper.make_node("Transpose", ["c"], ["c_t"], name="t")]
    inits = {"w": rng.standard_normal((8, 8)), "w2": rng.standard_normal((8, 8))}
    path = _save(tmp_path / "shared.onnx", [nodes[0], nodes[1], nodes[2], nodes[4], nodes[3]], inits, [("x", 8)],
                 [("y", 0)], opset=17)
    model = onnx.load(str(path))
    assert [(g.tensor, [s.node for s in g.sites]) for g in find_groups(model)] == [("b", ["m3"])]
    assert GraphIndex.of(model).own_float("w2") and not GraphIndex.of(model).own_float("w")


def test_auto_keeps_the_unsmoothed_model_when_smoothing_does_not_help(tmp_path: Path) -> None:
    """A power spectrum (loud low bins, quiet high ones: spread 728x) into a sparse triangular filterbank, as
    openWakeWord's mel spectrogram. Its loudest bin is read by no filter: smoothing used to leave that bin's
    range as it was while dividing the others, which cost 11 dB here (36.2 -> 24.9 dB; the real model: cosine
    0.90 -> 0). Now that bin is scaled down with the rest and "on" costs a fraction of a dB; smoothing still
    gains nothing, so "auto" measures both int8 models on the calibration samples and keeps the unsmoothed one,
    saying why."""
    freq, mels = 96, 24
    bank = np.zeros((freq, mels), np.float32)
    for j, c in enumerate(np.geomspace(2, freq - 3, mels).astype(int)):
        w = max(1, c // 6)
        for k in range(max(0, c - w), min(freq, c + w + 1)):
            bank[k, j] = 1 - abs(k - c) / (w + 1)
    nodes = [helper.make_node("Mul", ["x", "x"], ["p"]), helper.make_node("MatMul", ["p", "W"], ["m"]),
             helper.make_node("Clip", ["m", "lo"], ["c"]), helper.make_node("Log", ["c"], ["y"])]
    model = _save(tmp_path / "mel.onnx", nodes, {"W": bank, "lo": np.array(1e-6)}, [("x", freq)], [("y", mels)], 17)
    x = np.random.default_rng(0).standard_normal((64, freq)).astype(np.float32) * np.geomspace(30, 0.05, freq)
    np.savez(tmp_path / "c.npz", x=x.astype(np.float32))
    reports = {}
    for mode in ("off", "on", "auto"):
        work = tmp_path / mode
        work.mkdir()
        reports[mode] = pipeline.run(_cfg(work, model, tmp_path / "c.npz", smoothquant=mode)).report
    sqnr = {m: r["accuracy"]["outputs"][0]["sqnr_db"] for m, r in reports.items()}
    assert sqnr["off"] - 1.0 < sqnr["on"] < sqnr["off"]  # measured 35.95 vs 36.18 dB (24.9 before the fix)
    assert sqnr["auto"] == sqnr["off"]
    section = reports["auto"]["smoothquant"]
    assert section["largest_spread_before"] > 50 and section["enabled"] is False
    assert "unsmoothed model is kept" in section["reason"]
    choice = section["int8_sqnr_db"]
    assert choice["unsmoothed"] > choice["smoothed"] + 0.5  # measured 35.64 vs 34.61 dB on 51 calibration samples


def test_a_channel_the_weights_never_read_is_scaled_down_with_the_rest() -> None:
    """factors: a channel with an all-zero weight row keeps no factor of its own but must not keep the
    activation's range to itself; it is brought down to the largest smoothed channel."""
    x_max = np.array([1e12, 4.0, 100.0, 0.0])
    w_max = np.array([0.0, 1.0, 0.01, 0.5])
    s = smoothquant.factors(x_max, w_max, 0.5)
    balanced = x_max[1:3] / s[1:3]
    assert s[1] == pytest.approx(2.0) and s[2] == pytest.approx(100.0)  # sqrt(x) / sqrt(w)
    assert s[3] == 1.0  # a channel that never moves
    assert x_max[0] / s[0] == pytest.approx(balanced.max())


def test_smoothing_a_matmul_with_an_unread_loud_channel_recovers_int8(tmp_path: Path) -> None:
    """A filter-bank MatMul (like a mel spectrogram's): input channel 0 carries values 1e6 times the rest and
    the weights never read it. Unsmoothed, that channel holds uint8's whole range and the read ones round to
    zero. Smoothing used to divide the read channels by their factors and leave channel 0 as it was, which kept
    the output at zero too (as on openWakeWord's mel spectrogram, with smoothquant on); channel 0 is now
    scaled down with the rest, and int8 works. auto smooths it (the spread is far above the threshold)."""
    rng = np.random.default_rng(3)
    w = np.abs(rng.normal(size=(32, 8))) * np.linspace(0.001, 0.05, 32)[:, None]
    w[0] = 0.0
    model = _save(tmp_path / "fb.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w},
                  [("x", 32)], [("y", 8)], 17)
    x = np.abs(rng.normal(size=(64, 32))) * np.linspace(1.0, 50.0, 32)
    x[:, 0] *= 1e6
    np.savez(tmp_path / "fb.npz", x=x.astype(np.float32))
    reports = {m: pipeline.run(_cfg(tmp_path / m, model, tmp_path / "fb.npz", smoothquant=m)).report
               for m in ("on", "off", "auto")}
    on, off, auto = (reports[m]["accuracy"]["outputs"][0] for m in ("on", "off", "auto"))
    assert reports["on"]["smoothquant"]["muls_inserted"] == 1
    assert off["sqnr_db"] < 3.0  # measured: 0.0 dB (and 0.0 with smoothing before the fix)
    assert on["sqnr_db"] > 35.0 and on["cosine"] > 0.999  # measured: 40.36 dB
    assert reports["auto"]["smoothquant"]["enabled"] is True and auto["sqnr_db"] == on["sqnr_db"]
