from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from worker.engine.calibrate import (
    CalibrationSettings,
    StatsCache,
    TensorStats,
    calibrate,
    calibrate_with_ort,
    collect_stats,
    effective_ranges,
    minmax_samples_per_run,
    plan_observation,
    range_from_histogram,
    ranges_from_stats,
    select_tensors,
    split_feed,
    splittable,
    write_ort_ranges,
)
from worker.engine.feeds import iter_batches, plan_feeds
from worker.engine.inspect import inspect_model_file
from worker.engine.normalize import normalize
from worker.engine.npz import NpzReader, inspect_npz


def _hist(x: np.ndarray, bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = float(x.min()), float(x.max())
    a = max(abs(lo), abs(hi))
    rng = (0.0, hi) if lo >= 0 else (-a, a)
    h, e = np.histogram(x, bins=bins, range=rng)
    return h, e


@pytest.fixture(scope="module")
def outlier_data() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    x[:8] = rng.uniform(15, 30, 8)  # rare large outliers (0.004%), as real activations have
    return x


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_clip_outliers_that_minmax_keeps(outlier_data: np.ndarray, method: str) -> None:
    h, e = _hist(outlier_data)
    lo, hi = float(outlier_data.min()), float(outlier_data.max())
    r_lo, r_hi = range_from_histogram(h, e, method, 99.99, lo, hi)
    limit = 0.95 if method == "mse" else 0.6  # mse trades clipping against rounding, so clips less
    assert r_hi < limit * hi, f"{method} kept the outliers: {r_hi} vs max {hi}"
    # ...but keeps the bulk of the distribution (|x| < 2.5 sigma holds ~98.8% of it).
    assert r_hi > 2.5 and r_lo < -2.5
    assert r_lo >= lo and r_hi <= hi


def _fake_quant_mse(x: np.ndarray, lo: float, hi: float, levels: int = 255) -> float:
    scale = (hi - lo) / levels
    q = np.clip(np.round((x - lo) / scale), 0, levels) * scale + lo
    return float(np.mean((x - q) ** 2))


def test_mse_range_really_has_lower_quantization_error_than_minmax(outlier_data: np.ndarray) -> None:
    h, e = _hist(outlier_data)
    lo, hi = float(outlier_data.min()), float(outlier_data.max())
    m_lo, m_hi = range_from_histogram(h, e, "mse", 99.99, lo, hi)
    a = max(abs(lo), hi)
    assert _fake_quant_mse(outlier_data, m_lo, m_hi) < 0.8 * _fake_quant_mse(outlier_data, -a, a)


def test_methods_choose_different_ranges(outlier_data: np.ndarray) -> None:
    h, e = _hist(outlier_data)
    lo, hi = float(outlier_data.min()), float(outlier_data.max())
    his = {m: range_from_histogram(h, e, m, 99.99, lo, hi)[1] for m in ("percentile", "entropy", "mse")}
    his["minmax"] = hi
    assert len({round(v, 3) for v in his.values()}) == 4, his


def test_percentile_follows_its_parameter(outlier_data: np.ndarray) -> None:
    h, e = _hist(outlier_data)
    lo, hi = float(outlier_data.min()), float(outlier_data.max())
    r99 = range_from_histogram(h, e, "percentile", 99.0, lo, hi)[1]
    r9999 = range_from_histogram(h, e, "percentile", 99.99, lo, hi)[1]
    assert r99 < r9999
    # 99% two-sided: about 2.58 sigma for a standard normal.
    assert 2.3 < r99 < 2.9


def test_percentile_is_the_quantile_to_a_fraction_of_a_bin(outlier_data: np.ndarray) -> None:
    # Interpolated inside the bin, not snapped to an edge: far closer than one bin to the exact quantile.
    h, e = _hist(outlier_data)
    width = float(e[1] - e[0])
    lo, hi = range_from_histogram(h, e, "percentile", 99.9, float(outlier_data.min()), float(outlier_data.max()))
    assert abs(lo - float(np.quantile(outlier_data, 0.0005))) < 0.25 * width
    assert abs(hi - float(np.quantile(outlier_data, 0.9995))) < 0.25 * width


def test_entropy_is_not_dragged_down_by_the_zeros_of_a_relu() -> None:
    """Half the values of a ReLU output are exact zeros. Zero is exact at any threshold, so the
    threshold must follow the positive part (half-normal: 99.9% below ~3.3), not collapse."""
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal(400_000), 0.0)
    h, e = _hist(x)
    lo, hi = range_from_histogram(h, e, "entropy", 99.99, 0.0, float(x.max()))
    assert lo == 0.0 and 2.5 < hi <= float(x.max())


def test_non_negative_tensors_get_a_range_starting_at_zero() -> None:
    x = np.abs(np.random.default_rng(1).standard_normal(50_000))
    x[:5] = 40.0
    h, e = _hist(x)
    for m in ("percentile", "entropy", "mse"):
        lo, hi = range_from_histogram(h, e, m, 99.9, float(x.min()), float(x.max()))
        assert lo == 0.0 and 1.0 < hi < 40.0, (m, lo, hi)


def test_calibrating_a_real_model_with_each_method(zoo: dict[str, Path], tmp_path: Path) -> None:
    norm = normalize(zoo["conv"], tmp_path, per_channel=True)
    model = onnx.load(str(norm.path))
    tensors = select_tensors(model)
    assert "image" in tensors and len(tensors) >= 6
    info = inspect_model_file(zoo["conv"])
    data = inspect_npz(zoo["conv_data"])
    plan = plan_feeds(info.inputs, data, 8)
    reader = NpzReader(zoo["conv_data"], data)

    def batches():
        for b in iter_batches(reader, info.inputs, plan, 0, 40):
            yield b.feed, b.count

    results = {}
    seen_progress: list[float] = []
    for m in ("minmax", "percentile", "entropy", "mse"):
        results[m] = calibrate(norm.path, tensors, batches, CalibrationSettings(method=m), ["CPUExecutionProvider"],
                               1, progress=seen_progress.append, total_samples=40)
        assert results[m].samples == 40
        assert set(results[m].ranges) == set(tensors)
        assert all(lo < hi for lo, hi in results[m].ranges.values())
    assert results["minmax"].passes == 1 and results["entropy"].passes == 1
    assert seen_progress and max(seen_progress) == pytest.approx(1.0)
    mm = results["minmax"].ranges
    x = np.load(zoo["conv_data"])["image"][:40]
    assert mm["image"] == pytest.approx((float(x.min()), float(x.max())), rel=1e-6)
    for m in ("percentile", "entropy", "mse"):
        r = results[m].ranges
        # Histogram methods never widen the observed range (beyond including zero, which every int8
        # range contains anyway), and they do differ from min/max.
        assert all(r[t][0] >= min(mm[t][0], 0.0) - 1e-6 and r[t][1] <= mm[t][1] + 1e-6 for t in tensors)
        assert any(abs(r[t][1] - mm[t][1]) > 1e-3 * abs(mm[t][1]) for t in tensors), m
    assert results["entropy"].ranges != results["percentile"].ranges != results["mse"].ranges


def test_adaptive_histogram_grows_without_losing_counts() -> None:
    rng = np.random.default_rng(2)
    st = TensorStats(2048, with_hist=True)
    parts = [np.abs(rng.standard_normal(5000)), rng.standard_normal(5000) * 4, rng.standard_normal(5000) * 30]
    for p in parts:  # non-negative first, then signed, then a much wider range
        st.update(p.astype(np.float32))
    full = np.concatenate(parts)
    assert st.signed and st.a >= np.abs(full).max()
    assert st.hist is not None and st.hist.sum() == full.size
    assert st.lo == pytest.approx(full.min()) and st.hi == pytest.approx(full.max())
    # The histogram's mass sits where the data is: compare cumulative shares at a few points.
    edges = st.edges()
    cdf = np.cumsum(st.hist) / full.size
    width = edges[1] - edges[0]
    for v in (-20.0, -3.0, 0.0, 3.0, 20.0):
        i = int(np.searchsorted(edges, v)) - 1
        assert cdf[i] == pytest.approx(np.mean(full <= edges[i + 1]), abs=1e-9)
        assert abs(edges[i + 1] - v) <= width


def _conv_batches(zoo: dict[str, Path], stop: int = 40):
    info = inspect_model_file(zoo["conv"])
    data = inspect_npz(zoo["conv_data"])
    plan = plan_feeds(info.inputs, data, 8)
    reader = NpzReader(zoo["conv_data"], data)

    def batches():
        for b in iter_batches(reader, info.inputs, plan, 0, stop):
            yield b.feed, b.count

    return batches


@pytest.fixture(scope="module")
def conv_prepared(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    norm = normalize(zoo["conv"], tmp_path_factory.mktemp("norm"), per_channel=True)
    return norm.path, select_tensors(onnx.load(str(norm.path)))


def test_cache_serves_another_method_without_running_the_model(
    zoo: dict[str, Path], conv_prepared: tuple[Path, list[str]], tmp_path: Path
) -> None:
    path, tensors = conv_prepared
    cache = StatsCache(tmp_path / "cache")
    key: dict[str, object] = {"model": "m", "data": "d", "range": [0, 40]}
    cpu = ["CPUExecutionProvider"]
    first = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("entropy"), cpu, 1,
                      total_samples=40, cache=cache, cache_key=key)
    assert not first.cache_used and first.passes == 1

    def exploding():
        raise AssertionError("the model ran although the statistics were cached")

    second = calibrate(path, tensors, exploding, CalibrationSettings("percentile"), cpu, 1,
                       total_samples=40, cache=cache, cache_key=key)
    assert second.cache_used and second.passes == 0
    fresh = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("percentile"), cpu, 1)
    assert second.ranges == fresh.ranges
    # A subset of the tensors (another op-type selection) is served from the same entry.
    third = calibrate(path, tensors[:3], exploding, CalibrationSettings("mse"), cpu, 1, total_samples=40,
                      cache=cache, cache_key=key)
    assert third.cache_used and set(third.ranges) == set(tensors[:3])
    # Other data is another key: a miss.
    miss = calibrate(path, tensors, _conv_batches(zoo, 32), CalibrationSettings("mse"), cpu, 1,
                     cache=cache, cache_key={**key, "range": [0, 32]})
    assert not miss.cache_used


def test_wide_models_are_observed_in_groups_with_the_same_result(
    zoo: dict[str, Path], conv_prepared: tuple[Path, list[str]]
) -> None:
    path, tensors = conv_prepared
    cpu = ["CPUExecutionProvider"]
    whole = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("entropy"), cpu, 1)
    grouped = calibrate(path, tensors, _conv_batches(zoo),
                        CalibrationSettings("entropy", max_bytes_per_run=200_000), cpu, 1)
    assert grouped.passes > 1 and whole.passes == 1
    assert set(grouped.ranges) == set(whole.ranges)
    for t, r in whole.ranges.items():
        assert grouped.ranges[t] == pytest.approx(r), t


def test_minmax_ranges_equal_onnxruntimes(
    zoo: dict[str, Path], conv_prepared: tuple[Path, list[str]], tmp_path: Path
) -> None:
    path, tensors = conv_prepared
    cpu = ["CPUExecutionProvider"]
    ours = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("minmax"), cpu, 1)
    theirs = calibrate_with_ort(path, _conv_batches(zoo), CalibrationSettings("minmax"), cpu, tmp_path)
    assert theirs.calibrator == "ort" and theirs.samples == ours.samples == 40
    model = onnx.load(str(path))
    # Compared as the quantizer uses them (it gives a Relu's input the Relu's output range itself).
    mine, ort = effective_ranges(model, ours.ranges), effective_ranges(model, theirs.ranges)
    common = set(mine) & set(ort)
    assert len(common) >= len(tensors) - 1
    for t in common:
        assert mine[t] == pytest.approx(ort[t], rel=1e-6, abs=1e-7), t


def test_minmax_runs_a_large_batch_in_parts_with_the_same_ranges(
    zoo: dict[str, Path], conv_prepared: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose observed activations exceed the per-run bound runs in parts (ONNX Runtime keeps observed
    activations alive until their reductions run); min and max over the parts are the batch's."""
    import worker.engine.calibrate as cal
    from worker.engine import runtime

    path, tensors = conv_prepared
    cpu = ["CPUExecutionProvider"]
    model = onnx.load(str(path))
    feed, n = next(iter(_conv_batches(zoo)()))
    assert n > 1 and splittable(model, feed, n)
    whole = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("minmax"), cpu, 1)
    assert minmax_samples_per_run(model, feed, n, tensors) == n  # the test net's activations fit one run
    runs: list[int] = []
    real_run = runtime.run

    def counting_run(s: Any, f: dict[str, np.ndarray], *a: Any) -> Any:
        runs.append(next(iter(f.values())).shape[0])
        return real_run(s, f, *a)

    monkeypatch.setattr(cal, "MINMAX_BYTES_PER_RUN", 1)  # below one sample: one sample a run
    monkeypatch.setattr(runtime, "run", counting_run)
    parts = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("minmax"), cpu, 1)
    assert runs and set(runs) == {1} and parts.samples == whole.samples
    assert parts.ranges == whole.ranges


def test_a_feed_is_cut_only_on_a_dynamic_batch_axis() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    fixed = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    relu = onnx.helper.make_node("Relu", ["x"], ["y"])
    dynamic_m = onnx.helper.make_model(onnx.helper.make_graph([relu], "g", [x], [y]))
    fixed_m = onnx.helper.make_model(onnx.helper.make_graph([relu], "g", [fixed], [y]))
    feed = {"x": np.arange(32, dtype=np.float32).reshape(8, 4)}
    assert splittable(dynamic_m, feed, 8)
    assert not splittable(fixed_m, feed, 8)
    assert not splittable(dynamic_m, feed, 4)  # the feed does not hold 4 samples on its first axis
    parts = list(split_feed(feed, 8, 3))
    assert [p["x"].shape[0] for p in parts] == [3, 3, 2]
    assert np.array_equal(np.concatenate([p["x"] for p in parts]), feed["x"])
    assert list(split_feed(feed, 8, 8)) == [feed]


def test_onnxruntimes_default_entropy_is_just_minmax_and_ours_is_not(
    zoo: dict[str, Path], conv_prepared: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Why lowbit has its own calibrator: ORT's entropy (128 bins, 128 quantized bins) has one
    candidate threshold and returns the full range."""
    path, tensors = conv_prepared
    cpu = ["CPUExecutionProvider"]
    mm = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("minmax"), cpu, 1).ranges
    ort_ent = calibrate_with_ort(path, _conv_batches(zoo), CalibrationSettings("entropy"), cpu, tmp_path).ranges
    ours = calibrate(path, tensors, _conv_batches(zoo), CalibrationSettings("entropy"), cpu, 1).ranges
    common = sorted(set(mm) & set(ort_ent))
    same_as_minmax = [t for t in common if ort_ent[t][1] == pytest.approx(max(abs(mm[t][0]), abs(mm[t][1])), rel=1e-3)]
    assert len(same_as_minmax) >= len(common) // 2
    # Counted per physical tensor (a Conv output and the Relu reading it share one range in the quantized
    # model): on these 40 random images ours clips 1 of the 6 (/3/Conv -> /4/Relu, 1.138 -> 0.919), ORT's
    # entropy none.
    ours_clipped = {mm[t] for t in common if ours[t][1] < mm[t][1] * 0.99}
    theirs_clipped = {mm[t] for t in common if ort_ent[t][1] < mm[t][1] * 0.99}
    assert len(ours_clipped) >= 1 and not theirs_clipped


def test_all_zero_first_batches_do_not_collapse_the_histogram() -> None:
    rng = np.random.default_rng(5)
    st = TensorStats(2048, with_hist=True)
    st.update(np.zeros(1000, np.float32))  # e.g. a blank first sample
    later = [np.abs(rng.standard_normal(20_000) * 5).astype(np.float32) for _ in range(2)]
    for x in later:
        st.update(x)
    assert st.hist is not None and st.hist.sum() == 1000 + 40_000
    lo, hi = range_from_histogram(st.hist, st.edges(), "percentile", 99.9, st.lo, st.hi)
    # 99.9 % kept centrally: 0.05 % cut from the top (the bottom cut falls in the zeros).
    truth = float(np.quantile(np.concatenate([np.zeros(1000), *later]), 0.9995))
    assert lo == 0.0 and hi == pytest.approx(truth, rel=0.05)


def test_a_range_jump_larger_than_the_bin_count_keeps_every_count() -> None:
    st = TensorStats(2048, with_hist=True)
    st.update(np.full(100, 1e-6, np.float32))
    st.update(np.array([-50.0, 10.0], np.float32))  # grows ~10^7 times and turns signed
    assert st.signed and st.a >= 50 and st.hist is not None and st.hist.sum() == 102


def test_the_plan_skips_tensors_whose_range_follows_from_others(zoo: dict[str, Path], tmp_path: Path) -> None:
    conv = onnx.load(str(normalize(zoo["conv"], tmp_path / "c", per_channel=True).path))
    tensors = select_tensors(conv)
    plan = plan_observation(conv, tensors)
    relus = [n for n in conv.graph.node if n.op_type == "Relu"]
    assert relus and all(plan.same[n.input[0]] == n.output[0] for n in relus)
    assert len(plan.observe) == len(tensors) - len(plan.same) - len(plan.fixed)
    tf = onnx.load(str(normalize(zoo["tf"], tmp_path / "t", per_channel=True).path))
    tensors = select_tensors(tf)
    plan = plan_observation(tf, tensors, op_types=["MatMul", "Softmax", "Reshape", "Transpose"])
    softmax = [n.output[0] for n in tf.graph.node if n.op_type == "Softmax"]
    assert softmax and all(plan.fixed[t] == (0.0, 1.0) for t in softmax)
    moved = [n for n in tf.graph.node if n.op_type in ("Reshape", "Transpose") and n.output[0] in tensors
             and n.input[0] in tensors]
    assert moved and all(plan.same[n.output[0]] not in plan.same for n in moved)
    assert len(plan.observe) < len(tensors)
    # Excluding a Softmax from quantization means its output range is measured after all.
    # So does quantizing only other op types, as by default (the quantizer then keeps the measured range).
    assert softmax[0] in plan_observation(tf, tensors, op_types=["MatMul"]).observe
    assert softmax[0] in plan_observation(tf, tensors).observe
    assert softmax[0] in plan_observation(tf, tensors, op_types=["Softmax"], excluded_nodes=[
        n.name for n in tf.graph.node if n.op_type == "Softmax"]).observe


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_skipping_tensors_changes_nothing_in_the_quantized_model(zoo: dict[str, Path], tmp_path: Path,
                                                                 method: str) -> None:
    from worker.engine.config import RecipeOptions
    from worker.engine.ort_quant import quantize_static

    path = normalize(zoo["conv"], tmp_path / "n", per_channel=True).path
    tensors = select_tensors(onnx.load(str(path)))
    cpu = ["CPUExecutionProvider"]
    settings = CalibrationSettings(method)
    planned = calibrate(path, tensors, _conv_batches(zoo), settings, cpu, 1)
    assert planned.observed < len(tensors)
    stats, _, _ = collect_stats(path, tensors, _conv_batches(zoo), settings, cpu, 1)  # every tensor observed
    full = ranges_from_stats(stats, settings)
    assert set(full) == set(planned.ranges)
    outputs = []
    for name, ranges in (("planned", planned.ranges), ("full", full)):
        write_ort_ranges(ranges, tmp_path / f"{name}.json")
        quantize_static(path, tmp_path / f"{name}.onnx", tmp_path / f"{name}.json", RecipeOptions())
        m = onnx.load(str(tmp_path / f"{name}.onnx"))
        outputs.append({t.name: onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer})
    assert outputs[0] == outputs[1]  # every scale and zero point the same


def _shifted_relu(tmp_path: Path, op: str = "Relu") -> tuple[Path, onnx.ModelProto, Any]:
    """x + 4, Relu, MatMul: almost every Relu output is positive, so its measured minimum is well above 0.
    With ``op`` Sigmoid or Softmax in the Relu's place, every output is."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    four = numpy_helper.from_array(np.full((16,), 4.0, np.float32), "four")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "four"], ["shifted"], name="add"),
         helper.make_node(op, ["shifted"], ["act"], name="act"),
         helper.make_node("MatMul", ["act", "w"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w, four],
        value_info=[helper.make_tensor_value_info(t, TensorProto.FLOAT, ["n", 16]) for t in ("shifted", "act")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((2048, 16)).astype(np.float32)

    def batches():
        for i in range(0, 2048, 256):
            yield {"x": x[i:i + 256]}, 256

    return path, model, batches


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Softmax"])
def test_minmax_reads_only_the_maximum_of_a_nonnegative_output(tmp_path: Path, op: str) -> None:
    # The quantizer widens every range to include 0, so lowbit skips a Relu output's ReduceMin (taking 0)
    # and the quantized model must come out byte for byte the same as with ONNX Runtime's ranges.
    from worker.engine.calibrate import minmax_delta
    from worker.engine.config import RecipeOptions
    from worker.engine.ort_quant import quantize_static

    path, model, batches = _shifted_relu(tmp_path, op)
    delta, pairs = minmax_delta(model, ["x", "act"])
    assert pairs["act"][0] == "" and pairs["x"][0]  # only the non-negative output skips its minimum
    reduce_ops = [n.op_type for n in delta.graph.node if n.op_type.startswith("Reduce")]
    assert sorted(reduce_ops) == ["ReduceMax", "ReduceMax", "ReduceMin"]

    cpu = ["CPUExecutionProvider"]
    tensors = select_tensors(model)
    assert {"x", "shifted", "act"} <= set(tensors)
    ours = calibrate(path, tensors, batches, CalibrationSettings("minmax"), cpu, 1)
    theirs = calibrate_with_ort(path, batches, CalibrationSettings("minmax"), cpu, tmp_path / "ort")
    assert ours.ranges["act"][0] == 0.0 and theirs.ranges["act"][0] > (0.1 if op == "Relu" else 0.0)
    assert ours.ranges["act"][1] == pytest.approx(theirs.ranges["act"][1], rel=1e-6)
    initializers = []
    for name, ranges in (("ours", ours.ranges), ("theirs", theirs.ranges)):
        write_ort_ranges(ranges, tmp_path / f"{name}.json")
        quantize_static(path, tmp_path / f"{name}.onnx", tmp_path / f"{name}.json", RecipeOptions())
        m = onnx.load(str(tmp_path / f"{name}.onnx"))
        initializers.append({t.name: t.SerializeToString() for t in m.graph.initializer})
    assert any("act" in k and k.endswith("_scale") for k in initializers[0])
    assert initializers[0] == initializers[1]


def test_percentile_keeps_the_central_share_as_onnxruntimes_does(tmp_path: Path) -> None:
    # 99 % kept centrally: 0.5 % cut from each end. For the non-negative Relu output the bottom cut falls
    # below its minimum, so only the top 0.5 % goes, as in ONNX Runtime's percentile calibrator.
    path, model, batches = _shifted_relu(tmp_path)
    settings = CalibrationSettings("percentile", percentile=99.0)
    cpu = ["CPUExecutionProvider"]
    ours = calibrate(path, select_tensors(model), batches, settings, cpu, 1)
    theirs = calibrate_with_ort(path, batches, settings, cpu, tmp_path / "ort")
    x = np.concatenate([f["x"] for f, _ in batches()])
    act = np.maximum(x + 4.0, 0.0)
    assert ours.ranges["act"][0] == 0.0
    top = float(np.quantile(act, 0.995))
    width = float(act.max()) / 1024  # ONNX Runtime's bins: 2048 over [-max, max]
    assert abs(ours.ranges["act"][1] - top) < 2 * width
    assert abs(ours.ranges["act"][1] - float(theirs.ranges["act"][1])) < 2 * width


def test_effective_ranges_fix_softmax_only_where_the_quantizer_quantizes_it() -> None:
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="r"), helper.make_node("Softmax", ["h"], ["p"], name="sm"),
         helper.make_node("Identity", ["p"], ["y"], name="i")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(g)
    raw = {"x": (-3.0, 2.0), "h": (0.0, 2.0), "p": (0.01, 0.7), "y": (0.01, 0.7)}
    assert effective_ranges(model, raw)["p"] == (0.0, 1.0)  # ORT's default op types include Softmax
    assert effective_ranges(model, raw, op_types=["MatMul", "Relu"])["p"] == (0.0, 0.7)
    assert effective_ranges(model, raw, nodes_to_exclude=["sm"])["p"] == (0.0, 0.7)
    # The same rule holds for the Relu input adjustment.
    assert effective_ranges(model, raw)["x"] == (0.0, 2.0)
    assert effective_ranges(model, raw, nodes_to_exclude=["r"])["x"] == (-3.0, 2.0)


def test_subset_step_is_a_prime_that_cannot_alias_with_a_dimension() -> None:
    from worker.engine.calibrate import HIST_SUBSET, subset_step

    assert subset_step([8, 16]) == 1  # small enough to histogram whole
    for shape in ([8, 128, 384], [8, 12, 128, 128], [8, 64, 320, 320], [1, 1536, 1536]):
        step = subset_step(shape)
        size = int(np.prod(shape))
        assert step >= size / HIST_SUBSET and all(step % k for k in range(2, int(step ** 0.5) + 1))
        assert all(d % step for d in shape[1:])  # a strided pick visits every channel and position
    assert subset_step([8, 128, 384]) == 5  # 3 divides 384, so not 3


def test_histogram_pass_fetches_a_bounded_subset_with_exact_extremes(tmp_path: Path, monkeypatch: Any) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from worker.engine import runtime
    from worker.engine.calibrate import HIST_SUBSET

    rng = np.random.default_rng(7)
    w = numpy_helper.from_array((np.eye(16) + 0.1 * rng.standard_normal((16, 16))).astype(np.float32).reshape(
        16, 16, 1, 1), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 64, 64])], [w])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    xs = [rng.standard_normal((8, 16, 64, 64)).astype(np.float32) for _ in range(4)]  # 524k values a batch
    fetched: list[int] = []
    real = runtime.run

    def spy(session: Any, feed: dict[str, np.ndarray], what: str = "model",
            outputs: list[str] | None = None) -> list[Any]:
        out = real(session, feed, what, outputs)
        fetched.extend(int(np.asarray(o).size) for o in out)
        return out

    monkeypatch.setattr(runtime, "run", spy)
    settings = CalibrationSettings("percentile", percentile=99.9)
    stats, samples, passes = collect_stats(path, ["x", "y"], lambda: (({"x": x}, 8) for x in xs), settings,
                                           ["CPUExecutionProvider"], 1)
    assert samples == 32 and passes == 1
    # Nothing the size of an activation crossed into Python: a strided subset of each (every 5th value).
    assert max(fetched) <= HIST_SUBSET and max(fetched) == -(-8 * 16 * 64 * 64 // 5)
    every = np.concatenate([x.ravel() for x in xs])
    st = stats["x"]
    assert st.lo == float(every.min()) and st.hi == float(every.max())  # reduced in full by ONNX Runtime
    assert st.hist is not None and abs(int(st.hist.sum()) - every.size) <= 4 * 5  # counts weigh for the whole
    lo, hi = ranges_from_stats(stats, settings)["x"]
    # The central 99.9 % of the subset's histogram against the full data's exact quantiles: measured 0.33 %
    # (top) and 0.03 % (bottom) off; the 0.05 % tails are ~210 of the 420k subset values.
    assert hi == pytest.approx(float(np.quantile(every, 0.9995)), rel=0.01)
    assert lo == pytest.approx(float(np.quantile(every, 0.0005)), rel=0.01)


def test_tensors_only_skipped_nodes_touch_are_not_observed() -> None:
    from onnx import TensorProto, helper

    c = onnx.numpy_helper.from_array(np.full((4,), 2.0, np.float32), "c")
    nodes = [helper.make_node("Mul", ["x", "c"], ["y"], name="a"),
             helper.make_node("Add", ["y", "c"], ["z"], name="b"),
             helper.make_node("Mul", ["z", "c"], ["out"], name="d")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], [c])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert select_tensors(model) == ["x", "y", "z", "out"]
    # y and z are still read or written by a node that is quantized.
    assert select_tensors(model, skip_nodes={"b"}) == ["x", "y", "z", "out"]
    assert select_tensors(model, skip_nodes={"b", "d"}) == ["x", "y"]
