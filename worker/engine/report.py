"""The report's contract as a typed model (README.md, "The report").

The engine builds each report as a plain dict (``pipeline.run``, ``auto.conclude``/``auto.confirm``) and
validates it here before handing it over, so a change that drops, renames or mistypes a key fails where it is
made, in the engine's own tests, instead of in a reader. The API declares ``Report`` as the response model of
``GET /api/v1/jobs/{id}/report`` and serves its JSON Schema at ``/api/v1/schemas/report.json``.

This module imports pydantic only: the API process reads it, and must not load onnxruntime or torch.

Sections are closed (``extra="forbid"``) unless a comment says why one is open: a key the engine adds without
adding it here is a contract change, and should be one on purpose (with ``REPORT_VERSION`` raised when it
breaks readers). Keys that only some recipes or runs write are optional (absent or null).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from worker.engine.report_check import AUTO_ONLY, MEASURED, NOT_NULL, REPORT_VERSION, SCHEMA_PATH

# [low, high] of a 95% bootstrap interval; null where it cannot be computed (one sample).
Interval = tuple[float, float]
Role = Literal["classification", "multilabel", "embedding", "detection", "regression", "other"]
Metric = Literal["label_accuracy", "top1_agreement", "multilabel_f1", "cosine", "sqnr_db"]


# Validation context under which Report.from_stored reads a stored report: every section then upgrades what an
# older engine wrote (see _Section) instead of refusing it, and Report skips its completeness check.
STORED = "stored"


def _admits_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


# Stands in for a required key an older engine did not write; _Section reads it as None without validating it.
_ABSENT = object()


def _upgraded(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as this version reads it: keys the section no longer has dropped (closed sections only; open ones
    keep every key), and required keys an older engine did not write, or wrote as null, read as their empty
    value ([] or {}) or else None, so that a reader sees "not measured" rather than the whole report failing.
    None also for a key whose type has no null (e.g. latency.runs and latency.order, outputs' role_source, auto's
    prefer and speed_tolerance came after the first stored reports): readers of a stored report check such
    keys, as they did when they read the dict."""
    closed = cls.model_config.get("extra") == "forbid"
    out = {k: v for k, v in data.items() if not closed or k in cls.model_fields}
    for name, field in cls.model_fields.items():
        if out.get(name) is not None:
            continue  # written: validated as it is
        if _admits_none(field.annotation):
            if field.is_required():
                out[name] = None
            continue
        if name not in out and not field.is_required():
            continue  # absent, with a default
        origin = get_origin(field.annotation)
        out[name] = [] if origin is list else {} if origin is dict else _ABSENT
    return out


class _Section(BaseModel):
    """Every model of the report: strict about keys when the engine checks what it wrote, tolerant of what an
    older engine wrote when a stored report is read (context STORED, Report.from_stored)."""

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(info.context, dict) and info.context.get(STORED):
            return _upgraded(cls, data)
        return data

    @field_validator("*", mode="wrap")
    @classmethod
    def _absent(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return None if value is _ABSENT else handler(value)


class _Closed(_Section):
    model_config = ConfigDict(extra="forbid")


class Size(_Closed):
    original_bytes: int
    quantized_bytes: int
    ratio: float = Field(description="quantized_bytes / original_bytes")
    bits_per_weight: float | None = Field(default=None, description="4-bit recipes: scales and zero points counted")
    quantized_weight_bytes: int | None = None
    fp32_weight_bytes: int | None = None


class Overlap(_Closed):
    evaluation_samples: int
    shared_with_calibration: int
    identical_to_calibration: bool


class EvalPart(_Closed):
    """Which part of the evaluation samples a run validated on (auto's candidates and confirmation run)."""

    name: Literal["selection", "confirmation"]
    applied: bool
    whole: list[int]
    total_samples: int
    confirmation_share: float
    min_split_samples: int
    selection_range: list[int] | None = None
    confirmation_range: list[int] | None = None
    reason: str | None = Field(default=None, description="why the samples were not split")


class OutputAccuracy(_Closed):
    """One model output, original against quantized, on the evaluation samples."""

    name: str
    role: Role | None = None
    role_source: Literal["declared", "inferred"]
    role_reason: str | None = None
    samples: int
    cosine: float
    cosine_ci: Interval | None = None
    max_abs_error: float
    sqnr_db: float | None = Field(description="null when identical (infinite) or undefined (sqnr_note)")
    sqnr_db_ci: Interval | None = None
    identical: bool
    sqnr_note: str | None = None
    top1_agreement: float | None = None
    top1_agreement_ci: Interval | None = None
    # [samples, steps, classes] outputs only.
    sequence_agreement: float | None = None
    sequence_agreement_ci: Interval | None = None
    ctc_sequence_agreement: float | None = None
    ctc_sequence_agreement_ci: Interval | None = None
    # Multi-label outputs only: F1 of the quantized model's yes elements (>= 0.5) against the original's.
    multilabel_f1: float | None = None
    multilabel_f1_ci: Interval | None = None
    # Embedding outputs only.
    neighbour_agreement: float | None = None
    neighbour_agreement_ci: Interval | None = None
    neighbour_samples: int | None = None


class LabelAccuracy(_Closed):
    output: str = Field(description="the classification output scored against the labels")
    samples: int
    original: float
    quantized: float
    delta: float
    original_ci: Interval | None = None
    quantized_ci: Interval | None = None
    delta_ci: Interval | None = None


class Baseline(_Closed):
    """A reference model on the same samples: round-to-nearest for calibrated 4-bit (algorithm, block_size),
    post-training int8 for qat_int8 (recipe, method, per_channel)."""

    algorithm: str | None = None
    block_size: int | None = None
    recipe: str | None = None
    method: str | None = None
    per_channel: bool | None = None
    outputs: list[OutputAccuracy]
    labels: LabelAccuracy | None = None


class Accuracy(_Closed):
    samples: int
    source: Literal["eval_set", "calibration_holdout", "calibration_set", "synthetic"]
    overlap: Overlap | None = None
    part: EvalPart | None = None
    outputs: list[OutputAccuracy]
    labels: LabelAccuracy | None = None
    baselines: list[Baseline] | None = None


class Latency(_Closed):
    provider: str
    batch_size: int
    threads: int
    original_ms_p50: float
    quantized_ms_p50: float
    speedup: float | None = Field(description="original_ms_p50 / quantized_ms_p50")
    speedup_ci: Interval | None = None
    speedup_measurable: bool | None = Field(default=None, description="false when speedup_ci holds 1.0")
    runs: int
    # interleaved: the two models' runs alternate; in_turn (models with external data): all of the original's
    # runs, then all of the quantized model's, so that only one model is loaded at a time.
    order: Literal["interleaved", "in_turn"]


class Layer(_Closed):
    name: str
    op_type: str
    precision: Literal["int4", "int8", "fp16", "fp32"]
    sqnr_db: float | None
    # With layer sensitivity measured (int8_static option layer_sensitivity, auto's analysis).
    sensitivity: float | None = None
    isolated_sqnr_db: float | None = None
    # QDQ layers (int8_static, int4 + int8 activations): the bits of the output's QuantizeLinear (16 for the
    # activations_16bit tensors) and of the quantized weight.
    activation_bits: int | None = None
    weight_bits: int | None = None
    # With sensitivity measured: the layer's activation inputs (auto's A16W8 step gives them 16 bits).
    activation_inputs: list[str] | None = None


class LayerSqnr(_Closed):
    samples: int
    passes: int
    seconds: float


class Calibration(_Section):
    """How the run calibrated. Open: each recipe records what its own calibration did (static ranges, the 4-bit
    clip search or GPTQ, the int8 part of int4 + int8 activations, fp16's range check, QAT's learned ranges),
    and these records grow with the calibrators; the keys every one of them has are typed."""

    model_config = ConfigDict(extra="allow")

    method: str | None = None
    samples: int | None = None
    seconds: float | None = None


class SensitivityBlock(_Closed):
    name: str = Field(description="the block's residual Add")
    layers: list[str] = Field(description="its quantizable layers")
    sensitivity: float = Field(description="the sum of its measured layers' sensitivities")


class Sensitivity(_Closed):
    computed: bool
    note: str | None = None
    measure: str | None = None
    samples: int | None = None
    seconds: float | None = None
    layers_analysed: int | None = None
    layers_skipped: int | None = None
    ranking: list[str] | None = Field(default=None, description="layer names, most sensitive first")
    blocks: list[SensitivityBlock] | None = Field(
        default=None, description="residual blocks (from a residual Add back to the previous one), most sensitive "
                                  "first: auto's block fallback steps keep a whole block in float")


class SkippedPair(_Closed):
    first: str
    second: str
    reason: str


class EquivalenceCheck(_Closed):
    """The equalized float model against the prepared one, before anything was calibrated on it."""

    samples: int
    max_relative_error: float = Field(description="worst output's max|a - b| / max|a|")
    passed: bool


class RefineCompare(_Closed):
    """auto's measurement: output SQNR of the int8 model without and with the step, on calibration samples, and
    the per-sample gain (auto keeps the step where the SQNR rises by 0.1 dB and the gain's interval is above 0)."""

    samples: int
    sqnr_db_without: float | None
    sqnr_db_with: float | None
    per_sample_gain_db: float | None = Field(
        default=None, description="mean over the samples of each one's output SQNR gain with the step, dB")
    per_sample_gain_db_ci: list[float] | None = Field(
        default=None, description="95% bootstrap interval of per_sample_gain_db over the samples")


class Equalization(_Closed):
    """int8_static's cross-layer equalization (option equalize; worker/engine/equalize.py)."""

    mode: Literal["auto", "on", "off"]
    enabled: bool
    reason: str
    pairs: int | None = Field(default=None, description="Conv -> Conv pairs whose shared channels were rescaled")
    equalized: list[tuple[str, str]] | None = Field(default=None, description="the pairs (first, second), at most 50")
    pairs_skipped: int | None = None
    skipped: list[SkippedPair] | None = Field(default=None, description="at most 20, each with its reason")
    batchnorms_folded: int | None = None
    sweeps: int | None = None
    range_spread_before: float | None = Field(
        default=None, description="geometric mean over the pairs of the first conv's max/min per-channel weight range")
    range_spread_after: float | None = None
    check: EquivalenceCheck | None = None
    ranges_from: Literal["plain_pass", "calibration"] | None = Field(
        default=None, description="how the equalized model's activation ranges were found: from the plain "
        "calibration pass (its per-channel min/max divided by the scales; min/max calibration) or by a pass of "
        "its own")
    compare: RefineCompare | None = None
    seconds: float | None = None


class BiasCorrection(_Closed):
    """int8_static's bias correction (option bias_correction; worker/engine/bias_correction.py)."""

    mode: Literal["auto", "on", "off"]
    enabled: bool
    reason: str
    variant: str | None = None
    layers_corrected: int | None = None
    layers_skipped: int | None = None
    samples: int | None = None
    mean_abs_correction: float | None = Field(default=None, description="mean over the layers of mean_c |correction_c|")
    mean_relative_correction: float | None = Field(
        default=None, description="mean over the layers of mean |correction| / mean |bias|")
    means_from: Literal["plain_pass", "means_pass"] | None = Field(
        default=None, description="where the per-channel input means came from: the plain model's calibration "
        "pass (for an equalized model, its means divided by the channel scales) or a pass of their own")
    compare: RefineCompare | None = None
    seconds: float | None = None


class AdaRoundLayer(_Closed):
    """One layer's learned rounding."""

    layer: str
    op_type: str
    weights: int
    steps: int = Field(description="Adam steps taken on the layer's rounding variables")
    seconds: float = Field(description="the steps' time (the layer's share of adaround_seconds bounds it, after "
                                       "the first 50 steps)")
    rounded_other_way: int = Field(description="int8 weights rounded the other way than to the nearest level")
    output_mse_nearest: float = Field(description="the layer's output mean squared error with nearest rounding, on "
                                                  "the calibration samples' float inputs")
    output_mse_learned: float
    kept: bool = Field(description="false: the learned rounding did not lower the error; nearest rounding stays")


class AdaRound(_Closed):
    """int8_static's learned rounding (option adaround; worker/engine/adaround.py). Absent when the option is off."""

    mode: Literal["auto", "on", "off"]
    enabled: bool
    reason: str
    layers_learned: int | None = None
    layers_kept: int | None = None
    layers_skipped: int | None = None
    weights: int | None = None
    weights_rounded_other_way: int | None = None
    samples: int | None = None
    budget_seconds: float | None = None
    budget_exhausted: bool | None = None
    layers: list[AdaRoundLayer] | None = Field(default=None, description="at most 50")
    skipped: list[dict[str, str]] | None = Field(default=None, description="at most 20, each with its reason")
    compare: RefineCompare | None = None
    seconds: float | None = None


class Residual16(_Closed):
    """int8_static's option residual_16bit (worker/engine/residual16.py)."""

    mode: Literal["auto", "on", "off"]
    enabled: bool
    reason: str
    layernorms: int | None = Field(default=None, description="LayerNorm inputs found (LayerNormalization or "
                                                             "ReduceMean/Sub)")
    residual_adds: int | None = Field(default=None, description="Adds of two activations that feed no Softmax")
    tensors_16bit: int | None = Field(default=None, description="activation tensors given 16-bit QDQ")
    softmax_in_float: int | None = None
    compare: RefineCompare | None = None


class IndexMath(_Closed):
    """int8_static's option float_index_math (worker/engine/index_math.py)."""

    enabled: bool
    reason: str
    nodes: int = Field(description="nodes kept in float (or, off, that would have been)")
    shape_nodes: int = Field(description="of which compute from shapes and constants only")
    decision_nodes: int = Field(description="the rest: they compute the inputs of a rounding, comparison, cast to "
                                            "integers or a shape/index input")
    examples: list[str] = Field(description="the first node names, at most 10")


class FourBitRank(_Closed):
    """One layer alone with 4-bit weights: the int8 model's output SQNR against its own, and the weight's error."""

    name: str
    output_sqnr_db: float | None
    relative_error: float


class FourBitWeights(_Closed):
    """int8_static's option four_bit_weights (worker/engine/four_bit_weights.py)."""

    enabled: bool
    layers_4bit: int = Field(description="layers whose weights are stored in 4 bits")
    layers_8bit: list[str] = Field(description="layers kept in 8 bits (int8_most_sensitive)")
    relative_error: dict[str, float] = Field(description="each layer's ||w - w4||^2 / ||w||^2")
    weight_bytes_int8: int
    weight_bytes_after: int
    opset_converted_from: int | None = None
    bias_corrected: int = Field(description="layers whose bias took back the mean output shift of their 4-bit "
                                            "weights")
    mean_samples: int = Field(description="calibration samples the input means for bias correction came from")
    samples: int = Field(description="calibration samples the ranking ran on (0: no ranking)")
    seconds: float
    ranking: list[FourBitRank] | None = Field(default=None, description="most sensitive first, at most 50")


class SmoothQuantCheck(_Closed):
    """The smoothed float model against the prepared one, before anything was calibrated on it."""

    samples: int
    max_relative_error: float = Field(description="worst output's max|a - b| / max|a|")
    min_cosine: float
    passed: bool


class SmoothQuantChoice(_Closed):
    """Output SQNR (dB) of the int8 model with and without smoothing against the prepared float model, on the
    first calibration samples ("auto" keeps smoothing only when it is higher by 0.1 dB, and the per-sample gain's
    interval is above 0)."""

    smoothed: float | None
    unsmoothed: float | None
    samples: int
    per_sample_gain_db: float | None = Field(
        default=None, description="mean over the samples of each one's output SQNR gain with smoothing, dB")
    per_sample_gain_db_ci: list[float] | None = Field(
        default=None, description="95% bootstrap interval of per_sample_gain_db over the samples")


class SmoothQuant(_Closed):
    """What int8_static's SmoothQuant did (worker/engine/smoothquant.py): whether it smoothed and why, how many
    MatMul/Gemm inputs, how (factors folded into the producer, or a Mul inserted), and the channel spread
    (largest per-channel max over the median channel's) before and after."""

    enabled: bool
    reason: str
    mode: Literal["auto", "on", "off"]
    alpha: float
    spread_threshold: float = Field(description="auto smooths the inputs whose channel spread is above this")
    candidates: int | None = Field(default=None, description="MatMul/Gemm reading an activation and a constant weight")
    samples: int | None = None
    largest_spread_before: float | None = None
    matmuls_smoothed: int | None = None
    groups: int | None = Field(default=None, description="distinct inputs smoothed (Q, K and V share one)")
    folded: int | None = Field(default=None, description="groups whose 1/s went into the producer")
    muls_inserted: int | None = None
    largest_spread_after: float | None = None
    check: SmoothQuantCheck | None = None
    int8_sqnr_db: SmoothQuantChoice | None = Field(
        default=None, description="auto: the int8 models with and without smoothing compared; kept when better")
    seconds: float | None = None


class Environment(_Closed):
    lowbit: str | None
    onnxruntime: str | None
    onnx: str | None
    torch: str | None
    python: str | None
    numpy: str | None = None
    platform: str | None = None


class TensorDesc(_Closed):
    name: str
    dtype: str
    shape: list[int | str]


class ModelSection(_Closed):
    inputs: list[TensorDesc]
    outputs: list[TensorDesc]
    opset: int
    original_sha256: str
    quantized_sha256: str
    preprocessing: list[str]
    source_format: Literal["onnx", "pt2"]
    # Open: the .pt2 exporter's own record (its check against PyTorch, dynamic dimensions, what sanitising
    # dropped), which follows the exporter rather than this contract.
    export: dict[str, Any] | None = None


class ExternalData(_Closed):
    """A model with external data, quantized one weight at a time (worker/engine/streaming.py)."""

    files: list[str] = Field(description="the artifact zip's members: model.onnx and its data file")
    original_data_bytes: int
    int8_layers: list[str] = Field(description="MatMuls kept in 8 bits instead of 4")
    embedding_layers: list[str] = Field(default_factory=list, description="Gathers reading a 4-bit table "
                                        "(quantize_embeddings; GatherBlockQuantized)")
    quantize_seconds: float
    quantize_peak_rss_mb: float = Field(description="the job's process, peak resident memory after quantizing")
    validation_seconds: float
    validation_original_peak_rss_mb: float = Field(description="the validating process after the original model")
    validation_peak_rss_mb: float = Field(description="the validating process at the end (both models in turn)")


class Training(_Section):
    """qat_int8's training record. Open: it is the trainer's log (loss curve, attempts, which tensors were fake
    quantized and how activations were matched), whose detail follows the trainer; the keys readers use are
    typed."""

    model_config = ConfigDict(extra="allow")

    steps: int
    seconds: float
    result: Literal["qat", "ptq_baseline_kept"] | None = None
    # Open: the headline metric of the QAT model and its post-training baseline (qat.choose_artifact).
    comparison: dict[str, Any] | None = None


class AccuracyTargetSpec(_Closed):
    """The target as the job was given it (app.jobs.schemas.AccuracyTarget, unset keys left out)."""

    metric: Metric
    min: float | None = None
    max_drop: float | None = None
    confidence: float | None = None
    time_budget_s: float | None = None


class TargetCheck(AccuracyTargetSpec):
    """The target, echoed, with the measured value and whether it was met."""

    value: float | None = Field(description="the worst output's metric (or label accuracy)")
    met: bool | None
    note: str | None = None
    bound: float | None = Field(default=None, description="with confidence: the interval bound that decided")


class TargetSelection(_Closed):
    value: float | None
    met: bool | None
    samples: int | None


class AccuracyTargetResult(TargetCheck):
    """The report's accuracy_target; auto adds how it was decided."""

    distance: float | None = Field(default=None, description="auto, target missed: the best candidate's distance")
    confirmed: bool | None = Field(default=None, description="auto: decided on the confirmation samples")
    selection: TargetSelection | None = None


class ErrorInfo(_Closed):
    code: str
    message: str


class CandidateConfig(_Closed):
    recipe: str
    # Open: a recipe's own options (RecipeOptions.to_dict), as a user would submit them.
    options: dict[str, Any]
    excluded_nodes: list[str]
    # auto's A16W8 steps: the activation tensors given 16 bits (int8_static option activations_16bit), weights
    # int8; empty for every other candidate (and in reports from before these steps).
    activations_16bit: list[str] = Field(default_factory=list)
    # auto's block steps: the residual blocks kept in float (their layers are in excluded_nodes).
    blocks: list[str] = Field(default_factory=list)


class Best(CandidateConfig):
    metric: float | None
    distance_to_target: float | None


def is_slower(speedup: float | None, ci: Sequence[float | None] | None, tolerance: float) -> bool:
    """Whether a speed-up counts as slower than the fp32 model: below ``1 - tolerance`` and, where its interval
    ``ci`` is known, with the interval's upper end below 1 (the page applies the same rule to the report)."""
    if speedup is None or speedup >= 1.0 - tolerance:
        return False
    high = ci[1] if ci is not None and len(ci) == 2 else None
    return high is None or high < 1.0


class Candidate(CandidateConfig):
    status: Literal["done", "failed", "skipped"]
    size_bytes: int | None
    metric: float | None
    met_target: bool | None
    latency_ms_p50: float | None
    fp32_latency_ms_p50: float | None
    speedup: float | None
    # Reports written before it was recorded have none.
    speedup_ci: list[float] | None = Field(default=None, description="the speed-up's 95% bootstrap interval "
                                           "over the candidate run's timed pairs; a candidate counts as slower "
                                           "than fp32 when its speed-up is below 1 - speed_tolerance and this "
                                           "interval's upper end below 1")
    seconds: float | None
    error: ErrorInfo | None
    worker: str | None


class PassedOver(CandidateConfig):
    size_bytes: int | None
    speedup: float | None


class KeptLayer(_Closed):
    name: str
    sensitivity: float | None
    isolated_sqnr_db: float | None


class Figures(_Closed):
    """The chosen model's figures on one part of the evaluation samples."""

    samples: int | None
    source: str | None
    range: list[int] | None
    outputs: list[OutputAccuracy] | None
    labels: LabelAccuracy | None
    target: TargetCheck
    # confirmation only
    artifact_sha256: str | None = None
    same_artifact: bool | None = None


class ConfirmationFailed(_Closed):
    error: ErrorInfo


class AutoSection(_Closed):
    target: AccuracyTargetSpec
    rounds: int
    seconds: float
    evaluated: int
    failed: int
    skipped: list[CandidateConfig]
    workers: list[str]
    sensitivity_ranking: list[str]
    prefer: Literal["size_and_speed", "size"]
    speed_tolerance: float
    chosen_speedup: float | None
    chosen_slower_than_fp32: bool | None
    passed_over_as_slower: list[PassedOver]
    # Set by auto.confirm when a candidate was chosen.
    selection: Figures | None = None
    evaluation_split: EvalPart | None = None
    confirmation: Figures | ConfirmationFailed | None = None




class Report(_Closed):
    """A job's report: ``GET /api/v1/jobs/{id}/report``, ``lowbit quantize --report``."""

    model_config = ConfigDict(extra="forbid", title="Report")

    report_version: int = Field(ge=1, description=f"the report format's version ({REPORT_VERSION} today)")
    job_id: str | None = Field(description="null for `lowbit quantize`")
    recipe: str
    # Open: the recipe's own options with their defaults filled in (RecipeOptions.to_dict); each recipe has
    # its own set, documented under "Recipes and options".
    options: dict[str, Any]
    size: Size | None = None
    accuracy: Accuracy | None = None
    latency: Latency | None = None
    layers: list[Layer] | None = None
    layer_sqnr: LayerSqnr | None = None
    calibration: Calibration | None = None
    warnings: list[str] | None = None
    environment: Environment | None = None
    model: ModelSection | None = None
    sensitivity: Sensitivity | None = None
    equalization: Equalization | None = None
    bias_correction: BiasCorrection | None = None
    adaround: AdaRound | None = None
    residual_16bit: Residual16 | None = None
    index_math: IndexMath | None = None
    four_bit_weights: FourBitWeights | None = None
    external_data: ExternalData | None = None
    training: Training | None = None
    smoothquant: SmoothQuant | None = None
    accuracy_target: AccuracyTargetResult | None = None
    chosen: CandidateConfig | None = None
    best: Best | None = None
    candidates: list[Candidate] | None = None
    kept_in_float: list[KeptLayer] | None = None
    auto: AutoSection | None = None

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo) -> Report:
        if isinstance(info.context, dict) and info.context.get(STORED):
            return self  # a stored report shows the sections it has (from_stored)
        if self.recipe == "auto":
            missing = [k for k in AUTO_ONLY if k not in self.model_fields_set]
            if missing:
                raise ValueError(f"an auto report needs {', '.join(missing)}")
        if self.recipe == "auto" and self.best is None:
            return self  # no candidate could be measured: only the candidate table
        missing = [k for k in MEASURED if k not in self.model_fields_set]
        if missing:
            raise ValueError(f"a measured report needs {', '.join(missing)}")
        for k in NOT_NULL:
            if getattr(self, k) is None:
                raise ValueError(f"a measured report's {k} cannot be null")
        return self


    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> Report:
        """A stored report (``Job.report``, a ``--report`` file) as the typed model, for readers (pages, CLI,
        routes). Reports written before report_version existed still load: the version is filled in, keys since
        removed are dropped, required keys they lack read as null/empty, and a section that still does not fit is
        left out (read as not measured) rather than failing the page that shows the rest. A current report loads
        as it is; ``validate_report`` is the strict check the engine applies when writing one."""
        data = dict(stored)
        if not isinstance(data.get("report_version"), int):
            data["report_version"] = REPORT_VERSION  # stored before versioning: what this version reads
        while True:
            try:
                return cls.model_validate(data, context={STORED: True})
            except ValidationError as exc:
                # A key whose value does not fit is left out and read as absent (a section: not measured).
                bad = {e["loc"][0] for e in exc.errors() if e["loc"]} & set(data)
                if not bad:
                    raise
                data = {k: v for k, v in data.items() if k not in bad}


def stored_sections(stored: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Sections of a stored report exactly as stored (null where absent), for a copy that must match what
    ``GET /report`` serves byte for byte (the webhook summary): parsing would coerce values, e.g. an integer
    target bound to a float, and drop keys an older engine wrote. ``keys`` must be Report fields."""
    unknown = [k for k in keys if k not in Report.model_fields]
    if unknown:
        raise ValueError(f"not report sections: {', '.join(unknown)}")
    return {k: stored.get(k) for k in keys}


def validate_report(report: dict[str, Any]) -> dict[str, Any]:
    """Check ``report`` against the typed model; returns it unchanged. Raises pydantic.ValidationError. The
    engine checks its reports with ``report_check.check`` (the same contract, from this model's schema, without
    pydantic); tests run both on every report the engine checks."""
    Report.model_validate(report)
    return report


def validation_schema() -> dict[str, Any]:
    """The JSON Schema a report is checked against (``report_check``, committed as report_schema.json)."""
    schema: dict[str, Any] = Report.model_json_schema(mode="validation")
    return schema


def report_schema() -> dict[str, Any]:
    """The report's JSON Schema (what ``/api/v1/schemas/report.json`` serves)."""
    schema: dict[str, Any] = Report.model_json_schema(mode="serialization")
    schema["$id"] = "/api/v1/schemas/report.json"
    schema["description"] = (f"lowbit's job report, report_version {REPORT_VERSION}. README.md, 'The report', "
                             "explains every figure.")
    return schema


def main(argv: list[str] | None = None) -> int:
    """``--write-schema``: regenerate report_check's committed schema from this model (after changing it)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--write-schema"]:
        print("usage: python -m worker.engine.report --write-schema", file=sys.stderr)
        return 2
    SCHEMA_PATH.write_text(json.dumps(validation_schema(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
