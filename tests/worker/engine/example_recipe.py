"""A worked example of README "How to add a recipe", step 1: a recipe module, as worker/engine/recipes/NAME.py
would be. ``int8_dense``: ONNX Runtime's dynamic int8 quantizer on the dense layers only (MatMul and Gemm),
everything else (convolutions included) kept in float.

It takes shared options only (recipes/options.py): a new option would also need a RecipeOptions field and a place
in options.ORDER, which a test cannot add at run time. tests/worker/engine/test_recipe_example.py registers it.
"""

from __future__ import annotations

import dataclasses

from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe, RecipeContext, RecipeOutput

NAME = "int8_dense"
DENSE_OPS = ("MatMul", "Gemm")

OPTIONS = (*o.COMMON, o.PER_CHANNEL, o.REDUCE_RANGE)


def quantize(ctx: RecipeContext) -> RecipeOutput:
    """Dynamic int8 of the dense layers; the heavy import happens here, when the recipe runs."""
    from worker.engine.ort_quant import quantize_dynamic, warn_forced

    ctx.step("quantizing", 0.0)
    dense_only = dataclasses.replace(ctx.opts, op_types_to_quantize=DENSE_OPS)
    warn_forced(quantize_dynamic(ctx.norm_path, ctx.quant_path, dense_only), ctx.warnings)
    return RecipeOutput()


RECIPE = Recipe(
    name=NAME,
    label=f"{NAME} (dense layers only, no calibration)",
    help="int8 weights of MatMul and Gemm only, activations quantized at run time",
    options=OPTIONS,
    calibration="optional",
    quantize=quantize,
    file_tag="int8dense",
    per_channel_needs_opset13=True,
    form_fields=(FormField("per_channel", "per_channel"), FormField("batch_size", "batch_size")),
)
