"""lowbit's own streaming calibrator.

ONNX Runtime's histogram calibrators keep every intermediate activation of every sample in memory
before building histograms, and its entropy calibrator with default settings (128 bins, 128
quantized bins) has a single candidate threshold, so it returns the min/max range. This calibrator
streams the calibration batches once and keeps only per-tensor statistics:

- running min / max of every observed tensor (all ``minmax`` needs: exact, like ONNX Runtime's);
- for the histogram methods, a range-adaptive histogram per tensor: ``NUM_BINS`` equal bins over
  [0, a] for tensors seen non-negative so far, over [-a, a] otherwise, with ``a`` set by the first
  batch. When a batch falls outside the range, the range grows by a power of two and each group
  of old bins merges into one new bin, so one pass suffices and no sample is kept. Data seen before
  a growth is binned more coarsely than data seen after; the bins stay far narrower than an int8
  quantization step (2048 bins against 128-256 levels).

``percentile``, ``entropy`` (KL-divergence threshold search) and ``mse`` (expected squared error of
clipping plus rounding) pick a range from the histogram. Memory is O(tensors x bins), independent of
the number of samples; the model outputs of one batch are the only activations alive at a time, and
very wide models observe their tensors in groups (one pass per group) to bound that too.

Statistics are cached on disk, keyed by model, data, samples and batch layout, so another job on the
same model and data (another method, another exclusion list) does not run the model again. The ranges
are handed to ONNX Runtime's QDQ quantizer, which still rewrites the graph.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from worker.engine import runtime
from worker.engine.errors import EngineError
from worker.engine.files import builtin_hash

# onnxruntime.quantization (~0.3 s and 15 MB on top of onnxruntime) is imported inside the functions that use ONNX
# Runtime's calibrator or op registry: the pipeline imports this module, and a run that needs neither skips it.

NUM_BINS = 2048
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}
# Bound on the bytes of observed activations fetched per model run; more means several passes.
DEFAULT_MAX_BYTES_PER_RUN = 1 << 30
CACHE_VERSION = 4  # 4: histograms from strided subsets (hist_delta)
# Activations handed to TensorStats.update whole with more values than this are histogrammed on an evenly
# strided subset (min/max stay exact): a 2M-value subset pins down thresholds far finer than int8 needs.
HIST_MAX_VALUES = 1 << 21
# In the histogram pass, ONNX Runtime reduces each observed activation to its exact min and max and hands
# back only an evenly strided subset of about this many of its values per batch (see hist_delta): copying
# whole activations into Python and binning every value cost ~20x the min/max pass on a transformer, and
# held a batch's activations at once. 128k values a batch over a few dozen batches still places a 99.99th
# percentile within a bin or two of the full data's (measured: benchmarks/zoo.py, README).
HIST_SUBSET = 1 << 17
# Bound on the observed activations (bytes, from shape inference) of one min/max calibration run: a batch
# whose activations are larger runs in parts (see minmax_samples_per_run). Small, since ONNX Runtime's arena
# keeps what the largest run needed: openWakeWord's mel spectrogram's calibration peaked at 125 MB with 8 MB
# here, 113 MB with 2 MB (benchmarks/stage_peaks.py), where ONNX Runtime's whole quantize_static peaks at
# about 113 MB; a model whose samples are larger than this runs one sample a run either way.
MINMAX_BYTES_PER_RUN = 2 << 20

Progress = Callable[[float], None]
Batches = Callable[[], Iterable[tuple[dict[str, np.ndarray], int]]]


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "minmax"
    percentile: float = 99.99
    symmetric: bool = False
    num_bins: int = NUM_BINS
    max_bytes_per_run: int = DEFAULT_MAX_BYTES_PER_RUN


@dataclass
class CalibrationResult:
    method: str
    ranges: dict[str, tuple[float, float]]
    samples: int
    seconds: float
    tensors: int
    passes: int
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    cache_used: bool = False
    calibrator: str = "lowbit"
    nonfinite_tensors: list[str] = field(default_factory=list)
    # Tensors the model ran for; the others' ranges followed from these (see plan_observation).
    observed: int = 0


@dataclass(frozen=True)
class KeptRun:
    """The model's own outputs on one run over the first calibration batches: batch number ``batch`` of the
    calibration source, its rows ``rows`` where the batch ran in parts (else all of it), ``samples`` samples. The
    feed itself is not kept: it is read again from the source (calibrate.kept_feeds), since holding it cost more
    than the outputs (32 of MTCNN's 180x240 detector images: 16.6 MB)."""

    batch: int
    rows: tuple[int, int] | None
    samples: int
    outputs: list[Any]


def kept_feeds(batches: Batches, kept: Sequence[KeptRun]) -> Iterator[dict[str, np.ndarray]]:
    """The feeds of ``kept``'s runs, in order, read again from ``batches`` (the source they were run from)."""
    want: dict[int, list[KeptRun]] = {}
    for k in kept:
        want.setdefault(k.batch, []).append(k)
    last = max(want, default=-1)
    if last < 0:
        return
    for b, (feed, n) in enumerate(batches()):
        for k in want.get(b, []):
            if k.rows is None:
                if n != k.samples:
                    raise RuntimeError(f"calibration batch {b} holds {n} samples, {k.samples} when it was kept")
                yield feed
            else:
                yield {name: v[k.rows[0]:k.rows[1]] for name, v in feed.items()}
        if b >= last:
            return


@dataclass
class SidePass:
    """What the min/max calibration pass computes besides the ranges, in the same runs of the float model (bias
    correction's input means, and the float outputs its comparison needs): each output ``names`` maps to, summed over
    the samples (a run's value times its samples), and the model's own outputs on the first batches that hold
    ``keep_outputs`` samples (KeptRun, in run order). ``done`` is set by the pass that filled it: a cached
    or histogram calibration leaves it unset, and the caller then runs its own pass."""

    delta: onnx.ModelProto  # the nodes computing ``names``' and ``extremes``' outputs, added to the model
    names: dict[str, str]  # key -> the delta's output
    keep_outputs: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    # key -> the delta's (min, max) outputs, whose elementwise min and max over the runs ``mins``/``maxs`` hold
    # (per-channel extremes: equalization's chain tensors, see conv_refine.side_pass)
    extremes: dict[str, tuple[str, str]] = field(default_factory=dict)
    mins: dict[str, np.ndarray] = field(default_factory=dict)
    maxs: dict[str, np.ndarray] = field(default_factory=dict)
    samples: int = 0
    kept: list[KeptRun] = field(default_factory=list)
    seconds: float = 0.0  # the pass's runs, reductions included
    done: bool = False


class TensorStats:
    """Min/max and a range-adaptive histogram of one tensor."""

    __slots__ = ("lo", "hi", "hist", "a", "signed", "bins", "zeros", "nonfinite")

    def __init__(self, bins: int, with_hist: bool) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.bins = bins
        self.hist: np.ndarray | None = np.zeros(bins, dtype=np.int64) if with_hist else None
        self.a = 0.0  # histogram covers [0, a] (unsigned) or [-a, a] (signed)
        self.signed = False
        self.zeros = 0  # values seen while everything was exactly zero (no range to bin them in yet)
        self.nonfinite = False  # held an infinity or NaN at some point (e.g. a -inf attention mask)

    def update(self, x: np.ndarray) -> None:
        """Add a whole activation (min/max exact; a huge one is histogrammed on an evenly strided subset)."""
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.nonfinite = True
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        flat = x.reshape(-1)
        weight = 1
        if self.hist is not None and flat.size > HIST_MAX_VALUES:
            # Evenly strided subset of a huge activation: the histogram only needs its shape.
            weight = -(-flat.size // HIST_MAX_VALUES)
            flat = flat[::weight]
        self._add(flat, lo, hi, weight)

    def update_sampled(self, sub: np.ndarray, lo: float, hi: float, weight: int) -> None:
        """Add an activation known by its exact min and max and an evenly strided subset of its values, every
        ``weight``-th one (what ONNX Runtime hands back in the histogram pass, see ``hist_delta``)."""
        flat = np.asarray(sub).reshape(-1)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.nonfinite = True
            flat = flat[np.isfinite(flat)]
            if flat.size == 0:
                return
            lo, hi = float(flat.min()), float(flat.max())
        if flat.size == 0:
            return
        self._add(flat, float(lo), float(hi), weight)

    def _add(self, flat: np.ndarray, lo: float, hi: float, weight: int) -> None:
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.hist is None:
            return
        need = max(abs(lo), abs(hi))
        if need == 0.0 and self.a == 0.0:
            self.zeros += int(flat.size) * weight  # an all-zero batch fixes no range; bin it once one exists
            return
        if self.a == 0.0:
            self.signed = lo < 0
            self.a = need
        else:
            if lo < 0 and not self.signed:
                self._to_signed(need)
            if need > self.a:
                self._grow(need)
        n = self.bins
        scale = n / (2 * self.a) if self.signed else n / self.a
        # float32 arithmetic on one temporary: about twice as fast as float64 index math.
        t = np.multiply(flat, np.float32(scale), dtype=np.float32)
        if self.signed:
            t += np.float32(n / 2)
        np.clip(t, 0, n - 1, out=t)
        counts = np.bincount(t.astype(np.intp), minlength=n)
        self.hist += counts * weight if weight > 1 else counts
        if self.zeros:
            self.hist[n // 2 if self.signed else 0] += self.zeros
            self.zeros = 0

    def _grow(self, need: float) -> None:
        assert self.hist is not None
        k = 2
        while self.a * k < need:
            k *= 2
        n = self.bins
        new = np.zeros(n, dtype=np.int64)
        if k >= n:
            # The range grew past the whole old histogram's width: all of it now sits in one bin.
            new[n // 2 if self.signed else 0] = self.hist.sum()
        else:
            merged = self.hist.reshape(n // k, k).sum(axis=1)
            if self.signed:
                start = (n - n // k) // 2
                new[start:start + n // k] = merged
            else:
                new[: n // k] = merged
        self.hist, self.a = new, self.a * k

    def _to_signed(self, need: float) -> None:
        # [0, a] with n bins -> [-a', a'] with n bins, a' = m*a/2 so that m old bins make one new bin.
        assert self.hist is not None
        n = self.bins
        m = 2
        while m * self.a / 2 < need:
            m *= 2
        new = np.zeros(n, dtype=np.int64)
        if m >= n:
            new[n // 2] = self.hist.sum()
        else:
            new[n // 2: n // 2 + n // m] = self.hist.reshape(n // m, m).sum(axis=1)
        self.hist, self.a, self.signed = new, self.a * m / 2, True

    def edges(self) -> np.ndarray:
        lo = -self.a if self.signed else 0.0
        return np.linspace(lo, self.a, self.bins + 1)


def quantizable_op_types() -> set[str]:
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def select_tensors(model: onnx.ModelProto, op_types: Iterable[str] | None = None,
                   skip_nodes: Collection[str] = ()) -> list[str]:
    """Float inputs and outputs of the nodes the quantizer may quantize (never initializers); ``skip_nodes``
    (names) are nodes it will not quantize, whose tensors need a range only where another node reads or
    writes them."""
    wanted = set(op_types) if op_types else quantizable_op_types()
    skip = set(skip_nodes)
    vis = {vi.name: vi for vi in model.graph.value_info}
    vis.update({vi.name: vi for vi in model.graph.output})
    vis.update({vi.name: vi for vi in model.graph.input})
    inits = {t.name for t in model.graph.initializer}
    out: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in wanted or (node.name and node.name in skip):
            continue
        for name in itertools.chain(node.input, node.output):
            if not name or name in seen or name in inits or name not in vis:
                continue
            tt = vis[name].type.tensor_type
            if vis[name].type.HasField("tensor_type") and tt.elem_type in FLOAT_TYPES:
                out.append(name)
                seen.add(name)
    return out


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    vis = {vi.name: vi for vi in model.graph.value_info}
    vis.update({vi.name: vi for vi in model.graph.input})
    vis.update({vi.name: vi for vi in model.graph.output})
    return vis


def outputs_delta(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """What to add to the model to expose every observed tensor as a graph output (see ``session_with``)."""
    vis = _value_infos(model)
    present = {o.name for o in model.graph.output}
    delta = onnx.ModelProto()
    for name in tensors:
        if name not in present:
            delta.graph.output.append(vis[name])
    return delta


NONNEGATIVE_OPS = frozenset({"Relu", "Softmax", "Sigmoid"})


def nonnegative_outputs(model: onnx.ModelProto) -> set[str]:
    """Tensors that cannot hold a negative value (outputs of Relu, Softmax, Sigmoid). Their quantization
    range starts at 0 whatever their measured minimum: ONNX Runtime's quantizer widens every activation
    range to include 0."""
    return {n.output[0] for n in model.graph.node if n.op_type in NONNEGATIVE_OPS and n.output}


def minmax_delta(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """What to add to the model for a ReduceMin and a ReduceMax per observed tensor, so that a run returns
    two scalars per tensor instead of whole activations (min/max needs nothing else). A tensor that cannot
    be negative gets only the ReduceMax (its minimum is taken as 0, see ``nonnegative_outputs``): each
    reduction reads the whole activation. Also returns, per tensor, the names of its (min, max) outputs;
    "" for a minimum not computed."""
    vis = _value_infos(model)
    delta = onnx.ModelProto()
    names: dict[str, tuple[str, str]] = {}
    nonneg = nonnegative_outputs(model)
    for i, t in enumerate(tensors):
        elem = vis[t].type.tensor_type.elem_type if t in vis else TensorProto.FLOAT
        pair = ("" if t in nonneg else f"lowbit_calib_min_{i}", f"lowbit_calib_max_{i}")
        for op, out in zip(("ReduceMin", "ReduceMax"), pair, strict=True):
            if not out:
                continue
            delta.graph.node.append(onnx.helper.make_node(op, [t], [out], name=out, keepdims=0))
            delta.graph.output.append(onnx.helper.make_tensor_value_info(out, elem, []))
        names[t] = pair
    return delta, names


def session_with(model_path: Path, delta: onnx.ModelProto, providers: list[str], threads: int,
                 what: str = "model for calibration") -> Any:
    """An ONNX Runtime session on the model at ``model_path`` plus ``delta`` (nodes and outputs to add).

    Built without copying the weights through Python: a serialized protobuf message followed by another
    one parses as their merge (repeated fields appended), so the file's own bytes (copied by the kernel,
    sendfile(2) on Linux) followed by ``delta`` serialized is the augmented model, and ONNX Runtime reads it
    from disk as it would the original. Models are self-contained (no external data), so the copy can live
    anywhere; ONNX Runtime has read it once the session exists."""
    with tempfile.TemporaryDirectory(prefix="lowbit-calib-") as tmp:
        dest = Path(tmp) / "observed.onnx"
        shutil.copyfile(model_path, dest)
        with open(dest, "ab") as f:
            f.write(delta.SerializeToString())
        return runtime.make_session(dest, providers, threads, what, observing=True)


def activation_shapes(model: onnx.ModelProto, feed: dict[str, np.ndarray], tensors: Sequence[str]) -> dict[
        str, tuple[list[int], int] | None]:
    """(shape, bytes per element) of each of ``tensors`` when the model runs on ``feed``, from ONNX shape
    inference with the feed's own shapes (None where inference cannot tell), to plan what a run may fetch
    without running it. The weights are left out of the copy that is inferred (declared as inputs of their
    shape), except small integer ones, which may be shapes that inference needs to read."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = m.graph
    g.node.extend(model.graph.node)
    inits = set()
    for t in model.graph.initializer:
        inits.add(t.name)
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and int(np.prod(t.dims)) <= 64:
            g.initializer.append(t)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name in feed:
            elem = inp.type.tensor_type.elem_type
            g.input.append(onnx.helper.make_tensor_value_info(inp.name, elem, list(np.shape(feed[inp.name]))))
        else:
            g.input.append(inp)
    g.output.extend(onnx.ValueInfoProto(name=o.name) for o in model.graph.output)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # inference refusing an odd model only means no estimate
        return dict.fromkeys(tensors)
    infos = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    out: dict[str, tuple[list[int], int] | None] = {}
    for t in tensors:
        vi = infos.get(t)
        out[t] = None
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            continue
        try:
            item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        out[t] = ([int(d.dim_value) for d in dims], item)
    return out


def activation_bytes(model: onnx.ModelProto, feed: dict[str, np.ndarray], tensors: Sequence[str]) -> dict[
        str, int | None]:
    """Bytes of each of ``tensors`` when the model runs on ``feed`` (None where shape inference cannot tell)."""
    return {t: None if v is None else int(np.prod(v[0], dtype=np.int64)) * v[1]
            for t, v in activation_shapes(model, feed, tensors).items()}


def sized_bytes(model: onnx.ModelProto, feed: dict[str, np.ndarray], tensors: Sequence[str], unknown: int
                ) -> dict[str, int]:
    """activation_bytes with every tensor sized: one inference cannot size (or sizes 0) counts as the largest
    one it can, or ``unknown`` when it can size none."""
    est = activation_bytes(model, feed, tensors)
    known = [v for v in est.values() if v is not None]
    fallback = max(known) if known else unknown
    return {t: est.get(t) or fallback for t in tensors}


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    k = 2
    while k * k <= n:
        if n % k == 0:
            return False
        k += 1
    return True


def subset_step(shape: Sequence[int], limit: int = HIST_SUBSET) -> int:
    """The step of the strided subset of a tensor of ``shape`` (flattened) that keeps about ``limit`` values:
    1 when it has no more, else the smallest prime at least size/limit that divides no dimension after the
    first, so that the subset visits every channel and position alike instead of aliasing with one."""
    size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    need = -(-size // limit)
    if need <= 1:
        return 1
    dims = [int(d) for d in shape[1:] if d > 1]
    p = need
    while not (_is_prime(p) and all(d % p for d in dims)):
        p += 1
    return p


@dataclass(frozen=True)
class HistOutputs:
    """Names in the histogram pass's model for one observed tensor: its min ("" when it cannot be negative
    and is taken as 0), max, strided subset and shape outputs, and the subset's step input."""

    min: str
    max: str
    subset: str
    shape: str
    step: str


# A step for tensors that shape inference could not size, on the first batch only (then set from the real
# shape): large, so that a huge activation is not fetched whole even once.
UNKNOWN_STEP = 1009


def hist_delta(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, dict[str, HistOutputs]]:
    """What to add to the model so that a run returns, per observed tensor, its exact min and max (reduced
    in ONNX Runtime), its shape, and every k-th value of it flattened, k being a graph input fed with each
    batch. Only those cross into Python, whatever the activation's size."""
    vis = _value_infos(model)
    nonneg = nonnegative_outputs(model)
    delta = onnx.ModelProto()
    g = delta.graph
    g.initializer.extend([
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "lowbit_hist_flat"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "lowbit_hist_zero"),
        onnx.numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "lowbit_hist_end"),
    ])
    names: dict[str, HistOutputs] = {}
    for i, t in enumerate(tensors):
        elem = vis[t].type.tensor_type.elem_type if t in vis else TensorProto.FLOAT
        o = HistOutputs("" if t in nonneg else f"lowbit_hist_min_{i}", f"lowbit_hist_max_{i}",
                        f"lowbit_hist_sub_{i}", f"lowbit_hist_shape_{i}", f"lowbit_hist_step_{i}")
        flat = f"lowbit_hist_flat_{i}"
        g.input.append(onnx.helper.make_tensor_value_info(o.step, TensorProto.INT64, [1]))
        if o.min:
            g.node.append(onnx.helper.make_node("ReduceMin", [t], [o.min], name=o.min, keepdims=0))
            g.output.append(onnx.helper.make_tensor_value_info(o.min, elem, []))
        g.node.append(onnx.helper.make_node("ReduceMax", [t], [o.max], name=o.max, keepdims=0))
        g.node.append(onnx.helper.make_node("Reshape", [t, "lowbit_hist_flat"], [flat], name=flat))
        g.node.append(onnx.helper.make_node(
            "Slice", [flat, "lowbit_hist_zero", "lowbit_hist_end", "lowbit_hist_zero", o.step], [o.subset],
            name=o.subset))
        g.node.append(onnx.helper.make_node("Shape", [t], [o.shape], name=o.shape))
        g.output.extend([onnx.helper.make_tensor_value_info(o.max, elem, []),
                         onnx.helper.make_tensor_value_info(o.subset, elem, [None]),
                         onnx.helper.make_tensor_value_info(o.shape, TensorProto.INT64, [None])])
        names[t] = o
    return delta, names


# Ops whose first output holds exactly the values of their first input, rearranged: its range (and its
# histogram) is the input's, so the output need not be observed.
SAME_VALUES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


@dataclass(frozen=True)
class ObservationPlan:
    """Which tensors to run the model for, and how the others get their ranges:
    ``same[t] = s``: t's range is s's; ``fixed[t]``: a range known without running anything."""

    observe: list[str]
    same: dict[str, str]
    fixed: dict[str, tuple[float, float]]


def plan_observation(model: onnx.ModelProto, tensors: Sequence[str], excluded_nodes: Iterable[str] = (),
                     op_types: Iterable[str] | None = None) -> ObservationPlan:
    """Skip tensors whose range ONNX Runtime's quantizer would not use, or that equal another's:

    - the input of a Relu or Clip that is its only consumer: the quantizer replaces its range by the
      Relu's/Clip's output range (``adjust_tensor_ranges``), and even when that node stays in float,
      clipping its input to its own output range changes nothing it computes;
    - the output of a Softmax the quantizer quantizes (listed in ``op_types``, the op types to quantize, and
      not excluded): it fixes that range to [0, 1];
    - the output of a Reshape, Transpose, Squeeze, Unsqueeze, Flatten or Identity of an observed tensor:
      the same values, so the same range and histogram.

    Skipping them also lets ONNX Runtime keep its fusions (Conv+Relu, attention) in the calibration run,
    since an observed tensor is one more consumer that blocks fusing across it.
    """
    wanted = set(tensors)
    excluded = set(excluded_nodes)
    # QDQ quantizes Softmax only when asked to by name (it is not among ONNX Runtime's default QDQ op types).
    softmax_quantized = op_types is not None and "Softmax" in set(op_types)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    same: dict[str, str] = {}
    fixed: dict[str, tuple[float, float]] = {}
    for node in model.graph.node:
        if not node.input or not node.output:
            continue
        src, out = node.input[0], node.output[0]
        if node.op_type in ("Relu", "Clip") and src in wanted and out in wanted and consumers.get(src) == 1:
            same[src] = out
        elif node.op_type == "Softmax" and softmax_quantized and out in wanted and node.name not in excluded:
            fixed[out] = (0.0, 1.0)
        elif node.op_type in SAME_VALUES and src in wanted and out in wanted:
            same[out] = src
    # Follow chains (Transpose of a Reshape of ...) to a tensor that is observed or fixed.
    resolved: dict[str, str] = {}
    for t in same:
        root, hops = t, 0
        while root in same and hops <= len(same):
            root, hops = same[root], hops + 1
        if root in same or root == t:  # a cycle cannot happen in a graph, but never loop on a bad one
            continue
        resolved[t] = root
    observe = [t for t in tensors if t not in resolved and t not in fixed]
    return ObservationPlan(observe, resolved, fixed)


def apply_plan(plan: ObservationPlan, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Ranges for every planned tensor from those of the observed ones."""
    out = dict(ranges)
    out.update(plan.fixed)
    for t, root in plan.same.items():
        if root in out:
            out[t] = out[root]
    return out


def effective_ranges(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    op_types: Iterable[str] | None = None,
    nodes_to_exclude: Iterable[str] = (),
) -> dict[str, tuple[float, float]]:
    """The ranges ONNX Runtime's QDQ quantizer actually uses, given a calibrator's raw ranges: its own
    adjustment (a Relu/Clip input with no other consumer takes the output's range; Softmax outputs
    [0, 1]; every range includes 0). For comparing calibrators on what reaches the quantized model.

    The quantizer adjusts only nodes it quantizes: of ``op_types`` (None: its default, every op type it
    can quantize) and not in ``nodes_to_exclude``, so a Softmax it leaves in float keeps its range."""
    wanted = set(op_types) if op_types else quantizable_op_types()
    excluded = set(nodes_to_exclude)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    out = dict(ranges)
    for node in model.graph.node:
        if not node.input or not node.output or node.op_type not in wanted or node.name in excluded:
            continue
        src, dst = node.input[0], node.output[0]
        if node.op_type in ("Relu", "Clip") and src in ranges and dst in ranges and consumers.get(src) == 1:
            out[src] = ranges[dst]
        elif node.op_type == "Softmax" and dst in ranges:
            out[dst] = (0.0, 1.0)
    # Every activation range is widened to include 0, so that 0 is exactly representable.
    return {t: (min(lo, 0.0), max(hi, 0.0)) for t, (lo, hi) in out.items()}


def range_from_histogram(
    hist: np.ndarray, edges: np.ndarray, method: str, percentile: float, lo: float, hi: float
) -> tuple[float, float]:
    """Pick a quantization range for one tensor from its histogram."""
    total = float(hist.sum())
    if total <= 0:
        return lo, hi
    nonneg = edges[0] >= 0.0
    if method == "percentile":
        # The range keeps the central ``percentile`` % of the values: (100 - percentile) / 2 % is cut from
        # each end (ONNX Runtime's definition). A tensor that cannot go negative keeps 0 as its low end
        # (every range includes 0), so only its top end is cut, by that same half.
        tail = (100.0 - percentile) / 200.0
        top = min(_quantile(hist, edges, total, 1.0 - tail), hi)
        return (0.0 if nonneg else max(_quantile(hist, edges, total, tail), lo)), top
    # entropy and mse work on the magnitude histogram.
    if nonneg:
        mag, width, levels = hist.astype(np.float64), float(edges[1] - edges[0]), 255
    else:
        half = len(hist) // 2
        mag = hist[half:].astype(np.float64) + hist[:half][::-1].astype(np.float64)
        width, levels = float(edges[1] - edges[0]), 127
    if method == "entropy":
        # The first bin holds the exact zeros (after ReLU, often half of all values). Zero is exactly
        # representable whatever the threshold, but its spike would dominate the divergence and
        # pull the threshold far down; leave it out of the search.
        search = mag.copy()
        search[0] = 0.0
        t = _entropy_threshold(search, levels) * width
    elif method == "mse":
        t = _mse_threshold(mag, width, levels)
    else:
        raise ValueError(method)
    if nonneg:
        return 0.0, float(min(t, hi))
    return float(max(-t, lo)), float(min(t, hi))


def _quantile(hist: np.ndarray, edges: np.ndarray, total: float, q: float) -> float:
    """The q-quantile of the histogrammed values, interpolated linearly inside the bin it falls in (values
    taken as spread evenly across their bin), rather than snapped to one of the bin's edges."""
    cum = np.cumsum(hist, dtype=np.float64)
    target = q * total
    i = min(int(np.searchsorted(cum, target)), len(hist) - 1)
    before = float(cum[i - 1]) if i > 0 else 0.0
    inside = float(hist[i])
    frac = min(max((target - before) / inside, 0.0), 1.0) if inside > 0 else 0.0
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def _entropy_threshold(mag: np.ndarray, levels: int) -> int:
    """Number of magnitude bins to keep that minimises KL(P || Q), P being the clipped reference
    distribution and Q its quantization to ``levels`` buckets. All candidate thresholds are
    evaluated at once as rows of one matrix (no Python loop over candidates)."""
    n = len(mag)
    nq = min(levels + 1, n)
    step = max(1, (n - nq) // 128)
    cands = np.arange(nq, n + 1, step)
    c = len(cands)
    j = np.arange(n)
    valid = j[None, :] < cands[:, None]
    m = np.where(valid, mag[None, :], 0.0)
    tail = np.concatenate([np.cumsum(mag[::-1])[::-1], [0.0]])  # tail[i] = mag[i:].sum()
    p = m.copy()
    p[np.arange(c), cands - 1] += tail[cands]  # the clipped outliers land in the last kept bin
    group = (j[None, :] * nq) // cands[:, None]
    flat = np.arange(c)[:, None] * nq + np.minimum(group, nq - 1)
    nz = valid & (mag[None, :] > 0)
    gsum = np.bincount(flat[valid], weights=m[valid], minlength=c * nq).reshape(c, nq)
    gcnt = np.bincount(flat[valid], weights=nz[valid].astype(np.float64), minlength=c * nq).reshape(c, nq)
    g = np.minimum(group, nq - 1)
    q = np.where(nz, np.take_along_axis(gsum, g, 1) / np.maximum(np.take_along_axis(gcnt, g, 1), 1.0), 0.0)
    psum = p.sum(axis=1, keepdims=True)
    qsum = q.sum(axis=1, keepdims=True)
    ok = (psum[:, 0] > 0) & (qsum[:, 0] > 0)
    ps = p / np.where(psum > 0, psum, 1.0)
    qs = q / np.where(qsum > 0, qsum, 1.0)
    # Smooth Q where P has mass and Q has none, so the divergence stays finite.
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(ps > 0, ps * np.log(ps / np.where(qs > 0, qs, 1e-10)), 0.0)
    kl = np.where(ok, terms.sum(axis=1), np.inf)
    return int(cands[int(np.argmin(kl))]) if np.isfinite(kl).any() else n


def _mse_threshold(mag: np.ndarray, width: float, levels: int) -> float:
    """Threshold minimising expected squared error: rounding error step^2/12 inside the range plus
    clipping error outside it, evaluated for candidate thresholds at the bin edges."""
    n = len(mag)
    centers = (np.arange(n) + 0.5) * width
    # sorted(set()), not np.unique, which imports numpy.ma (see metrics.percentile)
    cands = np.array(sorted(set(np.linspace(max(1, n // 64), n, 256).astype(int).tolist()))) * width
    step = cands / levels
    clip = np.maximum(centers[None, :] - cands[:, None], 0.0)
    err = clip**2 + (step[:, None] ** 2) / 12.0
    cost = (err * mag[None, :]).sum(axis=1)
    return float(cands[int(np.argmin(cost))])


class StatsCache:
    """Per-tensor calibration statistics on disk, one .npz per (model, data, samples, layout) key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(parts: dict[str, object]) -> str:
        blob = json.dumps({**parts, "v": CACHE_VERSION}, sort_keys=True, default=str).encode()
        return str(builtin_hash("sha256", blob).hexdigest())

    def load(
        self, key: str, tensors: Sequence[str], need_hist: bool, bins: int
    ) -> tuple[dict[str, TensorStats], int] | None:
        path = self.root / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                names = [str(x) for x in z["names"]]
                has_hist = bool(z["has_hist"])
                if (need_hist and not has_hist) or not set(tensors) <= set(names):
                    return None
                if has_hist and int(z["hist"].shape[1]) != bins:
                    return None
                out: dict[str, TensorStats] = {}
                for i, name in enumerate(names):
                    if name not in tensors:
                        continue
                    st = TensorStats(bins, has_hist)
                    st.lo, st.hi = float(z["lo"][i]), float(z["hi"][i])
                    st.nonfinite = bool(z["nonfinite"][i])
                    if has_hist:
                        st.hist = z["hist"][i].astype(np.int64)
                        st.a, st.signed = float(z["a"][i]), bool(z["signed"][i])
                    out[name] = st
                return out, int(z["samples"])
        except (OSError, KeyError, ValueError):
            return None  # a damaged entry is a miss, never an error

    def save(self, key: str, stats: dict[str, TensorStats], samples: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        names = sorted(stats)
        has_hist = all(stats[n].hist is not None for n in names)
        bins = stats[names[0]].bins if names else NUM_BINS
        arrays = {
            "names": np.array(names, dtype=str),
            "samples": np.array(samples),
            "lo": np.array([stats[n].lo for n in names], dtype=np.float64),
            "hi": np.array([stats[n].hi for n in names], dtype=np.float64),
            "has_hist": np.array(has_hist),
            "hist": np.stack([stats[n].hist for n in names]) if has_hist and names  # type: ignore[misc]
            else np.zeros((0, bins), np.int64),
            "a": np.array([stats[n].a for n in names], dtype=np.float64),
            "signed": np.array([stats[n].signed for n in names], dtype=bool),
            "nonfinite": np.array([stats[n].nonfinite for n in names], dtype=bool),
        }
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, self.root / f"{key}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def minmax_samples_per_run(model: onnx.ModelProto, feed: dict[str, np.ndarray], n: int,
                           tensors: list[str]) -> int:
    """How many of a batch's ``n`` samples one min/max run takes. ONNX Runtime keeps an observed activation
    alive until its reductions have run, which in practice held nearly all of them at once: PP-LCNet at batch 8
    peaked at 593 MB against 180 MB one sample at a time. So a batch is run in parts whose observed
    activations (sizes from shape inference) fit MINMAX_BYTES_PER_RUN; the min and max of the parts are those of
    the batch, so the ranges are the same. A batch that cannot be cut (a fixed batch axis, complete feeds)
    runs whole."""
    if n <= 1 or not splittable(model, feed, n):
        return n
    known = [v for v in activation_bytes(model, feed, tensors).values() if v]
    if not known:
        return n
    per_sample = max(1, sum(known) // n)
    return max(1, min(n, MINMAX_BYTES_PER_RUN // per_sample))


def splittable(model: onnx.ModelProto, feed: dict[str, np.ndarray], n: int) -> bool:
    """Whether ``feed`` holds ``n`` samples stacked on the first axis of every input, which the model declares
    dynamic (so that a part of the batch is a valid feed)."""
    declared = {i.name: i for i in model.graph.input}
    for name, arr in feed.items():
        if arr.ndim == 0 or arr.shape[0] != n or name not in declared:
            return False
        dims = declared[name].type.tensor_type.shape.dim
        if not dims or dims[0].dim_value > 0:
            return False
    return True


def split_feed(feed: dict[str, np.ndarray], n: int, per_run: int) -> Iterator[dict[str, np.ndarray]]:
    """``feed`` in parts of ``per_run`` samples (views, no copies); whole when ``per_run`` >= ``n``."""
    if per_run >= n:
        yield feed
        return
    for i in range(0, n, per_run):
        yield {k: v[i:i + per_run] for k, v in feed.items()}


def _groups_by_bytes(sizes: dict[str, int], budget: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def collect_stats(
    model_path: Path,
    tensors: list[str],
    batches: Batches,
    settings: CalibrationSettings,
    providers: list[str],
    threads: int,
    progress: Progress | None = None,
    total_samples: int | None = None,
    model: onnx.ModelProto | None = None,
    side: SidePass | None = None,
) -> tuple[dict[str, TensorStats], int, int]:
    """One streaming pass (or one per group of tensors for very wide models). Returns
    (stats, samples seen, passes). ``model``: the file at ``model_path``, already parsed by the caller. ``side``
    (min/max only): computed in the same runs, see SidePass."""
    model = model if model is not None else onnx.load(str(model_path))
    with_hist = settings.method != "minmax"
    stats = {t: TensorStats(settings.num_bins, with_hist) for t in tensors}
    passes = 0
    samples = 0
    if not with_hist:
        # min/max: reduce inside ONNX Runtime; only scalars cross into Python.
        samples = _minmax_pass(model_path, model, tensors, stats, batches, providers, threads, progress,
                               total_samples, side)
        return stats, samples, 1
    first = next(iter(batches()), None)
    if first is None:
        return stats, 0, 0
    steps: dict[str, int] = {}
    # What one run hands back per tensor: its subset (the scalars and shapes are nothing next to it).
    fetched: dict[str, int] = {}
    for t, known in activation_shapes(model, first[0], tensors).items():
        if known is None:
            steps[t], fetched[t] = UNKNOWN_STEP, HIST_SUBSET * 4
        else:
            steps[t] = subset_step(known[0])
            fetched[t] = -(-int(np.prod(known[0], dtype=np.int64)) // steps[t]) * known[1]
    groups = _groups_by_bytes(fetched, settings.max_bytes_per_run)
    for g, group in enumerate(groups):
        delta, outs = hist_delta(model, group)
        session = session_with(model_path, delta, providers, threads)
        names = [name for o in outs.values() for name in (o.min, o.max, o.subset, o.shape) if name]
        samples = 0
        for k, (feed, n) in enumerate(batches()):
            got = _hist_run(session, names, feed, outs, steps)
            if k == 0:
                # The real shapes set each step (shape inference may have missed some); steps stay fixed after,
                # so that every batch's values weigh alike.
                real = {t: subset_step([int(d) for d in got[outs[t].shape]]) for t in group}
                if any(real[t] != steps[t] for t in group):
                    steps.update(real)
                    got = _hist_run(session, names, feed, outs, steps)
            for t in group:
                o = outs[t]
                lo = float(got[o.min]) if o.min else 0.0
                stats[t].update_sampled(got[o.subset], lo, float(got[o.max]), steps[t])
            del got
            samples += n
            if progress and total_samples:
                progress(min(1.0, (g + samples / total_samples) / len(groups)))
        del session
        passes += 1
    return stats, samples, passes


def _minmax_pass(model_path: Path, model: onnx.ModelProto, tensors: list[str], stats: dict[str, TensorStats],
                 batches: Batches, providers: list[str], threads: int, progress: Progress | None,
                 total_samples: int | None, side: SidePass | None) -> int:
    """collect_stats' min/max pass: updates ``stats`` (and fills ``side``); returns the samples seen."""
    samples = 0
    delta, pairs = minmax_delta(model, list(tensors))
    if side is not None:
        delta.MergeFrom(side.delta)
    session = session_with(model_path, delta, providers, threads)
    # Only the reductions: the model's own outputs are not fetched (but for the side pass's kept batches).
    names = [o for pair in pairs.values() for o in pair if o]
    extra = [*side.names.values(), *(o for pair in side.extremes.values() for o in pair)] if side is not None else []
    own = [o.name for o in model.graph.output]
    per_run: int | None = None
    started = time.perf_counter()
    for b, (feed, n) in enumerate(batches()):
        if per_run is None:
            per_run = minmax_samples_per_run(model, feed, n, list(tensors))
        # The kept outputs are the first batches'.
        keep = side is not None and samples < side.keep_outputs
        fetch = names + extra + (own if keep else [])
        parts: list[KeptRun] = []
        for p, part in enumerate(split_feed(feed, n, per_run)):
            values = runtime.run(session, part, "model during calibration", fetch)
            got = dict(zip(fetch, values, strict=True))
            for t, (mn, mx) in pairs.items():
                stats[t].update(np.array([got[mn] if mn else 0.0, got[mx]], dtype=np.float64))
            if side is not None:
                count = n if per_run >= n else int(next(iter(part.values())).shape[0])
                for key, out in side.names.items():
                    side.sums[key] = side.sums.get(key, 0.0) + np.asarray(got[out], dtype=np.float64) * count
                for key, (mn, mx) in side.extremes.items():
                    lo, hi = np.asarray(got[mn], dtype=np.float64), np.asarray(got[mx], dtype=np.float64)
                    side.mins[key] = np.minimum(side.mins[key], lo) if key in side.mins else lo
                    side.maxs[key] = np.maximum(side.maxs[key], hi) if key in side.maxs else hi
                if keep:
                    rows = None if per_run >= n else (p * per_run, p * per_run + count)
                    parts.append(KeptRun(b, rows, count, list(values[len(names) + len(extra):])))
        if side is not None:
            side.kept.extend(_whole(b, n, parts))
        samples += n
        if progress and total_samples:
            progress(min(1.0, samples / total_samples))
    if side is not None:
        side.samples, side.seconds, side.done = samples, time.perf_counter() - started, True
    return samples


def _whole(batch: int, n: int, parts: list[KeptRun]) -> list[KeptRun]:
    """A batch's outputs, run in parts, joined back into the batch's (later runs on it take whole batches, which
    is faster), where every output of every part has the part's samples on its first axis; else the parts."""
    if len(parts) <= 1:
        return parts
    joinable = all(np.ndim(o) > 0 and np.shape(o)[0] == p.samples for p in parts for o in p.outputs)
    if not joinable:
        return parts
    joined = [np.concatenate([p.outputs[k] for p in parts]) for k in range(len(parts[0].outputs))]
    return [KeptRun(batch, None, n, joined)]


def _hist_run(session: Any, names: list[str], feed: dict[str, np.ndarray], outs: dict[str, HistOutputs],
              steps: dict[str, int]) -> dict[str, Any]:
    run_feed = dict(feed)
    for t, o in outs.items():
        run_feed[o.step] = np.array([steps[t]], np.int64)
    return dict(zip(names, runtime.run(session, run_feed, "model during calibration", names), strict=True))


def ranges_from_stats(stats: dict[str, TensorStats], settings: CalibrationSettings) -> dict[str, tuple[float, float]]:
    ranges: dict[str, tuple[float, float]] = {}
    for t, st in stats.items():
        if st.nonfinite or not np.isfinite(st.lo):
            # No int8 range holds infinity: a tensor without a range stays in float.
            continue
        if settings.method == "minmax" or st.hist is None:
            ranges[t] = (st.lo, st.hi)
        else:
            ranges[t] = range_from_histogram(st.hist, st.edges(), settings.method, settings.percentile, st.lo, st.hi)
    if settings.symmetric:
        ranges = {t: (-max(abs(lo), abs(hi)), max(abs(lo), abs(hi))) for t, (lo, hi) in ranges.items()}
    return _nonempty(ranges)


def _nonempty(ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    # A degenerate (constant) tensor still needs a non-empty range.
    return {t: (lo, hi if hi > lo else lo + 1e-6) for t, (lo, hi) in ranges.items()}


def calibrate(
    model_path: Path,
    tensors: list[str],
    batches: Batches,
    settings: CalibrationSettings,
    providers: list[str],
    threads: int,
    progress: Progress | None = None,
    total_samples: int | None = None,
    cache: StatsCache | None = None,
    cache_key: dict[str, object] | None = None,
    excluded_nodes: Iterable[str] = (),
    op_types: Iterable[str] | None = None,
    model: onnx.ModelProto | None = None,
    side: SidePass | None = None,
    known: dict[str, tuple[float, float]] | None = None,
    known_samples: int = 0,
) -> CalibrationResult:
    """Observe ``tensors`` over the calibration batches and return a range for each.

    ``batches`` is called once per pass and must yield (feed, sample_count) pairs. ``model``: the file at
    ``model_path`` already parsed by the caller (it is only read), to save parsing it again. With a cache and
    a key describing the model and data, statistics are reused across runs and methods. ``side``: computed in the
    same pass where it is a min/max one (see SidePass). ``known`` (min/max only): each observed tensor's min and
    max over ``known_samples`` samples, already measured (equalization's, from the plain pass): when it has every
    tensor the plan observes, no pass runs and the ranges follow from it as from a pass (``passes`` 0).
    """
    started = time.perf_counter()
    if model is None:
        model = onnx.load(str(model_path))
    plan = plan_observation(model, tensors, excluded_nodes, op_types)
    key = StatsCache.key(cache_key) if cache is not None and cache_key is not None else None
    need_hist = settings.method != "minmax"
    use_known = known is not None and not need_hist and all(t in known for t in plan.observe)
    cached = cache.load(key, plan.observe, need_hist, settings.num_bins) \
        if cache is not None and key and not use_known else None
    if known is not None and use_known:
        stats = {t: TensorStats(settings.num_bins, False) for t in plan.observe}
        for t, st in stats.items():
            st.update(np.array(known[t], dtype=np.float64))
        samples, passes = known_samples, 0
    elif cached is not None:
        (stats, samples), passes = cached, 0
        if progress:
            progress(1.0)
    else:
        stats, samples, passes = collect_stats(
            model_path, plan.observe, batches, settings, providers, threads, progress, total_samples, model, side
        )
        if cache is not None and key and samples:
            cache.save(key, stats, samples)
    ranges = apply_plan(plan, ranges_from_stats(stats, settings))
    observed = {t: (st.lo, st.hi) for t, st in stats.items() if np.isfinite(st.lo)}
    return CalibrationResult(
        method=settings.method,
        ranges=ranges,
        samples=samples,
        seconds=time.perf_counter() - started,
        tensors=len(ranges),
        passes=passes,
        stats=apply_plan(ObservationPlan([], plan.same, {}), observed),
        observed=len(plan.observe),
        cache_used=cached is not None,
        nonfinite_tensors=sorted(t for t, st in stats.items() if st.nonfinite),
    )


ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def calibrate_with_ort(
    model_path: Path,
    batches: Batches,
    settings: CalibrationSettings,
    providers: list[str],
    work_dir: Path,
    op_types: Sequence[str] | None = None,
) -> CalibrationResult:
    """ONNX Runtime's own calibrators (create_calibrator, collect_data, compute_data), for comparison.
    They hold every observed activation of every sample in memory."""
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    if settings.method not in ORT_METHODS:
        raise EngineError(
            "invalid_option",
            f"ONNX Runtime's calibrators have no '{settings.method}' method; use calibrator 'lowbit' or one of "
            f"{', '.join(ORT_METHODS)}",
        )

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information: its reader class is Any
        def __init__(self) -> None:
            self.it = iter(batches())
            self.samples = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            nxt = next(self.it, None)
            if nxt is None:
                return None
            self.samples += nxt[1]
            return nxt[0]

    started = time.perf_counter()
    extra: dict[str, object] = {"symmetric": settings.symmetric}
    if settings.method == "percentile":
        extra["percentile"] = settings.percentile
    work_dir.mkdir(parents=True, exist_ok=True)
    calibrator = create_calibrator(
        Path(model_path),
        list(op_types) if op_types else None,
        augmented_model_path=str(work_dir / "ort_augmented.onnx"),
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[settings.method]),
        providers=providers,
        extra_options=extra,
    )
    reader = Reader()
    calibrator.collect_data(reader)
    data = calibrator.compute_data()
    ranges = {}
    for name, td in data.data.items():
        lo, hi = td.range_value
        ranges[name] = (float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0]))
    del calibrator
    ranges = _nonempty(ranges)
    return CalibrationResult(
        method=settings.method, ranges=ranges, samples=reader.samples, seconds=time.perf_counter() - started,
        tensors=len(ranges), passes=1, calibrator="ort", observed=len(ranges),
    )


def write_ort_ranges(ranges: dict[str, tuple[float, float]], path: Path) -> None:
    """Write ranges in the JSON form ``quantize_static(calibration_cache_path=...)`` loads."""
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    data = {k: (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32)) for k, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
