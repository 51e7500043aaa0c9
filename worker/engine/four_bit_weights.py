"""int8_static option ``four_bit_weights``: the int8 model's Conv/MatMul/Gemm weights stored in 4 bits.

Each weight's DequantizeLinear reads an int8 initializer; this rewrite stores it as an INT4 initializer instead
(per output channel, symmetric, each channel's clipping chosen by the squared error it leaves) and puts a Cast to
int8 in front of the DequantizeLinear. The Cast of a constant is folded when ONNX Runtime loads the model, so
the layer runs as the same int8 kernel as before (QLinearConv, QGemm, ...) at the same speed, with 4-bit values:
the file holds half a byte a weight. Biases quantized to int32 with the old weight scale are quantized again
with the new one (the fused int8 kernels read the int32 bias as it is, at input scale x weight scale).

The layers whose weights lose most in 4 bits (relative squared error) can stay in 8 bits (option
``int8_most_sensitive``). INT4 needs opset 21: a model below it is converted with ONNX's version converter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.errors import EngineError

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
    dq: onnx.NodeProto
    layers: tuple[onnx.NodeProto, ...]
    axis: int


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
        out[layers[0].name] = _Weight(n, tuple(layers), axis % len(t.dims))
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
        q8 = numpy_helper.to_array(inits[wt.dq.input[0]]).astype(np.float64)
        s8 = numpy_helper.to_array(inits[wt.dq.input[1]]).astype(np.float64)
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
        out_ch, per_group = delta.shape[0], delta.shape[1]
        if mean.shape[0] != groups * per_group or out_ch % groups:
            return None
        summed = delta.reshape(out_ch, per_group, -1).sum(axis=2)
        channel = (np.arange(out_ch) // (out_ch // groups))[:, None] * per_group + np.arange(per_group)[None, :]
        return np.asarray((summed * mean[channel]).sum(axis=1))
    if layer.op_type == "Gemm" and delta.ndim == 2:
        d = delta if attrs.get("transB", 0) else delta.T  # [N, K]
        return np.asarray(d @ mean) if d.shape[1] == mean.shape[0] else None
    return None


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
    by_output = {w.dq.output[0]: (n, w) for n, w in weights.items() if n in planned and n not in keep}
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        hit = by_output.get(node.output[0]) if node.op_type == "DequantizeLinear" else None
        if hit is None:
            new_nodes.append(node)
            continue
        name, wt = hit
        p = planned[name]
        base = node.input[0]
        res.weight_bytes_int8 += int(np.prod(inits[base].dims))
        t4 = helper.make_tensor(base + "_int4", TensorProto.INT4, p.q.shape, p.q.flatten().tolist())
        scale = numpy_helper.from_array(p.scale, base + "_scale4")
        zero = numpy_helper.from_array(np.zeros(p.scale.shape, np.int8), base + "_zero4")
        model.graph.initializer.extend([t4, scale, zero])
        cast = helper.make_node("Cast", [t4.name], [base + "_from4"], to=TensorProto.INT8, name=node.name + "_int4")
        del node.input[:]
        node.input.extend([cast.output[0], scale.name, zero.name])
        _set_axis(node, wt.axis)
        for layer in wt.layers:
            res.bias_corrected += _requantize_bias(layer, p.scale, p.bias_shift if len(wt.layers) == 1 else None,
                                                   inits, producers, model)
        new_nodes.extend([cast, node])
        res.four_bit.append(name)
        res.weight_bytes_after += (int(np.prod(p.q.shape)) + 1) // 2
    for name, wt in weights.items():
        if name in keep:
            res.eight_bit.append(name)
            n = int(np.prod(inits[wt.dq.input[0]].dims))
            res.weight_bytes_int8 += n
            res.weight_bytes_after += n
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return res


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


def _to_opset(model: onnx.ModelProto) -> int | None:
    """Raise ``model`` to opset INT4_OPSET (INT4 tensors need it) in place; returns the opset it had, or None when
    it had INT4_OPSET or more already."""
    current = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current >= INT4_OPSET:
        return None
    # lazy: only a model below opset 21 needs ONNX's version converter
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, INT4_OPSET)
    except Exception as exc:
        raise EngineError(
            "quantization_failed",
            f"four_bit_weights: 4-bit tensors need opset {INT4_OPSET} and ONNX's version converter could not "
            f"raise this model from opset {current}: {str(exc).strip()[:300]}; leave four_bit_weights off",
        ) from exc
    model.CopyFrom(converted)
    return current
