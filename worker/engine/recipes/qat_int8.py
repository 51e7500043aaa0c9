"""qat_int8: quantization-aware fine-tuning of a .pt2 in PyTorch, then an int8 QDQ export."""

from __future__ import annotations

from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe, RecipeContext, RecipeOutput

OPTIONS = (*o.COMMON, o.STEPS, o.LEARNING_RATE, o.RANGE_LEARNING_RATE, o.TRAIN_WEIGHT_RANGES,
           o.TRAIN_ACTIVATION_RANGES, o.TASK_LOSS, o.TRAIN_MEMORY_MB,
           o.MAX_CALIBRATION_SAMPLES)


def quantize(ctx: RecipeContext) -> RecipeOutput:
    """Fine-tune the PyTorch program with fake quantization (worker/engine/qat.py) and export it."""
    # lazy: keeps the registry light (the API and `lowbit --help` import it); this loads ONNX Runtime
    from worker.engine.qat import run_qat

    assert ctx.source is not None
    qat = run_qat(ctx.cfg, ctx.opts, ctx.info, ctx.split, ctx.data, ctx.norm_path, ctx.quant_path, ctx.source,
                  ctx.providers, ctx.work, ctx.step, ctx.env)
    ctx.warnings.extend(qat.warnings)
    return RecipeOutput(calibration=qat.calibration, qat=qat)


RECIPE = Recipe(
    name="qat_int8",
    label="qat_int8 (fine-tune, then int8; .pt2 models)",
    help="quantization-aware fine-tuning of a .pt2 in PyTorch, then an int8 QDQ export",
    options=OPTIONS,
    calibration="required",
    quantize=quantize,
    file_tag="int8",
    needs_pytorch=True,
    form_fields=(FormField("batch_size", "batch_size"),),
)
