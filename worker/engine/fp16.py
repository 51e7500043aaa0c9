"""float16 weights and compute, with float32 inputs/outputs kept by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from worker.engine.calibrate import Batches, CalibrationSettings, calibrate
from worker.engine.errors import EngineError
from worker.engine.feeds import batch_source, plan_feeds

if TYPE_CHECKING:  # annotations only: the option tables import the recipes, whose fp16 handler imports this module
    from worker.engine.config import QuantizeConfig, RecipeOptions
    from worker.engine.context import RunData
    from worker.engine.inspect import ModelInfo

# Kept in float32 on top of ONNX Runtime's default list: ops whose fp16 results overflow or lose too
# much (large reductions, exponentials, normalisation statistics) or that have no fp16 CPU kernel.
FP16_UNSAFE = (
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceLogSumExp",
    "Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "Range", "CumSum",
    "TopK", "NonMaxSuppression", "RoiAlign", "Resize", "Upsample", "Einsum",
    # No float16 kernel on ONNX Runtime's CPU: fracast's mask check (IsInf) made the artifact unloadable.
    "IsInf", "IsNaN",
)


# float16's largest finite value. A node whose inputs or outputs reach FP16_MAX / FP16_HEADROOM on the
# calibration data stays in float32: the headroom covers inputs somewhat larger than the calibration set's.
FP16_MAX = 65504.0
FP16_HEADROOM = 4.0


@dataclass
class RangeCheck:
    nodes: list[str]  # nodes kept in float32 for their range
    peak: float  # the largest magnitude seen among their tensors
    samples: int
    seconds: float


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float32 graph input and node output of the main graph that shape inference typed."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input,
                                                           *model.graph.output]}
    names = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output if o]
    return [t for t in dict.fromkeys(names) if types.get(t) == onnx.TensorProto.FLOAT]


def range_check(model_path: Path, model: onnx.ModelProto, batches: Batches, providers: list[str],
                threads: int) -> RangeCheck:
    """Run the float model on calibration data and find the nodes whose values float16 cannot hold.

    ONNX Runtime's converter decides by op type only; a mel-spectrogram front end fed int16-scale audio
    squares STFT outputs of ~1e5 into ~1e10, which is infinity in float16, and every output became
    infinite or NaN. Keeping those nodes in float32 is what makes such a model convertible."""
    cal = calibrate(model_path, float_tensors(model), batches, CalibrationSettings("minmax"), providers, threads,
                    model=model)
    limit = FP16_MAX / FP16_HEADROOM
    # A tensor already infinite in float32 (a -inf attention mask) is as infinite in float16: not a reason.
    peaks = {t: max(abs(lo), abs(hi)) for t, (lo, hi) in cal.stats.items() if t not in cal.nonfinite_tensors}
    big = {t for t, v in peaks.items() if limit < v < float("inf")}
    nodes = [n.name for n in model.graph.node if big & {*n.input, *n.output}]
    return RangeCheck(nodes, max((peaks[t] for t in big), default=0.0), cal.samples, cal.seconds)


def calibration_range_check(cfg: QuantizeConfig, opts: RecipeOptions, info: ModelInfo, data: RunData,
                            model_path: Path, model: onnx.ModelProto, providers: list[str]) -> RangeCheck | None:
    """With a calibration set, the nodes whose values overflow float16 (see range_check)."""
    if data.calib_reader is None:
        return None
    reader = data.calib_reader
    plan = plan_feeds(info.inputs, reader.info, opts.batch_size, "calibration")
    stop = min(reader.info.num_samples, opts.max_calibration_samples)
    return range_check(model_path, model, batch_source(reader, info.inputs, plan, 0, stop), providers, cfg.threads)


def block_list(opts: RecipeOptions) -> list[str]:
    """The op types kept in float32: option op_block_list, else ONNX Runtime's list and FP16_UNSAFE."""
    return list(opts.op_block_list) if opts.op_block_list is not None else [*DEFAULT_OP_BLOCK_LIST, *FP16_UNSAFE]


def convert_graph(model: onnx.ModelProto, opts: RecipeOptions, keep_nodes: Sequence[str] = (),
                  infer: bool = True) -> onnx.ModelProto:
    """ONNX Runtime's float16 conversion of ``model`` (changed in place too), then the repairs below.
    ``keep_nodes`` and the user's excluded nodes stay in float32. ``infer`` False: the model's shapes are
    inferred already."""
    block = block_list(opts)
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=opts.keep_io_types, op_block_list=block, disable_shape_infer=not infer,
            node_block_list=list(dict.fromkeys([*opts.nodes_to_exclude, *keep_nodes])) or None,
        )
    except Exception as exc:
        detail = str(exc).strip()[:400] or type(exc).__name__  # an AssertionError has no message
        raise EngineError("quantization_failed", f"float16 conversion failed: {detail}") from exc
    casts_into_subgraphs(converted)
    for g in _graphs(converted.graph):
        fold_round_trips(g)
        initializer_types_only(g)
    out: onnx.ModelProto = converted
    return out


def convert_fp16(src: Path, dest: Path, opts: RecipeOptions, keep_nodes: Sequence[str] = ()) -> list[str]:
    """Convert ``src`` to float16, ``keep_nodes`` (and the user's excluded nodes) staying in float32;
    returns the op types kept in float32."""
    model = onnx.load(str(src))
    present = {n.op_type for n in model.graph.node}
    onnx.save_model(convert_graph(model, opts, keep_nodes), str(dest))
    return sorted(present & set(block_list(opts)))


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every If/Loop/Scan body in it, nested ones too."""
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                out.extend(_graphs(sub))
    return out


def casts_into_subgraphs(model: onnx.ModelProto) -> int:
    """Move the Casts ONNX Runtime's float16 converter put in the main graph for nodes inside If/Loop/Scan
    bodies into those bodies.

    The converter adds every Cast around a kept-in-float32 node to the main graph, also when the node
    lives in a subgraph: the Cast then reads a tensor the main graph cannot see and the model does not
    load ("Node input ... is not a graph input, initializer, or output of a previous node"). A stray Cast
    goes, right after the node producing its input, into each body that produces that input and reads
    its output (itself or in a body nested in it). Returns how many were moved."""
    main = model.graph
    # Main-graph nodes that read, directly or through other such nodes, a tensor the main graph lacks.
    stray: list[onnx.NodeProto] = []
    while True:
        visible = {v.name for v in main.input} | {t.name for t in main.initializer}
        visible |= {o for n in main.node if not any(n is s for s in stray) for o in n.output}
        more = [n for n in main.node if not any(n is s for s in stray)
                and any(i and i not in visible for i in n.input)]
        if not more:
            break
        stray += more
    if not stray:
        return 0
    main_vi = {v.name: v for v in main.value_info}
    moved = 0
    progress = True
    while stray and progress:  # a Cast of a moved Cast's output follows it on the next round
        progress = False
        subs = _graphs(main)[1:]
        for node in list(stray):
            src = next(i for i in node.input if i and i not in visible)
            homes = []
            for g in subs:
                produced = {o for n in g.node for o in n.output} | {v.name for v in g.input}
                produced |= {t.name for t in g.initializer}
                read = {i for inner in _graphs(g) for n in inner.node for i in n.input}
                read |= {o.name for inner in _graphs(g) for o in inner.output}
                if src in produced and read & set(node.output):
                    homes.append(g)
            if not homes:
                continue
            for g in homes:
                at = next((j + 1 for j, n in enumerate(g.node) if src in n.output), 0)
                g.node.insert(at, node)
                g.value_info.extend(main_vi[o] for o in node.output if o in main_vi)
            for o in node.output:
                if o in main_vi:
                    main.value_info.remove(main_vi.pop(o))
            main.node.remove(node)
            stray.remove(node)
            moved += 1
            progress = True
    return moved


def float16_in_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether an If/Loop/Scan body holds float16 weights (the per-layer report covers the main graph)."""
    return any(t.data_type == onnx.TensorProto.FLOAT16 for g in _graphs(model.graph)[1:] for t in g.initializer)


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def fold_round_trips(graph: onnx.GraphProto) -> int:
    """Let float32 nodes read each other's outputs directly instead of through float16.

    ONNX Runtime's converter stores the output of every node it keeps in float32 as float16 and casts it
    back for the next such node: a chain kept in float32 because its values exceed float16's range still
    overflowed (inf) between its nodes. A Cast to float32 of a Cast to float16 of a float32 tensor is
    replaced by that tensor (its consumers read it instead), and a Cast to float16 left unread goes.
    Returns how many round trips were removed."""
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    replace: dict[str, str] = {}
    dead: list[onnx.NodeProto] = []
    for node in graph.node:
        if _cast_to(node) != onnx.TensorProto.FLOAT or node.output[0] in outputs:
            continue
        down = producer.get(node.input[0])
        if down is None or _cast_to(down) != onnx.TensorProto.FLOAT16:
            continue
        # Only a float32 source: a float64 one cast down and back up is no round trip.
        if types.get(down.input[0]) != onnx.TensorProto.FLOAT:
            continue
        replace[node.output[0]] = down.input[0]
        dead.append(node)
    if not replace:
        return 0
    for n in dead:
        graph.node.remove(n)
    for n in _graphs(graph):
        for node in n.node:
            for i, name in enumerate(node.input):
                if name in replace:
                    node.input[i] = replace[name]
    stale = [v for v in graph.value_info if v.name in replace]
    for v in stale:
        graph.value_info.remove(v)
    read = {i for g in _graphs(graph) for n in g.node for i in n.input} | outputs
    for n in [n for n in graph.node if _cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in read]:
        graph.node.remove(n)
    return len(replace)


def initializer_types_only(graph: onnx.GraphProto) -> int:
    """Drop the value_info entries of initializers, whose type the initializer itself states.

    torch.onnx's dynamo exporter annotates its weights in value_info too; the converter turns every float
    annotation into float16 but keeps a weight read only by float32 nodes (LayerNormalization's scale) in
    float32, so the annotation lied and ONNX shape inference failed with "Inferred elem type differs
    from existing elem type: (1) vs (10)". Returns how many were dropped."""
    inits = {t.name for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name in inits]
    for v in stale:
        graph.value_info.remove(v)
    return len(stale)
