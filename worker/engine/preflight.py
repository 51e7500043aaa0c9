"""Checks that run before a job is queued (and again in the worker): does the data fit the model,
does the recipe have what it needs, which samples calibrate and which validate.

Uses only dataset header summaries, so the API can run it without reading files or loading ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from worker.engine.config import INT4_CALIBRATED, RecipeOptions, calibrates
from worker.engine.errors import EngineError
from worker.engine.feeds import FeedPlan, fixed_batch, plan_feeds
from worker.engine.inspect import TensorInfo
from worker.engine.npz import DatasetInfo
from worker.engine.recipes import get_recipe

SYNTHETIC_SAMPLES = 8
TARGET_METRICS = ("label_accuracy", "top1_agreement", "multilabel_f1", "cosine", "sqnr_db")
# auto splits its evaluation samples in two: it ranks layers and chooses among candidates on the selection part,
# then reports the chosen model's figures on the confirmation part, which the search never saw (figures measured
# on the samples a choice was made on are biased upward by the choice). The confirmation part is the last 40%
# of the evaluation range (deterministic, whole model runs when the batch axis is fixed); below 16 evaluation
# samples there is no split (each part would be too small to say anything) and the report says so.
EVAL_PARTS = ("selection", "confirmation")
CONFIRMATION_SHARE = 0.4
MIN_SPLIT_SAMPLES = 16


@dataclass(frozen=True)
class Split:
    # Where validation samples come from: eval_set | calibration_holdout | calibration_set | synthetic
    source: str
    calib_range: tuple[int, int] | None
    eval_range: tuple[int, int]
    calib_plan: FeedPlan | None
    eval_plan: FeedPlan | None
    # A part of the evaluation samples was asked for (auto): which one, and the ranges of both parts within
    # ``whole`` (the evaluation range before the split); ``parts`` is None when there were too few to split,
    # and ``eval_range`` is then the whole range.
    part: str | None = None
    whole: tuple[int, int] | None = None
    parts: dict[str, tuple[int, int]] | None = None

    def part_report(self) -> dict[str, object] | None:
        """The report's ``accuracy.part``: None when the run validated on its whole evaluation range by design."""
        if self.part is None or self.whole is None:
            return None
        total = self.whole[1] - self.whole[0]
        out: dict[str, object] = {"name": self.part, "applied": self.parts is not None, "whole": list(self.whole),
                                  "total_samples": total, "confirmation_share": CONFIRMATION_SHARE,
                                  "min_split_samples": MIN_SPLIT_SAMPLES}
        if self.parts is not None:
            out.update({f"{name}_range": list(rng) for name, rng in self.parts.items()})
        else:
            out["reason"] = (f"only {total} evaluation sample(s): at least {MIN_SPLIT_SAMPLES} are needed to hold "
                             "out a confirmation part")
        return out


def split_eval_range(eval_range: tuple[int, int], per: int) -> dict[str, tuple[int, int]] | None:
    """The selection and confirmation parts of ``eval_range`` (the confirmation part is the last
    CONFIRMATION_SHARE of it), or None when it holds fewer than MIN_SPLIT_SAMPLES samples. ``per`` is the number
    of samples one model run must hold (1 when any count will do): the selection part is a whole number of
    runs, and each part holds at least one run."""
    e0, e1 = eval_range
    n = e1 - e0
    per = max(1, per)
    if n < MIN_SPLIT_SAMPLES:
        return None
    sel = max(per, int(round(n * (1.0 - CONFIRMATION_SHARE))) // per * per)
    if n - sel < per:
        return None
    return {"selection": (e0, e0 + sel), "confirmation": (e0 + sel, e1)}


def _restrict(split: Split, part: str | None, inputs: Sequence[TensorInfo]) -> Split:
    if part is None:
        return split
    if part not in EVAL_PARTS:
        raise ValueError(f"unknown evaluation part {part!r}; one of {EVAL_PARTS}")
    plan = split.eval_plan
    per = plan.samples_per_run if plan is not None and fixed_batch(plan, inputs) else 1
    parts = split_eval_range(split.eval_range, per)
    rng = parts[part] if parts is not None else split.eval_range
    return dataclasses.replace(split, eval_range=rng, part=part, whole=split.eval_range, parts=parts)

def plan_split(
    recipe: str,
    opts: RecipeOptions,
    inputs: Sequence[TensorInfo],
    calib: DatasetInfo | None,
    ev: DatasetInfo | None,
    part: str | None = None,
) -> Split:
    """Which samples calibrate and which validate. ``part`` ("selection" or "confirmation", see EVAL_PARTS)
    restricts validation to that part of the evaluation samples."""
    return _restrict(_plan_split(recipe, opts, inputs, calib, ev), part, inputs)


def _plan_split(
    recipe: str,
    opts: RecipeOptions,
    inputs: Sequence[TensorInfo],
    calib: DatasetInfo | None,
    ev: DatasetInfo | None,
) -> Split:
    if get_recipe(recipe).needs_calibration and calib is None:
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
    if recipe == "int8_dynamic" and opts.int8_most_sensitive and calib is None:
        raise EngineError(
            "calibration_required",
            "int8_most_sensitive ranks the MatMuls whose 4-bit weights cost the output most on calibration samples: "
            "give a calibration dataset, or leave int8_most_sensitive at 0",
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
