"""The server's recipes, for the client's choices and file names. Generated from the registry
(worker/engine/recipes) by python -m worker.engine.recipes.generated: the client imports nothing of the
engine. tests/worker/engine/test_recipes.py checks it is current."""

from __future__ import annotations

RECIPE_NAMES: tuple[str, ...] = ("int8_static", "int8_dynamic", "int4_weight_only", "fp16", "auto", "qat_int8")
# Artifact file names: MODEL.<tag>.onnx.
RECIPE_TAGS: dict[str, str] = {
    "int8_static": "int8",
    "int8_dynamic": "int8",
    "int4_weight_only": "int4",
    "fp16": "fp16",
    "auto": "auto",
    "qat_int8": "int8",
}
