from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from worker.engine.calibrate import CalibrationSettings, calibrate, range_from_histogram, select_tensors
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

    def batches():  # type: ignore[no-untyped-def]
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
    assert results["minmax"].passes == 1 and results["entropy"].passes == 2
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
