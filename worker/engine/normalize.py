"""Normalise real-world exports into a form the quantizer handles well."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

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


def _name_nodes(model: onnx.ModelProto) -> int:
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


def normalize(model_path: Path, out_dir: Path, per_channel: bool) -> NormalizeResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_path))
    res = NormalizeResult(path=out_dir / "normalized.onnx")
    n = constants_to_initializers(model)
    if n:
        res.steps.append(f"moved {n} Constant-node tensor(s) to initializers")
    _ensure_initializers_not_inputs(model)
    named = _name_nodes(model)
    if named:
        res.steps.append(f"named {named} unnamed node(s)")
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
    onnx.save_model(model, str(staged))
    del model
    _preprocess(staged, res)
    return res


def _preprocess(staged: Path, res: NormalizeResult) -> None:
    """ORT's quantization pre-processing (symbolic shape inference + graph optimisation), falling
    back to plain ONNX shape inference when a model defeats it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts: tuple[tuple[str, dict[str, bool]], ...] = (
        ("shape inference and graph optimisation", {}),
        ("ONNX shape inference and graph optimisation", {"skip_symbolic_shape": True}),
        ("ONNX shape inference", {"skip_symbolic_shape": True, "skip_optimization": True}),
    )
    errors: list[str] = []
    for label, kwargs in attempts:
        try:
            quant_pre_process(str(staged), str(res.path), **kwargs)
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



def nonfinite_constant_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes fed by a constant holding NaN or infinity (attention masks often use -inf). Quantizing
    such a constant gives an infinite scale and a broken model, so these nodes stay in float."""
    from onnx import numpy_helper

    bad_inits = set()
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            arr = numpy_helper.to_array(t)
            if arr.size and not np.isfinite(arr).all():
                bad_inits.add(t.name)
    return [n.name for n in model.graph.node if any(i in bad_inits for i in n.input)]
