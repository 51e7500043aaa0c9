from __future__ import annotations

import pytest

from worker.engine.config import IMPLEMENTED_RECIPES, INT8_ELSEWHERE_OPTIONS, RECIPE_OPTIONS, parse_options
from worker.engine.recipes import REGISTRY


@pytest.mark.parametrize("recipe", IMPLEMENTED_RECIPES)
def test_recorded_options_parse_back_to_the_same(recipe: str) -> None:
    """A job records to_dict(); the worker parses it again: that must round-trip for every recipe."""
    opts = parse_options(recipe, {"batch_size": 4})
    recorded = opts.to_dict(recipe)
    # Options that need another one on are not recorded without it: plain 4-bit records no int8 calibration
    # options (they only apply with int8_activations), int8_static no int8_most_sensitive (four_bit_weights).
    needing = {o.name for o in REGISTRY[recipe].options if o.requires}
    expected = RECIPE_OPTIONS[recipe] - needing
    assert set(recorded) == set(expected)
    if recipe == "int4_weight_only":
        assert needing == INT8_ELSEWHERE_OPTIONS
    if recipe == "int8_static":
        assert needing == {"int8_most_sensitive"}
    assert parse_options(recipe, recorded) == opts


def test_int4_with_int8_activations_records_and_parses_its_calibration_options() -> None:
    opts = parse_options("int4_weight_only", {"int8_activations": True, "method": "percentile"})
    recorded = opts.to_dict("int4_weight_only")
    assert set(recorded) == set(RECIPE_OPTIONS["int4_weight_only"]) and recorded["method"] == "percentile"
    assert parse_options("int4_weight_only", recorded) == opts
