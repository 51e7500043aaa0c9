"""Validation: the original and the quantized model on the same samples, compared honestly."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

from worker.engine import runtime
from worker.engine.calibrate import session_with, sized_bytes
from worker.engine.errors import EngineError
from worker.engine.feeds import Batch
from worker.engine.metrics import LabelMetrics, OutputMetrics, infer_role, speedup_interval

Progress = Callable[[float], None]


@dataclass
class AccuracyResult:
    samples: int
    outputs: list[dict[str, Any]]
    labels: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)


def _label_output(metrics: Sequence[OutputMetrics], ref: Sequence[np.ndarray], count: int) -> int | None:
    """The output labels are scored against: a classification output with one row of scores per sample
    (declared before inferred)."""
    fits = [i for i, (m, r) in enumerate(zip(metrics, ref, strict=True))
            if m.role == "classification" and r.ndim == 2 and r.shape[0] == count]
    declared = [i for i in fits if metrics[i].role_source == "declared"]
    chosen = declared or fits
    return chosen[0] if chosen else None


def compare(
    original: Any,
    quantized: Any,
    batches: Iterable[Batch],
    output_names: Sequence[str],
    total: int,
    progress: Progress | None = None,
    roles: dict[str, str] | None = None,
) -> AccuracyResult:
    """Stream the evaluation batches through both sessions and accumulate the metrics per sample.

    ``roles`` are the user's declared output roles; the other outputs' roles are inferred from the first
    batch (and the report says so)."""
    declared = roles or {}
    stats = [OutputMetrics(n) for n in output_names]
    label_stats: LabelMetrics | None = None
    label_idx: int | None = None
    samples = 0
    warnings: list[str] = []
    for batch in batches:
        ref = runtime.run(original, batch.feed, "original model")
        got = runtime.run(quantized, batch.feed, "quantized model")
        if stats and stats[0].role is None:
            for s, r in zip(stats, ref, strict=True):
                if s.name in declared:
                    s.role, s.role_source, s.role_reason = declared[s.name], "declared", "declared in options.outputs"
                else:
                    s.role, s.role_reason = infer_role(s.name, np.asarray(r), batch.count, batch.labels)
            if batch.labels is not None:
                label_idx = _label_output(stats, ref, batch.count)
                if label_idx is None:
                    warnings.append(
                        "labels were given but no output is a classification output with one row of scores per "
                        "sample ([samples, classes]); label accuracy was not computed (declare an output's role "
                        "with options.outputs if it was misread)"
                    )
        for s, r, q in zip(stats, ref, got, strict=True):
            if r.shape != q.shape:
                raise_shape(s.name, r.shape, q.shape)
            s.add(np.asarray(r), np.asarray(q), batch.count)
        if batch.labels is not None and label_idx is not None and ref[label_idx].shape[0] == batch.count:
            if label_stats is None:
                label_stats = LabelMetrics(output_names[label_idx])
            label_stats.add(ref[label_idx], got[label_idx], batch.labels)
        samples += batch.count
        if progress and total:
            progress(min(1.0, samples / total))
    for s in stats:
        if s.nonfinite:
            warnings.append(f"the quantized model produced {s.nonfinite} non-finite value(s) in output '{s.name}'")
        if s.ref_nonfinite:
            warnings.append(f"output '{s.name}' of the original model has {s.ref_nonfinite} non-finite value(s); "
                            "they were left out of the comparison")
    return AccuracyResult(
        samples=samples,
        outputs=[s.to_dict() for s in stats],
        labels=label_stats.to_dict() if label_stats and label_stats.ref_correct else None,
        warnings=warnings,
    )


def raise_shape(name: str, a: tuple[int, ...], b: tuple[int, ...]) -> None:
    raise EngineError(
        "quantized_model_invalid",
        f"the quantized model's output '{name}' has shape {list(b)}, the original {list(a)}",
    )


# The latency timing's budget: models whose runs are long (basic-pitch, 30 + 38 ms a pair: 2.1 s for 30 pairs,
# a sixth of its int8_static job) stop after this many seconds of timed runs, once LATENCY_MIN_RUNS pairs are
# done; a run that long varies little between runs, and the report gives the runs made and the interval. (1 s
# until the refinements' comparisons were bounded too: basic-pitch then made 18 timed pairs in a 6.1 s job.)
LATENCY_BUDGET_S = 0.75
LATENCY_MIN_RUNS = 10


def latency_pair(original: Any, quantized: Any, feed: dict[str, np.ndarray], runs: int,
                 warmup: int = 3, budget_s: float = LATENCY_BUDGET_S) -> dict[str, Any]:
    """Latency of both models on one feed, runs interleaved (original, quantized, original, ...) after a
    warm-up of each, so drift and contention from other work fall on both alike. p50 of each, the
    speed-up's bootstrap interval over run pairs, and the number of runs. At most ``runs`` pairs: the timing
    stops early once LATENCY_MIN_RUNS pairs are done and the timed runs took ``budget_s``."""
    for _ in range(warmup):
        runtime.run(original, feed)
        runtime.run(quantized, feed)
    o_ms: list[float] = []
    q_ms: list[float] = []
    timed = 0.0
    for i in range(runs):
        if i >= LATENCY_MIN_RUNS and timed >= budget_s * 1000.0:
            break
        # Alternate which goes first, so neither always runs with the other's data in the caches.
        order = ((original, o_ms), (quantized, q_ms)) if i % 2 == 0 else ((quantized, q_ms), (original, o_ms))
        for session, times in order:
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - t0) * 1000.0)
            timed += times[-1]
    return speedup_interval(o_ms, q_ms)


K = TypeVar("K")
# Elements per chunk when summing powers in float64: the temporaries stay a few MB whatever the tensor.
_CHUNK = 1 << 20
# Layer outputs fetched per model run, both models together; more layers than fit take more passes. ONNX
# Runtime holds about twice what a run fetches (openWakeWord's embedding model: the job peaked at 195 MB with
# 256 MB here, 148 MB with 32 MB, where ONNX Runtime's quantize_static peaks at 166 MB).
LAYER_BYTES_PER_RUN = 32 << 20
# Joining single samples into one run (``merge``) stops at this many bytes of fetched layer outputs per run,
# well under LAYER_BYTES_PER_RUN: a small model's runs are cheap, and its whole job sits near the process's
# floor, where ONNX Runtime's arena for a merged batch was the job's peak (openWakeWord's mel spectrogram: the
# layer analysis peaked at 130 MB with merged runs up to 32 MB, 109 MB with 8 MB, benchmarks/stage_peaks.py).
LAYER_MERGE_BYTES = 8 << 20
# Layer outputs fetched per model over all samples: a model with large activations is analysed on fewer
# samples (at least one) rather than in more runs (a 90 MB sentence encoder at 128 tokens: 95 MB a sample, so
# 2 samples, 256 tokens per layer; a small conv net: all 16).
LAYER_BYTES_TOTAL = 256 << 20
# Samples times passes per model: the analysis's time is bounded too. A model whose layer outputs take several
# passes is analysed on fewer samples (at least one): basic-pitch's 3 passes over 7 samples were a fifth of its
# int8_static job (3.3 s of 15.6 s on a busy machine), where ONNX Runtime's quantize_static takes 2.0 s in all.
LAYER_SAMPLE_PASSES = 8
# A group whose original-model outputs over all its runs add up to at most this many bytes is observed one
# session at a time: the original model's runs first (their outputs held), then, that session closed, the
# quantized model's. On a small model the two observing sessions open together were the job's peak (openWakeWord's
# hey-jarvis: its whole job within a megabyte of ONNX Runtime's quantize_static, issue #14's bound).
LAYER_SEQUENTIAL_BYTES = 4 << 20


def power_sums(ref: Any, got: Any) -> tuple[float, float]:
    """(sum of ref^2, sum of (ref - got)^2) over the elements finite in both, accumulated in float64, chunk by
    chunk: no float64 copy of a large activation is made, and finiteness is only checked element by element
    in a chunk whose sums came out non-finite. (0, 0) when the shapes differ."""
    a = np.asarray(ref)
    b = np.asarray(got)
    if a.shape != b.shape:
        return 0.0, 0.0
    a, b = a.reshape(-1), b.reshape(-1)
    same_float = a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
    sig = err = 0.0
    for i in range(0, a.size, _CHUNK):
        x, y = a[i:i + _CHUNK], b[i:i + _CHUNK]
        if not same_float:  # float16, integers or mixed types: exact differences need a wider type
            x, y = x.astype(np.float64), y.astype(np.float64)
        # Rounding of a float32 difference is far below what any SQNR here resolves. inf - inf (a mask both
        # models output) is NaN, left out below: numpy's RuntimeWarning about it reached users' terminals.
        with np.errstate(invalid="ignore", over="ignore"):
            d = x - y
            s = float(np.einsum("i,i->", x, x, dtype=np.float64))
            e = float(np.einsum("i,i->", d, d, dtype=np.float64))
        if not (np.isfinite(s) and np.isfinite(e)):
            ok = np.isfinite(x) & np.isfinite(y)
            x, d = x[ok], d[ok]
            s = float(np.einsum("i,i->", x, x, dtype=np.float64))
            e = float(np.einsum("i,i->", d, d, dtype=np.float64))
        sig += s
        err += e
    return sig, err


# Joins single-sample feeds into one batch feed (given by the caller, who knows which inputs are stacked).
Merge = Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]


@dataclass
class LayerSqnr:
    """Per-pair SQNR and what it took: samples, passes (one session per model each) and tensors compared."""

    sqnr: dict[tuple[str, str], float | None]
    samples: int = 0
    passes: int = 0
    seconds: float = 0.0


def budget_groups(sizes: dict[K, int], budget: int) -> list[list[K]]:
    """``sizes``' keys in order, cut into groups whose sizes add up to at most ``budget`` (a key larger than
    ``budget`` is a group of its own)."""
    groups: list[list[K]] = [[]]
    used = 0
    for pair, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(pair)
        used += size
    return groups


def _within_passes(feeds: Sequence[tuple[dict[str, np.ndarray], int]], passes: int,
                   sample_passes: int) -> Sequence[tuple[dict[str, np.ndarray], int]]:
    """The first batches whose samples, times ``passes``, stay within ``sample_passes`` (at least one)."""
    kept, samples = 1, feeds[0][1] if feeds else 0
    while kept < len(feeds) and (samples + feeds[kept][1]) * passes <= sample_passes:
        samples += feeds[kept][1]
        kept += 1
    return feeds[:kept]


def _exposing(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A model delta that adds ``tensors`` to ``model``'s outputs (see calibrate.session_with)."""
    have = {o.name for o in model.graph.output}
    delta = onnx.ModelProto()
    delta.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(tensors) if t not in have)
    return delta


def _pair_sizes(original_model: onnx.ModelProto, pairs: list[tuple[str, str]],
                feeds: Sequence[tuple[dict[str, np.ndarray], int]], bytes_per_run: int,
                bytes_total: int) -> tuple[dict[tuple[str, str], int], Sequence[tuple[dict[str, np.ndarray], int]]]:
    """Bytes both models fetch per pair and batch (from shape inference on the first batch), and the batches
    whose fetches fit ``bytes_total``."""

    # A tensor inference cannot size counts as the largest one it can (or a 16th of a run when none).
    est = sized_bytes(original_model, feeds[0][0], [a for a, _ in pairs], max(1, bytes_per_run // 32))
    # Both models' copy of each tensor is fetched in the same run.
    sizes = {p: 2 * est[p[0]] for p in pairs}
    per_batch = sum(sizes.values()) // 2
    kept = 1
    while kept < len(feeds) and (kept + 1) * per_batch <= bytes_total:
        kept += 1
    return sizes, feeds[:kept]


@dataclass
class _GroupPass:
    """One pass over the batches observing a group of pairs: the runs (``chunks``, each one feed or several joined
    by ``merge``), how each model's observing session opens, and the pairs' signal and noise power sums."""

    group: list[tuple[str, str]]
    sizes: dict[tuple[str, str], int]
    bytes_per_run: int
    merge: Merge | None
    chunks: list[list[dict[str, np.ndarray]]]
    ref_session: Callable[[], Any]
    q_session: Callable[[], Any]
    sig: dict[tuple[str, str], float] = field(init=False)
    noise: dict[tuple[str, str], float] = field(init=False)

    def __post_init__(self) -> None:
        # Only the group's tensors are fetched, not the model's own outputs.
        self.ref_names = list(dict.fromkeys(a for a, _ in self.group))
        self.q_names = list(dict.fromkeys(b for _, b in self.group))
        self.sig, self.noise = dict.fromkeys(self.group, 0.0), dict.fromkeys(self.group, 0.0)

    def feed(self, chunk: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return chunk[0] if len(chunk) == 1 or self.merge is None else self.merge(chunk)

    def ref_run(self, session: Any, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        return dict(zip(self.ref_names, runtime.run(session, feed, "original model (layer analysis)",
                                                    self.ref_names), strict=True))

    def q_run(self, session: Any, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        return dict(zip(self.q_names, runtime.run(session, feed, "quantized model (layer analysis)",
                                                  self.q_names), strict=True))

    def too_large(self, k: int, chunk: list[dict[str, np.ndarray]], fetched: dict[tuple[str, str], int]) -> bool:
        """Whether the first run fetched far more than shape inference said; ``sizes`` then holds what one feed
        really fetched (the group is split and started over)."""
        if k == 0 and (len(self.group) > 1 or len(chunk) > 1) and sum(fetched.values()) > 2 * self.bytes_per_run:
            self.sizes.update({p: max(1, v // len(chunk)) for p, v in fetched.items()})
            return True
        return False

    def add(self, r: dict[str, Any], q: dict[str, Any]) -> None:
        for p in self.group:
            a, e = power_sums(r[p[0]], q[p[1]])
            self.sig[p] += a
            self.noise[p] += e

    def one_session_at_a_time(self) -> bool:
        """The original model's runs (outputs held), then, its session closed, the quantized model's."""
        ref_s = self.ref_session()
        held: list[dict[str, Any]] = []
        for k, chunk in enumerate(self.chunks):
            r = self.ref_run(ref_s, self.feed(chunk))
            # The quantized model's copy of a tensor has its shape: twice the original's counts both.
            if self.too_large(k, chunk, {p: 2 * int(np.asarray(r[p[0]]).nbytes) for p in self.group}):
                return False
            held.append(r)
        del ref_s
        q_s = self.q_session()
        for chunk, r in zip(self.chunks, held, strict=True):
            self.add(r, self.q_run(q_s, self.feed(chunk)))  # joined again: holding joined feeds would cost more
        return True

    def both_sessions(self) -> bool:
        """Both models run on each feed in turn, only that feed's outputs held."""
        ref_s, q_s = self.ref_session(), self.q_session()
        for k, chunk in enumerate(self.chunks):
            feed = self.feed(chunk)  # joined once for both models
            r, q = self.ref_run(ref_s, feed), self.q_run(q_s, feed)
            fetched = {p: int(np.asarray(r[p[0]]).nbytes + np.asarray(q[p[1]]).nbytes) for p in self.group}
            if self.too_large(k, chunk, fetched):
                return False
            self.add(r, q)
            del r, q
        return True


def _observe_group(
    original_path: Path,
    quantized_path: Path,
    original_model: onnx.ModelProto,
    quantized_model: onnx.ModelProto,
    group: list[tuple[str, str]],
    feeds: Sequence[tuple[dict[str, np.ndarray], int]],
    sizes: dict[tuple[str, str], int],
    providers: list[str],
    threads: int,
    bytes_per_run: int,
    merge: Merge | None,
    max_per_run: int,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]] | None:
    """One pass over ``feeds`` observing ``group``'s pairs: each pair's signal and noise power sums. None when
    the first run fetched far more than shape inference said: ``sizes`` then holds what it really fetched, and
    the group must be split and started over."""
    per_run = 1
    if merge is not None and max_per_run > 1 and all(n == 1 for _, n in feeds):
        per_run = max(1, min(max_per_run, min(bytes_per_run, LAYER_MERGE_BYTES) //
                             max(1, sum(sizes[p] for p in group))))
    chunks = [[f for f, _ in feeds[i:i + per_run]] for i in range(0, len(feeds), per_run)]
    g = _GroupPass(
        group, sizes, bytes_per_run, merge, chunks,
        lambda: session_with(original_path, _exposing(original_model, [a for a, _ in group]), providers, threads,
                             "original model (layer analysis)"),
        lambda: session_with(quantized_path, _exposing(quantized_model, [b for _, b in group]), providers, threads,
                             "quantized model (layer analysis)"))
    # sizes count both models' outputs of a pair per batch (shape inference on the first).
    small = sum(sizes[p] for p in group) // 2 * len(feeds) <= LAYER_SEQUENTIAL_BYTES
    done = g.one_session_at_a_time() if small else g.both_sessions()
    return (g.sig, g.noise) if done else None


def layer_sqnr(
    original_path: Path,
    quantized_path: Path,
    original_model: onnx.ModelProto,
    quantized_model: onnx.ModelProto,
    pairs: Sequence[tuple[str, str]],
    feeds: Sequence[tuple[dict[str, np.ndarray], int]],
    providers: list[str],
    threads: int,
    bytes_per_run: int = LAYER_BYTES_PER_RUN,
    bytes_total: int = LAYER_BYTES_TOTAL,
    merge: Merge | None = None,
    max_per_run: int = 1,
    sample_passes: int = LAYER_SAMPLE_PASSES,
) -> LayerSqnr:
    """SQNR (dB) of each (original tensor, quantized tensor) pair, end to end: the error of everything
    upstream is included, as the layer sees it in the quantized model. ``feeds``: (feed, samples) batches.

    Memory is bounded, not proportional to the model's activations: the pairs are observed in groups whose
    outputs (sizes from shape inference on the first batch) fit ``bytes_per_run`` per run, one pass over the
    batches per group, and only sums cross passes; batches beyond the first are used only while all passes
    together fetch at most ``bytes_total`` per model. With ``merge`` (which joins single-sample feeds into one
    batch), a group whose outputs are small runs up to ``max_per_run`` samples at a time, within the same
    bound, instead of one run per sample. Time is bounded by ``sample_passes``: the batches kept hold at most
    that many samples times the number of passes planned from shape inference (at least one batch)."""
    started = time.perf_counter()
    o_names = {o for n in original_model.graph.node for o in n.output}
    q_names = {o for n in quantized_model.graph.node for o in n.output}
    pairs = [(a, b) for a, b in pairs if a in o_names and b in q_names]
    if not pairs or not feeds:
        return LayerSqnr({})
    sizes, feeds = _pair_sizes(original_model, pairs, feeds, bytes_per_run, bytes_total)
    groups = budget_groups(sizes, bytes_per_run)
    feeds = _within_passes(feeds, len(groups), sample_passes)
    sig = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    passes = 0
    g = 0
    while g < len(groups):
        group = groups[g]
        sums = _observe_group(original_path, quantized_path, original_model, quantized_model, group, feeds, sizes,
                              providers, threads, bytes_per_run, merge, max_per_run)
        if sums is None:
            # Split the group by the sizes its first run measured and start it over.
            groups[g: g + 1] = budget_groups({p: sizes[p] for p in group}, bytes_per_run)
            continue
        part_sig, part_noise = sums
        for p in group:
            sig[p] += part_sig[p]
            noise[p] += part_noise[p]
        passes += 1
        g += 1
    out: dict[tuple[str, str], float | None] = {}
    for p in pairs:
        usable = bool(noise[p] > 0 and sig[p] > 0 and np.isfinite(sig[p]) and np.isfinite(noise[p]))
        out[p] = round(float(10.0 * np.log10(sig[p] / noise[p])), 3) if usable else None
    return LayerSqnr(out, sum(n for _, n in feeds), passes, time.perf_counter() - started)


def finite_or_none(obj: Any) -> Any:
    """The report with every NaN or infinity replaced by None: JSON has neither, and a number that is
    not one must not pass for a measurement."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj
