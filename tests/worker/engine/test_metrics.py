"""Known answers for every accuracy figure, on hand-built arrays, and through real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine import runtime
from worker.engine.feeds import Batch
from worker.engine.metrics import (
    LabelMetrics,
    OutputMetrics,
    ctc_collapse,
    infer_role,
    median,
    nearest_neighbours,
    percentile,
    resample_indices,
    resample_weights,
    row_medians,
    speedup_interval,
)
from worker.engine.validate import LATENCY_MIN_RUNS, compare, latency_pair


def metrics_of(ref: np.ndarray, q: np.ndarray, role: str | None = None, name: str = "y") -> dict:
    m = OutputMetrics(name)
    m.role, m.role_reason = (role, "test") if role else infer_role(name, ref, ref.shape[0], None)
    m.add(ref, q, ref.shape[0])
    return m.to_dict()


def test_orthogonal_outputs_have_cosine_zero_and_identical_ones_are_flagged() -> None:
    ref = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    d = metrics_of(ref, np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), role="other")
    assert d["cosine"] == 0.0
    same = metrics_of(ref, ref.copy(), role="other")
    assert same["cosine"] == 1.0 and same["identical"] is True and same["sqnr_db"] is None
    assert same["max_abs_error"] == 0.0


def test_sqnr_and_max_abs_error_known_answers() -> None:
    ref = np.ones((10, 10), np.float32)  # signal power 100
    q = ref + np.float32(0.1)  # noise power 100 * 0.01 = 1 -> 20 dB
    d = metrics_of(ref, q, role="other")
    assert d["sqnr_db"] == pytest.approx(20.0, abs=1e-3)
    assert d["max_abs_error"] == pytest.approx(0.1, abs=1e-6)
    assert d["identical"] is False
    # Every sample has the same error: the interval collapses onto the figure.
    lo, hi = d["sqnr_db_ci"]
    assert lo == pytest.approx(20.0, abs=1e-3) and hi == pytest.approx(20.0, abs=1e-3)


def test_an_all_zero_original_has_undefined_sqnr_not_identical() -> None:
    d = metrics_of(np.zeros((4, 3), np.float32), np.full((4, 3), 0.5, np.float32), role="other")
    assert d["sqnr_db"] is None and d["identical"] is False and "undefined" in d["sqnr_note"]
    assert d["cosine"] == 0.0


def test_four_class_classifier_gets_top1_and_label_accuracy() -> None:
    # [N, 4] used to be taken for boxes: with labels it is a 4-class classifier.
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 4)).astype(np.float32)
    q = ref.copy()
    flip = np.arange(10)  # the first 10 samples change their top class
    q[flip] = np.roll(ref[flip], 1, axis=1)
    labels = ref.argmax(1)
    role, why = infer_role("output", ref, 40, labels)
    assert role == "classification" and "labels" in why
    m = OutputMetrics("output", role=role)
    m.add(ref, q, 40)
    d = m.to_dict()
    expected = float(np.mean(ref.argmax(1) == q.argmax(1)))
    assert d["top1_agreement"] == pytest.approx(expected)
    lab = LabelMetrics("output")
    lab.add(ref, q, labels)
    ld = lab.to_dict()
    assert ld["original"] == 1.0
    assert ld["quantized"] == pytest.approx(expected)
    assert ld["delta"] == pytest.approx(expected - 1.0)
    lo, hi = ld["delta_ci"]
    assert lo <= ld["delta"] <= hi < 0


def test_embeddings_get_neighbour_agreement_not_top1() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((30, 64)).astype(np.float32)
    assert infer_role("sentence_embedding", ref, 30, None)[0] == "embedding"
    assert infer_role("y", ref, 30, None)[0] == "embedding"  # 64 values per sample, no hint
    small_noise = metrics_of(ref, ref + 1e-4 * rng.standard_normal(ref.shape).astype(np.float32), "embedding")
    assert small_noise["top1_agreement"] is None
    assert small_noise["neighbour_agreement"] == 1.0 and small_noise["neighbour_samples"] == 30
    shuffled = metrics_of(ref, rng.standard_normal(ref.shape).astype(np.float32), "embedding")
    ref_nn = nearest_neighbours(ref)
    assert shuffled["neighbour_agreement"] < 0.3
    assert sorted(set(ref_nn.tolist())) and all(ref_nn[i] != i for i in range(30))


def test_independent_scores_are_multilabel_with_f1_of_their_yes_elements() -> None:
    # Sigmoid scores in [0, 1] whose rows do not sum to 1 (notes sounding in a frame): each element is its own
    # yes/no, so top-1 and CTC agreement say nothing about them; softmax rows stay classification.
    n, t, c = 10, 6, 8
    ref = np.full((n, t, c), 0.1, np.float32)
    ref[:, :, 2] = 0.9  # one note sounds throughout: n * t yes elements
    ref[:, :3, 5] = 0.7  # another in the first half: n * 3 more
    role, why = infer_role("StatefulPartitionedCall:1", ref, n, None)
    assert role == "multilabel" and "do not sum to 1" in why
    assert infer_role("frames", ref[:, 0, :], n, None)[0] == "multilabel"  # [samples, classes] too
    softmax = np.full((n, t, c), 1.0 / c, np.float32)
    assert infer_role("y", softmax, n, None)[0] == "classification"
    assert infer_role("y", ref * 3.0, n, None)[0] == "classification"  # beyond [0, 1]: scores per step
    q = ref.copy()
    q[:5, :3, 5] = 0.4  # samples 0-4 lose the second note (15 of 90 yes elements missed)
    q[:2, 0, 7] = 0.6  # samples 0-1 gain a false one (2 extra)
    d = metrics_of(ref, q)
    # F1 = 2 * both / (2 * both + only quantized + only original): both = 90 - 15 = 75
    assert d["multilabel_f1"] == pytest.approx(2 * 75 / (2 * 75 + 2 + 15), abs=1e-6)
    lo, hi = d["multilabel_f1_ci"]
    assert lo < d["multilabel_f1"] < hi <= 1.0
    assert d["top1_agreement"] is None and d.get("sequence_agreement") is None
    # No yes anywhere in either model: nothing to disagree on.
    none = metrics_of(np.full((4, 3), 0.2, np.float32), np.full((4, 3), 0.3, np.float32), role="multilabel")
    assert none["multilabel_f1"] == 1.0


def test_rows_that_rise_are_regression_not_classes() -> None:
    # A quantile forecast [samples, steps, 9] rises along each row: its argmax is the last column almost
    # always, so a top-1 or CTC agreement would read ~100 % whatever the error (fracast's, before).
    rng = np.random.default_rng(3)
    base = rng.standard_normal((12, 10, 1)).astype(np.float32)
    quantiles = base + np.linspace(-1.0, 1.0, 9, dtype=np.float32)
    quantiles[0, 0, 4] = quantiles[0, 0, 3] - 0.01  # one crossing among 1,080 pairs
    role, why = infer_role("quantiles", quantiles, 12, None)
    assert role == "regression" and "rise along each row" in why
    assert infer_role("y", quantiles[:, 0, :], 12, None)[0] == "regression"  # [samples, 9] too
    d = metrics_of(quantiles, quantiles + 0.5)  # every value off by half a unit: no top class hides it
    assert d["top1_agreement"] is None and d.get("ctc_sequence_agreement") is None
    logits = rng.standard_normal((12, 10, 9)).astype(np.float32)
    assert infer_role("y", logits, 12, None)[0] == "classification"


def test_ctc_sequence_agreement_counts_decoded_strings_not_positions() -> None:
    assert ctc_collapse(np.array([0, 3, 3, 0, 0, 5, 5, 3])) == (3, 5, 3)
    n, t, c = 6, 8, 5
    ref = np.full((n, t, c), -5.0, np.float32)
    path = np.array([0, 3, 3, 0, 0, 2, 2, 0])
    ref[:, np.arange(t), path] = 5.0
    q = ref.copy()
    # Samples 0-2: a repeat stretched into a blank: per-position argmax differs, the text does not.
    q[:3, 2, 3], q[:3, 2, 0] = -5.0, 5.0
    # Samples 3-4: a character changes: the text changes.
    q[3:5, 5, 2], q[3:5, 5, 4] = -5.0, 5.0
    q[3:5, 6, 2], q[3:5, 6, 4] = -5.0, 5.0
    d = metrics_of(ref, q, role="classification")
    assert d["top1_agreement"] == pytest.approx(1 - (3 * 1 + 2 * 2) / (n * t))
    assert d["sequence_agreement"] == pytest.approx(1 / 6, abs=1e-6)
    assert d["ctc_sequence_agreement"] == pytest.approx(4 / 6, abs=1e-6)


def test_nonfinite_values_are_counted_and_left_out() -> None:
    ref = np.array([[1.0, -np.inf, 2.0]], np.float32)
    q = np.array([[1.0, -np.inf, np.nan]], np.float32)
    m = OutputMetrics("y", role="other")
    m.add(ref, q, 1)
    d = m.to_dict()
    assert m.ref_nonfinite == 1 and m.nonfinite == 1
    assert d["cosine"] == 1.0 and d["max_abs_error"] == 0.0


def test_intervals_hold_the_figure_are_reproducible_and_narrow_with_more_samples() -> None:
    rng = np.random.default_rng(2)

    def cos_ci(n: int) -> tuple[float, list[float]]:
        ref = rng.standard_normal((n, 16)).astype(np.float32)
        q = ref + 0.5 * rng.standard_normal((n, 16)).astype(np.float32)
        d = metrics_of(ref, q, "other")
        return d["cosine"], d["cosine_ci"]

    c1, ci1 = cos_ci(20)
    c2, ci2 = cos_ci(2000)
    assert ci1[0] <= c1 <= ci1[1] and ci2[0] <= c2 <= ci2[1]
    assert (ci2[1] - ci2[0]) < (ci1[1] - ci1[0]) / 3
    ref = np.arange(40, dtype=np.float32).reshape(20, 2)
    q = ref + np.float32(0.3) * np.sin(ref)
    assert metrics_of(ref, q, "other")["cosine_ci"] == metrics_of(ref, q, "other")["cosine_ci"]
    single = OutputMetrics("y", role="other")
    single.add(ref[:1], q[:1], 1)
    assert single.to_dict()["cosine_ci"] is None  # one sample: nothing to resample


def test_speedup_interval_separates_real_speedups_from_noise() -> None:
    rng = np.random.default_rng(3)
    o = 2.0 + 0.05 * rng.standard_normal(40)
    q = 1.0 + 0.05 * rng.standard_normal(40)
    d = speedup_interval(o.tolist(), q.tolist())
    assert d["speedup"] == pytest.approx(np.median(o) / np.median(q))
    lo, hi = d["speedup_ci"]
    assert 1.8 < lo <= d["speedup"] <= hi < 2.2 and d["measurable"] is True and d["runs"] == 40
    same = speedup_interval((1.0 + 0.05 * rng.standard_normal(40)).tolist(),
                            (1.0 + 0.05 * rng.standard_normal(40)).tolist())
    assert same["speedup_ci"][0] <= 1.0 <= same["speedup_ci"][1] and same["measurable"] is False


def _model(path, op: str, shape: list, const: float | None = None):
    nodes, inits = [], []
    if const is None:
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))
    else:
        inits.append(numpy_helper.from_array(np.array(const, np.float32), "c"))
        nodes.append(helper.make_node(op, ["x", "c"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return runtime.make_session(path, ["CPUExecutionProvider"], 1)


def test_compare_through_onnx_runtime_matches_a_hand_computation(tmp_path) -> None:
    ref_s = _model(tmp_path / "a.onnx", "Identity", ["n", 4])
    q_s = _model(tmp_path / "b.onnx", "Mul", ["n", 4], const=-1.0)  # flips every score's sign
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, 4)).astype(np.float32)
    labels = x.argmax(1)
    batches = [Batch(feed={"x": x[i:i + 8]}, start=i, count=8, labels=labels[i:i + 8]) for i in range(0, 24, 8)]
    acc = compare(ref_s, q_s, batches, ["y"], 24)
    o = acc.outputs[0]
    assert o["role"] == "classification" and o["role_source"] == "inferred"
    assert o["cosine"] == pytest.approx(-1.0)
    assert o["top1_agreement"] == pytest.approx(float(np.mean(x.argmax(1) == (-x).argmax(1))))
    assert acc.labels is not None and acc.labels["original"] == 1.0
    assert acc.labels["quantized"] == pytest.approx(float(np.mean((-x).argmax(1) == labels)))
    declared = compare(ref_s, q_s, batches, ["y"], 24, roles={"y": "regression"})
    d = declared.outputs[0]
    assert d["role"] == "regression" and d["role_source"] == "declared" and d["top1_agreement"] is None
    assert declared.labels is None and any("label accuracy was not computed" in w for w in declared.warnings)


def test_a_confident_target_is_met_only_when_the_interval_bound_meets_it() -> None:
    from worker.engine import target

    report = {"accuracy": {"outputs": [{"name": "y", "cosine": 0.995, "cosine_ci": [0.985, 0.998]}],
                           "labels": {"original": 0.9, "quantized": 0.89, "delta": -0.01,
                                      "quantized_ci": [0.85, 0.92], "delta_ci": [-0.03, 0.01]}}}
    point = target.measure({"metric": "cosine", "min": 0.99}, report)
    assert point["met"] is True
    sure = target.measure({"metric": "cosine", "min": 0.99, "confidence": 0.95}, report)
    assert sure["met"] is False and sure["bound"] == 0.985 and sure["value"] == 0.995
    assert target.measure({"metric": "cosine", "min": 0.98, "confidence": 0.95}, report)["met"] is True
    drop = {"metric": "label_accuracy", "max_drop": 0.02}
    assert target.measure(drop, report)["met"] is True
    assert target.measure({**drop, "confidence": 0.95}, report)["met"] is False  # the drop may be 3 pt
    assert target.measure({"metric": "label_accuracy", "max_drop": 0.031, "confidence": 0.95}, report)["met"] is True
    no_ci = {"accuracy": {"outputs": [{"name": "y", "cosine": 0.999, "cosine_ci": None}], "labels": None}}
    assert target.measure({"metric": "cosine", "min": 0.99, "confidence": 0.95}, no_ci)["met"] is False


def test_a_multilabel_f1_target_reads_the_worst_multilabel_output() -> None:
    from worker.engine import target

    report = {"accuracy": {"labels": None, "outputs": [
        {"name": "notes", "cosine": 0.987, "multilabel_f1": 0.933, "multilabel_f1_ci": [0.913, 0.955]},
        {"name": "onsets", "cosine": 0.981, "multilabel_f1": 0.844, "multilabel_f1_ci": [0.823, 0.865]},
        {"name": "contour", "cosine": 0.989}]}}  # an output without the figure does not count
    got = target.measure({"metric": "multilabel_f1", "min": 0.84}, report)
    assert got == {"value": 0.844, "original": 1.0, "met": True}
    assert target.measure({"metric": "multilabel_f1", "max_drop": 0.1}, report)["met"] is False  # 0.156 dropped
    sure = target.measure({"metric": "multilabel_f1", "min": 0.84, "confidence": 0.95}, report)
    assert sure["met"] is False and sure["bound"] == 0.823


def test_latency_timing_stops_at_its_budget_once_the_minimum_runs_are_done(tmp_path) -> None:
    """Runs stop early once LATENCY_MIN_RUNS pairs are done and the timed runs used the budget; with time to
    spare, every asked run is made, and fewer asked than the minimum are all made."""
    a = _model(tmp_path / "a.onnx", "Identity", ["n", 4])
    b = _model(tmp_path / "b.onnx", "Mul", ["n", 4], const=2.0)
    feed = {"x": np.ones((1, 4), np.float32)}
    assert latency_pair(a, b, feed, 30, budget_s=0.0)["runs"] == LATENCY_MIN_RUNS
    assert latency_pair(a, b, feed, 30, budget_s=60.0)["runs"] == 30
    assert latency_pair(a, b, feed, 4, budget_s=0.0)["runs"] == 4


def test_bootstrap_draws_are_uniform_reproducible_and_sum_to_the_sample_count() -> None:
    # The draws come from metrics.resample_indices (SplitMix64 over a counter), not numpy.random.
    a = resample_indices(7, (200, 350))
    assert a.shape == (200, 350) and a.min() == 0 and a.max() == 6
    assert np.array_equal(a, resample_indices(7, (200, 350)))  # the same seed, the same draws
    assert not np.array_equal(a, resample_indices(7, (200, 350), seed=1))
    counts = np.bincount(a.reshape(-1), minlength=7)
    chi2 = float(((counts - a.size / 7) ** 2 / (a.size / 7)).sum())
    # 6 degrees of freedom: 22.5 is the 0.999 quantile. Measured: 3.02.
    assert chi2 < 22.5, chi2
    w = resample_weights(12, reps=300)
    assert w.shape == (300, 12) and np.all(w.sum(axis=1) == 12)
    # Each sample's count over resamplings is Binomial(12, 1/12): mean 1, variance 0.917 (measured 0.949).
    assert abs(float(w.mean()) - 1.0) < 1e-12 and 0.8 < float(w.var(axis=0).mean()) < 1.05


def test_order_statistics_are_numpys_to_the_bit() -> None:
    # metrics.percentile / median / row_medians stand in for np.percentile and np.median (which import numpy.ma):
    # the same floats, NaN where numpy gives NaN.
    rng = np.random.default_rng(3)
    for n in (*range(1, 12), 31, 64, 1000):
        for kind in ("normal", "ties", "nan"):
            v = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)
            if kind == "ties":
                v = np.round(v, 1)
            if kind == "nan" and n > 1:
                v[rng.integers(0, n)] = np.nan
            for q in (0.0, 2.5, 25.0, 50.0, 97.5, 100.0, 100.0 / 3):
                assert np.array_equal(percentile(v, q), np.percentile(v, q), equal_nan=True), (n, kind, q)
            assert np.array_equal(median(v), np.median(v), equal_nan=True), (n, kind)
    rows = rng.standard_normal((50, 30))
    rows[7, 3] = np.nan
    for width in (1, 2, 7, 30):
        assert np.array_equal(row_medians(rows[:, :width]), np.median(rows[:, :width], axis=1), equal_nan=True)


def test_resample_weights_drawn_in_parts_are_the_draws_made_at_once() -> None:
    # resample_weights draws RESAMPLE_ROWS resamplings at a time (its temporaries stay small); the counts are
    # those of one draw of every index, row after row.
    for n, reps in ((12, 1000), (5, 130), (40, 64), (3, 1)):
        idx = resample_indices(n, (reps, n))
        whole = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
        assert np.array_equal(resample_weights(n, reps=reps), whole), (n, reps)
    a = resample_indices(9, (10, 9))
    assert np.array_equal(resample_indices(9, (3, 9), start=4 * 9), a[4:7])
