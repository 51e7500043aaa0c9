"""fp16: float16 weights and compute, float32 inputs/outputs; unsafe ops and nodes whose values come close to
float16's largest stay in float32."""

from __future__ import annotations

from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe, RecipeContext, RecipeOutput

OPTIONS = (*o.COMMON, o.KEEP_IO_TYPES, o.OP_BLOCK_LIST)


def quantize(ctx: RecipeContext) -> RecipeOutput:
    """Range-check on the calibration data (when given), then convert to float16."""
    # lazy: keeps the registry light (the API and `lowbit --help` import it); this loads ONNX Runtime
    from worker.engine.fp16 import calibration_range_check, convert_fp16

    opts, warnings = ctx.opts, ctx.warnings
    ctx.step("quantizing", 0.0)
    ranged = calibration_range_check(ctx.cfg, opts, ctx.info, ctx.data, ctx.norm_path, ctx.normalized, ctx.providers)
    kept = convert_fp16(ctx.norm_path, ctx.quant_path, opts, ranged.nodes if ranged else ())
    if kept:
        warnings.append(f"kept in float32 (unsafe or slow in float16): {', '.join(kept)}")
    calibration = None
    if ranged is not None:
        calibration = {"method": "minmax", "purpose": "float16 range check", "samples": ranged.samples,
                       "seconds": round(ranged.seconds, 3), "float32_nodes": len(ranged.nodes)}
        if ranged.nodes:
            warnings.append(
                f"{len(ranged.nodes)} node(s) kept in float32 because their values on the calibration data "
                f"reach {ranged.peak:.3g}, too close to or beyond float16's largest value (65504): "
                f"{', '.join(ranged.nodes[:5])}"
            )
    return RecipeOutput(calibration=calibration, infer_shapes=True)


RECIPE = Recipe(
    name="fp16",
    label="fp16 (half-precision weights and compute)",
    help="float16 weights and compute, float32 inputs/outputs, unsafe ops kept in float32",
    options=OPTIONS,
    calibration="optional",
    quantize=quantize,
    file_tag="fp16",
    form_fields=(FormField("batch_size", "batch_size"),),
)
