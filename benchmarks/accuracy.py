"""int8_static's accuracy options on the real-model corpus, each alone and as the defaults combine them.

    .venv/bin/python benchmarks/accuracy.py [--models a,b] [--variants plain,defaults] [--json out.json]

For each corpus entry (``tests.zoo``: published weights, realistic calibration and evaluation data) this runs,
each as a ``lowbit quantize`` child process like ``benchmarks/zoo.py`` does:

- ``plain``: int8_static with SmoothQuant, cross-layer equalization, bias correction, learned rounding and the
  16-bit residual stream off;
- ``index_math_off``: ``plain`` with option ``float_index_math`` off too (shape, index and decision arithmetic
  quantized like the rest, as before that option existed);
- ``smoothquant``, ``equalize``, ``bias_correction``, ``adaround``, ``residual_16bit``: that option "on", the
  others off (learned rounding with its default time budget);
- ``defaults``: int8_static as a job gets it (SmoothQuant, equalization, bias correction and the 16-bit residual
  stream "auto": tried, and kept only where they measured better on the calibration samples; learned rounding
  off);
- ``refined``: equalization, bias correction and learned rounding together, each "auto" (kept only where it
  measured better on the calibration samples), the other options off;
- ``auto``: recipe auto with an accuracy target of output cosine >= ``--auto-cosine`` (its float-fallback and
  16-bit-activation steps included; slow on large conv nets, leave it out with ``--variants``);

and, on the same file and calibration batches, ONNX Runtime's own ``quantize_static`` (minmax, QDQ, per-channel).
Every row's figures are computed here from the artifact's outputs on the evaluation set, not read from lowbit's
report: the entry's task metric (fp32 -> quantized), the first float output's cosine against fp32 pooled over
the samples and its SQNR, each with a 95% bootstrap interval over samples, the size ratio and the batch-1
speed-up. The last column
says what the options did (from the report). The summary gives, per entry, how much of what ``plain`` lost
(fp32 -> plain on the task metric) each variant won back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoo  # noqa: E402  (the sibling benchmark: children, baselines, task metrics)

from worker.engine.auto import PLAIN_STATIC  # noqa: E402  (int8_static with its accuracy steps off)

OFF = dict(PLAIN_STATIC)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("int8_static", dict(OFF)),
    # plain with the shape, index and decision arithmetic quantized too (as before float_index_math existed).
    "index_math_off": ("int8_static", {**OFF, "float_index_math": False}),
    "smoothquant": ("int8_static", {**OFF, "smoothquant": "on"}),
    "equalize": ("int8_static", {**OFF, "equalize": "on"}),
    "bias_correction": ("int8_static", {**OFF, "bias_correction": "on"}),
    "adaround": ("int8_static", {**OFF, "adaround": "on"}),
    "residual_16bit": ("int8_static", {**OFF, "residual_16bit": "on"}),
    "defaults": ("int8_static", {}),
    # Issue #18's conv-net combination: equalization, bias correction and learned rounding, each kept where it
    # measured better on the calibration samples.
    "refined": ("int8_static", {**OFF, "equalize": "auto", "bias_correction": "auto", "adaround": "auto"}),
    "auto": ("auto", {}),
}


@dataclass
class Row:
    model: str
    variant: str
    status: str
    size_ratio: float | None = None
    metric: str | None = None
    metric_fp32: float | None = None
    metric_quantized: float | None = None
    cosine: float | None = None
    cosine_ci: list[float] | None = None
    sqnr_db: float | None = None
    sqnr_db_ci: list[float] | None = None
    speedup: float | None = None
    did: str = ""


def output_figures(ref: dict[str, np.ndarray], out: dict[str, np.ndarray], seed: int = 0,
                   reps: int = 1000) -> dict[str, Any] | None:
    """The first float output's cosine (pooled over samples: sum of dots over the root of the summed squares)
    and SQNR in dB (summed signal over summed noise power), each with its 95% bootstrap interval, resampling
    samples (the first axis)."""
    for pos, (name, r) in enumerate(ref.items()):
        r = np.asarray(r)
        if r.dtype.kind != "f" or r.size == 0:
            continue
        q = np.asarray(out[name] if name in out else list(out.values())[pos])
        if q.shape != r.shape:
            return None
        n = r.shape[0] if r.ndim >= 2 else 1
        r64 = r.reshape(n, -1).astype(np.float64)
        q64 = q.reshape(n, -1).astype(np.float64)
        ok = np.isfinite(r64) & np.isfinite(q64)
        r64, q64 = np.where(ok, r64, 0.0), np.where(ok, q64, 0.0)
        dot, rr, qq = (r64 * q64).sum(1), (r64 * r64).sum(1), (q64 * q64).sum(1)

        def cos(d: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.asarray(d / (np.sqrt(a) * np.sqrt(b)))

        ee = ((r64 - q64) ** 2).sum(1)

        def sqnr(a: np.ndarray, e: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.asarray(10.0 * np.log10(a / np.maximum(e, 1e-30)))

        got: dict[str, Any] = {
            "cosine": round(float(cos(np.array([dot.sum()]), np.array([rr.sum()]), np.array([qq.sum()]))[0]), 5),
            "sqnr_db": round(float(sqnr(np.array([rr.sum()]), np.array([ee.sum()]))[0]), 2),
            "cosine_ci": None, "sqnr_db_ci": None,
        }
        if n >= 2:
            idx = np.random.default_rng(seed).integers(0, n, (reps, n))
            lo, hi = np.nanpercentile(cos(dot[idx].sum(1), rr[idx].sum(1), qq[idx].sum(1)), [2.5, 97.5])
            got["cosine_ci"] = [round(float(lo), 5), round(float(hi), 5)]
            lo, hi = np.nanpercentile(sqnr(rr[idx].sum(1), ee[idx].sum(1)), [2.5, 97.5])
            got["sqnr_db_ci"] = [round(float(lo), 2), round(float(hi), 2)]
        return got
    return None


def what_it_did(report: dict[str, Any] | None, variant: str) -> str:
    """The options' outcome, from the report: which of them changed the artifact."""
    if report is None:
        return ""
    if variant == "auto":
        chosen = report.get("chosen") or {}
        extra = {k: v for k, v in (chosen.get("options") or {}).items() if v not in (None, [], {})}
        return f"chose {chosen.get('recipe')} {json.dumps(extra)}"[:90]
    parts = []
    for key, label in (("smoothquant", "SmoothQuant"), ("equalization", "CLE"), ("bias_correction", "BC"),
                       ("adaround", "AdaRound"), ("residual_16bit", "16-bit residual")):
        section = report.get(key) or {}
        if section.get("enabled"):
            parts.append(f"{label} kept")
        elif section.get("mode") == "on" or (variant in ("defaults", "refined") and section.get("compare")):
            reason = str(section.get("reason", ""))
            parts.append(f"{label} not kept ({reason[:60]})" if section.get("compare") else f"{label}: {reason[:60]}")
    return "; ".join(parts) or "-"


def row_for(entry: Any, variant: str, artifact: Path, ok: bool, status: str, base: zoo.Baselines,
            report: dict[str, Any] | None, args: argparse.Namespace) -> Row:
    row = Row(entry.name, variant, status)
    if not ok or not artifact.is_file():
        return row
    # (ONNX Runtime's artifact against the file it quantized: a .pt2 entry's ONNX export, as lowbit's report does)
    row.size_ratio = round(artifact.stat().st_size / base.fp32_onnx.stat().st_size, 4) if report is None \
        else report["size"]["ratio"]
    out = zoo.outputs_of(artifact, entry.eval)
    if base.ref is not None:
        got = zoo.headline(entry, base.ref, out, base.labels)
        if got is not None:
            row.metric, row.metric_quantized = got[0], round(got[2], 4)
            row.metric_fp32 = None if got[1] is None else round(got[1], 4)
        figures = output_figures(base.ref, out)
        if figures is not None:
            row.cosine, row.cosine_ci = figures["cosine"], figures["cosine_ci"]
            row.sqnr_db, row.sqnr_db_ci = figures["sqnr_db"], figures["sqnr_db_ci"]
    row.speedup = report["latency"]["speedup"] if report is not None else \
        zoo.latency_speedup(base.fp32_onnx, artifact, entry.eval, args.threads)
    row.did = what_it_did(report, variant)
    return row


def bench_entry(entry: Any, variants: list[str], args: argparse.Namespace, work: Path) -> list[Row]:
    d = work / entry.name
    base = zoo.baselines(entry, args, d, modes=("static",))
    rows: list[Row] = []
    ort = base.ort.get("static")
    if ort is not None:
        rows.append(row_for(entry, "ort quantize_static", d / "ort_static.onnx", ort.status == "ok", ort.status,
                            base, None, args))
    for variant in variants:
        recipe, options = VARIANTS[variant]
        out, rep, log = d / f"{variant}.onnx", d / f"{variant}.json", d / f"{variant}.log"
        code, _secs, _peak = zoo.run_child(zoo.lowbit_cmd(entry, recipe, out, rep, args, options), log, args.timeout)
        report = json.loads(rep.read_text()) if code == 0 and rep.is_file() else None
        status = "ok" if code == 0 else ("timeout" if code == 124 else zoo.error_code(log))
        if variant == "auto" and report is not None:
            status = "met" if (report.get("accuracy_target") or {}).get("met") else "missed"
        rows.append(row_for(entry, variant, out, code == 0, status, base, report, args))
        r = rows[-1]
        print(f"  {entry.name:20s} {variant:20s} {r.status:24s} cos {r.cosine} {r.cosine_ci} SQNR {r.sqnr_db} "
              f"{r.metric} {r.metric_fp32} -> {r.metric_quantized} {r.did}", file=sys.stderr, flush=True)
    return rows


def _n(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: list[Row]) -> str:
    out = ["| model | variant | status | size ratio | task metric: fp32 -> quantized | output cosine [95% CI] "
           "| output SQNR dB [95% CI] | speed-up | what the options did |", "|---|---|---|---:|---|---|---|---:|---|"]
    for r in rows:
        metric = "-" if r.metric is None else \
            f"{r.metric}: {_n(r.metric_fp32, '.4g')} -> {_n(r.metric_quantized, '.4g')}"
        ci = "" if not r.cosine_ci else f" [{r.cosine_ci[0]:.5f}, {r.cosine_ci[1]:.5f}]"
        cos = "-" if r.cosine is None else f"{r.cosine:.5f}{ci}"
        sci = "" if not r.sqnr_db_ci else f" [{r.sqnr_db_ci[0]:.2f}, {r.sqnr_db_ci[1]:.2f}]"
        sq = "-" if r.sqnr_db is None else f"{r.sqnr_db:.2f}{sci}"
        out.append(f"| {r.model} | {r.variant} | {r.status} | {_n(r.size_ratio, '.3f')} | {metric} | {cos} | {sq} "
                   f"| {_n(r.speedup, '.2f')} | {r.did.replace('|', '/')} |")
    return "\n".join(out)


def summary(rows: list[Row]) -> str:
    """Per entry: what plain int8_static lost on the task metric, and the share of it each variant won back."""
    lines = ["share of plain int8_static's task-metric loss won back (1 = all of it, < 0 = worse than plain)"]
    for model in dict.fromkeys(r.model for r in rows):
        mine = {r.variant: r for r in rows if r.model == model}
        plain = mine.get("plain")
        if plain is None or plain.metric_quantized is None:
            continue
        fp32 = plain.metric_fp32
        if fp32 is None:  # a figure against fp32 itself (SNR): no fp32 value; use the output cosine instead
            fp32, got = 1.0, {k: r.cosine for k, r in mine.items()}
            what = "output cosine"
        else:
            got = {k: r.metric_quantized for k, r in mine.items()}
            what = plain.metric or ""
        lost = fp32 - (got.get("plain") or 0.0)
        db = "  ".join(f"{k} {r.sqnr_db - plain.sqnr_db:+.2f} dB" for k, r in mine.items()
                       if k != "plain" and r.sqnr_db is not None and plain.sqnr_db is not None)
        if abs(lost) < 1e-9:
            lines.append(f"  {model:22s} plain lost nothing on {what}; output SQNR against plain: {db}")
            continue
        base = got.get("plain")
        shares = "  ".join(f"{k} {((v - base) / lost):+.2f}" for k, v in got.items()
                           if v is not None and k != "plain" and base is not None)
        lines.append(f"  {model:22s} {what} lost {lost:.4g}: {shares}; output SQNR against plain: {db}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated corpus entries (default: all)")
    p.add_argument("--variants", help=f"comma-separated (default: {','.join(VARIANTS)})")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--auto-cosine", type=float, default=0.99, help="auto's accuracy target: cosine >= this")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per job")
    p.add_argument("--cache", type=Path, help="the corpus cache (default: $LOWBIT_ZOO_DIR or ~/.cache/lowbit/zoo)")
    p.add_argument("--keep", type=Path, help="keep artifacts, reports and logs in this folder")
    args = p.parse_args(argv)
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    from tests.zoo.corpus import NAMES, build_corpus

    names = args.models.split(",") if args.models else None
    missing = sorted(set(names or []) - set(NAMES))
    if missing:
        p.error(f"unknown model(s) {', '.join(missing)}; the corpus has {', '.join(NAMES)}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-accuracy-") as tmp:
        work = args.keep or Path(tmp)
        for entry in build_corpus(args.cache, names):
            if entry.expect != "quantizable":
                continue  # nothing to quantize or already quantized: zoo.py shows those refusals
            print(f"{entry.name} ({entry.task})", file=sys.stderr, flush=True)
            rows.extend(bench_entry(entry, variants, args, work))
    print(markdown(rows))
    print()
    print(summary(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
