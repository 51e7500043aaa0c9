"""Index math: the nodes of a graph that compute shapes, indices, coordinates or the inputs of a discrete
decision, which int8_static keeps in float (option ``float_index_math``).

A QDQ quantizer rounds every float activation it reaches to 8 bits, and exported graphs carry arithmetic on
values that 8 bits cannot hold: a resize's output size computed as ``Floor(Cast(Shape(x)) * 0.7)``, a grid of
pixel coordinates from ``Range`` scaled and floored into box corners, a score compared with a threshold, a
log-spectrogram normalised before an ``Equal``. Rounded to 256 steps, a floored coordinate moves by whole
pixels, a resize gets another size and a thresholded score flips; the real-model corpus' MTCNN detector (box
decoding in the graph) and basic-pitch (normalisation before an ``Equal``) lost most of their accuracy that way.
Two kinds of node are found:

- *shape nodes*: their outputs do not depend on the values of the model's inputs (only on shapes and constants:
  everything computed from ``Shape``, ``Size``, ``Range`` of those, constants). Such a node is data-independent,
  so 8 bits gain nothing there and only add error. Nodes that look a weight up (a ``Gather`` on a float table,
  a layer with a constant weight) are not counted: their weights are worth storing in 8 bits.
- *decision nodes*: nodes whose output reaches, through nodes without weights, an input whose exact value
  matters: the input of ``Floor``/``Ceil``/``Round``, a comparison, ``ArgMax``, a cast to an integer type, or
  an input that is a shape, an index, a size or a threshold (``Reshape``'s shape, ``Resize``'s scales and
  sizes, ``Slice``'s bounds, ``Gather``'s indices, ``NonMaxSuppression``'s limits, ...). The walk back stops
  at layers with weights (``Conv``, ``MatMul``, ...), which stay quantized.

Only the main graph is read (the QDQ quantizer does not reach into If/Loop/Scan bodies). Pure ONNX graph
analysis: no ONNX Runtime, no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

_INTEGER_TYPES = frozenset({
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})
# Operators whose output is a discrete function of their inputs: every input's exact value decides it.
DECISION_OPS = frozenset({
    "Floor", "Ceil", "Round", "Sign", "Mod", "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual",
    "ArgMax", "ArgMin", "IsNaN", "IsInf", "NonZero",
})
# Inputs (by position) that are shapes, indices, sizes, counts or thresholds, not data.
INDEX_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Tile": frozenset({1}), "ConstantOfShape": frozenset({0}),
    "Slice": frozenset({1, 2, 3, 4}), "Resize": frozenset({1, 2, 3}), "Upsample": frozenset({1}),
    "Range": frozenset({0, 1, 2}), "Pad": frozenset({1, 2, 3}), "TopK": frozenset({1}),
    "Gather": frozenset({1}), "GatherElements": frozenset({1}), "GatherND": frozenset({1}),
    "ScatterND": frozenset({1}), "ScatterElements": frozenset({1}), "OneHot": frozenset({0, 1}),
    "Unsqueeze": frozenset({1}), "Squeeze": frozenset({1}), "Split": frozenset({1}), "CumSum": frozenset({1}),
    "Trilu": frozenset({1}), "NonMaxSuppression": frozenset({2, 3, 4}),
    "ReduceSum": frozenset({1}), "ReduceMean": frozenset({1}), "ReduceMax": frozenset({1}),
    "ReduceMin": frozenset({1}), "ReduceProd": frozenset({1}), "ReduceL2": frozenset({1}),
}
# Layers with weights: the walk back from a decision stops at them (they stay quantized), as at the input of a
# Shape or Size node, whose output depends on its input's shape only.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "RNN"})
_SHAPE_OF = frozenset({"Shape", "Size"})
# Control flow: outputs counted as depending on the inputs' values (their bodies are not read).
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})


@dataclass(frozen=True)
class IndexMath:
    """What ``find`` found, each in graph order; ``nodes`` is both kinds."""

    shape_nodes: tuple[str, ...]
    decision_nodes: tuple[str, ...]
    nodes: tuple[str, ...]


def _reads_weight(node: onnx.NodeProto, float_inits: set[str]) -> bool:
    """A lookup or a layer whose weight the quantizer would store in 8 bits."""
    if node.op_type == "Gather":
        return bool(node.input) and node.input[0] in float_inits
    return node.op_type in WEIGHTED_OPS and any(i in float_inits for i in node.input[1:])


def _decision_inputs(node: onnx.NodeProto) -> list[str]:
    if node.op_type in DECISION_OPS:
        return [i for i in node.input if i]
    if node.op_type == "Cast" and any(a.name == "to" and a.i in _INTEGER_TYPES for a in node.attribute):
        return [i for i in node.input if i]
    positions = INDEX_INPUTS.get(node.op_type, frozenset())
    return [name for pos, name in enumerate(node.input) if pos in positions and name]


def find(model: onnx.ModelProto) -> IndexMath:
    """The main graph's shape nodes and decision nodes (see the module's docstring)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    float_inits = {t.name for t in graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.BFLOAT16)}
    # Forward: the tensors whose values depend on the model inputs' values (the graph is topologically sorted).
    valued = {i.name for i in graph.input if i.name not in inits}
    for node in graph.node:
        if node.op_type in _SHAPE_OF:
            continue
        if node.op_type in _SUBGRAPH_OPS or any(i in valued for i in node.input if i):
            valued.update(node.output)
    # Named nodes only: exclusion lists name them (normalize names every node of an uploaded model).
    shape_nodes = [n.name for n in graph.node if n.name and n.output and not any(o in valued for o in n.output)
                   and not _reads_weight(n, float_inits)]
    # Backward: from every input whose exact value matters, through the nodes that compute it.
    producer = {o: n for n in graph.node for o in n.output}
    pending = [name for n in graph.node for name in _decision_inputs(n)]
    seen: set[str] = set()
    decided: set[str] = set()
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None or node.op_type in WEIGHTED_OPS or node.op_type in _SUBGRAPH_OPS \
                or _reads_weight(node, float_inits):
            continue
        decided.add(node.name)
        if node.op_type not in _SHAPE_OF:
            pending.extend(i for i in node.input if i)
    shape_set = set(shape_nodes)
    decision_nodes = [n.name for n in graph.node if n.name and n.name in decided and n.name not in shape_set]
    both = shape_set | set(decision_nodes)
    return IndexMath(tuple(shape_nodes), tuple(decision_nodes), tuple(n.name for n in graph.node if n.name in both))
