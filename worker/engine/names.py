"""Shorter names for what quantization adds to a graph, so that a small model's artifact is not mostly names.

ONNX Runtime's quantizers name every tensor and node they add after the tensor it belongs to, plus a suffix
(``<t>_QuantizeLinear_Output``, ``<w>_quantized_scale``, ``<t>_DequantizeLinear``), and each name is written
out again wherever it is read. tf2onnx names a tensor by every TensorFlow op folded into it
(``model_1/re_lu_3/Relu;model_1/re_lu_3/Relu;model_1/batch_normalization_3/FusedBatchNormV3;...``, hundreds of
characters), so basic-pitch's int8 model came out at 1.38x its fp32 file, 215 KB of its 318 KB in node records
against 49 KB of weights. The names the uploaded model had stay as they were (the report's layer table and
every option name nodes and tensors by them); a long name that quantization added, starting with one of them,
gets that stem shortened to its first and last characters around a hash (the same stem always gets the same
short form, so ``<w>_quantized`` and ``<w>_scale`` still share one); the suffix stays. Shape annotations
(``value_info``) that preparation added for the quantizer and the upload did not have are dropped: ONNX Runtime
infers them when it loads the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from worker.engine.files import builtin_hash
from worker.engine.normalize import all_graphs

# Added names longer than this are shortened; shorter ones are left alone (nothing to win).
LONG = 48
# A stem's short form keeps this many characters at each end (the path prefix and the op at its end).
KEEP = 12
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True)
class Compacted:
    """What ``compact`` changed: tensor and node names shortened, shape annotations dropped."""

    tensors: int
    nodes: int
    value_info: int

    @property
    def changed(self) -> bool:
        return bool(self.tensors or self.nodes or self.value_info)


def graph_names(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Every tensor name and every node name of ``model``, subgraphs included."""
    tensors: set[str] = set()
    nodes: set[str] = set()
    for g in all_graphs(model):
        tensors.update(i.name for i in g.initializer)
        tensors.update(i.name for i in g.input)
        tensors.update(o.name for o in g.output)
        for n in g.node:
            tensors.update(n.input)
            tensors.update(n.output)
            nodes.add(n.name)
    tensors.discard("")
    nodes.discard("")
    return tensors, nodes


def short_stem(stem: str) -> str:
    return f"{stem[:KEEP]}~{builtin_hash('sha1', stem.encode()).hexdigest()[:8]}~{stem[-KEEP:]}"


def _shortened(name: str, known: set[str]) -> str:
    """``name``'s short form: the longest known name it starts with (cut before an underscore) shortened and
    the rest kept, or the whole name shortened when it starts with none."""
    cut = name.rfind("_")
    while cut > 0:
        stem = name[:cut]
        if stem in known:
            return short_stem(stem) + name[cut:] if len(stem) > 2 * KEEP + 10 else name
        cut = name.rfind("_", 0, cut)
    return short_stem(name)


def _plan(names: Iterable[str], known: set[str], taken: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        if name in known or len(name) <= LONG:
            continue
        short = _shortened(name, known)
        if short != name:
            out[name] = short
    if len(set(out.values())) != len(out) or set(out.values()) & (taken - set(out)):
        return {}  # a clash (two names' short forms, or a name the graph has): leave the names as they are
    return out


def compact(model: onnx.ModelProto, known_tensors: set[str], known_nodes: set[str],
            known_value_info: set[str]) -> Compacted:
    """Shorten, in place, the long tensor names and QuantizeLinear/DequantizeLinear node names of ``model`` that
    its source did not have (``known_*``: the source's names), and drop the main graph's shape annotations for
    tensors outside ``known_value_info``. Graph inputs and outputs keep their names (they are in the source).
    A model whose weights are in external files is left alone."""
    if any(i.data_location == onnx.TensorProto.EXTERNAL for g in all_graphs(model) for i in g.initializer):
        return Compacted(0, 0, 0)
    tensors, nodes = graph_names(model)
    io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    ren = _plan(sorted(tensors - io), known_tensors | known_nodes, tensors)
    qdq_nodes = sorted({n.name for g in all_graphs(model) for n in g.node if n.op_type in QDQ_OPS})
    nren = _plan(qdq_nodes, known_tensors | known_nodes, nodes)
    for g in all_graphs(model):
        for i in g.initializer:
            i.name = ren.get(i.name, i.name)
        for v in [*g.value_info, *g.input, *g.output]:
            v.name = ren.get(v.name, v.name)
        for n in g.node:
            for k, x in enumerate(n.input):
                n.input[k] = ren.get(x, x)
            for k, x in enumerate(n.output):
                n.output[k] = ren.get(x, x)
            if n.op_type in QDQ_OPS:
                n.name = nren.get(n.name, n.name)
    keep = [v for v in model.graph.value_info if v.name in known_value_info]
    dropped = len(model.graph.value_info) - len(keep)
    if dropped:
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
    return Compacted(len(ren), len(nren), dropped)
