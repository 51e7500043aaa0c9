"""SmoothQuant for int8_static: move activation outliers into the weights before calibrating.

When a few input channels of a MatMul carry values hundreds of times larger than the rest, a per-tensor uint8
range spends its 256 levels on those channels and leaves the others a handful. Weights are quantized per output
channel and tolerate a rescaled input row far better, so each input channel j of such a MatMul is divided by

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

and the weight's row j multiplied by it: X W = (X / s) (s W), exactly in real arithmetic. ``max|X_j|`` comes from
one streaming pass over the calibration samples in which ONNX Runtime reduces each smoothed input to a vector of
per-channel maxima (Abs, then ReduceMax over every axis but the last), so only [channels] floats a tensor cross
into Python, as in calibrate.minmax_delta. MatMuls reading the same tensor (Q, K and V after one LayerNorm) share
one s, from the largest weight row over all of them, since the tensor can be divided only once.

The division goes into the producer when it can absorb it exactly: a LayerNormalization's scale and bias, or a
MatMul/Gemm (+ bias Add) (+ Relu, which commutes with a positive scale) chain, when the smoothed MatMuls are the
tensor's only readers and the constants belong to that producer alone. Otherwise (a LayerNorm output that also
feeds a residual Add, a GELU) a Mul by 1/s goes before the MatMuls; it stays in float (it is added to the
quantizer's excluded nodes, which read float inputs), so the unsmoothed tensor is never rounded on its way in.

The smoothed float model is checked against the prepared one on a few calibration samples before anything is
calibrated on it; a model that does not come out equal is not smoothed (a warning names the figure).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine import runtime
from worker.engine.calibrate import minmax_samples_per_run, session_with, split_feed
from worker.engine.feeds import batch_source
from worker.engine.files import sha256_file
from worker.engine.metrics import median

if TYPE_CHECKING:  # annotations only: the recipe's context type lives with the (light) option tables
    from worker.engine.recipes.base import RecipeContext

Batches = Callable[[], Iterable[tuple[dict[str, np.ndarray], int]]]

# "auto" smooths the MatMul/Gemm inputs whose largest per-channel max is more than this many times the median
# channel's. Measured on the calibration samples (README, "SmoothQuant"): ordinary activations of the corpus' MatMul
# and Gemm inputs spread 1.7-3.0x (openWakeWord's timer and hey_jarvis heads, PP-LCNet's classifier);
# all-MiniLM-L6-v2's spread 2.3-20x (its LayerNorm outputs into the FFN 16-19x, GELU outputs up to 20x), where
# smoothing all 24 inputs changed the embedding's cosine by -0.02 to +0.006 (no gain to pay the inserted Muls for);
# the planted outliers of tests/builders.py spread 494x, where smoothing lifts int8 from -0.1 to 22.7 dB SQNR. 50
# is above every input measured that smoothing did not help and far below the ones it rescues.
SPREAD_THRESHOLD = 50.0
# The smoothed float model must reproduce the prepared one this closely on the check samples (worst output):
# the rescaling is exact in real arithmetic, so only float32 rounding may differ.
MAX_RELATIVE_ERROR = 1e-4
MIN_COSINE = 0.99999
CHECK_SAMPLES = 8
# Factors are kept within these bounds: a dead channel (max 0) or a zero weight row would otherwise give 0 or inf.
FACTOR_MIN, FACTOR_MAX = 1e-5, 1e5
# A channel no weight reads (see factors) may be divided by far more: its weight row stays zero whatever the factor,
# and 1e30 keeps its reciprocal a normal float32.
UNREAD_FACTOR_MAX = 1e30
PREFIX = "lowbit_smoothquant"


@dataclass(frozen=True)
class Site:
    """One MatMul/Gemm that reads an activation and a constant 2-D float weight (an initializer)."""

    node: str
    weight: str
    # The weight's axis that runs over the input channels: 0 for MatMul and Gemm, 1 for Gemm with transB.
    channel_axis: int


@dataclass
class Group:
    """The sites that read one activation: they share one smoothing factor per channel."""

    tensor: str
    channels: int
    sites: list[Site] = field(default_factory=list)


@dataclass(frozen=True)
class Fold:
    """Where a group's 1/s goes when its producer absorbs it: (initializer, axis) pairs each divided by s along
    that axis (a LayerNorm's scale and bias, a producer weight's output columns, a bias)."""

    targets: tuple[tuple[str, int], ...]


@dataclass
class SmoothResult:
    """What smoothing did: the report's section, and the smoothed model when there is one."""

    section: dict[str, Any]
    path: Path | None = None
    model: onnx.ModelProto | None = None
    # Inserted Mul nodes: quantizing them would round the unsmoothed tensor they read, so they stay in float.
    muls: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name the If/Loop/Scan bodies of ``node`` read (some are the outer graph's tensors)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= _subgraph_inputs(inner)
    return names


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each tensor's readers; a node whose bodies read an outer tensor counts as one of its readers, so that a
    weight or activation a body also reads is never rescaled."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in [*node.input, *sorted(_subgraph_inputs(node))]:
            if name:
                out.setdefault(name, []).append(node)
    return out


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _site(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
          uses: dict[str, list[onnx.NodeProto]]) -> Site | None:
    """``node`` as a smoothable site, or None: input 0 an activation, input 1 a float32 2-D initializer that
    only this node reads (scaling a shared weight would change its other readers)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    x, w = node.input[0], node.input[1]
    if x in inits or w not in inits or len(uses.get(w, [])) != 1:
        return None
    t = inits[w]
    if t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
        return None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None  # the activation's channels run along its first axis: not the layout smoothed here
        return Site(node.name, w, 1 if _attr(node, "transB", 0) else 0)
    return Site(node.name, w, 0)


def find_groups(model: onnx.ModelProto) -> list[Group]:
    """The smoothable MatMul/Gemm sites of the main graph, grouped by the activation they read (graph order)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = _consumers(graph)
    groups: dict[str, Group] = {}
    for node in graph.node:
        if not node.name:
            continue
        site = _site(node, inits, uses)
        if site is None:
            continue
        channels = int(inits[site.weight].dims[site.channel_axis])
        group = groups.setdefault(node.input[0], Group(node.input[0], channels))
        if group.channels == channels:
            group.sites.append(site)
    return list(groups.values())


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def channel_max_delta(model: onnx.ModelProto, groups: list[Group]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """What to add to the model so that a run returns, per group, max|X| over every axis but the last: Abs,
    Reshape to [-1, channels], ReduceMax over axis 0. Returns the delta and each group's output name."""
    delta = onnx.ModelProto()
    names: dict[str, str] = {}
    axes_as_input = _opset(model) >= 18  # ReduceMax took its axes as an attribute before opset 18
    axes = f"{PREFIX}_axes0"
    if axes_as_input:
        delta.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
    for i, g in enumerate(groups):
        base = f"{PREFIX}_stat{i}"
        shape = f"{base}_shape"
        delta.graph.initializer.append(numpy_helper.from_array(np.array([-1, g.channels], np.int64), shape))
        delta.graph.node.append(helper.make_node("Abs", [g.tensor], [f"{base}_abs"], name=f"{base}_abs"))
        delta.graph.node.append(helper.make_node("Reshape", [f"{base}_abs", shape], [f"{base}_2d"],
                                                 name=f"{base}_2d"))
        out = f"{base}_max"
        if axes_as_input:
            delta.graph.node.append(helper.make_node("ReduceMax", [f"{base}_2d", axes], [out], name=out,
                                                     keepdims=0))
        else:
            delta.graph.node.append(helper.make_node("ReduceMax", [f"{base}_2d"], [out], name=out, axes=[0],
                                                     keepdims=0))
        delta.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [g.channels]))
        names[g.tensor] = out
    return delta, names


def channel_maxima(model_path: Path, model: onnx.ModelProto, groups: list[Group], batches: Batches,
                   providers: list[str], threads: int) -> tuple[dict[str, np.ndarray], int]:
    """max|X_j| of every group's input over the calibration batches, in one streaming pass: ONNX Runtime reduces
    each input to one value a channel, and a batch whose observed activations are large runs in parts (the same
    bound as min/max calibration, calibrate.minmax_samples_per_run). Returns the maxima and the samples seen."""
    delta, names = channel_max_delta(model, groups)
    session = session_with(model_path, delta, providers, threads, "model for SmoothQuant's channel maxima")
    wanted = list(names.values())
    maxima = {g.tensor: np.zeros(g.channels, np.float64) for g in groups}
    samples = 0
    per_run: int | None = None
    for feed, n in batches():
        if per_run is None:
            per_run = minmax_samples_per_run(model, feed, n, [g.tensor for g in groups])
        for part in split_feed(feed, n, per_run):
            got = dict(zip(wanted, runtime.run(session, part, "model during SmoothQuant's pass", wanted),
                           strict=True))
            for t, out in names.items():
                np.maximum(maxima[t], np.asarray(got[out], np.float64).reshape(-1), out=maxima[t])
        samples += n
    return maxima, samples


def spread(maxima: np.ndarray) -> float:
    """Largest channel max over the median channel's (channels that never move are left out of the median)."""
    live = maxima[np.isfinite(maxima) & (maxima > 0)]
    if live.size == 0:
        return 1.0
    return float(live.max() / median(live))


def factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), within [FACTOR_MIN, FACTOR_MAX]. A channel that never moves
    keeps 1. A channel whose weight row is all zeros adds nothing to the product whatever its values, but shares
    the activation's range: it is scaled down to the largest smoothed channel. Left at 1 while the others were
    divided by up to 1e5, it held the whole range alone: openWakeWord's mel spectrogram reads no filter weight
    from its lowest bins, which carry the power spectrum's largest values (~1e12), and its int8 output was all
    zeros (cosine 0.0 against 0.905 unsmoothed; 0.905 with this rule)."""
    s = np.ones_like(x_max, dtype=np.float64)
    ok = (x_max > 0) & (w_max > 0) & np.isfinite(x_max)
    s[ok] = x_max[ok] ** alpha / w_max[ok] ** (1.0 - alpha)
    s = np.clip(s, FACTOR_MIN, FACTOR_MAX)
    unread = (x_max > 0) & (w_max == 0) & np.isfinite(x_max)
    if ok.any() and unread.any():
        level = float(np.max(x_max[ok] / s[ok]))
        s[unread] = np.clip(x_max[unread] / level, 1.0, UNREAD_FACTOR_MAX)
    return s


def _bias_axis(t: onnx.TensorProto, channels: int) -> bool:
    """A bias that only varies along the last axis, with ``channels`` entries ([C] or [1, ..., 1, C])."""
    dims = list(t.dims)
    return bool(dims) and dims[-1] == channels and all(d == 1 for d in dims[:-1])


@dataclass(frozen=True)
class GraphIndex:
    """The main graph's initializers, each tensor's readers and producer, and its outputs, built once."""

    inits: dict[str, onnx.TensorProto]
    uses: dict[str, list[onnx.NodeProto]]
    producer: dict[str, onnx.NodeProto]
    outputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphIndex:
        g = model.graph
        return cls({t.name: t for t in g.initializer}, _consumers(g), {o: n for n in g.node for o in n.output},
                   {o.name for o in g.output})

    def sole(self, name: str) -> bool:
        """Read by one node only, and not a graph output."""
        return len(self.uses.get(name, [])) == 1 and name not in self.outputs

    def own_float(self, name: str) -> bool:
        """A float32 initializer that one node only reads."""
        return name in self.inits and len(self.uses.get(name, [])) == 1 and \
            self.inits[name].data_type == TensorProto.FLOAT


def _fold_layernorm(node: onnx.NodeProto, idx: GraphIndex, channels: int) -> Fold | None:
    """A LayerNormalization over the last axis whose scale (and bias) are its own: y / s = x̂ (scale / s) + bias / s."""
    if _attr(node, "axis", -1) != -1:
        return None
    params = [p for p in node.input[1:3] if p]
    if not params or any(not idx.own_float(p) or list(idx.inits[p].dims) != [channels] for p in params):
        return None
    return Fold(tuple((p, 0) for p in params))


def _through_bias(node: onnx.NodeProto | None, idx: GraphIndex, channels: int,
                  targets: list[tuple[str, int]]) -> onnx.NodeProto | None:
    """Past a bias Add (its constant, [C] or [1, ..., 1, C], joins ``targets``) to the node that feeds it; ``node``
    itself when it is no Add; None when it is an Add that cannot take the factor."""
    if node is None or node.op_type != "Add":
        return node
    consts = [i for i in node.input if i in idx.inits]
    if len(node.input) != 2 or len(consts) != 1 or not idx.own_float(consts[0]) \
            or not _bias_axis(idx.inits[consts[0]], channels):
        return None
    other = node.input[1] if consts[0] == node.input[0] else node.input[0]
    if not idx.sole(other):
        return None
    targets.append((consts[0], len(idx.inits[consts[0]].dims) - 1))
    return idx.producer.get(other)


def _fold_chain(tensor: str, idx: GraphIndex, channels: int) -> Fold | None:
    """``tensor`` = [Relu] of [bias Add] of a MatMul/Gemm with its own constant weight, each intermediate read by
    the next node only: dividing the weight's output columns (and the bias) by s divides ``tensor`` by s."""
    targets: list[tuple[str, int]] = []
    node = idx.producer.get(tensor)
    if node is not None and node.op_type == "Relu":
        # max(0, y) / s = max(0, y / s) for s > 0.
        if not idx.sole(node.input[0]):
            return None
        node = idx.producer.get(node.input[0])
    node = _through_bias(node, idx, channels, targets)
    if node is None or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    w = node.input[1]
    if node.input[0] in idx.inits or not idx.own_float(w) or len(idx.inits[w].dims) != 2:
        return None
    out_axis = 0 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 1
    if idx.inits[w].dims[out_axis] != channels:
        return None
    targets.append((w, out_axis))
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        if not idx.own_float(c) or not _bias_axis(idx.inits[c], channels):
            return None
        targets.append((c, len(idx.inits[c].dims) - 1))
    return Fold(tuple(targets))


def find_fold(idx: GraphIndex, group: Group) -> Fold | None:
    """Where ``group``'s 1/s can go exactly, or None (then a Mul is inserted): the group's sites must be the
    tensor's only readers, and the tensor not a graph output."""
    site_nodes = {s.node for s in group.sites}
    readers = idx.uses.get(group.tensor, [])
    if group.tensor in idx.outputs or {n.name for n in readers} != site_nodes or len(readers) != len(site_nodes):
        return None
    node = idx.producer.get(group.tensor)
    if node is None:
        return None  # a graph input
    if node.op_type == "LayerNormalization":
        return _fold_layernorm(node, idx, group.channels) if node.output[0] == group.tensor else None
    return _fold_chain(group.tensor, idx, group.channels)


def _scale_along(a: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * a.ndim
    shape[axis] = s.size
    out: np.ndarray = (a.astype(np.float64) * s.reshape(shape)).astype(a.dtype)
    return out


@dataclass
class Plan:
    """The smoothing to apply: each group's factors and where its 1/s goes (None: an inserted Mul)."""

    groups: list[Group]
    factors: dict[str, np.ndarray]
    folds: dict[str, Fold | None]


def apply(model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, list[str]]:
    """A smoothed copy of ``model``; returns it and the names of the Mul nodes inserted."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = {t.name: i for i, t in enumerate(graph.initializer)}
    arrays: dict[str, np.ndarray] = {}

    def scale(name: str, s: np.ndarray, axis: int) -> None:
        a = arrays[name] if name in arrays else numpy_helper.to_array(graph.initializer[index[name]])
        arrays[name] = _scale_along(a, s, axis)

    muls: list[str] = []
    for i, group in enumerate(plan.groups):
        s = plan.factors[group.tensor]
        for site in group.sites:
            scale(site.weight, s, site.channel_axis)
        fold = plan.folds.get(group.tensor)
        if fold is not None:
            for name, axis in fold.targets:
                scale(name, 1.0 / s, axis)
        else:
            muls.append(_insert_mul(graph, group, (1.0 / s).astype(np.float32), i))
    for name, a in arrays.items():
        graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(a, name))
    return out, muls


def _insert_mul(graph: onnx.GraphProto, group: Group, inv: np.ndarray, i: int) -> str:
    """X * (1/s) just before the group's first site (so the node order stays topological); the sites read it."""
    name = f"{PREFIX}_mul{i}"
    const, smoothed = f"{name}_inv_s", f"{group.tensor}_{PREFIX}{i}"
    graph.initializer.append(numpy_helper.from_array(inv, const))
    site_nodes = {s.node for s in group.sites}
    first = next(k for k, n in enumerate(graph.node) if n.name in site_nodes)
    graph.node.insert(first, helper.make_node("Mul", [group.tensor, const], [smoothed], name=name))
    # The calibrator and the quantizer read a tensor's type from its value info: the new one is the old one's.
    known = next((vi for vi in (*graph.value_info, *graph.input, *graph.output) if vi.name == group.tensor), None)
    if known is not None:
        vi = graph.value_info.add()
        vi.CopyFrom(known)
        vi.name = smoothed
    for n in graph.node:
        if n.name in site_nodes:
            n.input[0] = smoothed
    return name


def weight_row_max(idx: GraphIndex, group: Group) -> np.ndarray:
    """max|W_j| over every site of the group (the rows the factors multiply)."""
    inits = idx.inits
    out = np.zeros(group.channels, np.float64)
    for site in group.sites:
        w = np.abs(numpy_helper.to_array(inits[site.weight]).astype(np.float64))
        np.maximum(out, w.max(axis=1 - site.channel_axis), out=out)
    return out


def compare_outputs(ref: list[Any], got: list[Any]) -> tuple[float, float]:
    """(worst relative error, worst cosine) over the outputs: max|a - b| / max|a| on the finite values (the
    non-finite ones must sit in the same places), 1.0 / 0.0 for a float output that differs in shape or
    non-finite pattern, or a non-float one that differs at all."""
    worst_rel, worst_cos = 0.0, 1.0
    for a_raw, b_raw in zip(ref, got, strict=True):
        a, b = np.asarray(a_raw), np.asarray(b_raw)
        if a.shape != b.shape:
            return 1.0, 0.0
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                return 1.0, 0.0
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        fin = np.isfinite(a64)
        if not np.array_equal(fin, np.isfinite(b64)) or not np.array_equal(a64[~fin], b64[~fin]):
            return 1.0, 0.0
        a64, b64 = a64[fin], b64[fin]
        if a64.size == 0:
            continue
        scale = float(np.abs(a64).max())
        worst_rel = max(worst_rel, float(np.abs(a64 - b64).max()) / scale if scale > 0 else float(
            np.abs(b64).max() > 0))
        na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        cos = float(a64 @ b64) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        worst_cos = min(worst_cos, cos)
    return worst_rel, worst_cos


def check_samples(batches: Batches, limit: int = CHECK_SAMPLES) -> tuple[list[dict[str, np.ndarray]], int]:
    """The first batches of the calibration samples, up to ``limit`` samples (whole batches), and their count."""
    feeds: list[dict[str, np.ndarray]] = []
    seen = 0
    for feed, n in batches():
        if seen >= limit:
            break
        feeds.append(feed)
        seen += n
    return feeds, seen


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]], providers: list[str], threads: int,
             what: str) -> Iterator[list[Any]]:
    session = runtime.make_session(path, providers, threads, what)
    for feed in feeds:
        yield runtime.run(session, feed, what)


def check_equivalence(original: Path, smoothed: Path, feeds: list[dict[str, np.ndarray]], providers: list[str],
                      threads: int) -> tuple[float, float]:
    """(worst relative error, worst cosine) of the smoothed model's outputs against the original's on ``feeds``.
    The reference outputs are kept (model outputs only) and its session released before the smoothed model's
    opens, so the two never sit in memory together."""
    ref = list(_outputs(original, feeds, providers, threads, "prepared model (SmoothQuant check)"))
    rel, cos = 0.0, 1.0
    for want, got in zip(ref, _outputs(smoothed, feeds, providers, threads, "smoothed model"), strict=True):
        r, c = compare_outputs(want, got)
        rel, cos = max(rel, r), min(cos, c)
    return rel, cos


@dataclass(frozen=True)
class Settings:
    mode: str  # "auto" | "on" | "off"
    alpha: float
    threshold: float = SPREAD_THRESHOLD


def _section(settings: Settings, enabled: bool, reason: str, **values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"enabled": enabled, "reason": reason, "mode": settings.mode, "alpha": settings.alpha,
                           "spread_threshold": settings.threshold}
    out.update(values)
    return out


def plan_smoothing(model: onnx.ModelProto, groups: list[Group], maxima: dict[str, np.ndarray],
                   settings: Settings) -> tuple[Plan, dict[str, float]]:
    """Which groups to smoothe (all with "on"; with "auto" those whose spread exceeds the threshold; never one
    whose maxima are not finite) and their factors. Also returns every group's spread."""
    spreads = {g.tensor: spread(maxima[g.tensor]) for g in groups}
    chosen = [g for g in groups if np.isfinite(maxima[g.tensor]).all()
              and (settings.mode == "on" or spreads[g.tensor] > settings.threshold)]
    plan = Plan(chosen, {}, {})
    idx = GraphIndex.of(model)
    for g in chosen:
        plan.factors[g.tensor] = factors(maxima[g.tensor], weight_row_max(idx, g), settings.alpha)
        plan.folds[g.tensor] = find_fold(idx, g)
    return plan, spreads


def smooth(model_path: Path, model: onnx.ModelProto, batches: Batches, settings: Settings, providers: list[str],
           threads: int, dest: Path) -> SmoothResult:
    """Measure, decide, smooth and check; the smoothed model is written to ``dest`` when it passes."""
    started = time.perf_counter()
    if settings.mode == "off":
        return SmoothResult(_section(settings, False, "option smoothquant is off"))
    groups = find_groups(model)
    if not groups:
        return SmoothResult(_section(settings, False, "no MatMul/Gemm reads an activation with a constant weight: "
                                     "nothing to smooth", candidates=0))
    maxima, samples = channel_maxima(model_path, model, groups, batches, providers, threads)
    plan, spreads = plan_smoothing(model, groups, maxima, settings)
    before = max(spreads.values())
    common: dict[str, Any] = {"candidates": sum(len(g.sites) for g in groups), "samples": samples,
                              "largest_spread_before": round(before, 3)}
    if not plan.groups:
        why = (f"the largest channel spread of a MatMul/Gemm input ({before:.1f}x the median channel) is not above "
               f"the threshold ({settings.threshold:g}x)")
        return SmoothResult(_section(settings, False, why, **common, seconds=round(time.perf_counter() - started, 3)))
    smoothed, muls = apply(model, plan)
    onnx.save(smoothed, str(dest))
    after = dict(spreads)
    after.update({g.tensor: spread(maxima[g.tensor] / plan.factors[g.tensor]) for g in plan.groups})
    feeds, checked = check_samples(batches)
    rel, cos = check_equivalence(model_path, dest, feeds, providers, threads)
    passed = rel <= MAX_RELATIVE_ERROR and cos >= MIN_COSINE
    common.update(
        matmuls_smoothed=sum(len(g.sites) for g in plan.groups), groups=len(plan.groups),
        folded=sum(1 for f in plan.folds.values() if f is not None), muls_inserted=len(muls),
        largest_spread_after=round(max(after.values()), 3),
        check={"samples": checked, "max_relative_error": float(f"{rel:.3g}"), "min_cosine": round(cos, 9),
               "passed": passed},
        seconds=round(time.perf_counter() - started, 3),
    )
    if not passed:
        dest.unlink(missing_ok=True)
        why = (f"the smoothed float model differs from the prepared one (max relative error {rel:.3g}, cosine "
               f"{cos:.7f}; allowed {MAX_RELATIVE_ERROR:g} / {MIN_COSINE})")
        return SmoothResult(_section(settings, False, why, **common),
                            warnings=[f"SmoothQuant skipped: {why}; int8_static ran on the model as is"])
    why = "option smoothquant is on" if settings.mode == "on" else (
        f"{len(plan.groups)} MatMul/Gemm input(s) have a channel spread above {settings.threshold:g}x")
    return SmoothResult(_section(settings, True, why, **common), dest, smoothed, tuple(muls))


def smooth_static(ctx: RecipeContext) -> tuple[RecipeContext, SmoothResult]:
    """int8_static's smoothing step: the context the rest of the recipe runs with (the smoothed model in place of
    the prepared one, its Muls excluded from quantization, a cache key of its own) and what was done."""
    opts, split = ctx.opts, ctx.split
    settings = Settings(opts.smoothquant, opts.smoothquant_alpha)
    assert ctx.data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    c0, c1 = split.calib_range
    batches = batch_source(ctx.data.calib_reader, ctx.info.inputs, split.calib_plan, c0, c1)
    ctx.step("calibrating", 0.0)
    res = smooth(ctx.norm_path, ctx.normalized, batches, settings, ctx.providers, ctx.cfg.threads,
                 ctx.work / "smoothed.onnx")
    ctx.warnings.extend(res.warnings)
    if res.path is None or res.model is None:
        return ctx, res
    smoothed_opts = dataclasses.replace(opts, nodes_to_exclude=(*opts.nodes_to_exclude, *res.muls))
    # The statistics cache is keyed by model: the smoothed model's ranges are its own.
    key = f"{ctx.model_sha}+smoothquant:{sha256_file(res.path)}"
    return dataclasses.replace(ctx, norm_path=res.path, normalized=res.model, opts=smoothed_opts,
                               model_sha=key), res
