"""The engine's report check (worker/engine/report_check.py) against the typed contract (worker/engine/report.py):
the committed schema is the model's, and the two accept and refuse the same reports."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from app.examples import REPORT_EXAMPLE
from worker.engine import report_check
from worker.engine.report import validate_report, validation_schema

# The check itself: tests/conftest.py makes report_check.check also run the typed model once tests start, and this
# module is imported (collected) before.
CHECK = report_check.check


def _pydantic_accepts(report: dict[str, Any]) -> bool:
    try:
        validate_report(report)
        return True
    except pydantic.ValidationError:
        return False


def _check_accepts(report: dict[str, Any]) -> bool:
    try:
        CHECK(report)
        return True
    except report_check.ReportContractError:
        return False


def test_the_committed_schema_is_the_typed_models() -> None:
    # After changing worker/engine/report.py: python -m worker.engine.report --write-schema
    assert json.loads(report_check.SCHEMA_PATH.read_text()) == json.loads(json.dumps(validation_schema()))


def test_a_valid_report_passes_both() -> None:
    assert _pydantic_accepts(REPORT_EXAMPLE)
    assert CHECK(REPORT_EXAMPLE) is REPORT_EXAMPLE


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*path, k)
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*path, i)
            yield from _leaves(v, (*path, i))


def _replaced(report: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(report)
    node = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return out


def _removed(report: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    out = copy.deepcopy(report)
    node = out
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return out


# Values of every JSON kind a mistaken engine could put anywhere (no strings of digits: pydantic's lax mode reads
# "1.5" as a number where the schema, and so the check, refuses it; the engine writes numbers as numbers).
WRONG = [None, True, 7, 2.5, "text", [1.0, 2.0], {"unexpected": 1}]


def test_both_refuse_and_accept_the_same_changes_to_every_key() -> None:
    """Every key and item of a full report replaced by a value of each JSON kind, and every key removed; the
    check and the typed model must agree on each variant but one kind: pydantic's lax mode reads true/false as
    1/0 where the contract says number, and the check (JSON Schema's types) refuses them."""
    disagreements = []
    bool_as_number = refused = variants = 0
    paths = list(_leaves(REPORT_EXAMPLE))
    for path in paths:
        changed = [(repr(v), _replaced(REPORT_EXAMPLE, path, v)) for v in WRONG]
        if isinstance(path[-1], str):
            changed.append(("removed", _removed(REPORT_EXAMPLE, path)))
        for what, v in changed:
            want, got = _pydantic_accepts(v), _check_accepts(v)
            variants += 1
            refused += not got
            if want and not got and what == "True":
                bool_as_number += 1
            elif want != got:
                disagreements.append((path, what, "pydantic" if want else "check"))
    # Measured today: 118 paths, 919 variants, 713 refused by the check, 49 of them bools where numbers go.
    assert len(paths) >= 100 and variants >= 800 and refused >= 600 and bool_as_number >= 40
    assert not disagreements, disagreements[:20]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["size"].update(extra=1), "has a key the contract does not know: 'extra'"),
    (lambda r: r["size"].pop("ratio"), "report.size lacks the required key 'ratio'"),
    (lambda r: r["size"].update(ratio="small"), "report.size.ratio should be number"),
    (lambda r: r["latency"].update(provider=3), "report.latency.provider should be string, not int 3"),
    (lambda r: r.update(report_version=0), "below its minimum 1"),
    (lambda r: r.update(size=None), "a measured report's size cannot be null"),
    (lambda r: r.pop("calibration"), "a measured report needs calibration"),
    (lambda r: r.update(recipe="auto"), "an auto report needs chosen, best, candidates, kept_in_float, auto"),
])
def test_what_the_check_says_is_wrong(change: Any, message: str) -> None:
    report = copy.deepcopy(REPORT_EXAMPLE)
    change(report)
    with pytest.raises(report_check.ReportContractError, match=message.replace("(", r"\(").replace(".", r"\.")):
        CHECK(report)
    assert not _pydantic_accepts(report)
