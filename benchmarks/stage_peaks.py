"""Where a job's resident memory peaks: `lowbit quantize` run in this process while a thread samples the resident
set every millisecond and charges it to the pipeline stage the main thread is in.

    .venv/bin/python benchmarks/stage_peaks.py MODEL --calib CALIB.npz [--eval EVAL.npz] [--recipe int8_static]

Prints each stage's highest resident set (MB), highest first, and the process's peak. The sampler itself adds
a thread (its stack and a few frames), so the figures sit a little above those of `lowbit quantize` alone
(benchmarks/zoo.py measures that).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Innermost first: a sample is charged to the first of these found walking out from the running frame.
STAGES = ("smooth_static", "_calibrate", "quantize_static", "refine", "compare", "latency_pair", "layer_sqnr",
          "_prepare", "_quantize", "_validate", "_layers", "_report")


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--eval", type=Path)
    p.add_argument("--recipe", default="int8_static")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    main_thread = threading.get_ident()
    peaks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(main_thread)
            names = []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back
            stage = next((n for n in names if n in STAGES), "outside the pipeline")
            peaks[stage] = max(peaks.get(stage, 0.0), resident_mb())
            time.sleep(0.001)

    threading.Thread(target=sample, daemon=True).start()
    from app.cli import main as lowbit

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["quantize", str(args.model), "--calib", str(args.calib), "--recipe", args.recipe, "-o",
                str(Path(tmp) / "out.onnx"), "--threads", str(args.threads), "--device", "cpu"]
        if args.eval:
            argv += ["--eval", str(args.eval)]
        sys.argv = ["lowbit", *argv]
        try:
            code = lowbit()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    done.set()
    print(f"resident set by stage ({args.model.name}, {args.recipe}), MB:")
    for stage, mb in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {mb:7.1f}  {stage}")
    print(f"  process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB; lowbit exit {code}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
