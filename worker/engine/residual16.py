"""The residual stream of transformer blocks in 16 bits (int8_static option residual_16bit, issue #18).

Transformer encoders lose int8_static to a few tensors, not to their weights (README, all-MiniLM-L6-v2: plain
int8 cosine 0.369): the residual stream, whose channels grow outliers block after block (up to 109x the median
channel at the last LayerNorm inputs), and the attention scores plus mask before each Softmax, which hold
float32's minimum so that any 8- or 16-bit range leaves the scores one level. This module finds, by the graph's
structure, the tensors that carry the residual stream: every LayerNormalization's input (or a decomposed one's:
ReduceMean and Sub reading the same tensor), the outputs of the residual Adds (two activations added, feeding no
Softmax), their other inputs (the attention and FFN output projections' bias Adds) and what those bias Adds read
(the projections' MatMul outputs), plus each Softmax's output; and the Softmax nodes, which stay in float. With
those 44 tensors in 16 bits and the 6 Softmax in float, all-MiniLM-L6-v2 reaches cosine 0.985 at 0.252 of its fp32
size (benchmarks/a16.py), its weights all int8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from worker.engine.ort_quant import a16_tensors


@dataclass
class ResidualStream:
    """The tensors to widen and the Softmax nodes to keep in float; empty when the graph has no transformer
    block (no LayerNorm, or no residual Add)."""

    tensors: list[str] = field(default_factory=list)
    softmax_nodes: list[str] = field(default_factory=list)
    layernorms: int = 0
    residual_adds: int = 0


def _layernorm_inputs(model: onnx.ModelProto) -> list[str]:
    """LayerNormalization inputs, and those of LayerNorms exported as ops: ReduceMean(x) and Sub(x, mean)."""
    out = [n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type != "ReduceMean" or not n.input:
            continue
        x = n.input[0]
        if any(r.op_type == "Sub" and list(r.input[:2]) == [x, n.output[0]] for r in readers.get(x, [])):
            out.append(x)
    return list(dict.fromkeys(out))


def residual_stream(model: onnx.ModelProto, op_types: Sequence[str] = ()) -> ResidualStream:
    """The residual stream's tensors in ``model`` (the prepared or smoothed float model), only those the static
    quantizer would quantize."""
    consts = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    norms = _layernorm_inputs(model)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    residual = [n for n in model.graph.node
                if n.op_type == "Add" and len(n.input) == 2 and all(i in producer for i in n.input)
                and not set(n.input) & consts and "Softmax" not in readers.get(n.output[0], [])]
    if not norms or not residual:
        return ResidualStream(layernorms=len(norms), residual_adds=len(residual))
    bias_out = [i for n in residual for i in n.input
                if producer[i].op_type == "Add" and producer[i] not in residual and set(producer[i].input) & consts]
    bias_in = [i for t in bias_out for i in producer[t].input if i not in consts]
    softmax_in = {n.input[0] for n in softmax}
    wanted = [*norms, *(n.output[0] for n in residual), *bias_out, *bias_in, *(n.output[0] for n in softmax)]
    tensors = a16_tensors(model, [t for t in dict.fromkeys(wanted) if t not in softmax_in], op_types, strict=False)
    return ResidualStream(tensors, [n.name for n in softmax if n.name], len(norms), len(residual))
