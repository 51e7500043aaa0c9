"""The recipe registry (worker/engine/recipes) and everything generated from it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine.config import RECIPE_OPTIONS, RECIPES, RecipeOptions, check_recipe, parse_options
from worker.engine.errors import EngineError
from worker.engine.recipes import RECIPE_NAMES, REGISTRY, describe_recipes, get_recipe
from worker.engine.recipes.generated import README, TABLE_END, TABLE_START, client_module, readme_table
from worker.engine.recipes.options import ORDER

ROOT = Path(__file__).resolve().parents[3]
DEFAULTS = {f.name: f.default for f in dataclasses.fields(RecipeOptions)}


def test_the_registry_holds_every_recipe_once() -> None:
    assert RECIPE_NAMES == ("int8_static", "int8_dynamic", "int4_weight_only", "fp16", "auto", "qat_int8")
    assert RECIPES == RECIPE_NAMES and all(REGISTRY[n].name == n for n in RECIPE_NAMES)
    assert {n: r.option_names for n, r in REGISTRY.items()} == RECIPE_OPTIONS


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_option_is_a_recipe_options_field_with_the_same_default(recipe: str) -> None:
    spec = REGISTRY[recipe]
    names = [o.name for o in spec.options]
    assert len(names) == len(set(names)), names
    for opt in spec.options:
        assert opt.name in DEFAULTS, opt.name
        assert opt.default == DEFAULTS[opt.name], opt.name
        assert opt.name in ORDER, f"{opt.name} has no place in the order options are checked in"
        assert opt.help and "\n" not in opt.help
        if opt.requires:
            assert spec.option(opt.requires).kind == "bool" and spec.requires_note
    # An option parsed on its own gives the table's default back.
    parsed = parse_options(recipe, {})
    assert all(getattr(parsed, o.name) == o.default for o in spec.options)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_metadata_and_handlers(recipe: str) -> None:
    spec = REGISTRY[recipe]
    assert spec.label.startswith(recipe) and spec.help
    # auto has no quantize step of its own: it runs the other recipes as candidates.
    assert (spec.quantize is None) == (recipe == "auto")
    assert {f.option for f in spec.form_fields} <= spec.option_names


def test_unknown_recipe_is_refused_with_the_choices() -> None:
    for bad in ("int3", "", "INT8_STATIC"):
        with pytest.raises(EngineError) as e:
            check_recipe(bad)
        assert e.value.code == "unknown_recipe"
        assert str(e.value).endswith("choose one of: " + ", ".join(RECIPE_NAMES))
        with pytest.raises(EngineError):
            get_recipe(bad)


def test_requirement_and_conflict_messages_are_unchanged() -> None:
    with pytest.raises(EngineError) as e:
        parse_options("int4_weight_only", {"percentile": 99.0, "method": "entropy"})
    assert str(e.value) == (
        "invalid_option: method, percentile only apply to int4_weight_only together with int8_activations: true "
        "(they calibrate the int8 part); the 4-bit weights alone take algorithm and block_size")
    with pytest.raises(EngineError) as e:
        parse_options("int8_static", {"calibrator": "ort", "method": "mse"})
    assert str(e.value) == "invalid_option: ONNX Runtime's calibrators have no 'mse' method; use calibrator 'lowbit'"
    # A null algorithm / op_block_list means "the default", whichever recipe the request names.
    assert parse_options("int8_static", {"algorithm": None}) == RecipeOptions()


def test_importing_the_registry_loads_no_ml_library() -> None:
    code = ("import sys, json, worker.engine.recipes, worker.engine.config\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    top = set(json.loads(out.strip().splitlines()[-1]))
    assert not top & {"onnx", "onnxruntime", "torch", "numpy"}, top


def test_the_client_table_is_current() -> None:
    """app/client/recipes.py is generated (the client imports nothing of the engine)."""
    assert (ROOT / "app" / "client" / "recipes.py").read_text() == client_module(), (
        "run python -m worker.engine.recipes.generated")


def test_the_readme_option_table_is_current_and_names_every_option_under_its_recipe() -> None:
    text = README.read_text()
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    assert text[start:end] == readme_table(), "run python -m worker.engine.recipes.generated"
    rows = {tuple(cell.strip(" `") for cell in line.split("|")[1:3])
            for line in text[start:end].splitlines() if line.startswith("| `")}
    assert rows == {(r.name, o.name) for r in REGISTRY.values() for o in r.options}


def test_the_form_the_cli_and_the_schema_offer_the_registry() -> None:
    from app.cli import build_parser
    from app.jobs.schemas import JobCreate
    from app.pages.service import FormValues, _form_option, form_recipes

    assert {r.name: r.label for r in REGISTRY.values()} == form_recipes()
    for r in REGISTRY.values():
        for f in r.form_fields:
            _form_option(FormValues(), f.input)  # every input a recipe names exists on the form
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    quantize = sub.choices["quantize"]  # type: ignore[index]
    recipe = next(a for a in quantize._actions if a.dest == "recipe")
    assert list(RECIPE_NAMES) == list(recipe.choices or ())
    assert describe_recipes() in (quantize.epilog or "")
    schema = JobCreate.model_json_schema()["properties"]
    for r in REGISTRY.values():
        assert r.name in schema["recipe"]["description"]
        assert all(o.name in schema["options"]["description"] for o in r.options)
