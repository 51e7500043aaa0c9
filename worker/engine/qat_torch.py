"""Quantization-aware fine-tuning of an exported program (runs in the .pt2 child process only).

lowbit's own fake quantization, written for the int8 model ONNX Runtime's QDQ quantizer will build, so
that what the model trains against is what it will run as:

- the weight of every ``aten.linear`` / ``aten.conv{1,2,3}d`` / non-transposed ``aten.convolution`` is
  quantized per output channel, symmetric int8 in [-127, 127] with scale ``max|w| / 127`` (ONNX Runtime's
  per-channel weight scale), or, with ``train_weight_ranges``, a learned scale initialised to that;
- every activation the int8 ONNX model quantizes (the parent passes their ONNX tensor names, which are the
  program's node names, with min/max ranges from calibrating the float model on the same samples) is
  quantized per tensor, asymmetric uint8, scale ``(hi - lo) / 255`` and zero point ``round(-lo / scale)``
  exactly as ONNX Runtime derives them from a range. With ``train_activation_ranges`` the scale (as its
  logarithm) and the zero point are learned, LSQ-style.

Rounding passes gradients straight through (STE). The fake-quantized copy of the program's graph module
(``ep.module()``: ATen operators, parameters as attributes, batch-norm statistics and dropout as exported,
i.e. in inference behaviour) is fine-tuned with Adam to match the float model's own outputs (normalised
mean squared error, averaged over the float outputs), plus cross-entropy against ``labels`` when the data
has them and an output is [N, classes]. The fine-tuned float weights (clipped to learned weight ranges) go
back into the exported program, which is exported to ONNX; the learned activation ranges go back to the
parent, which gives them to ONNX Runtime's quantizer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.errors import EngineError

Emit = Callable[[dict[str, Any]], None]
TASK_LOSS_WEIGHT = 0.1
MAX_CURVE_POINTS = 50
CHECK_SAMPLES = 64


def _torch() -> Any:
    import torch

    return torch


def _round_ste(v: Any) -> Any:
    return v + (v.round() - v).detach()


def _modules() -> tuple[type, type]:
    torch = _torch()
    nn = torch.nn
    module: Any = nn.Module

    class ActFakeQuant(module):
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
            q = torch.clamp(_round_ste(x / s) + z, 0.0, 255.0)
            return (q - z) * s

        def range(self) -> tuple[float, float]:
            s = float(self.log_scale.detach().exp())
            z = float(min(255.0, max(0.0, round(float(self.zero_point.detach())))))
            return -z * s, (255.0 - z) * s

    class WeightFakeQuant(module):
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


def insert_fake_quant(gm: Any, points: dict[str, tuple[float, float]], train_acts: bool, train_weights: bool,
                      aliases: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Rewrite ``gm`` in place. ``aliases`` maps program names to ``gm``'s where they differ (``ep.module()``
    renames inputs that shadow Python builtins, e.g. ``input`` -> ``input_1``). Returns (activation
    quantizers by tensor name, weight quantizers by parameter name, point names with no float32 node of
    that name in the graph)."""
    torch = _torch()
    ActFakeQuant, WeightFakeQuant = _modules()
    aten = torch.ops.aten
    weight_ops = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    nodes = {**by_name, **{k: by_name[v] for k, v in (aliases or {}).items() if v in by_name}}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    after_inputs = placeholders[-1].next if placeholders else None
    acts: dict[str, Any] = {}
    missing: list[str] = []
    for i, (name, (lo, hi)) in enumerate(sorted(points.items())):
        node = nodes.get(name)
        val = node.meta.get("val") if node is not None else None
        if node is None or node.op == "output" or not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
            missing.append(name)
            continue
        mod = ActFakeQuant(lo, hi, train_acts)
        attr = f"lowbit_act_fq_{i}"
        gm.add_module(attr, mod)
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
    graph.lint()
    gm.recompile()
    return acts, weights, missing


def _attr(module: Any, target: str) -> Any:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Data:
    """Training batches from the calibration samples (never the held-out ones)."""

    def __init__(self, req: dict[str, Any], inputs: list[Any], seed: int) -> None:
        from worker.engine.feeds import FeedPlan, fixed_batch, iter_batches
        from worker.engine.npz import NpzReader, inspect_npz

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
        self.rng = np.random.default_rng(seed)
        # Re-batch across samples only when every input is stacked along a dynamic batch axis; complete
        # per-sample feeds (e.g. an RNN state [2, 1, H]) are used batch by batch as given.
        self.resample = not fixed_batch(plan, inputs) and all(m == "stacked" for m in plan.modes.values())
        if self.resample:
            self.arrays = {i.name: np.concatenate([b.feed[i.name] for b in self.batches]) for i in inputs}
            labs = [b.labels for b in self.batches if b.labels is not None]
            self.labels: np.ndarray | None = np.concatenate(labs) if len(labs) == len(self.batches) else None

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        while True:
            if self.resample:
                n = self.samples
                idx = self.rng.permutation(n)
                for s in range(0, n - self.per + 1 if n >= self.per else 1, self.per):
                    take = np.sort(idx[s:s + self.per])
                    yield ({k: v[take] for k, v in self.arrays.items()},
                           self.labels[take] if self.labels is not None else None)
            else:
                for j in self.rng.permutation(len(self.batches)):
                    b = self.batches[int(j)]
                    yield b.feed, b.labels

    def check_feeds(self) -> list[tuple[dict[str, np.ndarray], int]]:
        out, n = [], 0
        for b in self.batches:
            out.append((b.feed, b.count))
            n += b.count
            if n >= CHECK_SAMPLES:
                break
        return out


def pick_device(requested: str) -> tuple[str, list[str]]:
    torch = _torch()
    if requested != "cpu" and torch.cuda.is_available():
        return "cuda", []
    if requested in ("cuda", "gpu"):
        return "cpu", ["the job asked for a GPU, but this worker's PyTorch has no CUDA: trained on the CPU"]
    return "cpu", []


def run_qat(ep: Any, desc: dict[str, Any], req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    from worker.engine.pt2_child import export_onnx, tensor_infos, torch_args

    torch = _torch()
    from torch.utils import _pytree as pytree

    opts = req["options"]
    steps = int(opts["steps"])
    seed = int(req.get("seed", 0))
    torch.manual_seed(seed)
    inputs = tensor_infos(desc["inputs"])
    data = _Data(req, inputs, seed)
    device, warnings = pick_device(str(req.get("device", "auto")))
    program = ep
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(copy.deepcopy(ep), device)
    teacher = program.module()
    student = copy.deepcopy(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    points = {k: (float(v[0]), float(v[1])) for k, v in req["points"].items()}
    placeholders = [n.name for n in student.graph.nodes if n.op == "placeholder"]
    aliases = dict(zip([i.name for i in inputs], placeholders, strict=False)) \
        if len(placeholders) == len(inputs) else {}
    acts, weights, missing = insert_fake_quant(student, points, bool(opts["train_activation_ranges"]),
                                               bool(opts["train_weight_ranges"]), aliases)
    if not weights and not acts:
        raise EngineError(
            "nothing_to_quantize",
            "the model has no Linear or Conv layer and none of the activations the int8 model quantizes could be "
            "found in the PyTorch program, so quantization-aware training has nothing to train for",
        )
    range_params = [p for n, p in student.named_parameters() if n.startswith("lowbit_") and p.requires_grad]
    model_params = []
    for n, p in student.named_parameters():
        if not n.startswith("lowbit_") and p.is_floating_point():
            p.requires_grad_(True)
            model_params.append(p)
    groups = [{"params": model_params, "lr": float(opts["learning_rate"])}]
    if range_params:
        groups.append({"params": range_params, "lr": float(opts["range_learning_rate"])})
    optimizer = torch.optim.Adam(groups)
    use_labels = bool(opts.get("task_loss", False))

    def forward(module: Any, feed: dict[str, np.ndarray]) -> list[Any]:
        args, kwargs = torch_args(program, inputs, feed, device)
        return list(pytree.tree_leaves(module(*args, **kwargs)))

    window = max(1, steps // MAX_CURVE_POINTS)
    report_every = max(1, steps // 100)
    curve: list[dict[str, Any]] = []
    acc_loss, acc_distill, acc_n = 0.0, 0.0, 0
    task_used = False
    started = last_emit = time.perf_counter()
    it = iter(data)
    for step in range(1, steps + 1):
        feed, labels = next(it)
        with torch.no_grad():
            ref = forward(teacher, feed)
        out = forward(student, feed)
        terms = [((o - r) ** 2).mean() / (r.pow(2).mean() + 1e-12)
                 for o, r in zip(out, ref, strict=True) if r.is_floating_point()]
        if not terms:
            raise EngineError("training_failed", "the model has no float output to train against")
        loss = distill = sum(terms) / len(terms)
        if use_labels and labels is not None:
            idx = next((i for i, o in enumerate(out) if o.is_floating_point() and o.dim() == 2
                        and o.shape[0] == len(labels) and o.shape[1] >= 2), None)
            if idx is not None:
                target = torch.as_tensor(labels.astype(np.int64), device=device)
                if int(target.max()) < out[idx].shape[1] and int(target.min()) >= 0:
                    loss = loss + TASK_LOSS_WEIGHT * torch.nn.functional.cross_entropy(out[idx], target)
                    task_used = True
        if not torch.isfinite(loss):
            raise EngineError(
                "training_diverged",
                f"the training loss became {float(loss)} at step {step}; lower learning_rate or range_learning_rate",
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        acc_loss += float(loss.detach())
        acc_distill += float(distill.detach())
        acc_n += 1
        if step % window == 0 or step == steps:
            curve.append({"step": step, "loss": round(acc_loss / acc_n, 6),
                          "distill_loss": round(acc_distill / acc_n, 6)})
            acc_loss, acc_distill, acc_n = 0.0, 0.0, 0
        # Often enough for the progress bar, and at least every half second so that a cancelled job stops soon.
        if step % report_every == 0 or step == steps or time.perf_counter() - last_emit >= 0.5:
            emit({"event": "step", "step": step, "steps": steps, "loss": curve[-1]["loss"] if curve else None})
            last_emit = time.perf_counter()
    seconds = time.perf_counter() - started

    # The fine-tuned float weights, clipped to learned weight ranges, back into the exported program.
    trained = dict(student.named_parameters())
    with torch.no_grad():
        for name, tensor in ep.state_dict.items():
            p = trained.get(name)
            if p is None:
                continue
            value = weights[name].clip(p) if name in weights else p
            tensor.copy_(value.detach().to(tensor.device, tensor.dtype))
    emit({"event": "exporting"})
    check = export_onnx(ep, desc, data.check_feeds(), Path(req["output"]), int(req["opset"]),
                        int(req.get("threads", 1)))
    if missing:
        warnings.append(
            f"{len(missing)} of the {len(points)} activation(s) the int8 model quantizes have no counterpart in the "
            "PyTorch program (renamed or fused on export); they were not simulated in training and keep ranges "
            f"calibrated after it: {', '.join(missing[:8])}"
        )
    return {
        "training": {
            "steps": steps,
            "seconds": round(seconds, 3),
            "device": device,
            "samples": data.samples,
            "batch_size": data.per,
            "learning_rate": float(opts["learning_rate"]),
            "range_learning_rate": float(opts["range_learning_rate"]),
            "loss": "normalised MSE to the float model's outputs"
                    + (f" + {TASK_LOSS_WEIGHT} x cross-entropy on labels" if task_used else ""),
            "initial_loss": curve[0]["loss"] if curve else None,
            "final_loss": curve[-1]["loss"] if curve else None,
            "loss_curve": curve,
            "fake_quantized": {"weights": sorted(weights), "activations": sorted(acts),
                               "activations_not_found": sorted(missing)},
        },
        "ranges": {name: list(mod.range()) for name, mod in acts.items()},
        "check": check,
        "warnings": warnings,
    }
