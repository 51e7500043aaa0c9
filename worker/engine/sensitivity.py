"""Per-layer sensitivity: how much the model's outputs degrade when only one node is quantized.

For each quantizable node, a copy of the float model gets that node alone in int8, the way the static
recipe would quantize it: its activation inputs pass through QuantizeLinear/DequantizeLinear with the
calibrated range (uint8, asymmetric, zero exactly representable) and its weights are rounded to int8 per
output channel (symmetric, max|w|/127). Everything else stays in float. Two numbers come out per node:

- ``sensitivity``: the noise-to-signal power ratio of the model's outputs (the worst output), 0 for a
  node whose quantization changes nothing; ranking by it tells which layers to keep in float first;
- ``isolated_sqnr_db``: the SQNR of the node's own output with everything upstream in float (read off
  the same run, against a float twin of the node: what the node's quantization costs locally).

It costs one ONNX Runtime session and one model run per batch for every analysed node, so static jobs
measure it only when asked (option ``layer_sensitivity``; ``auto`` asks for it on its analysis candidate),
on at most ``MAX_SAMPLES`` samples and ``MAX_NODES`` nodes, and never keeps intermediate activations.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnx
from onnx import numpy_helper

from worker.engine import runtime
from worker.engine.calibrate import session_with
from worker.engine.validate import Merge, power_sums

# Operators whose weight input is rounded to int8 per output channel: (input index, channel axis).
WEIGHT_AXIS = {"MatMul": (1, 1), "Conv": (1, 0), "ConvTranspose": (1, 1)}
# At most this many nodes are analysed (one ONNX Runtime session and one run per batch each), spread over
# the graph when it has more; the report says how many were. A 100-conv detector at 640x640 then costs
# minutes, not the best part of an hour.
MAX_NODES = 128
# Samples the analysis runs on: it ranks layers, which a few batches do as well as many.
MAX_SAMPLES = 8


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    op_type: str
    sensitivity: float | None
    output_sqnr_db: float | None
    isolated_sqnr_db: float | None


@dataclass
class SensitivityResult:
    layers: dict[str, LayerSensitivity]
    samples: int
    seconds: float
    skipped: int

    def ranking(self) -> list[str]:
        """Node names, most sensitive first (nodes without a measurement left out)."""
        scored = [s for s in self.layers.values() if s.sensitivity is not None]
        return [s.name for s in sorted(scored, key=lambda s: (-float(s.sensitivity or 0.0), s.name))]


def _weight_axis(node: onnx.NodeProto) -> tuple[int, int] | None:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1, 0 if trans_b else 1
    return WEIGHT_AXIS.get(node.op_type)


def fake_quant_weight(w: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric int8 per channel along ``axis`` (how the static recipe stores weights), back in float."""
    if w.ndim < 2:
        scale = np.maximum(np.abs(w).max(initial=0.0) / 127.0, 1e-12)
        # numpy types a reduction's result as Any, and so what is computed from it
        return cast(np.ndarray, (np.clip(np.round(w / scale), -127, 127) * scale).astype(w.dtype))
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    scale = np.maximum(np.abs(flat).max(axis=1, keepdims=True) / 127.0, 1e-12)
    q = np.clip(np.round(flat / scale), -127, 127) * scale
    return cast(np.ndarray, np.moveaxis(q.reshape(moved.shape), 0, axis).astype(w.dtype))


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 scale and zero point of a calibrated range, zero included (as ONNX Runtime computes them)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    return float(scale), zp


def analysable(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], op_types: Iterable[str]) -> list[
        onnx.NodeProto]:
    """Nodes of ``op_types`` with at least one float input the static recipe would quantize."""
    kinds = set(op_types)
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in kinds or not node.name or not node.output:
            continue
        wa = _weight_axis(node)
        has_weight = wa is not None and len(node.input) > wa[0] and node.input[wa[0]] in inits and \
            inits[node.input[wa[0]]].data_type == onnx.TensorProto.FLOAT
        if has_weight or any(i in ranges for i in node.input if i):
            out.append(node)
    return out


def quantize_one(model: onnx.ModelProto, node_name: str, ranges: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """A copy of ``model`` with only ``node_name`` quantized (and its output exposed as a graph output)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    inits = {t.name: t for t in m.graph.initializer}
    wa = _weight_axis(node)
    new_nodes: list[onnx.NodeProto] = []
    for idx, name in enumerate(list(node.input)):
        if not name:
            continue
        if wa is not None and idx == wa[0] and name in inits and inits[name].data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(inits[name])
            q = numpy_helper.from_array(fake_quant_weight(w, wa[1] if w.ndim > wa[1] else 0), f"{name}__fq_{node_name}")
            m.graph.initializer.append(q)
            node.input[idx] = q.name
        elif name in ranges and name not in inits:
            scale, zp = activation_qparams(*ranges[name])
            tag = f"{name}__q_{node_name}"
            if any(f"{tag}_dq" in n.output for n in new_nodes):  # the same tensor twice (Mul(x, x))
                node.input[idx] = f"{tag}_dq"
                continue
            m.graph.initializer.extend([
                numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_scale"),
                numpy_helper.from_array(np.array(zp, np.uint8), f"{tag}_zp"),
            ])
            new_nodes += [
                onnx.helper.make_node("QuantizeLinear", [name, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"]),
                onnx.helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"]),
            ]
            node.input[idx] = f"{tag}_dq"
    if new_nodes:
        # Insert the Q/DQ pairs right before the node, keeping the graph topologically sorted.
        pos = list(m.graph.node).index(node)
        for k, n in enumerate(new_nodes):
            m.graph.node.insert(pos + k, n)
    _expose(m, [node.output[0]])
    return m


def _expose(m: onnx.ModelProto, names: Sequence[str]) -> None:
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))


def _selection(nodes: list[onnx.NodeProto], limit: int) -> list[onnx.NodeProto]:
    """At most ``limit`` nodes, spread evenly over the graph (first and last included) when there are more:
    a deterministic sample of every depth of the model rather than only its first layers."""
    if len(nodes) <= limit:
        return nodes
    if limit <= 1:
        return nodes[:limit]
    picks = sorted({round(i * (len(nodes) - 1) / (limit - 1)) for i in range(limit)})
    return [nodes[i] for i in picks]


def _base_file(model: onnx.ModelProto, path: Path) -> None:
    """``model`` without its nodes and outputs, written once: every analysed variant is this file plus a
    small delta (nodes, outputs, the few new initializers), see ``calibrate.session_with``. The weights
    are never re-serialized per layer."""
    base = onnx.ModelProto()
    base.CopyFrom(model)
    del base.graph.node[:]
    del base.graph.output[:]
    with open(path, "wb") as f:
        f.write(base.SerializeToString())


def _variant(model: onnx.ModelProto, node: onnx.NodeProto | None,
             ranges: dict[str, tuple[float, float]]) -> tuple[onnx.ModelProto, str, str]:
    """The delta for the float model (``node`` None) or for ``node`` alone in int8. For a node, a float
    twin of it (same inputs as in the float model, outputs renamed) runs in the same session, so that the
    node's own error is measured without keeping any reference activation: returns (delta, quantized
    output, float twin output)."""
    delta = onnx.ModelProto()
    delta.graph.output.extend(model.graph.output)
    if node is None:
        delta.graph.node.extend(model.graph.node)
        return delta, "", ""
    q = quantize_one(_nodes_only(model, node), node.name, ranges)
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    twin.name = f"{node.name}__float_twin"
    del twin.output[:]
    twin.output.extend([f"{o}__float_twin" if o else "" for o in node.output])
    delta.graph.node.extend(q.graph.node)
    delta.graph.node.append(twin)
    delta.graph.initializer.extend(q.graph.initializer)
    have = {o.name for o in delta.graph.output}
    for name in (node.output[0], twin.output[0]):
        if name not in have:
            delta.graph.output.append(onnx.ValueInfoProto(name=name))
    return delta, node.output[0], twin.output[0]


def _nodes_only(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    """The graph's nodes and outputs, and of the initializers only the weight ``node`` reads (which
    ``quantize_one`` rounds): a light model for it to edit, since the weights stay in the base file."""
    m = onnx.ModelProto()
    m.graph.node.extend(model.graph.node)
    wa = _weight_axis(node)
    if wa is not None and len(node.input) > wa[0]:
        w = next((t for t in model.graph.initializer if t.name == node.input[wa[0]]), None)
        if w is not None:
            m.graph.initializer.append(w)
    return m


def analyse(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    feeds: Sequence[dict[str, np.ndarray]],
    providers: list[str],
    threads: int,
    op_types: Iterable[str],
    samples: int,
    max_nodes: int = MAX_NODES,
    merge: Merge | None = None,
    max_per_run: int = 1,
    skip: Iterable[str] = (),
) -> SensitivityResult:
    """Sensitivity of the analysable nodes on ``feeds`` (a few batches are enough: it ranks layers).

    Memory does not grow with the model's depth: only the float model's outputs on ``feeds`` are kept
    (the reference), and each node's run brings back the model's outputs plus that node's output and its
    float twin's, compared and dropped at once. Time is one ONNX Runtime session and one run per feed for
    each of at most ``max_nodes`` nodes (spread over the graph when there are more). With ``merge`` (joining
    single-sample feeds into one batch), up to ``max_per_run`` samples go through each run."""
    started = time.perf_counter()
    # ``skip``: nodes a recipe added to the model (SmoothQuant's Muls, kept in float), no layers of the user's.
    skipped = set(skip)
    nodes = [n for n in analysable(model, ranges, op_types) if n.name not in skipped]
    chosen = _selection(nodes, max_nodes)
    out_names = [o.name for o in model.graph.output]
    if not chosen or not feeds:
        return SensitivityResult({}, 0, time.perf_counter() - started, len(nodes) - len(chosen))
    if merge is not None and max_per_run > 1:
        feeds = [merge(list(feeds[i:i + max_per_run])) if len(feeds[i:i + max_per_run]) > 1 else feeds[i]
                 for i in range(0, len(feeds), max_per_run)]
    with tempfile.TemporaryDirectory(prefix="lowbit-sensitivity-") as tmp:
        base = Path(tmp) / "base.onnx"
        _base_file(model, base)
        ref_s = session_with(base, _variant(model, None, ranges)[0], providers, threads)
        refs = [dict(zip(out_names, runtime.run(ref_s, f, "model (sensitivity)"), strict=True)) for f in feeds]
        del ref_s
        layers: dict[str, LayerSensitivity] = {}
        for node in chosen:
            delta, q_out, twin_out = _variant(model, node, ranges)
            s = session_with(base, delta, providers, threads)
            names = [o.name for o in s.get_outputs()]
            sig = np.zeros(len(out_names))
            err = np.zeros(len(out_names))
            own_sig = own_err = 0.0
            for feed, ref in zip(feeds, refs, strict=True):
                got = dict(zip(names, runtime.run(s, feed, "model (sensitivity)"), strict=True))
                for k, o in enumerate(out_names):
                    a, e = power_sums(ref[o], got[o])
                    sig[k] += a
                    err[k] += e
                a, e = power_sums(got[twin_out], got[q_out])
                own_sig += a
                own_err += e
                del got
            del s
            nsr = [e / g for e, g in zip(err, sig, strict=True) if g > 0]
            worst = max(nsr) if nsr else None
            layers[node.name] = LayerSensitivity(
                name=node.name,
                op_type=node.op_type,
                sensitivity=_round(worst),
                output_sqnr_db=_db(worst),
                isolated_sqnr_db=_db(own_err / own_sig if own_sig > 0 else None),
            )
    return SensitivityResult(layers, samples, time.perf_counter() - started, len(nodes) - len(chosen))


def _round(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(f"{v:.6g}")


def _db(nsr: float | None) -> float | None:
    """Noise-to-signal ratio as SQNR in dB; None for an exact result (infinite SQNR)."""
    if nsr is None or nsr <= 0 or not np.isfinite(nsr):
        return None
    return round(float(-10.0 * np.log10(nsr)), 3)

