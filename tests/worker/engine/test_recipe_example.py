"""README "How to add a recipe", followed step by step with tests/worker/engine/example_recipe.py.

A real recipe adds its line to REGISTRY in worker/engine/recipes/__init__.py, so every table is built with it
at import. Here the recipe is inserted into REGISTRY at run time (monkeypatch), so the test calls the functions
that generate each surface from the registry (the form, the CLI parser, the OpenAPI text, the README table and
the client module) instead of reading what was built at import.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from tests import builders
from tests.worker.engine import example_recipe
from worker.engine.config import QuantizeConfig, RecipeOptions, parse_options
from worker.engine.errors import EngineError
from worker.engine.recipes import REGISTRY, describe_recipes, get_recipe

NAME = example_recipe.NAME


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 2: the registry entry (a real recipe edits REGISTRY's tuple in worker/engine/recipes/__init__.py)."""
    monkeypatch.setitem(REGISTRY, NAME, example_recipe.RECIPE)


@pytest.mark.usefixtures("registered")
def test_parse_options_takes_the_recipes_options_and_refuses_others() -> None:
    assert get_recipe(NAME) is example_recipe.RECIPE
    assert parse_options(NAME, {"reduce_range": True, "per_channel": False}) == RecipeOptions(
        reduce_range=True, per_channel=False)
    with pytest.raises(EngineError) as e:
        parse_options(NAME, {"reduce_range": "yes"})
    assert str(e.value) == "invalid_option: option 'reduce_range' must be true or false, got 'yes'"
    with pytest.raises(EngineError) as e:
        parse_options(NAME, {"method": "entropy"})  # int8_static's option, not this recipe's
    assert e.value.code == "unknown_option" and "allowed: batch_size, holdout_fraction" in str(e.value)
    with pytest.raises(EngineError) as e:
        get_recipe("int3")
    assert str(e.value).endswith(f", qat_int8, {NAME}")  # the refusal lists it among the choices


@pytest.mark.usefixtures("registered")
def test_the_form_the_cli_the_openapi_text_and_the_generated_files_offer_it() -> None:
    from app.cli import build_parser
    from app.jobs.schemas import options_description, recipe_description
    from app.pages.service import FormValues, form_config, form_field_recipes, form_recipes
    from worker.engine.recipes.generated import client_module, readme_table

    # The upload form: the recipe list, which inputs set its options, and a submitted form.
    assert form_recipes()[NAME] == example_recipe.RECIPE.label
    assert NAME in form_field_recipes()["per_channel"]
    assert form_config(FormValues(recipe=NAME, per_channel=False, batch_size="4")) == {
        "recipe": NAME, "options": {"per_channel": False, "batch_size": 4}}
    # lowbit quantize: --recipe's choices and the epilog.
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    quantize = sub.choices["quantize"]  # type: ignore[index]
    recipe = next(a for a in quantize._actions if a.dest == "recipe")
    assert NAME in (recipe.choices or ())
    epilog = quantize.epilog or ""
    assert describe_recipes() in epilog and f"- {NAME}: {example_recipe.RECIPE.help}" in epilog
    # The job schema's OpenAPI text.
    assert f"- {NAME}: " in recipe_description()
    assert f"- {NAME}: batch_size (integer 1-1024, default 8)" in options_description()
    # Step 3's generated files: the README table and the client's recipe names and file tags.
    assert f"| `{NAME}` | `reduce_range` | true/false, default decided at run time |" in readme_table()
    client = client_module()
    assert f'"{NAME}")' in client and f'"{NAME}": "int8dense"' in client


@pytest.mark.usefixtures("registered")
def test_a_run_writes_an_artifact_and_a_report_the_contract_accepts(tmp_path: Path) -> None:
    from worker.engine.pipeline import run
    from worker.engine.report import Report
    from worker.engine.report_check import REPORT_VERSION

    model = builders.mlp(tmp_path / "mlp.onnx")
    data = builders.mlp_data(tmp_path / "mlp_data.npz", n=48, labels=True, model=model)
    stages: list[str] = []
    result = run(QuantizeConfig(
        model_path=model, output_path=tmp_path / f"mlp.{NAME}.onnx", recipe=NAME,
        options=parse_options(NAME, {"latency_runs": 3}), calibration_path=data, threads=1, device="cpu",
    ), progress=lambda stage, fraction: stages.append(stage))

    assert result.artifact_path.is_file() and result.artifact_bytes == result.artifact_path.stat().st_size
    ops = Counter(n.op_type for n in onnx.load(str(result.artifact_path)).graph.node)
    assert ops["MatMulInteger"] >= 1 and ops["Gemm"] == 0, ops  # the dense layers went to int8
    report = Report.model_validate(result.report)
    assert report.report_version == REPORT_VERSION and report.recipe == NAME
    # The report records the recipe's own options only, with their defaults filled in.
    assert set(report.options) == example_recipe.RECIPE.option_names and report.options["latency_runs"] == 3
    assert report.size is not None and report.size.ratio < 1
    assert "quantizing" in stages
