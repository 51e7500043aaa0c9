"""Quantization-aware fine-tuning of an exported program (runs in the .pt2 child process only).

lowbit's own fake quantization, written for the int8 model ONNX Runtime's QDQ quantizer will build, so
that what the model trains against is what it will run as:

- the weight of every ``aten.linear`` / ``aten.conv{1,2,3}d`` / non-transposed ``aten.convolution`` is
  quantized per output channel, symmetric int8 in [-127, 127] with scale ``max|w| / 127`` (ONNX Runtime's
  per-channel weight scale), or, with ``train_weight_ranges``, a learned scale initialised to that;
- every activation the int8 ONNX model quantizes is quantized per tensor, asymmetric uint8, scale
  ``(hi - lo) / 255`` and zero point ``round(-lo / scale)`` exactly as ONNX Runtime derives them from a
  range, one quantizer for all the tensors ONNX Runtime quantizes with the same parameters (the output of a
  Transpose, Reshape or Split takes its input's; a Gather's output its table's, which needs none of its
  own). With ``train_activation_ranges`` the scale (as its logarithm) and the zero point are learned,
  LSQ-style, except where ONNX Runtime fixes the range itself (Softmax outputs: [0, 1]);
- every other parameter the int8 model quantizes per tensor (biases read by an Add, LayerNorm scales,
  embedding tables, ``ParamFakeQuant``) with the scheme it uses for it.

Which node of the program is which ONNX tensor is found by value, not by name (``match_points``): the
exporter decomposes the program before it names ONNX tensors, so a name like ``add_4`` means one tensor in
the ONNX model and an unrelated one in ``ep.module()``. Both models run on the same calibration samples and
each quantized ONNX activation goes to the program node whose values agree (count, min, max, mean, mean
absolute value and RMS within ``MATCH_TOL`` of the tensor's range); activations that match nothing, or
several different tensors, are not simulated and are reported. Linear biases and exact GELUs are first
spelt out as the export computes them (``split_linear_bias``, ``spell_out_gelu``), so that the tensors
ONNX Runtime quantizes inside them have nodes too.

Rounding passes gradients straight through (STE). The fake-quantized copy of the program's graph module
(``ep.module()``: ATen operators, parameters as attributes, batch-norm statistics and dropout as exported,
i.e. in inference behaviour) is fine-tuned to match the float model's own outputs (normalised mean squared
error, averaged over the float outputs), plus cross-entropy against ``labels`` when the data has them and an
output is [N, classes]: Adam for the weights, each tensor's rate ``learning_rate`` times its own int8 step
(see ``learning_rates``), so one setting suits models whose weights differ in scale by orders of magnitude;
momentum SGD for the ranges; a warm-up and a cosine decay for both. Embedding tables are not trained. A
non-finite loss restarts training from the initial weights at a tenth of the rates, at most ``RETRIES``
times. The fine-tuned float weights (clipped to learned weight ranges) go back into the exported program,
which is exported to ONNX; the learned activation ranges go back to the parent, which gives them to ONNX
Runtime's quantizer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from worker.engine.errors import EngineError
from worker.engine.feeds import FeedPlan, fixed_batch, iter_batches
from worker.engine.npz import NpzReader, inspect_npz
from worker.engine.torch_export import export_onnx, tensor_infos, torch_args

# torch and onnxruntime are imported inside the functions, as in torch_export. Only the .pt2 child imports this
# module, after its main() has loaded torch, so there it changes nothing; importing it elsewhere (its tests) does not
# load PyTorch.

Emit = Callable[[dict[str, Any]], None]
TASK_LOSS_WEIGHT = 0.1
MAX_CURVE_POINTS = 50
CHECK_SAMPLES = 64
# The loss before and after training is measured on this many of the first calibration samples.
PROBE_SAMPLES = 32
# Samples both models run to match ONNX tensors to program nodes by value.
MATCH_SAMPLES = 16
# ONNX tensors fetched per run while matching (see onnx_moments).
MOMENT_BYTES = 256 << 20
# Largest disagreement (relative to the ONNX tensor's largest magnitude) of any statistic for a match; ONNX
# Runtime and PyTorch agree to ~1e-6 on the same tensor. Candidates within SAME_TOL of the best are the same
# values (views, copies); a different tensor within AMBIGUOUS_FACTOR of the best makes the match ambiguous.
MATCH_TOL = 1e-3
SAME_TOL = 1e-6
AMBIGUOUS_FACTOR = 10.0
# A non-finite loss restarts training at the rates divided by RETRY_FACTOR, at most RETRIES times.
RETRIES = 2
RETRY_FACTOR = 10.0
WARMUP_SHARE = 0.1
RANGE_MOMENTUM = 0.9
# The fan-in at which a weight's Adam rate is exactly learning_rate x its int8 step (see learning_rates).
REFERENCE_FAN_IN = 64


def _torch() -> Any:
    import torch

    return torch


def _round_ste(v: Any) -> Any:
    return v + (v.round() - v).detach()


def _modules() -> tuple[type, type]:
    torch = _torch()
    nn = torch.nn
    module: Any = nn.Module

    class ActFakeQuant(module):  # type: ignore[misc]  # torch is imported lazily, as Any
        """Per-tensor asymmetric uint8, as ONNX Runtime quantizes an activation with range [lo, hi]."""

        def __init__(self, lo: float, hi: float, learn: bool) -> None:
            super().__init__()
            lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
            if hi - lo < 1e-8:
                hi = lo + 1e-8
            scale = (hi - lo) / 255.0
            zero = min(255.0, max(0.0, float(round(-lo / scale))))
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn)
            self.zero_point = nn.Parameter(torch.tensor(zero), requires_grad=learn)

        def forward(self, x: Any) -> Any:
            s = self.log_scale.exp()
            z = torch.clamp(_round_ste(self.zero_point), 0.0, 255.0)
            # Clamp to the grid's ends in float before dividing: an infinity (a -inf attention mask) becomes
            # the lowest level instead of inf - inf = NaN in the rounding, and no gradient multiplies it.
            # round(x / s) * s on [-z s, (255 - z) s] is (clamp(round(x / s) + z, 0, 255) - z) * s, with
            # LSQ's gradients for s and z (clipped values pass theirs to the range's ends).
            x = torch.maximum(torch.minimum(x, (255.0 - z) * s), -z * s)
            return _round_ste(x / s) * s

        def range(self) -> tuple[float, float]:
            s = float(self.log_scale.detach().exp())
            z = float(min(255.0, max(0.0, round(float(self.zero_point.detach())))))
            return -z * s, (255.0 - z) * s

    class WeightFakeQuant(module):  # type: ignore[misc]  # torch is imported lazily, as Any
        """Per-output-channel symmetric int8 in [-127, 127], ONNX Runtime's per-channel weight scheme."""

        def __init__(self, w: Any, learn: bool) -> None:
            super().__init__()
            self.learn = learn
            amax = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
            self.log_scale = nn.Parameter((amax / 127.0).log(), requires_grad=learn)

        def scale(self, w: Any) -> Any:
            s = self.log_scale.exp() if self.learn else w.detach().abs().flatten(1).amax(1).clamp(min=1e-12) / 127.0
            return s.view(-1, *([1] * (w.dim() - 1)))

        def forward(self, w: Any) -> Any:
            s = self.scale(w)
            return torch.clamp(_round_ste(w / s), -127.0, 127.0) * s

        def clip(self, w: Any) -> Any:
            """The float weight to export: within the learned range, so ONNX Runtime derives the same scale."""
            if not self.learn:
                return w
            bound = 127.0 * self.scale(w)
            return torch.maximum(torch.minimum(w, bound), -bound)

    return ActFakeQuant, WeightFakeQuant


def _param_module() -> type:
    torch = _torch()
    module: Any = torch.nn.Module

    class ParamFakeQuant(module):  # type: ignore[misc]  # torch is imported lazily, as Any
        """A parameter ONNX Runtime quantizes per tensor though it is no Linear/Conv weight (a bias read by an
        Add, a LayerNorm scale, an embedding table read by a Gather), with the scheme the post-training model
        shows for it: ``int8`` symmetric (max|p| / 127) or ``uint8`` asymmetric over [min(p, 0), max(p, 0)].
        The range follows the parameter as it trains, as the quantizer will derive it from the trained value."""

        def __init__(self, scheme: str) -> None:
            super().__init__()
            self.scheme = scheme

        def forward(self, p: Any) -> Any:
            d = p.detach()
            if self.scheme == "int8":
                s = d.abs().max().clamp(min=1e-12) / 127.0
                return torch.clamp(_round_ste(p / s), -127.0, 127.0) * s
            lo, hi = d.min().clamp(max=0.0), d.max().clamp(min=0.0)
            s = ((hi - lo) / 255.0).clamp(min=1e-12)
            z = torch.round(-lo / s)
            return (torch.clamp(_round_ste(p / s) + z, 0.0, 255.0) - z) * s

    return ParamFakeQuant


# --- which program node is which ONNX tensor ------------------------------------------------------------------


@dataclass
class Moments:
    """Layout-free statistics of a tensor over several batches (float64), to recognise it in another model."""

    count: int = 0
    nonfinite: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    total: float = 0.0
    total_abs: float = 0.0
    total_sq: float = 0.0
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    def add(self, x: np.ndarray) -> None:
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        self.shapes.append(tuple(int(d) for d in np.shape(x)))
        finite = np.isfinite(v)
        if not finite.all():
            self.nonfinite += int(v.size - finite.sum())
            v = v[finite]
        self.count += int(v.size)
        if v.size:
            self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
            self.total += float(v.sum())
            self.total_abs += float(np.abs(v).sum())
            self.total_sq += float(np.dot(v, v))

    def vector(self) -> np.ndarray:
        n = max(self.count, 1)
        return np.array([self.lo, self.hi, self.total / n, self.total_abs / n, math.sqrt(self.total_sq / n)])

    def distance(self, other: Moments) -> float:
        """How far ``other``'s statistics are from these, relative to this tensor's largest magnitude."""
        if other.count != self.count or other.nonfinite != self.nonfinite or not self.count:
            return math.inf
        scale = max(abs(self.lo), abs(self.hi), 1e-30)
        return float(np.max(np.abs(self.vector() - other.vector()))) / scale


@dataclass
class Matching:
    nodes: dict[str, str]  # ONNX tensor -> program node
    unmatched: dict[str, str]  # ONNX tensor -> why it has no program node


def onnx_moments(onnx_path: Path, names: list[str], feeds: list[dict[str, np.ndarray]],
                 threads: int) -> dict[str, Moments]:
    """Statistics of the ONNX model's tensors ``names`` on ``feeds`` (each made an extra graph output), fetched
    in groups of at most MOMENT_BYTES per run: all at once, fracast's 491 tensors held 3 GB at batch 8."""
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    groups = moment_groups(model, names, feeds[0] if feeds else {})
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.log_severity_level = 3
    # Graph optimisations could fuse a tensor away; the names must be the quantizer's.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    del model
    wanted = {i.name for i in sess.get_inputs()}
    out = {n: Moments() for n in names}
    for group in groups:
        for feed in feeds:
            values = sess.run(group, {k: v for k, v in feed.items() if k in wanted})
            for n, v in zip(group, values, strict=True):
                out[n].add(v)
            del values
    return out


def moment_groups(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray],
                  budget: int | None = None) -> list[list[str]]:
    """``names`` in order, cut into groups whose tensors (sized by shape inference on ``feed``; one it cannot
    size counts as the largest it can) fit ``budget`` bytes together (default MOMENT_BYTES)."""
    # lazy: both load ONNX Runtime, as onnx_moments does
    from worker.engine.calibrate import sized_bytes
    from worker.engine.validate import budget_groups

    budget = MOMENT_BYTES if budget is None else budget
    if not names:
        return []
    sizes = sized_bytes(model, feed, names, budget // 16) if feed else dict.fromkeys(names, budget // 16)
    return budget_groups(sizes, budget)


def program_moments(gm: Any, program: Any, inputs: list[Any], feeds: list[dict[str, np.ndarray]],
                    device: str) -> tuple[dict[str, Moments], list[str]]:
    """Statistics of every float32 node of ``gm`` on ``feeds``, and the nodes in graph order."""
    from torch.utils import _pytree as pytree

    torch = _torch()
    stats: dict[str, Moments] = {}

    interpreter: Any = torch.fx.Interpreter

    class Observer(interpreter):  # type: ignore[misc]  # torch is imported lazily, as Any
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.op in ("placeholder", "call_function", "call_module") and isinstance(out, torch.Tensor) \
                    and out.dtype == torch.float32:
                stats.setdefault(n.name, Moments()).add(out.detach().cpu().numpy())
            return out

    observer = Observer(gm, garbage_collect_values=True)
    with torch.no_grad():
        for feed in feeds:
            args, kwargs = torch_args(program, inputs, feed, device)
            observer.run(*pytree.tree_leaves((args, kwargs)))
    order = [n.name for n in gm.graph.nodes if n.name in stats]
    return stats, order


def match_points(onnx_stats: dict[str, Moments], program_stats: dict[str, Moments], order: list[str]) -> Matching:
    """Each ONNX tensor's program node: the one whose statistics agree best, within MATCH_TOL. Among nodes
    holding the same values (a view, a copy) the one of the same shape, then of the same name, then the
    earliest (quantizing a tensor in ONNX reaches all its readers, as quantizing the first copy does here)."""
    rank = {name: i for i, name in enumerate(order)}
    nodes: dict[str, str] = {}
    unmatched: dict[str, str] = {}
    for name, ref in sorted(onnx_stats.items()):
        if not ref.count:
            unmatched[name] = "no finite values on the matching samples"
            continue
        if ref.lo == ref.hi:
            unmatched[name] = "constant: any program node holding that constant would match"
            continue
        scored = sorted((ref.distance(st), cand) for cand, st in program_stats.items())
        scored = [(d, c) for d, c in scored if d <= MATCH_TOL]
        if not scored:
            unmatched[name] = "no node of the PyTorch program holds the same values"
            continue
        best = scored[0][0]
        same = [c for d, c in scored if d <= best + SAME_TOL]
        others = [d for d, c in scored if d > best + SAME_TOL]
        if others and others[0] <= AMBIGUOUS_FACTOR * max(best, SAME_TOL):
            unmatched[name] = "several different nodes of the PyTorch program hold nearly the same values"
            continue
        shape = ref.shapes
        nodes[name] = min(same, key=lambda c: (program_stats[c].shapes != shape, c != name, rank.get(c, 1 << 30)))
    return Matching(nodes, unmatched)


def split_linear_bias(gm: Any) -> int:
    """Rewrite each ``aten.linear(x, w, b)`` of ``gm`` as ``aten.linear(x, w) + b`` (the same values): the ONNX
    export computes a linear layer over 3-D inputs as MatMul then Add, and ONNX Runtime's quantizer quantizes
    the MatMul's output as an input of the Add, a tensor the fused PyTorch operator never holds. Split, the
    program has a node for it, so it is matched and simulated like any other. Returns how many were split."""
    torch = _torch()
    aten = torch.ops.aten
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is None:
            continue
        with gm.graph.inserting_before(node):
            plain = gm.graph.call_function(aten.linear.default, (node.args[0], node.args[1]))
            plain.meta = dict(node.meta)
        with gm.graph.inserting_after(plain):
            total = gm.graph.call_function(aten.add.Tensor, (plain, bias))
            total.meta = dict(node.meta)
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def embedding_tables(gm: Any) -> set[str]:
    """Parameters read as embedding tables. Training leaves them alone: only the rows of tokens in the
    calibration samples would get a gradient, so they would fit those samples and nothing else (and the
    table's quantization range, shared by every row, would follow them)."""
    torch = _torch()
    return {n.args[0].target for n in gm.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.embedding.default
            and getattr(n.args[0], "op", None) == "get_attr"}


def parameter_schemes(onnx_path: Path, schemes: dict[str, str], named: dict[str, Any]) -> dict[str, str]:
    """The program's parameters that hold the values of the ONNX initializers ``schemes`` names (a bias, a
    LayerNorm scale, an embedding table the int8 model quantizes per tensor), with their scheme. Found by value:
    the exporter names most initializers after parameters, but merges equal ones (every LayerNorm scale of an
    untrained model is one initializer of ones) and the normalization may copy one under a new name."""
    model = onnx.load(str(onnx_path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in schemes}
    del model
    out: dict[str, str] = {}
    for pname, p in named.items():
        if not p.is_floating_point() or pname.startswith("lowbit_"):
            continue
        arr = p.detach().cpu().numpy()
        for iname, v in values.items():
            if v.shape == arr.shape and v.dtype == arr.dtype and np.array_equal(v, arr):
                out[pname] = schemes[iname]
                break
    return out


def spell_out_gelu(gm: Any) -> int:
    """Rewrite each exact ``aten.gelu(x)`` of ``gm`` as the ONNX export computes it at opset 18,
    ``x * (0.5 * (erf(x / sqrt(2)) + 1))``, one node per step: ONNX Runtime's quantizer quantizes the
    Add's and the Muls' tensors in there, so the program needs nodes for them to simulate it. Returns how
    many were rewritten (tanh-approximated GELUs are left alone)."""
    torch = _torch()
    aten = torch.ops.aten
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.gelu.default:
            continue
        if node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") != "none":
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            prev = gm.graph.call_function(aten.div.Tensor, (x, math.sqrt(2.0)))
            prev = gm.graph.call_function(aten.erf.default, (prev,))
            prev = gm.graph.call_function(aten.add.Tensor, (prev, 1.0))
            prev = gm.graph.call_function(aten.mul.Tensor, (prev, 0.5))
            prev = gm.graph.call_function(aten.mul.Tensor, (x, prev))
        prev.meta = dict(node.meta)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


# --- fake quantization in the graph ---------------------------------------------------------------------------


@dataclass
class Placement:
    """One activation fake quantizer (one scale and zero point): the program nodes it follows and the ONNX
    tensors it stands for. Several nodes share one when ONNX Runtime quantizes several tensors with the same
    parameters (the output of a Transpose, Reshape or Split with its input's)."""

    nodes: list[str]
    tensors: list[str]
    lo: float
    hi: float
    learn: bool


def insert_fake_quant(gm: Any, placements: list[Placement], train_weights: bool,
                      params: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Rewrite ``gm`` in place: activation quantizers after ``placements``' nodes, a per-channel quantizer on
    every Linear/Conv weight, and a per-tensor one on each other parameter of ``params`` (name -> scheme, see
    ParamFakeQuant). Returns (activation quantizers by program node (shared modules where nodes share
    parameters), weight quantizers by parameter name, the other parameters quantized)."""
    torch = _torch()
    ActFakeQuant, WeightFakeQuant = _modules()
    aten = torch.ops.aten
    weight_ops = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    after_inputs = placeholders[-1].next if placeholders else None
    acts: dict[str, Any] = {}
    for i, p in enumerate(placements):
        mod = ActFakeQuant(p.lo, p.hi, p.learn)
        attr = f"lowbit_act_fq_{i}"
        gm.add_module(attr, mod)
        for name in p.nodes:
            node = by_name[name]
            where = after_inputs if node.op == "placeholder" else node.next
            with graph.inserting_before(where):
                q = graph.call_module(attr, (node,))
            node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
            acts[name] = mod
    weights: dict[str, Any] = {}
    by_param: dict[str, tuple[str, Any]] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target not in weight_ops and not (
            node.target == aten.convolution.default and len(node.args) > 6 and node.args[6] is False
        ):
            continue
        w: Any = node.args[1] if len(node.args) > 1 else None
        if getattr(w, "op", None) != "get_attr":
            continue
        param = _attr(gm, w.target)
        if not isinstance(param, torch.Tensor) or not param.is_floating_point() or param.dim() < 2:
            continue
        if w.target not in by_param:
            attr = f"lowbit_weight_fq_{len(by_param)}"
            mod = WeightFakeQuant(param, train_weights)
            gm.add_module(attr, mod)
            by_param[w.target] = (attr, mod)
            weights[w.target] = mod
        attr, _ = by_param[w.target]
        with graph.inserting_before(node):
            wq = graph.call_module(attr, (w,))
        node.replace_input_with(w, wq)
    quantized_params: list[str] = []
    ParamFakeQuant = _param_module()
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target in weights or node.target not in (params or {}):
            continue
        attr = f"lowbit_param_fq_{len(quantized_params)}"
        gm.add_module(attr, ParamFakeQuant((params or {})[node.target]))
        with graph.inserting_after(node):
            q = graph.call_module(attr, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        quantized_params.append(node.target)
    graph.lint()
    gm.recompile()
    return acts, weights, sorted(quantized_params)


def _attr(module: Any, target: str) -> Any:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Data:
    """Training batches from the calibration samples (never the held-out ones)."""

    def __init__(self, req: dict[str, Any], inputs: list[Any], seed: int) -> None:
        d = req["data"]
        ds = inspect_npz(Path(d["path"]))
        plan = FeedPlan(dict(d["modes"]), int(d["samples_per_run"]), ds.num_samples, ds.has_labels)
        reader = NpzReader(Path(d["path"]), ds)
        self.batches = list(iter_batches(reader, inputs, plan, int(d["start"]), int(d["stop"]), with_labels=True))
        if not self.batches:
            raise EngineError("not_enough_samples", "no training batch could be formed from the calibration set")
        self.samples = sum(b.count for b in self.batches)
        self.per = plan.samples_per_run
        self.inputs = inputs
        # Re-batch across samples only when every input is stacked along a dynamic batch axis; complete
        # per-sample feeds (e.g. an RNN state [2, 1, H]) are used batch by batch as given.
        self.resample = not fixed_batch(plan, inputs) and all(m == "stacked" for m in plan.modes.values())
        if self.resample:
            self.arrays = {i.name: np.concatenate([b.feed[i.name] for b in self.batches]) for i in inputs}
            labs = [b.labels for b in self.batches if b.labels is not None]
            self.labels: np.ndarray | None = np.concatenate(labs) if len(labs) == len(self.batches) else None

    def stream(self, seed: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Endless shuffled batches; the same ``seed`` gives the same sequence (a retry sees the same data)."""
        rng = np.random.default_rng(seed)
        while True:
            if self.resample:
                n = self.samples
                idx = rng.permutation(n)
                for s in range(0, n - self.per + 1 if n >= self.per else 1, self.per):
                    take = np.sort(idx[s:s + self.per])
                    yield ({k: v[take] for k, v in self.arrays.items()},
                           self.labels[take] if self.labels is not None else None)
            else:
                for j in rng.permutation(len(self.batches)):
                    b = self.batches[int(j)]
                    yield b.feed, b.labels

    def check_feeds(self, limit: int = CHECK_SAMPLES) -> list[tuple[dict[str, np.ndarray], int]]:
        out, n = [], 0
        for b in self.batches:
            out.append((b.feed, b.count))
            n += b.count
            if n >= limit:
                break
        return out


def pick_device(requested: str) -> tuple[str, list[str]]:
    torch = _torch()
    if requested != "cpu" and torch.cuda.is_available():
        return "cuda", []
    if requested in ("cuda", "gpu"):
        return "cpu", ["the job asked for a GPU, but this worker's PyTorch has no CUDA: trained on the CPU"]
    return "cpu", []




def learning_rates(named: list[tuple[str, Any]], weights: dict[str, Any], relative: float) -> dict[str, float]:
    """Adam's rate for each parameter tensor: ``relative`` times the tensor's own int8 step, i.e. how far
    (in quantization levels) one Adam step may move it, and for a quantized weight times
    ``sqrt(REFERENCE_FAN_IN / fan_in)``. A quantized weight's step is ``max|w| / 127`` of each output channel,
    averaged over channels (ONNX Runtime's per-channel scale); any other float parameter (bias, norm) uses
    ``max|p| / 127`` as if it were quantized per tensor; an all-zero one the median step of the others.

    Why: Adam's update is scale-free, so a fixed absolute rate would move a BERT weight (int8 step ~0.002)
    by many levels per step and a convolution with steps of 0.05 by almost none. And its early steps follow
    the gradient's sign, so all ``fan_in`` weights feeding an output move together: the output shifts by
    ~``fan_in`` steps, while the weights' own rounding noise there grows as ``sqrt(fan_in)``. The fan-in
    factor keeps one step's effect the same share of that noise: CREPE's 65536-input convolutions lost
    accuracy at a rate a 32-input MLP needs."""
    torch = _torch()
    steps: dict[str, float] = {}
    for name, p in named:
        with torch.no_grad():
            if name in weights and p.dim() >= 2:
                fan_in = max(1, p[0].numel())
                step = float(p.abs().flatten(1).amax(1).mean()) / 127.0 * math.sqrt(REFERENCE_FAN_IN / fan_in)
            else:
                step = float(p.abs().max()) / 127.0 if p.numel() else 0.0
        steps[name] = step
    positive = sorted(v for v in steps.values() if v > 0 and math.isfinite(v))
    fallback = positive[len(positive) // 2] if positive else 1e-3
    return {n: relative * (v if v > 0 and math.isfinite(v) else fallback) for n, v in steps.items()}


@dataclass
class Attempt:
    learning_rate: float
    range_learning_rate: float
    steps_run: int = 0
    diverged_at: int | None = None
    loss: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate, "range_learning_rate": self.range_learning_rate,
                "steps_run": self.steps_run, "diverged_at_step": self.diverged_at, "loss": self.loss}


class Diverged(Exception):
    pass


def _round(v: float) -> float | None:
    return float(f"{v:.6g}") if math.isfinite(v) else None


def lr_factor(step: int, steps: int) -> float:
    """The learning rates' multiplier at optimizer step ``step`` (0-based) of ``steps``: linear warm-up over the
    first WARMUP_SHARE of the steps, then a cosine decay to zero."""
    warm = max(1, int(WARMUP_SHARE * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_with_retries(first: Attempt, train: Callable[[Attempt], Any], restart: Callable[[Attempt], None]) -> tuple[
    Any, list[Attempt]
]:
    """``train(first)``; when it raises Diverged, ``restart`` (back to the initial weights) and train again at a
    tenth of both rates, at most RETRIES times, then fail with every attempt named."""
    attempts = [first]
    while True:
        run = attempts[-1]
        try:
            return train(run), attempts
        except Diverged:
            if len(attempts) > RETRIES:
                tried = "; ".join(
                    f"learning_rate {a.learning_rate:g} and range_learning_rate {a.range_learning_rate:g}: loss "
                    f"{a.loss} at step {a.diverged_at}" for a in attempts)
                raise EngineError(
                    "training_diverged",
                    f"the training loss stopped being finite in all {len(attempts)} attempts, each restarted from the "
                    f"original weights at a tenth of the previous rates ({tried}). Try fewer steps, a lower "
                    "learning_rate, train_activation_ranges=false, or the int8_static recipe",
                ) from None
            restart(run)
            attempts.append(Attempt(run.learning_rate / RETRY_FACTOR, run.range_learning_rate / RETRY_FACTOR))


def _distill_terms(out: list[Any], ref: list[Any], powers: list[Any] | None = None,
                   share: float = 1.0) -> list[Any]:
    """Normalised MSE per float output, over the positions where the float model's output is finite (a model
    may output -inf by design; the same -inf from the student is then no error). ``powers``: each float
    output's mean square over the whole batch when ``out`` is a part of it holding ``share`` of its samples
    (the parts' terms then add up to the whole batch's)."""
    torch = _torch()
    powers = _powers(ref) if powers is None else powers
    terms: list[Any] = []
    for o, r in zip(out, ref, strict=True):
        if not r.is_floating_point():
            continue
        finite = torch.isfinite(r)
        d = o - r if bool(finite.all()) else torch.where(finite, o - torch.where(finite, r, 0.0), 0.0)
        terms.append(share * (d ** 2).mean() / (powers[len(terms)] + 1e-12))
    return terms


def _powers(ref: list[Any]) -> list[Any]:
    """Each float output's mean square, the normaliser of _distill_terms: non-finite positions count as 0 (and
    still count in the mean)."""
    torch = _torch()
    return [torch.where(torch.isfinite(r), r, 0.0).pow(2).mean() for r in ref if r.is_floating_point()]


def part_size(batch: int, saved_per_sample: int, budget_mb: float) -> int:
    """Samples per backward pass: as many parts as ``budget_mb`` needs, of even sizes (all-MiniLM-L6-v2 saves
    145 MiB a sample: a batch of 8 in 4 + 4 within 1024 MiB, not 7 + 1)."""
    fits = max(1, min(batch, int(budget_mb * (1 << 20) // max(1, saved_per_sample))))
    parts = -(-batch // fits)
    return -(-batch // parts)


def saved_bytes(torch: Any, run: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``run`` builds its graph: what a
    training step holds at its peak, beyond the model, grows with them."""
    total = 0

    def pack(t: Any) -> Any:
        nonlocal total
        total += int(t.numel()) * int(t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def _first_nonfinite(student: Any, acts: dict[str, Any], placements: dict[str, Placement], forward: Callable[
        [Any, dict[str, np.ndarray]], list[Any]], feed: dict[str, np.ndarray]) -> str:
    """Where the fake-quantized model's first batch turns non-finite, for the error message."""
    torch = _torch()
    seen: list[str] = []
    hooks = []
    for node, mod in acts.items():
        def hook(m: Any, args: Any, out: Any, node: str = node) -> None:
            if not seen and not bool(torch.isfinite(out).all()):
                seen.append(node)
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward(student, feed)
    finally:
        for h in hooks:
            h.remove()
    if seen:
        return (f"the fake quantization of activation {', '.join(placements[seen[0]].tensors)} (program node "
                f"{seen[0]}) already outputs non-finite values")
    return "no fake-quantized activation outputs a non-finite value; the float computation after one does"


@dataclass(frozen=True)
class _Found:
    """Where the int8 model's activations are in the student program, by value (see match_points)."""

    points: dict[str, tuple[float, float]]
    matching: Matching
    placements: list[Placement]
    placed: dict[str, Placement]
    # program node -> the ONNX tensors it stands for
    by_node: dict[str, list[str]]
    match_feeds: list[dict[str, np.ndarray]]
    learn_acts: bool


@dataclass(frozen=True)
class _FakeQuant:
    """The student's fake quantizers and the parameters training updates."""

    frozen: set[str]
    acts: dict[str, Any]
    weights: dict[str, Any]
    quantized_params: Any
    model_named: list[tuple[str, Any]]
    range_params: list[Any]


def _find_activations(req: dict[str, Any], opts: dict[str, Any], data: _Data, inputs: list[Any], program: Any,
                      teacher: Any, device: str, threads: int, emit: Emit) -> tuple[Any, _Found]:
    """The student (a copy of the teacher with biases split off and GELU spelled out) and which of its nodes is
    each activation the int8 ONNX model quantizes: by value, on the same samples."""
    points = {k: (float(v[0]), float(v[1])) for k, v in req["points"].items()}
    fixed = set(req.get("fixed", []))
    # Tensors quantized with another tensor's parameters; those of a parameter's (a Gather's table) hold
    # values on that parameter's grid already and need no quantizer of their own.
    shared = {t: o for t, o in dict(req.get("shared", {})).items() if not o.startswith("param:") and t not in points}
    emit({"event": "matching"})
    match_feeds = [f for f, _ in data.check_feeds(MATCH_SAMPLES)]
    wanted = sorted({*points, *shared})
    o_stats = onnx_moments(Path(req["onnx"]), wanted, match_feeds, threads) if wanted else {}
    student = copy.deepcopy(teacher)
    split_linear_bias(student)
    spell_out_gelu(student)
    p_stats, order = program_moments(student, program, inputs, match_feeds, device)
    matching = match_points(o_stats, p_stats, order)
    members: dict[str, list[str]] = {o: [o] for o in points}
    for t, o in sorted(shared.items()):
        if o in members:
            members[o].append(t)
    learn_acts = bool(opts["train_activation_ranges"])
    placements = []
    taken: set[str] = set()
    for owner in sorted(members, key=lambda o: min((order.index(matching.nodes[t]) for t in members[o]
                                                     if t in matching.nodes), default=len(order))):
        tensors = [t for t in members[owner] if t in matching.nodes and matching.nodes[t] not in taken]
        nodes = sorted({matching.nodes[t] for t in tensors}, key=order.index)
        if not nodes:
            continue
        taken.update(nodes)
        lo, hi = points[owner]
        placements.append(Placement(nodes, tensors, lo, hi, learn_acts and owner not in fixed))
    placed = {n: p for p in placements for n in p.nodes}
    by_node: dict[str, list[str]] = {}
    for p in placements:
        for t in p.tensors:
            by_node.setdefault(matching.nodes[t], []).append(t)
    return student, _Found(points, matching, placements, placed, by_node, match_feeds, learn_acts)


def _fake_quantize(student: Any, found: _Found, opts: dict[str, Any], req: dict[str, Any]) -> _FakeQuant:
    """Fake quantizers into the student (weights, the matched activations, other parameters), and the
    parameters training updates (embedding tables stay as they are)."""
    frozen = embedding_tables(student)
    param_schemes = parameter_schemes(Path(req["onnx"]), dict(req.get("parameters", {})),
                                      dict(student.named_parameters())) if req.get("parameters") else {}
    acts, weights, quantized_params = insert_fake_quant(student, found.placements, bool(opts["train_weight_ranges"]),
                                                        param_schemes)
    if not weights and not acts:
        raise EngineError(
            "nothing_to_quantize",
            "the model has no Linear or Conv layer and none of the activations the int8 model quantizes could be "
            "found in the PyTorch program, so quantization-aware training has nothing to train for",
        )
    model_named = [(n, p) for n, p in student.named_parameters()
                   if not n.startswith("lowbit_") and p.is_floating_point() and n not in frozen]
    for _, p in model_named:
        p.requires_grad_(True)
    range_params = [p for n, p in student.named_parameters() if n.startswith("lowbit_") and p.requires_grad]
    return _FakeQuant(frozen, acts, weights, quantized_params, model_named, range_params)


class _Training:
    """The training loop's state across attempts: the teacher and the student, the data, the progress bar's
    position (it never goes back) and whether the task loss was used."""

    def __init__(self, torch: Any, program: Any, inputs: list[Any], device: str, teacher: Any, student: Any,
                 data: _Data, fq: _FakeQuant, found: _Found, opts: dict[str, Any], seed: int, emit: Emit) -> None:
        self.torch, self.program, self.inputs, self.device = torch, program, inputs, device
        self.teacher, self.student, self.data, self.fq, self.found = teacher, student, data, fq, found
        self.steps, self.seed, self.emit = int(opts["steps"]), seed, emit
        self.base_lrs = learning_rates(fq.model_named, fq.weights, 1.0)
        self.initial = copy.deepcopy(student.state_dict())
        self.use_labels = bool(opts.get("task_loss", False))
        self.window = max(1, self.steps // MAX_CURVE_POINTS)
        self.report_every = max(1, self.steps // 100)
        self.started = time.perf_counter()
        self.last_emit = self.started
        self.done = 0.0  # share of the progress bar used by diverged attempts (it never goes back)
        self.task_used = False
        self.probe: list[dict[str, np.ndarray]] = []
        self.opts = opts
        self.micro = 0  # samples per backward pass: planned on the first batch (plan_parts)
        self.saved_per_sample: int | None = None

    def forward(self, module: Any, feed: dict[str, np.ndarray]) -> list[Any]:
        from torch.utils import _pytree as pytree

        args, kwargs = torch_args(self.program, self.inputs, feed, self.device)
        return list(pytree.tree_leaves(module(*args, **kwargs)))

    def optimizers(self, run: Attempt) -> tuple[list[Any], list[Any]]:
        torch, steps = self.torch, self.steps
        groups: list[dict[str, Any]] = [{"params": [p], "lr": run.learning_rate * self.base_lrs[n]}
                                        for n, p in self.fq.model_named]
        optimizers: list[Any] = [torch.optim.Adam(groups)]
        if self.fq.range_params:
            # Plain momentum SGD for the ranges: the loss is normalised (scale-free), so its gradient in log-scale
            # and zero-point units is too, and a step follows how much a range costs. Adam would turn the ~1e-7
            # gradients of ranges that are already right into full-size steps of noise, every step.
            optimizers.append(torch.optim.SGD(self.fq.range_params, lr=run.range_learning_rate,
                                              momentum=RANGE_MOMENTUM))
        # A warm-up lets Adam's moment estimates form before its steps reach full size; the cosine decay lets
        # weights and ranges settle on the grid at the end instead of stopping mid-jump.
        schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: lr_factor(i, steps)) for o in optimizers]
        return optimizers, schedules

    def part_loss(self, feed: dict[str, np.ndarray], labels: np.ndarray | None, ref: list[Any],
                  powers: list[Any] | None, share: float) -> tuple[Any, Any]:
        """(training loss, distillation loss) of the student on ``feed``, ``share`` of a batch whose float
        outputs' mean squares are ``powers`` (None: ``feed`` is the whole batch)."""
        torch = self.torch
        out = self.forward(self.student, feed)
        terms = _distill_terms(out, ref, powers, share)
        if not terms:
            raise EngineError("training_failed", "the model has no float output to train against")
        loss = distill = sum(terms) / len(terms)
        if self.use_labels and labels is not None:
            idx = next((i for i, o in enumerate(out) if o.is_floating_point() and o.dim() == 2
                        and o.shape[0] == len(labels) and o.shape[1] >= 2), None)
            if idx is not None:
                target = torch.as_tensor(labels.astype(np.int64), device=self.device)
                if int(target.max()) < out[idx].shape[1] and int(target.min()) >= 0:
                    loss = loss + share * TASK_LOSS_WEIGHT * torch.nn.functional.cross_entropy(out[idx], target)
                    self.task_used = True
        return loss, distill

    def parts(self, feed: dict[str, np.ndarray], labels: np.ndarray | None) -> list[tuple[
            dict[str, np.ndarray], np.ndarray | None, float]]:
        """``feed`` cut into parts of at most ``micro`` samples along the batch axis, each with its share."""
        n = int(np.shape(next(iter(feed.values())))[0]) if feed else 0
        if not self.data.resample or self.micro >= n:
            return [(feed, labels, 1.0)]
        return [({k: v[s:s + self.micro] for k, v in feed.items()},
                 None if labels is None else labels[s:s + self.micro], min(self.micro, n - s) / n)
                for s in range(0, n, self.micro)]

    def backward(self, feed: dict[str, np.ndarray], labels: np.ndarray | None) -> tuple[Any, Any]:
        """One batch's (training loss, distillation loss), its gradients accumulated part by part (the same
        gradients as the whole batch at once; a part's graph is freed before the next is built). Stops at the
        first part whose loss is not finite, before its backward pass, and returns that loss."""
        torch = self.torch
        parts = self.parts(feed, labels)
        with torch.no_grad():
            refs = [self.forward(self.teacher, part) for part, _, _ in parts]
        # The whole batch's mean squares, from its parts' (each holds its share of the positions).
        powers = [sum(share * p for (_, _, share), p in zip(parts, ps, strict=True))
                  for ps in zip(*(_powers(r) for r in refs), strict=True)] if len(parts) > 1 else None
        loss_sum, distill_sum = 0.0, 0.0
        for (part, labs, share), ref in zip(parts, refs, strict=True):
            loss, distill = self.part_loss(part, labs, ref, powers, share)
            if not bool(torch.isfinite(loss)):
                return loss.detach(), distill.detach()
            loss.backward()
            loss_sum += float(loss.detach())
            distill_sum += float(distill.detach())
        return torch.tensor(loss_sum), torch.tensor(distill_sum)

    def plan_parts(self, feed: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        """``micro``: the samples per backward pass that keep what autograd saves within option
        train_memory_mb, measured on one sample of ``feed`` (fracast, a 1.2 MB model, peaked at 11.5 GB at batch
        8 in one pass)."""
        n = int(np.shape(next(iter(feed.values())))[0]) if feed else 1
        self.micro = n
        if not self.data.resample or n <= 1:
            return
        torch = self.torch
        one = {k: v[:1] for k, v in feed.items()}
        with torch.no_grad():
            ref = self.forward(self.teacher, one)
        self.saved_per_sample = saved_bytes(
            torch, lambda: self.part_loss(one, None if labels is None else labels[:1], ref, None, 1.0))
        self.micro = part_size(n, self.saved_per_sample, float(self.opts.get("train_memory_mb", 1024.0)))

    def attempt(self, run: Attempt) -> list[dict[str, Any]]:
        torch, steps, student = self.torch, self.steps, self.student
        optimizers, schedules = self.optimizers(run)
        curve: list[dict[str, Any]] = []
        acc_loss, acc_distill, acc_n = 0.0, 0.0, 0
        it = self.data.stream(self.seed)
        for step in range(1, steps + 1):
            feed, labels = next(it)
            if step == 1 and self.micro == 0:
                self.plan_parts(feed, labels)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss, distill = self.backward(feed, labels)
            run.steps_run = step
            if not bool(torch.isfinite(loss)):
                run.diverged_at, run.loss = step, str(float(loss))
                if step == 1:
                    raise EngineError(
                        "training_failed",
                        f"the loss of the fake-quantized model is {float(loss)} on the first batch, before any "
                        f"update, so lower learning rates cannot help: "
                        f"{_first_nonfinite(student, self.fq.acts, self.found.placed, self.forward, feed)}. Please "
                        "report it with the model",
                    )
                raise Diverged
            for o, sched in zip(optimizers, schedules, strict=True):
                o.step()
                sched.step()
            acc_loss += float(loss.detach())
            acc_distill += float(distill.detach())
            acc_n += 1
            if step % self.window == 0 or step == steps:
                curve.append({"step": step, "loss": round(acc_loss / acc_n, 6),
                              "distill_loss": round(acc_distill / acc_n, 6)})
                acc_loss, acc_distill, acc_n = 0.0, 0.0, 0
            # Often enough for the progress bar, and at least every half second so that a cancelled job stops
            # soon.
            if step % self.report_every == 0 or step == steps or time.perf_counter() - self.last_emit >= 0.5:
                self.emit({"event": "step", "step": step, "steps": steps,
                           "progress": self.done + (1 - self.done) * step / steps,
                           "loss": curve[-1]["loss"] if curve else None})
                self.last_emit = time.perf_counter()
        bad = [n for n, p in student.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # the last update made a weight non-finite: the loss would be next
            run.diverged_at, run.loss = steps, f"finite, but parameter {bad[0]} became non-finite"
            raise Diverged
        return curve

    def probe_loss(self) -> float:
        """The distillation loss on the same first calibration samples, before and after training."""
        values = []
        with self.torch.no_grad():
            for feed in self.probe:
                terms = _distill_terms(self.forward(self.student, feed), self.forward(self.teacher, feed))
                values.append(float(sum(terms) / max(1, len(terms))))
        return float(np.mean(values)) if values else math.nan

    def restart(self, failed: Attempt) -> None:
        self.done += (1 - self.done) * (failed.steps_run / self.steps)
        self.emit({"event": "retry", "after_step": failed.diverged_at})
        self.student.load_state_dict(self.initial)
        self.torch.manual_seed(self.seed)


def run_qat(ep: Any, desc: dict[str, Any], req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    torch = _torch()
    opts = req["options"]
    seed = int(req.get("seed", 0))
    threads = int(req.get("threads", 1))
    torch.manual_seed(seed)
    inputs = tensor_infos(desc["inputs"])
    data = _Data(req, inputs, seed)
    device, warnings = pick_device(str(req.get("device", "auto")))
    program = ep
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(copy.deepcopy(ep), device)
    teacher = program.module()
    for p in teacher.parameters():
        p.requires_grad_(False)

    student, found = _find_activations(req, opts, data, inputs, program, teacher, device, threads, emit)
    fq = _fake_quantize(student, found, opts, req)
    training = _Training(torch, program, inputs, device, teacher, student, data, fq, found, opts, seed, emit)
    training.probe = [f for f, _ in data.check_feeds(PROBE_SAMPLES)]
    loss_before = training.probe_loss()
    curve, attempts = train_with_retries(Attempt(float(opts["learning_rate"]), float(opts["range_learning_rate"])),
                                         training.attempt, training.restart)
    run = attempts[-1]
    loss_after = training.probe_loss()
    seconds = time.perf_counter() - training.started
    if len(attempts) > 1:
        first = attempts[0]
        warnings.append(
            f"training diverged (loss {first.loss} at step {first.diverged_at}) and was restarted "
            f"{len(attempts) - 1} time(s) at a tenth of the rates; it finished with learning_rate "
            f"{run.learning_rate:g} and range_learning_rate {run.range_learning_rate:g}"
        )
    _write_back(torch, ep, student, fq.weights)
    emit({"event": "exporting"})
    check = export_onnx(ep, desc, data.check_feeds(), Path(req["output"]), int(req["opset"]), threads)
    if found.matching.unmatched:
        warnings.append(
            f"{len(found.matching.unmatched)} of the {len(found.points)} activation(s) the int8 model quantizes "
            "match no node of the PyTorch program by value (fused or split on export); they were not simulated in "
            f"training and keep ranges calibrated after it: {', '.join(sorted(found.matching.unmatched)[:8])}"
        )
    ranges = {}
    for node, mod in fq.acts.items():
        for tensor in found.placed[node].tensors:
            ranges[tensor] = list(mod.range())
    report = _training_report(training, attempts, curve, seconds, (loss_before, loss_after))
    return {"training": report, "ranges": ranges, "check": check, "warnings": warnings}


def _write_back(torch: Any, ep: Any, student: Any, weights: dict[str, Any]) -> None:
    """The fine-tuned float weights, clipped to learned weight ranges, back into the exported program."""
    trained = dict(student.named_parameters())
    with torch.no_grad():
        for name, tensor in ep.state_dict.items():
            p = trained.get(name)
            if p is None:
                continue
            value = weights[name].clip(p) if name in weights else p
            tensor.copy_(value.detach().to(tensor.device, tensor.dtype))


def _training_report(training: _Training, attempts: list[Attempt], curve: list[dict[str, Any]], seconds: float,
                     probe_losses: tuple[float, float]) -> dict[str, Any]:
    """The report's training section (see worker/engine/report.py)."""
    run, data, fq, found, probe = attempts[-1], training.data, training.fq, training.found, training.probe
    abs_lrs = sorted(run.learning_rate * v for v in training.base_lrs.values())
    match_feeds, learn_acts = found.match_feeds, found.learn_acts
    return {
        "steps": training.steps,
        "seconds": round(seconds, 3),
        "device": training.device,
        "samples": data.samples,
        "batch_size": data.per,
        "samples_per_backward_pass": training.micro or data.per,
        "saved_bytes_per_sample": training.saved_per_sample,
        "learning_rate": run.learning_rate,
        "learning_rate_basis": "per parameter tensor, learning_rate x its int8 step (max|w|/127 per output "
                               "channel, averaged; max|p|/127 for other parameters)",
        "weight_learning_rates": {"min": abs_lrs[0], "median": abs_lrs[len(abs_lrs) // 2], "max": abs_lrs[-1]}
        if abs_lrs else None,
        "range_learning_rate": run.range_learning_rate,
        "attempts": [a.to_dict() for a in attempts],
        "loss": "normalised MSE to the float model's outputs"
                + (f" + {TASK_LOSS_WEIGHT} x cross-entropy on labels" if training.task_used else ""),
        "probe_loss": {"samples": sum(int(np.shape(next(iter(f.values())))[0]) for f in probe) if probe else 0,
                       "before": _round(probe_losses[0]), "after": _round(probe_losses[1])},
        "initial_loss": curve[0]["loss"] if curve else None,
        "final_loss": curve[-1]["loss"] if curve else None,
        "loss_curve": curve,
        "fake_quantized": {
            "weights": sorted(fq.weights),
            "activations": sorted(t for p in found.placements for t in p.tensors),
            "activations_not_found": sorted(found.matching.unmatched),
            "other_parameters": fq.quantized_params,
            "not_trained": sorted(fq.frozen),
            "fixed_ranges": sorted(t for p in found.placements if not p.learn for t in p.tensors) if learn_acts else [],
        },
        "activation_mapping": {
            "method": "by value: ONNX Runtime and PyTorch on the same calibration samples",
            "samples": sum(int(np.shape(next(iter(f.values())))[0]) for f in match_feeds) if match_feeds else 0,
            "program_nodes": {t: n for n, ts in found.by_node.items() for t in ts},
            "unmatched": dict(sorted(found.matching.unmatched.items())),
        },
    }
