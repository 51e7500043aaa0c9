"""auto: the smallest of the other recipes' candidates that meets an accuracy target and is not slower than the
fp32 model. It has no quantize step of its own: worker/engine/auto.py runs the candidates as ordinary recipes."""

from __future__ import annotations

from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe

# The candidates take the common options (and max_calibration_samples where they calibrate; the int8_static ones
# SmoothQuant's, and adaround_seconds, the budget of the learned-rounding step).
OPTIONS = (*o.COMMON, o.MAX_CALIBRATION_SAMPLES, o.MAX_FALLBACK_STEPS, o.PREFER, o.SEARCH, o.SMOOTHQUANT,
           o.SMOOTHQUANT_ALPHA, o.ADAROUND_SECONDS)

RECIPE = Recipe(
    name="auto",
    label="auto (the smallest model that meets the accuracy target)",
    help="the smallest candidate recipe that meets an accuracy_target and is not slower than fp32",
    options=OPTIONS,
    calibration="required",
    quantize=None,
    needs_accuracy_target=True,
    form_fields=(FormField("batch_size", "batch_size"),),
)
