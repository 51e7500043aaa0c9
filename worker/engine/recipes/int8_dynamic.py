"""int8_dynamic: int8 weights, activations quantized at run time (no calibration)."""

from __future__ import annotations

from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe, RecipeContext, RecipeOutput

OPTIONS = (*o.COMMON, o.PER_CHANNEL, o.REDUCE_RANGE, o.OP_TYPES_TO_QUANTIZE)


def quantize(ctx: RecipeContext) -> RecipeOutput:
    """ONNX Runtime's dynamic quantizer, also inside If/Loop/Scan bodies."""
    # lazy: keeps the registry light (the API and `lowbit --help` import it); this loads ONNX Runtime
    from worker.engine.ort_quant import quantize_dynamic, warn_forced

    ctx.step("quantizing", 0.0)
    warn_forced(quantize_dynamic(ctx.norm_path, ctx.quant_path, ctx.opts), ctx.warnings)
    return RecipeOutput()


RECIPE = Recipe(
    name="int8_dynamic",
    label="int8_dynamic (no calibration)",
    help="int8 weights, activations quantized at run time",
    options=OPTIONS,
    calibration="optional",
    quantize=quantize,
    file_tag="int8",
    per_channel_needs_opset13=True,
    form_fields=(FormField("per_channel", "per_channel"), FormField("batch_size", "batch_size")),
)
