from __future__ import annotations

import pytest

from worker.engine.config import IMPLEMENTED_RECIPES, INT8_ELSEWHERE_OPTIONS, RECIPE_OPTIONS, parse_options


@pytest.mark.parametrize("recipe", IMPLEMENTED_RECIPES)
def test_recorded_options_parse_back_to_the_same(recipe: str) -> None:
    """A job records to_dict(); the worker parses it again: that must round-trip for every recipe."""
    opts = parse_options(recipe, {"batch_size": 4})
    recorded = opts.to_dict(recipe)
    # Plain 4-bit records no int8 calibration options: they only apply with int8_activations.
    expected = RECIPE_OPTIONS[recipe] - (INT8_ELSEWHERE_OPTIONS if recipe == "int4_weight_only" else frozenset())
    assert set(recorded) == set(expected)
    assert parse_options(recipe, recorded) == opts


def test_int4_with_int8_activations_records_and_parses_its_calibration_options() -> None:
    opts = parse_options("int4_weight_only", {"int8_activations": True, "method": "percentile"})
    recorded = opts.to_dict("int4_weight_only")
    assert set(recorded) == set(RECIPE_OPTIONS["int4_weight_only"]) and recorded["method"] == "percentile"
    assert parse_options("int4_weight_only", recorded) == opts
