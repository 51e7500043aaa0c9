"""Where a job's peak memory differs from ONNX Runtime's quantize_static on the same model: the resident set of
each mapping (a shared library's pages, the heap, anonymous memory) at each process's peak.

    .venv/bin/python benchmarks/peak_breakdown.py [--model oww_hey_jarvis] [--threads 2] [--runs 3]

Two kinds of fresh child process, run alternately ``--runs`` times each: ``lowbit quantize`` int8_static with its
defaults on the corpus entry's calibration and evaluation sets (what benchmarks/zoo.py times), and ONNX Runtime's
quantize_static with benchmarks/zoo.py's baseline settings on the same batches. In each, a thread samples the
resident set every millisecond and reads /proc/self/smaps whenever the resident set reaches a new high (by at
least 0.1 MB), so each breakdown is the one at the process's peak, to within that. Prints, per mapping and run
kind, the median over the runs in MB, the difference, and the medians of the peaks. The sampler's thread and its
reads of smaps add to both processes, though not by the same amount (a process whose heap has room left pays
less), so its figures locate a difference; whether a job keeps within ONNX Runtime's peak is benchmarks/zoo.py's
measure (the processes' own peak, nothing added). Linux only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STEP_KB = 100  # a new high of at least this much reads smaps again


def resident_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def smaps_kb() -> dict[str, int]:
    """Resident kB by mapping: a file's name (its folder left out), or [heap], [stack], [anon] and the like."""
    out: dict[str, int] = {}
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
                parts = line.split()
                name = parts[5].rsplit("/", 1)[-1] if len(parts) >= 6 else "[anon]"
            elif head == "Rss:":
                out[name] = out.get(name, 0) + int(line.split()[1])
    return out


class PeakSampler:
    """Samples the resident set every millisecond; keeps the smaps breakdown read at the highest one."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self.read_at_kb = 0
        self.breakdown: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            now = resident_kb()
            self.peak_kb = max(self.peak_kb, now)
            if now >= self.read_at_kb + STEP_KB:
                self.breakdown, self.read_at_kb = smaps_kb(), now
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def child(kind: str, files: dict[str, str], threads: int, out: Path) -> int:
    """In a fresh process: one job of ``kind`` ("lowbit" or "ort") on ``files`` (model, calib, eval), sampled."""
    with PeakSampler() as sampler, tempfile.TemporaryDirectory() as tmp:
        if kind == "lowbit":
            from app.cli import main as lowbit

            sys.argv = ["lowbit", "quantize", files["model"], "--calib", files["calib"], "--eval", files["eval"],
                        "-o", str(Path(tmp) / "out.onnx"), "--threads", str(threads), "--device", "cpu"]
            try:
                code = lowbit()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        else:
            import zoo

            spec = {"mode": "static", "model": files["model"], "calib": files["calib"],
                    "out": str(Path(tmp) / "out.onnx"), "batch_size": 8, "max_samples": 512}
            code = zoo.ort_child(argparse.Namespace(ort_child=json.dumps(spec)))
    out.write_text(json.dumps({"code": code, "peak_kb": sampler.peak_kb, "breakdown": sampler.breakdown}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="oww_hey_jarvis", help="a corpus entry with an ONNX file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--child", choices=("lowbit", "ort"), help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, json.loads(args.files), args.threads, args.out)
    from tests.zoo.corpus import build_corpus  # in this process only: it may import torch, which a child must not

    entry = build_corpus(names=[args.model])[0]
    if Path(entry.model).suffix != ".onnx":
        print(f"{args.model} is not an ONNX file: ONNX Runtime's quantizer cannot read it")
        return 1
    files = json.dumps({"model": str(entry.model), "calib": str(entry.calib), "eval": str(entry.eval)})
    got: dict[str, list[dict[str, Any]]] = {"lowbit": [], "ort": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for kind in ("lowbit", "ort"):
                out = Path(tmp) / f"{kind}-{run}.json"
                subprocess.run([sys.executable, __file__, "--child", kind, "--files", files, "--threads",
                                str(args.threads), "--out", str(out)], check=True, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                got[kind].append(json.loads(out.read_text()))
    for kind, runs in got.items():
        bad = [r["code"] for r in runs if r["code"] != 0]
        if bad:
            print(f"{kind}: a run exited {bad[0]}")
            return 1

    def median(kind: str, key: str) -> float:
        return statistics.median(r["breakdown"].get(key, 0) for r in got[kind]) / 1024

    names = {k for runs in got.values() for r in runs for k in r["breakdown"]}
    rows = sorted(((k, median("lowbit", k), median("ort", k)) for k in names), key=lambda r: -abs(r[1] - r[2]))
    print(f"{args.model}: resident MB by mapping at each process's peak, median of {args.runs} runs each")
    print(f"  {'mapping':48s} {'lowbit':>8s} {'ORT':>8s} {'diff':>7s}")
    for name, a, b in rows:
        if abs(a - b) >= 0.05:
            print(f"  {name[:48]:48s} {a:8.2f} {b:8.2f} {a - b:+7.2f}")
    rest = sum(a - b for _, a, b in rows if abs(a - b) < 0.05)
    print(f"  {'(the other mappings, each under 0.05)':48s} {'':8s} {'':8s} {rest:+7.2f}")
    low = statistics.median(sum(r["breakdown"].values()) for r in got["lowbit"]) / 1024
    ort = statistics.median(sum(r["breakdown"].values()) for r in got["ort"]) / 1024
    print(f"  {'total at the breakdown':48s} {low:8.2f} {ort:8.2f} {low - ort:+7.2f}")
    pl = statistics.median(r["peak_kb"] for r in got["lowbit"]) / 1024
    po = statistics.median(r["peak_kb"] for r in got["ort"]) / 1024
    print(f"  {'peak resident set (sampled)':48s} {pl:8.2f} {po:8.2f} {pl - po:+7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
