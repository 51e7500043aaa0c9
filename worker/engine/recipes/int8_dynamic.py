"""int8_dynamic: int8 weights, activations quantized at run time (no calibration); with four_bit_weights, the
MatMul weights stored in 4 bits (calibration data then ranks the layers kept in 8 bits)."""

from __future__ import annotations

from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe, RecipeContext, RecipeOutput

OPTIONS = (*o.COMMON, o.PER_CHANNEL, o.REDUCE_RANGE, o.OP_TYPES_TO_QUANTIZE, o.FOUR_BIT_WEIGHTS.with_(
    help="store the MatMul weights (MatMulInteger) in 4 bits (INT4, per column, a Cast to int8 that ONNX Runtime "
         "folds at load: the same int8 kernels, half the weight bytes; opset 21)"),
           o.INT8_MOST_SENSITIVE.with_(requires="four_bit_weights", help="with four_bit_weights: also keep in 8 bits "
                                       "the N MatMuls whose 4-bit weights alone cost the output most (output SQNR "
                                       "against the int8 model on the first calibration samples; needs calibration "
                                       "data)"))


def quantize(ctx: RecipeContext) -> RecipeOutput:
    """ONNX Runtime's dynamic quantizer, also inside If/Loop/Scan bodies."""
    # lazy: keeps the registry light (the API and `lowbit --help` import it); this loads ONNX Runtime
    from worker.engine.four_bit_weights import store_four_bit
    from worker.engine.ort_quant import quantize_dynamic, warn_forced

    ctx.step("quantizing", 0.0)
    warn_forced(quantize_dynamic(ctx.norm_path, ctx.quant_path, ctx.opts), ctx.warnings)
    return store_four_bit(ctx, RecipeOutput())


RECIPE = Recipe(
    name="int8_dynamic",
    label="int8_dynamic (no calibration)",
    help="int8 weights, activations quantized at run time",
    options=OPTIONS,
    calibration="optional",
    quantize=quantize,
    file_tag="int8",
    per_channel_needs_opset13=True,
    requires_note="(it keeps the MatMuls that lose most in 4 bits in 8 bits)",
    form_fields=(FormField("per_channel", "per_channel"), FormField("batch_size", "batch_size")),
)
