"""int8_static: QDQ int8, per-channel int8 weights, uint8 activations with ranges from calibration."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.engine.errors import EngineError
from worker.engine.recipes import options as o
from worker.engine.recipes.base import FormField, Recipe, RecipeContext, RecipeOutput

if TYPE_CHECKING:  # annotations only: the registry stays light (no onnx or ONNX Runtime at import)
    import onnx

    from worker.engine.calibrate import CalibrationResult, SidePass
    from worker.engine.config import RecipeOptions

OPTIONS = (*o.COMMON, o.METHOD, o.CALIBRATOR, o.PER_CHANNEL, o.SYMMETRIC_ACTIVATIONS, o.FLOAT_INDEX_MATH, o.PERCENTILE,
           o.REDUCE_RANGE,
           o.MAX_CALIBRATION_SAMPLES, o.OP_TYPES_TO_QUANTIZE, o.LAYER_SENSITIVITY, o.SMOOTHQUANT, o.SMOOTHQUANT_ALPHA,
           o.EQUALIZE, o.BIAS_CORRECTION, o.ADAROUND, o.ADAROUND_SECONDS, o.RESIDUAL_16BIT,
           o.ACTIVATIONS_16BIT, o.FOUR_BIT_WEIGHTS,
           o.INT8_MOST_SENSITIVE.with_(requires="four_bit_weights", help="with four_bit_weights: also keep in 8 bits "
                                       "the N layers whose weights lose most in 4 bits (each layer alone in 4 bits, "
                                       "output SQNR against the int8 model on the first calibration samples)"))


def quantize(ctx: RecipeContext) -> RecipeOutput:
    """Calibrate activation ranges (lowbit's streaming calibrator or ONNX Runtime's), then write QDQ int8."""
    # lazy: keeps the registry light (the API and `lowbit --help` import it); this loads ONNX Runtime
    from worker.engine.smoothquant import smooth_static

    # SmoothQuant first: the ranges are calibrated on the smoothed model, which the rest of the step reads.
    smoothed_ctx, smoothing = smooth_static(ctx)
    out = _quantize_from(smoothed_ctx, smoothing.section, smoothing.path)
    if smoothing.path is not None and ctx.opts.smoothquant == "auto":
        out = _keep_smoothing_if_better(ctx, out)
    out = _residual_stream(ctx, out)
    if not ctx.opts.four_bit_weights:
        return out  # the 4-bit module is not even imported (a small model's job is held to a peak, issue #14)
    # lazy: as above
    from worker.engine.four_bit_weights import store_four_bit

    return store_four_bit(ctx, out)


# "auto" compares the model with and without residual_16bit on this many calibration samples (a transformer's
# samples are cheap to run, but the comparison adds a quantization and runs of both int8 models).
RESIDUAL_COMPARE_SAMPLES = 16
# "auto" tries the 16-bit residual stream only where the int8 model's output SQNR on those samples is below this:
# an int8 transformer that already keeps its outputs (cosine about 0.998 at 25 dB) is left as it is, without the
# quantization and memory the try costs (all-MiniLM-L6-v2, whose int8 model collapses: -1.1 dB).
RESIDUAL_TRY_BELOW_DB = 25.0


def _residual_stream(ctx: RecipeContext, out: RecipeOutput) -> RecipeOutput:
    """Option residual_16bit: the same model quantized again with the residual stream's tensors in 16 bits and
    the Softmax nodes in float (same calibrated ranges), kept with "on", and with "auto" where the output SQNR
    against the float model on the first calibration samples rises by MIN_GAIN_DB, consistently over them
    (conv_refine.Gain.keeps)."""
    # lazy: as in quantize (onnx too: the registry imports this module)
    import onnx

    from worker.engine.calibrate import write_ort_ranges
    from worker.engine.conv_refine import Reference, gain, keep_reason, run_all, score_outputs
    from worker.engine.files import place
    from worker.engine.ort_quant import quantize_static, warn_forced, weight_params
    from worker.engine.residual16 import residual_stream

    opts = ctx.opts
    section: dict[str, Any] = {"mode": opts.residual_16bit}
    if opts.residual_16bit == "off":
        section.update(enabled=False, reason="option residual_16bit is off")
        return dataclasses.replace(out, residual_16bit=section)
    float_path = out.float_model or ctx.norm_path
    float_model = ctx.normalized if float_path == ctx.norm_path else onnx.load(str(float_path))
    found = residual_stream(float_model, opts.op_types_to_quantize)
    del float_model
    section.update(layernorms=found.layernorms, residual_adds=found.residual_adds)
    if not found.tensors:
        section.update(enabled=False, reason="no transformer block (a LayerNorm and a residual Add of two "
                                             "activations) in the graph")
        return dataclasses.replace(out, residual_16bit=section)
    changed = [name for name, s in (("equalization", out.equalization), ("bias correction", out.bias_correction),
                                    ("learned rounding", out.adaround)) if s and s.get("enabled")]
    if changed:
        section.update(enabled=False, reason=f"not tried: {' and '.join(changed)} changed the int8 model, which "
                                             "quantizing it again would undo")
        return dataclasses.replace(out, residual_16bit=section)
    ref = Reference(ctx, RESIDUAL_COMPARE_SAMPLES)
    scored = score_outputs(ref.outputs, run_all(ctx.quant_path, ref.feeds(), ctx, "int8 model"), ref.counts)
    without = scored.sqnr_db
    if opts.residual_16bit == "auto" and without is not None and without >= RESIDUAL_TRY_BELOW_DB:
        section.update(enabled=False, compare={"samples": sum(ref.counts), "sqnr_db_without": _r3(without),
                                               "sqnr_db_with": None},
                       reason=f"auto: not tried, the int8 model's output SQNR on the calibration samples is "
                              f"{without:.2f} dB, at least {RESIDUAL_TRY_BELOW_DB:g}")
        return dataclasses.replace(out, residual_16bit=section)
    wide_opts = dataclasses.replace(
        opts, activations_16bit=tuple(dict.fromkeys((*opts.activations_16bit, *found.tensors))),
        nodes_to_exclude=tuple(dict.fromkeys((*opts.nodes_to_exclude, *found.softmax_nodes))))
    assert out.static_ranges is not None
    ranges_path = ctx.work / "residual16-ranges.json"
    write_ort_ranges(out.static_ranges, ranges_path)
    dest = ctx.work / "quantized-residual16.onnx"
    warnings: list[str] = []
    section.update(tensors_16bit=len(found.tensors), softmax_in_float=len(found.softmax_nodes))
    try:
        # The same float model's weights, quantized as in the int8 model (the check above made sure no refinement
        # changed them): their parameters are taken from it, not computed again.
        warn_forced(quantize_static(float_path, dest, ranges_path, wide_opts, out.nonfinite_tensors,
                                    weights=weight_params(ctx.quant_path)), warnings)
        wide = None if opts.residual_16bit == "on" else score_outputs(
            ref.outputs, run_all(dest, ref.feeds(), ctx, "int8 model with 16-bit residuals"), ref.counts)
    except EngineError as exc:
        if opts.residual_16bit == "on":
            raise
        # auto tries it where it may help: a try that fails leaves the int8 model as it is, and says why.
        section.update(enabled=False, reason=f"auto: the model with 16-bit residuals could not be made or run "
                                             f"({exc.code}: {exc.message[:300]}); the int8 model is kept")
        return dataclasses.replace(out, residual_16bit=section)
    if opts.residual_16bit == "on":
        section.update(enabled=True, reason="option residual_16bit is on")
    else:
        assert wide is not None
        g = gain(scored, wide)
        section["compare"] = g.compare(sum(ref.counts))
        section.update(enabled=g.keeps, reason=keep_reason(g))
        if not g.keeps:
            return dataclasses.replace(out, residual_16bit=section)
    place(dest, ctx.quant_path)
    ctx.warnings.extend(warnings)
    calibration = dict(out.calibration or {})
    calibration["activations_16bit"] = len(wide_opts.activations_16bit)
    return dataclasses.replace(out, residual_16bit=section, calibration=calibration)


def _keep_smoothing_if_better(ctx: RecipeContext, smoothed: RecipeOutput) -> RecipeOutput:
    """"auto" smoothing, chosen by the spread of the MatMul inputs, kept only where the int8 model it gives is
    better: on openWakeWord's mel spectrogram (a power spectrum into the mel filterbank, 89x spread) smoothing
    moved that range into the filterbank's columns, whose small weights then rounded to zero (cosine 0.90 -> 0).
    Both int8 models are compared on the calibration samples equalization's "auto" uses, against the prepared
    float model: smoothing stays when it raises the output SQNR by MIN_GAIN_DB, consistently over the samples
    (conv_refine.Gain.keeps)."""
    # lazy: as in quantize
    from worker.engine.conv_refine import COMPARE_SAMPLES, MIN_GAIN_DB, Reference, gain, run_all, score_outputs
    from worker.engine.files import place

    ref = Reference(ctx, COMPARE_SAMPLES)
    smooth = score_outputs(ref.outputs, run_all(ctx.quant_path, ref.feeds(), ctx, "smoothed int8 model"), ref.counts)
    with_db = smooth.sqnr_db
    plain_dir = ctx.work / "unsmoothed"
    plain_dir.mkdir(parents=True, exist_ok=True)
    plain_ctx = dataclasses.replace(ctx, quant_path=plain_dir / "quantized.onnx", work=plain_dir, warnings=[])
    off = {"enabled": False, "reason": "option smoothquant is off"}
    plain = _quantize_from(plain_ctx, off, None)
    unsmooth = score_outputs(ref.outputs, run_all(plain_ctx.quant_path, ref.feeds(), ctx, "int8 model"), ref.counts)
    without_db = unsmooth.sqnr_db
    assert smoothed.smoothquant is not None
    section = dict(smoothed.smoothquant)
    g = gain(unsmooth, smooth)
    section["int8_sqnr_db"] = {"smoothed": _r3(with_db), "unsmoothed": _r3(without_db), "samples": sum(ref.counts),
                               **g.per_sample_fields()}
    if with_db is not None and (without_db is None or g.keeps):
        return dataclasses.replace(smoothed, smoothquant=section)
    section["enabled"] = False
    section["reason"] = (f"auto: smoothing did not raise the int8 model's output SQNR on {sum(ref.counts)} "
                         f"calibration samples by {MIN_GAIN_DB} dB, consistently over them ({g.text()}), so the "
                         "unsmoothed model is kept")
    place(plain_ctx.quant_path, ctx.quant_path)
    ctx.warnings.extend(plain_ctx.warnings)
    return dataclasses.replace(plain, smoothquant=section)


def _r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _quantize_from(ctx: RecipeContext, smoothquant: dict[str, Any], smoothed_path: Path | None) -> RecipeOutput:
    """Calibrate and quantize ``ctx``'s model (the smoothed one when SmoothQuant ran), then equalization and bias
    correction."""
    # lazy: as in quantize
    from worker.engine.calibrate import write_ort_ranges
    from worker.engine.conv_refine import refine, side_pass
    from worker.engine.ort_quant import a16_tensors, quantize_static, refuse_subgraphs_only, warn_forced

    opts, split, step, warnings = ctx.opts, ctx.split, ctx.step, ctx.warnings
    normalized, work = ctx.normalized, ctx.work
    assert ctx.data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    tensors = _observed(ctx)
    if not tensors:
        refuse_subgraphs_only(normalized, opts)
    # Unknown activations_16bit names are refused before the calibration pass, not after it.
    wide = a16_tensors(normalized, opts.activations_16bit, opts.op_types_to_quantize)
    c0, c1 = split.calib_range
    # Bias correction's input means and the refinements' float outputs, computed in the calibration's own runs.
    side = side_pass(ctx) if opts.method == "minmax" and opts.calibrator == "lowbit" else None
    cal = _calibrate(ctx, tensors, side)
    if cal.samples == 0:
        raise EngineError("not_enough_samples", "no calibration batch could be formed from the dataset")
    if cal.nonfinite_tensors:
        warnings.append(
            f"{len(cal.nonfinite_tensors)} activation(s) held infinity or NaN on the calibration data and stay "
            f"in float (no int8 range can hold them): {', '.join(cal.nonfinite_tensors[:5])}"
        )
    if c1 - c0 > cal.samples and not cal.cache_used:
        warnings.append(
            f"{c1 - c0 - cal.samples} calibration sample(s) did not fill a whole batch and were skipped"
        )
    calibration = {
        "method": cal.method,
        "calibrator": cal.calibrator,
        "cache_used": cal.cache_used,
        "samples": cal.samples,
        "seconds": round(cal.seconds, 3),
        "tensors": cal.tensors,
        "observed_tensors": cal.observed,
        "passes": cal.passes,
        "percentile": opts.percentile if cal.method == "percentile" else None,
        "symmetric_activations": opts.symmetric_activations,
    }
    if wide:
        calibration["activations_16bit"] = len(wide)  # tensors with 16-bit QDQ (only when asked: reports unchanged)
    ranges_path = work / "ranges.json"
    write_ort_ranges(cal.ranges, ranges_path)
    step("quantizing", 0.0)
    warn_forced(quantize_static(ctx.norm_path, ctx.quant_path, ranges_path, opts, cal.nonfinite_tensors), warnings)
    # Cross-layer equalization and bias correction (options equalize, bias_correction): may replace the artifact
    # with one quantized from an equalized copy of the model, whose ranges and float model the layers stage reads.
    refined = refine(ctx, cal.ranges, _recalibrate, side, None if cal.nonfinite_tensors else cal.stats)
    return RecipeOutput(calibration=calibration, static_ranges=refined.ranges or cal.ranges,
                        nonfinite_tensors=list(cal.nonfinite_tensors),
                        smoothquant=smoothquant, float_model=refined.float_path or smoothed_path,
                        equalization=refined.equalization, bias_correction=refined.bias_correction,
                        adaround=refined.adaround, index_math=index_math_section(normalized, opts))


# Node names the report lists, at most.
INDEX_MATH_EXAMPLES = 10


def index_math_section(model: onnx.ModelProto, opts: RecipeOptions) -> dict[str, Any]:
    """The report's index_math section: what option float_index_math keeps (or, off, would keep) in float."""
    # lazy, as in quantize
    from worker.engine.index_math import find

    found = find(model)
    nodes = found.nodes
    section: dict[str, Any] = {
        "enabled": opts.float_index_math,
        "nodes": len(nodes),
        "shape_nodes": len(found.shape_nodes),
        "decision_nodes": len(found.decision_nodes),
        "examples": list(nodes[:INDEX_MATH_EXAMPLES]),
    }
    if not opts.float_index_math:
        section["reason"] = "option float_index_math is off: these nodes were quantized like the rest"
    elif not nodes:
        section["reason"] = "no node computes shapes, indices or the inputs of a rounding, comparison or cast"
    else:
        section["reason"] = ("kept in float: they compute shapes, indices or coordinates, or the inputs of a "
                             "rounding, comparison or cast to integers, which 8 bits would move")
    return section


def _recalibrate(ctx: RecipeContext, known: dict[str, tuple[float, float]] | None = None,
                 known_samples: int = 0) -> CalibrationResult:
    """The ranges of a rewritten model's tensors (cross-layer equalization's), calibrated as ``quantize`` does;
    ``known``: min/max already measured for them (see calibrate.calibrate)."""
    return _calibrate(ctx, _observed(ctx), known=known, known_samples=known_samples)


def _observed(ctx: RecipeContext) -> list[str]:
    """The tensors calibration observes: those of the nodes the quantizer may quantize, less those that only
    the index math kept in float reads or writes (no range of theirs would be used: the detector's 291 tensors
    are 58, basic-pitch's 238 are 145)."""
    # lazy, as in quantize
    from worker.engine.calibrate import select_tensors
    from worker.engine.ort_quant import index_math_nodes

    return select_tensors(ctx.normalized, ctx.opts.op_types_to_quantize or None,
                          index_math_nodes(ctx.normalized, ctx.opts))


def _calibrate(ctx: RecipeContext, tensors: list[str], side: SidePass | None = None,
               known: dict[str, tuple[float, float]] | None = None, known_samples: int = 0) -> CalibrationResult:
    """The activation ranges of ``tensors`` on the calibration samples, by the calibrator the options name
    (lowbit's through the statistics cache when the run has one); ``side`` is filled where its pass runs."""
    # lazy, as in quantize: the registry stays light (files adds importlib.metadata to `lowbit --help`)
    from worker.engine.calibrate import CalibrationSettings, StatsCache, calibrate, calibrate_with_ort
    from worker.engine.feeds import batch_source, fixed_batch
    from worker.engine.files import sha256_file

    cfg, opts, info, split, step = ctx.cfg, ctx.opts, ctx.info, ctx.split, ctx.step
    assert ctx.data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    c0, c1 = split.calib_range
    reader, plan = ctx.data.calib_reader, split.calib_plan
    calib_batches = batch_source(reader, info.inputs, plan, c0, c1)
    step("calibrating", 0.0)
    settings = CalibrationSettings(opts.method, opts.percentile, opts.symmetric_activations)
    if opts.calibrator == "ort":
        # ONNX Runtime's histogram collectors stack batches into one array, so every batch must
        # have the same size: feed one sample at a time unless the model fixes its batch size.
        ort_plan = plan if fixed_batch(plan, info.inputs) else dataclasses.replace(plan, samples_per_run=1)
        ort_source = batch_source(reader, info.inputs, ort_plan, c0, c1)
        return calibrate_with_ort(ctx.norm_path, ort_source, settings, ctx.providers, ctx.work / "ort-calibration",
                                  opts.op_types_to_quantize or None)
    assert cfg.calibration_path is not None
    cache_key = {
        "model_sha256": ctx.model_sha,
        "data_sha256": sha256_file(cfg.calibration_path),
        "samples": [c0, c1],
        "per_run": plan.samples_per_run,
        "modes": plan.modes,
        "onnxruntime": ctx.env["onnxruntime"],
        "lowbit": ctx.env["lowbit"],
    }
    return calibrate(
        ctx.norm_path,
        tensors,
        calib_batches,
        settings,
        ctx.providers,
        cfg.threads,
        progress=lambda f: step("calibrating", f),
        total_samples=c1 - c0,
        cache=StatsCache(cfg.cache_dir) if cfg.cache_dir else None,
        cache_key=cache_key,
        excluded_nodes=opts.nodes_to_exclude,
        op_types=opts.op_types_to_quantize or None,
        model=ctx.normalized,
        side=side,
        known=known,
        known_samples=known_samples,
    )


RECIPE = Recipe(
    name="int8_static",
    label="int8_static (calibrated)",
    help="QDQ int8: per-channel int8 weights, uint8 activations with ranges from calibration",
    options=OPTIONS,
    calibration="required",
    quantize=quantize,
    file_tag="int8",
    per_channel_needs_opset13=True,
    requires_note="(it keeps the layers that lose most in 4 bits in 8 bits)",
    # In the order the form always set them (the job records its options in this order).
    form_fields=(FormField("per_channel", "per_channel"), FormField("method", "method"),
                 FormField("batch_size", "batch_size")),
)
