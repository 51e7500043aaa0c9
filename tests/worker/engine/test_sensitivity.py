"""Per-layer sensitivity: each layer quantized alone, ranked by what it does to the model's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from tests import builders
from worker.engine import pipeline, runtime
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.sensitivity import activation_qparams, analyse, fake_quant_weight, quantize_one
from worker.engine.validate import layer_sqnr

ALL = 1 << 30  # no bound on samples times passes


def test_static_report_ranks_the_planted_layers_first(tmp_path: Path) -> None:
    model = builders.planted_outlier_mlp(tmp_path / "p.onnx")
    data = builders.planted_data(tmp_path / "p.npz")
    # SmoothQuant (on by default where inputs have outlier channels) would make the planted layers quantize well.
    cfg = QuantizeConfig(model_path=model, output_path=tmp_path / "q.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"latency_runs": 2, "layer_sensitivity": True,
                                                               "smoothquant": "off"}),
                         calibration_path=data, threads=1, device="cpu")
    report = pipeline.run(cfg).report
    assert report["sensitivity"]["computed"] is True
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(report["sensitivity"]["ranking"][:2]) == set(builders.PLANTED_SENSITIVE)
    for name in builders.PLANTED_SENSITIVE:
        # Alone in int8, a planted layer loses most of the output; its own output is a few dB at best.
        assert layers[name]["sensitivity"] > 0.1
        assert layers[name]["isolated_sqnr_db"] < 10
    for name in ("fc1", "expand1", "head"):
        assert layers[name]["sensitivity"] < 1e-3
        assert layers[name]["isolated_sqnr_db"] > 30
    # Switched off by the run (auto's later candidates skip the cost), whatever the option says: the report
    # says it was not computed, and no layer carries a sensitivity.
    off = pipeline.run(QuantizeConfig(**{**cfg.__dict__, "layer_sensitivity": False})).report
    assert off["sensitivity"]["computed"] is False and "ranking" not in off["sensitivity"]
    assert all("sensitivity" not in layer for layer in off["layers"])


def test_static_sensitivity_is_opt_in(tmp_path: Path) -> None:
    """A default int8_static job does not pay for the analysis, and says so; the option turns it on."""
    model = builders.planted_outlier_mlp(tmp_path / "p.onnx")
    data = builders.planted_data(tmp_path / "p.npz")
    cfg = QuantizeConfig(model_path=model, output_path=tmp_path / "q.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"latency_runs": 2}), calibration_path=data,
                         threads=1, device="cpu")
    assert cfg.options.layer_sensitivity is False
    report = pipeline.run(cfg).report
    assert report["sensitivity"]["computed"] is False
    assert "layer_sensitivity: true" in report["sensitivity"]["note"]
    assert report["options"]["layer_sensitivity"] is False
    assert all("sensitivity" not in layer for layer in report["layers"])
    # The per-layer SQNR is still measured, and the report says on how many samples and passes.
    assert any(layer["sqnr_db"] is not None for layer in report["layers"])
    assert report["layer_sqnr"]["samples"] >= 1 and report["layer_sqnr"]["passes"] >= 1


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


def _conv_chain(path: Path, layers: int = 24, ch: int = 8, noise: float = 0.0, seed: int = 0) -> Path:
    """x [N, ch, 32, 32] through ``layers`` 1x1 convolutions, outputs c0..c{layers-1}; ``noise`` perturbs the
    weights (a stand-in for a quantized copy with the same tensor names)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        w = (np.eye(ch) + 0.1 * rng.standard_normal((ch, ch))).astype(np.float32)
        if noise:
            w = w + noise * np.random.default_rng(100 + i).standard_normal(w.shape).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w.reshape(ch, ch, 1, 1), f"w{i}"))
        nodes.append(onnx.helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        prev = f"c{i}"
    graph = onnx.helper.make_graph(
        nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", ch, 32, 32])],
        [onnx.helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, ["N", ch, 32, 32])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _fetch_spy(monkeypatch: Any) -> list[list[int]]:
    """Records the byte size of every array each model run hands back to Python."""
    fetched: list[list[int]] = []
    real = runtime.run

    def spy(session: Any, feed: dict[str, np.ndarray], what: str = "model",
            outputs: list[str] | None = None) -> list[Any]:
        out = real(session, feed, what, outputs)
        fetched.append([int(np.asarray(o).nbytes) for o in out])
        return out

    monkeypatch.setattr(runtime, "run", spy)
    return fetched


def _chain_pair(tmp_path: Path, layers: int, batch: int) -> tuple[Path, Path, onnx.ModelProto, onnx.ModelProto,
                                                                 list[tuple[dict[str, np.ndarray], int]],
                                                                 list[tuple[str, str]]]:
    """A conv chain and a noisy copy (the "quantized" one), three batches of ``batch`` inputs, every layer paired."""
    a_path = _conv_chain(tmp_path / "a.onnx", layers)
    b_path = _conv_chain(tmp_path / "b.onnx", layers, noise=0.02)
    rng = np.random.default_rng(0)
    feeds = [({"x": rng.standard_normal((batch, 8, 32, 32)).astype(np.float32)}, batch) for _ in range(3)]
    return (a_path, b_path, onnx.load(str(a_path)), onnx.load(str(b_path)), feeds,
            [(f"c{i}", f"c{i}") for i in range(layers)])


def test_layer_sqnr_fetches_a_bounded_group_of_activations_per_run(tmp_path: Path, monkeypatch: Any) -> None:
    a_path, b_path, a, b, feeds, pairs = _chain_pair(tmp_path, 12, 4)
    tensor = 4 * 8 * 32 * 32 * 4  # 128 kB: one layer's output for one batch
    whole = layer_sqnr(a_path, b_path, a, b, pairs, feeds, ["CPUExecutionProvider"], 1,
                       bytes_per_run=1 << 40, bytes_total=1 << 40, sample_passes=ALL)
    assert whole.passes == 1 and whole.samples == 12
    fetched = _fetch_spy(monkeypatch)
    budget = 4 * tensor  # both models' outputs of two layers per run
    bounded = layer_sqnr(a_path, b_path, a, b, pairs, feeds, ["CPUExecutionProvider"], 1,
                         bytes_per_run=budget, bytes_total=1 << 40, sample_passes=ALL)
    # Each run of either model fetched at most half the budget: two layers' outputs, nothing else.
    assert max(sum(run) for run in fetched) <= budget // 2
    assert bounded.passes == 6 and bounded.samples == 12
    assert len(fetched) == 2 * 6 * 3  # two models, 6 passes, 3 batches: no run was repeated
    # Streaming changes what is held, not what is measured.
    assert bounded.sqnr.keys() == whole.sqnr.keys()
    for p, v in whole.sqnr.items():
        assert v is not None and abs(v - (bounded.sqnr[p] or 0.0)) < 1e-6
    # Single samples joined back into batches (up to 4 a run here) where the budget allows: fewer runs, same SQNR.
    singles = [({"x": f["x"][k:k + 1]}, 1) for f, _ in feeds for k in range(4)]
    fetched.clear()
    merged = layer_sqnr(a_path, b_path, a, b, pairs, singles, ["CPUExecutionProvider"], 1, bytes_per_run=1 << 40,
                        bytes_total=1 << 40, merge=lambda fs: {"x": np.concatenate([f["x"] for f in fs])},
                        max_per_run=4, sample_passes=ALL)
    assert merged.samples == 12 and merged.passes == 1 and len(fetched) == 2 * 3
    for p, v in whole.sqnr.items():
        assert v is not None and abs(v - (merged.sqnr[p] or 0.0)) < 0.01
    # ...but never more per run than the byte budget allows: two samples of all 12 layers here.
    fetched.clear()
    layer_sqnr(a_path, b_path, a, b, pairs, singles, ["CPUExecutionProvider"], 1, bytes_per_run=12 * tensor,
               bytes_total=1 << 40, merge=lambda fs: {"x": np.concatenate([f["x"] for f in fs])}, max_per_run=4,
               sample_passes=ALL)
    assert len(fetched) == 2 * 6 and max(sum(run) for run in fetched) <= 6 * tensor
    # With a total budget of one batch's activations, only the first batch is analysed.
    fetched.clear()
    few = layer_sqnr(a_path, b_path, a, b, pairs, feeds, ["CPUExecutionProvider"], 1,
                     bytes_per_run=1 << 40, bytes_total=12 * tensor, sample_passes=ALL)
    assert few.samples == 4 and few.passes == 1 and len(fetched) == 2
    # The time bound: 6 passes planned, at most 8 sample-passes, so one batch of 4 samples (24 sample-passes
    # would be over); in one pass, two batches (8).
    fetched.clear()
    timed = layer_sqnr(a_path, b_path, a, b, pairs, feeds, ["CPUExecutionProvider"], 1, bytes_per_run=budget,
                       bytes_total=1 << 40, sample_passes=8)
    assert timed.passes == 6 and timed.samples == 4 and len(fetched) == 2 * 6
    one_pass = layer_sqnr(a_path, b_path, a, b, pairs, feeds, ["CPUExecutionProvider"], 1, bytes_per_run=1 << 40,
                          bytes_total=1 << 40, sample_passes=8)
    assert one_pass.passes == 1 and one_pass.samples == 8


def test_a_small_group_is_observed_one_session_at_a_time(tmp_path: Path, monkeypatch: Any) -> None:
    # Where the original model's outputs over all runs fit LAYER_SEQUENTIAL_BYTES, its session runs every batch and
    # is closed before the quantized model's opens (the two open together were a small model's job's peak); the
    # SQNR is the same as with both open.
    from worker.engine import calibrate, validate

    a_path, b_path, a, b, feeds, pairs = _chain_pair(tmp_path, 4, 2)
    events: list[str] = []
    real_session, real_run = calibrate.session_with, runtime.run

    class Closing:
        """A session that records when it is closed (garbage collected)."""

        def __init__(self, inner: Any, what: str) -> None:
            self.inner, self.what = inner, what

        def __del__(self) -> None:
            events.append(f"close {self.what}")

    def session_with(path: Path, *args: Any) -> Any:
        what = "original" if Path(path) == a_path else "quantized"
        events.append(f"open {what}")
        return Closing(real_session(path, *args), what)

    def run(session: Any, feed: dict[str, np.ndarray], what: str = "model", outputs: Any = None) -> list[Any]:
        events.append(f"run {session.what}")
        return real_run(session.inner, feed, what, outputs)

    monkeypatch.setattr(validate, "session_with", session_with)
    monkeypatch.setattr(runtime, "run", run)
    got = {}
    for mode, limit in (("sequential", 1 << 30), ("together", 0)):
        monkeypatch.setattr(validate, "LAYER_SEQUENTIAL_BYTES", limit)
        events.clear()
        got[mode] = layer_sqnr(a_path, b_path, a, b, pairs, feeds, ["CPUExecutionProvider"], 1,
                               bytes_per_run=1 << 40, bytes_total=1 << 40, sample_passes=ALL)
        if mode == "sequential":
            assert events == ["open original", *["run original"] * 3, "close original", "open quantized",
                              *["run quantized"] * 3, "close quantized"], events
        else:
            assert events[:2] == ["open original", "open quantized"], events
    assert got["sequential"].sqnr == got["together"].sqnr and len(got["sequential"].sqnr) == 4
    assert all(v is not None for v in got["sequential"].sqnr.values())


def test_sensitivity_keeps_no_intermediate_activations(tmp_path: Path, monkeypatch: Any) -> None:
    path = _conv_chain(tmp_path / "a.onnx", layers=12)
    model = onnx.load(str(path))
    feeds = [{"x": np.random.default_rng(s).standard_normal((2, 8, 32, 32)).astype(np.float32)} for s in range(2)]
    # Min/max ranges of every activation on these feeds, as calibration would give them.
    seen = onnx.ModelProto()
    seen.CopyFrom(model)
    seen.graph.output.extend(onnx.ValueInfoProto(name=f"c{i}") for i in range(11))
    sess = ort.InferenceSession(seen.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = [dict(zip(names, sess.run(None, f), strict=True)) for f in feeds]
    ranges = {t: (float(min(o[t].min() for o in outs)), float(max(o[t].max() for o in outs))) for t in names}
    ranges["x"] = (float(min(f["x"].min() for f in feeds)), float(max(f["x"].max() for f in feeds)))
    fetched = _fetch_spy(monkeypatch)
    res = analyse(model, ranges, feeds, ["CPUExecutionProvider"], 1, ["Conv"], 4, max_nodes=5)
    # Reference runs return the model's one output; each layer's run that output plus the layer's own output
    # and its float twin's: never every layer's activations.
    assert len(fetched) == 2 + 5 * 2
    assert [len(run) for run in fetched[:2]] == [1, 1]
    assert [len(run) for run in fetched[2:]] == [3] * 8 + [2] * 2  # conv11's output is the model's output
    # Five of twelve layers, spread over the graph (first and last included); the rest are counted as skipped.
    assert sorted(res.layers, key=lambda n: int(n[4:])) == ["conv0", "conv3", "conv6", "conv8", "conv11"]
    assert res.skipped == 7 and res.samples == 4
    for one in res.layers.values():
        # An int8 1x1 conv with min/max ranges: measured 1.2e-4 to 2.4e-4, own output 35.4 to 39.4 dB.
        assert one.sensitivity is not None and 5e-5 < one.sensitivity < 5e-4
        assert one.isolated_sqnr_db is not None and 33 < one.isolated_sqnr_db < 42
    # The last layer's output is the model's: its own error (against its float twin) is the output's error.
    assert res.layers["conv11"].isolated_sqnr_db == res.layers["conv11"].output_sqnr_db


def test_power_sums_leave_out_infinities_both_models_output_without_a_numpy_warning() -> None:
    """A mask both models output as -inf: inf - inf is NaN, which the sums leave out, quietly (numpy's
    RuntimeWarning about it was printed by lowbit quantize on fracast)."""
    import warnings

    from worker.engine.validate import power_sums

    ref = np.array([1.0, -np.inf, 2.0, np.inf], np.float32)
    got = np.array([1.5, -np.inf, 2.0, np.inf], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sig, err = power_sums(ref, got)
    assert sig == 5.0 and err == 0.25
