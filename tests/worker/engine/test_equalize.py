"""Cross-layer equalization and bias correction (issue #18): known answers on conv models built here."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.pages import present
from tests.builders import save_npz
from tests.reports import assert_report_complete
from worker.engine import bias_correction, calibrate, conv_refine, equalize, ort_quant
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError
from worker.engine.pipeline import run
from worker.engine.report import Report

# Output channels of the first conv scaled up by this, and the matching inputs of the next conv down by it.
SKEW = 100.0
SKEWED = (0, 1, 2)


def _conv(name: str, x: str, w: np.ndarray, b: np.ndarray | None, out: str, group: int = 1,
          pad: int = 1) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    inits = [numpy_helper.from_array(w.astype(np.float32), f"{name}.w")]
    inputs = [x, f"{name}.w"]
    if b is not None:
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}.b"))
        inputs.append(f"{name}.b")
    node = helper.make_node("Conv", inputs, [out], name=name, group=group, pads=[pad] * 4,
                            kernel_shape=list(w.shape[2:]))
    return node, inits


def skewed_chain(path: Path, act: str = "Relu", skew: float = SKEW, seed: int = 0) -> Path:
    """[N, 3, 12, 12] -> conv 3->8 -> act -> depthwise conv 8 -> Relu -> conv 8->8 (1x1) -> [N, 8, 12, 12].

    Output channels SKEWED of the first conv (weights and bias) are multiplied by ``skew`` and the depthwise
    conv's weights of those channels divided by it: the same function as the unskewed model through any
    positively homogeneous ``act``, but the first conv's activation spans ``skew`` times the range of the rest."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3))
    b1 = rng.normal(0, 0.1, 8)
    w2 = rng.normal(0, 0.3, (8, 1, 3, 3))
    b2 = rng.normal(0, 0.1, 8)
    w3 = rng.normal(0, 0.3, (8, 8, 1, 1))
    b3 = rng.normal(0, 0.1, 8)
    for c in SKEWED:
        w1[c] *= skew
        b1[c] *= skew
        w2[c] /= skew
    n1, i1 = _conv("conv1", "x", w1, b1, "y1")
    nodes = [n1]
    inits = list(i1)
    if act == "Clip":  # ReLU6 as exported
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["y1", "lo", "hi"], ["a1"], name="relu6"))
    elif act == "x*HardSigmoid(x)":  # HardSwish as ONNX Runtime's pre-processing leaves it (PP-LCNet)
        nodes += [helper.make_node("HardSigmoid", ["y1"], ["h1"], name="hsig1", alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["y1", "h1"], ["a1"], name="hswish1")]
    else:
        nodes.append(helper.make_node(act, ["y1"], ["a1"], name="act1"))
    n2, i2 = _conv("conv2", "a1", w2, b2, "y2", group=8)
    n3, i3 = _conv("conv3", "a2", w3, b3, "out", pad=0)
    nodes += [n2, helper.make_node("Relu", ["y2"], ["a2"], name="act2"), n3]
    graph = helper.make_graph(
        nodes, "skewed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 12, 12])], inits + i2 + i3)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.save(model, str(path))
    return path


def _images(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    return save_npz(path, x=rng.uniform(-1, 1, (n, 3, 12, 12)).astype(np.float32))


def _run_model(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _quantize(tmp: Path, model: Path, calib: Path, evals: Path | None, tag: str, **options: object) -> dict:
    cfg = QuantizeConfig(model_path=model, output_path=tmp / f"{tag}.onnx", recipe="int8_static",
                         options=parse_options("int8_static", dict(options)), calibration_path=calib,
                         eval_path=evals, threads=1, device="cpu", work_dir=tmp / f"work-{tag}")
    return run(cfg).report


def test_equalized_model_computes_the_same_function(tmp_path: Path) -> None:
    model = onnx.load(str(skewed_chain(tmp_path / "m.onnx")))
    eq = equalize.equalize(model)
    assert [(p.first, p.second) for p in eq.pairs] == [("conv1", "conv2"), ("conv2", "conv3")]
    assert eq.spread_before is not None and eq.spread_after is not None
    assert eq.spread_after < eq.spread_before / 10
    x = np.random.default_rng(7).uniform(-1, 1, (4, 3, 12, 12)).astype(np.float32)
    ref, got = _run_model(model, x), _run_model(eq.model, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # After equalization each pair's shared channels have equal ranges on both sides.
    inits = {t.name: numpy_helper.to_array(t) for t in eq.model.graph.initializer}
    r1 = np.abs(inits["conv1.w"]).reshape(8, -1).max(axis=1)
    r2 = np.abs(inits["conv2.w"]).reshape(8, -1).max(axis=1)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)


@pytest.mark.parametrize("act", ["Clip", "HardSwish", "x*HardSigmoid(x)"])
def test_a_pair_joined_by_a_non_homogeneous_activation_is_skipped(tmp_path: Path, act: str) -> None:
    model = onnx.load(str(skewed_chain(tmp_path / "m.onnx", act=act)))
    pairs, skipped = equalize.find_pairs(model)
    assert ("conv1", "conv2") not in [(p.first, p.second) for p in pairs]
    assert [(s["first"], s["second"]) for s in skipped] == [("conv1", "conv2")]
    assert ("HardSwish" if "HardSigmoid" in act else act) in skipped[0]["reason"]
    # The rest of the chain (conv2 -> Relu -> conv3) is still equalized, and the model still computes the same.
    assert [(p.first, p.second) for p in pairs] == [("conv2", "conv3")]
    x = np.random.default_rng(7).uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
    ref, got = _run_model(model, x), _run_model(equalize.equalize(model).model, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_batchnorm_after_a_conv_is_folded_first(tmp_path: Path) -> None:
    model = onnx.load(str(skewed_chain(tmp_path / "m.onnx")))
    graph = model.graph
    rng = np.random.default_rng(3)
    for name, value in (("g", rng.uniform(0.5, 2, 8)), ("be", rng.normal(0, 1, 8)), ("mu", rng.normal(0, 1, 8)),
                        ("var", rng.uniform(0.5, 2, 8))):
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    graph.node[0].output[0] = "y1_raw"
    graph.node.insert(1, helper.make_node("BatchNormalization", ["y1_raw", "g", "be", "mu", "var"], ["y1"],
                                          name="bn1"))
    eq = equalize.equalize(model)
    assert eq.folded_batchnorms == 1 and "BatchNormalization" not in {n.op_type for n in eq.model.graph.node}
    x = rng.uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
    ref, got = _run_model(model, x), _run_model(eq.model, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_int8_static_loses_on_skewed_channels_and_equalization_recovers(tmp_path: Path) -> None:
    model = skewed_chain(tmp_path / "m.onnx")
    calib, evals = _images(tmp_path / "c.npz", 64, 1), _images(tmp_path / "e.npz", 32, 2)
    plain = _quantize(tmp_path, model, calib, evals, "plain", equalize="off", bias_correction="off")
    cle = _quantize(tmp_path, model, calib, evals, "cle", equalize="on", bias_correction="off")
    auto = _quantize(tmp_path, model, calib, evals, "auto")
    assert_report_complete(cle, "int8_static")
    sqnr = {k: r["accuracy"]["outputs"][0]["sqnr_db"] for k, r in (("plain", plain), ("cle", cle), ("auto", auto))}
    # Measured (onnxruntime 1.32, 1 thread): plain 9.51 dB, equalized 34.66 dB, auto 34.82 dB.
    assert sqnr["plain"] < 15.0, sqnr
    assert sqnr["cle"] > 30.0, sqnr
    assert sqnr["auto"] > 30.0, sqnr
    section = cle["equalization"]
    assert section["enabled"] and section["pairs"] == 2 and section["check"]["passed"]
    assert section["range_spread_after"] < section["range_spread_before"]
    assert auto["equalization"]["enabled"] and "auto" in auto["equalization"]["reason"]
    assert plain["equalization"] == {"mode": "off", "enabled": False, "reason": "option equalize is off"}
    # The job page's lines (app/pages/present.py), from the report as a reader loads it.
    line = present.equalization_line(Report.from_stored(cle).equalization)
    assert line.startswith("On (on): option equalize is on. 2 conv pair(s) rescaled"), line
    assert present.bias_correction_line(Report.from_stored(cle).bias_correction).startswith("Off (off)")
    # The layer table compares against the equalized float model the artifact came from: no layer collapses.
    assert all(la["sqnr_db"] is None or la["sqnr_db"] > 10 for la in cle["layers"]), cle["layers"]


def biased_rounding_conv(path: Path, seed: int = 0, qmax: int = 127) -> Path:
    """[N, 8, 6, 6] -> conv 8->4 (3x3, no padding) with a bias: every weight sits 0.45 of an int8 step above a
    level (each channel's largest at exactly ``qmax`` steps: 64 for 7-bit weights), so per-channel rounding shifts
    all of a channel's weights down together, and with inputs of mean ~3 the outputs move by a steady amount."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(-(qmax - 7), qmax - 7, (4, 8, 3, 3)).astype(np.float64) + 0.45
    steps[:, 0, 0, 0] = float(qmax)
    scale = rng.uniform(0.002, 0.01, (4, 1, 1, 1))
    n, inits = _conv("conv", "x", steps * scale, rng.normal(0, 0.1, 4), "out", pad=0)
    graph = helper.make_graph([n], "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return path


def test_bias_correction_reduces_the_mean_output_error(tmp_path: Path) -> None:
    model = biased_rounding_conv(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = save_npz(tmp_path / "c.npz", x=rng.uniform(2, 4, (64, 8, 6, 6)).astype(np.float32))
    x = np.random.default_rng(2).uniform(2, 4, (32, 8, 6, 6)).astype(np.float32)
    ref = _run_model(model, x)
    errors = {}
    for mode in ("off", "on"):
        rep = _quantize(tmp_path, model, calib, None, f"bc-{mode}", equalize="off", bias_correction=mode)
        got = _run_model(tmp_path / f"bc-{mode}.onnx", x)
        errors[mode] = float(np.abs((got - ref).mean(axis=(0, 2, 3))).mean())
        if mode == "on":
            section = rep["bias_correction"]
            assert section["enabled"] and section["layers_corrected"] == 1 and section["mean_abs_correction"] > 0
    # Measured: mean |per-channel mean output error| 0.609 without, 0.0017 with (output SQNR 23.5 -> 45.9 dB).
    assert errors["on"] < 0.5 * errors["off"], errors


def test_correction_per_channel_matches_the_measured_shift(tmp_path: Path) -> None:
    """E[(W_q - W) x] from the per-channel input means equals the mean output shift of the weights alone."""
    rng = np.random.default_rng(4)
    dw = rng.normal(0, 0.01, (6, 2, 3, 3))  # grouped conv: 3 groups of 2 input channels, 2 outputs each
    mean_x = rng.uniform(0, 2, 6)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c", group=3)
    got = bias_correction.output_correction("Conv", dw, mean_x, node)
    want = np.array([sum(dw[m, j].sum() * mean_x[(m // 2) * 2 + j] for j in range(2)) for m in range(6)])
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("op, attrs, shape, axis", [
    ("Conv", {"group": 3}, (6, 2, 3, 3), 0),  # grouped conv, per-output-channel scales
    ("Conv", {}, (5, 4, 1, 7), None),  # per-tensor scale
    ("Gemm", {"transB": 1, "alpha": 0.5, "beta": 2.0}, (7, 9), 0),  # rows are outputs
    ("Gemm", {}, (9, 7), 1),  # rows are inputs: blocks' shares add up
])
def test_the_correction_made_a_block_of_rows_at_a_time_is_the_whole_weights(
        op: str, attrs: dict[str, Any], shape: tuple[int, ...], axis: int | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """blocked_correction never holds W_q - W whole; with blocks of one or two rows it gives what
    output_correction gives on the whole float64 error."""
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, shape).astype(np.float32)
    channels = shape[axis] if axis is not None else 1
    scale = rng.uniform(0.005, 0.02, channels).astype(np.float32) if axis is not None else np.float32(0.01)
    zero = np.zeros(np.shape(scale), dtype=np.int8)
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    q = np.clip(np.round(w / np.reshape(scale, bshape)), -128, 127).astype(np.int8)
    inputs = shape[1] * attrs.get("group", 1) if op == "Conv" else shape[1 if attrs.get("transB") else 0]
    mean_x = rng.uniform(0, 2, inputs)
    node = helper.make_node(op, ["x", "w", "b"], ["y"], name="l", **attrs)
    whole = (q.astype(np.float64) * np.reshape(scale, bshape).astype(np.float64)) - w.astype(np.float64)
    want = bias_correction.output_correction(op, whole, mean_x, node)
    row = int(np.prod(shape[1:])) * 8
    for block in (row, 2 * row, 1 << 20):
        monkeypatch.setattr(bias_correction, "ERROR_BLOCK_BYTES", block)
        got = bias_correction.blocked_correction(op, node, q, np.asarray(scale), zero, axis or 0, w, mean_x)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_off_leaves_the_artifact_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both options off: neither step runs, and the artifact is the one the recipe wrote before they existed (the
    plain quantizer's, byte for byte)."""
    model = skewed_chain(tmp_path / "m.onnx")
    calib = _images(tmp_path / "c.npz", 32, 1)

    def plain_only(ctx: object, ranges: object, calibrate: object, side: object = None,
                   plain_stats: object = None) -> conv_refine.Refined:
        off = {"mode": "off", "enabled": False, "reason": "the step as it was before the options"}
        return conv_refine.Refined(dict(off), dict(off))

    monkeypatch.setattr(conv_refine, "refine", plain_only)
    _quantize(tmp_path, model, calib, None, "before")
    monkeypatch.undo()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not run with the options off")

    monkeypatch.setattr(equalize, "equalize", fail)
    monkeypatch.setattr(bias_correction, "correct", fail)
    rep = _quantize(tmp_path, model, calib, None, "off", equalize="off", bias_correction="off")
    assert _sha(tmp_path / "off.onnx") == _sha(tmp_path / "before.onnx")
    assert rep["bias_correction"] == {"mode": "off", "enabled": False, "reason": "option bias_correction is off"}


def test_the_options_take_auto_on_off_and_default_to_auto() -> None:
    opts = parse_options("int8_static", {})
    assert (opts.equalize, opts.bias_correction) == ("auto", "auto")
    assert parse_options("int8_static", {"equalize": "on", "bias_correction": "off"}).to_dict()["equalize"] == "on"
    for bad in ({"equalize": True}, {"bias_correction": "yes"}):
        with pytest.raises(EngineError) as err:
            parse_options("int8_static", bad)
        assert err.value.code == "invalid_option"
    with pytest.raises(EngineError):
        parse_options("int8_dynamic", {"equalize": "on"})


def test_auto_makes_no_equalized_candidate_where_channel_ranges_spread_little(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With per-channel weights, "auto" skips the equalized candidate (a calibration pass, a quantization and a
    comparison) where the first convs' channel ranges spread under AUTO_MIN_SPREAD; per-tensor weights, or a
    wide spread, still get one."""
    calib = _images(tmp_path / "c.npz", 32, 1)
    made: list[str] = []
    real = ort_quant.quantize_static

    def counting(src: Path, *args: object, **kwargs: object) -> None:
        made.append(Path(src).name)
        real(src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_refine, "quantize_static", counting)
    mild = _quantize(tmp_path, skewed_chain(tmp_path / "mild-model.onnx", skew=1.0), calib, None, "mild")
    section = mild["equalization"]
    assert section["range_spread_before"] < conv_refine.AUTO_MIN_SPREAD, section
    assert not section["enabled"] and "spread" in section["reason"] and "compare" not in section, section
    assert made == []  # no equalized model was quantized
    per_tensor = _quantize(tmp_path, tmp_path / "mild-model.onnx", calib, None, "per-tensor", per_channel=False)
    assert "compare" in per_tensor["equalization"] and made == ["equalized.onnx"], per_tensor["equalization"]
    wide = _quantize(tmp_path, skewed_chain(tmp_path / "wide-model.onnx"), calib, None, "wide")
    assert wide["equalization"]["range_spread_before"] >= conv_refine.AUTO_MIN_SPREAD
    assert wide["equalization"]["enabled"] and made == ["equalized.onnx", "equalized.onnx"]


def test_the_bias_correction_pass_gives_the_float_outputs_it_ran(tmp_path: Path) -> None:
    """bias_correction.correct with keep_outputs returns the float model's outputs on the first batches, from
    the runs that measured the input means (conv_refine's reference then needs no pass of its own): the same
    values as the float model run alone."""
    model = biased_rounding_conv(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    x = rng.uniform(2, 4, (24, 8, 6, 6)).astype(np.float32)
    calib = save_npz(tmp_path / "c.npz", x=x)
    _quantize(tmp_path, model, calib, None, "q", equalize="off", bias_correction="off")
    batches = [({"x": x[i:i + 8]}, 8) for i in range(0, 24, 8)]
    res = bias_correction.correct(tmp_path / "q.onnx", model, onnx.load(str(model)), tmp_path / "bc.onnx",
                                  lambda: iter(batches), ["CPUExecutionProvider"], 1, keep_outputs=10)
    # batches until 10 samples are held: their outputs and where they came from, not the feeds
    assert [(k.batch, k.rows, k.samples) for k in res.outputs] == [(0, None, 8), (1, None, 8)]
    for k in res.outputs:
        # float32 rounding only: the added ReduceMean outputs change which kernels ONNX Runtime picks (measured:
        # 4 of 512 values differ, by at most 2.4e-6)
        np.testing.assert_allclose(k.outputs[0], _run_model(model, batches[k.batch][0]["x"]), rtol=1e-5, atol=1e-5)
    assert res.samples == 24 and res.layers == ["conv"]


def test_the_calibration_pass_measures_the_input_means_and_keeps_the_float_outputs(tmp_path: Path) -> None:
    """calibrate.SidePass: bias correction's input means and the float outputs, computed in the min/max
    calibration's own runs (batches run in parts included), equal those of bias correction's own pass."""
    from worker.engine import calibrate

    model_path = biased_rounding_conv(tmp_path / "m.onnx")
    model = onnx.load(str(model_path))
    x = np.random.default_rng(5).uniform(2, 4, (24, 8, 6, 6)).astype(np.float32)
    batches = [({"x": x[i:i + 8]}, 8) for i in range(0, 24, 8)]
    axes_of = bias_correction.mean_axes(model)
    assert axes_of == {"x": [0, 2, 3]}
    delta, names = bias_correction.means_delta(model, axes_of)
    for per_run in (8, 3):  # whole batches, then each batch in parts (calibrate.split_feed)
        side = calibrate.SidePass(delta, names, keep_outputs=10)
        real = calibrate.minmax_samples_per_run
        calibrate.minmax_samples_per_run = lambda *_a, p=per_run: p
        try:
            calibrate.collect_stats(model_path, ["x"], lambda: iter(batches), calibrate.CalibrationSettings("minmax"),
                                    ["CPUExecutionProvider"], 1, model=model, side=side)
        finally:
            calibrate.minmax_samples_per_run = real
        assert side.done and side.samples == 24
        np.testing.assert_allclose(side.sums["x"] / side.samples, x.astype(np.float64).mean(axis=(0, 2, 3)),
                                   rtol=1e-6)
        # The first batches until 10 samples are held (8 + 8; run in parts of 3, each batch's joined back), their
        # outputs only: the feeds are read again from the source, the same rows.
        assert [(k.batch, k.rows, k.samples) for k in side.kept] == [(0, None, 8), (1, None, 8)]
        for k, feed in zip(side.kept, calibrate.kept_feeds(lambda: iter(batches), side.kept), strict=True):
            np.testing.assert_array_equal(feed["x"], x[k.batch * 8:k.batch * 8 + 8])
            np.testing.assert_allclose(k.outputs[0], _run_model(model, feed["x"]), rtol=1e-5, atol=1e-5)
    # Parts are joined back only where every output has the part's samples first; else each stays a run of its own,
    # its rows of the batch read again by kept_feeds.
    parts = [calibrate.KeptRun(0, (0, 3), 3, [np.zeros((3, 2)), np.float32(1.0)]),
             calibrate.KeptRun(0, (3, 5), 2, [np.zeros((2, 2)), np.float32(2.0)])]
    separate = calibrate._whole(0, 5, parts)
    assert [(k.rows, k.samples) for k in separate] == [((0, 3), 3), ((3, 5), 2)]
    fed = list(calibrate.kept_feeds(lambda: iter([({"x": x[:5]}, 5)]), separate))
    assert [f["x"].shape[0] for f in fed] == [3, 2]
    np.testing.assert_array_equal(fed[1]["x"], x[3:5])
    joined = calibrate._whole(0, 5, [dataclasses.replace(k, outputs=k.outputs[:1]) for k in parts])
    assert [(k.rows, k.samples, k.outputs[0].shape) for k in joined] == [(None, 5, (5, 2))]


def test_a_job_takes_the_input_means_from_its_calibration_pass(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """int8_static with bias correction: the means pass and the float reference pass are the calibration's; the
    artifact and the report's figures are those of a job that runs both passes on its own."""
    model = biased_rounding_conv(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = save_npz(tmp_path / "c.npz", x=rng.uniform(2, 4, (64, 8, 6, 6)).astype(np.float32))
    calls: list[str] = []
    real_means, real_run_all = bias_correction.input_means, conv_refine.run_all

    def means(*a: Any, **k: Any) -> Any:
        calls.append("means")
        return real_means(*a, **k)

    def run_all(path: Path, *a: Any) -> Any:
        calls.append(Path(path).name)
        return real_run_all(path, *a)

    monkeypatch.setattr(bias_correction, "input_means", means)
    monkeypatch.setattr(conv_refine, "run_all", run_all)
    shared = _quantize(tmp_path, model, calib, None, "shared", equalize="off")
    # No means pass, no float reference pass: only the plain and the corrected int8 model on the compare samples.
    assert "means" not in calls and len(calls) == 2, calls
    calls.clear()
    monkeypatch.setattr(conv_refine, "side_pass", lambda ctx: None)
    own = _quantize(tmp_path, model, calib, None, "own", equalize="off")
    assert calls[0] == "means" and len(calls) == 3, calls
    assert _sha(tmp_path / "shared.onnx") == _sha(tmp_path / "own.onnx")
    for key in ("enabled", "mean_abs_correction", "mean_relative_correction", "samples", "compare"):
        assert shared["bias_correction"][key] == own["bias_correction"][key], key


def test_auto_compares_on_fewer_samples_where_the_model_is_slow() -> None:
    """The candidates' comparison is bounded in time: as many samples as the float model ran in COMPARE_SECONDS
    during the calibration pass, between COMPARE_MIN_SAMPLES and COMPARE_SAMPLES."""
    from worker.engine.calibrate import SidePass

    def side(samples: int, seconds: float, done: bool = True) -> SidePass:
        return SidePass(onnx.ModelProto(), {}, samples=samples, seconds=seconds, done=done)

    assert conv_refine.compare_samples(side(32, 0.36)) == 22  # 11 ms a sample
    assert conv_refine.compare_samples(side(32, 0.72)) == 16  # basic-pitch: 22.5 ms a sample
    assert conv_refine.compare_samples(side(64, 0.05)) == conv_refine.COMPARE_SAMPLES
    assert conv_refine.compare_samples(side(32, 60.0)) == conv_refine.COMPARE_MIN_SAMPLES
    assert conv_refine.compare_samples(side(32, 0.72, done=False)) == conv_refine.COMPARE_SAMPLES
    assert conv_refine.compare_samples(None) == conv_refine.COMPARE_SAMPLES


def _qdq_scales(path: Path) -> dict[str, np.ndarray]:
    """Every activation QuantizeLinear's scale (those reading no initializer), by the tensor it quantizes."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: inits[n.input[1]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def _record_models(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[str]:
    """The file names of the models ``module.name`` (a pass over a model file, given first) runs on from now on."""
    seen: list[str] = []
    real = getattr(module, name)

    def recording(path: Path, *a: Any, **k: Any) -> Any:
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(module, name, recording)
    return seen


def test_an_equalized_candidate_takes_its_ranges_from_the_plain_pass(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With min/max calibration the equalized model is not calibrated again: its ranges follow from the plain
    pass (each chain tensor's per-channel min and max divided by its scales) and equal those of a pass of its
    own, up to float rounding; a cached calibration, whose pass did not run, still calibrates it."""
    model = skewed_chain(tmp_path / "m.onnx")
    calib, evals = _images(tmp_path / "c.npz", 64, 1), _images(tmp_path / "e.npz", 32, 2)
    passes = _record_models(monkeypatch, calibrate, "collect_stats")
    derived = _quantize(tmp_path, model, calib, evals, "derived", equalize="on", bias_correction="on")
    assert derived["equalization"]["enabled"] and derived["equalization"]["ranges_from"] == "plain_pass"
    assert "equalized.onnx" not in passes, passes  # one calibration pass, of the plain model
    passes.clear()
    monkeypatch.setattr(conv_refine, "plain_pass", lambda stats, side: None)
    own = _quantize(tmp_path, model, calib, evals, "own", equalize="on", bias_correction="on")
    assert own["equalization"]["ranges_from"] == "calibration" and "equalized.onnx" in passes, passes
    monkeypatch.undo()
    a, b = _qdq_scales(tmp_path / "work-derived" / "quantized-equalized.onnx"), \
        _qdq_scales(tmp_path / "work-own" / "quantized-equalized.onnx")
    assert a.keys() == b.keys() and len(a) >= 4
    # Measured: at most 1.7e-7 relative (float32 rounding of the rescaled channels).
    for t in a:
        assert np.allclose(a[t], b[t], rtol=1e-6, atol=0), (t, a[t], b[t])
    assert derived["accuracy"]["outputs"][0]["sqnr_db"] == pytest.approx(own["accuracy"]["outputs"][0]["sqnr_db"],
                                                                         abs=0.01)
    # A second job on the statistics cache: no pass ran, so nothing to derive from.
    cache = tmp_path / "stats-cache"
    for tag in ("cold", "warm"):
        cfg = QuantizeConfig(model_path=model, output_path=tmp_path / f"{tag}.onnx", recipe="int8_static",
                             options=parse_options("int8_static", {"equalize": "on", "bias_correction": "on"}),
                             calibration_path=calib, eval_path=evals, threads=1, device="cpu",
                             work_dir=tmp_path / f"work-{tag}", cache_dir=cache)
        report = run(cfg).report
        assert report["calibration"]["cache_used"] == (tag == "warm")
        assert report["equalization"]["ranges_from"] == ("calibration" if tag == "warm" else "plain_pass")


def test_an_equalized_candidates_bias_correction_takes_its_means_from_the_plain_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bias correction on the equalized model needs no pass of its own either: the plain pass measured every
    corrected layer's per-channel input mean, and on an equalized chain channel c's mean is divided by s_c. The
    corrected biases equal those from a means pass over the equalized model."""
    model = skewed_chain(tmp_path / "m.onnx")
    calib, evals = _images(tmp_path / "c.npz", 64, 1), _images(tmp_path / "e.npz", 32, 2)
    means_passes = _record_models(monkeypatch, bias_correction, "input_means")
    derived = _quantize(tmp_path, model, calib, evals, "derived", equalize="on", bias_correction="on")
    assert derived["equalization"]["enabled"] and derived["bias_correction"]["means_from"] == "plain_pass"
    assert means_passes == [], means_passes
    monkeypatch.setattr(conv_refine, "derived_means", lambda plain, scales: None)
    own = _quantize(tmp_path, model, calib, evals, "own", equalize="on", bias_correction="on")
    assert own["bias_correction"]["means_from"] == "means_pass" and means_passes == ["equalized.onnx"], means_passes
    monkeypatch.undo()

    def biases(tag: str) -> dict[str, np.ndarray]:
        m = onnx.load(str(tmp_path / f"work-{tag}" / "quantized-equalized-bc.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT32}

    a, b = biases("derived"), biases("own")
    assert a.keys() == b.keys() and len(a) >= 2
    # Measured: the 6 int32 biases identical (the whole file byte-identical).
    for name in a:
        assert np.abs(a[name].astype(np.int64) - b[name]).max() <= 1, name
    assert derived["bias_correction"]["mean_abs_correction"] == pytest.approx(
        own["bias_correction"]["mean_abs_correction"], rel=1e-4)


def _outputs(rows: list[np.ndarray]) -> list[list[Any]]:
    return [[r] for r in rows]


def test_per_sample_scores_split_each_batch_by_its_samples() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(4, 10)).astype(np.float32), rng.normal(size=(2, 10)).astype(np.float32)]
    noise = [np.full((4, 1), 0.1), np.full((2, 1), 0.01)]
    got = [(r + n * rng.normal(size=r.shape)).astype(np.float32) for r, n in zip(ref, noise, strict=True)]
    s = conv_refine.score_outputs(_outputs(ref), _outputs(got), [4, 2])
    assert s.log_nsr.shape == (6,)
    for k, (r, g) in enumerate(zip(np.concatenate(ref), np.concatenate(got), strict=True)):
        want = np.log10(np.sum((r.astype(np.float64) - g) ** 2) / np.sum(r.astype(np.float64) ** 2))
        assert s.log_nsr[k] == pytest.approx(want)
    assert s.sqnr_db == conv_refine.output_sqnr_db(_outputs(ref), _outputs(got))
    # An output whose first axis is not the batch's samples (a detector's boxes): the batch is one unit.
    boxes = conv_refine.score_outputs([[ref[0][:3]]], [[got[0][:3]]], [4])
    assert boxes.log_nsr.shape == (1,)
    # A sample with no signal has no ratio: NaN, and the gain is taken over the other samples.
    silent = [np.vstack([np.zeros((1, 10), np.float32), ref[0][1:]])]
    quiet = conv_refine.score_outputs(_outputs(silent), _outputs([got[0]]), [4])
    assert np.isnan(quiet.log_nsr[0]) and np.isfinite(quiet.log_nsr[1:]).all()
    assert conv_refine.gain(quiet, quiet).units == 3


def test_auto_keeps_a_step_only_where_it_gains_over_the_samples_consistently() -> None:
    """A pooled gain that two loud samples carry while the rest lose is not kept; the same pooled gain spread over
    every sample is. Both clear MIN_GAIN_DB pooled."""
    rng = np.random.default_rng(1)
    n = 32
    ref = [rng.normal(size=(n, 50)).astype(np.float32)]
    ref[0][:2] *= 30.0  # two loud samples dominate the pooled signal and noise
    base_noise = np.full((n, 1), 0.05)

    def with_noise(scale: np.ndarray) -> list[list[Any]]:
        return _outputs([(ref[0] + scale * rng.normal(size=ref[0].shape) * np.abs(ref[0]).mean(1, keepdims=True))
                         .astype(np.float32)])

    base = conv_refine.score_outputs(_outputs(ref), with_noise(base_noise), [n])
    uneven = base_noise.copy()
    uneven[:2] *= 0.3  # much better on the loud two...
    uneven[2:] *= 1.15  # ...a little worse on the other 30
    everywhere = base_noise * 0.8
    g_uneven = conv_refine.gain(base, conv_refine.score_outputs(_outputs(ref), with_noise(uneven), [n]))
    g_even = conv_refine.gain(base, conv_refine.score_outputs(_outputs(ref), with_noise(everywhere), [n]))
    assert g_uneven.after is not None and g_uneven.before is not None
    assert g_uneven.after >= g_uneven.before + conv_refine.MIN_GAIN_DB  # the pooled rule alone would keep it
    assert g_uneven.ci_db is not None and g_uneven.ci_db[0] <= 0 and not g_uneven.keeps
    assert "not consistent" in conv_refine.keep_reason(g_uneven)
    assert g_even.keeps and g_even.ci_db is not None and g_even.ci_db[0] > 0
    assert g_even.compare(n)["per_sample_gain_db"] == pytest.approx(g_even.mean_db, abs=1e-3)
    assert conv_refine.keep_reason(g_even).startswith("auto: output SQNR on the calibration samples")
