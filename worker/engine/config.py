"""Frozen configuration objects for the engine, and the recipe option parser shared with the API."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError

RECIPES = ("int8_static", "int8_dynamic", "int4_weight_only", "fp16", "auto", "qat_int8")
IMPLEMENTED_RECIPES = ("int8_static", "int8_dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse")
RECIPES_NEEDING_CALIBRATION = ("int8_static", "auto", "qat_int8")
# Options that only mean something when activations are calibrated.
STATIC_ONLY = frozenset({"method", "symmetric_activations", "percentile", "max_calibration_samples", "calibrator"})
CALIBRATORS = ("lowbit", "ort")


@dataclass(frozen=True)
class RecipeOptions:
    """Options of the int8 recipes. Every field has a default; unknown keys are refused."""

    method: str = "minmax"
    # "lowbit": the streaming calibrator; "ort": ONNX Runtime's own calibrators, for comparison.
    calibrator: str = "lowbit"
    per_channel: bool = True
    symmetric_activations: bool = False
    percentile: float = 99.99
    reduce_range: bool = False
    batch_size: int = 8
    max_calibration_samples: int = 512
    holdout_fraction: float = 0.2
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_quantize: tuple[str, ...] = ()
    latency_runs: int = 30

    def to_dict(self, recipe: str = "int8_static") -> dict[str, Any]:
        """The options that apply to ``recipe``, defaults filled in (what a job records and reports)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if recipe == "int8_dynamic" and f.name in STATIC_ONLY:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise EngineError("invalid_option", f"option '{name}' must be true or false, got {value!r}")


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise EngineError("invalid_option", f"option '{name}' must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _float(name: str, value: Any, lo: float, hi: float, *, open_hi: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = lo < float(value) < hi if open_hi else lo <= float(value) <= hi
    if not ok:
        raise EngineError("invalid_option", f"option '{name}' must be a number between {lo} and {hi}, got {value!r}")
    return float(value)


def _names(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EngineError("invalid_option", f"option '{name}' must be a list of strings, got {value!r}")
    return tuple(value)


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise EngineError(
            "unknown_recipe", f"unknown recipe '{recipe}'; choose one of: {', '.join(IMPLEMENTED_RECIPES)}"
        )
    if recipe not in IMPLEMENTED_RECIPES:
        raise EngineError(
            "recipe_not_available",
            f"recipe '{recipe}' is not available on this server yet; choose one of: "
            f"{', '.join(IMPLEMENTED_RECIPES)}",
        )


def parse_options(recipe: str, raw: dict[str, Any] | None) -> RecipeOptions:
    """Validate user options for ``recipe``; raises EngineError('invalid_option'|'unknown_option')."""
    check_recipe(recipe)
    raw = dict(raw or {})
    known = {f.name for f in fields(RecipeOptions)}
    static_only = STATIC_ONLY
    unknown = sorted(set(raw) - known)
    if recipe == "int8_dynamic":
        unknown += sorted(set(raw) & static_only)
    if unknown:
        allowed = sorted(known - static_only) if recipe == "int8_dynamic" else sorted(known)
        raise EngineError(
            "unknown_option",
            f"unknown option(s) for recipe '{recipe}': {', '.join(unknown)}; allowed: {', '.join(allowed)}",
        )
    kw: dict[str, Any] = {}
    if "method" in raw:
        if raw["method"] not in CALIBRATION_METHODS:
            raise EngineError(
                "invalid_option",
                f"option 'method' must be one of {', '.join(CALIBRATION_METHODS)}, got {raw['method']!r}",
            )
        kw["method"] = raw["method"]
    if "calibrator" in raw:
        if raw["calibrator"] not in CALIBRATORS:
            raise EngineError(
                "invalid_option",
                f"option 'calibrator' must be one of {', '.join(CALIBRATORS)}, got {raw['calibrator']!r}",
            )
        if raw["calibrator"] == "ort" and kw.get("method") == "mse":
            raise EngineError(
                "invalid_option", "ONNX Runtime's calibrators have no 'mse' method; use calibrator 'lowbit'"
            )
        kw["calibrator"] = raw["calibrator"]
    for name in ("per_channel", "symmetric_activations", "reduce_range"):
        if name in raw:
            kw[name] = _bool(name, raw[name])
    if "percentile" in raw:
        kw["percentile"] = _float("percentile", raw["percentile"], 90.0, 100.0, open_hi=True)
    if "batch_size" in raw:
        kw["batch_size"] = _int("batch_size", raw["batch_size"], 1, 1024)
    if "max_calibration_samples" in raw:
        kw["max_calibration_samples"] = _int("max_calibration_samples", raw["max_calibration_samples"], 1, 100_000)
    if "holdout_fraction" in raw:
        kw["holdout_fraction"] = _float("holdout_fraction", raw["holdout_fraction"], 0.05, 0.5)
    if "latency_runs" in raw:
        kw["latency_runs"] = _int("latency_runs", raw["latency_runs"], 1, 1000)
    for name in ("nodes_to_exclude", "op_types_to_quantize"):
        if name in raw:
            kw[name] = _names(name, raw[name])
    return RecipeOptions(**kw)


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything one quantization run needs. Paths are explicit; nothing is read from globals."""

    model_path: Path
    output_path: Path
    recipe: str
    options: RecipeOptions = field(default_factory=RecipeOptions)
    calibration_path: Path | None = None
    eval_path: Path | None = None
    work_dir: Path | None = None
    # ONNX Runtime intra-op threads for calibration, validation and the latency measurement.
    threads: int = 2
    # "auto" uses the CUDA execution provider when this machine has one, else the CPU.
    device: str = "auto"
    job_id: str | None = None
    # Where calibration statistics are cached across runs; None disables the cache.
    cache_dir: Path | None = None
