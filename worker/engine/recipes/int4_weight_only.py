"""int4_weight_only: 4-bit blockwise MatMul weights (ONNX Runtime MatMulNBits), activations in float, or in int8
with int8_activations."""

from __future__ import annotations

from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe, RecipeContext, RecipeOutput

# The int8 calibration options only mean something with int8_activations (they calibrate the int8 part).
OPTIONS = (*o.COMMON, o.ALGORITHM, o.BLOCK_SIZE, o.SYMMETRIC, o.ACCURACY_LEVEL, o.INT8_NODES, o.INT8_LAST_MATMUL,
           o.INT8_MOST_SENSITIVE,
           o.QUANTIZE_EMBEDDINGS,
           o.MAX_CALIBRATION_SAMPLES, o.INT8_ACTIVATIONS,
           o.METHOD.with_(requires="int8_activations", help="int8 part: how activation ranges are chosen"),
           o.PERCENTILE.with_(requires="int8_activations"),
           o.PER_CHANNEL.with_(requires="int8_activations", help="int8 part: one weight scale per output channel"))


def quantize(ctx: RecipeContext) -> RecipeOutput:
    """4-bit weights (calibrated by clip_search/gptq when asked), then optionally int8 everywhere else."""
    # lazy: keeps the registry light (the API and `lowbit --help` import it); this loads ONNX Runtime
    from worker.engine.ort_quant import int8_elsewhere, run_int4

    cfg, opts, info, split, data = ctx.cfg, ctx.opts, ctx.info, ctx.split, ctx.data
    int4 = run_int4(cfg, opts, info, split, data, ctx.norm_path, ctx.quant_path, ctx.providers, ctx.step,
                     ctx.warnings)
    calibration = int4.calibration
    if opts.int8_activations:
        elsewhere = int8_elsewhere(cfg, opts, info, split, data, ctx.quant_path, ctx.work, ctx.providers, ctx.step,
                                   ctx.warnings)
        calibration = {**(calibration or {}), "int8_elsewhere": elsewhere}
    return RecipeOutput(calibration=calibration, int4=int4)


def default_algorithm(has_calibration: bool) -> str:
    """The algorithm a run without option ``algorithm`` uses."""
    return "clip_search" if has_calibration else "rtn"


RECIPE = Recipe(
    name="int4_weight_only",
    label="int4_weight_only (4-bit MatMul weights)",
    help="4-bit blockwise MatMul weights (MatMulNBits), activations in float",
    options=OPTIONS,
    calibration="optional",
    quantize=quantize,
    file_tag="int4",
    form_fields=(FormField("algorithm", "algorithm"), FormField("block_size", "block_size"),
                 FormField("batch_size", "batch_size")),
    requires_note="(they calibrate the int8 part); the 4-bit weights alone take algorithm and block_size",
)
