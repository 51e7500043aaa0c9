"""Checks that run before a job is queued (and again in the worker): does the data fit the model,
does the recipe have what it needs, which samples calibrate and which validate.

Uses only dataset header summaries, so the API can run it without reading files or loading ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.engine.config import INT4_CALIBRATED, RECIPES_NEEDING_CALIBRATION, RecipeOptions, calibrates
from worker.engine.errors import EngineError
from worker.engine.feeds import FeedPlan, plan_feeds
from worker.engine.inspect import TensorInfo
from worker.engine.npz import DatasetInfo

SYNTHETIC_SAMPLES = 8
TARGET_METRICS = ("label_accuracy", "top1_agreement", "cosine", "sqnr_db")


@dataclass(frozen=True)
class Split:
    # Where validation samples come from: eval_set | calibration_holdout | calibration_set | synthetic
    source: str
    calib_range: tuple[int, int] | None
    eval_range: tuple[int, int]
    calib_plan: FeedPlan | None
    eval_plan: FeedPlan | None


def plan_split(
    recipe: str,
    opts: RecipeOptions,
    inputs: Sequence[TensorInfo],
    calib: DatasetInfo | None,
    ev: DatasetInfo | None,
) -> Split:
    if recipe in RECIPES_NEEDING_CALIBRATION and calib is None:
        raise EngineError(
            "calibration_required",
            f"recipe {recipe} needs a calibration dataset (an .npz of a few hundred representative inputs)",
        )
    if recipe == "int4_weight_only" and opts.algorithm in INT4_CALIBRATED and calib is None:
        raise EngineError(
            "calibration_required",
            f"int4 algorithm '{opts.algorithm}' learns from calibration data: give a calibration dataset, "
            "or use algorithm 'rtn' (round-to-nearest, no calibration) or 'hqq'",
        )
    if recipe == "int4_weight_only" and opts.int8_activations and calib is None:
        raise EngineError(
            "calibration_required",
            "int8_activations calibrates int8 ranges for the operators outside the 4-bit MatMuls: give a "
            "calibration dataset, or leave int8_activations off",
        )
    cplan = plan_feeds(inputs, calib, opts.batch_size, "calibration") if calib else None
    eplan = plan_feeds(inputs, ev, opts.batch_size, "evaluation") if ev else None
    learns = calibrates(recipe, opts, calib is not None)
    if ev is not None and eplan is not None:
        c_range = (0, min(calib.num_samples, opts.max_calibration_samples)) if calib and learns else None
        return Split("eval_set", c_range, (0, ev.num_samples), cplan if learns else None, eplan)
    if calib is not None and cplan is not None:
        n = calib.num_samples
        if not learns:
            # Nothing is calibrated, so every sample can validate.
            return Split("calibration_set", None, (0, n), None, cplan)
        per = cplan.samples_per_run
        hold = max(per, int(round(n * opts.holdout_fraction)))
        if n - hold < per:
            raise EngineError(
                "not_enough_samples",
                f"the calibration dataset has {n} sample(s); without an evaluation set lowbit holds out "
                f"{round(opts.holdout_fraction * 100)}% of it for validation (never used to calibrate) and "
                f"needs at least {2 * per} samples. Add samples or give an evaluation set",
            )
        return Split("calibration_holdout", (0, min(n - hold, opts.max_calibration_samples)), (n - hold, n), cplan,
                     cplan)
    return Split("synthetic", None, (0, SYNTHETIC_SAMPLES), None, None)


def check_target(target: dict[str, object] | None, calib: DatasetInfo | None, ev: DatasetInfo | None) -> None:
    """An accuracy target on label accuracy needs labels in the data that validates."""
    if not target:
        return
    if target.get("metric") == "label_accuracy":
        source = ev if ev is not None else calib
        if source is None or not source.has_labels:
            raise EngineError(
                "labels_required",
                "accuracy_target uses label_accuracy, but the validation data has no 'labels' array; "
                "add labels (one integer class per sample) or pick another metric",
            )
