"""Validation: the original and the quantized model on the same samples, compared honestly."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from worker.engine import runtime
from worker.engine.feeds import Batch

Progress = Callable[[float], None]


def _is_class_scores(a: np.ndarray) -> bool:
    """Scores over classes: [batch, classes] or per-token [batch, tokens, classes]. Images, feature
    maps ([N, C, H, W]) and box coordinates ([N, 4]) are not."""
    return a.dtype.kind == "f" and a.ndim in (2, 3) and a.shape[-1] >= 2 and not (a.ndim == 2 and a.shape[-1] == 4)


@dataclass
class OutputStats:
    name: str
    dot: float = 0.0
    ref_sq: float = 0.0
    q_sq: float = 0.0
    err_sq: float = 0.0
    max_abs: float = 0.0
    top1_match: int = 0
    top1_total: int = 0
    class_scores: bool = True
    nonfinite: int = 0
    ref_nonfinite: int = 0

    def add(self, ref: np.ndarray, q: np.ndarray) -> None:
        r = ref.astype(np.float64).ravel()
        d = q.astype(np.float64).ravel()
        # Compare where the original is finite (masks use -inf on purpose); count what the quantized
        # model alone made non-finite.
        r_ok = np.isfinite(r)
        d_ok = np.isfinite(d)
        if not (r_ok.all() and d_ok.all()):
            self.ref_nonfinite += int((~r_ok).sum())
            self.nonfinite += int((r_ok & ~d_ok).sum())
            keep = r_ok & d_ok
            r, d = r[keep], d[keep]
        self.dot += float(r @ d)
        self.ref_sq += float(r @ r)
        self.q_sq += float(d @ d)
        e = r - d
        self.err_sq += float(e @ e)
        if e.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(e))))
        if self.class_scores and _is_class_scores(ref) and ref.shape == q.shape:
            self.top1_match += int((ref.argmax(-1) == q.argmax(-1)).sum())
            self.top1_total += int(np.prod(ref.shape[:-1]))
        else:
            self.class_scores = False

    def to_dict(self) -> dict[str, Any]:
        denom = np.sqrt(self.ref_sq) * np.sqrt(self.q_sq)
        # Two all-zero outputs agree perfectly; one all-zero output against a non-zero one does not.
        cosine = self.dot / denom if denom > 0 else (1.0 if self.ref_sq == self.q_sq else 0.0)
        if self.err_sq == 0:
            sqnr: float | None = None  # identical outputs: infinite SQNR, JSON has no infinity
        elif self.ref_sq == 0:
            sqnr = float("-inf")
        else:
            sqnr = 10.0 * np.log10(self.ref_sq / self.err_sq)
        return {
            "name": self.name,
            "cosine": round(float(cosine), 6),
            "sqnr_db": None if sqnr is None or not np.isfinite(sqnr) else round(float(sqnr), 3),
            "max_abs_error": float(self.max_abs),
            "top1_agreement": (
                round(self.top1_match / self.top1_total, 6) if self.class_scores and self.top1_total else None
            ),
        }


@dataclass
class LabelStats:
    output: str
    correct_ref: int = 0
    correct_q: int = 0
    total: int = 0

    def to_dict(self) -> dict[str, Any]:
        o = self.correct_ref / self.total
        q = self.correct_q / self.total
        return {
            "output": self.output,
            "samples": self.total,
            "original": round(o, 6),
            "quantized": round(q, 6),
            "delta": round(q - o, 6),
        }


@dataclass
class AccuracyResult:
    samples: int
    outputs: list[dict[str, Any]]
    labels: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)


def compare(
    original: Any,
    quantized: Any,
    batches: Iterable[Batch],
    output_names: Sequence[str],
    total: int,
    progress: Progress | None = None,
) -> AccuracyResult:
    """Stream the evaluation batches through both sessions and accumulate the metrics."""
    stats = [OutputStats(n) for n in output_names]
    label_stats: LabelStats | None = None
    label_problem: str | None = None
    samples = 0
    warnings: list[str] = []
    for batch in batches:
        ref = runtime.run(original, batch.feed, "original model")
        got = runtime.run(quantized, batch.feed, "quantized model")
        for s, r, q in zip(stats, ref, got, strict=True):
            if r.shape != q.shape:
                raise_shape(s.name, r.shape, q.shape)
            s.add(r, q)
        if batch.labels is not None and label_problem is None:
            idx = next(
                (i for i, r in enumerate(ref) if _is_class_scores(r) and r.ndim == 2 and r.shape[0] == batch.count),
                None,
            )
            if idx is None:
                label_problem = (
                    "labels were given but no model output has the shape [samples, classes]; "
                    "label accuracy was not computed"
                )
            else:
                if label_stats is None:
                    label_stats = LabelStats(output_names[idx])
                lab = batch.labels.astype(np.int64)
                label_stats.correct_ref += int((ref[idx].argmax(-1) == lab).sum())
                label_stats.correct_q += int((got[idx].argmax(-1) == lab).sum())
                label_stats.total += batch.count
        samples += batch.count
        if progress and total:
            progress(min(1.0, samples / total))
    if label_problem:
        warnings.append(label_problem)
    for s in stats:
        if s.nonfinite:
            warnings.append(f"the quantized model produced {s.nonfinite} non-finite value(s) in output '{s.name}'")
        if s.ref_nonfinite:
            warnings.append(f"output '{s.name}' of the original model has {s.ref_nonfinite} non-finite value(s); "
                            "they were left out of the comparison")
    return AccuracyResult(
        samples=samples,
        outputs=[s.to_dict() for s in stats],
        labels=label_stats.to_dict() if label_stats and label_stats.total else None,
        warnings=warnings,
    )


def raise_shape(name: str, a: tuple[int, ...], b: tuple[int, ...]) -> None:
    from worker.engine.errors import EngineError

    raise EngineError(
        "quantized_model_invalid",
        f"the quantized model's output '{name}' has shape {list(b)}, the original {list(a)}",
    )


def latency_ms_p50(session: Any, feed: dict[str, np.ndarray], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        runtime.run(session, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def layer_sqnr(
    original_model: onnx.ModelProto,
    quantized_model: onnx.ModelProto,
    pairs: Sequence[tuple[str, str]],
    feeds: Iterable[dict[str, np.ndarray]],
    providers: list[str],
    threads: int,
) -> dict[tuple[str, str], float | None]:
    """SQNR (dB) of each (original tensor, quantized tensor) pair, end to end: the error of
    everything upstream is included, as the layer sees it in the quantized model."""
    o_names = {o for n in original_model.graph.node for o in n.output}
    q_names = {o for n in quantized_model.graph.node for o in n.output}
    pairs = [(a, b) for a, b in pairs if a in o_names and b in q_names]
    if not pairs:
        return {}

    def exposed(model: onnx.ModelProto, tensors: set[str]) -> bytes:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        for t in sorted(tensors - have):
            m.graph.output.append(onnx.ValueInfoProto(name=t))
        return m.SerializeToString()

    ref_s = runtime.make_session(exposed(original_model, {a for a, _ in pairs}), providers, threads,
                                 "original model (layer analysis)")
    q_s = runtime.make_session(exposed(quantized_model, {b for _, b in pairs}), providers, threads,
                               "quantized model (layer analysis)")
    ref_names = [o.name for o in ref_s.get_outputs()]
    q_out_names = [o.name for o in q_s.get_outputs()]
    sig = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        r = dict(zip(ref_names, ref_s.run(None, feed), strict=True))
        q = dict(zip(q_out_names, q_s.run(None, feed), strict=True))
        for a_name, b_name in pairs:
            a = np.asarray(r[a_name], dtype=np.float64)
            b = np.asarray(q[b_name], dtype=np.float64)
            if a.shape != b.shape:
                continue
            ok = np.isfinite(a) & np.isfinite(b)
            if not ok.all():
                a, b = a[ok], b[ok]
            sig[(a_name, b_name)] += float(np.sum(a * a))
            noise[(a_name, b_name)] += float(np.sum((a - b) ** 2))
    out: dict[tuple[str, str], float | None] = {}
    for p in pairs:
        usable = bool(noise[p] > 0 and sig[p] > 0 and np.isfinite(sig[p]) and np.isfinite(noise[p]))
        out[p] = round(float(10.0 * np.log10(sig[p] / noise[p])), 3) if usable else None
    return out


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
