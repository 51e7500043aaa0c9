"""The ``qat_int8`` recipe: quantization-aware fine-tuning of a .pt2 model, then lowbit's own int8 export.

1. The post-training baseline: the float model (exported from the .pt2) is calibrated (min/max) on the
   calibration samples and quantized with ONNX Runtime's QDQ quantizer, per-channel int8 weights and uint8
   activations. This is the PTQ result the report compares against, and it says which activations the
   int8 model quantizes and their min/max ranges.
2. Fine-tuning, in the .pt2 child process (``worker.engine.qat_torch``): fake quantization at those
   activations (ranges initialised from step 1; ``training_points``, with the parameters they share,
   ``quantization_owners``), on every Linear/Conv weight and on the other parameters the int8 model
   quantizes (``quantized_parameters``), trained on the same calibration samples (never the held-out
   ones) by distillation from the float model.
3. The fine-tuned float model is exported to ONNX, calibrated like any model, its learned activation
   ranges replace the calibrated ones, and the same quantizer writes the artifact: a plain QDQ ONNX model
   that is validated like every recipe's.
4. The pipeline validates both models on the same evaluation samples; when the QAT model scores below the
   PTQ baseline on the report's headline metric (``headline_metric``), the PTQ model is the artifact
   (``choose_artifact``): training never makes a job's result worse than not training.

Tensors that hold an attention mask's huge negative values (``mask_tensors``) or infinities stay in float
in both models: no uint8 grid holds -3.4e38 and a score of 0.1 at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from worker.engine.calibrate import (
    Batches,
    CalibrationResult,
    CalibrationSettings,
    StatsCache,
    calibrate,
    effective_ranges,
    quantizable_op_types,
    select_tensors,
    write_ort_ranges,
)
from worker.engine.errors import EngineError
from worker.engine.feeds import batch_source
from worker.engine.files import sha256_file
from worker.engine.inspect import ModelInfo
from worker.engine.normalize import normalize
from worker.engine.ort_quant import excluded_nodes, index_math_nodes, quantize_static
from worker.engine.pt2 import EXPORT_OPSET, Pt2Source, run_child

if TYPE_CHECKING:  # annotations only: the option tables import the recipes, whose qat_int8 handler imports this
    from worker.engine.config import QuantizeConfig, RecipeOptions

ProgressFn = Callable[[str, float], None]
# Calibrating-stage shares: PTQ calibration, training (by steps), calibration of the fine-tuned model.
PTQ_SHARE, TRAIN_SHARE = 0.1, 0.8
SECONDS_PER_STEP_LIMIT = 30.0
# A range reaching below -MASK_FLOOR and MASK_RATIO times further down than up belongs to a tensor carrying an
# additive attention mask (-1e4, -1e9, finfo.min): one uint8 step of it would exceed every real score.
MASK_FLOOR = 1e3
MASK_RATIO = 100.0


@dataclass
class QatResult:
    calibration: dict[str, Any]
    training: dict[str, Any]
    ptq_path: Path
    warnings: list[str] = field(default_factory=list)


def quantized_activations(model: onnx.ModelProto) -> set[str]:
    """Tensors (not initializers) that the QDQ model feeds into a QuantizeLinear, by their name in the float
    model (ONNX Runtime renames a quantized graph output ``y`` to ``y_QuantizeLinear_Input``)."""
    inits = {t.name for t in model.graph.initializer}
    suffix = "_QuantizeLinear_Input"
    return {n.input[0].removesuffix(suffix) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def quantization_owners(model: onnx.ModelProto) -> dict[str, str]:
    """Each activation the int8 model quantizes (by its float name) -> the tensor whose scale and zero point
    its QuantizeLinear uses: itself, or, for the output of a Transpose, Reshape, Split, Gather (ONNX Runtime's
    data-movement operators), the input's. ``param:NAME`` is an initializer (a Gather's table). Read from
    the scale's name, ``<tensor>_scale`` in ONNX Runtime's QDQ models."""
    inits = {t.name for t in model.graph.initializer}
    quantized = {n.input[0].removesuffix("_QuantizeLinear_Input") for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    owners: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or len(n.input) < 2:
            continue
        t = n.input[0].removesuffix("_QuantizeLinear_Input")
        owner = n.input[1].removesuffix("_scale")
        if f"{owner}_quantized" in inits or owner in inits:
            owners[t] = f"param:{owner}"
        else:
            owners[t] = owner if owner in quantized else t
    return owners


def quantized_parameters(model: onnx.ModelProto) -> dict[str, str]:
    """Initializers the int8 model quantizes per tensor (a bias read by an Add, a LayerNorm scale, an embedding
    table), by their float name, with the scheme it used: ``int8`` (symmetric) or ``uint8`` (asymmetric, as an
    activation). Per-channel weights are left out (training quantizes them per channel anyway), and so are
    int32 biases (in the accumulator's scale: a rounding far below the others)."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or n.input[1] not in inits:
            continue
        if len(inits[n.input[1]].dims) and max(inits[n.input[1]].dims) > 1:
            continue
        scheme = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}.get(inits[n.input[0]].data_type)
        if scheme:
            out[n.input[0].removesuffix("_quantized")] = scheme
    return out


def mask_tensors(ranges: dict[str, tuple[float, float]]) -> list[str]:
    """Tensors whose calibrated range is dominated by large negative values, as an additive attention mask's
    are (the mask itself, scores + mask): quantizing them per tensor would round every score to one level."""
    return sorted(t for t, (lo, hi) in ranges.items() if lo <= -MASK_FLOOR and -lo >= MASK_RATIO * max(hi, 0.0))


def training_points(model: onnx.ModelProto, quantized: set[str], ranges: dict[str, tuple[float, float]],
                    excluded: set[str], op_types: list[str] | None = None) -> tuple[
    dict[str, tuple[float, float]], list[str]
]:
    """The activations to fake-quantize in training, with the ranges ONNX Runtime's quantizer will give them
    (``effective_ranges``), and those of them whose range it fixes (not learned): a Softmax output is
    [0, 1]. The input of a Relu or Clip that alone reads it takes the output's range, the same grid as
    quantizing the output, so training quantizes only the output and the learned range reaches the input
    through the quantizer."""
    raw = {t: ranges[t] for t in quantized if t in ranges}
    points = effective_ranges(model, raw, op_types or None, excluded)
    wanted = set(op_types) if op_types else quantizable_op_types()
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    fixed = []
    for n in model.graph.node:
        if n.name in excluded or n.op_type not in wanted or not n.input or not n.output:
            continue
        if n.op_type == "Softmax" and n.output[0] in points:
            fixed.append(n.output[0])
        elif n.op_type in ("Relu", "Clip") and readers.get(n.input[0]) == 1 and n.output[0] in points:
            points.pop(n.input[0], None)
    return points, sorted(fixed)


def headline_metric(outputs: list[dict[str, Any]], labels: dict[str, Any] | None) -> tuple[str, float] | None:
    """The figure a report leads with (as the job page shows it): label accuracy when labels were given, else
    the worst output's top-1 agreement, else its cosine similarity, else its SQNR."""
    if labels and labels.get("quantized") is not None:
        return "label_accuracy", float(labels["quantized"])
    for key in ("top1_agreement", "cosine", "sqnr_db"):
        values = [float(o[key]) for o in outputs if o.get(key) is not None]
        if values:
            return key, min(values)
    return None


def choose_artifact(qat_outputs: list[dict[str, Any]], qat_labels: dict[str, Any] | None,
                    ptq_outputs: list[dict[str, Any]], ptq_labels: dict[str, Any] | None) -> dict[str, Any]:
    """Whether the QAT model or its PTQ baseline is the job's artifact: the baseline when the QAT model's
    headline metric is lower on the same samples (a tie goes to the worst output's SQNR, then to QAT)."""
    qat, ptq = headline_metric(qat_outputs, qat_labels), headline_metric(ptq_outputs, ptq_labels)
    if qat is None or ptq is None:
        return {"result": "qat", "metric": None, "qat": None, "ptq": None}
    worse = qat[1] < ptq[1]
    if qat[1] == ptq[1]:
        q_sqnr, p_sqnr = (min((float(o["sqnr_db"]) for o in outs if o.get("sqnr_db") is not None), default=math.nan)
                          for outs in (qat_outputs, ptq_outputs))
        worse = q_sqnr < p_sqnr
    return {"result": "ptq_baseline_kept" if worse else "qat", "metric": qat[0], "qat": qat[1], "ptq": ptq[1]}


def kept_warning(choice: dict[str, Any]) -> str:
    return (f"the QAT model scored below its post-training baseline on the evaluation samples ({choice['metric']} "
            f"{choice['qat']:.6g} vs {choice['ptq']:.6g}), so the artifact is the post-training int8 model; the "
            "report's accuracy is that model's (training.result: ptq_baseline_kept)")


@dataclass(frozen=True)
class _Baseline:
    """Post-training int8 of the float model (the baseline QAT must beat) and the training points it gives."""

    calibration: CalibrationResult
    ptq_path: Path
    # Nodes that had to stay in float (beyond the user's exclusions).
    forced: list[str]
    points: dict[str, tuple[float, float]]
    fixed: list[str]
    parameters: dict[str, Any]
    # tensor -> the tensor whose quantization parameters it shares
    shared: dict[str, str]


@dataclass(frozen=True)
class _Tuned:
    """The fine-tuned model's activation ranges: learned in training where they could be, calibrated elsewhere."""

    calibration: CalibrationResult
    ranges: dict[str, tuple[float, float]]
    learned: dict[str, tuple[float, float]]
    applied: list[str]
    float_tensors: list[str]


def run_qat(
    cfg: QuantizeConfig,
    opts: RecipeOptions,
    info: ModelInfo,
    split: Any,
    data: Any,
    norm_path: Path,
    dest: Path,
    source: Pt2Source,
    providers: list[str],
    work: Path,
    step: ProgressFn,
    environment: dict[str, Any],
) -> QatResult:
    assert data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    reader, plan = data.calib_reader, split.calib_plan
    c0, c1 = split.calib_range

    batches = batch_source(reader, info.inputs, plan, c0, c1)

    warnings: list[str] = []
    step("calibrating", 0.0)
    started = time.perf_counter()
    assert cfg.calibration_path is not None
    cache_key = {
        "model_sha256": sha256_file(Path(cfg.model_path)),
        "data_sha256": sha256_file(cfg.calibration_path),
        "samples": [c0, c1], "per_run": plan.samples_per_run, "modes": plan.modes,
        "onnxruntime": environment.get("onnxruntime"), "lowbit": environment.get("lowbit"),
    }
    base = _ptq_baseline(cfg, opts, norm_path, batches, c1 - c0, providers, work, step, cache_key, warnings)
    result = _train_in_child(cfg, opts, source, norm_path, plan, (c0, c1), base, work, step)
    warnings.extend(result.get("warnings", []))
    tuned = _quantize_tuned(cfg, opts, result, batches, c1 - c0, providers, work, dest, step, warnings)
    calibration = {
        "method": "minmax",
        "calibrator": "lowbit",
        "cache_used": base.calibration.cache_used,
        "samples": base.calibration.samples,
        "seconds": round(time.perf_counter() - started, 3),
        "tensors": len(tuned.ranges),
        "passes": base.calibration.passes + tuned.calibration.passes,
        "symmetric_activations": False,
        "learned_ranges": len(tuned.applied),
        "float_tensors": tuned.float_tensors,
        "forced_float_nodes": base.forced,
        "note": "activation ranges: learned in training where the int8 model quantizes a tensor of the PyTorch "
                "program, min/max of the fine-tuned model on the calibration samples elsewhere",
    }
    learned = tuned.learned
    training = dict(result["training"])
    training["learned_activation_ranges"] = {k: [round(learned[k][0], 6), round(learned[k][1], 6)]
                                             for k in tuned.applied}
    training["export_check"] = result.get("check")
    return QatResult(calibration, training, base.ptq_path, warnings)


def _ptq_baseline(cfg: QuantizeConfig, opts: RecipeOptions, norm_path: Path, batches: Batches, samples: int,
                  providers: list[str], work: Path, step: ProgressFn, cache_key: dict[str, Any],
                  warnings: list[str]) -> _Baseline:
    """Calibrate the float model (min/max), quantize it to int8 as int8_static would, and read off which
    activations and parameters the int8 model quantizes: those are what training simulates."""
    base = calibrate(
        norm_path, select_tensors(onnx.load(str(norm_path))), batches, CalibrationSettings("minmax"), providers,
        cfg.threads, progress=lambda f: step("calibrating", PTQ_SHARE * f), total_samples=samples,
        cache=StatsCache(cfg.cache_dir) if cfg.cache_dir else None, cache_key=cache_key,
    )
    if base.samples == 0:
        raise EngineError("not_enough_samples", "no calibration batch could be formed from the dataset")
    masks = mask_tensors(base.ranges)
    float_tensors = sorted({*base.nonfinite_tensors, *masks})
    if masks:
        warnings.append(
            f"{len(masks)} tensor(s) carry an attention mask's large negative values (down to "
            f"{min(base.ranges[t][0] for t in masks):.3g}), which no int8 range shares with the scores; they stay in "
            f"float in the post-training baseline and the trained model: {', '.join(masks[:6])}"
        )
    ptq_ranges = work / "ptq-ranges.json"
    write_ort_ranges({t: r for t, r in base.ranges.items() if t not in float_tensors}, ptq_ranges)
    ptq_path = work / "ptq.onnx"
    forced = quantize_static(norm_path, ptq_path, ptq_ranges, opts, float_tensors)
    norm_model = onnx.load(str(norm_path))
    excluded = set(excluded_nodes(norm_path, opts, float_tensors, norm_model,
                                  index_math_nodes(norm_model, opts))[0] or [])
    ptq_model = onnx.load(str(ptq_path))
    points, fixed = training_points(norm_model, quantized_activations(ptq_model), base.ranges,
                                    excluded, list(opts.op_types_to_quantize))
    parameters = quantized_parameters(ptq_model)
    owners = quantization_owners(ptq_model)
    del ptq_model
    # A tensor quantized with another's parameters has no range of its own to train.
    shared = {t: o for t, o in owners.items() if o != t}
    points = {t: r for t, r in points.items() if t not in shared}
    return _Baseline(base, ptq_path, forced, points, fixed, parameters, shared)


def _train_in_child(cfg: QuantizeConfig, opts: RecipeOptions, source: Pt2Source, norm_path: Path, plan: Any,
                    calib_range: tuple[int, int], base: _Baseline, work: Path, step: ProgressFn) -> dict[str, Any]:
    """Fine-tune the PyTorch program with fake quantization in the .pt2 child process (qat_torch.run_qat), which
    exports the fine-tuned float model to ``work/qat-float.onnx``; returns the child's result."""
    c0, c1 = calib_range
    progress = [0.0]

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "step" and event.get("steps"):
            share = float(event.get("progress", float(event["step"]) / float(event["steps"])))
            progress[0] = max(progress[0], min(1.0, share))  # a restarted training never moves the bar back
            step("calibrating", PTQ_SHARE + TRAIN_SHARE * progress[0])

    request = {
        "model": str(source.sanitized),
        "data": {"path": str(cfg.calibration_path), "start": c0, "stop": c1, "modes": plan.modes,
                 "samples_per_run": plan.samples_per_run},
        "points": {k: [float(lo), float(hi)] for k, (lo, hi) in sorted(base.points.items())},
        "fixed": base.fixed,
        "parameters": base.parameters,
        "shared": base.shared,
        "onnx": str(norm_path),
        "options": {
            "steps": opts.steps, "learning_rate": opts.learning_rate, "range_learning_rate": opts.range_learning_rate,
            "train_weight_ranges": opts.train_weight_ranges, "train_activation_ranges": opts.train_activation_ranges,
            "task_loss": opts.task_loss, "train_memory_mb": opts.train_memory_mb,
        },
        "device": cfg.device, "threads": cfg.threads, "output": str(work / "qat-float.onnx"),
        "opset": EXPORT_OPSET, "seed": 0,
    }
    timeout = 600.0 + SECONDS_PER_STEP_LIMIT * opts.steps
    return run_child("qat", request, work / "qat", timeout, on_event=on_event, threads=cfg.threads)


def _quantize_tuned(cfg: QuantizeConfig, opts: RecipeOptions, result: dict[str, Any], batches: Batches,
                    samples: int, providers: list[str], work: Path, dest: Path, step: ProgressFn,
                    warnings: list[str]) -> _Tuned:
    """The fine-tuned model to int8 at ``dest``: the learned activation ranges where they match a tensor of
    the exported model, min/max ranges on the calibration samples elsewhere."""
    qnorm = normalize(work / "qat-float.onnx", work / "qat-prep", per_channel=opts.per_channel)
    tuned = calibrate(
        qnorm.path, select_tensors(onnx.load(str(qnorm.path))), batches, CalibrationSettings("minmax"), providers,
        cfg.threads,
        progress=lambda f: step("calibrating", PTQ_SHARE + TRAIN_SHARE + (1 - PTQ_SHARE - TRAIN_SHARE) * f),
        total_samples=samples,
    )
    ranges = dict(tuned.ranges)
    learned = {k: (float(v[0]), float(v[1])) for k, v in result["ranges"].items()}
    applied = sorted(k for k in learned if k in ranges)
    for k in applied:
        ranges[k] = learned[k]
    not_applied = sorted(set(learned) - set(applied))
    if not_applied:
        warnings.append(f"{len(not_applied)} learned activation range(s) match no tensor of the exported fine-tuned "
                        f"model and were not used: {', '.join(not_applied[:8])}")
    tuned_float = sorted({*tuned.nonfinite_tensors, *mask_tensors(ranges)})
    ranges_path = work / "qat-ranges.json"
    write_ort_ranges({t: r for t, r in ranges.items() if t not in tuned_float}, ranges_path)
    step("quantizing", 0.0)
    quantize_static(qnorm.path, dest, ranges_path, opts, tuned_float)
    return _Tuned(tuned, ranges, learned, applied, tuned_float)
