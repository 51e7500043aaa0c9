"""The ``qat_int8`` recipe: quantization-aware fine-tuning of a .pt2 model, then lowbit's own int8 export.

1. The post-training baseline: the float model (exported from the .pt2) is calibrated (min/max) on the
   calibration samples and quantized with ONNX Runtime's QDQ quantizer, per-channel int8 weights and uint8
   activations. This is the PTQ result the report compares against, and it says which activations the
   int8 model quantizes and their min/max ranges.
2. Fine-tuning, in the .pt2 child process (``worker.engine.qat_torch``): fake quantization at those
   activations (ranges initialised from step 1) and on every Linear/Conv weight, trained on the same
   calibration samples (never the held-out ones) by distillation from the float model.
3. The fine-tuned float model is exported to ONNX, calibrated like any model, its learned activation
   ranges replace the calibrated ones, and the same quantizer writes the artifact: a plain QDQ ONNX model
   that is validated like every recipe's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from worker.engine.calibrate import CalibrationSettings, StatsCache, calibrate, select_tensors, write_ort_ranges
from worker.engine.config import QuantizeConfig, RecipeOptions
from worker.engine.errors import EngineError
from worker.engine.feeds import batch_source
from worker.engine.inspect import ModelInfo
from worker.engine.normalize import normalize
from worker.engine.pt2 import EXPORT_OPSET, Pt2Source, run_child

ProgressFn = Callable[[str, float], None]
# Calibrating-stage shares: PTQ calibration, training (by steps), calibration of the fine-tuned model.
PTQ_SHARE, TRAIN_SHARE = 0.1, 0.8
SECONDS_PER_STEP_LIMIT = 30.0


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
    from worker.engine.pipeline import _quantize_static, sha256_file

    assert data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    reader, plan = data.calib_reader, split.calib_plan
    c0, c1 = split.calib_range

    batches = batch_source(reader, info.inputs, plan, c0, c1)

    settings = CalibrationSettings("minmax")
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
    base = calibrate(
        norm_path, select_tensors(onnx.load(str(norm_path))), batches, settings, providers, cfg.threads,
        progress=lambda f: step("calibrating", PTQ_SHARE * f), total_samples=c1 - c0,
        cache=StatsCache(cfg.cache_dir) if cfg.cache_dir else None, cache_key=cache_key,
    )
    if base.samples == 0:
        raise EngineError("not_enough_samples", "no calibration batch could be formed from the dataset")
    ptq_ranges = work / "ptq-ranges.json"
    write_ort_ranges(base.ranges, ptq_ranges)
    ptq_path = work / "ptq.onnx"
    _quantize_static(norm_path, ptq_path, ptq_ranges, opts)
    points = {t: base.ranges[t] for t in sorted(quantized_activations(onnx.load(str(ptq_path)))) if t in base.ranges}

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "step" and event.get("steps"):
            step("calibrating", PTQ_SHARE + TRAIN_SHARE * float(event["step"]) / float(event["steps"]))

    request = {
        "model": str(source.sanitized),
        "data": {"path": str(cfg.calibration_path), "start": c0, "stop": c1, "modes": plan.modes,
                 "samples_per_run": plan.samples_per_run},
        "points": {k: [float(lo), float(hi)] for k, (lo, hi) in points.items()},
        "options": {
            "steps": opts.steps, "learning_rate": opts.learning_rate, "range_learning_rate": opts.range_learning_rate,
            "train_weight_ranges": opts.train_weight_ranges, "train_activation_ranges": opts.train_activation_ranges,
            "task_loss": opts.task_loss,
        },
        "device": cfg.device, "threads": cfg.threads, "output": str(work / "qat-float.onnx"),
        "opset": EXPORT_OPSET, "seed": 0,
    }
    timeout = 600.0 + SECONDS_PER_STEP_LIMIT * opts.steps
    result = run_child("qat", request, work / "qat", timeout, on_event=on_event, threads=cfg.threads)
    warnings.extend(result.get("warnings", []))

    qnorm = normalize(work / "qat-float.onnx", work / "qat-prep", per_channel=opts.per_channel)
    tuned = calibrate(
        qnorm.path, select_tensors(onnx.load(str(qnorm.path))), batches, settings, providers, cfg.threads,
        progress=lambda f: step("calibrating", PTQ_SHARE + TRAIN_SHARE + (1 - PTQ_SHARE - TRAIN_SHARE) * f),
        total_samples=c1 - c0,
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
    ranges_path = work / "qat-ranges.json"
    write_ort_ranges(ranges, ranges_path)
    step("quantizing", 0.0)
    _quantize_static(qnorm.path, dest, ranges_path, opts)
    calibration = {
        "method": "minmax",
        "calibrator": "lowbit",
        "cache_used": base.cache_used,
        "samples": base.samples,
        "seconds": round(time.perf_counter() - started, 3),
        "tensors": len(ranges),
        "passes": base.passes + tuned.passes,
        "symmetric_activations": False,
        "learned_ranges": len(applied),
        "note": "activation ranges: learned in training where the int8 model quantizes a tensor of the PyTorch "
                "program, min/max of the fine-tuned model on the calibration samples elsewhere",
    }
    training = dict(result["training"])
    training["learned_activation_ranges"] = {k: [round(learned[k][0], 6), round(learned[k][1], 6)] for k in applied}
    training["export_check"] = result.get("check")
    return QatResult(calibration, training, ptq_path, warnings)
