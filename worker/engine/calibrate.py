"""lowbit's own streaming calibrator.

ONNX Runtime's histogram calibrators keep every intermediate activation of every sample in memory
before building histograms, and its entropy calibrator with default settings (128 bins, 128
quantized bins) has a single candidate threshold, so it returns the min/max range. This calibrator
streams batches and keeps only per-tensor statistics, in two passes:

1. running min / max of every observed tensor (this is all ``minmax`` needs);
2. a fixed-range histogram per tensor (``NUM_BINS`` bins over [0, max] for non-negative tensors,
   over [-absmax, absmax] otherwise), from which ``percentile``, ``entropy`` and ``mse`` pick a range.

Memory is O(tensors x bins), independent of the number of samples. The ranges are handed to ONNX
Runtime's QDQ quantizer, which still rewrites the graph.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from worker.engine import runtime

NUM_BINS = 2048
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}

Progress = Callable[[float], None]


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "minmax"
    percentile: float = 99.99
    symmetric: bool = False
    num_bins: int = NUM_BINS


@dataclass
class CalibrationResult:
    method: str
    ranges: dict[str, tuple[float, float]]
    samples: int
    seconds: float
    tensors: int
    passes: int
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)


def quantizable_op_types() -> set[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def select_tensors(model: onnx.ModelProto, op_types: Iterable[str] | None = None) -> list[str]:
    """Float inputs and outputs of the nodes the quantizer may quantize (never initializers)."""
    wanted = set(op_types) if op_types else quantizable_op_types()
    vis = {vi.name: vi for vi in model.graph.value_info}
    vis.update({vi.name: vi for vi in model.graph.output})
    vis.update({vi.name: vi for vi in model.graph.input})
    inits = {t.name for t in model.graph.initializer}
    out: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in wanted:
            continue
        for name in itertools.chain(node.input, node.output):
            if not name or name in seen or name in inits or name not in vis:
                continue
            tt = vis[name].type.tensor_type
            if vis[name].type.HasField("tensor_type") and tt.elem_type in FLOAT_TYPES:
                out.append(name)
                seen.add(name)
    return out


def augment(model: onnx.ModelProto, tensors: list[str]) -> bytes:
    """The model with every observed tensor exposed as a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    vis = {vi.name: vi for vi in m.graph.value_info}
    vis.update({vi.name: vi for vi in m.graph.input})
    present = {o.name for o in m.graph.output}
    for name in tensors:
        if name not in present:
            m.graph.output.append(vis[name])
    return m.SerializeToString()


def _hist_range(lo: float, hi: float) -> tuple[float, float]:
    if lo >= 0.0:
        return 0.0, max(hi, 1e-12)
    a = max(abs(lo), abs(hi), 1e-12)
    return -a, a


def range_from_histogram(
    hist: np.ndarray, edges: np.ndarray, method: str, percentile: float, lo: float, hi: float
) -> tuple[float, float]:
    """Pick a quantization range for one tensor from its histogram."""
    total = float(hist.sum())
    if total <= 0:
        return lo, hi
    nonneg = edges[0] >= 0.0
    if method == "percentile":
        cdf = np.cumsum(hist) / total
        if nonneg:
            idx = int(np.searchsorted(cdf, percentile / 100.0))
            return 0.0, float(min(edges[min(idx + 1, len(edges) - 1)], hi))
        tail = (100.0 - percentile) / 200.0
        i_lo = int(np.searchsorted(cdf, tail))
        i_hi = int(np.searchsorted(cdf, 1.0 - tail))
        return float(max(edges[i_lo], lo)), float(min(edges[min(i_hi + 1, len(edges) - 1)], hi))
    # entropy and mse work on the magnitude histogram.
    if nonneg:
        mag, width, levels = hist.astype(np.float64), float(edges[1] - edges[0]), 255
    else:
        half = len(hist) // 2
        mag = hist[half:].astype(np.float64) + hist[:half][::-1].astype(np.float64)
        width, levels = float(edges[1] - edges[0]), 127
    if method == "entropy":
        t = _entropy_threshold(mag, levels) * width
    elif method == "mse":
        t = _mse_threshold(mag, width, levels)
    else:
        raise ValueError(method)
    if nonneg:
        return 0.0, float(min(t, hi))
    return float(max(-t, lo)), float(min(t, hi))


def _entropy_threshold(mag: np.ndarray, levels: int) -> int:
    """Number of magnitude bins to keep that minimises KL(P || Q) (P: clipped reference
    distribution, Q: its quantization to ``levels`` buckets). Returns a bin count."""
    n = len(mag)
    nq = min(levels + 1, n)
    best_i, best_kl = n, np.inf
    step = max(1, (n - nq) // 256)
    for i in range(nq, n + 1, step):
        p = mag[:i].copy()
        p[i - 1] += mag[i:].sum()  # the clipped outliers land in the last kept bin
        if p.sum() == 0:
            continue
        group = (np.arange(i) * nq) // i
        nz = mag[:i] > 0
        gsum = np.bincount(group, weights=mag[:i], minlength=nq)
        gcnt = np.bincount(group, weights=nz.astype(np.float64), minlength=nq)
        q = np.where(nz, gsum[group] / np.maximum(gcnt[group], 1.0), 0.0)
        ps = p / p.sum()
        qs_total = q.sum()
        if qs_total == 0:
            continue
        qs = q / qs_total
        mask = ps > 0
        # Smooth Q where P has mass and Q has none, so the divergence stays finite.
        qv = np.where(qs[mask] > 0, qs[mask], 1e-10)
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / qv)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def _mse_threshold(mag: np.ndarray, width: float, levels: int) -> float:
    """Threshold minimising expected squared error: rounding error step^2/12 inside the range plus
    clipping error outside it, evaluated for candidate thresholds at the bin edges."""
    n = len(mag)
    centers = (np.arange(n) + 0.5) * width
    cands = np.unique(np.linspace(max(1, n // 64), n, 256).astype(int)) * width
    step = cands / levels
    clip = np.maximum(centers[None, :] - cands[:, None], 0.0)
    inside = centers[None, :] <= cands[:, None]
    err = np.where(inside, (step[:, None] ** 2) / 12.0, clip**2 + (step[:, None] ** 2) / 12.0)
    cost = (err * mag[None, :]).sum(axis=1)
    return float(cands[int(np.argmin(cost))])


def calibrate(
    model_path: Path,
    tensors: list[str],
    batches: Callable[[], Iterable[tuple[dict[str, np.ndarray], int]]],
    settings: CalibrationSettings,
    providers: list[str],
    threads: int,
    progress: Progress | None = None,
    total_samples: int | None = None,
) -> CalibrationResult:
    """Observe ``tensors`` over the calibration batches and return a range for each.

    ``batches`` is called once per pass and must yield (feed, sample_count) pairs.
    """
    started = time.perf_counter()
    model = onnx.load(str(model_path))
    session = runtime.make_session(augment(model, tensors), providers, threads, "model for calibration")
    del model
    out_names = [o.name for o in session.get_outputs()]
    index = {name: out_names.index(name) for name in tensors}
    histogram_pass = settings.method != "minmax"
    passes = 2 if histogram_pass else 1

    def report(done: int, pass_no: int) -> None:
        if progress and total_samples:
            progress(min(1.0, (pass_no + done / total_samples) / passes))

    mins = {t: np.inf for t in tensors}
    maxs = {t: -np.inf for t in tensors}
    samples = 0
    for feed, n in batches():
        outs = runtime.run(session, feed, "model during calibration")
        for t in tensors:
            a = outs[index[t]]
            if a.size:
                mins[t] = min(mins[t], float(np.min(a)))
                maxs[t] = max(maxs[t], float(np.max(a)))
        samples += n
        report(samples, 0)
    stats = {t: (mins[t], maxs[t]) for t in tensors if np.isfinite(mins[t])}
    ranges: dict[str, tuple[float, float]] = {}
    if not histogram_pass:
        ranges = dict(stats)
    else:
        bounds = {t: _hist_range(*stats[t]) for t in stats}
        hists = {t: np.zeros(settings.num_bins, dtype=np.int64) for t in stats}
        done = 0
        for feed, n in batches():
            outs = runtime.run(session, feed, "model during calibration")
            for t in stats:
                a = outs[index[t]]
                h, _ = np.histogram(a, bins=settings.num_bins, range=bounds[t])
                hists[t] += h
            done += n
            report(done, 1)
        for t in stats:
            edges = np.linspace(bounds[t][0], bounds[t][1], settings.num_bins + 1)
            ranges[t] = range_from_histogram(
                hists[t], edges, settings.method, settings.percentile, stats[t][0], stats[t][1]
            )
    if settings.symmetric:
        ranges = {t: (-max(abs(lo), abs(hi)), max(abs(lo), abs(hi))) for t, (lo, hi) in ranges.items()}
    # A degenerate (constant) tensor still needs a non-empty range.
    ranges = {t: (lo, hi if hi > lo else lo + 1e-6) for t, (lo, hi) in ranges.items()}
    return CalibrationResult(
        method=settings.method,
        ranges=ranges,
        samples=samples,
        seconds=time.perf_counter() - started,
        tensors=len(ranges),
        passes=passes,
        stats=stats,
    )


def write_ort_ranges(ranges: dict[str, tuple[float, float]], path: Path) -> None:
    """Write ranges in the JSON form ``quantize_static(calibration_cache_path=...)`` loads."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    data = {k: (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32)) for k, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
