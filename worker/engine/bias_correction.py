"""Bias correction after int8 quantization (issue #18), the empirical variant computed analytically.

Rounding a layer's weights to int8 (W -> W_q) shifts the mean of its output channels by E[(W_q - W) x]: with
a per-channel input mean E[x] that is not zero (after a ReLU it never is) the rounding errors of a channel's
weights do not average out, and a depthwise conv, with only k*k weights per channel, keeps a visible shift.
The shift is linear in x, so one streaming pass of the float model over the calibration samples, recording
each corrected layer's per-input-channel mean E[x] (a ReduceMean per layer input, only vectors leave ONNX
Runtime), gives it for every layer at once: correction_c = sum over the weights of output channel c of
(W_q - W) times the mean of the input channel each reads; the layer's bias becomes b - correction.

What it does not model: the activations' own rounding (E[x] is the float model's), and, for a padded conv, the
border positions where some taps read padding (their share of the output is taken as the interior's).
Conv and Gemm layers with a quantized weight and a bias are corrected, the int32 bias requantized with its own
scale; a MatMul has no bias input (its Add stays as quantized), and a layer without a bias gains none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from worker.engine import runtime
from worker.engine.calibrate import KeptRun, session_with
from worker.engine.inspect import default_opset

Batches = Callable[[], Iterator[tuple[dict[str, np.ndarray], int]]]
CORRECTED_OPS = ("Conv", "Gemm")
# W_q - W is made in float64 this many bytes of it at a time (a block of rows; blocked_correction).
ERROR_BLOCK_BYTES = 1 << 18


@dataclass
class Layer:
    """One layer of the quantized model that can be corrected, with what the correction reads."""

    name: str
    op_type: str
    x: str  # the float input tensor whose per-channel mean is measured
    weight_q: str
    weight_scale: str
    weight_zero: str
    weight_axis: int
    bias: str  # the bias initializer (int32 through a DequantizeLinear, or float)
    bias_scale: str | None  # None: a float bias


@dataclass
class BiasCorrection:
    layers: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    mean_abs_correction: float | None = None
    # The mean over the corrected layers of mean_c |correction_c| / mean_c |bias_c| (the share of the bias moved).
    mean_relative_correction: float | None = None
    samples: int = 0
    # Where the input means came from: "plain_pass" (given: the plain model's calibration pass measured them, or
    # they follow from it for an equalized model) or "means_pass" (a pass of the float model of its own).
    means_from: str | None = None
    # The float model's outputs on the first batches (KeptRun each), when asked for (keep_outputs):
    # fetched in the same runs as the means.
    outputs: list[KeptRun] = field(default_factory=list)


def dq_inputs(node: onnx.NodeProto | None) -> tuple[str, str, str, int] | None:
    """A DequantizeLinear's (values, scale, zero point or "", axis); None for any other node (or none)."""
    if node is None or node.op_type != "DequantizeLinear":
        return None
    axis = 1
    for a in node.attribute:
        if a.name == "axis":
            axis = int(a.i)
    return node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else "", axis


def find_layers(quantized: onnx.ModelProto, original: onnx.ModelProto) -> tuple[list[Layer], list[dict[str, str]]]:
    """The quantized model's Conv and Gemm nodes with a bias whose weight went through int8, matched by name to
    the float model's node (whose input tensor names the mean to measure)."""
    inits = {t.name for t in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    float_nodes = {n.name: n for n in original.graph.node}
    layers: list[Layer] = []
    skipped: list[dict[str, str]] = []
    for node in quantized.graph.node:
        if node.op_type not in CORRECTED_OPS or node.name not in float_nodes:
            continue
        if len(node.input) < 3 or not node.input[2]:
            skipped.append({"layer": node.name, "reason": "no bias"})
            continue
        w = dq_inputs(producer.get(node.input[1]))
        if w is None or w[0] not in inits or w[1] not in inits or (w[2] and w[2] not in inits):
            skipped.append({"layer": node.name, "reason": "weight not quantized to a constant"})
            continue
        b = dq_inputs(producer.get(node.input[2]))
        if b is not None and b[0] in inits and b[1] in inits:
            bias, bias_scale = b[0], b[1]
        elif node.input[2] in inits:
            bias, bias_scale = node.input[2], None
        else:
            skipped.append({"layer": node.name, "reason": "bias not a constant"})
            continue
        x = float_nodes[node.name].input[0]
        layers.append(Layer(node.name, node.op_type, x, w[0], w[1], w[2], w[3], bias, bias_scale))
    return layers, skipped


def channel_axes(op_type: str, rank: int, gemm_trans_a: bool) -> list[int]:
    """The axes a Conv (weight of rank ``rank``) or Gemm input is reduced over to leave one value per input
    channel."""
    if op_type == "Conv":
        return [0, *range(2, rank)]
    return [1] if gemm_trans_a else [0]


# The opset from which each reduction takes its axes as an input instead of an attribute.
_AXES_INPUT_FROM = {"ReduceMean": 18, "ReduceSum": 13, "ReduceMin": 18, "ReduceMax": 18}


def add_reduction(delta: onnx.ModelProto, model: onnx.ModelProto, op: str, x: str, axes: list[int], out: str) -> None:
    """Append to ``delta`` (see calibrate.session_with) a ``op`` (ReduceMean, ReduceSum, ReduceMin, ReduceMax) of
    ``x`` over ``axes``,
    keepdims 0, as the float output ``out``; its axes as an input or an attribute, as ``model``'s opset takes them."""
    if default_opset(model) >= _AXES_INPUT_FROM[op]:
        axes_name = f"{out}_axes"
        delta.graph.initializer.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        node = onnx.helper.make_node(op, [x, axes_name], [out], name=out, keepdims=0)
    else:
        node = onnx.helper.make_node(op, [x], [out], name=out, keepdims=0, axes=axes)
    delta.graph.node.append(node)
    delta.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))


def means_delta(float_model: onnx.ModelProto, axes_of: dict[str, list[int]]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """What to add to the float model for a ReduceMean of each input tensor over ``axes_of[x]`` (its per-channel
    mean), and the output that gives each (see calibrate.session_with)."""
    delta = onnx.ModelProto()
    names: dict[str, str] = {}
    for k, (x, axes) in enumerate(axes_of.items()):
        names[x] = f"lowbit_bc_mean_{k}"
        add_reduction(delta, float_model, "ReduceMean", x, axes, names[x])
    return delta, names


def mean_axes(float_model: onnx.ModelProto) -> dict[str, list[int]]:
    """The per-channel means bias correction may read, from the float model alone: for each Conv (a weight of
    rank 3 or more) and Gemm with a bias and a constant weight, its input and the axes to average it over. A
    superset of what ``correct`` needs (which layers it corrects depends on the quantized model), so that the
    calibration pass can compute them (calibrate.SidePass)."""
    inits = {t.name: len(t.dims) for t in float_model.graph.initializer}
    out: dict[str, list[int]] = {}
    for node in float_model.graph.node:
        if node.op_type not in CORRECTED_OPS or len(node.input) < 3 or not node.input[2] or node.input[1] not in inits:
            continue
        rank = inits[node.input[1]]
        if node.op_type == "Conv" and rank < 3:
            continue
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        out.setdefault(node.input[0], channel_axes(node.op_type, rank, trans_a))
    return out


def input_means(float_path: Path, float_model: onnx.ModelProto, layers: list[Layer], ranks: dict[str, int],
                trans_a: dict[str, bool], batches: Batches, providers: list[str], threads: int,
                keep_outputs: int = 0) -> tuple[dict[str, np.ndarray], int, list[KeptRun]]:
    """Per-channel means of each layer's float input over the calibration samples, in one pass (a ReduceMean per
    input added to the float model; batches weighted by their sample counts). Returns them, the samples, and the
    model's own outputs on the first batches that hold ``keep_outputs`` samples (fetched in the same runs)."""
    axes_of: dict[str, list[int]] = {}
    for layer in layers:
        axes_of.setdefault(layer.x, channel_axes(layer.op_type, ranks[layer.name], trans_a.get(layer.name, False)))
    delta, names = means_delta(float_model, axes_of)
    session = session_with(float_path, delta, providers, threads, "model for bias correction")
    fetch = list(names.values())
    own = [o.name for o in float_model.graph.output]
    sums: dict[str, np.ndarray] = {}
    samples = 0
    kept: list[KeptRun] = []
    for b, (feed, count) in enumerate(batches()):
        keep = samples < keep_outputs
        got = runtime.run(session, feed, "model for bias correction", fetch + own if keep else fetch)
        for name, value in zip(fetch, got, strict=False):
            sums[name] = sums.get(name, 0.0) + np.asarray(value, dtype=np.float64) * count
        if keep:
            kept.append(KeptRun(b, None, count, list(got[len(fetch):])))
        samples += count
    return ({x: sums[out] / samples for x, out in names.items()} if samples else {}), samples, kept


def _error_blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int,
                  w: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, W_q - W) for each block of rows along axis 0, in float64, where W_q = (q - zero) * scale with
    per-tensor or per-``axis`` scales; ERROR_BLOCK_BYTES of float64 a block."""
    s = scale.astype(np.float64)
    z = zero.astype(np.float64) if zero is not None else np.zeros_like(s)
    rows = max(1, ERROR_BLOCK_BYTES // max(1, 8 * (q.size // max(1, q.shape[0]))))
    for i in range(0, q.shape[0], rows):
        if s.ndim == 0:
            bs, bz = s, z
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            bs, bz = s.reshape(shape), z.reshape(shape)
            if axis == 0:
                bs, bz = bs[i:i + rows], bz[i:i + rows]
        yield i, (q[i:i + rows].astype(np.float64) - bz) * bs - w[i:i + rows]


def _correction(op_type: str, node: onnx.NodeProto, blocks: Iterable[tuple[int, np.ndarray]],
                shape: tuple[int, ...], mean_x: np.ndarray) -> np.ndarray:
    """E[(W_q - W) x] per output channel, from the per-input-channel mean of x, for a Conv or Gemm ``node`` whose
    weight error W_q - W (of ``shape``) comes as (first row, rows) blocks along axis 0. A Conv's and a transposed
    Gemm weight's rows are output channels; a plain Gemm's are inputs, whose shares add up."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    conv = op_type == "Conv"
    trans_b = bool(int(attrs.get("transB", 0)))
    out = np.zeros(shape[0] if conv or trans_b else shape[1], dtype=np.float64)
    group = int(attrs.get("group", 1))
    for i, block in blocks:
        n = block.shape[0]
        if conv:
            per_group = block.shape[1]
            summed = block.reshape(n, per_group, -1).sum(axis=2)  # [rows, in per group]
            x = mean_x.reshape(group, per_group)[np.arange(i, i + n) // (shape[0] // group)]
            out[i:i + n] = (summed * x).sum(axis=1)
        elif trans_b:
            out[i:i + n] = mean_x @ block.T
        else:
            out += mean_x[i:i + n] @ block
    if conv:
        return out
    # Gemm: Y = alpha * A' B' + beta * C; B' = B^T with transB. The bias is beta * C, so C moves by corr / beta.
    return np.asarray(out * float(attrs.get("alpha", 1.0)) / float(attrs.get("beta", 1.0)))


def blocked_correction(op_type: str, node: onnx.NodeProto, q: np.ndarray, scale: np.ndarray,
                       zero: np.ndarray | None, axis: int, w: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """``output_correction`` of the weight error W_q - W, which is made a block of rows at a time and never whole
    (a whole float64 copy of a large weight and its temporaries were 10 MB at once on openWakeWord's timer, a
    1.7 MB model, and its job's peak)."""
    return _correction(op_type, node, _error_blocks(q, scale, zero, axis, w), q.shape, mean_x)


def output_correction(op_type: str, delta_w: np.ndarray, mean_x: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """E[(W_q - W) x] per output channel for a Conv or Gemm ``node`` of type ``op_type``, from the whole weight
    error ``delta_w`` (four_bit_weights' bias correction)."""
    return _correction(op_type, node, [(0, delta_w)], delta_w.shape, mean_x)


def apply(quantized: onnx.ModelProto, original: onnx.ModelProto, layers: list[Layer],
          means: dict[str, np.ndarray]) -> BiasCorrection:
    """Subtract each layer's correction from its bias, in ``quantized`` (in place)."""
    inits = {t.name: t for t in quantized.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def arr(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    float_inits = {t.name: t for t in original.graph.initializer}
    float_nodes = {n.name: n for n in original.graph.node}
    q_nodes = {n.name: n for n in quantized.graph.node}
    out = BiasCorrection()
    moved: list[float] = []
    shares: list[float] = []
    for layer in layers:
        w_name = float_nodes[layer.name].input[1]
        mean_x = means.get(layer.x)
        if w_name not in float_inits or mean_x is None or not np.all(np.isfinite(mean_x)):
            out.skipped.append({"layer": layer.name, "reason": "no float weight or input mean"})
            continue
        for name in (layer.weight_scale, layer.weight_zero, layer.bias, layer.bias_scale or ""):
            if name:
                arr(name)
        # The quantized weight is read for this layer only (not kept with the small arrays).
        corr = blocked_correction(layer.op_type, q_nodes[layer.name], numpy_helper.to_array(inits[layer.weight_q]),
                                  arrays[layer.weight_scale], arrays[layer.weight_zero] if layer.weight_zero else None,
                                  layer.weight_axis, numpy_helper.to_array(float_inits[w_name]), mean_x)
        bias = arrays[layer.bias]
        if layer.bias_scale is None:
            new = (bias.astype(np.float64) - corr).astype(bias.dtype)
            old_f = bias.astype(np.float64)
        else:
            scale = arrays[layer.bias_scale].astype(np.float64)
            old_f = bias.astype(np.float64) * scale
            info = np.iinfo(bias.dtype)
            new = np.clip(np.round((old_f - corr) / scale), info.min, info.max).astype(bias.dtype)
        inits[layer.bias].CopyFrom(numpy_helper.from_array(new.reshape(bias.shape), layer.bias))
        out.layers.append(layer.name)
        moved.append(float(np.abs(corr).mean()))
        scale_of_bias = float(np.abs(old_f).mean())
        if scale_of_bias > 0:
            shares.append(float(np.abs(corr).mean()) / scale_of_bias)
    if moved:
        out.mean_abs_correction = float(np.mean(moved))
    if shares:
        out.mean_relative_correction = float(np.mean(shares))
    return out


def correct(quant_path: Path, float_path: Path, float_model: onnx.ModelProto, dest: Path, batches: Batches,
            providers: list[str], threads: int, keep_outputs: int = 0,
            measured: tuple[dict[str, np.ndarray], int] | None = None) -> BiasCorrection:
    """Bias-correct the quantized model at ``quant_path`` (quantized from ``float_path``) into ``dest``; with
    ``keep_outputs``, the result also holds the float model's outputs on the first batches (input_means).
    ``measured``: the input means (and samples) a pass of the same float model over the same samples already
    gave (the calibration's, see mean_axes); used where it has every layer's, else the means pass runs."""
    quantized = onnx.load(str(quant_path))
    layers, skipped = find_layers(quantized, float_model)
    inits = {t.name: t for t in float_model.graph.initializer}
    ranks: dict[str, int] = {}
    trans_a: dict[str, bool] = {}
    float_nodes = {n.name: n for n in float_model.graph.node}
    for layer in layers:
        node = float_nodes[layer.name]
        ranks[layer.name] = len(inits[node.input[1]].dims) if node.input[1] in inits else 0
        trans_a[layer.name] = any(a.name == "transA" and a.i for a in node.attribute)
    usable = [la for la in layers if la.op_type != "Conv" or ranks[la.name] >= 3]
    if not usable:
        return BiasCorrection(skipped=skipped)  # nothing written: the caller keeps the model it has
    kept: list[KeptRun] = []
    if measured is not None and measured[1] > 0 and all(la.x in measured[0] for la in usable):
        means, samples = measured
        means_from = "plain_pass"
    else:
        means, samples, kept = input_means(float_path, float_model, usable, ranks, trans_a, batches, providers,
                                           threads, keep_outputs)
        means_from = "means_pass"
    result = apply(quantized, float_model, usable, means)
    result.means_from = means_from
    result.skipped = skipped + result.skipped
    result.samples = samples
    result.outputs = kept
    onnx.save(quantized, str(dest))
    return result

