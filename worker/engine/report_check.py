"""The engine's check of a report it wrote, against the contract, without pydantic.

The contract is the typed model in ``worker/engine/report.py``; its validation JSON Schema is committed beside
this module (``report_schema.json``, regenerated with ``python -m worker.engine.report --write-schema`` and
checked equal to the model's in tests). A job checks its report against that schema here: importing pydantic
and building the model's validators cost a job about 8 MB of resident memory at its very end, where a small
model's job peaked (openWakeWord's hey-jarvis: 107 MB, against ONNX Runtime's quantize_static's 95). In tests,
every report the engine checks is also validated by the pydantic model (tests/conftest.py), so the two agree.

Only what the schema uses is implemented: $ref into $defs, anyOf, type, enum, properties, required,
additionalProperties, items, prefixItems with minItems/maxItems, and minimum.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("report_schema.json")

# Raised when a reader of version N could misread a version N+1 report (a key removed, renamed or retyped);
# adding an optional key does not need it. Reports stored before versioning carry no report_version.
REPORT_VERSION = 1

# The sections every measured report has (README.md); an auto job whose every candidate failed has none.
MEASURED = ("size", "accuracy", "latency", "layers", "calibration", "warnings", "environment", "model")
AUTO_ONLY = ("chosen", "best", "candidates", "kept_in_float", "auto")
# A measured report's sections that cannot be null.
NOT_NULL = ("size", "accuracy", "latency", "layers", "warnings", "environment", "model")


class ReportContractError(ValueError):
    """The report breaks the contract: where (a path of keys and indices) and how."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


def _is_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        # bool is an int in Python, not in the contract; 3.0 is an integer in JSON Schema
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "array":
        return isinstance(value, (list, tuple))
    if kind == "object":
        return isinstance(value, dict)
    raise ReportContractError(f"the schema names an unknown type {kind!r}")


def _where(path: tuple[str | int, ...]) -> str:
    return "report" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _check(value: Any, node: dict[str, Any], path: tuple[str | int, ...]) -> None:
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        _check(value, schema()["$defs"][name], path)
        return
    if "anyOf" in node:
        errors = []
        for option in node["anyOf"]:
            try:
                _check(value, option, path)
                return
            except ReportContractError as exc:
                errors.append(str(exc))
        raise ReportContractError(f"{_where(path)} fits none of its allowed forms ({'; '.join(errors)})")
    kind = node.get("type")
    if kind is not None and not _is_type(value, kind):
        raise ReportContractError(f"{_where(path)} should be {kind}, not {type(value).__name__} {value!r:.80}")
    if "enum" in node and value not in node["enum"]:
        raise ReportContractError(f"{_where(path)} is {value!r}, not one of {node['enum']}")
    if "minimum" in node and _is_type(value, "number") and value < node["minimum"]:
        raise ReportContractError(f"{_where(path)} is {value!r}, below its minimum {node['minimum']}")
    if kind == "object":
        _check_object(value, node, path)
    elif kind == "array":
        _check_array(value, node, path)


def _check_object(value: dict[str, Any], node: dict[str, Any], path: tuple[str | int, ...]) -> None:
    props: dict[str, Any] = node.get("properties", {})
    for key in node.get("required", []):
        if key not in value:
            raise ReportContractError(f"{_where(path)} lacks the required key {key!r}")
    extra = node.get("additionalProperties", True)
    for key, item in value.items():
        if not isinstance(key, str):
            raise ReportContractError(f"{_where(path)} has a key that is not a string: {key!r}")
        if key in props:
            _check(item, props[key], (*path, key))
        elif extra is False:
            raise ReportContractError(f"{_where(path)} has a key the contract does not know: {key!r}")
        elif isinstance(extra, dict):
            _check(item, extra, (*path, key))


def _check_array(value: list[Any] | tuple[Any, ...], node: dict[str, Any], path: tuple[str | int, ...]) -> None:
    if "minItems" in node and len(value) < node["minItems"]:
        raise ReportContractError(f"{_where(path)} has {len(value)} items, fewer than {node['minItems']}")
    if "maxItems" in node and len(value) > node["maxItems"]:
        raise ReportContractError(f"{_where(path)} has {len(value)} items, more than {node['maxItems']}")
    prefix = node.get("prefixItems", [])
    for i, item in enumerate(value):
        if i < len(prefix):
            _check(item, prefix[i], (*path, i))
        elif "items" in node and isinstance(node["items"], dict):
            _check(item, node["items"], (*path, i))


def _complete(report: dict[str, Any]) -> None:
    """What the model's own completeness check requires (report.Report._complete)."""
    if report.get("recipe") == "auto":
        missing = [k for k in AUTO_ONLY if k not in report]
        if missing:
            raise ReportContractError(f"an auto report needs {', '.join(missing)}")
        if report.get("best") is None:
            return  # no candidate could be measured: only the candidate table
    missing = [k for k in MEASURED if k not in report]
    if missing:
        raise ReportContractError(f"a measured report needs {', '.join(missing)}")
    for k in NOT_NULL:
        if report[k] is None:
            raise ReportContractError(f"a measured report's {k} cannot be null")


def check(report: dict[str, Any]) -> dict[str, Any]:
    """Check ``report`` against the contract; returns it unchanged. Raises ReportContractError."""
    _check(report, schema(), ())
    _complete(report)
    return report
