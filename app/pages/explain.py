"""'How to read this report': a few paragraphs for an ML engineer who is not a quantization specialist, built
from one job's report so that every sentence carries that job's numbers (method, samples, intervals, roles).

Pure functions of the typed report, like :mod:`app.pages.present`; a figure an older report lacks (None once
``Report.from_stored`` read it) drops the sentence that needs it instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.pages.present import (
    fmt_end,
    fmt_pct,
    fmt_pct_ci,
    fmt_signed,
    interval,
    is_number,
    overlap_text,
    source_text,
    speed_text,
)
from worker.engine.report import OutputAccuracy, Report


@dataclass(frozen=True)
class Point:
    key: str  # the paragraph's data-field suffix: calibration, recipe, figures, trust-N, intervals, int4, ...
    title: str
    text: str


METHOD_WORDS = {
    "minmax": "the range from the smallest to the largest value seen, so a single outlier widens it and coarsens "
    "every step",
    "entropy": "the range whose clipped histogram keeps the most information (smallest KL divergence), so rare "
    "outliers are clipped instead of widening the range",
    "percentile": "the range holding {percentile} % of the values seen, clipping the rest",
    "mse": "the range with the smallest squared error, rounding and clipping together",
}
INT4_WORDS = {
    "rtn": "rounds each weight to the nearest of 16 levels of its block of {block} weights, from the weights alone",
    "hqq": "fits each block's scale and zero point to the weights alone (half-quadratic optimisation), without data",
    "clip_search": "used {samples} calibration samples to choose, block by block, how far to clip the weights so "
    "that each layer's output on real inputs changes least",
    "gptq": "used {samples} calibration samples to round the weights a column at a time, correcting the columns "
    "not yet rounded for the error on real inputs so far",
}


def _num(x: Any, fmt: str = "g") -> str:
    return format(x, fmt) if is_number(x) else "?"


def effective(report: Report) -> tuple[str, dict[str, Any]]:
    """The recipe and options that made this model: an auto job's chosen candidate, else the job's own."""
    recipe = str(report.recipe or "")
    if recipe == "auto":
        chosen = report.chosen
        return (str(chosen.recipe or recipe), chosen.options) if chosen else (recipe, {})
    return recipe, report.options


def _calibration(report: Report) -> dict[str, Any]:
    """The calibration section as stored: it is open (each calibrator records its own details), so the
    sentences below read its keys, typed or not, alike."""
    return report.calibration.model_dump(exclude_unset=True) if report.calibration else {}


def int4_algorithm(report: Report) -> str | None:
    """The int4 algorithm that ran: the calibration section names it; without one the options do, and a
    recipe given no algorithm and no calibration data rounds to nearest (the engine's default)."""
    recipe, options = effective(report)
    if recipe != "int4_weight_only":
        return None
    cal = _calibration(report)
    return str(cal.get("algorithm") or options.get("algorithm") or ("rtn" if not cal else "clip_search"))


def calibration_point(report: Report) -> Point | None:
    recipe, options = effective(report)
    cal = _calibration(report)
    samples, seconds = cal.get("samples"), cal.get("seconds")
    took = f" ({_num(seconds)} s)" if is_number(seconds) else ""
    what = ("Calibration runs the original model on sample inputs and records the range of values each activation "
            "takes; int8 then spreads its 256 levels over that range. Too wide a range wastes levels, too narrow "
            "clips values.")
    if recipe == "int8_static" and cal:
        method = str(cal.get("method") or "?")
        words = METHOD_WORDS.get(method, "").format(percentile=_num(cal.get("percentile") or options.get("percentile")))
        tensors = f" {cal['tensors']} tensors" if is_number(cal.get("tensors")) else ""
        text = (f"{what} This job calibrated{tensors} with the {method} method on {_num(samples)} samples{took}"
                + (f": {words}." if words else "."))
        return Point("calibration", "Calibration", text)
    if recipe == "int8_dynamic":
        return Point("calibration", "Calibration", "This job did not calibrate: int8_dynamic stores int8 weights "
                     "and measures each activation's range at run time, on every input, so no range is fitted in "
                     "advance (the measuring costs some speed).")
    if recipe == "int4_weight_only":
        algorithm = int4_algorithm(report) or "?"
        block = options.get("block_size")
        words = INT4_WORDS.get(algorithm, "").format(block=_num(block), samples=_num(samples))
        calibrated = algorithm in ("clip_search", "gptq")
        head = "Calibration" if calibrated else "No calibration"
        text = (f"{head}: int4_weight_only stores the weights in 4 bits and computes in float; algorithm "
                f"{algorithm} {words or 'chose the 4-bit weights'}{took if calibrated else ''}.")
        if cal.get("int8_elsewhere"):
            text += " The other layers' activations were calibrated for int8 as well."
        return Point("calibration", "Calibration", text)
    if recipe == "fp16":
        text = ("No calibration is needed: float16 keeps about three significant digits over a wide range, so "
                "weights and activations are converted as they are.")
        if cal:
            kept = cal.get("float32_nodes")
            text += (f" This job still ran {_num(samples)} samples through the model to find values too large for "
                     f"float16" + (f"; {kept} node(s) stay in float32." if is_number(kept) else "."))
        return Point("calibration", "Calibration", text)
    if recipe == "qat_int8":
        training = report.training
        steps, took_s = (training.steps, training.seconds) if training else (None, None)
        text = what + (f" This job calibrated with the {cal.get('method', '?')} method on {_num(samples)} samples"
                       if cal else "")
        if is_number(steps):
            text += (f"{'; then' if cal else ' Then'} {steps} training steps"
                     f"{' (' + _num(took_s) + ' s)' if is_number(took_s) else ''} "
                     "adjusted the weights and ranges together.")
        elif cal:
            text += "."
        return Point("calibration", "Calibration", text)
    return None


def recipe_point(report: Report) -> Point | None:
    recipe, _ = effective(report)
    if not recipe:
        return None
    if recipe == "qat_int8":
        steps = report.training.steps if report.training else None
        return Point("recipe", "PTQ or QAT", (
            "This job used quantization-aware training (QAT): the model was fine-tuned"
            + (f" for {steps} steps" if is_number(steps) else "")
            + " with the int8 rounding simulated in its forward pass, so the weights learned to live with it. "
            "Post-training quantization (PTQ, every other recipe) only converts the trained weights; the "
            "\u201cwhat training bought\u201d table below compares the two on the same samples."))
    return Point("recipe", "PTQ or QAT", (
        f"This job used post-training quantization (PTQ, recipe {recipe}): the trained weights were converted as "
        "they are, with no further training. If the figures below lose too much, quantization-aware training "
        "(recipe qat_int8, for .pt2 models) fine-tunes the model with the rounding simulated so that the weights "
        "adapt to it, at the cost of a training run."))


def _rms_error_pct(sqnr_db: float) -> str:
    """SQNR as the error's size relative to the output's: 30 dB -> '3.2 %' (root-mean-square amplitudes)."""
    return f"{100 * 10 ** (-sqnr_db / 20):.2g} %"


def _sqnr(o: OutputAccuracy) -> float:
    return o.sqnr_db if o.sqnr_db is not None else 0.0


def figures_point(report: Report) -> Point | None:
    acc = report.accuracy
    if acc is None or not acc.outputs:
        return None
    outputs = acc.outputs
    cos = [o for o in outputs if is_number(o.cosine)]
    sq = [o for o in outputs if is_number(o.sqnr_db)]
    parts = [f"Every figure compares the quantized model's outputs with the original's on the same "
             f"{_num(acc.samples)} samples, from {source_text(acc.source)}."]
    if cos:
        w = min(cos, key=lambda o: o.cosine)
        parts.append(f"Cosine similarity says how closely an output points the same way, ignoring scale: 1 is the "
                     f"same direction; the worst here is {w.cosine:.5f} ({w.name}).")
    if sq:
        w = min(sq, key=_sqnr)
        parts.append(f"SQNR is the output's power over the error's, in dB: every 10 dB is ten times less error "
                     f"power. The worst here, {_sqnr(w):.1f} dB ({w.name}), means an error about "
                     f"{_rms_error_pct(_sqnr(w))} of the output's size.")
    same = [o.name for o in outputs if o.identical is True]
    if same:
        parts.append(f"{', '.join(str(n) for n in same)}: bit-identical to the original, so SQNR is infinite.")
    return Point("figures", "What the figures measure", " ".join(parts))


def _role_words(o: OutputAccuracy) -> str:
    role, source, reason = o.role, o.role_source, o.role_reason
    if not role:
        return ""
    how = "declared in the job's options" if source == "declared" else ("inferred" + (f": {reason}" if reason else ""))
    article = "an" if str(role)[:1] in "aeiou" else "a"
    return f" is {article} {role} output ({how})"


def trust_point(report: Report, index: int, o: OutputAccuracy) -> Point:
    """Which figure to trust for one output, by its role, with this job's value and interval."""
    labels = report.accuracy.labels if report.accuracy else None
    name = str(o.name)
    head = f"Output {name}{_role_words(o)}"
    role = o.role
    if is_number(o.ctc_sequence_agreement) or is_number(o.sequence_agreement):
        bits = []
        if is_number(o.ctc_sequence_agreement):
            bits.append(f"CTC-decoded sequence agreement, {fmt_pct(o.ctc_sequence_agreement)} "
                        f"{fmt_pct_ci(o.ctc_sequence_agreement_ci)}".rstrip()
                        + " (the decoded text or label string, repeats and blanks removed, is unchanged)")
        if is_number(o.sequence_agreement):
            bits.append(f"whole-sequence agreement, {fmt_pct(o.sequence_agreement)} "
                        f"{fmt_pct_ci(o.sequence_agreement_ci)}".rstrip()
                        + " (every step's top class is unchanged, which is stricter)")
        return Point(f"trust-{index}", "Which figure to trust", f"{head}: trust " + "; then ".join(bits) + ".")
    if role == "classification" and labels and labels.output in (None, name) and is_number(
            labels.original) and is_number(labels.quantized) and is_number(labels.delta):
        ci = interval(labels.delta_ci)
        change = f"{fmt_signed(labels.delta * 100)} pt"
        if ci is not None:
            change += f", between {fmt_end(ci[0] * 100)} and {fmt_end(ci[1] * 100)} pt"
        return Point(f"trust-{index}", "Which figure to trust", (
            f"{head}: trust label accuracy, the share of samples whose top class is the right label: "
            f"{fmt_pct(labels.original)} before, {fmt_pct(labels.quantized)} after ({change}). Top-1 "
            "agreement and cosine only say how much the outputs moved, not whether the answers got worse."))
    if role == "classification" and is_number(o.top1_agreement):
        shown = fmt_pct_ci(o.top1_agreement_ci)
        return Point(f"trust-{index}", "Which figure to trust", (
            f"{head}: trust top-1 agreement, the share of samples whose top class is the same as the original "
            f"model's: {fmt_pct(o.top1_agreement)}{' ' + shown if shown else ''}. It does not say whether either "
            "answer was right; an evaluation set with labels adds label accuracy."))
    if role == "multilabel" and is_number(o.multilabel_f1):
        shown = fmt_pct_ci(o.multilabel_f1_ci)
        return Point(f"trust-{index}", "Which figure to trust", (
            f"{head}: trust multi-label F1, how far the quantized model's yes elements (scores of 0.5 or above) "
            f"are the original's: {fmt_pct(o.multilabel_f1)}{' ' + shown if shown else ''}. Each score is its own "
            "yes/no (notes sounding in a frame, tags of an image), so there is no single top class to agree on."))
    if role == "embedding" and is_number(o.neighbour_agreement):
        shown = fmt_pct_ci(o.neighbour_agreement_ci)
        among = o.neighbour_samples
        cos = f", and cosine {o.cosine:.5f}" if is_number(o.cosine) else ""
        return Point(f"trust-{index}", "Which figure to trust", (
            f"{head}: trust nearest-neighbour agreement, the share of samples whose closest other sample is the "
            f"same among the quantized embeddings as among the original ones: {fmt_pct(o.neighbour_agreement)}"
            f"{' ' + shown if shown else ''}{f' among {among} samples' if is_number(among) else ''}{cos}. Search and "
            "clustering depend on who is close to whom, which this measures directly."))
    if o.identical is True:
        return Point(f"trust-{index}", "Which figure to trust",
                     f"{head}: bit-identical to the original's on every sample, so nothing was lost.")
    figure = f"SQNR {o.sqnr_db:.1f} dB and cosine" if o.sqnr_db is not None else "cosine"
    cos = f" {o.cosine:.5f}" if is_number(o.cosine) else ""
    why = {"embedding": "too few samples to compare neighbours",
           "classification": "no top class was measured for it"}.get(str(role), "it has no classes to agree on")
    return Point(f"trust-{index}", "Which figure to trust",
                 f"{head}: trust {figure}{cos}, since {why}; judge them against how precise this output must be.")


def _rule_of_three(count: int | float, what: str) -> str:
    """What a clean run on ``count`` samples still allows: none seen in n samples bounds the true rate at about
    3/n with 95% confidence (the rule of three)."""
    return (f"With {count} samples, a true rate of {what} up to about {min(100.0, 300 / count):.2g} % could "
            "still go unseen (the rule of three).")


def _worst_first(o: OutputAccuracy) -> float:
    return o.top1_agreement if o.top1_agreement is not None else o.cosine if is_number(o.cosine) else 1.0


def intervals_point(report: Report) -> Point | None:
    acc = report.accuracy
    labels = acc.labels if acc else None
    outputs = acc.outputs if acc else []
    n = (labels.samples if labels else None) or (acc.samples if acc else None)
    parts: list[str] = []
    ci = interval(labels.delta_ci if labels else None)
    if ci is not None and ci[0] == ci[1] == 0 and is_number(n) and n > 0:
        parts.append(f"on these {n} evaluation samples no answer went from right to wrong or back, so the "
                     "label-accuracy change's interval is the single point 0.0: resampling cannot produce a change "
                     f"that never occurred. {_rule_of_three(n, 'changed answers')}")
    elif ci is not None:
        parts.append(f"with {_num(n)} evaluation samples the label-accuracy change is between "
                     f"{fmt_end(ci[0] * 100)} and {fmt_end(ci[1] * 100)} points with 95% confidence.")
        if ci[1] < 0:
            parts.append("The whole interval is below zero: the drop is real, not an accident of which samples "
                         "were picked.")
        elif ci[0] > 0:
            parts.append("The whole interval is above zero: the gain is not an accident of the sample.")
        else:
            parts.append("The interval includes zero: on this many samples the change cannot be told apart from "
                         "chance.")
    else:
        with_ci = [o for o in outputs if interval(o.top1_agreement_ci)] or \
            [o for o in outputs if interval(o.cosine_ci)]
        if with_ci:
            # the worst output's interval: the one a reader should worry about
            o = min(with_ci, key=_worst_first)
            count = o.samples if o.samples is not None else n
            if interval(o.top1_agreement_ci):
                lo, hi = interval(o.top1_agreement_ci) or (0.0, 0.0)
                if lo == hi == 1.0 and is_number(count) and count > 0:
                    parts.append(f"all {count} evaluation samples keep their top class in {o.name}, so its "
                                 "interval is the single point 100 %: resampling cannot produce a disagreement "
                                 f"that never occurred. {_rule_of_three(count, 'disagreements')}")
                else:
                    parts.append(f"with {_num(count)} evaluation samples the top-1 agreement of {o.name} is "
                                 f"between {lo * 100:.1f} % and {hi * 100:.1f} % with 95% confidence.")
            else:
                lo, hi = interval(o.cosine_ci) or (0.0, 0.0)
                parts.append(f"with {_num(count)} evaluation samples the cosine of {o.name} "
                             f"is between {lo:.5f} and {hi:.5f} with 95% confidence.")
    if parts:
        parts.append("More evaluation samples narrow the intervals.")
    lat = report.latency
    if lat is not None and interval(lat.speedup_ci):
        runs = lat.runs
        sentence = (f"The speed-up comes from {_num(runs)} timed runs of each model, interleaved (original, "
                    "quantized, original, ...) so that a machine getting busier slows both alike: "
                    f"{speed_text(lat, runs=False)}.")
        if lat.speedup_measurable is False:
            sentence += (" That interval includes 1.0: on this machine the two models' speeds cannot be told "
                         "apart.")
        parts.append(sentence)
    if not parts:
        return None
    text = ("Figures in brackets are 95% intervals, found by resampling the measured samples (a bootstrap): "
            + parts[0][0].lower() + parts[0][1:] + " " + " ".join(parts[1:]))
    target = report.accuracy_target
    if target is not None and is_number(target.confidence):
        bound = target.bound
        text += (" The accuracy target was checked against the interval's pessimistic end"
                 + (f" ({bound:.6g})" if is_number(bound) else " (none could be computed, so it was not met)")
                 + ", not the measured value.")
    return Point("intervals", "What the ranges in brackets mean", text.strip())


def int4_risk_point(report: Report) -> Point | None:
    algorithm = int4_algorithm(report)
    if algorithm not in ("rtn", "hqq"):
        return None
    source = report.accuracy.source if report.accuracy else None
    text = (f"4-bit without calibration is risky: each weight keeps one of only 16 levels, and {algorithm} chose "
            "them from the weights alone, never seeing the inputs the layers get, so a rounding error that "
            "matters on real data goes unnoticed until the model meets such data.")
    if source == "synthetic":
        text += (" This job's figures come from synthetic inputs, which say little about that; give an evaluation "
                 "set of real samples.")
    text += " Calibration data (algorithm clip_search or gptq) lets the rounding take real inputs into account."
    return Point("int4", "Why 4-bit without calibration is risky", text)


def overlap_point(report: Report) -> Point | None:
    text = overlap_text(report.accuracy)
    if not text:
        return None
    return Point("overlap", "Evaluation shares samples with calibration",
                 text + " The ranges were fitted to those samples, so the model does better on them than it will "
                 "on new data; give an evaluation set of samples the calibration never saw.")


def how_to_read(report: Report) -> list[Point]:
    """The section's paragraphs for this report, in reading order; empty for a report with nothing measured."""
    if not report.accuracy and not report.latency:
        return []
    outputs = report.accuracy.outputs if report.accuracy else []
    points = [calibration_point(report), recipe_point(report), figures_point(report)]
    points += [trust_point(report, i, o) for i, o in enumerate(outputs[:8])]
    points += [intervals_point(report), int4_risk_point(report), overlap_point(report)]
    return [p for p in points if p is not None]

