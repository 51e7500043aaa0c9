"""The accuracy figures of a report, per evaluation sample, with bootstrap confidence intervals.

Every figure is kept as per-sample sums (a dot product, two energies, an error energy, top-1 matches...)
so that the whole-set figure and its interval come from the same numbers: the figure is the ratio of the
sums, the interval the 2.5th and 97.5th percentiles of that ratio over resamplings of the samples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROLES = ("classification", "multilabel", "embedding", "detection", "regression", "other")
BOOTSTRAP_REPS = 1000
BOOTSTRAP_SEED = 0
# Nearest-neighbour agreement keeps each embedding sample's output: bounded so memory stays flat.
MAX_EMBEDDING_SAMPLES = 4096
# The blank token of a CTC head: index 0 in the common exporters (PaddleOCR, torch's CTCLoss default).
CTC_BLANK = 0
# A multi-label output's element is a yes where it is at least this (sigmoid scores: notes in a frame, tags).
MULTILABEL_THRESHOLD = 0.5

_CLASS_NAMES = re.compile(r"logit|prob|score|class|label|softmax|pred|cls", re.I)
_EMBED_NAMES = re.compile(r"embed|pool|sentence|hidden|feature|vector|encod|last_hidden", re.I)
_BOX_NAMES = re.compile(r"box|bbox|coord|landmark|loc|anchor|offset|reg", re.I)


def infer_role(name: str, ref: np.ndarray, count: int, labels: np.ndarray | None) -> tuple[str, str]:
    """An output's role from what it looks like: ``(role, why)``. A guess, which the report says is one."""
    a = ref
    if a.dtype.kind != "f":
        return "other", "not floating point"
    batched = a.ndim >= 1 and a.shape[0] == count
    if not batched or a.ndim < 2:
        return "other", "no per-sample axis"
    classes = a.shape[-1]
    if a.ndim == 3 and classes >= 2 and not _BOX_NAMES.search(name):
        if _ordered_rows(a):
            return "regression", f"[samples, steps, {classes}] {_ORDERED}"
        if _independent_scores(a):
            return "multilabel", f"[samples, steps, {classes}] {_INDEPENDENT}"
        return "classification", f"[samples, steps, {classes}] scores per step"
    if a.ndim != 2:
        return "other", f"rank {a.ndim}"
    if labels is not None and labels.size and classes >= 2 and int(labels.max()) < classes and int(labels.min()) >= 0:
        return "classification", f"labels in [0, {classes}) were given"
    if _BOX_NAMES.search(name):
        return ("detection" if classes in (4, 5, 6) else "regression"), f"name '{name}'"
    if _CLASS_NAMES.search(name) and classes >= 2:
        return "classification", f"name '{name}'"
    if _EMBED_NAMES.search(name):
        return "embedding", f"name '{name}'"
    finite = a[np.isfinite(a).all(axis=1)]
    if finite.size and classes >= 2 and finite.min() >= 0 and np.allclose(finite.sum(axis=1), 1.0, atol=1e-3):
        return "classification", "rows are probabilities (non-negative, summing to 1)"
    if _ordered_rows(a):
        return "regression", f"{classes} {_ORDERED}"
    if classes >= 2 and _independent_scores(a):
        return "multilabel", f"{classes} {_INDEPENDENT}"
    if classes == 1:
        return "regression", "one value per sample"
    if classes in (4, 5, 6):
        return "regression", f"{classes} values per sample (box-like)"
    if classes >= 32:
        return "embedding", f"{classes} values per sample"
    return "classification", f"{classes} scores per sample"


_INDEPENDENT = (f"scores in [0, 1] whose rows do not sum to 1 (independent yes/no scores, each a yes at "
                f"{MULTILABEL_THRESHOLD})")


# Quantile forecasts and cumulative curves rise along their last axis; their argmax is the last column nearly
# always, so a top-1 agreement would read ~100 % whatever the error. fracast's 9 quantiles: 99.3 % of adjacent
# pairs non-decreasing (quantile crossings make the rest); logits and probabilities sit near half.
ORDERED_SHARE = 0.98
_ORDERED = "values that rise along each row (quantiles or a cumulative curve), so no class to agree on"


def _ordered_rows(a: np.ndarray) -> bool:
    """Three or more values per row, nearly every adjacent pair non-decreasing."""
    if a.shape[-1] < 3:
        return False
    with np.errstate(invalid="ignore"):
        d = np.diff(a.reshape(-1, a.shape[-1]).astype(np.float64), axis=-1)
    d = d[np.isfinite(d)]
    return bool(d.size) and float((d >= 0).mean()) >= ORDERED_SHARE and bool((d > 0).any())


def _independent_scores(a: np.ndarray) -> bool:
    """Every finite value in [0, 1], some row not summing to 1: sigmoid scores, not a softmax's probabilities."""
    finite = a[np.isfinite(a)]
    if not finite.size or finite.min() < 0 or finite.max() > 1:
        return False
    rows = a.reshape(-1, a.shape[-1])
    rows = rows[np.isfinite(rows).all(axis=1)]
    return bool(rows.size) and not np.allclose(rows.sum(axis=1), 1.0, atol=1e-3)


def ctc_collapse(seq: np.ndarray, blank: int = CTC_BLANK) -> tuple[int, ...]:
    """A CTC argmax path as the text it decodes to: repeats merged, then blanks dropped."""
    if seq.size == 0:
        return ()
    keep = np.ones(seq.shape[0], dtype=bool)
    keep[1:] = seq[1:] != seq[:-1]
    merged = seq[keep]
    return tuple(int(t) for t in merged[merged != blank])


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity."""
    x = emb.astype(np.float64).reshape(emb.shape[0], -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.asarray(sim.argmax(axis=1))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# resample_weights draws this many resamplings at a time: the draws' uint64 temporaries were several times the
# (reps, n) weight matrix itself, a megabyte or more at a small model's job's peak (issue #14's bound).
RESAMPLE_ROWS = 64


def resample_indices(n: int, shape: tuple[int, ...], seed: int = BOOTSTRAP_SEED, start: int = 0) -> np.ndarray:
    """Indices drawn uniformly from [0, n), ``shape`` of them, the same for the same seed: SplitMix64's output
    function over a counter (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014), from
    counter position ``start`` on (so that draws made in parts equal those made at once).
    numpy.random would do, but importing it maps OpenSSL's libcrypto (numpy.random -> secrets -> hmac) and its
    own extensions, about 5 MB of resident pages that a small model's whole job would carry for a few thousand
    draws. The modulo's bias is below n / 2**64."""
    count = int(np.prod(shape))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the generator intends
        z = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        z += np.uint64(seed)
        z *= _GOLDEN
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        z %= np.uint64(n)
    return z.astype(np.int64).reshape(shape)


def resample_weights(n: int, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``reps`` bootstrap resamplings of ``n`` samples as counts per sample (rows sum to n), drawn RESAMPLE_ROWS
    resamplings at a time (the same counts as at once)."""
    out = np.empty((reps, n), dtype=np.float64)
    for r0 in range(0, reps, RESAMPLE_ROWS):
        rows = min(RESAMPLE_ROWS, reps - r0)
        idx = resample_indices(n, (rows, n), seed, start=r0 * n)
        idx += np.arange(rows, dtype=np.int64)[:, None] * n
        out[r0:r0 + rows] = np.bincount(idx.reshape(-1), minlength=rows * n).reshape(rows, n)
    return out


# Order statistics without np.median, np.percentile and np.quantile: each of those imports numpy.ma (numpy's
# masked arrays, 1.3 MB resident) on its first call, which every job made (a small model's job is held to ONNX
# Runtime's quantizer's peak, issue #14). np.partition does not; the figures are numpy's to the bit (its
# "linear" interpolation, and NaN wherever numpy gives NaN; tests/worker/engine/test_metrics.py).


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's linear interpolation between neighbouring order statistics, written the same way (from b where
    t >= 0.5), so that the results are the same floats."""
    diff = b - a
    return np.asarray(np.where(t >= 0.5, b - diff * (1 - t), a + diff * t))


def percentile(values: np.ndarray, q: float) -> float:
    """np.percentile(values, q) of a 1-D array (method "linear")."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or np.isnan(v).any():
        return float("nan")
    index = (v.size - 1) * np.true_divide(q, 100.0)
    lo = int(np.floor(index))
    hi = min(lo + 1, v.size - 1)
    part = np.partition(v, sorted({lo, hi}))
    return float(_lerp(part[lo], part[hi], np.asarray(index - lo)))


def median(values: np.ndarray) -> float:
    """np.median of a 1-D array."""
    return float(row_medians(np.asarray(values, dtype=np.float64).reshape(1, -1))[0])


def row_medians(values: np.ndarray) -> np.ndarray:
    """np.median(values, axis=1) of a 2-D array."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[1]
    if n == 0:
        return np.full(v.shape[0], np.nan)
    half = n // 2
    part = np.partition(v, [half - 1, half] if n % 2 == 0 else [half], axis=1)
    mid = part[:, half] if n % 2 else (part[:, half - 1] + part[:, half]) / 2.0
    return np.where(np.isnan(v).any(axis=1), np.nan, mid)


def percentile_ci(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    v = values[np.isfinite(values)]
    if v.size < max(10, values.size // 2):
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    return [percentile(v, tail), percentile(v, 100.0 - tail)]


def bootstrap(n: int, stat: Callable[[np.ndarray], np.ndarray], level: float = 0.95) -> list[float] | None:
    """The ``level`` interval of a statistic of per-sample sums: ``stat`` maps a (reps, n) weight matrix to
    (reps,) values. None with fewer than 2 samples (nothing to resample)."""
    if n < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_ci(stat(resample_weights(n)), level)


def _cosine(dot: np.ndarray, rsq: np.ndarray, qsq: np.ndarray) -> np.ndarray:
    denom = np.sqrt(rsq) * np.sqrt(qsq)
    # Two all-zero outputs agree perfectly; one all-zero output against a non-zero one does not.
    both_zero = (rsq == 0) & (qsq == 0)
    return np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where(both_zero, 1.0, 0.0))


def _sqnr(rsq: np.ndarray, esq: np.ndarray) -> np.ndarray:
    return np.asarray(10.0 * np.log10(rsq / esq))


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), digits)


def _r_ci(ci: list[float] | None, digits: int = 6) -> list[float] | None:
    return None if ci is None else [round(ci[0], digits), round(ci[1], digits)]


def _f1(both: Any, only_q: Any, only_r: Any) -> Any:
    """F1 of the quantized model's yes elements against the original's (1 where neither says yes anywhere)."""
    total = 2 * both + only_q + only_r
    return np.where(total > 0, 2 * both / np.where(total > 0, total, 1), 1.0)


def _share(hits: np.ndarray, level: float) -> tuple[float | None, list[float] | None]:
    """The share of samples where something held, and its interval."""
    n = len(hits)
    return _r(float(hits.mean())), _r_ci(bootstrap(n, lambda w: (w @ hits) / n, level))


@dataclass
class OutputMetrics:
    """One output's comparison, accumulated sample by sample."""

    name: str
    role: str | None = None
    role_source: str = "inferred"
    role_reason: str = ""
    dot: list[float] = field(default_factory=list)
    rsq: list[float] = field(default_factory=list)
    qsq: list[float] = field(default_factory=list)
    esq: list[float] = field(default_factory=list)
    max_abs: float = 0.0
    top1_match: list[int] = field(default_factory=list)
    top1_total: list[int] = field(default_factory=list)
    seq_same: list[bool] = field(default_factory=list)
    ctc_same: list[bool] = field(default_factory=list)
    emb_ref: list[np.ndarray] = field(default_factory=list)
    emb_q: list[np.ndarray] = field(default_factory=list)
    # Multi-label outputs: per sample, elements that are a yes in both, in the quantized only, in the original only.
    yes_both: list[int] = field(default_factory=list)
    yes_quantized: list[int] = field(default_factory=list)
    yes_original: list[int] = field(default_factory=list)
    nonfinite: int = 0
    ref_nonfinite: int = 0

    def add(self, ref: np.ndarray, q: np.ndarray, count: int) -> None:
        """One run's outputs; split into ``count`` samples when the first axis is the samples'."""
        per_sample = ref.ndim >= 1 and ref.shape[0] == count and count > 1
        units = [(ref[i], q[i]) for i in range(count)] if per_sample else [(ref, q)]
        for r_arr, q_arr in units:
            self._add_unit(r_arr, q_arr)
        if self.role == "classification" and ref.ndim >= 2 and ref.shape == q.shape:
            self._add_classes(ref, q, per_sample)
        if self.role == "multilabel" and ref.shape == q.shape:
            for r_arr, q_arr in units:
                r_yes, q_yes = np.asarray(r_arr) >= MULTILABEL_THRESHOLD, np.asarray(q_arr) >= MULTILABEL_THRESHOLD
                self.yes_both.append(int((r_yes & q_yes).sum()))
                self.yes_quantized.append(int((q_yes & ~r_yes).sum()))
                self.yes_original.append(int((r_yes & ~q_yes).sum()))
        if self.role == "embedding" and sum(len(e) for e in self.emb_ref) < MAX_EMBEDDING_SAMPLES and per_sample:
            self.emb_ref.append(ref.reshape(ref.shape[0], -1).astype(np.float32))
            self.emb_q.append(q.reshape(q.shape[0], -1).astype(np.float32))

    def _add_unit(self, ref: np.ndarray, q: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64).ravel()
        d = np.asarray(q, dtype=np.float64).ravel()
        # Compare where the original is finite (masks use -inf on purpose); count what the quantized
        # model alone made non-finite.
        r_ok, d_ok = np.isfinite(r), np.isfinite(d)
        if not (r_ok.all() and d_ok.all()):
            self.ref_nonfinite += int((~r_ok).sum())
            self.nonfinite += int((r_ok & ~d_ok).sum())
            keep = r_ok & d_ok
            r, d = r[keep], d[keep]
        e = r - d
        self.dot.append(float(r @ d))
        self.rsq.append(float(r @ r))
        self.qsq.append(float(d @ d))
        self.esq.append(float(e @ e))
        if e.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(e))))

    def _add_classes(self, ref: np.ndarray, q: np.ndarray, per_sample: bool) -> None:
        ra, qa = ref.argmax(-1), q.argmax(-1)
        rows = [(ra[i], qa[i]) for i in range(ra.shape[0])] if per_sample else [(ra, qa)]
        for a, b in rows:
            self.top1_match.append(int((a == b).sum()))
            self.top1_total.append(int(a.size))
            if ref.ndim == 3:
                # [samples, steps, classes]: the whole decoded sequence, as the task sees it.
                self.seq_same.append(bool(np.array_equal(a, b)))
                pairs = zip(np.atleast_2d(a), np.atleast_2d(b), strict=True)
                self.ctc_same.append(all(ctc_collapse(x) == ctc_collapse(y) for x, y in pairs))

    def to_dict(self, level: float = 0.95) -> dict[str, Any]:
        dot, rsq, qsq, esq = (np.asarray(v, dtype=np.float64) for v in (self.dot, self.rsq, self.qsq, self.esq))
        n = len(dot)
        cos = float(_cosine(np.array([dot.sum()]), np.array([rsq.sum()]), np.array([qsq.sum()]))[0]) if n else 1.0
        err, sig = float(esq.sum()), float(rsq.sum())
        out: dict[str, Any] = {
            "name": self.name,
            "role": self.role,
            "role_source": self.role_source,
            "role_reason": self.role_reason,
            "samples": n,
            "cosine": round(cos, 6),
            "cosine_ci": _r_ci(bootstrap(n, lambda w: _cosine(w @ dot, w @ rsq, w @ qsq), level)),
            "max_abs_error": float(self.max_abs),
        }
        # SQNR: identical outputs have no noise (+inf, flagged), an all-zero original has no signal
        # (undefined); neither is a number JSON can hold.
        if err == 0:
            out.update(sqnr_db=None, sqnr_db_ci=None, identical=True)
        elif sig == 0:
            out.update(sqnr_db=None, sqnr_db_ci=None, identical=False,
                       sqnr_note="undefined: the original output is all zeros")
        else:
            out.update(sqnr_db=_r(10.0 * np.log10(sig / err), 3), identical=False,
                       sqnr_db_ci=_r_ci(bootstrap(n, lambda w: _sqnr(w @ rsq, w @ esq), level), 3))
        out["top1_agreement"] = out["top1_agreement_ci"] = None
        if self.top1_total:
            m = np.asarray(self.top1_match, dtype=np.float64)
            t = np.asarray(self.top1_total, dtype=np.float64)
            out["top1_agreement"] = _r(m.sum() / t.sum())
            out["top1_agreement_ci"] = _r_ci(bootstrap(len(m), lambda w: (w @ m) / (w @ t), level))
        if self.yes_both:
            both, only_q, only_r = (np.asarray(v, dtype=np.float64)
                                    for v in (self.yes_both, self.yes_quantized, self.yes_original))
            out["multilabel_f1"] = _r(float(_f1(both.sum(), only_q.sum(), only_r.sum())))
            out["multilabel_f1_ci"] = _r_ci(bootstrap(len(both), lambda w: _f1(w @ both, w @ only_q, w @ only_r),
                                                      level))
        if self.seq_same:
            for key, vals in (("sequence_agreement", self.seq_same), ("ctc_sequence_agreement", self.ctc_same)):
                out[key], out[key + "_ci"] = _share(np.asarray(vals, dtype=np.float64), level)
        if self.emb_ref:
            ref, q = np.concatenate(self.emb_ref), np.concatenate(self.emb_q)
            if len(ref) >= 3:
                same = (nearest_neighbours(ref) == nearest_neighbours(q)).astype(np.float64)
                out["neighbour_agreement"], out["neighbour_agreement_ci"] = _share(same, level)
                out["neighbour_samples"] = int(len(ref))
        return out


@dataclass
class LabelMetrics:
    output: str
    ref_correct: list[int] = field(default_factory=list)
    q_correct: list[int] = field(default_factory=list)

    def add(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray) -> None:
        lab = labels.astype(np.int64).reshape(-1)
        self.ref_correct.extend((ref.argmax(-1).reshape(-1) == lab).astype(int).tolist())
        self.q_correct.extend((q.argmax(-1).reshape(-1) == lab).astype(int).tolist())

    def to_dict(self, level: float = 0.95) -> dict[str, Any]:
        r = np.asarray(self.ref_correct, dtype=np.float64)
        q = np.asarray(self.q_correct, dtype=np.float64)
        n = len(r)
        return {
            "output": self.output,
            "samples": n,
            "original": round(float(r.mean()), 6),
            "quantized": round(float(q.mean()), 6),
            "delta": round(float(q.mean() - r.mean()), 6),
            "original_ci": _r_ci(bootstrap(n, lambda w: (w @ r) / n, level)),
            "quantized_ci": _r_ci(bootstrap(n, lambda w: (w @ q) / n, level)),
            "delta_ci": _r_ci(bootstrap(n, lambda w: (w @ (q - r)) / n, level)),
        }


def speedup_interval(original_ms: Sequence[float], quantized_ms: Sequence[float],
                     level: float = 0.95) -> dict[str, Any]:
    """p50 of interleaved latency runs and the interval of the speed-up (original p50 / quantized p50),
    resampling run pairs together so that drift both saw cancels."""
    o = np.asarray(original_ms, dtype=np.float64)
    q = np.asarray(quantized_ms, dtype=np.float64)
    o50, q50 = median(o), median(q)
    ci: list[float] | None = None
    if len(o) >= 2 and len(o) == len(q):
        idx = resample_indices(len(o), (BOOTSTRAP_REPS, len(o)))
        ratios = row_medians(o[idx]) / row_medians(q[idx])
        ci = percentile_ci(ratios, level)
    return {
        "original_ms_p50": o50,
        "quantized_ms_p50": q50,
        "speedup": o50 / q50 if q50 > 0 else None,
        "speedup_ci": _r_ci(ci, 4),
        "runs": int(len(o)),
        "measurable": None if ci is None else not (ci[0] <= 1.0 <= ci[1]),
    }
