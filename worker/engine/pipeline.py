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
from typing import Any

import numpy as np
import onnx

from worker.engine import pt2, runtime
from worker.engine.config import RECIPES_NEEDING_PYTORCH, QuantizeConfig, RecipeOptions, check_recipe
from worker.engine.context import ProgressFn, RunData
from worker.engine.errors import EngineError
from worker.engine.feeds import Batch, FeedPlan, fixed_batch, iter_batches
from worker.engine.files import environment, place, sha256_file
from worker.engine.fp16 import float16_in_subgraphs
from worker.engine.hygiene import Overlap, overlap
from worker.engine.inspect import ModelInfo, TensorInfo, inspect_model_file
from worker.engine.int4 import quantize_int4
from worker.engine.normalize import normalize, subgraph_op_types
from worker.engine.npz import DatasetInfo, NpzReader, inspect_npz
from worker.engine.preflight import plan_split
from worker.engine.pt2 import Pt2Source
from worker.engine.qat import choose_artifact, kept_warning
from worker.engine.recipes import RecipeContext, get_recipe
from worker.engine.report import REPORT_VERSION, validate_report
from worker.engine.sensitivity import MAX_SAMPLES as SENSITIVITY_SAMPLES
from worker.engine.sensitivity import SensitivityResult
from worker.engine.sensitivity import analyse as analyse_sensitivity
from worker.engine.validate import compare, latency_pair, layer_sqnr

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


@dataclass
class QuantizeResult:
    artifact_path: Path
    artifact_sha256: str
    artifact_bytes: int
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def progress_percent(stage: str, fraction: float) -> int:
    lo, hi = STAGE_SPAN[stage]
    return int(lo + (hi - lo) * max(0.0, min(1.0, fraction)))


def _plan_data(cfg: QuantizeConfig, info: ModelInfo, warnings: list[str]) -> RunData:
    calib: DatasetInfo | None = inspect_npz(cfg.calibration_path) if cfg.calibration_path else None
    ev: DatasetInfo | None = inspect_npz(cfg.eval_path) if cfg.eval_path else None
    # auto's candidates all validate on the samples int8_static would, so their metrics compare.
    split_recipe = "int8_static" if cfg.validate_like_static and calib is not None else cfg.recipe
    split = plan_split(split_recipe, cfg.options, info.inputs, calib, ev, part=cfg.eval_part)
    creader = NpzReader(cfg.calibration_path, calib) if calib is not None and cfg.calibration_path else None
    ereader = NpzReader(cfg.eval_path, ev) if ev is not None and cfg.eval_path else None
    if split.source == "synthetic":
        warnings.append(
            "no calibration or evaluation data was given: accuracy was measured on synthetic inputs "
            "(random floats, zero integers) and says little about accuracy on real data"
        )
    elif split.source == "calibration_set":
        warnings.append(
            "no evaluation set was given: validated on the calibration set (this recipe does not calibrate)"
        )
    shared: Overlap | None = None
    if split.source == "eval_set" and creader is not None and ereader is not None and split.calib_range:
        shared = overlap(creader, split.calib_range, ereader, split.eval_range)
        note = shared.warning()
        if note:
            warnings.append(note)
    return RunData(split, creader, ereader if split.source == "eval_set" else creader, shared)


def _synthetic_batches(inputs: tuple[TensorInfo, ...], count: int) -> Iterator[Batch]:
    rng = np.random.default_rng(0)
    for i in range(count):
        feed: dict[str, np.ndarray] = {}
        for inp in inputs:
            shape = [d if isinstance(d, int) else 1 for d in inp.shape]
            dt = np.dtype(inp.dtype)
            if dt.kind == "f":
                feed[inp.name] = rng.standard_normal(shape).astype(dt)
            else:
                feed[inp.name] = np.zeros(shape, dtype=dt)
        yield Batch(feed, i, 1, None)


def _first_sample_feed(feed: dict[str, np.ndarray], inputs: tuple[TensorInfo, ...], plan: FeedPlan | None) -> tuple[
    dict[str, np.ndarray], int
]:
    """A batch-1 feed (or the model's fixed batch) for the latency measurement."""
    out: dict[str, np.ndarray] = {}
    batch = 1
    for inp in inputs:
        a = feed[inp.name]
        if plan is not None and plan.modes[inp.name] == "stacked":
            if inp.shape and isinstance(inp.shape[0], int):
                batch = max(batch, inp.shape[0])
                out[inp.name] = a
            else:
                out[inp.name] = a[:1]
        else:
            out[inp.name] = a
    return out, batch


def _sample_feeds(batches: Iterator[Batch], inputs: tuple[TensorInfo, ...], plan: FeedPlan | None,
                  limit: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """The first ``limit`` samples of ``batches`` as (feed, samples) pairs, one sample per feed where the
    model's batch axis is dynamic (whole batches where it is fixed): the per-layer analyses then take as
    many samples as their memory bound allows, and hold one sample's activations per run."""
    from worker.engine.feeds import STACKED

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
        low = [LOW_BIT_OPS[r.op_type] for r in replaced if r.op_type in LOW_BIT_OPS]
        precision = low[0] if low else "int8" if any(r.op_type in INT8_OPS for r in replaced) else "fp32"
        out[node.name] = (precision, o, o if o in producers else "")
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


def _run(cfg: QuantizeConfig, opts: RecipeOptions, work: Path, step: ProgressFn) -> QuantizeResult:
    warnings: list[str] = []
    step("preparing", 0.0)
    source, cfg = _prepare_pt2(cfg, opts, work, step, warnings)
    env = environment()
    model_sha = sha256_file(Path(cfg.model_path))  # read once: the cache key and the report both use it
    info = inspect_model_file(cfg.model_path)
    providers = runtime.select_providers(cfg.device)
    data = _plan_data(cfg, info, warnings)
    split = data.split
    # Load the original model in ONNX Runtime first: a model it cannot run fails here, clearly.
    original_session = runtime.make_session(Path(cfg.model_path), providers, cfg.threads, "model")
    # Only int8 per-channel weights need opset 13; other recipes go on (with a warning) if it can't be had.
    needs_13 = opts.per_channel and (get_recipe(cfg.recipe).per_channel_needs_opset13 or opts.int8_activations)
    norm = normalize(Path(cfg.model_path), work / "prep", per_channel=needs_13)
    warnings.extend(norm.warnings)
    step("preparing", 1.0)

    normalized = onnx.load(str(norm.path))
    _refuse_already_quantized(normalized)
    quant_path = work / "quantized.onnx"
    # The recipe's own step (worker/engine/recipes/<name>.py); run() refused auto, which has none.
    handler = get_recipe(cfg.recipe).quantize
    assert handler is not None
    out = handler(RecipeContext(
        cfg=cfg, opts=opts, info=info, split=split, data=data, norm_path=norm.path, normalized=normalized,
        quant_path=quant_path, work=work, providers=providers, step=step, warnings=warnings, env=env,
        model_sha=model_sha, source=source,
    ))
    calibration, static_ranges, int4, qat = out.calibration, out.static_ranges, out.int4, out.qat
    step("quantizing", 1.0)

    quantized = onnx.load(str(quant_path))
    if out.infer_shapes:
        try:
            quantized = onnx.shape_inference.infer_shapes(quantized)
        except Exception as exc:  # only the per-layer precision column reads the inferred types
            log.info("shape inference of the float16 model failed: %s", exc)
    quant_session = runtime.make_session(quant_path, providers, cfg.threads, "quantized model")

    step("validating", 0.0)
    e0, e1 = split.eval_range
    if data.eval_reader is not None and split.eval_plan is not None:
        ereader, eplan = data.eval_reader, split.eval_plan

        def eval_batches() -> Iterator[Batch]:
            return iter_batches(ereader, info.inputs, eplan, e0, e1, with_labels=True)
    else:
        def eval_batches() -> Iterator[Batch]:
            return _synthetic_batches(info.inputs, e1 - e0)

    out_names = [o.name for o in original_session.get_outputs()]
    roles = dict(opts.outputs)
    unknown_outputs = sorted(set(roles) - set(out_names))
    if unknown_outputs:
        raise EngineError(
            "invalid_option",
            f"options.outputs names {', '.join(unknown_outputs)}, which the model does not have (outputs: "
            f"{', '.join(out_names)})",
        )
    acc = compare(
        original_session, quant_session, eval_batches(), out_names, e1 - e0,
        progress=lambda f: step("validating", 0.6 * f), roles=roles,
    )
    warnings.extend(acc.warnings)
    if acc.samples == 0:
        raise EngineError("not_enough_samples", "no evaluation batch could be formed from the dataset")
    baselines: list[dict[str, Any]] | None = None
    if int4 is not None and int4.algorithm != "rtn":
        # What calibration bought: the uncalibrated round-to-nearest model on the very same samples.
        rtn_path = work / "rtn.onnx"
        quantize_int4(norm.path, rtn_path, opts, "rtn", None, providers, cfg.threads)
        rtn_session = runtime.make_session(rtn_path, providers, cfg.threads, "round-to-nearest baseline")
        base = compare(original_session, rtn_session, eval_batches(), out_names, e1 - e0, roles=roles)
        baselines = [{"algorithm": "rtn", "block_size": opts.block_size, "outputs": base.outputs,
                      "labels": base.labels}]
        del rtn_session
    if qat is not None:
        # What training bought: post-training int8 of the float model, same samples and quantizer.
        ptq_session = runtime.make_session(qat.ptq_path, providers, cfg.threads, "post-training int8 baseline")
        base = compare(original_session, ptq_session, eval_batches(), out_names, e1 - e0, roles=roles)
        baselines = [{"recipe": "int8_static", "method": "minmax", "per_channel": opts.per_channel,
                      "outputs": base.outputs, "labels": base.labels}]
        # Training must not make the job's result worse: below the baseline, the baseline is the artifact.
        choice = choose_artifact(acc.outputs, acc.labels, base.outputs, base.labels)
        qat.training.update(result=choice["result"], comparison=choice)
        if choice["result"] == "ptq_baseline_kept":
            warnings.append(kept_warning(choice))
            shutil.copyfile(qat.ptq_path, quant_path)
            quantized, quant_session, acc = onnx.load(str(quant_path)), ptq_session, base
        del ptq_session

    first = next(iter(eval_batches()))
    lat_feed, lat_batch = _first_sample_feed(first.feed, info.inputs, split.eval_plan)
    lat = latency_pair(original_session, quant_session, lat_feed, opts.latency_runs)
    orig_ms, quant_ms = lat["original_ms_p50"], lat["quantized_ms_p50"]
    step("validating", 0.8)
    # Neither session is needed any more: release them before the layer analyses open their own observing ones
    # (a 90 MB transformer's pair held ~200 MB through the job's peak).
    provider = quant_session.get_providers()[0]
    del original_session, quant_session

    layer_feeds = _sample_feeds(eval_batches(), info.inputs, split.eval_plan, LAYER_SAMPLES)
    from worker.engine.calibrate import quantizable_op_types

    qops = quantizable_op_types()
    lmap = {k: v for k, v in _layer_map(normalized, quantized).items()}
    pairs = [(v[1], v[2]) for v in lmap.values() if v[2]]
    # Streamed in groups of layers that fit a fixed number of bytes per run, on a few samples.
    merge, per_run = _merger(info.inputs, split.eval_plan)
    lsq = layer_sqnr(norm.path, quant_path, normalized, quantized, pairs, layer_feeds, providers, cfg.threads,
                     merge=merge, max_per_run=per_run)
    sqnr = lsq.sqnr
    sens: SensitivityResult | None = None
    want_sensitivity = cfg.layer_sensitivity if cfg.layer_sensitivity is not None else opts.layer_sensitivity
    if static_ranges is not None and want_sensitivity:
        # Each layer quantized alone, with this run's calibrated ranges, on the first few of the same samples.
        sens_feeds: list[dict[str, np.ndarray]] = []
        sens_n = 0
        for feed, count in layer_feeds:
            if sens_n >= SENSITIVITY_SAMPLES:
                break
            sens_feeds.append(feed)
            sens_n += count
        sens = analyse_sensitivity(normalized, static_ranges, sens_feeds, providers, cfg.threads, qops, sens_n,
                                   merge=merge, max_per_run=per_run)
    layers = []
    for node in normalized.graph.node:
        if node.op_type not in qops or node.name not in lmap:
            continue
        precision, o, qt = lmap[node.name]
        layer: dict[str, Any] = {
            "name": node.name,
            "op_type": node.op_type,
            "precision": precision,
            "sqnr_db": sqnr.get((o, qt)) if qt else None,
        }
        if sens is not None:
            one = sens.layers.get(node.name)
            layer["sensitivity"] = one.sensitivity if one else None
            layer["isolated_sqnr_db"] = one.isolated_sqnr_db if one else None
        layers.append(layer)
    step("validating", 1.0)

    step("reporting", 0.0)
    if all(layer["precision"] == "fp32" for layer in layers):
        inner = sorted(subgraph_op_types(quantized) & (INT8_OPS | set(LOW_BIT_OPS) | {"DequantizeLinear"}))
        if not inner and float16_in_subgraphs(quantized):
            inner = ["float16 weights"]
        warnings.append(
            f"the quantized layers ({', '.join(inner)}) are inside If/Loop/Scan bodies, which the per-layer "
            "table does not list" if inner else
            "no layer was quantized: the model has no operators this recipe quantizes"
        )
    original_bytes = os.path.getsize(cfg.model_path)
    quantized_bytes = os.path.getsize(quant_path)
    speedup = orig_ms / quant_ms if quant_ms > 0 else None
    if speedup is not None and speedup < 1.0:
        warnings.append(
            f"the quantized model is slower than the original here ({quant_ms:.3f} ms vs {orig_ms:.3f} ms at "
            f"batch {lat_batch}); speed-ups from low precision depend on the CPU's kernels and the model's size"
        )
    artifact_sha = sha256_file(quant_path)
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "job_id": cfg.job_id,
        "recipe": cfg.recipe,
        "options": opts.to_dict(cfg.recipe),
        "size": {
            "original_bytes": original_bytes,
            "quantized_bytes": quantized_bytes,
            "ratio": round(quantized_bytes / original_bytes, 6),
            "bits_per_weight": round(int4.bits_per_weight, 4) if int4 and int4.bits_per_weight else None,
            "quantized_weight_bytes": int4.weight_bytes_quantized if int4 else None,
            "fp32_weight_bytes": int4.weight_bytes_fp32 if int4 else None,
        },
        "accuracy": {
            "samples": acc.samples,
            "source": split.source,
            "overlap": data.overlap.to_dict() if data.overlap is not None else None,
            # auto's candidates and its confirmation run validate on one part of the evaluation samples.
            "part": split.part_report(),
            "outputs": acc.outputs,
            "labels": acc.labels,
            "baselines": baselines,
        },
        "latency": {
            "provider": provider,
            "batch_size": lat_batch,
            "threads": cfg.threads,
            "original_ms_p50": round(orig_ms, 6),
            "quantized_ms_p50": round(quant_ms, 6),
            "speedup": round(speedup, 4) if speedup is not None else None,
            # Bootstrap interval over the interleaved run pairs; "measurable" is false when it holds 1.0.
            "speedup_ci": lat["speedup_ci"],
            "speedup_measurable": lat["measurable"],
            "runs": lat["runs"],
            "order": "interleaved",
        },
        "layers": layers,
        "calibration": calibration,
        "warnings": warnings,
        "environment": env,
        "model": {
            "inputs": [i.to_dict() for i in info.inputs],
            "outputs": [o.to_dict() for o in info.outputs],
            "opset": info.opset,
            "original_sha256": model_sha,
            "quantized_sha256": artifact_sha,
            "preprocessing": norm.steps,
            "source_format": "pt2" if source is not None else "onnx",
            "export": source.report if source is not None else None,
        },
    }
    if qat is not None:
        report["training"] = qat.training
    report["layer_sqnr"] = {"samples": lsq.samples, "passes": lsq.passes, "seconds": round(lsq.seconds, 3)}
    if sens is not None:
        report["sensitivity"] = {
            "computed": True,
            "measure": "output noise-to-signal power ratio with only that layer in int8 (worst output)",
            "samples": sens.samples,
            "seconds": round(sens.seconds, 3),
            "layers_analysed": len(sens.layers),
            "layers_skipped": sens.skipped,
            "ranking": sens.ranking(),
        }
        if sens.skipped:
            report["sensitivity"]["note"] = (
                f"{len(sens.layers)} of {len(sens.layers) + sens.skipped} layers analysed (spread evenly over the "
                "graph); the others have no sensitivity")
    elif cfg.recipe == "int8_static":
        report["sensitivity"] = {
            "computed": False,
            "note": "per-layer sensitivity was not measured: it costs one model run per layer and batch; set "
                    "option layer_sensitivity: true to measure it",
        }
    if cfg.accuracy_target:
        from worker.engine.target import evaluate_target

        report["accuracy_target"] = evaluate_target(cfg.accuracy_target, report)
    # The contract (worker/engine/report.py): a report that breaks it fails the run here, not in a reader.
    validate_report(report)
    place(quant_path, Path(cfg.output_path))
    step("reporting", 1.0)
    return QuantizeResult(Path(cfg.output_path), artifact_sha, quantized_bytes, report, warnings)


def _prepare_pt2(cfg: QuantizeConfig, opts: RecipeOptions, work: Path, step: ProgressFn,
                 warnings: list[str]) -> tuple[Pt2Source | None, QuantizeConfig]:
    """A .pt2 upload is exported to ONNX (in a child process, checked against PyTorch) and the run goes on
    with that ONNX model; returns the source and the config pointing at the export."""
    if not pt2.is_pt2(Path(cfg.model_path)):
        if cfg.recipe in RECIPES_NEEDING_PYTORCH:
            raise EngineError(
                "pytorch_model_required",
                f"recipe {cfg.recipe} fine-tunes the model in PyTorch, so it needs the model as a torch.export "
                f"archive (.pt2), not ONNX; {pt2.HOW_TO_MAKE_PT2}",
            )
        return None, cfg

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
    inits = {i.name: i for i in model.graph.initializer}
    quantized: set[str] = set()
    float_weights = 0
    for node in _all_nodes(model.graph):
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


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out: list[onnx.NodeProto] = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.extend(_all_nodes(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    out.extend(_all_nodes(g))
    return out
