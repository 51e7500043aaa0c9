"""The recipe registry: every recipe lowbit runs, by name, with its metadata and option table.

Option parsing (worker/engine/config.py), the upload form (app/pages), the offline CLI's choices, the client's
generated table (app/client/recipes.py) and the job schema's OpenAPI text are all built from ``REGISTRY``, so
adding a recipe is one module here plus its line below (see README "How to add a recipe").
Importing this package stays light (no onnx, ONNX Runtime or torch): handlers import those when they run.
"""

from __future__ import annotations

from worker.engine.errors import EngineError
from worker.engine.recipes import auto, fp16, int4_weight_only, int8_dynamic, int8_static, qat_int8
from worker.engine.recipes.base import Conflict, FormField, Option, Recipe, RecipeContext, RecipeOutput

# In the order they are offered (form, --help, errors).
REGISTRY: dict[str, Recipe] = {
    r.name: r
    for r in (int8_static.RECIPE, int8_dynamic.RECIPE, int4_weight_only.RECIPE, fp16.RECIPE, auto.RECIPE,
              qat_int8.RECIPE)
}
RECIPE_NAMES: tuple[str, ...] = tuple(REGISTRY)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``, or EngineError('unknown_recipe')."""
    recipe = REGISTRY.get(name)
    if recipe is None:
        # REGISTRY, not the RECIPE_NAMES snapshot: a recipe registered at run time (a test's) is listed too.
        raise EngineError("unknown_recipe", f"unknown recipe '{name}'; choose one of: {', '.join(REGISTRY)}")
    return recipe


def describe_recipes() -> str:
    """One line per recipe with its options, for the API's schema description and --help."""
    lines = []
    for r in REGISTRY.values():
        calib = "needs calibration data" if r.needs_calibration else "calibration data optional"
        pt = "; needs a .pt2 model" if r.needs_pytorch else ""
        target = "; needs an accuracy_target" if r.needs_accuracy_target else ""
        lines.append(f"- {r.name}: {r.help} ({calib}{pt}{target}); options: {', '.join(sorted(r.option_names))}")
    return "\n".join(lines)


__all__ = ["REGISTRY", "RECIPE_NAMES", "Conflict", "FormField", "Option", "Recipe", "RecipeContext",
           "RecipeOutput", "describe_recipes", "get_recipe"]
