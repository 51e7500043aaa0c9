"""Learned rounding of int8_static's weights (option adaround, issue #18), after AdaRound (Nagel et al., "Up or
Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Rounding each weight to the nearest int8 level minimises each weight's own error, not the layer's output error:
errors that share a sign add up over the inputs they multiply. For each quantized Conv, Gemm and MatMul with a
constant int8 weight (per-channel scale s, zero point 0, as lowbit's int8_static writes them), the rounding is
learned instead: W_soft = s * clip(floor(W / s) + h(V), -128, 127) (-64, 64 with reduce_range) with h(V) =
clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1) starts at the nearest level's fractional part, and Adam moves V to
lower the layer's output error on the calibration samples' float inputs, ||op(x, W) - op(x, W_soft)||^2 (the bias
cancels), relative to what nearest rounding gives, plus a term that pushes every h(V) to 0 or 1 (its exponent
annealed from 20 to 2 after a warm-up). Each weight then rounds up where h(V) >= 0.5; only the int8 values change
(scales and zero points stay), and a layer whose learned rounding does not lower its error on the samples keeps
nearest rounding.

Bounded in memory: the layers' inputs are fetched a group at a time (at most INPUT_BYTES a group, samples cut so
that one layer's inputs fit LAYER_BYTES), each group in one pass over the calibration samples; and in time: the
optimisation shares ``budget_s`` between the layers (each gets at least MIN_STEPS steps; the report says when
the budget ran out). PyTorch runs the optimisation on the CPU, in the PyTorch child process that also loads .pt2
uploads (``worker.engine.adaround_torch``): the job's own process never imports torch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from worker.engine import runtime
from worker.engine.bias_correction import dq_inputs
from worker.engine.calibrate import session_with

Batches = Callable[[], Iterator[tuple[dict[str, np.ndarray], int]]]
OPS = ("Conv", "Gemm", "MatMul")
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
REG_WEIGHT = 1.0  # lambda, against the output error relative to nearest rounding's (the rounding term is a mean)
WARMUP = 0.2  # share of the steps without the rounding term
BETA = (20.0, 2.0)  # the rounding term's exponent, annealed over the steps after the warm-up
MAX_STEPS = 500
MIN_STEPS = 50
LEARNING_RATE = 0.1
ROWS_PER_STEP = 1024  # Gemm/MatMul: input rows per step; Conv: samples per step, at most CONV_SAMPLES_PER_STEP
CONV_SAMPLES_PER_STEP = 4
LAYER_BYTES = 32 << 20
INPUT_BYTES = 128 << 20


@dataclass
class Target:
    """A layer whose int8 weight rounding can be learned."""

    name: str
    op_type: str
    x: str  # the float input tensor
    weight: str  # the float weight initializer (float model)
    weight_q: str  # the int8 weight initializer (quantized model)
    weight_scale: str
    axis: int
    attrs: dict[str, Any]


@dataclass
class LearnedRounding:
    """What learning the rounding did: per layer, the weights it rounded the other way and the output error."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    budget_exhausted: bool = False


def find_targets(quantized: onnx.ModelProto, float_model: onnx.ModelProto) -> tuple[list[Target], list[dict[str, str]]]:
    """The quantized model's Conv/Gemm/MatMul nodes with a constant symmetric int8 weight, matched by name to the
    float model's node (its float weight and input)."""
    q_inits = {t.name: t for t in quantized.graph.initializer}
    f_inits = {t.name for t in float_model.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    float_nodes = {n.name: n for n in float_model.graph.node}
    targets: list[Target] = []
    skipped: list[dict[str, str]] = []
    for node in quantized.graph.node:
        if node.op_type not in OPS or node.name not in float_nodes:
            continue
        fnode = float_nodes[node.name]
        w = dq_inputs(producer.get(node.input[1])) if len(node.input) > 1 else None
        if w is None or w[0] not in q_inits or w[1] not in q_inits or len(fnode.input) < 2 or \
                fnode.input[1] not in f_inits:
            skipped.append({"layer": node.name, "reason": "weight not a quantized constant"})
            continue
        if q_inits[w[0]].data_type != onnx.TensorProto.INT8 or \
                (w[2] and np.any(numpy_helper.to_array(q_inits[w[2]]) != 0)):
            skipped.append({"layer": node.name, "reason": "weight not symmetric int8"})
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            skipped.append({"layer": node.name, "reason": "Conv with auto_pad SAME (explicit pads only)"})
            continue
        if node.op_type == "Gemm" and int(attrs.get("transA", 0)):
            skipped.append({"layer": node.name, "reason": "Gemm with transA"})
            continue
        targets.append(Target(node.name, node.op_type, fnode.input[0], fnode.input[1], w[0], w[1], w[3], attrs))
    return targets, skipped


def _fetch(float_path: Path, names: list[str], batches: Batches, providers: list[str], threads: int,
           max_samples: int) -> tuple[dict[str, list[np.ndarray]], int]:
    """The float values of ``names`` on the first ``max_samples`` calibration samples, in one pass."""
    delta = onnx.ModelProto()
    for n in names:
        delta.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    session = session_with(float_path, delta, providers, threads, "model for learned rounding")
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    samples = 0
    for feed, count in batches():
        if samples >= max_samples:
            break
        for n, v in zip(names, runtime.run(session, feed, "model for learned rounding", names), strict=True):
            got[n].append(np.asarray(v, dtype=np.float32))
        samples += count
    return got, samples


def _per_sample_bytes(values: list[np.ndarray], samples: int) -> int:
    return max(1, sum(v.nbytes for v in values) // max(samples, 1))


def _rows(t: Target, values: list[np.ndarray]) -> np.ndarray:
    """A Gemm/MatMul input as rows [R, K] (its leading axes flattened); a Conv input as it is, samples stacked."""
    if t.op_type == "Conv":
        return np.concatenate(values, axis=0)
    return np.concatenate([v.reshape(-1, v.shape[-1]) for v in values], axis=0)


def learn(quant_path: Path, float_path: Path, float_model: onnx.ModelProto, dest: Path, batches: Batches,
          providers: list[str], threads: int, budget_s: float, max_samples: int = 64, seed: int = 0,
          on_event: Callable[[dict[str, Any]], None] | None = None, reduce_range: bool = False) -> LearnedRounding:
    """Learn the rounding of the quantized model at ``quant_path`` (quantized from ``float_path``) into ``dest``.
    ``reduce_range``: the weights are 7-bit (-64..64, option reduce_range), and the learned ones stay so.
    The optimisation runs in the PyTorch child process, a group of layers per run; this process fetches each
    group's inputs and writes them, with the weights, for it."""
    started = time.perf_counter()
    quantized = onnx.load(str(quant_path))
    targets, skipped = find_targets(quantized, float_model)
    out = LearnedRounding(skipped=skipped)
    if not targets:
        out.seconds = round(time.perf_counter() - started, 3)
        return out
    q_inits = {t.name: t for t in quantized.graph.initializer}
    f_inits = {t.name: t for t in float_model.graph.initializer}
    work = dest.parent / f"{dest.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    # One probe pass for the inputs' sizes per sample (the first batch), then groups that fit INPUT_BYTES.
    probe, probe_samples = _fetch(float_path, sorted({t.x for t in targets}), _first(batches), providers, threads, 1)
    per_sample = {n: _per_sample_bytes(v, probe_samples) for n, v in probe.items()}
    del probe
    keep = {n: max(1, min(max_samples, LAYER_BYTES // b)) for n, b in per_sample.items()}
    groups: list[list[Target]] = []
    size = 0
    for t in targets:
        need = per_sample[t.x] * keep[t.x]
        if not groups or size + need > INPUT_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += need
    done = 0
    for g, group in enumerate(groups):
        names = sorted({t.x for t in group})
        got, samples = _fetch(float_path, names, batches, providers, threads, max(keep[n] for n in names))
        out.samples = max(out.samples, samples)
        left = budget_s - (time.perf_counter() - started)
        share = max(0.0, left) / max(1, len(targets) - done)
        request: dict[str, Any] = {"seed": seed + g, "threads": 1, "layers": [],
                                   "levels": [-64, 64] if reduce_range else [-128, 127]}
        for k, t in enumerate(group):
            values = got[t.x]
            rows = keep[t.x] * (1 if t.op_type == "Conv" else x_rows(values))
            npz = work / f"layer-{done + k}.npz"
            np.savez(npz, x=_rows(t, values)[:rows], w=numpy_helper.to_array(f_inits[t.weight]),
                     q=numpy_helper.to_array(q_inits[t.weight_q]), scale=numpy_helper.to_array(q_inits[t.weight_scale]))
            request["layers"].append({"target": dataclasses.asdict(t), "npz": str(npz),
                                      "out": str(work / f"layer-{done + k}.npy"), "seconds": share})
        del got
        if left <= 0:
            out.budget_exhausted = True
        timeout = max(60.0, 3 * share * len(group) + 120.0)
        # lazy: the PyTorch child's launcher (multiprocessing, OpenSSL's hashing) loads only when learned
        # rounding runs (off by default), not with every int8_static job that imports this module
        from worker.engine import pt2

        result = pt2.run_child("adaround", request, work, timeout, on_event)
        for t, layer, figures in zip(group, request["layers"], result["layers"], strict=True):
            out.layers.append(figures)
            if figures["kept"]:
                q = numpy_helper.to_array(q_inits[t.weight_q])
                new_q = np.load(layer["out"]).astype(np.int8).reshape(q.shape)
                q_inits[t.weight_q].CopyFrom(numpy_helper.from_array(new_q, t.weight_q))
            Path(layer["npz"]).unlink(missing_ok=True)
            Path(layer["out"]).unlink(missing_ok=True)
        done += len(group)
    onnx.save(quantized, str(dest))
    out.seconds = round(time.perf_counter() - started, 3)
    return out


def x_rows(values: list[np.ndarray]) -> int:
    """Rows per sample of a Gemm/MatMul input (its leading axes after the first, multiplied)."""
    v = values[0]
    return int(np.prod(v.shape[1:-1])) if v.ndim > 2 else 1


def _first(batches: Batches) -> Batches:
    def one() -> Iterator[tuple[dict[str, np.ndarray], int]]:
        for item in batches():
            yield item
            return

    return one
