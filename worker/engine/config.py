"""Frozen configuration objects for the engine, and the recipe option parser shared with the API."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError
from worker.engine.recipes import RECIPE_NAMES, REGISTRY, get_recipe
from worker.engine.recipes.int4_weight_only import default_algorithm
from worker.engine.recipes.options import (
    AUTO_PREFERENCES,
    BLOCK_SIZES,
    CALIBRATION_METHODS,
    CALIBRATORS,
    INT4_ALGORITHMS,
    INT4_CALIBRATED,
    ORDER,
    OUTPUT_ROLES,
)

__all__ = ["AUTO_PREFERENCES", "BLOCK_SIZES", "CALIBRATION_METHODS", "CALIBRATORS", "IMPLEMENTED_RECIPES",
           "INT4_ALGORITHMS", "INT4_CALIBRATED", "INT8_ELSEWHERE_OPTIONS", "OUTPUT_ROLES", "RECIPES",
           "RECIPES_NEEDING_CALIBRATION", "RECIPES_NEEDING_PYTORCH", "RECIPE_OPTIONS", "QuantizeConfig",
           "RecipeOptions", "calibrates", "check_recipe", "parse_options"]

RECIPES: tuple[str, ...] = RECIPE_NAMES
# Every registered recipe runs on every server (kept for the callers that import this name).
IMPLEMENTED_RECIPES: tuple[str, ...] = RECIPE_NAMES
# Recipes that need the model as a PyTorch program (a .pt2 upload), not only as ONNX.
RECIPES_NEEDING_PYTORCH = tuple(r.name for r in REGISTRY.values() if r.needs_pytorch)
RECIPES_NEEDING_CALIBRATION = tuple(r.name for r in REGISTRY.values() if r.needs_calibration)
# The options each recipe accepts; every other key is refused.
RECIPE_OPTIONS: dict[str, frozenset[str]] = {r.name: r.option_names for r in REGISTRY.values()}


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
    # None: decided by the worker's CPU (pipeline.resolve_reduce_range).
    reduce_range: bool | None = None
    batch_size: int = 8
    max_calibration_samples: int = 512
    holdout_fraction: float = 0.2
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_quantize: tuple[str, ...] = ()
    latency_runs: int = 30
    # int8_static: also measure every layer's sensitivity (each layer alone in int8; one model run per layer
    # and batch, so off unless asked for; auto measures it on its analysis candidate).
    layer_sensitivity: bool = False
    # int8_static: SmoothQuant ("auto" | "on" | "off") and its migration strength alpha (worker/engine/smoothquant.py).
    smoothquant: str = "auto"
    smoothquant_alpha: float = 0.5
    # int8_static: cross-layer equalization of conv chains and bias correction, "auto" | "on" | "off"
    # (worker/engine/conv_refine.py).
    equalize: str = "auto"
    bias_correction: str = "auto"
    # int8_static: learned rounding of the int8 weights, "auto" | "on" | "off", and its time budget in seconds
    # (worker/engine/adaround.py).
    adaround: str = "off"
    adaround_seconds: float = 120.0
    # int8_static: transformer blocks' residual stream in 16 bits and Softmax in float, "auto" | "on" | "off"
    # (worker/engine/residual16.py).
    residual_16bit: str = "auto"
    # int8_static: tensor or node names whose activations get 16-bit QDQ (A16W8) instead of uint8.
    activations_16bit: tuple[str, ...] = ()
    # Static quantization: nodes computing shapes, indices or a decision's inputs stay in float
    # (worker/engine/index_math.py).
    float_index_math: bool = True
    # int4_weight_only. algorithm None: clip_search when calibration data is given, else rtn.
    algorithm: str | None = None
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    # int4_weight_only: MatMuls kept in 8 bits (MatMulNBits bits=8) instead of 4, by name, and the last one
    # (an LLM's lm_head, whose errors every token's scores carry).
    int8_nodes: tuple[str, ...] = ()
    int8_last_matmul: bool = False
    int8_most_sensitive: int = 0
    quantize_embeddings: bool = False
    # int8_static and int8_dynamic: the int8 weights stored in 4 bits (worker/engine/four_bit_weights.py), but for
    # the int8_most_sensitive layers.
    four_bit_weights: bool = False
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
    train_memory_mb: float = 1024.0
    train_weight_ranges: bool = False
    train_activation_ranges: bool = True
    task_loss: bool = False
    # auto: at most this many layers kept in higher precision, one at a time, per candidate recipe.
    max_fallback_steps: int = 8
    # auto: "size_and_speed" chooses the smallest candidate that is not slower than the fp32 model (a slower one
    # only when no other meets the target); "size" the smallest, however slow.
    prefer: str = "size_and_speed"
    # auto: "full" takes every accuracy step before layers go to float; "float_fallback" plain int8 candidates
    # and float steps only (the search as it was before those steps, to compare what they gain).
    search: str = "full"
    # Declared output roles, (output name, role) pairs; outputs not named get an inferred role.
    outputs: tuple[tuple[str, str], ...] = ()

    @property
    def float_fallback_only(self) -> bool:
        """auto's search without its accuracy steps (option search "float_fallback")."""
        return self.search == "float_fallback"

    def to_dict(self, recipe: str = "int8_static") -> dict[str, Any]:
        """The options that apply to ``recipe``, defaults filled in (what a job records and reports)."""
        # Read from REGISTRY when called (not RECIPE_OPTIONS' import-time snapshot), like parse_options.
        keys = REGISTRY[recipe].option_names if recipe in REGISTRY else frozenset(f.name for f in fields(self))
        if recipe in REGISTRY:
            # An option that needs another one on (int4's int8 calibration options) is not recorded without it.
            keys = keys - {o.name for o in REGISTRY[recipe].options if o.requires and not getattr(self, o.requires)}
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


def check_recipe(recipe: str) -> None:
    """EngineError('unknown_recipe') unless ``recipe`` is registered."""
    get_recipe(recipe)


# int4_weight_only options that only mean something with int8_activations (they calibrate the int8 part).
INT8_ELSEWHERE_OPTIONS = frozenset(
    o.name for o in REGISTRY["int4_weight_only"].options if o.requires == "int8_activations"
)


_NULL_IS_DEFAULT = frozenset(o.name for r in REGISTRY.values() for o in r.options if o.nullable)


def parse_options(recipe: str, raw: dict[str, Any] | None) -> RecipeOptions:
    """Validate user options for ``recipe`` against its option table (worker/engine/recipes);
    raises EngineError('unknown_recipe'|'invalid_option'|'unknown_option')."""
    spec = get_recipe(recipe)
    table = {o.name: o for o in spec.options}
    raw = dict(raw or {})
    allowed = spec.option_names
    # None means "the default" for the options whose default is decided at run time, whichever recipe the
    # request names (a recorded {"algorithm": null} was always accepted by every recipe).
    for name in _NULL_IS_DEFAULT:
        if name in raw and raw[name] is None:
            del raw[name]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise EngineError(
            "unknown_option",
            f"unknown option(s) for recipe '{recipe}': {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
        )
    kw: dict[str, Any] = {}
    # One fixed order for every recipe: with several bad options, the same one is reported as always.
    for name in ORDER:
        if name not in raw:
            continue
        opt = table[name]
        kw[name] = opt.parse(raw[name], OUTPUT_ROLES)
        for c in opt.conflicts:
            if kw[name] == c.value and kw.get(c.other) == c.other_value:
                raise EngineError("invalid_option", c.message)
    by_requirement: dict[str, list[str]] = {}
    for opt in spec.options:
        if opt.requires and opt.name in raw and not kw.get(opt.requires):
            by_requirement.setdefault(opt.requires, []).append(opt.name)
    for needed, stray in by_requirement.items():
        raise EngineError(
            "invalid_option",
            f"{', '.join(sorted(stray))} only apply to {recipe} together with {needed}: true {spec.requires_note}",
        )
    return RecipeOptions(**kw)


def calibrates(recipe: str, opts: RecipeOptions, has_calibration: bool) -> bool:
    """Does this run learn from the calibration set (which then never validates)?"""
    if recipe in REGISTRY and REGISTRY[recipe].needs_calibration:
        return True
    if recipe == "int4_weight_only":
        algorithm = opts.algorithm or default_algorithm(has_calibration)
        return algorithm in INT4_CALIBRATED or opts.int8_activations
    if recipe == "int8_dynamic":
        # four_bit_weights ranks its 8-bit layers on the calibration samples.
        return has_calibration and opts.four_bit_weights and opts.int8_most_sensitive > 0
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
    # The job's accuracy target ({"metric", "min" | "max_drop", "confidence"?, ...}, as the API stores it): the
    # run measures it and reports report.accuracy_target, so the CLI and the service write the same report. auto
    # searches for it (auto.search) and its candidates' runs do not report it. Not hashed: a dict.
    accuracy_target: dict[str, Any] | None = field(default=None, hash=False)
