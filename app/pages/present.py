"""Presentation of a report: number formatting, the headline accuracy figure, summary cards and the verdict.

Pure functions of the report (``GET /api/v1/jobs/{id}/report``, read through the typed model with
``Report.from_stored``), so the page and the API can never disagree. Figures a report does not have (older
engines, auto jobs with nothing measured) degrade to "n/a".
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from jinja2 import Undefined

from worker.engine.config import RecipeOptions
from worker.engine.labels import candidate_name, recipe_label
from worker.engine.report import (
    Accuracy,
    AccuracyTargetSpec,
    AdaRound,
    BiasCorrection,
    Calibration,
    Candidate,
    CandidateConfig,
    Equalization,
    FourBitWeights,
    IndexMath,
    LabelAccuracy,
    Latency,
    Layer,
    OutputAccuracy,
    PassedOver,
    Report,
    Residual16,
    SmoothQuant,
    TargetCheck,
    is_slower,
)

MINUS = "\u2212"
NA = "n/a"
STAGES = ("preparing", "calibrating", "quantizing", "validating", "reporting")
STATUS_WORDS = {
    "queued": "Queued",
    "running": "Running",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "cancelled": "Cancelled",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def is_number(x: Any) -> TypeGuard[int | float]:
    """A value the number formatters can format: a report missing a key (None, or a template's Undefined) is
    shown as n/a instead of failing the page."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fmt_bytes(n: int | None) -> str:
    """Bytes in SI units with one decimal: 59906 -> '59.9 kB'."""
    if not is_number(n):
        return NA
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_ms(ms: float | None) -> str:
    """Milliseconds with three significant digits: '0.0404 ms', '12.3 ms', '1234 ms'."""
    if not is_number(ms):
        return NA
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3g} ms"


def fmt_factor(x: float) -> str:
    """A multiplier: 2.62 -> '2.6×'."""
    return f"{x:.1f}\u00d7"


def fmt_signed(x: float, digits: int = 1) -> str:
    """A signed number with a real minus sign, and '±' for a change that rounds to zero."""
    text = f"{abs(x):.{digits}f}"
    if float(text) == 0:
        return f"\u00b1{text}"
    return f"{MINUS if x < 0 else '+'}{text}"


def fmt_pct(fraction: float | None) -> str:
    """A fraction as a percentage: 0.905 -> '90.5 %'."""
    return NA if fraction is None else f"{fraction * 100:.1f} %"


def fmt_db(db: float | None) -> str:
    return NA if db is None else f"{db:.1f} dB"


def fmt_time(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_raw(value: Any) -> str:
    """A report value shown exactly as the JSON has it (numbers unrounded); None (or a key the report lacks) as
    an em dash."""
    if value is None or isinstance(value, Undefined):
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def fmt_shape(shape: list[Any] | tuple[Any, ...] | None) -> str:
    """A tensor shape: ['batch', 3, 32, 32] -> '[batch, 3, 32, 32]'."""
    return "[" + ", ".join(str(d) for d in shape or ()) + "]"


def clean_message(text: str | None) -> str:
    """An error message for display: terminal colour codes and control characters removed."""
    return _CONTROL.sub("", _ANSI.sub("", text or "")).strip()


def size_phrase(ratio: float | None) -> str:
    """'2.6× smaller' (or larger) from quantized/original."""
    if not ratio:
        return "size not measured"
    if ratio <= 1:
        return f"{fmt_factor(1 / ratio)} smaller"
    return f"{fmt_factor(ratio)} larger"


def speed_phrase(speedup: float | None, measurable: bool | None = None) -> str:
    """'2.1× faster' or '1.4× slower' from original/quantized latency; 'no measurable speed-up' when the
    speed-up's interval holds 1.0 (``latency.speedup_measurable`` false), since a factor then claims too much."""
    if not speedup:
        return "latency not measured"
    if measurable is False:
        return "no measurable speed-up"
    if speedup >= 1:
        return f"{fmt_factor(speedup)} faster"
    return f"{fmt_factor(1 / speedup)} slower"


ELLIPSIS = "\u2026"


def interval(ci: Any) -> tuple[float, float] | None:
    """A report's ``*_ci`` value as (low, high); None for a missing, null or malformed one (older reports)."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(x) for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def fmt_interval(ci: Any, fmt: Any) -> str:
    """'(lo … hi)' with each end through ``fmt``; '' when there is no interval."""
    lo_hi = interval(ci)
    return "" if lo_hi is None else f"({fmt(lo_hi[0])} {ELLIPSIS} {fmt(lo_hi[1])})"


def _digits(value: float, ci: tuple[float, float] | None, least: int) -> int:
    """Decimals enough that the value and its interval's ends do not all print alike (cosines near 1)."""
    if ci is None:
        return least
    for d in range(least, 8):
        if len({f"{x:.{d}f}" for x in (ci[0], value, ci[1])}) == 3 or ci[0] == ci[1]:
            return d
    return 8


def fmt_fraction_ci(value: Any, ci: Any, least: int = 4) -> str:
    """A cosine-like fraction's interval: '(0.9921 … 0.9957)', more decimals where four would print alike."""
    lo_hi = interval(ci)
    if lo_hi is None:
        return ""
    d = _digits(float(value), lo_hi, least) if is_number(value) else least
    return fmt_interval(lo_hi, lambda x: f"{x:.{d}f}")


def fmt_pct_ci(ci: Any) -> str:
    """A share's interval in percent: '(96.9 … 100.0 %)'."""
    text = fmt_interval(ci, lambda x: f"{x * 100:.1f}")
    return text[:-1] + " %)" if text else ""


def fmt_end(x: float, digits: int = 1) -> str:
    """An interval's end or a bound in prose: signed like :func:`fmt_signed`, but zero is plain '0.0' (an end
    of exactly zero is a value, not a change that rounds away)."""
    text = fmt_signed(x, digits)
    return text[1:] if text.startswith("\u00b1") else text


def fmt_points_ci(ci: Any) -> str:
    """A change's interval in percentage points, signed: '(−3.1 … −0.2)', '(−4.7 … 0.0)'."""
    return fmt_interval(ci, lambda x: fmt_end(x * 100))


def factor_interval(ci: tuple[float, float]) -> str:
    """A speed factor's interval with one decimal, or two where an end would print as 1.0 (a measured
    1.02× must not read as 'no change')."""
    digits = 2 if any(f"{x:.1f}" == "1.0" for x in ci) else 1
    return fmt_interval(ci, lambda x: f"{x:.{digits}f}")


def speed_text(lat: Latency | None, runs: bool = True) -> str:
    """The speed-up with its interval and how it was measured: '1.7× faster (1.5 … 1.9), 30 interleaved runs',
    '1.4× slower (1.3 … 1.5), …', or 'no measurable speed-up (0.93 … 1.08), …'. Older reports: the factor alone."""
    if lat is None:
        return speed_phrase(None)
    speedup = lat.speedup
    measurable = lat.speedup_measurable
    text = speed_phrase(speedup if is_number(speedup) else None, measurable)
    ci = interval(lat.speedup_ci)
    if ci is not None and is_number(speedup) and speedup > 0:
        if measurable is False:
            text += " " + fmt_interval(ci, lambda x: f"{x:.2f}")
        elif speedup >= 1:
            text += " " + factor_interval(ci)
        elif ci[0] > 0:  # a slow-down's interval, as slow-down factors (the interval's ends swap)
            text += " " + factor_interval((1 / ci[1], 1 / ci[0]))
    count = lat.runs
    if runs and is_number(count) and count > 0 and is_number(speedup):
        order = "interleaved " if lat.order == "interleaved" else ""
        text += f", {count} {order}run{'' if count == 1 else 's'}"
    return text


@dataclass(frozen=True)
class Headline:
    """The one accuracy figure a reader looks at first, before and after quantization."""

    key: str  # 'labels' | 'top1_agreement' | 'multilabel_f1' | 'cosine'
    metric: str
    before: str
    after: str
    delta: str
    phrase: str  # as it appears in the verdict line
    note: str
    after_ci: str = ""  # the 95% interval of ``after``, '(96.9 … 100.0 %)'; '' when the report has none
    delta_ci: str = ""  # the 95% interval of ``delta``, '(−3.1 … −0.2)'


def _top1(o: OutputAccuracy) -> float:
    return o.top1_agreement if o.top1_agreement is not None else 1.0


def _cosine(o: OutputAccuracy) -> float:
    return o.cosine


def accuracy_headline(report: Report) -> Headline | None:
    """Label accuracy when labels were given, else top-1 agreement, else multi-label F1, else cosine similarity
    (worst output)."""
    acc = report.accuracy
    if acc is None:
        return None
    outputs, samples, labels = acc.outputs, acc.samples, acc.labels
    if labels:
        delta = fmt_signed(labels.delta * 100)
        return Headline("labels", "Label accuracy", fmt_pct(labels.original), fmt_pct(labels.quantized),
                        f"{delta} pt", f"{delta} pt label accuracy",
                        f"top-1 against the given labels, {labels.samples} samples",
                        fmt_pct_ci(labels.quantized_ci), fmt_points_ci(labels.delta_ci))
    several = f" (worst of {len(outputs)} outputs)" if len(outputs) > 1 else ""
    top1 = [o for o in outputs if is_number(o.top1_agreement)]
    if top1:
        w = min(top1, key=_top1)
        worst, ci = _top1(w), interval(w.top1_agreement_ci)
        return Headline("top1_agreement", "Top-1 agreement", "100.0 %", fmt_pct(worst),
                        f"{fmt_signed((worst - 1) * 100)} pt", f"{fmt_pct(worst)} top-1 agreement",
                        f"same top class as the original model{several}, {samples} samples",
                        fmt_pct_ci(ci), fmt_points_ci(None if ci is None else (ci[0] - 1, ci[1] - 1)))
    multi = [o for o in outputs if is_number(o.multilabel_f1)]
    if multi:
        w = min(multi, key=lambda o: float(o.multilabel_f1 or 0.0))
        worst, ci = float(w.multilabel_f1 or 0.0), interval(w.multilabel_f1_ci)
        return Headline("multilabel_f1", "Multi-label F1", "100.0 %", fmt_pct(worst),
                        f"{fmt_signed((worst - 1) * 100)} pt", f"{fmt_pct(worst)} multi-label F1",
                        f"the same scores at 0.5 or above as the original model's{several}, {samples} samples",
                        fmt_pct_ci(ci), fmt_points_ci(None if ci is None else (ci[0] - 1, ci[1] - 1)))
    cosines = [o for o in outputs if is_number(o.cosine)]
    if cosines:
        w = min(cosines, key=_cosine)
        worst = w.cosine
        return Headline("cosine", "Cosine similarity", "1.00000", f"{worst:.5f}", fmt_signed(worst - 1, 5),
                        f"cosine {worst:.5f}", f"outputs compared with the original's{several}, {samples} samples",
                        fmt_fraction_ci(worst, w.cosine_ci))
    return None


ROLE_WORDS = {"classification": "classification", "multilabel": "multi-label", "embedding": "embedding",
              "detection": "detection",
              "regression": "regression", "other": "other"}


@dataclass(frozen=True)
class OutputRow:
    """What the accuracy table shows beside an output's exact figures: its role and the intervals."""

    role: str  # '' for reports from before roles
    role_source: str  # 'declared' | 'inferred' | ''
    role_reason: str
    cosine_ci: str
    sqnr: str  # '' (the exact figure stands), '∞ (identical)', or why it is undefined
    sqnr_ci: str
    top1_ci: str
    extra: list[str]  # sequence, CTC and neighbour agreement, each with its interval


def _share_text(label: str, value: Any, ci: Any) -> str:
    return f"{label} {fmt_pct(value)}" + (f" {fmt_pct_ci(ci)}" if interval(ci) else "")


def output_rows(outputs: list[OutputAccuracy]) -> list[OutputRow]:
    """One row per output of ``accuracy.outputs``; figures an older report lacks give empty cells."""
    rows = []
    for o in outputs:
        sqnr = ""
        if o.identical is True:
            sqnr = "\u221e (identical)"
        elif o.sqnr_db is None and o.sqnr_note:
            sqnr = str(o.sqnr_note)
        extra = []
        for label, value, ci in (("whole sequence", o.sequence_agreement, o.sequence_agreement_ci),
                                 ("CTC-decoded", o.ctc_sequence_agreement, o.ctc_sequence_agreement_ci)):
            if is_number(value):
                extra.append(_share_text(label, value, ci))
        if is_number(o.multilabel_f1):
            extra.append(f"multi-label F1 {fmt_pct(o.multilabel_f1)}"
                         + (f" {fmt_pct_ci(o.multilabel_f1_ci)}" if interval(o.multilabel_f1_ci) else ""))
        if is_number(o.neighbour_agreement):
            among = o.neighbour_samples
            extra.append(_share_text("nearest neighbour", o.neighbour_agreement, o.neighbour_agreement_ci)
                         + (f" among {among} samples" if is_number(among) else ""))
        role = str(o.role or "")
        rows.append(OutputRow(
            role=ROLE_WORDS.get(role, role),
            role_source=str(o.role_source or ""),
            role_reason=str(o.role_reason or ""),
            cosine_ci=fmt_fraction_ci(o.cosine, o.cosine_ci),
            sqnr=sqnr,
            sqnr_ci=fmt_interval(o.sqnr_db_ci, lambda x: f"{x:.1f}"),
            top1_ci=fmt_pct_ci(o.top1_agreement_ci),
            extra=extra,
        ))
    return rows


def label_intervals(labels: LabelAccuracy | None) -> dict[str, str]:
    """The label-accuracy figures' intervals: original and quantized in percent, the change in points."""
    if labels is None:
        return {"original": "", "quantized": "", "delta": ""}
    return {"original": fmt_pct_ci(labels.original_ci), "quantized": fmt_pct_ci(labels.quantized_ci),
            "delta": fmt_points_ci(labels.delta_ci)}


def overlap_text(accuracy: Accuracy | None) -> str:
    """Evaluation samples that were also calibrated on, in words; '' when none were (or nobody checked)."""
    ov = accuracy.overlap if accuracy else None
    if ov is None:
        return ""
    if ov.identical_to_calibration:
        return ("The evaluation set is the calibration set: every figure was measured on the samples the ranges "
                "were fitted to, so they are optimistic.")
    shared, total = ov.shared_with_calibration, ov.evaluation_samples
    if is_number(shared) and shared > 0:
        of = f" of the {total}" if is_number(total) else ""
        return (f"{shared}{of} evaluation samples also occur in the calibration set: the figures on them are "
                "optimistic.")
    return ""


def target_bound_text(target: TargetCheck | None) -> str:
    """How a confident target was decided: 'decided by the 95% interval's lower end, 0.8781'."""
    conf = target.confidence if target else None
    if target is None or not is_number(conf):
        return ""
    level = f"{conf * 100:g}%"
    bound = target.bound
    if not is_number(bound):
        return f"needs the {level} interval, which could not be computed (too few samples)"
    return f"decided by the {level} interval's lower end, {bound:.6g}, not the measured value"


def target_text(target: AccuracyTargetSpec) -> str:
    """'label_accuracy drop ≤ 0.05' or 'cosine ≥ 0.99'."""
    metric = str(target.metric)
    if target.min is not None:
        return f"{metric} \u2265 {target.min}"
    if target.max_drop is not None:
        return f"{metric} drop \u2264 {target.max_drop}"
    return metric


def target_verdict(target: TargetCheck | None) -> tuple[str, str] | None:
    """(word, tone) for a job's accuracy target: ('met', 'good'), ('not met', 'bad') or ('not measurable', ...)."""
    if not target:
        return None
    met = target.met
    if met is True:
        return "met", "good"
    if met is False:
        return "not met", "bad"
    return "could not be measured", "warn"


def verdict(report: Report) -> str:
    """One line to decide on: '2.6× smaller, 1.4× slower, ±0.0 pt label accuracy; meets the target …'."""
    lat = report.latency
    parts = [
        size_phrase(report.size.ratio if report.size else None),
        speed_phrase(lat.speedup if lat else None, lat.speedup_measurable if lat else None),
    ]
    head = accuracy_headline(report)
    if head:
        parts.append(head.phrase)
    line = ", ".join(parts)
    target = report.accuracy_target
    tv = target_verdict(target)
    if target and tv:
        word = {"met": "meets", "not met": "misses"}.get(tv[0])
        line += f"; {word} the accuracy target ({target_text(target)})" if word else \
            f"; the accuracy target ({target_text(target)}) could not be measured"
    return line


def verdict_tone(report: Report) -> str:
    """'bad' when the accuracy target was missed; 'warn' when the model got larger or slower or the target could
    not be measured; else 'good'."""
    tv = target_verdict(report.accuracy_target)
    if tv and tv[1] != "good":
        return tv[1]
    ratio = report.size.ratio if report.size else None
    lat = report.latency
    speedup = lat.speedup if lat else None
    # A slow-down inside timing noise (its interval holds 1.0) is no reason to warn.
    slower = lat is not None and speedup is not None and speedup < 1 and lat.speedup_measurable is not False
    if (ratio is not None and ratio > 1) or slower:
        return "warn"
    return "good"


SOURCES = {
    "eval_set": "the evaluation set",
    "calibration_holdout": "a held-out share of the calibration data, never used to calibrate",
    "calibration_set": "the calibration data (this recipe does not calibrate, so nothing was held out)",
    "synthetic": "synthetic inputs, since no data was given: they say little about accuracy on real data",
}


def source_text(source: str | None) -> str:
    """Where the accuracy was measured, in words."""
    return SOURCES.get(source or "", str(source))


# What to do next, by error code, for a failed job (the message says what happened).
FAILURE_HINTS = {
    "model_run_failed": "The model could not run on the given data. Check that every array has the shape and "
    "dtype the model computes with (symbolic axes accept any size, the layers behind them may not), and that "
    "the model runs in ONNX Runtime on a few samples.",
    "model_not_runnable": "ONNX Runtime cannot load this model. Check it with "
    "onnxruntime.InferenceSession('model.onnx') and re-export it if that fails.",
    "quantization_failed": "Excluding the node the message names (option nodes_to_exclude, API only) or the "
    "int8_dynamic recipe may get past this.",
    "not_enough_samples": "Upload more samples, or choose a smaller batch size.",
    "broker_unavailable": "The job queue could not be reached when the job was submitted. Submit it again.",
    "already_quantized": "The model is quantized already. Upload the float model it was made from and quantize "
    "that.",
    "model_missing": "The model's file is gone from the server's storage. Upload it again.",
    "internal_error": "This is a lowbit problem, not your model's; please report it with the message above.",
    "accuracy_target_not_met": "No candidate met the accuracy target; the report below shows every candidate and "
    "the closest one. Loosen the target, allow more layers in float (option max_fallback_steps) or a longer "
    "time budget, or download the closest configuration and decide yourself.",
    "accuracy_target_required": "The auto recipe needs an accuracy target: give a metric and a minimum or an "
    "allowed drop.",
    "out_of_memory": "The job hit the server's memory limit for one job. A smaller batch size or fewer samples "
    "lower it; a model that asks for huge tensors needs a server with a higher LOWBIT_JOB_MEMORY_LIMIT_MB.",
    "cpu_time_exceeded": "The job used up its CPU time. Fewer calibration samples or latency runs shorten it; a "
    "model that loops for a very long time will not finish at all.",
    "job_timeout": "The job ran past the server's time limit for one job. Fewer calibration samples or latency "
    "runs shorten it.",
    "engine_crashed": "The process quantizing the model died. Check that the model runs in ONNX Runtime on a "
    "few samples; if it does, submit the job again (the server may have run short of memory).",
    "worker_lost": "The workers running this job stopped several times (restarts or crashes). Submit it again; "
    "if it keeps happening, the model may need more memory than the workers have.",
}


def failure_hint(code: str | None) -> str:
    """One sentence on what to do about a failed job's error code."""
    return FAILURE_HINTS.get(code or "", "Fix what the message names, then submit the job again.")


def layers_worst_first(layers: list[Layer]) -> list[Layer]:
    """Layers by SQNR, lowest first; layers without a measurement last."""
    return sorted(layers, key=lambda layer: (layer.sqnr_db is None, layer.sqnr_db or 0.0))


CALIBRATION_LABELS = {
    "method": "Method",
    "calibrator": "Calibrator",
    "samples": "Samples",
    "seconds": "Time (s)",
    "tensors": "Tensors calibrated",
    "passes": "Passes over the data",
    "percentile": "Percentile",
    "symmetric_activations": "Symmetric activations",
    "cache_used": "Statistics from cache",
}


def calibration_rows(section: Calibration | None) -> list[tuple[str, str, Any]]:
    """(label, key, value) for every calibration detail the report has, known keys first, new keys too."""
    if section is None:
        return []
    # The section is open (each calibrator records its own details): its keys as stored, typed ones included.
    calibration = section.model_dump(exclude_unset=True)
    if not calibration:
        return []
    rows = [(label, k, calibration[k]) for k, label in CALIBRATION_LABELS.items() if k in calibration]
    rows += [(k.replace("_", " ").capitalize(), k, v) for k, v in calibration.items()
             if k not in CALIBRATION_LABELS and not isinstance(v, (dict, list))]
    return rows


def smoothquant_lines(section: SmoothQuant | None) -> list[str]:
    """int8_static's SmoothQuant in one or two lines: whether it ran and why, then what it did."""
    if section is None:
        return []
    head = (f"{'On' if section.enabled else 'Off'} ({section.mode}, alpha {section.alpha:g}): {section.reason}.")
    if not section.enabled or not section.matmuls_smoothed:
        return [head]
    what = (f"{section.matmuls_smoothed} MatMul/Gemm smoothed over {section.groups} input(s): {section.folded} folded "
            f"into their producer, {section.muls_inserted} Mul inserted")
    if section.largest_spread_before is not None and section.largest_spread_after is not None:
        what += (f"; largest channel spread {section.largest_spread_before:.3g}x \u2192 "
                 f"{section.largest_spread_after:.3g}x the median channel")
    if section.check is not None:
        check = section.check
        what += (f"; smoothed float model vs the prepared one: max relative error {check.max_relative_error:.2g}, "
                 f"cosine {check.min_cosine:.7f}")
    return [head, what + "."]


def equalization_line(section: Equalization | None) -> str:
    """int8_static's cross-layer equalization in one line: on or off and why, then what it did."""
    if section is None:
        return ""
    line = f"{'On' if section.enabled else 'Off'} ({section.mode}): {section.reason}."
    if section.enabled and section.pairs:
        line += f" {section.pairs} conv pair(s) rescaled"
        if section.range_spread_before is not None and section.range_spread_after is not None:
            line += (f"; per-channel weight range spread {section.range_spread_before:.3g}x \u2192 "
                     f"{section.range_spread_after:.3g}x")
        if section.check is not None:
            line += (f"; equalized float model vs the prepared one: max relative error "
                     f"{section.check.max_relative_error:.2g}")
        line += "."
    if section.pairs_skipped:
        line += f" {section.pairs_skipped} pair(s) skipped (an activation between them is not ReLU-like)."
    return line


def bias_correction_line(section: BiasCorrection | None) -> str:
    """int8_static's bias correction in one line: on or off and why, then what it moved."""
    if section is None:
        return ""
    line = f"{'On' if section.enabled else 'Off'} ({section.mode}): {section.reason}."
    if section.enabled and section.layers_corrected:
        line += f" {section.layers_corrected} layer bias(es) corrected"
        if section.mean_abs_correction is not None:
            line += f", mean |correction| {section.mean_abs_correction:.3g}"
        line += "."
    return line


def adaround_line(section: AdaRound | None) -> str:
    """int8_static's learned rounding in one line (empty when the option is off): on or off and why, then what it
    changed."""
    if section is None:
        return ""
    line = f"{'On' if section.enabled else 'Off'} ({section.mode}): {section.reason}."
    if section.layers_learned:
        line += (f" {section.layers_kept or 0} of {section.layers_learned} layer(s) kept a learned rounding, "
                 f"{section.weights_rounded_other_way or 0:,} of {section.weights or 0:,} weights rounded the other "
                 f"way than to the nearest level, on {section.samples} calibration samples in {section.seconds} s")
        if section.budget_exhausted:
            line += f" (the {section.budget_seconds:g} s budget ran out: later layers got fewer steps)"
        line += "."
    return line


def four_bit_weights_line(section: FourBitWeights | None) -> str:
    """int8_static's option four_bit_weights in one line: how many layers' weights are 4-bit, which stayed 8-bit
    and why, what it saved and what bias correction did."""
    if section is None:
        return ""
    line = (f"{section.layers_4bit} layer(s) with 4-bit weights (INT4, a Cast to int8 folded at load: the same int8 "
            f"kernels), {section.weight_bytes_int8:,} -> {section.weight_bytes_after:,} weight bytes")
    if section.layers_8bit:
        kept = ", ".join(section.layers_8bit[:5]) + (", ..." if len(section.layers_8bit) > 5 else "")
        line += (f"; {len(section.layers_8bit)} kept in 8 bits, those whose 4-bit weights alone cost the output most "
                 f"on {section.samples} calibration samples: {kept}")
    if section.bias_corrected:
        line += (f"; {section.bias_corrected} bias(es) corrected for the mean shift of the 4-bit weights "
                 f"({section.mean_samples} calibration samples)")
    if section.opset_converted_from is not None:
        line += f"; the model was converted from opset {section.opset_converted_from} to 21"
    return line + "."


def index_math_line(section: IndexMath | None) -> str:
    """int8_static's option float_index_math in one line: how many nodes it kept in float, and a few names."""
    if section is None:
        return ""
    if not section.nodes:
        return f"None found: {section.reason}."
    names = ", ".join(section.examples[:5]) + (", ..." if section.nodes > 5 else "")
    head = f"{section.nodes} node(s) kept in float" if section.enabled else f"Off: {section.nodes} node(s) quantized"
    return (f"{head} ({section.shape_nodes} computing from shapes and constants, {section.decision_nodes} feeding a "
            f"rounding, comparison, cast or shape/index input): {names}.")


def residual_16bit_line(section: Residual16 | None) -> str:
    """int8_static's option residual_16bit in one line: on or off and why, then what it widened."""
    if section is None:
        return ""
    line = f"{'On' if section.enabled else 'Off'} ({section.mode}): {section.reason}."
    if section.enabled and section.tensors_16bit:
        line += (f" {section.tensors_16bit} activation(s) in 16 bits, {section.softmax_in_float or 0} Softmax kept "
                 "in float (weights stay int8).")
    return line


def config_json(recipe: str, options: dict[str, Any], target: dict[str, Any] | None) -> str:
    """The job's configuration as the JSON a client would submit again."""
    body: dict[str, Any] = {"recipe": recipe, "options": options}
    if target:
        body["accuracy_target"] = {k: v for k, v in target.items() if k not in ("value", "met")}
    return json.dumps(body, indent=2, sort_keys=False)


def cli_command(recipe: str, options: dict[str, Any], model_name: str, calib_name: str | None,
                eval_name: str | None) -> str:
    """The offline ``lowbit quantize`` command that runs the same recipe with the same options."""
    defaults = RecipeOptions().to_dict(recipe)
    argv = ["lowbit", "quantize", model_name]
    if calib_name:
        argv += ["--calib", calib_name]
    if eval_name:
        argv += ["--eval", eval_name]
    argv += ["--recipe", recipe]
    # In the recipe's own option order, not the stored one (PostgreSQL's JSONB orders keys its own way).
    order = {k: i for i, k in enumerate(defaults)}
    for key, value in sorted(options.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        if key in defaults and defaults[key] == value:
            continue
        if key == "method":
            argv += ["--method", str(value)]
        else:
            argv += ["--option", f"{key}={json.dumps(value)}"]
    stem = model_name.rsplit(".", 1)[0] or "model"
    argv += ["-o", f"{stem}.{recipe}.onnx", "--report", "report.json"]
    return " ".join(shlex.quote(a) for a in argv)


def list_summary(report: Report | None) -> tuple[str, str]:
    """(size, accuracy) cells of the job list for a finished job: '0.381 (2.6× smaller)', '±0.0 pt label acc.'."""
    if not report:
        return "", ""
    ratio = report.size.ratio if report.size else None
    size = f"{ratio:.3f} ({size_phrase(ratio)})" if ratio else NA
    head = accuracy_headline(report)
    return size, head.phrase if head else NA


def sensitivity_db(sensitivity: float | None) -> float | None:
    """A layer's sensitivity (output noise-to-signal ratio with only that layer quantized) as the outputs' SQNR
    in dB: 0.001 -> 30.0. None for no measurement or an exact result."""
    if sensitivity is None or sensitivity <= 0:
        return None
    return round(-10.0 * math.log10(sensitivity), 2)


@dataclass(frozen=True)
class CandidateRow:
    label: str
    recipe: str
    options: str
    excluded: list[str]
    a16: list[str]  # activation tensors in 16 bits (auto's A16W8 steps)
    status: str
    size: str
    size_bytes: int | None
    metric: str
    latency: str
    speedup: str  # '2.1× faster', '4.3× slower'
    speedup_value: float | None  # fp32 p50 / this candidate's p50
    slower: bool  # slower than fp32 beyond the search's noise tolerance
    met: str  # 'met' | 'missed' | 'skipped' | 'failed'
    chosen: bool
    worker: str
    note: str


def candidate_brief(c: PassedOver) -> str:
    """'int8_dynamic + 1 layer in float, 1.8 MB, 4.3× slower': a candidate in one line."""
    speedup = candidate_speedup(c)
    return (candidate_name(c.recipe, c.options, c.excluded_nodes, c.activations_16bit, c.blocks)
            + f", {fmt_bytes(c.size_bytes)}, " + (speed_phrase(speedup) if speedup else "speed not measured"))


def candidate_speedup(c: Candidate | PassedOver) -> float | None:
    """A candidate row's speed-up over the fp32 model (reports before it was recorded: from its two p50s)."""
    if is_number(c.speedup):
        return float(c.speedup)
    if not isinstance(c, Candidate):
        return None
    fp32, own = c.fp32_latency_ms_p50, c.latency_ms_p50
    return round(fp32 / own, 4) if is_number(fp32) and is_number(own) and own else None


def candidate_key(c: CandidateConfig) -> tuple[Any, ...]:
    """What tells candidates apart on the page: recipe, calibration method, SmoothQuant's strength when searched,
    the layers kept in float, the activations given 16 bits (auto's A16W8 steps), the blocks kept in float and
    learned rounding (auto's adaround step), int8 activations, 4-bit embedding tables, 4-bit weights of an int8
    model and the layers kept in 8 bits (a 4-bit branch's hybrid, what it quantizes and its 8-bit steps)."""
    alpha = c.options.get("smoothquant_alpha") if c.options.get("smoothquant") == "on" else None
    return (c.recipe, c.options.get("method"), alpha, tuple(c.excluded_nodes), tuple(c.activations_16bit),
            tuple(c.blocks), c.options.get("adaround") == "on", bool(c.options.get("int8_activations")),
            bool(c.options.get("quantize_embeddings")), bool(c.options.get("four_bit_weights")),
            int(c.options.get("int8_most_sensitive") or 0))


def _candidate_row(c: Candidate, chosen: CandidateConfig | None, tolerance: float) -> CandidateRow:
    opts = {k: v for k, v in c.options.items() if k not in ("nodes_to_exclude", "activations_16bit")}
    met = c.status if c.status in ("skipped", "failed") else ("met" if c.met_target else "missed")
    metric = c.metric
    speedup = candidate_speedup(c)
    return CandidateRow(
        label=recipe_label(c.recipe, opts),
        recipe=c.recipe,
        options=json.dumps(opts, sort_keys=True) if opts else "",
        excluded=[str(n) for n in c.excluded_nodes],
        a16=[str(n) for n in c.activations_16bit],
        status=c.status,
        size=fmt_bytes(c.size_bytes),
        size_bytes=c.size_bytes,
        metric=f"{metric:.6g}" if is_number(metric) else NA,
        latency=fmt_ms(c.latency_ms_p50),
        speedup=speed_phrase(speedup) if speedup else NA,
        speedup_value=speedup,
        slower=is_slower(speedup, c.speedup_ci, tolerance),
        met=met,
        chosen=chosen is not None and candidate_key(c) == candidate_key(chosen),
        worker=str(c.worker or ""),
        note=clean_message(c.error.message if c.error else None),
    )


def candidate_rows(report: Report) -> list[CandidateRow]:
    """The auto report's candidates as table rows, smallest first, the chosen one marked."""
    # The search's own tolerance for calling a candidate slower (a report without one: any speed-up below 1).
    tolerance = report.auto.speed_tolerance if report.auto else 0.0
    rows = [_candidate_row(c, report.chosen, tolerance) for c in report.candidates or []]
    return sorted(rows, key=lambda r: (r.size_bytes is None, r.size_bytes or 0))


def chosen_config_json(report: Report) -> str:
    """The chosen candidate as the config file ``lowbit quantize --config`` reads (recipe and options)."""
    chosen = report.chosen or report.best
    return json.dumps({"recipe": chosen.recipe if chosen else None, "options": chosen.options if chosen else {}},
                      indent=2)
