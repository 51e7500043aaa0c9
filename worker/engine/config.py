"""Frozen configuration objects for the engine, and the recipe option parser shared with the API."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError

RECIPES = ("int8_static", "int8_dynamic", "int4_weight_only", "fp16", "auto", "qat_int8")
IMPLEMENTED_RECIPES = ("int8_static", "int8_dynamic", "int4_weight_only", "fp16", "auto", "qat_int8")
# Recipes that need the model as a PyTorch program (a .pt2 upload), not only as ONNX.
RECIPES_NEEDING_PYTORCH = ("qat_int8",)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse")
RECIPES_NEEDING_CALIBRATION = ("int8_static", "auto", "qat_int8")
CALIBRATORS = ("lowbit", "ort")
INT4_ALGORITHMS = ("rtn", "hqq", "gptq", "clip_search")
# Algorithms that learn from the calibration set (so its samples never validate).
INT4_CALIBRATED = ("gptq", "clip_search")
BLOCK_SIZES = (16, 32, 64, 128)
# auto: what the choice among candidates that meet the target optimises (see worker/engine/auto.py).
AUTO_PREFERENCES = ("size_and_speed", "size")

_COMMON = {"batch_size", "holdout_fraction", "nodes_to_exclude", "latency_runs", "outputs"}
# What an output is for, which decides the figures it gets (declared in options.outputs, else inferred).
OUTPUT_ROLES = ("classification", "embedding", "detection", "regression", "other")
# The options each recipe accepts; every other key is refused.
RECIPE_OPTIONS: dict[str, frozenset[str]] = {
    "int8_static": frozenset(_COMMON | {"method", "calibrator", "per_channel", "symmetric_activations", "percentile",
                                        "reduce_range", "max_calibration_samples", "op_types_to_quantize",
                                        "layer_sensitivity"}),
    "int8_dynamic": frozenset(_COMMON | {"per_channel", "reduce_range", "op_types_to_quantize"}),
    "int4_weight_only": frozenset(_COMMON | {"algorithm", "block_size", "symmetric", "accuracy_level",
                                             "quantize_embeddings", "max_calibration_samples", "int8_activations",
                                             "method", "percentile", "per_channel"}),
    "fp16": frozenset(_COMMON | {"keep_io_types", "op_block_list"}),
    # auto: the candidates take the common options (and max_calibration_samples where they calibrate).
    "auto": frozenset(_COMMON | {"max_calibration_samples", "max_fallback_steps", "prefer"}),
    "qat_int8": frozenset(_COMMON | {"steps", "learning_rate", "range_learning_rate", "train_weight_ranges",
                                     "train_activation_ranges", "task_loss", "max_calibration_samples"}),
}


@dataclass(frozen=True)
class RecipeOptions:
    """Options of every recipe. Every field has a default; ``parse_options`` refuses the keys a recipe
    does not take, and ``to_dict`` reports only the recipe's own."""

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
    # int8_static: also measure every layer's sensitivity (each layer alone in int8; one model run per layer
    # and batch, so off unless asked for; auto measures it on its analysis candidate).
    layer_sensitivity: bool = False
    # int4_weight_only. algorithm None: clip_search when calibration data is given, else rtn.
    algorithm: str | None = None
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    quantize_embeddings: bool = False
    # int4_weight_only: also run everything that stays outside the 4-bit MatMuls (activation x activation
    # MatMuls, Conv, Add, embeddings...) in int8 QDQ, calibrated on the 4-bit model with ``method``.
    int8_activations: bool = False
    # fp16
    keep_io_types: bool = True
    op_block_list: tuple[str, ...] | None = None
    # qat_int8: Adam steps on the calibration samples (batch_size per step), the learning rate of the
    # model's weights (relative: each tensor's rate is this times its own int8 step, max|w|/127, so an Adam step
    # moves a weight by about that share of one quantization level; see qat_torch.learning_rates) and of the
    # learned quantization ranges (momentum SGD on their log-scales and zero points, against a scale-free loss),
    # which ranges are learned
    # (otherwise: weights max|w|/127 per channel, activations fixed at their calibrated min/max), and
    # whether `labels` add a cross-entropy term to the distillation loss (off: it trades fidelity to the
    # float model for label fit).
    steps: int = 200
    learning_rate: float = 0.05
    range_learning_rate: float = 0.05
    train_weight_ranges: bool = False
    train_activation_ranges: bool = True
    task_loss: bool = False
    # auto: at most this many layers kept in higher precision, one at a time, per candidate recipe.
    max_fallback_steps: int = 8
    # auto: "size_and_speed" chooses the smallest candidate that is not slower than the fp32 model (a slower one
    # only when no other meets the target); "size" the smallest, however slow.
    prefer: str = "size_and_speed"
    # Declared output roles, (output name, role) pairs; outputs not named get an inferred role.
    outputs: tuple[tuple[str, str], ...] = ()

    def to_dict(self, recipe: str = "int8_static") -> dict[str, Any]:
        """The options that apply to ``recipe``, defaults filled in (what a job records and reports)."""
        keys = RECIPE_OPTIONS.get(recipe, frozenset(f.name for f in fields(self)))
        if recipe == "int4_weight_only" and not self.int8_activations:
            keys = keys - INT8_ELSEWHERE_OPTIONS
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in keys:
                continue
            value = getattr(self, f.name)
            if f.name == "outputs":
                out[f.name] = dict(value)  # as the mapping the user wrote ({} when none was declared)
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise EngineError("invalid_option", f"option '{name}' must be true or false, got {value!r}")


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise EngineError(
            "invalid_option", f"option '{name}' must be an integer from {lo} to {hi}, got {value!r}"
        )
    return value


def _float(name: str, value: Any, lo: float, hi: float, *, open_hi: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = lo < float(value) < hi if open_hi else lo <= float(value) <= hi
    if not ok:
        raise EngineError(
            "invalid_option", f"option '{name}' must be a number between {lo} and {hi}, got {value!r}"
        )
    return float(value)


def _names(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EngineError("invalid_option", f"option '{name}' must be a list of strings, got {value!r}")
    return tuple(value)


def _roles(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise EngineError(
            "invalid_option",
            f"option 'outputs' must map output names to roles ({', '.join(OUTPUT_ROLES)}), got {value!r}",
        )
    for name, role in value.items():
        if role not in OUTPUT_ROLES:
            raise EngineError(
                "invalid_option",
                f"option 'outputs': output '{name}' has role {role!r}; choose one of {', '.join(OUTPUT_ROLES)}",
            )
    return tuple(sorted(value.items()))


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if value not in choices or isinstance(value, bool):
        raise EngineError(
            "invalid_option", f"option '{name}' must be one of {', '.join(map(str, choices))}, got {value!r}"
        )
    return value


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


# int4_weight_only options that only mean something with int8_activations (they calibrate the int8 part).
INT8_ELSEWHERE_OPTIONS = frozenset({"method", "percentile", "per_channel"})


def parse_options(recipe: str, raw: dict[str, Any] | None) -> RecipeOptions:
    """Validate user options for ``recipe``; raises EngineError('invalid_option'|'unknown_option')."""
    check_recipe(recipe)
    raw = dict(raw or {})
    allowed = RECIPE_OPTIONS[recipe]
    # None means "the default" for the options whose default is decided at run time.
    for name in ("algorithm", "op_block_list"):
        if name in raw and raw[name] is None:
            del raw[name]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise EngineError(
            "unknown_option",
            f"unknown option(s) for recipe '{recipe}': {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
        )
    kw: dict[str, Any] = {}
    if "method" in raw:
        kw["method"] = _choice("method", raw["method"], CALIBRATION_METHODS)
    if "calibrator" in raw:
        kw["calibrator"] = _choice("calibrator", raw["calibrator"], CALIBRATORS)
        if raw["calibrator"] == "ort" and kw.get("method") == "mse":
            raise EngineError(
                "invalid_option", "ONNX Runtime's calibrators have no 'mse' method; use calibrator 'lowbit'"
            )
    for name in ("per_channel", "symmetric_activations", "reduce_range", "symmetric", "quantize_embeddings",
                 "int8_activations", "layer_sensitivity",
                 "keep_io_types", "train_weight_ranges", "train_activation_ranges", "task_loss"):
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
    if "algorithm" in raw:
        kw["algorithm"] = _choice("algorithm", raw["algorithm"], INT4_ALGORITHMS)
    if "block_size" in raw:
        kw["block_size"] = _choice("block_size", raw["block_size"], BLOCK_SIZES)
    if "steps" in raw:
        kw["steps"] = _int("steps", raw["steps"], 1, 100_000)
    if "learning_rate" in raw:
        kw["learning_rate"] = _float("learning_rate", raw["learning_rate"], 0.0, 1000.0)
    if "range_learning_rate" in raw:
        kw["range_learning_rate"] = _float("range_learning_rate", raw["range_learning_rate"], 0.0, 1000.0)
    if "max_fallback_steps" in raw:
        kw["max_fallback_steps"] = _int("max_fallback_steps", raw["max_fallback_steps"], 0, 64)
    if "prefer" in raw:
        kw["prefer"] = _choice("prefer", raw["prefer"], AUTO_PREFERENCES)
    if "accuracy_level" in raw:
        kw["accuracy_level"] = _int("accuracy_level", raw["accuracy_level"], 0, 4)
    for name in ("nodes_to_exclude", "op_types_to_quantize", "op_block_list"):
        if name in raw:
            kw[name] = _names(name, raw[name])
    if "outputs" in raw:
        kw["outputs"] = _roles(raw["outputs"])
    if recipe == "int4_weight_only" and not kw.get("int8_activations"):
        stray = sorted(INT8_ELSEWHERE_OPTIONS & set(raw))
        if stray:
            raise EngineError(
                "invalid_option",
                f"{', '.join(stray)} only apply to int4_weight_only together with int8_activations: true (they "
                "calibrate the int8 part); the 4-bit weights alone take algorithm and block_size",
            )
    return RecipeOptions(**kw)


def calibrates(recipe: str, opts: RecipeOptions, has_calibration: bool) -> bool:
    """Does this run learn from the calibration set (which then never validates)?"""
    if recipe in RECIPES_NEEDING_CALIBRATION:
        return True
    if recipe == "int4_weight_only":
        algorithm = opts.algorithm or ("clip_search" if has_calibration else "rtn")
        return algorithm in INT4_CALIBRATED or opts.int8_activations
    return False


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
    # Where ONNX exports of .pt2 uploads are cached across runs; None disables the cache.
    export_cache_dir: Path | None = None
    # Validate on the samples int8_static would (the held-out share of the calibration set when there is
    # no evaluation set), whatever the recipe: auto compares candidates of several recipes on equal terms.
    validate_like_static: bool = False
    # Measure every layer's sensitivity in int8_static runs: None follows options.layer_sensitivity; auto sets
    # it (on for its analysis candidate only) without touching the candidates' options.
    layer_sensitivity: bool | None = None
    # Validate on one part of the evaluation samples only: "selection" (what auto's search ranks layers and
    # chooses candidates on) or "confirmation" (the share it never sees, for the chosen model's reported
    # figures); None validates on all of them. See preflight.split_eval_range.
    eval_part: str | None = None
