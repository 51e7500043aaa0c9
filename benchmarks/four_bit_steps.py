"""What auto's 4-bit candidates are made of, on one real-model corpus entry: 4-bit weights with the embedding tables
in float or in 4 bits, 0 to all MatMuls in 8 bits (int4_weight_only option int8_most_sensitive), each computed in
float (MatMulNBits accuracy_level 0) and in int8 (level 4, what auto's candidates use).

    .venv/bin/python benchmarks/four_bit_steps.py [--model minilm_onnx] [--eight 0,4,12,all]

Each row is one ``lowbit quantize --recipe int4_weight_only`` job in a child process, on the entry's calibration and
evaluation sets (the corpus cache, built by ``python -m tests.zoo.corpus``); printed from its report: size against
fp32, each output's cosine on the evaluation set, and the speed-up against fp32 at batch 1 (both measured in the
job's own run). Figures are from this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("LOWBIT_ZOO_DIR", Path.home() / ".cache/lowbit/zoo"))
ALL = 4096  # int8_most_sensitive's upper bound: every MatMul in 8 bits


def job(entry: Path, options: dict[str, object], out: Path) -> dict[str, object]:
    """One int4_weight_only job; its report."""
    model = next(p for p in (entry / "model.onnx", entry / "model.pt2") if p.exists())
    cmd = [sys.executable, "-m", "app.cli", "quantize", str(model), "--calib", str(entry / "calib.npz"),
           "--recipe", "int4_weight_only", "-o", str(out / "q.onnx"), "--report", str(out / "r.json"),
           "--threads", "2"]
    if (entry / "eval.npz").exists():
        cmd += ["--eval", str(entry / "eval.npz")]
    for key, value in options.items():
        cmd += ["--option", f"{key}={json.dumps(value)}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    report: dict[str, object] = json.loads((out / "r.json").read_text())
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm_onnx", help="corpus entry (default: minilm_onnx)")
    p.add_argument("--eight", default="0,4,12,all", help="MatMuls in 8 bits, comma-separated ('all': every one)")
    args = p.parse_args()
    entry = ZOO / "corpus" / args.model
    if not entry.is_dir():
        print(f"no corpus entry {entry}: build the corpus first (python -m tests.zoo.corpus)", file=sys.stderr)
        return 2
    counts = [ALL if c == "all" else int(c) for c in args.eight.split(",")]
    rows = [(False, 0)] + [(True, n) for n in counts]
    print(f"{args.model}: int4_weight_only (block 32, symmetric, clip_search), by embedding tables, MatMuls in 8 bits "
          "and accuracy_level")
    print(f"  {'embeddings':<10} {'8-bit':>5} {'level':>5} {'size':>7}  {'cosine (per output)':<24} {'speed-up':>8}")
    for embeddings, eight in rows:
        for level in (0, 4):
            with tempfile.TemporaryDirectory() as tmp:
                report = job(entry, {"quantize_embeddings": embeddings, "int8_most_sensitive": eight,
                                     "accuracy_level": level}, Path(tmp))
            label = f"  {'4-bit' if embeddings else 'float':<10} {'all' if eight == ALL else eight:>5} {level:>5}"
            if "error" in report:
                print(f"{label}  failed: {report['error']}")
                continue
            size = report["size"]["ratio"]  # type: ignore[index]
            cosines = ", ".join(f"{o.get('cosine'):.4f}" for o in report["accuracy"]["outputs"])  # type: ignore[index]
            speedup = report["latency"].get("speedup")  # type: ignore[attr-defined]
            print(f"{label} {size:7.4f}  {cosines:<24} {speedup if speedup is not None else '-':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
