"""How much of plain int8_static's loss sits in the weights: the most that weight-side methods (cross-layer
equalization, bias correction, learned rounding) could win back on each corpus entry.

    .venv/bin/python benchmarks/weight_share.py [--models a,b] [--threads 2]

For each entry this runs ``plain`` int8_static (benchmarks/accuracy.py's: its accuracy steps off) as a
``lowbit quantize`` child process, then takes the artifact and removes every activation QuantizeLinear ->
DequantizeLinear pair (the readers get the float tensor back), which leaves the weights quantized exactly as
they were and nothing else: "weights only". It prints the entry's task metric (benchmarks/zoo.py's headline) for
fp32, plain and weights only, and the weights' share of plain's loss, (fp32 - weights only) / (fp32 - plain). A
method that made the weights exact would win back about that share; the two losses need not add up exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoo  # noqa: E402  (the sibling benchmark: children, baselines, task metrics)

from worker.engine.auto import PLAIN_STATIC  # noqa: E402  (int8_static with its accuracy steps off)


def weights_only(src: Path, dest: Path) -> int:
    """``src`` without its activation Q -> DQ pairs (those whose QuantizeLinear reads no initializer); returns
    how many pairs went."""
    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name for i in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    outputs = {o.name for o in g.output}
    drop: set[int] = set()
    back: dict[str, str] = {}  # a DQ's output -> the float tensor its Q read
    pairs = 0
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = readers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in outputs:
            continue
        drop.add(id(q))
        for d in dqs:
            drop.add(id(d))
            back[d.output[0]] = q.input[0]
        pairs += 1
    def source(x: str) -> str:
        while x in back:  # a Q reading another pair's DQ (ONNX Runtime requantizes some tensors)
            x = back[x]
        return x

    kept = [n for n in g.node if id(n) not in drop]
    for n in kept:
        for k, x in enumerate(n.input):
            n.input[k] = source(x)
    # A graph output a DQ wrote is written again by an Identity of the float tensor.
    kept += [helper.make_node("Identity", [source(o)], [o]) for o in outputs if o in back]
    del g.node[:]
    g.node.extend(kept)
    onnx.save(model, str(dest))
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="basic_pitch,mtcnn_pnet_detector,mtcnn_pnet_pt2,oww_embedding",
                   help="corpus entries (default: the conv nets where plain int8_static loses task accuracy)")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    print("| model | metric | fp32 | plain | weights only | activation pairs removed | weights' share of the loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for entry, d, base in zoo.references(args.models.split(","), args):
        out = zoo.lowbit_child(entry, "int8_static", dict(PLAIN_STATIC), d, "plain", args)
        if out is None or base.ref is None:
            print(f"| {entry.name} | - | - | {zoo.error_code(d / 'plain.log') if out is None else 'no reference'} "
                  "| - | - | - |")
            continue
        wo = d / "weights_only.onnx"
        pairs = weights_only(out, wo)
        got: dict[str, Any] = {}
        for label, path in (("plain", out), ("weights_only", wo)):
            got[label] = zoo.headline(entry, base.ref, zoo.outputs_of(path, entry.eval), base.labels)
        name, fp32, plain = got["plain"]
        w = got["weights_only"][2]
        if fp32 is None:  # a figure of the quantized model against fp32 only (SNR): no loss to share
            print(f"| {entry.name} | {name} | - | {plain:.4f} | {w:.4f} | {pairs} | - |", flush=True)
            continue
        lost = fp32 - plain
        share = "-" if abs(lost) < 1e-9 else f"{(fp32 - w) / lost:.2f}"
        print(f"| {entry.name} | {name} | {fp32:.4f} | {plain:.4f} | {w:.4f} | {pairs} | {share} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
