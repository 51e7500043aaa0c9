from __future__ import annotations

import pytest

from worker.engine.config import IMPLEMENTED_RECIPES, RECIPE_OPTIONS, parse_options


@pytest.mark.parametrize("recipe", IMPLEMENTED_RECIPES)
def test_recorded_options_parse_back_to_the_same(recipe: str) -> None:
    """A job records to_dict(); the worker parses it again: that must round-trip for every recipe."""
    opts = parse_options(recipe, {"batch_size": 4})
    recorded = opts.to_dict(recipe)
    assert set(recorded) == set(RECIPE_OPTIONS[recipe])
    assert parse_options(recipe, recorded) == opts
