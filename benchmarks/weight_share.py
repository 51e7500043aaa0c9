"""How much of plain int8_static's loss sits in the weights: the most that weight-side methods (cross-layer
equalization, bias correction, learned rounding) could win back on each corpus entry.

    .venv/bin/python benchmarks/weight_share.py [--models a,b] [--threads 2]

For each entry this runs ``plain`` int8_static (benchmarks/accuracy.py's: its accuracy steps off) as a
``lowbit quantize`` child process, then takes the artifact and replaces every activation QuantizeLinear ->
DequantizeLinear pair by a Clip to the range the pair represents (scale * (q_min - zero_point) to scale *
(q_max - zero_point)), which leaves the weights quantized exactly as they were and the activations clipped as
before but no longer rounded: "weights only". The Clip matters: ONNX Runtime's quantizer removes a Relu or Clip
that a Q/DQ pair follows, since the pair's range clips the same way, so dropping the pair alone would drop the
Relu (the earlier version of this script did, and its "weights only" figures on basic-pitch and the two PP-OCR
nets were those of models without their Relu/Clip). It prints the entry's task metric (benchmarks/zoo.py's headline) for
fp32, plain and weights only, and the weights' share of plain's loss, (fp32 - weights only) / (fp32 - plain).

The two losses need not add up, so it also measures the other side directly: the same job with ONNX Runtime's
quantizer asked for 16-bit weights instead of 8 (the activations as plain's: the same calibration, the same
ranges, 8 bits), "exact weights" (a 16-bit weight's rounding error is 1/256 of an 8-bit one's). No weight-side
method (cross-layer equalization, bias correction, learned rounding: each changes only the weights, the biases
and, by equalization, the split of a range between two convs) can do better than weights without error, so
(exact weights - plain) / (fp32 - plain) is about the most of plain's loss those methods can win back.
Equalization also moves the activations' ranges (channel c of the tensor between two convs divided by s_c), so
the same is measured on the equalized model too ("exact weights, equalized": equalization on, weights 16-bit):
the better of the two bounds what equalization + bias correction + learned rounding can reach. The 16-bit
weights are asked for in this script's own child (``--w16-child``), which wraps ONNX Runtime's quantize_static
and runs ``lowbit quantize`` in-process; lowbit itself has no such option.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoo  # noqa: E402  (the sibling benchmark: children, baselines, task metrics)

from worker.engine.auto import PLAIN_STATIC  # noqa: E402  (int8_static with its accuracy steps off)


def _pair_range(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[float, float]:
    """The float range a per-tensor QuantizeLinear represents: scale * (q_min - zero_point) .. scale * (q_max -
    zero_point), q_min/q_max those of its zero point's integer type (uint8 when it has none)."""
    scale = float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0])
    if len(q.input) > 2 and q.input[2]:
        zp_arr = numpy_helper.to_array(inits[q.input[2]])
        info = np.iinfo(zp_arr.dtype)
        zp = int(zp_arr.reshape(-1)[0])
    else:
        info, zp = np.iinfo(np.uint8), 0
    return scale * (int(info.min) - zp), scale * (int(info.max) - zp)


def weights_only(src: Path, dest: Path) -> int:
    """``src`` with each activation Q -> DQ pair (whose QuantizeLinear reads no initializer) replaced by a Clip to
    the pair's range; returns how many pairs went."""
    model = onnx.load(str(src))
    g = model.graph
    init_map = {i.name: i for i in g.initializer}
    inits = set(init_map)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    outputs = {o.name for o in g.output}
    drop: set[int] = set()
    clips: dict[int, list[onnx.NodeProto]] = {}  # by the Q each replaces: a Clip takes its Q's place in the order
    pairs = 0
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = readers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in outputs:
            continue
        if init_map.get(q.input[1]) is None or numpy_helper.to_array(init_map[q.input[1]]).size != 1:
            continue  # not a per-tensor pair with constant parameters: left as it is
        lo, hi = _pair_range(q, init_map)
        name = f"ws_clip_{pairs}"
        g.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), f"{name}_lo"),
                              numpy_helper.from_array(np.array(hi, np.float32), f"{name}_hi")])
        for d in dqs:
            drop.add(id(d))
        # Each DQ's output, written now by a Clip of the float tensor the Q read.
        clips[id(q)] = [helper.make_node("Clip", [q.input[0], f"{name}_lo", f"{name}_hi"], [d.output[0]],
                                         name=f"{name}_{k}") for k, d in enumerate(dqs)]
        pairs += 1
    # The Clips where their Q was: it read the same tensor, and every reader of a DQ comes after it.
    nodes = [c for n in g.node if id(n) not in drop for c in clips.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(dest))
    return pairs


W16_FLAG = "--w16-child"


def w16_child(argv: list[str]) -> int:
    """``lowbit quantize argv`` in this process, with ONNX Runtime's quantize_static asked for 16-bit weights
    (Q/DQ in the com.microsoft domain, which takes 16-bit types at any opset; the rest of the call as lowbit made
    it)."""
    import onnxruntime.quantization as ortq

    from app.cli import main as lowbit_main

    real = ortq.quantize_static

    def sixteen(*a: Any, **kw: Any) -> Any:
        kw["weight_type"] = ortq.QuantType.QInt16
        kw["extra_options"] = {**(kw.get("extra_options") or {}), "UseQDQContribOps": True}
        return real(*a, **kw)

    ortq.quantize_static = sixteen  # read at call time: ort_quant imports it inside the function
    return lowbit_main(argv)


def exact_weights_child(entry: Any, d: Path, args: argparse.Namespace, tag: str, options: dict[str, Any]
                        ) -> Path | None:
    """int8_static with ``options`` on ``entry``, 16-bit weights (see w16_child); its artifact, or None."""
    out = d / f"{tag}.onnx"
    cmd = zoo.lowbit_cmd(entry, "int8_static", out, d / f"{tag}.json", args, options)
    cmd = [sys.executable, str(Path(__file__).resolve()), W16_FLAG, *cmd[1:]]
    code, _secs, _peak = zoo.run_child(cmd, d / f"{tag}.log", args.timeout)
    return out if code == 0 else None


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == W16_FLAG:
        return w16_child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="basic_pitch,mtcnn_pnet_detector,mtcnn_pnet_pt2,oww_embedding",
                   help="corpus entries (default: the conv nets where plain int8_static loses task accuracy)")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    print("| model | metric | fp32 | plain | weights only | activation pairs removed | weights' share of the loss "
          "| exact weights (16-bit) | exact weights, equalized | most a weight-side method wins back |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for entry, d, base in zoo.references(args.models.split(","), args):
        out = zoo.lowbit_child(entry, "int8_static", dict(PLAIN_STATIC), d, "plain", args)
        if out is None or base.ref is None:
            print(f"| {entry.name} | - | - | {zoo.error_code(d / 'plain.log') if out is None else 'no reference'} "
                  "| - | - | - | - | - | - |")
            continue
        wo = d / "weights_only.onnx"
        pairs = weights_only(out, wo)
        paths: dict[str, Path | None] = {
            "plain": out, "weights_only": wo,
            "exact": exact_weights_child(entry, d, args, "exact_weights", dict(PLAIN_STATIC)),
            "exact_eq": exact_weights_child(entry, d, args, "exact_weights_equalized",
                                            {**PLAIN_STATIC, "equalize": "on"})}
        heads = {label: zoo.headline(entry, base.ref, zoo.outputs_of(path, entry.eval), base.labels)
                 for label, path in paths.items() if path is not None}
        got = {label: h[2] for label, h in heads.items() if h is not None}
        if heads["plain"] is None:
            print(f"| {entry.name} | no task metric | - | - | - | - | - | - | - | - |", flush=True)
            continue
        name, fp32, plain = heads["plain"]
        w = got["weights_only"]
        exact = [got[k] for k in ("exact", "exact_eq") if k in got]
        e_txt = [f"{got[k]:.4f}" if k in got else f"failed: {zoo.error_code(d / (log + '.log'))}"
                 for k, log in (("exact", "exact_weights"), ("exact_eq", "exact_weights_equalized"))]
        if fp32 is None:  # a figure of the quantized model against fp32 only (SNR): no loss to share
            print(f"| {entry.name} | {name} | - | {plain:.4f} | {w:.4f} | {pairs} | - | {e_txt[0]} | {e_txt[1]} | - |",
                  flush=True)
            continue
        lost = fp32 - plain
        share = "-" if abs(lost) < 1e-9 else f"{(fp32 - w) / lost:.2f}"
        most = "-" if abs(lost) < 1e-9 or not exact else f"{(max(exact) - plain) / lost:.2f}"
        print(f"| {entry.name} | {name} | {fp32:.4f} | {plain:.4f} | {w:.4f} | {pairs} | {share} | {e_txt[0]} "
              f"| {e_txt[1]} | {most} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
