"""Cross-layer equalization (CLE) of conv chains, before int8 quantization (issue #18).

A Conv whose output channels have very different weight ranges, feeding another Conv, loses those channels to
int8: its activation (one scale per tensor) and the next conv's weights (one scale per *output* channel, so the
input channels share it) both spend their levels on the widest channel. Between the two layers a positive
per-channel scale ``s_i`` can be moved freely when everything between them is positively homogeneous channel
by channel (f(s x) = s f(x) for s > 0: ReLU, LeakyReLU, PReLU, max/average pooling, zero padding, identity):
dividing output channel i of the first conv (weights and bias) by ``s_i`` and multiplying input channel i of the
second by ``s_i`` leaves the function unchanged. With ``s_i = sqrt(r1_i / r2_i)`` (r1_i: the first conv's range
of output channel i, r2_i: the second's range of input channel i) both become sqrt(r1_i * r2_i), equal; chains of
several convs are swept a few times until the scales settle.

ReLU6 (Clip), HardSwish, HardSigmoid, Sigmoid and the like are not homogeneous (the clip at 6 moves with the
scale), so a pair joined by one is skipped and listed with the operator that blocked it. BatchNormalization
right after a conv is folded into it first (ONNX Runtime's pre-processing, worker/engine/normalize.py, usually
has done so already).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

# Channel-wise positively homogeneous operators a conv's output may pass through on its way to the next conv.
PASS_THROUGH = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity", "MaxPool", "AveragePool", "Dropout"})
# Operators that would make the scale move through them change the function: their pairs are skipped.
BLOCKING = frozenset({"Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus",
                      "Gelu", "Mish", "Erf", "ThresholdedRelu", "Softsign"})
# Sweeps over all pairs, at most, and the largest remaining |log s| that counts as converged.
MAX_SWEEPS = 20
CONVERGED = 1e-4


@dataclass(frozen=True)
class Pair:
    """Two convs whose shared channels can be rescaled: ``first``'s output channels are ``second``'s input
    channels, through ``via`` (the operators between, in order)."""

    first: str
    second: str
    via: tuple[str, ...]


@dataclass
class Equalized:
    """What equalization did to a copy of the model (``model``); ``pairs`` empty: nothing to equalize."""

    model: onnx.ModelProto
    pairs: list[Pair]
    skipped: list[dict[str, str]]
    folded_batchnorms: int
    sweeps: int = 0
    # Geometric mean over the pairs of max_i r1_i / min_i r1_i (the first conv's per-output-channel weight
    # ranges, channels with a zero range left out): the spread a per-tensor activation scale has to cover.
    spread_before: float | None = None
    spread_after: float | None = None
    # Each tensor on an equalized chain (the first conv's output and what the operators between make of it):
    # its channel c in the equalized model is the original's divided by scales[tensor][c]. Every other tensor
    # keeps its values.
    channel_scales: dict[str, np.ndarray] = field(default_factory=dict)


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def _float_init(inits: dict[str, onnx.TensorProto], name: str) -> bool:
    t = inits.get(name)
    return t is not None and t.data_type == onnx.TensorProto.FLOAT


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _homogeneous(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` (on the chain's tensor, its first input) commutes with a positive per-channel scale."""
    if node.op_type in PASS_THROUGH:
        return True
    if node.op_type == "Max" and len(node.input) == 2 and node.input[1] in inits:
        # Max(x, 0) is a ReLU; a non-zero floor moves with the scale.
        return bool(np.all(numpy_helper.to_array(inits[node.input[1]]) == 0))
    if node.op_type == "Pad":
        mode = _attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant" or len(node.input) < 3 or not node.input[2]:
            return True  # reflect/edge copy values; constant without a value pads with 0
        value = inits.get(node.input[2])
        return value is not None and bool(np.all(numpy_helper.to_array(value) == 0))
    return False


def fold_batchnorms(model: onnx.ModelProto) -> int:
    """Fold each inference BatchNormalization that alone reads a Conv's output into that Conv (weights and bias
    scaled per channel: the same function). Returns how many were folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    folded: list[onnx.NodeProto] = []
    for bn in graph.node:
        conv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or len(bn.output) != 1 or conv.output[0] in outputs:
            continue
        if len(readers.get(conv.output[0], [])) != 1 or not all(_float_init(inits, n) for n in bn.input[1:5]):
            continue
        if not _float_init(inits, conv.input[1]) or len(readers.get(conv.input[1], [])) != 1:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        a = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = _conv_bias(conv, inits, w.shape[0])
        _set(inits, conv.input[1], w * a.reshape(-1, *([1] * (w.ndim - 1))))
        _put_bias(model, conv, inits, (b - mean) * a + beta)
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    return len(folded)


def _conv_bias(conv: onnx.NodeProto, inits: dict[str, onnx.TensorProto], channels: int) -> np.ndarray:
    if len(conv.input) > 2 and conv.input[2]:
        return numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
    return np.zeros(channels)


def _set(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _put_bias(model: onnx.ModelProto, conv: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
              value: np.ndarray) -> None:
    """Write ``value`` as ``conv``'s bias, adding a bias initializer when it had none."""
    if len(conv.input) > 2 and conv.input[2]:
        _set(inits, conv.input[2], value)
        return
    name = f"{conv.name or conv.output[0]}_lowbit_bias"
    while name in inits:
        name += "_"
    model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    inits[name] = model.graph.initializer[-1]
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[2] = name


def _blocking(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str:
    """Why rescaling through ``node`` would change the model ("" when it would not, or when ``node`` simply ends
    the chain: an Add, a Concat, a reshape...)."""
    if node.op_type in BLOCKING:
        return f"{node.op_type} between them is not positively homogeneous (f(s x) != s f(x))"
    if node.op_type in ("Max", "Pad") and not _homogeneous(node, inits) and len(node.input) > 1 \
            and all(n in inits for n in node.input[1:] if n):
        return f"{node.op_type} with a non-zero constant between them moves with the scale"
    return ""


def _hard_swish(tensor: str, nxt: list[onnx.NodeProto],
                readers: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto | None:
    """The Mul that ends ``tensor`` * HardSigmoid(``tensor``), HardSwish as ONNX Runtime's pre-processing leaves it
    (PP-LCNet), when those two nodes are the tensor's only readers; else None."""
    if len(nxt) != 2 or {n.op_type for n in nxt} != {"HardSigmoid", "Mul"}:
        return None
    sig = next(n for n in nxt if n.op_type == "HardSigmoid")
    mul = next(n for n in nxt if n.op_type == "Mul")
    if set(mul.input) != {tensor, sig.output[0]} or len(readers.get(sig.output[0], [])) != 1:
        return None
    return mul


def find_pairs(model: onnx.ModelProto) -> tuple[list[Pair], list[dict[str, str]]]:
    """Conv -> (homogeneous ops) -> Conv chains whose shared channels can be rescaled, and the ones found but
    skipped, each with the reason. Every tensor on a chain must have one reader and not be a graph output, and
    both convs' weights (and the first's bias) must be float initializers. A weight several convs share (a
    detector running one network at several scales) is rescaled only when every conv reading it is in a pair
    with the same weights: the same scales then suit them all."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    found: list[Pair] = []
    skipped: list[dict[str, str]] = []
    for first in graph.node:
        if first.op_type != "Conv" or len(first.input) < 2:
            continue
        via: list[str] = []
        blocked = ""
        tensor = first.output[0]
        while True:
            nxt = readers.get(tensor, [])
            swish = _hard_swish(tensor, nxt, readers)
            if swish is not None and tensor not in outputs:
                blocked = blocked or ("HardSwish (x * HardSigmoid(x)) between them is not positively homogeneous: "
                                      "rescaling would change the model")
                via.append("HardSwish")
                tensor = swish.output[0]
                continue
            if tensor in outputs or len(nxt) != 1 or nxt[0].input[0] != tensor:
                break
            node = nxt[0]
            if node.op_type == "Conv":
                reason = blocked or _unusable(first, node, inits)
                if reason:
                    skipped.append({"first": first.name, "second": node.name, "reason": reason})
                else:
                    found.append(Pair(first.name, node.name, tuple(via)))
                break
            why = _blocking(node, inits)
            if why:
                blocked = blocked or why + ": rescaling would change the model"
            elif not _homogeneous(node, inits):
                break
            via.append(node.op_type)
            tensor = node.output[0]
    pairs = _whole_groups(graph, found, skipped, readers)
    return pairs, skipped


def _weights(node: onnx.NodeProto) -> tuple[str, str]:
    return node.input[1], node.input[2] if len(node.input) > 2 else ""


def _whole_groups(graph: onnx.GraphProto, found: list[Pair], skipped: list[dict[str, str]],
                  readers: dict[str, list[onnx.NodeProto]]) -> list[Pair]:
    """The pairs whose weights no node outside pairs with the same weights reads (the others go to ``skipped``)."""
    nodes = {n.name: n for n in graph.node}
    key_of = {p: (*_weights(nodes[p.first]), nodes[p.second].input[1]) for p in found}
    members: dict[tuple[str, str, str], list[Pair]] = {}
    for p, key in key_of.items():
        members.setdefault(key, []).append(p)
    ok: list[Pair] = []
    for key, group in members.items():
        firsts = {p.first for p in group}
        seconds = {p.second for p in group}
        w1, b1, w2 = key
        whole = ({n.name for n in readers.get(w1, [])} == firsts and {n.name for n in readers.get(w2, [])} == seconds
                 and (not b1 or {n.name for n in readers.get(b1, [])} == firsts))
        if whole:
            ok.extend(group)
        else:
            skipped.extend({"first": p.first, "second": p.second,
                            "reason": "a weight of the pair is shared with a node outside such pairs"} for p in group)
    return ok


def _unusable(first: onnx.NodeProto, second: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str:
    """Why this Conv pair cannot be rescaled ("" when it can)."""
    names = [first.input[1], second.input[1]]
    if len(first.input) > 2 and first.input[2]:
        names.append(first.input[2])
    for name in names:
        if not _float_init(inits, name):
            return f"{name} is not a float32 initializer"
    if first.input[1] == second.input[1]:
        return "both convs use the same weight"
    w1, w2 = (inits[n].dims for n in names[:2])
    group = int(_attr(second, "group", 1))
    if len(w2) < 2 or w2[1] * group != w1[0]:
        return "the second conv's input channels do not match the first's output channels"
    return ""


def _channel_ranges(w1: np.ndarray, w2: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """r1_i = max|W1[i, ...]| and r2_i = max over the second conv's weights that read input channel i (its
    group's output rows, column i mod channels-per-group)."""
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
    per_group = w2.shape[1]
    rows = w2.shape[0] // group
    a = np.abs(w2.reshape(group, rows, per_group, -1)).max(axis=(1, 3))  # [group, per_group]
    return r1, a.reshape(-1)


def _scale_second(w2: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    per_group, rows = w2.shape[1], w2.shape[0] // group
    shaped = w2.reshape(group, rows, per_group, -1) * s.reshape(group, 1, per_group, 1)
    return np.asarray(shaped.reshape(w2.shape))


def _spread(r: np.ndarray) -> float | None:
    live = r[r > 0]
    return float(live.max() / live.min()) if live.size else None


def _geomean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return float(math.exp(sum(math.log(v) for v in vals) / len(vals))) if vals else None


@dataclass(frozen=True)
class _Link:
    """One rescaling: the first conv's weight and bias (bias "" for none), the second's weight and group."""

    w1: str
    b1: str
    w2: str
    group: int


def _links(model: onnx.ModelProto, pairs: list[Pair]) -> list[_Link]:
    """The pairs as weight tensors, each once (pairs that share their weights rescale them together)."""
    nodes = {n.name: n for n in model.graph.node}
    out: dict[tuple[str, str, str], _Link] = {}
    for p in pairs:
        w1, b1 = _weights(nodes[p.first])
        w2 = nodes[p.second].input[1]
        out.setdefault((w1, b1, w2), _Link(w1, b1, w2, int(_attr(nodes[p.second], "group", 1))))
    return list(out.values())


def _sweep(links: list[_Link], weights: dict[str, np.ndarray], biases: dict[str, np.ndarray],
           applied: dict[_Link, np.ndarray]) -> float:
    """One pass of s_i = sqrt(r1_i / r2_i) over every link; returns the largest |log s| applied. ``applied``
    holds each link's scales so far (their product over the sweeps)."""
    worst = 0.0
    for k in links:
        w1, w2 = weights[k.w1], weights[k.w2]
        r1, r2 = _channel_ranges(w1, w2, k.group)
        # A dead channel (zero range on either side) keeps scale 1: there is nothing to balance.
        ok = (r1 > 0) & (r2 > 0)
        s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
        weights[k.w1] = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
        if k.b1:
            biases[k.b1] = biases[k.b1] / s
        weights[k.w2] = _scale_second(w2, s, k.group)
        applied[k] = applied[k] * s if k in applied else s
        worst = max(worst, float(np.abs(np.log(s)).max()))
    return worst


def _folded_pairs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, list[Pair], list[dict[str, str]]] | None:
    """A copy of ``model`` with its BatchNorms folded, how many were, and its pairs (found, skipped); None when
    the model has fewer than two convs (no pair possible: spare copying the model, a transformer's weights)."""
    if sum(1 for n in model.graph.node if n.op_type == "Conv") < 2:
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    folded = fold_batchnorms(copy)
    return copy, folded, *find_pairs(copy)


def equalize(model: onnx.ModelProto) -> Equalized:
    """A copy of ``model`` with its BatchNorms folded and every equalizable conv pair's channels rescaled."""
    found = _folded_pairs(model)
    if found is None:
        return Equalized(model, [], [], 0)
    eq, folded, pairs, skipped = found
    result = Equalized(eq, pairs, skipped, folded)
    if not pairs:
        return result
    links = _links(eq, pairs)
    inits = {t.name: t for t in eq.graph.initializer}
    weights = {n: numpy_helper.to_array(inits[n]).astype(np.float64) for k in links for n in (k.w1, k.w2)}
    biases = {k.b1: numpy_helper.to_array(inits[k.b1]).astype(np.float64) for k in links if k.b1}

    def spread() -> float | None:
        return _geomean([_spread(_channel_ranges(weights[k.w1], weights[k.w2], k.group)[0]) for k in links])

    result.spread_before = spread()
    applied: dict[_Link, np.ndarray] = {}
    for sweep in range(1, MAX_SWEEPS + 1):
        result.sweeps = sweep
        if _sweep(links, weights, biases, applied) < CONVERGED:
            break
    result.spread_after = spread()
    for name, value in [*weights.items(), *biases.items()]:
        _set(inits, name, value)
    link_of = {(k.w1, k.b1, k.w2): k for k in links}
    nodes = {n.name: n for n in eq.graph.node}
    for p, tensors in chain_tensors(eq, pairs).items():
        k = link_of[(*_weights(nodes[p.first]), nodes[p.second].input[1])]
        for t in tensors:
            result.channel_scales[t] = applied.get(k, np.ones(1))
    return result


def chain_tensors(model: onnx.ModelProto, pairs: list[Pair]) -> dict[Pair, list[str]]:
    """Each pair's chain: the first conv's output and the outputs of the operators between it and the second
    conv (find_pairs made sure each has that one reader)."""
    readers = _readers(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    out: dict[Pair, list[str]] = {}
    for p in pairs:
        tensor = nodes[p.first].output[0]
        tensors = [tensor]
        while True:
            node = readers[tensor][0]
            if node.name == p.second:
                break
            tensor = node.output[0]
            tensors.append(tensor)
        out[p] = tensors
    return out


def chains(model: onnx.ModelProto) -> dict[str, int]:
    """The tensors equalization would rescale channel by channel (on a copy with its BatchNorms folded, whose
    conv outputs take the BatchNorms' output names, so each name is a tensor of ``model`` holding the same
    values), each with its rank (the first conv's weight's)."""
    found = _folded_pairs(model)
    if found is None:
        return {}
    copy, _, pairs, _ = found
    inits = {t.name: t for t in copy.graph.initializer}
    nodes = {n.name: n for n in copy.graph.node}
    return {t: len(inits[nodes[p.first].input[1]].dims)
            for p, tensors in chain_tensors(copy, pairs).items() for t in tensors}
