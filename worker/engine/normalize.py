"""Normalise real-world exports into a form the quantizer handles well."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from worker.engine.errors import EngineError
from worker.engine.inspect import default_opset

log = logging.getLogger(__name__)

PER_CHANNEL_MIN_OPSET = 13


@dataclass
class NormalizeResult:
    path: Path
    warnings: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn tensor-valued Constant nodes of the main graph into initializers.

    Exporters often store weights as Constant nodes; the quantizer only sees initializers as weights.
    """
    keep: list[onnx.NodeProto] = []
    moved = 0
    existing = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            attr = {a.name: a for a in node.attribute}
            if "value" in attr and node.output[0] not in existing:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr["value"].t)
                tensor.name = node.output[0]
                model.graph.initializer.append(tensor)
                moved += 1
                continue
        keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def _ensure_initializers_not_inputs(model: onnx.ModelProto) -> None:
    # Old IR versions list initializers as graph inputs; ORT then treats them as overridable
    # inputs and the quantizer may skip them. Drop those input entries.
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)


def name_nodes(model: onnx.ModelProto) -> int:
    # Reports and exclusion lists refer to nodes by name; some exporters leave names empty.
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            count += 1
    return count


# Ops whose input 2 ONNX Runtime's static quantizer turns into an int32 bias scaled by that node's own
# input and weight scales.
BIAS_OPS = ("Conv", "ConvTranspose", "Gemm", "InstanceNormalization", "LayerNormalization", "BatchNormalization")


def prepare_for_static(model: onnx.ModelProto) -> list[str]:
    """Work around two ONNX Runtime static-quantizer bugs that real exports hit; returns what was done.
    Run on the pre-processed model: ONNX Runtime's optimiser shares equal single-element initializers
    and fuses MatMul + Add into a Gemm whose bias is [1, N]."""
    done = []
    flat = flatten_gemm_biases(model)
    if flat:
        done.append(f"reshaped {flat} Gemm bias(es) of shape [1, N] to [N]")
    copied = unshare_biases(model)
    if copied:
        done.append(f"gave {copied} node(s) sharing a bias initializer a copy of their own")
    return done


def flatten_gemm_biases(model: onnx.ModelProto) -> int:
    """Store each Gemm bias of shape [1, ..., 1, N] as [N] (the same values, broadcast the same way).

    Per channel, ONNX Runtime's static quantizer checks the bias scale of output channel i against
    ``bias[i]``, which for a [1, N] bias (tf2onnx and jax2tf dense layers, ONNX Runtime's own MatMul + Add
    fusion) is a whole row: "The truth value of an array with more than one element is ambiguous".
    A bias some other node also reads gets a reshaped copy of its own. Returns how many were reshaped."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    taken = set(inits) | {o for n in model.graph.node for o in n.output} | {v.name for v in model.graph.input}
    done = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias = inits[node.input[2]]
        dims = list(bias.dims)
        if len(dims) < 2 or any(d != 1 for d in dims[:-1]):
            continue
        if readers[bias.name] > 1 or any(o.name == bias.name for o in model.graph.output):
            k = 1
            while f"{bias.name}_lowbit_flat{k}" in taken:
                k += 1
            readers[bias.name] -= 1
            model.graph.initializer.append(bias)  # appends a copy, renamed and reshaped below
            bias = model.graph.initializer[-1]
            bias.name = f"{bias.name}_lowbit_flat{k}"
            taken.add(bias.name)
            node.input[2] = bias.name
        del bias.dims[:]
        bias.dims.append(dims[-1])
        stale = [v for v in model.graph.value_info if v.name == bias.name]
        for v in stale:
            model.graph.value_info.remove(v)
        done += 1
    return done


def unshare_biases(model: onnx.ModelProto) -> int:
    """Give every node that shares a float bias initializer with an earlier one a copy of its own.

    A bias's int32 scale depends on its node, so ONNX Runtime's static quantizer copies a shared bias per
    node, naming the copy after it plus a number (``b`` -> ``b2``) checked only against initializer names:
    tf2onnx names tensors ``<op>;<op>`` and ``<op>;<op>2`` (basic_pitch's nmp.onnx shares one bias among 18
    Conv nodes), so the copy took an activation's name and the quantized model fed a bias into a
    Transpose. Copies made here get names no tensor of the graph has. Returns how many were made."""
    floats = {t.name: t for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    taken = set(floats) | {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    taken |= {o for n in model.graph.node for o in n.output} | {v.name for v in model.graph.value_info}
    seen: set[str] = set()
    copies: list[onnx.TensorProto] = []
    for node in model.graph.node:
        if node.op_type not in BIAS_OPS or len(node.input) < 3 or node.input[2] not in floats:
            continue
        bias = node.input[2]
        if bias not in seen:
            seen.add(bias)
            continue
        k = 1
        while f"{bias}_lowbit_bias{k}" in taken:
            k += 1
        copy = onnx.TensorProto()
        copy.CopyFrom(floats[bias])
        copy.name = f"{bias}_lowbit_bias{k}"
        taken.add(copy.name)
        copies.append(copy)
        node.input[2] = copy.name
    model.graph.initializer.extend(copies)
    return len(copies)


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by ``graph``'s nodes (If branches, Loop and Scan bodies), nested ones too."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from _subgraphs(attr.g)
            for sub in attr.graphs:
                yield sub
                yield from _subgraphs(sub)


def all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, then every If/Loop/Scan body in it, nested ones too."""
    yield model.graph
    yield from _subgraphs(model.graph)


def has_subgraphs(model: onnx.ModelProto) -> bool:
    return next(_subgraphs(model.graph), None) is not None


def subgraph_op_types(model: onnx.ModelProto) -> set[str]:
    """Op types of the nodes inside If/Loop/Scan bodies."""
    return {n.op_type for g in _subgraphs(model.graph) for n in g.node}


def initializers_into_subgraphs(model: onnx.ModelProto) -> int:
    """Move each main-graph initializer read by the nodes of exactly one subgraph (and nowhere else)
    into that subgraph.

    Exporters of models with If/Loop (silero_vad keeps its 8 kHz and 16 kHz networks in the two branches
    of an If) leave every weight in the main graph, where ONNX Runtime's quantizer, quantizing a
    subgraph as a model of its own, cannot find it (ValueError "Expected ... to be an initializer").
    The model computes the same: a subgraph sees its own initializers as it saw the outer ones."""
    readers: dict[str, set[int]] = {}
    graphs = [model.graph, *_subgraphs(model.graph)]
    for k, g in enumerate(graphs):
        for node in g.node:
            for name in node.input:
                readers.setdefault(name, set()).add(k)
        for out in g.output:
            readers.setdefault(out.name, set()).add(k)
    keep: list[onnx.TensorProto] = []
    moved = 0
    for t in model.graph.initializer:
        where = readers.get(t.name, set())
        if len(where) == 1 and 0 not in where:
            graphs[next(iter(where))].initializer.append(t)
            moved += 1
        else:
            keep.append(t)
    if moved:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return moved


def unique_initializer_names(model: onnx.ModelProto) -> int:
    """Rename subgraph initializers whose name another graph's initializer also has.

    ONNX Runtime's graph optimiser copies an outer weight into each sibling branch that reads it under
    the same name (legal: sibling scopes are separate), but its float16 converter tracks initializers by
    name across all graphs and stops on an AssertionError. Each renamed copy is renamed in its own graph
    and the graphs nested in it, the only places that can refer to it."""
    seen = {t.name for t in model.graph.initializer}
    taken = set(seen)
    for g in [model.graph, *_subgraphs(model.graph)]:
        taken.update(n for node in g.node for n in node.output)
        taken.update(v.name for v in g.input)
        taken.update(t.name for t in g.initializer)
    renamed = 0

    def rename_in(g: onnx.GraphProto, old: str, new: str) -> None:
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        for v in [*g.output, *g.value_info]:
            if v.name == old:
                v.name = new
        for sub in _direct_subgraphs(g):
            rename_in(sub, old, new)

    def visit(g: onnx.GraphProto) -> None:
        nonlocal renamed
        for sub in _direct_subgraphs(g):
            for t in sub.initializer:
                if t.name in seen:
                    new = t.name
                    while new in taken:
                        new += "_"
                    rename_in(sub, t.name, new)
                    t.name = new
                    taken.add(new)
                    renamed += 1
                seen.add(t.name)
            visit(sub)

    visit(model.graph)
    return renamed


def _direct_subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            yield from attr.graphs


def normalize(model_path: Path, out_dir: Path, per_channel: bool) -> NormalizeResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_path))
    res = NormalizeResult(path=out_dir / "normalized.onnx")
    n = constants_to_initializers(model)
    if n:
        res.steps.append(f"moved {n} Constant-node tensor(s) to initializers")
    _ensure_initializers_not_inputs(model)
    named = name_nodes(model)
    if named:
        res.steps.append(f"named {named} unnamed node(s)")
    subgraphs = has_subgraphs(model)
    hoisted = initializers_into_subgraphs(model) if subgraphs else 0
    if hoisted:
        res.steps.append(f"moved {hoisted} initializer(s) read only inside an If/Loop/Scan body into that body")
    opset = default_opset(model)
    if opset < PER_CHANNEL_MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, PER_CHANNEL_MIN_OPSET)
            res.steps.append(f"upgraded opset {opset} -> {PER_CHANNEL_MIN_OPSET}")
        except Exception as exc:
            if per_channel:
                raise EngineError(
                    "opset_upgrade_failed",
                    f"per-channel int8 needs opset {PER_CHANNEL_MIN_OPSET}, and converting this opset-{opset} "
                    f"model failed ({str(exc).strip()[:300]}). Re-export the model with opset 13 or newer, "
                    "or set option per_channel=false",
                ) from exc
            res.warnings.append(f"opset {opset} could not be upgraded to {PER_CHANNEL_MIN_OPSET}; kept as is")
    staged = out_dir / "staged.onnx"
    # The tag ONNX Runtime's pre-processing leaves (its quantizer warns on a model without it); ONNX Runtime's
    # optimizer keeps a model's metadata.
    props = {"onnx.quant.pre_process": "onnxruntime.quant", **{p.key: p.value for p in model.metadata_props}}
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(staged))
    symbolic = not shapes_known(model, staged)
    del model
    _preprocess(staged, res, symbolic)
    if subgraphs:  # (reloaded only then: most models have none, and some are large)
        model = onnx.load(str(res.path))
        renamed = unique_initializer_names(model)
        if renamed:
            res.steps.append(f"renamed {renamed} subgraph initializer(s) that shared a name with another graph's")
        listed = 0 if symbolic else outputs_into_value_info(model)
        if renamed or listed:
            onnx.save_model(model, str(res.path))
    return res


def outputs_into_value_info(model: onnx.ModelProto) -> int:
    """Lists each graph's outputs in its value_info too, as symbolic shape inference leaves them: an If/Loop model
    pre-processed without it then reaches the quantizers as the very graph it did when it always got symbolic
    inference (checked identical on tests' vad_like model). No accuracy difference was measured either way."""
    added = 0
    for g in all_graphs(model):
        listed = {vi.name for vi in g.value_info}
        for out in g.output:
            if out.name not in listed and out.type.HasField("tensor_type"):
                g.value_info.append(out)
                added += 1
    return added


def shapes_known(model: onnx.ModelProto, path: Path) -> bool:
    """Whether ONNX's own shape inference gives every output of every node of ``model`` (at ``path``) an element
    type and a rank. Only then can the quantizer tell which tensors are float, and what it reads of shapes
    (ranks, and the weights' own dims) is there: symbolic shape inference has nothing to add that the job uses.
    It adds types for operators ONNX does not know (ONNX Runtime's contrib ops: a model ONNX Runtime already
    fused), so such a model still gets it. Skipping it spares importing sympy (33 MB, a quarter of a small
    model's whole job: openWakeWord's melspectrogram, 196 -> 161 MB) and a second of work. Unknown sizes do not
    call for it: on the corpus models with unnamed sizes (openWakeWord's melspectrogram and hey_jarvis, the MTCNN
    detector) jobs with and without it gave the same accuracy figures, their artifacts a few hundred bytes of shape
    annotations apart. The check reads a weight-free copy of the graph (large weights become typed inputs)."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = model.graph
    light.graph.node.extend(g.node)
    light.graph.input.extend(g.input)
    light.graph.output.extend(g.output)
    light.graph.value_info.extend(g.value_info)
    for init in g.initializer:
        # Shapes only: the values are not needed, except small integer ones that may be shapes themselves.
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(init.raw_data) <= 4096:
            light.graph.initializer.append(init)
        else:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        return False
    known = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    for node in inferred.graph.node:
        for out in node.output:
            if not out:
                continue
            vi = known.get(out)
            if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type \
                    or not vi.type.tensor_type.HasField("shape"):
                return False
    return True


def _preprocess(staged: Path, res: NormalizeResult, symbolic: bool = True) -> None:
    """ORT's quantization pre-processing (symbolic shape inference + graph optimisation), falling
    back to plain ONNX shape inference when a model defeats it. Without ``symbolic`` (ONNX's shape inference
    types every tensor, see shapes_known) the first attempt skips symbolic shape inference."""
    def optimize() -> None:
        _optimize_and_infer(staged, res.path)

    def infer() -> None:
        onnx.shape_inference.infer_shapes_path(str(staged), str(res.path))

    attempts: list[tuple[str, Callable[[], None]]] = [
        ("ONNX shape inference and graph optimisation", optimize), ("ONNX shape inference", infer)]
    if symbolic:
        attempts.insert(0, ("shape inference and graph optimisation", lambda: _symbolic(staged, res.path)))
    else:
        attempts[0] = ("ONNX shape inference (every tensor typed) and graph optimisation", optimize)
    errors: list[str] = []
    for label, attempt in attempts:
        try:
            attempt()
            res.steps.append(f"pre-processed ({label})")
            if errors:
                res.warnings.append(
                    "full pre-processing failed (" + "; ".join(errors) + f"); used {label} only"
                )
            return
        except Exception as exc:
            errors.append(str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            log.info("pre-processing attempt '%s' failed: %s", label, exc)
    model = onnx.load(str(staged))
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        res.warnings.append(f"shape inference failed ({str(exc)[:200]}); quantization may cover fewer tensors")
    onnx.save_model(model, str(res.path))
    res.warnings.append("pre-processing failed (" + "; ".join(errors) + "); quantizing the model as exported")


def _symbolic(staged: Path, out: Path) -> None:
    """ONNX Runtime's own pre-processing with symbolic shape inference (imports sympy, holds the model in Python)."""
    # lazy: onnxruntime.quantization (~0.3 s, 15 MB); auto, in the worker's main process, imports this module
    from worker.engine import runtime  # lazy: it imports onnxruntime, and the app imports this module

    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Symbolic shape inference that stops early saves sym_shape_infer_temp.onnx and a <uuid1>.data file as large
    # as the weights into the working directory: run it in the prep folder, so that a plain script calling the
    # engine (not only the CLI and the worker, which run it in a scratch folder) finds nothing new in its own.
    with contextlib.chdir(staged.parent):
        quant_pre_process(str(staged.resolve()), str(out.resolve()))


def _optimize_and_infer(staged: Path, out: Path) -> None:
    """What ONNX Runtime's pre-processing does without symbolic shape inference (its basic graph optimisations,
    then ONNX's shape inference), file to file: the model is never parsed into Python here. quant_pre_process
    held it twice over (all-MiniLM-L6-v2, 90 MB: this step peaked at 477 MB there)."""
    # lazy: ONNX Runtime loads only for a job (the registry and the API import this module's callers)
    import onnxruntime as ort

    optimized = staged.with_name("optimized.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(optimized)
    so.log_severity_level = 3
    session = ort.InferenceSession(str(staged), so, providers=["CPUExecutionProvider"])
    del session
    try:
        onnx.shape_inference.infer_shapes_path(str(optimized), str(out))
    finally:
        optimized.unlink(missing_ok=True)


def nonfinite_constant_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes fed by a constant holding NaN or infinity (attention masks often use -inf). Quantizing
    such a constant gives an infinite scale and a broken model, so these nodes stay in float."""
    bad_inits = set()
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            arr = numpy_helper.to_array(t)
            if arr.size and not np.isfinite(arr).all():
                bad_inits.add(t.name)
    return [n.name for n in model.graph.node if any(i in bad_inits for i in n.input)]
