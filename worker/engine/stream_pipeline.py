"""A job on a model with external data: prepare, quantize one weight at a time (worker/engine/streaming.py),
validate the two models in turn in a child process, report, and deliver ``model.onnx`` with its data file as
one ``.zip``.

The job's process never holds the model: its peak is one weight and its quantized form. The child that
validates holds one model at a time (the original, then the quantized one) plus the evaluation samples'
outputs, so its peak is the larger model plus activations.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from worker.engine import report_check, runtime, subprocess_runner
from worker.engine.config import QuantizeConfig, RecipeOptions
from worker.engine.context import ProgressFn, RunData
from worker.engine.errors import EngineError
from worker.engine.evaldata import first_sample_feed, plan_data, synthetic_batches
from worker.engine.feeds import Batch, iter_batches
from worker.engine.files import environment, sha256_file
from worker.engine.inspect import ModelInfo, inspect_model_file
from worker.engine.int4 import moments_over
from worker.engine.metrics import speedup_interval
from worker.engine.recipes.int4_weight_only import default_algorithm
from worker.engine.report_check import REPORT_VERSION
from worker.engine.result import QuantizeResult
from worker.engine.streaming import (
    DATA_NAME,
    MODEL_NAME,
    StreamResult,
    layer_rows,
    matmul_inputs,
    peak_rss_mb,
    quantize_streaming,
)
from worker.engine.streaming import refusal as streaming_refusal
from worker.engine.target import evaluate_target
from worker.engine.validate import compare

# Outputs of the original model kept for the comparison, at most (the evaluation samples beyond are not
# used): an LLM's logits are seq x vocab floats a sample (16 tokens of a 32000-word vocabulary: 2 MB).
MAX_REFERENCE_BYTES = 512 << 20
LATENCY_BUDGET_S = 1.0
LATENCY_MIN_RUNS = 5
LATENCY_WARMUP = 2


def run_streamed(cfg: QuantizeConfig, opts: RecipeOptions, work: Path, step: ProgressFn,
                 warnings: list[str]) -> QuantizeResult:
    """The whole job for a model with external data"""
    step("preparing", 0.0)
    why = streaming_refusal(cfg.recipe, opts.to_dict(cfg.recipe))
    if why is not None:
        raise EngineError("external_data_not_supported", why)
    if cfg.recipe == "int4_weight_only" and opts.algorithm is None:
        opts = dataclasses.replace(opts, algorithm=default_algorithm(cfg.calibration_path is not None))
    cfg = dataclasses.replace(cfg, options=opts)
    info = inspect_model_file(cfg.model_path)
    model_sha = sha256_file(Path(cfg.model_path))
    data = plan_data(cfg, info, warnings)
    step("preparing", 1.0)

    moments, calibration = None, None
    if cfg.recipe == "int4_weight_only" and opts.algorithm == "clip_search":
        moments, calibration = _calibrate(cfg, info, data, work, step)
    out_dir = work / "streamed"
    res = quantize_streaming(Path(cfg.model_path), out_dir, cfg.recipe, opts, step, moments)
    warnings.extend(res.warnings)
    if calibration is not None:
        total = sum(size for _r, size in res.clip_ratios)
        calibration["mean_clip_ratio"] = round(sum(r * size for r, size in res.clip_ratios) / total, 4) \
            if total else None
        calibration["unclipped_layers"] = res.unclipped

    step("validating", 0.0)
    e0, e1 = data.split.eval_range
    if data.eval_reader is not None and data.split.eval_plan is not None:
        batches = iter_batches(data.eval_reader, info.inputs, data.split.eval_plan, e0, e1, with_labels=True)
    else:
        batches = synthetic_batches(info.inputs, e1 - e0)
    feeds_path = work / "eval_feeds.npz"
    count = _save_batches(batches, feeds_path)
    first = _load_batches(feeds_path)[0]
    lat_feed, lat_batch = first_sample_feed(first.feed, info.inputs, data.split.eval_plan)
    np.savez(work / "latency_feed.npz", **lat_feed)  # type: ignore[arg-type]
    checked = subprocess_runner.run(
        "worker.engine.stream_pipeline:validate_in_turn",
        {"original": str(cfg.model_path), "quantized": str(out_dir / MODEL_NAME), "feeds": str(feeds_path),
         "latency_feed": str(work / "latency_feed.npz"), "samples": count, "threads": cfg.threads,
         "device": cfg.device, "latency_runs": opts.latency_runs, "roles": dict(opts.outputs)},
        subprocess_runner.Limits(), on_event=lambda e: step("validating", 0.9 * float(e)), work_dir=work,
    )
    warnings.extend(checked["warnings"])
    step("reporting", 0.0)
    report = _report(cfg, opts, info, data, res, checked, lat_batch, model_sha, warnings)
    report["calibration"] = calibration
    artifact = Path(cfg.output_path).with_suffix(".zip")
    bundle(out_dir, artifact)
    try:
        artifact_sha = sha256_file(artifact)
        report["model"]["quantized_sha256"] = artifact_sha
        if cfg.accuracy_target:
            report["accuracy_target"] = evaluate_target(cfg.accuracy_target, report)
        report_check.check(report)
    except BaseException:
        artifact.unlink(missing_ok=True)  # a report that breaks the contract delivers nothing
        raise
    step("reporting", 1.0)
    return QuantizeResult(artifact, artifact_sha, os.path.getsize(artifact), report, warnings)


def _calibrate(cfg: QuantizeConfig, info: ModelInfo, data: RunData, work: Path,
               step: ProgressFn) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """clip_search's statistics, in one pass over the calibration samples in a child process (which holds the
    original model; this process never does). Returns the moments and the report's calibration record."""
    step("calibrating", 0.0)
    split = data.split
    if data.calib_reader is None or split.calib_plan is None or split.calib_range is None:
        raise EngineError("calibration_required", "int4 algorithm clip_search learns from calibration data: give "
                          "a calibration dataset, or use algorithm rtn")
    feeds = work / "calib_feeds.npz"
    c0, c1 = split.calib_range
    _save_batches(iter_batches(data.calib_reader, info.inputs, split.calib_plan, c0, c1), feeds)
    out = work / "moments.npz"
    got = subprocess_runner.run(
        "worker.engine.stream_pipeline:channel_moments",
        {"model": str(cfg.model_path), "feeds": str(feeds), "out": str(out), "threads": cfg.threads,
         "device": cfg.device},
        subprocess_runner.Limits(), on_event=lambda e: step("calibrating", float(e)), work_dir=work,
    )
    with np.load(out, allow_pickle=False) as z:
        moments = {k: z[k] for k in z.files}
    feeds.unlink()
    out.unlink()
    record = {"method": "clip_search", "algorithm": "clip_search", "samples": got["samples"],
              "seconds": got["seconds"], "layers": got["layers"], "peak_rss_mb": got["peak_rss_mb"]}
    return moments, record


def bundle(folder: Path, dest: Path) -> None:
    """``model.onnx`` and its data file as one uncompressed zip (weights do not compress; stored members can
    be read in place), written beside ``dest`` and renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in (MODEL_NAME, DATA_NAME):
                zf.write(folder / name, arcname=name)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_batches(batches: Any, path: Path) -> int:
    """The evaluation batches as one .npz (``{i}/{input}`` arrays, ``{i}/labels``, ``{i}/count``), so the
    validating child reads exactly what the job planned; returns the number of samples."""
    arrays: dict[str, np.ndarray] = {}
    samples = 0
    for i, b in enumerate(batches):
        for name, a in b.feed.items():
            arrays[f"{i}/{name}"] = np.asarray(a)
        if b.labels is not None:
            arrays[f"{i}/@labels"] = np.asarray(b.labels)
        arrays[f"{i}/@count"] = np.asarray(b.count)
        samples += b.count
    if not samples:
        raise EngineError("not_enough_samples", "no evaluation batch could be formed from the dataset")
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return samples


def _load_batches(path: Path) -> list[Batch]:
    with np.load(path, allow_pickle=False) as z:
        items: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            i, _, name = key.partition("/")
            items.setdefault(int(i), {})[name] = z[key]
    out = []
    start = 0
    for i in sorted(items):
        d = items[i]
        count = int(d.pop("@count"))
        labels = d.pop("@labels", None)
        out.append(Batch(d, start, count, labels))
        start += count
    return out


class _Replay:
    """Stands in for the original model's session in ``validate.compare``: its outputs were recorded before
    the quantized model was loaded, and are given back in the same order."""

    def __init__(self, outputs: list[list[np.ndarray]]) -> None:
        self.outputs = outputs
        self.i = 0

    def run(self, _names: Any, _feed: Any) -> list[np.ndarray]:
        out = self.outputs[self.i]
        self.i += 1
        return out


def _timed(session: Any, feed: dict[str, np.ndarray], runs: int) -> list[float]:
    for _ in range(LATENCY_WARMUP):
        session.run(None, feed)
    times: list[float] = []
    for i in range(max(runs, 1)):
        if i >= LATENCY_MIN_RUNS and sum(times) >= LATENCY_BUDGET_S * 1000.0:
            break
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def channel_moments(payload: dict[str, Any], emit: Any) -> dict[str, Any]:
    """In a child process, one pass over the calibration samples: E[x_k^2] per input channel k of each
    quantizable MatMul's input (as the whole-model clip_search measures it), saved to ``payload["out"]``.
    The session is the original model with those activations as extra outputs, loaded from its weight-free
    graph with the data read from the model's folder: the child holds one model plus one batch's activations."""
    t0 = time.monotonic()
    path = Path(payload["model"])
    model = onnx.load(str(path), load_external_data=False)
    act = matmul_inputs(model)
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for a in sorted(set(act.values()) - have):
        model.graph.output.append(onnx.ValueInfoProto(name=a))
    providers = runtime.select_providers(payload["device"])
    session = runtime.make_session(model.SerializeToString(), providers, int(payload["threads"]),
                                   "model for calibration", observing=True, external_folder=path.parent)
    del model
    batches = _load_batches(Path(payload["feeds"]))
    ran = [0]

    def done() -> None:
        ran[0] += 1
        emit(ran[0] / len(batches))

    moments, samples = moments_over(session, act, ((b.feed, b.count) for b in batches), done)
    np.savez(payload["out"], **moments)  # type: ignore[arg-type]
    return {"samples": samples, "layers": len(moments), "seconds": round(time.monotonic() - t0, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def validate_in_turn(payload: dict[str, Any], emit: Any) -> dict[str, Any]:
    """In a child process: the original model on the evaluation samples (outputs recorded, latency timed),
    released; then the quantized model, compared with the recording. Returns the accuracy, the latency and
    this process's peak memory in each phase."""
    t0 = time.monotonic()
    batches = _load_batches(Path(payload["feeds"]))
    with np.load(payload["latency_feed"], allow_pickle=False) as z:
        lat_feed = {k: z[k] for k in z.files}
    providers = runtime.select_providers(payload["device"])
    threads = int(payload["threads"])
    session = runtime.make_session(Path(payload["original"]), providers, threads, "model")
    out_names = [o.name for o in session.get_outputs()]
    recorded: list[list[np.ndarray]] = []
    kept: list[Batch] = []
    held = 0
    for b in batches:
        outs = runtime.run(session, b.feed, "original model")
        recorded.append([np.asarray(o) for o in outs])
        kept.append(b)
        held += sum(o.nbytes for o in recorded[-1])
        emit(0.4 * len(kept) / len(batches))
        if held >= MAX_REFERENCE_BYTES:
            break
    o_ms = _timed(session, lat_feed, int(payload["latency_runs"]))
    del session
    gc.collect()
    original_peak = peak_rss_mb()
    session = runtime.make_session(Path(payload["quantized"]), providers, threads, "quantized model")
    acc = compare(_Replay(recorded), session, iter(kept), out_names, sum(b.count for b in kept),
                  progress=lambda f: emit(0.4 + 0.5 * f), roles=payload["roles"])
    q_ms = _timed(session, lat_feed, len(o_ms))
    provider = session.get_providers()[0]
    del session
    warnings = list(acc.warnings)
    if len(kept) < len(batches):
        warnings.append(f"validated on {sum(b.count for b in kept)} of {payload['samples']} evaluation samples: "
                        f"the original model's outputs on them filled the {MAX_REFERENCE_BYTES >> 20} MB kept "
                        "for the comparison")
    return {
        "samples": acc.samples, "outputs": acc.outputs, "labels": acc.labels, "warnings": warnings,
        "latency": speedup_interval(o_ms, q_ms), "provider": provider,
        "original_peak_rss_mb": round(original_peak, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "seconds": round(time.monotonic() - t0, 3),
    }


def _report(cfg: QuantizeConfig, opts: RecipeOptions, info: ModelInfo, data: RunData, res: StreamResult,
            checked: dict[str, Any], lat_batch: int, model_sha: str, warnings: list[str]) -> dict[str, Any]:
    lat = checked["latency"]
    o50, q50 = lat["original_ms_p50"], lat["quantized_ms_p50"]
    speedup = o50 / q50 if q50 > 0 else None
    if speedup is not None and speedup < 1.0:
        warnings.append(
            f"the quantized model is slower than the original here ({q50:.3f} ms vs {o50:.3f} ms at batch "
            f"{lat_batch}); speed-ups from low precision depend on the CPU's kernels and the model's size"
        )
    original = onnx.load(str(cfg.model_path), load_external_data=False)
    bpw = res.bits_per_weight
    return {
        "report_version": REPORT_VERSION,
        "job_id": cfg.job_id,
        "recipe": cfg.recipe,
        "options": opts.to_dict(cfg.recipe),
        "size": {
            "original_bytes": res.original_bytes,
            "quantized_bytes": res.quantized_bytes,
            "ratio": round(res.quantized_bytes / res.original_bytes, 6),
            "bits_per_weight": round(bpw, 4) if bpw else None,
            "quantized_weight_bytes": res.weight_bytes_quantized,
            "fp32_weight_bytes": res.weight_bytes_fp32,
        },
        "accuracy": {
            "samples": checked["samples"],
            "source": data.split.source,
            "overlap": data.overlap.to_dict() if data.overlap is not None else None,
            "part": data.split.part_report(),
            "outputs": checked["outputs"],
            "labels": checked["labels"],
            "baselines": None,
        },
        "latency": {
            "provider": checked["provider"],
            "batch_size": lat_batch,
            "threads": cfg.threads,
            "original_ms_p50": round(o50, 6),
            "quantized_ms_p50": round(q50, 6),
            "speedup": round(speedup, 4) if speedup is not None else None,
            "speedup_ci": lat["speedup_ci"],
            "speedup_measurable": lat["measurable"],
            "runs": lat["runs"],
            "order": "in_turn",
        },
        "layers": layer_rows(original, res, cfg.recipe),
        "calibration": None,
        "warnings": warnings,
        "environment": environment(),
        "model": {
            "inputs": [i.to_dict() for i in info.inputs],
            "outputs": [o.to_dict() for o in info.outputs],
            "opset": info.opset,
            "original_sha256": model_sha,
            "quantized_sha256": "",
            "preprocessing": ["weights streamed from external data, one tensor at a time"],
            "source_format": "onnx",
            "export": None,
        },
        "external_data": {
            "files": [MODEL_NAME, DATA_NAME],
            "original_data_bytes": info.external_bytes,
            "int8_layers": res.int8_layers,
            "embedding_layers": res.embedding_layers,
            "quantize_seconds": round(res.seconds, 3),
            "quantize_peak_rss_mb": round(res.peak_rss_mb, 1),
            "validation_seconds": checked["seconds"],
            "validation_original_peak_rss_mb": checked["original_peak_rss_mb"],
            "validation_peak_rss_mb": checked["peak_rss_mb"],
        },
    }
