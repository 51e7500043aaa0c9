"""One quantization run, start to finish: prepare, calibrate, quantize, validate, report."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from worker.engine import pt2_format, report_check, runtime
from worker.engine.blocks import find_blocks, rank_blocks
from worker.engine.calibrate import quantizable_op_types, select_tensors
from worker.engine.config import RECIPES_NEEDING_PYTORCH, QuantizeConfig, RecipeOptions, check_recipe
from worker.engine.context import ProgressFn, RunData
from worker.engine.errors import EngineError
from worker.engine.evaldata import first_sample_feed as _first_sample_feed
from worker.engine.evaldata import plan_data as _plan_data
from worker.engine.evaldata import synthetic_batches as _synthetic_batches
from worker.engine.feeds import STACKED, Batch, FeedPlan, fixed_batch, iter_batches
from worker.engine.files import environment, place, sha256_file
from worker.engine.inspect import ModelInfo, TensorInfo, has_external_data, inspect_model_file
from worker.engine.names import compact, graph_names
from worker.engine.normalize import NormalizeResult, all_graphs, normalize, subgraph_op_types
from worker.engine.recipes import RecipeContext, RecipeOutput, get_recipe
from worker.engine.report_check import REPORT_VERSION
from worker.engine.result import QuantizeResult as QuantizeResult
from worker.engine.sensitivity import MAX_SAMPLES as SENSITIVITY_SAMPLES
from worker.engine.sensitivity import SensitivityResult
from worker.engine.sensitivity import analyse as analyse_sensitivity
from worker.engine.target import evaluate_target
from worker.engine.validate import AccuracyResult, LayerSqnr, Merge, compare, latency_pair, layer_sqnr

if TYPE_CHECKING:
    from worker.engine.int4 import Int4Result
    from worker.engine.pt2 import Pt2Source

log = logging.getLogger(__name__)

STAGE_SPAN = {
    "preparing": (0, 10),
    "calibrating": (10, 50),
    "quantizing": (50, 60),
    "validating": (60, 95),
    "reporting": (95, 100),
}
# Validation samples the per-layer SQNR is measured on, at most (fewer when the model's activations are large,
# see validate.LAYER_BYTES_TOTAL): each is one run of both models, with their layers' outputs fetched (an LSTM
# embedder at batch 1: 70 ms a run, so 16 samples took as long as the whole calibration).
LAYER_SAMPLES = 8
# An output whose cosine to the original falls below this gets a warning that the model is no replacement:
# all-MiniLM-L6-v2's plain int8 embedding (0.34-0.42) and an all-zero output (0.0) are far below it, the corpus'
# usable int8 models (0.87 and up) far above.
COLLAPSED_COSINE = 0.5


def progress_percent(stage: str, fraction: float) -> int:
    lo, hi = STAGE_SPAN[stage]
    return int(lo + (hi - lo) * max(0.0, min(1.0, fraction)))


def _sample_feeds(batches: Iterator[Batch], inputs: tuple[TensorInfo, ...], plan: FeedPlan | None,
                  limit: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """The first ``limit`` samples of ``batches`` as (feed, samples) pairs, one sample per feed where the
    model's batch axis is dynamic (whole batches where it is fixed): the per-layer analyses then take as
    many samples as their memory bound allows, and hold one sample's activations per run."""

    out: list[tuple[dict[str, np.ndarray], int]] = []
    total = 0
    split = plan is not None and not fixed_batch(plan, inputs)
    for b in batches:
        parts = [(b.feed, b.count)]
        if split and plan is not None and b.count > 1:
            parts = [({name: a[k:k + 1] if plan.modes.get(name) == STACKED else a for name, a in b.feed.items()}, 1)
                     for k in range(b.count)]
        for feed, count in parts:
            if total >= limit:
                return out
            out.append((feed, count))
            total += count
    return out


def _merger(inputs: tuple[TensorInfo, ...], plan: FeedPlan | None) -> tuple[
        Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]] | None, int]:
    """How to join ``_sample_feeds``' single samples back into batches of at most the job's batch size (None
    when the model's batch axis is fixed or a feed holds one complete sample), so that the layer analyses run
    several samples at once where their memory bound allows."""
    if plan is None or fixed_batch(plan, inputs) or plan.samples_per_run <= 1:
        return None, 1

    def merge(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}

    return merge, plan.samples_per_run


INT8_OPS = {
    "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearConv",
    "QLinearMatMul", "DynamicQuantizeLSTM", "QAttention", "QGemm", "QLinearAdd", "QLinearMul",
}
LOW_BIT_OPS = {"MatMulNBits": "int4", "GatherBlockQuantized": "int4"}
# Activations the QDQ quantizer folds into the quantized range of their input instead of keeping.
FOLDABLE = {"Relu", "Clip"}


def _low_bits(node: onnx.NodeProto) -> str:
    """int4, or int8 for a MatMulNBits with bits=8 (int4_weight_only's int8_nodes and int8_last_matmul)."""
    bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
    return "int8" if node.op_type == "MatMulNBits" and bits == 8 else LOW_BIT_OPS[node.op_type]


def _layer_map(original: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """Per original node name: (precision, original tensor, quantized tensor to compare it with)."""
    q_nodes = {n.name: n for n in quantized.graph.node}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    # tensor -> the DequantizeLinear output that downstream nodes read instead of it
    dq_of: dict[str, str] = {}
    for n in quantized.graph.node:
        if n.op_type == "QuantizeLinear":
            for m in quantized.graph.node:
                if m.op_type == "DequantizeLinear" and m.input and m.input[0] == n.output[0]:
                    dq_of[n.input[0]] = m.output[0]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             [*quantized.graph.value_info, *quantized.graph.input, *quantized.graph.output]}
    types.update({t.name: t.data_type for t in quantized.graph.initializer})
    out: dict[str, tuple[str, str, str]] = {}
    for node in original.graph.node:
        if not node.output:
            continue
        o = node.output[0]
        qn = q_nodes.get(node.name)
        if qn is not None and qn.op_type == node.op_type:
            data_inputs = [i for i in qn.input if i]
            from_dq = [i for i in data_inputs if i in producers and producers[i].op_type == "DequantizeLinear"]
            if data_inputs and len(from_dq) == len(data_inputs):
                precision = "int8"
            elif data_inputs and all(types.get(i) == onnx.TensorProto.FLOAT16 for i in data_inputs if i in types) \
                    and any(i in types for i in data_inputs):
                precision = "fp16"
            else:
                precision = "fp32"
            out[node.name] = (precision, o, qn.output[0])
            continue
        if node.op_type in FOLDABLE and o in dq_of:
            out[node.name] = ("int8", o, dq_of[o])
            continue
        # Dynamic quantization replaces the node with integer ops named after it, keeping its output name.
        replaced = [q for name, q in q_nodes.items() if node.name and name.startswith(node.name)]
        low = [_low_bits(r) for r in replaced if r.op_type in LOW_BIT_OPS]
        precision = low[0] if low else "int8" if any(r.op_type in INT8_OPS for r in replaced) else "fp32"
        out[node.name] = (precision, o, o if o in producers else "")
    return out


_QDQ_BITS = {onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT16: 16,
             onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4}


def _qdq_bits(quantized: onnx.ModelProto) -> dict[str, tuple[int | None, int | None]]:
    """Per node of a QDQ model: (bits of its output's QuantizeLinear, bits of its quantized weight), None where it
    has none. The bits are the zero point's type (uint8 when a QuantizeLinear has none); int32 biases are no
    weights. Static int8 writes 8 everywhere but the activations_16bit tensors (16)."""
    inits = {t.name: t.data_type for t in quantized.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t.data_type for n in quantized.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    inits.update(consts)
    # four_bit_weights: a weight's DequantizeLinear reads a Cast (to int8) of an INT4 initializer.
    inits.update({n.output[0]: inits[n.input[0]] for n in quantized.graph.node
                  if n.op_type == "Cast" and n.input and inits.get(n.input[0]) in (onnx.TensorProto.INT4,
                                                                                 onnx.TensorProto.UINT4)})

    def bits(node: onnx.NodeProto) -> int | None:
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return _QDQ_BITS.get(inits.get(zp, 0)) if zp else 8

    act: dict[str, int | None] = {}
    weight: dict[str, int] = {}
    for n in quantized.graph.node:
        if n.op_type == "QuantizeLinear":
            act[n.input[0]] = bits(n)
        elif n.op_type == "DequantizeLinear" and inits.get(n.input[0]) in _QDQ_BITS:
            weight[n.output[0]] = _QDQ_BITS[inits[n.input[0]]]
    out: dict[str, tuple[int | None, int | None]] = {}
    for n in quantized.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or not n.output:
            continue
        w = [weight[i] for i in n.input if i in weight]
        out[n.name] = (act.get(n.output[0]), max(w) if w else None)
    return out


def run(cfg: QuantizeConfig, progress: ProgressFn | None = None) -> QuantizeResult:
    """Run one quantization described by ``cfg``; writes the artifact to ``cfg.output_path``."""
    check_recipe(cfg.recipe)
    if cfg.recipe == "auto":
        raise EngineError(
            "accuracy_target_required",
            "recipe auto searches for the smallest model within an accuracy target; run it with "
            "worker.engine.auto.search (the service and `lowbit quantize --accuracy-target` do)",
        )
    opts: RecipeOptions = cfg.options

    def step(stage: str, fraction: float = 0.0) -> None:
        if progress:
            progress(stage, fraction)

    tmp_owner = None
    if cfg.work_dir is None:
        tmp_owner = tempfile.TemporaryDirectory(prefix="lowbit-")
        work = Path(tmp_owner.name)
    else:
        work = Path(cfg.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, opts, work, step)
    finally:
        if tmp_owner is not None:
            tmp_owner.cleanup()


@dataclass(frozen=True)
class Prepared:
    """The prepare stage's output: the model the recipes read and what the run knows about it."""

    cfg: QuantizeConfig  # a .pt2 upload's config points at its ONNX export
    source: Pt2Source | None
    env: dict[str, str | None]
    model_sha: str
    info: ModelInfo
    providers: list[str]
    data: RunData
    norm: NormalizeResult
    normalized: onnx.ModelProto
    # The upload's (or the .pt2 export's) shape annotations: names.compact keeps these in the artifact.
    source_value_info: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Quantized:
    """The quantize stage's output: what the recipe's step returned and the model it wrote."""

    path: Path
    output: RecipeOutput
    model: onnx.ModelProto


@dataclass(frozen=True)
class Validated:
    """The validate stage's output: accuracy against the original, the baseline, and both models' latency."""

    acc: AccuracyResult
    baselines: list[dict[str, Any]] | None
    # The delivered model (qat_int8 delivers its post-training baseline when training made things worse).
    quantized: onnx.ModelProto
    latency: dict[str, Any]
    latency_batch: int
    provider: str


@dataclass(frozen=True)
class LayerTable:
    """The layers stage's output: the report's per-layer rows and what measuring them took."""

    layers: list[dict[str, Any]]
    sqnr: LayerSqnr
    sensitivity: SensitivityResult | None
    # The residual blocks, most sensitive first (worker/engine/blocks.py), where sensitivity was measured.
    blocks: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _QatBaseline:
    baselines: list[dict[str, Any]]
    acc: AccuracyResult
    # The baseline's session when the baseline is delivered instead of the trained model, else None.
    kept_session: Any


def _run(cfg: QuantizeConfig, opts: RecipeOptions, work: Path, step: ProgressFn) -> QuantizeResult:
    """The run's stages in order. ``warnings`` collects every stage's warnings as they arise (the report lists
    them in that order)."""
    warnings: list[str] = []
    opts = resolve_reduce_range(cfg.recipe, opts, runtime.int8_overflows_here(), warnings)
    if _external(cfg):
        from worker.engine.stream_pipeline import run_streamed  # only models with external data need it

        return run_streamed(cfg, opts, work, step, warnings)
    prep = _prepare(cfg, opts, work, step, warnings)
    runtime.release_freed_memory()
    made = _quantize(prep, opts, work, step, warnings)
    runtime.release_freed_memory()
    original_session = runtime.make_session(Path(prep.cfg.model_path), prep.providers, prep.cfg.threads, "model")
    checked = _validate(prep, made, original_session, opts, work, step, warnings)
    # Release the original model's session before the layer analyses open their own observing ones (a 90 MB
    # transformer's pair held ~200 MB through the job's peak); _validate released the quantized one.
    del original_session
    runtime.release_freed_memory()
    table = _layers(prep, made, checked, opts, step)
    runtime.release_freed_memory()
    return _report(prep, made, checked, table, opts, step, warnings)


def _external(cfg: QuantizeConfig) -> bool:
    """Whether the model keeps weights in external data files (a .pt2 upload never does). Only the graph is
    read, never the weights."""
    if pt2_format.looks_like_zip(Path(cfg.model_path)):
        return False
    try:
        model = onnx.load(str(cfg.model_path), load_external_data=False)
    except Exception:  # _prepare's inspection words a file that does not parse
        return False
    return has_external_data(model)


def resolve_reduce_range(recipe: str, opts: RecipeOptions, overflows: bool, warnings: list[str]) -> RecipeOptions:
    """Option reduce_range, when the job leaves it unset: 7-bit weights where this worker's CPU overflows
    8-bit ones in ONNX Runtime's int8 kernels (runtime.int8_pairs_overflow), else 8 bits. Resolved before the
    recipe runs, so the report's options (and a rerun from them) hold the value used. On this project's x86-64
    machine without VNNI, openWakeWord's embedding model's int8_static output SQNR was 14.5 dB with 8-bit
    weights and 23.2 dB with 7."""
    if opts.reduce_range is not None or "reduce_range" not in {o.name for o in get_recipe(recipe).options}:
        return opts
    if overflows:
        warnings.append(
            "weights in 7 bits (option reduce_range, not set, decided by this worker's CPU): this worker's CPU "
            "(x86-64 without VNNI) adds pairs of int8 products in 16 bits in ONNX Runtime's kernels, which "
            "8-bit weights overflow and 7-bit ones cannot. For a model that will run on CPUs with VNNI, or on "
            "ARM, set reduce_range=false"
        )
    return dataclasses.replace(opts, reduce_range=overflows)


def _prepare(cfg: QuantizeConfig, opts: RecipeOptions, work: Path, step: ProgressFn,
             warnings: list[str]) -> Prepared:
    """Export a .pt2, inspect the model, plan the data, check that ONNX Runtime runs the original model and
    normalize it for the recipes."""
    step("preparing", 0.0)
    source, cfg = _prepare_pt2(cfg, opts, work, step, warnings)
    env = environment()
    model_sha = sha256_file(Path(cfg.model_path))  # read once: the cache key and the report both use it
    info = inspect_model_file(cfg.model_path)
    # Refused before anything else is loaded: an already-quantized upload costs a parse, not a job's memory.
    upload = onnx.load(str(cfg.model_path))
    _refuse_already_quantized(upload)
    source_value_info = frozenset(v.name for v in upload.graph.value_info)
    del upload
    providers = runtime.select_providers(cfg.device)
    data = _plan_data(cfg, info, warnings)
    # Load the original model in ONNX Runtime first: a model it cannot run fails here, clearly. The session is
    # opened again for validation: held through calibration and quantization, its weights raised the job's
    # peak (all-MiniLM-L6-v2, 90 MB: by about as much again).
    runtime.make_session(Path(cfg.model_path), providers, cfg.threads, "model")
    # Only int8 per-channel weights need opset 13; other recipes go on (with a warning) if it can't be had.
    needs_13 = opts.per_channel and (get_recipe(cfg.recipe).per_channel_needs_opset13 or opts.int8_activations)
    norm = normalize(Path(cfg.model_path), work / "prep", per_channel=needs_13)
    warnings.extend(norm.warnings)
    step("preparing", 1.0)

    normalized = onnx.load(str(norm.path))
    return Prepared(cfg, source, env, model_sha, info, providers, data, norm, normalized, source_value_info)


def _quantize(prep: Prepared, opts: RecipeOptions, work: Path, step: ProgressFn, warnings: list[str]) -> Quantized:
    """The recipe's own step (worker/engine/recipes/<name>.py), then the model it wrote."""
    cfg = prep.cfg
    quant_path = work / "quantized.onnx"
    # run() refused auto, which has no step of its own.
    handler = get_recipe(cfg.recipe).quantize
    assert handler is not None
    out = handler(RecipeContext(
        cfg=cfg, opts=opts, info=prep.info, split=prep.data.split, data=prep.data, norm_path=prep.norm.path,
        normalized=prep.normalized, quant_path=quant_path, work=work, providers=prep.providers, step=step,
        warnings=warnings, env=prep.env, model_sha=prep.model_sha, source=prep.source,
    ))
    step("quantizing", 1.0)

    quantized = _compact_names(prep, quant_path)
    if out.infer_shapes:
        try:
            quantized = onnx.shape_inference.infer_shapes(quantized)
        except Exception as exc:  # only the per-layer precision column reads the inferred types
            log.info("shape inference of the float16 model failed: %s", exc)
    return Quantized(quant_path, out, quantized)


def _compact_names(prep: Prepared, path: Path) -> onnx.ModelProto:
    """The recipe's model at ``path`` with the long names quantization added shortened (worker/engine/names.py),
    rewritten in place when anything changed; the model as now written."""
    model = onnx.load(str(path))
    tensors, nodes = graph_names(prep.normalized)
    done = compact(model, tensors, nodes, set(prep.source_value_info))
    if done.changed:
        log.info("names: %d tensors and %d nodes renamed, %d shape annotations dropped", done.tensors, done.nodes,
                 done.value_info)
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return model


def _eval_batches(prep: Prepared) -> Callable[[], Iterator[Batch]]:
    """The evaluation samples, read afresh on each call: from the evaluation (or calibration) set, or synthetic
    inputs without one."""
    data, info = prep.data, prep.info
    e0, e1 = data.split.eval_range
    if data.eval_reader is not None and data.split.eval_plan is not None:
        ereader, eplan = data.eval_reader, data.split.eval_plan

        def eval_batches() -> Iterator[Batch]:
            return iter_batches(ereader, info.inputs, eplan, e0, e1, with_labels=True)
    else:
        def eval_batches() -> Iterator[Batch]:
            return _synthetic_batches(info.inputs, e1 - e0)
    return eval_batches


def _validate(prep: Prepared, made: Quantized, original_session: Any, opts: RecipeOptions, work: Path,
              step: ProgressFn, warnings: list[str]) -> Validated:
    """The quantized model against the original on the evaluation samples, the baseline that shows what
    calibration or training bought, and both models' latency."""
    cfg, info, split = prep.cfg, prep.info, prep.data.split
    quant_session = runtime.make_session(made.path, prep.providers, cfg.threads, "quantized model")

    step("validating", 0.0)
    e0, e1 = split.eval_range
    eval_batches = _eval_batches(prep)
    out_names = [o.name for o in original_session.get_outputs()]
    roles = dict(opts.outputs)
    _check_output_roles(roles, out_names)
    acc = compare(
        original_session, quant_session, eval_batches(), out_names, e1 - e0,
        progress=lambda f: step("validating", 0.6 * f), roles=roles,
    )
    warnings.extend(acc.warnings)
    if acc.samples == 0:
        raise EngineError("not_enough_samples", "no evaluation batch could be formed from the dataset")
    baselines: list[dict[str, Any]] | None = None
    quantized = made.model
    int4, qat = made.output.int4, made.output.qat
    if int4 is not None and int4.algorithm != "rtn":
        baselines = _rtn_baseline(prep, opts, work, original_session, eval_batches, out_names, roles)
    if qat is not None:
        ptq = _qat_baseline(prep, made, opts, original_session, acc, eval_batches, out_names, roles, warnings)
        baselines = ptq.baselines
        if ptq.kept_session is not None:
            quantized, quant_session, acc = onnx.load(str(made.path)), ptq.kept_session, ptq.acc

    first = next(iter(eval_batches()))
    lat_feed, lat_batch = _first_sample_feed(first.feed, info.inputs, split.eval_plan)
    # Both sessions just ran the evaluation set: one warm-up pair at the latency feed's shape is enough.
    lat = latency_pair(original_session, quant_session, lat_feed, opts.latency_runs, warmup=1)
    step("validating", 0.8)
    return Validated(acc, baselines, quantized, lat, lat_batch, quant_session.get_providers()[0])


def _check_output_roles(roles: dict[str, str], out_names: list[str]) -> None:
    unknown_outputs = sorted(set(roles) - set(out_names))
    if unknown_outputs:
        raise EngineError(
            "invalid_option",
            f"options.outputs names {', '.join(unknown_outputs)}, which the model does not have (outputs: "
            f"{', '.join(out_names)})",
        )


def _rtn_baseline(prep: Prepared, opts: RecipeOptions, work: Path, original_session: Any,
                  eval_batches: Callable[[], Iterator[Batch]], out_names: list[str],
                  roles: dict[str, str]) -> list[dict[str, Any]]:
    """What calibration bought: the uncalibrated round-to-nearest model on the very same samples."""
    # lazy: the 4-bit quantizer (and its streaming and block-quantization modules) loads with 4-bit jobs only, not
    # with every job (a small model's job is held to ONNX Runtime's quantizer's peak, issue #14)
    from worker.engine.int4 import quantize_int4

    e0, e1 = prep.data.split.eval_range
    rtn_path = work / "rtn.onnx"
    quantize_int4(prep.norm.path, rtn_path, opts, "rtn", None, prep.providers, prep.cfg.threads)
    rtn_session = runtime.make_session(rtn_path, prep.providers, prep.cfg.threads, "round-to-nearest baseline")
    base = compare(original_session, rtn_session, eval_batches(), out_names, e1 - e0, roles=roles)
    return [{"algorithm": "rtn", "block_size": opts.block_size, "outputs": base.outputs, "labels": base.labels}]


def _qat_baseline(prep: Prepared, made: Quantized, opts: RecipeOptions, original_session: Any,
                  acc: AccuracyResult, eval_batches: Callable[[], Iterator[Batch]], out_names: list[str],
                  roles: dict[str, str], warnings: list[str]) -> _QatBaseline:
    """What training bought: post-training int8 of the float model, same samples and quantizer. Training must
    not make the job's result worse: below the baseline, the baseline is the artifact."""
    # lazy: the qat_int8 recipe's module reads the .pt2 export (its child process): an ONNX job goes without it
    from worker.engine.qat import choose_artifact, kept_warning

    qat = made.output.qat
    assert qat is not None
    e0, e1 = prep.data.split.eval_range
    ptq_session = runtime.make_session(qat.ptq_path, prep.providers, prep.cfg.threads, "post-training int8 baseline")
    base = compare(original_session, ptq_session, eval_batches(), out_names, e1 - e0, roles=roles)
    baselines = [{"recipe": "int8_static", "method": "minmax", "per_channel": opts.per_channel,
                  "outputs": base.outputs, "labels": base.labels}]
    choice = choose_artifact(acc.outputs, acc.labels, base.outputs, base.labels)
    qat.training.update(result=choice["result"], comparison=choice)
    if choice["result"] == "ptq_baseline_kept":
        warnings.append(kept_warning(choice))
        shutil.copyfile(qat.ptq_path, made.path)
        _compact_names(prep, made.path)
        return _QatBaseline(baselines, base, ptq_session)
    return _QatBaseline(baselines, acc, None)


def _layers(prep: Prepared, made: Quantized, checked: Validated, opts: RecipeOptions,
            step: ProgressFn) -> LayerTable:
    """The per-layer table: each quantizable layer's precision and SQNR against the original, and (int8_static,
    when asked) its sensitivity."""
    cfg, info, split = prep.cfg, prep.info, prep.data.split
    float_path, normalized = _float_model(prep, made)
    quantized = checked.quantized
    layer_feeds = _sample_feeds(_eval_batches(prep)(), info.inputs, split.eval_plan, LAYER_SAMPLES)
    qops = quantizable_op_types()
    lmap = _layer_map(normalized, quantized)
    bits = _qdq_bits(quantized)
    pairs = [(v[1], v[2]) for v in lmap.values() if v[2]]
    # Streamed in groups of layers that fit a fixed number of bytes per run, on a few samples.
    merge, per_run = _merger(info.inputs, split.eval_plan)
    lsq = layer_sqnr(float_path, made.path, normalized, quantized, pairs, layer_feeds, prep.providers,
                     cfg.threads, merge=merge, max_per_run=per_run)
    # Nodes the recipe added (SmoothQuant's Muls) are no layers of the user's model.
    added = {n.name for n in normalized.graph.node} - {n.name for n in prep.normalized.graph.node}
    sens = _sensitivity(prep, made, opts, layer_feeds, qops, merge, per_run, (float_path, normalized, added))
    # Float activations the static quantizer may quantize (those option activations_16bit accepts).
    activations = set(select_tensors(normalized, opts.op_types_to_quantize or None)) if sens is not None else set()
    layers = []
    for node in normalized.graph.node:
        if node.op_type not in qops or node.name not in lmap or node.name in added:
            continue
        precision, o, qt = lmap[node.name]
        layer: dict[str, Any] = {
            "name": node.name,
            "op_type": node.op_type,
            "precision": precision,
            "sqnr_db": lsq.sqnr.get((o, qt)) if qt else None,
        }
        act_bits, weight_bits = bits.get(node.name, (None, None))
        if precision == "int8" and act_bits is not None:
            layer["activation_bits"] = act_bits  # 16 for the activations_16bit tensors (A16W8)
        if precision == "int8" and weight_bits is not None:
            layer["weight_bits"] = weight_bits
        if sens is not None:
            one = sens.layers.get(node.name)
            layer["sensitivity"] = one.sensitivity if one else None
            layer["isolated_sqnr_db"] = one.isolated_sqnr_db if one else None
            # What auto's A16W8 step gives 16 bits for this layer (int8_static option activations_16bit).
            layer["activation_inputs"] = [i for i in node.input if i in activations]
        layers.append(layer)
    blocks: list[dict[str, Any]] = []
    if sens is not None:
        measured = {n: float(s.sensitivity) for n, s in sens.layers.items() if s.sensitivity is not None}
        blocks = rank_blocks(find_blocks(normalized), measured, {layer["name"] for layer in layers})
    step("validating", 1.0)
    return LayerTable(layers, lsq, sens, blocks)


def _float_model(prep: Prepared, made: Quantized) -> tuple[Path, onnx.ModelProto]:
    """The float model the quantized one was made from, whose tensors the quantized model's carry: the prepared
    model, or the one the recipe rewrote before calibrating (SmoothQuant divides some activations by factors)."""
    if made.output.float_model is None:
        return prep.norm.path, prep.normalized
    return made.output.float_model, onnx.load(str(made.output.float_model))


def _sensitivity(prep: Prepared, made: Quantized, opts: RecipeOptions,
                 layer_feeds: list[tuple[dict[str, np.ndarray], int]], qops: set[str], merge: Merge | None,
                 per_run: int, float_model: tuple[Path, onnx.ModelProto, set[str]]) -> SensitivityResult | None:
    """Each layer quantized alone, with this run's calibrated ranges, on the first few of the layer samples
    (int8_static with option layer_sensitivity, or the run's own layer_sensitivity). ``float_model``: the float
    model the ranges belong to (``_float_model``) and the nodes the recipe added to it, which are not analysed."""
    cfg, static_ranges = prep.cfg, made.output.static_ranges
    want_sensitivity = cfg.layer_sensitivity if cfg.layer_sensitivity is not None else opts.layer_sensitivity
    if static_ranges is None or not want_sensitivity:
        return None
    sens_feeds: list[dict[str, np.ndarray]] = []
    sens_n = 0
    for feed, count in layer_feeds:
        if sens_n >= SENSITIVITY_SAMPLES:
            break
        sens_feeds.append(feed)
        sens_n += count
    return analyse_sensitivity(float_model[1], static_ranges, sens_feeds, prep.providers, cfg.threads, qops, sens_n,
                               merge=merge, max_per_run=per_run, skip=float_model[2])


def _report(prep: Prepared, made: Quantized, checked: Validated, table: LayerTable, opts: RecipeOptions,
            step: ProgressFn, warnings: list[str]) -> QuantizeResult:
    """The report, checked against its contract (worker/engine/report.py), then the artifact put in place: a
    report that breaks the contract fails the run here, not in a reader, and delivers nothing."""

    cfg, quant_path = prep.cfg, made.path
    step("reporting", 0.0)
    _warn_unlisted_layers(table.layers, checked.quantized, warnings)
    _warn_collapsed(checked.acc.outputs, checked.acc.samples, warnings)
    original_bytes = os.path.getsize(cfg.model_path)
    quantized_bytes = os.path.getsize(quant_path)
    orig_ms, quant_ms = checked.latency["original_ms_p50"], checked.latency["quantized_ms_p50"]
    speedup = orig_ms / quant_ms if quant_ms > 0 else None
    if speedup is not None and speedup < 1.0:
        warnings.append(
            f"the quantized model is slower than the original here ({quant_ms:.3f} ms vs {orig_ms:.3f} ms at "
            f"batch {checked.latency_batch}); speed-ups from low precision depend on the CPU's kernels and the "
            "model's size"
        )
    if quantized_bytes > original_bytes:
        warnings.append(
            f"the quantized model is larger than the original ({quantized_bytes} bytes vs {original_bytes}, "
            f"{quantized_bytes / original_bytes:.2f}x): the nodes and parameters it added outweigh what its "
            "weights saved, as in a model with few weights and many layers; int8_dynamic or fp16 may suit it "
            "better, or keep the original"
        )
    artifact_sha = sha256_file(quant_path)
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "job_id": cfg.job_id,
        "recipe": cfg.recipe,
        "options": opts.to_dict(cfg.recipe),
        "size": _size_section(original_bytes, quantized_bytes, made.output.int4),
        "accuracy": _accuracy_section(prep.data, checked),
        "latency": _latency_section(checked, cfg.threads, speedup),
        "layers": table.layers,
        "calibration": made.output.calibration,
        "warnings": warnings,
        "environment": prep.env,
        "model": _model_section(prep, artifact_sha),
    }
    if made.output.qat is not None:
        report["training"] = made.output.qat.training
    if made.output.smoothquant is not None:
        report["smoothquant"] = made.output.smoothquant
    if made.output.equalization is not None:
        report["equalization"] = made.output.equalization
    if made.output.bias_correction is not None:
        report["bias_correction"] = made.output.bias_correction
    if made.output.adaround is not None:
        report["adaround"] = made.output.adaround
    if made.output.residual_16bit is not None:
        report["residual_16bit"] = made.output.residual_16bit
    if made.output.index_math is not None:
        report["index_math"] = made.output.index_math
    if made.output.four_bit_weights is not None:
        report["four_bit_weights"] = made.output.four_bit_weights
    lsq = table.sqnr
    report["layer_sqnr"] = {"samples": lsq.samples, "passes": lsq.passes, "seconds": round(lsq.seconds, 3)}
    sensitivity = _sensitivity_section(table.sensitivity, cfg.recipe, table.blocks)
    if sensitivity is not None:
        report["sensitivity"] = sensitivity
    if cfg.accuracy_target:
        report["accuracy_target"] = evaluate_target(cfg.accuracy_target, report)
    report_check.check(report)
    place(quant_path, Path(cfg.output_path))
    step("reporting", 1.0)
    return QuantizeResult(Path(cfg.output_path), artifact_sha, quantized_bytes, report, warnings)


def _warn_collapsed(outputs: list[dict[str, Any]], samples: int, warnings: list[str]) -> None:
    """A loud warning for each output the quantized model no longer computes: a job that succeeds with cosine
    0.0 (SmoothQuant on openWakeWord's mel spectrogram gave all zeros) must not read like a usable result."""
    for out in outputs:
        cosine = out.get("cosine")
        if cosine is None or not np.isfinite(cosine) or cosine >= COLLAPSED_COSINE:
            continue
        warnings.append(
            f"output {out.get('name')} of the quantized model has lost what the original computes (cosine "
            f"{cosine:.3f}, SQNR {out.get('sqnr_db')} dB on {samples} evaluation samples): it is no replacement "
            "for the original. fp16 or int8_dynamic, int8_static's smoothquant or activations_16bit options, or "
            "auto with an accuracy target (which keeps the layers at fault in float) may keep it"
        )


def _warn_unlisted_layers(layers: list[dict[str, Any]], quantized: onnx.ModelProto, warnings: list[str]) -> None:
    """A table with no quantized layer: say whether they sit in If/Loop/Scan bodies, or there were none."""
    if all(layer["precision"] == "fp32" for layer in layers):
        # lazy: fp16's module brings ONNX Runtime's float16 converter, needed here only for this warning
        from worker.engine.fp16 import float16_in_subgraphs

        inner = sorted(subgraph_op_types(quantized) & (INT8_OPS | set(LOW_BIT_OPS) | {"DequantizeLinear"}))
        if not inner and float16_in_subgraphs(quantized):
            inner = ["float16 weights"]
        warnings.append(
            f"the quantized layers ({', '.join(inner)}) are inside If/Loop/Scan bodies, which the per-layer "
            "table does not list" if inner else
            "no layer was quantized: the model has no operators this recipe quantizes"
        )


def _size_section(original_bytes: int, quantized_bytes: int, int4: Int4Result | None) -> dict[str, Any]:
    return {
        "original_bytes": original_bytes,
        "quantized_bytes": quantized_bytes,
        "ratio": round(quantized_bytes / original_bytes, 6),
        "bits_per_weight": round(int4.bits_per_weight, 4) if int4 and int4.bits_per_weight else None,
        "quantized_weight_bytes": int4.weight_bytes_quantized if int4 else None,
        "fp32_weight_bytes": int4.weight_bytes_fp32 if int4 else None,
    }


def _accuracy_section(data: RunData, checked: Validated) -> dict[str, Any]:
    acc = checked.acc
    return {
        "samples": acc.samples,
        "source": data.split.source,
        "overlap": data.overlap.to_dict() if data.overlap is not None else None,
        # auto's candidates and its confirmation run validate on one part of the evaluation samples.
        "part": data.split.part_report(),
        "outputs": acc.outputs,
        "labels": acc.labels,
        "baselines": checked.baselines,
    }


def _latency_section(checked: Validated, threads: int, speedup: float | None) -> dict[str, Any]:
    lat = checked.latency
    return {
        "provider": checked.provider,
        "batch_size": checked.latency_batch,
        "threads": threads,
        "original_ms_p50": round(lat["original_ms_p50"], 6),
        "quantized_ms_p50": round(lat["quantized_ms_p50"], 6),
        "speedup": round(speedup, 4) if speedup is not None else None,
        # Bootstrap interval over the interleaved run pairs; "measurable" is false when it holds 1.0.
        "speedup_ci": lat["speedup_ci"],
        "speedup_measurable": lat["measurable"],
        "runs": lat["runs"],
        "order": "interleaved",
    }


def _model_section(prep: Prepared, artifact_sha: str) -> dict[str, Any]:
    info, source = prep.info, prep.source
    return {
        "inputs": [i.to_dict() for i in info.inputs],
        "outputs": [o.to_dict() for o in info.outputs],
        "opset": info.opset,
        "original_sha256": prep.model_sha,
        "quantized_sha256": artifact_sha,
        "preprocessing": prep.norm.steps,
        "source_format": "pt2" if source is not None else "onnx",
        "export": source.report if source is not None else None,
    }


def _sensitivity_section(sens: SensitivityResult | None, recipe: str,
                         blocks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The report's sensitivity section: the ranking when measured, a note where int8_static did not measure
    it, and none for the other recipes."""
    if sens is not None:
        section: dict[str, Any] = {
            "computed": True,
            "measure": "output noise-to-signal power ratio with only that layer in int8 (worst output)",
            "samples": sens.samples,
            "seconds": round(sens.seconds, 3),
            "layers_analysed": len(sens.layers),
            "layers_skipped": sens.skipped,
            "ranking": sens.ranking(),
        }
        if blocks:
            section["blocks"] = blocks
        if sens.skipped:
            section["note"] = (
                f"{len(sens.layers)} of {len(sens.layers) + sens.skipped} layers analysed (spread evenly over the "
                "graph); the others have no sensitivity")
        return section
    if recipe == "int8_static":
        return {
            "computed": False,
            "note": "per-layer sensitivity was not measured: it costs one model run per layer and batch; set "
                    "option layer_sensitivity: true to measure it",
        }
    return None


def _prepare_pt2(cfg: QuantizeConfig, opts: RecipeOptions, work: Path, step: ProgressFn,
                 warnings: list[str]) -> tuple[Pt2Source | None, QuantizeConfig]:
    """A .pt2 upload is exported to ONNX (in a child process, checked against PyTorch) and the run goes on
    with that ONNX model; returns the source and the config pointing at the export."""
    if not pt2_format.is_pt2(Path(cfg.model_path)):
        if cfg.recipe in RECIPES_NEEDING_PYTORCH:
            raise EngineError(
                "pytorch_model_required",
                f"recipe {cfg.recipe} fine-tunes the model in PyTorch, so it needs the model as a torch.export "
                f"archive (.pt2), not ONNX; {pt2_format.HOW_TO_MAKE_PT2}",
            )
        return None, cfg
    # lazy: the export (its child process, multiprocessing, OpenSSL's hashing) loads only for a .pt2 upload;
    # an ONNX job went without it (2.3 MB of a small model's peak)
    from worker.engine import pt2

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "loaded":
            step("preparing", 0.2)

    source = pt2.export_for_run(
        Path(cfg.model_path), work / "pt2", calibration_path=cfg.calibration_path, eval_path=cfg.eval_path,
        batch_size=opts.batch_size, threads=cfg.threads, device=cfg.device, on_event=on_event,
        cache_dir=cfg.export_cache_dir,
    )
    warnings.extend(source.warnings)
    step("preparing", 0.6)
    return source, dataclasses.replace(cfg, model_path=source.onnx_path)


# Operators that hold or compute with integer weights: a model built from them is quantized already.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "DynamicQuantizeLSTM",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "GatherBlockQuantized", "QAttention",
})
# Operators whose float weights lowbit's recipes shrink.
WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "Attention"})


def _refuse_already_quantized(model: onnx.ModelProto) -> None:
    """A model whose weighted layers are all integer already (e.g. ONNX Runtime's dynamic quantizer's output)
    has nothing left for any recipe to shrink; quantizing it again fails deep in a quantizer or only
    re-wraps integer arithmetic, so say what it is. A partly quantized model (float weights left) goes on."""
    graphs = list(all_graphs(model))
    # A body reads its own initializers and the main graph's; Constant nodes hold weights too (the file as
    # uploaded, before normalize moves them into initializers).
    inits = {i.name: i for g in graphs for i in g.initializer}
    inits.update({n.output[0]: a.t for g in graphs for n in g.node if n.op_type == "Constant" and n.output
                  for a in n.attribute if a.name == "value" and a.HasField("t")})
    quantized: set[str] = set()
    float_weights = 0
    for node in (n for g in graphs for n in g.node):
        if node.op_type in QUANTIZED_OPS:
            quantized.add(node.op_type)
        elif node.op_type in WEIGHTED_OPS and any(
                x in inits and inits[x].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                      onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
                and len(inits[x].dims) >= 2 for x in node.input[1:]):
            float_weights += 1
    if quantized and not float_weights:
        raise EngineError(
            "already_quantized",
            f"this model is already quantized (it uses {', '.join(sorted(quantized)[:6])}) and has no float "
            "weight matrix left for a recipe to shrink; upload the float (fp32/fp16) model it was made from",
        )
