"""How a dataset's arrays feed a model's inputs (README.md, "Datasets: the .npz format").

An array whose rank is the input's rank + 1 holds complete feeds: sample i is fed as ``array[i]``.
An array of the input's own rank is stacked along the input's batch axis (axis 0) and fed in
batches of the model's fixed batch size, or of ``batch_size`` when the batch axis is dynamic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.engine.errors import EngineError
from worker.engine.inspect import TensorInfo
from worker.engine.npz import LABELS_KEY, ArrayInfo, DatasetInfo, NpzReader

STACKED = "stacked"
COMPLETE = "complete"


@dataclass(frozen=True)
class FeedPlan:
    modes: dict[str, str]
    samples_per_run: int
    num_samples: int
    has_labels: bool


def _dims_match(want: Sequence[int | str], got: Sequence[int]) -> bool:
    return len(want) == len(got) and all(not isinstance(w, int) or w == g for w, g in zip(want, got, strict=True))


def _fmt(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _shape_problem(inp: TensorInfo, arr: ArrayInfo) -> str:
    """Why an array fits the input neither way, naming the shapes it could have and what to change."""
    complete: list[int | str] = ["N", *inp.shape]
    if not inp.shape:
        forms = f"{_fmt(complete)} (one value per sample: the input is a scalar, shape [])"
        candidates = [complete]
    else:
        stacked: list[int | str] = ["N", *inp.shape[1:]]
        forms = (f"{_fmt(stacked)} (N samples stacked along its batch axis) or {_fmt(complete)} (one complete "
                 "input per sample)")
        candidates = [stacked, complete]
    text = (f"array '{inp.name}' has shape {_fmt(arr.shape)}, but the model input is {_fmt(inp.shape)}, so the "
            f"array must be {forms}")
    for want in candidates:
        if len(want) != len(arr.shape):
            continue
        off = [f"axis {k} is {g} where the model wants {w}"
               for k, (w, g) in enumerate(zip(want, arr.shape, strict=True)) if k and isinstance(w, int) and w != g]
        if off:
            return text + " (" + "; ".join(off) + ")"
    for want in candidates:
        fixed = [w for w in want[1:] if isinstance(w, int)]
        if len(fixed) == len(want) - 1 and _product(arr.shape[1:]) == _product(fixed):
            dims = ", ".join(str(d) for d in (arr.shape[0], *fixed))
            return text + f" (the sizes agree: arr.reshape({dims}) fits)"
    return text


def _product(dims: Sequence[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def plan_feeds(
    inputs: Sequence[TensorInfo], dataset: DatasetInfo, batch_size: int = 8, role: str = "calibration"
) -> FeedPlan:
    """Check a dataset against the model inputs and decide how to feed it.

    Raises EngineError('dataset_mismatch') listing every problem found, so the user fixes all at once.
    """
    problems: list[str] = []
    arrays = dataset.feature_arrays()
    names = {i.name for i in inputs}
    missing = [i.name for i in inputs if i.name not in arrays]
    extra = sorted(set(arrays) - names)
    if missing:
        problems.append(f"missing array(s) for model input(s): {', '.join(missing)}")
    if extra:
        problems.append(
            f"array(s) {', '.join(extra)} match no model input (inputs: {', '.join(sorted(names))}; "
            f"the only extra array allowed is '{LABELS_KEY}')"
        )
    modes: dict[str, str] = {}
    for inp in inputs:
        arr: ArrayInfo | None = arrays.get(inp.name)
        if arr is None:
            continue
        if arr.dtype != inp.dtype:
            problems.append(
                f"array '{inp.name}' has dtype {arr.dtype} but the model input wants {inp.dtype} "
                f"(convert with arr.astype(np.{inp.dtype}))"
            )
        rank = len(inp.shape)
        if len(arr.shape) == rank + 1 and _dims_match(inp.shape, arr.shape[1:]):
            modes[inp.name] = COMPLETE
        elif len(arr.shape) == rank and _dims_match(inp.shape[1:], arr.shape[1:]):
            modes[inp.name] = STACKED
        else:
            problems.append(_shape_problem(inp, arr))
    if problems:
        raise EngineError("dataset_mismatch", f"{role} dataset does not match the model: " + "; ".join(problems))

    fixed_batches = {
        inp.shape[0] for inp in inputs if modes[inp.name] == STACKED and inp.shape and isinstance(inp.shape[0], int)
    }
    if any(m == COMPLETE for m in modes.values()):
        bad = [i for i in inputs if modes[i.name] == STACKED and i.shape and isinstance(i.shape[0], int)
               and i.shape[0] != 1]
        if bad:
            complete = [i.name for i in inputs if modes[i.name] == COMPLETE]
            detail = "; ".join(
                f"'{i.name}' {_fmt(arrays[i.name].shape)} reads as samples stacked along the input's first "
                f"axis, which the model fixes at {i.shape[0]}: give it as {_fmt(['N', *i.shape])}" for i in bad
            )
            raise EngineError(
                "dataset_mismatch",
                f"{role} dataset mixes one complete feed per sample ({', '.join(complete)}) with stacked arrays; "
                f"{detail} (one complete input per sample, like the others)",
            )
        per_run = 1
    elif len(fixed_batches) > 1:
        raise EngineError(
            "unsupported_model", f"model inputs disagree on their fixed batch size: {sorted(fixed_batches)}"
        )
    elif fixed_batches:
        per_run = fixed_batches.pop()
    else:
        per_run = min(batch_size, dataset.num_samples)
    if dataset.num_samples < per_run:
        raise EngineError(
            "dataset_mismatch",
            f"{role} dataset has {dataset.num_samples} samples but the model's fixed batch size is {per_run}",
        )
    return FeedPlan(modes, per_run, dataset.num_samples, dataset.has_labels)


def fixed_batch(plan: FeedPlan, inputs: Sequence[TensorInfo]) -> bool:
    """True when every run must hold exactly ``samples_per_run`` samples (fixed batch axis)."""
    return any(
        plan.modes[i.name] == STACKED and i.shape and isinstance(i.shape[0], int) for i in inputs
    ) or all(m == COMPLETE for m in plan.modes.values())


@dataclass
class Batch:
    feed: dict[str, np.ndarray]
    start: int
    count: int
    labels: np.ndarray | None


def iter_batches(
    reader: NpzReader,
    inputs: Sequence[TensorInfo],
    plan: FeedPlan,
    start: int,
    stop: int,
    with_labels: bool = False,
) -> Iterator[Batch]:
    """Stream model feeds for samples [start, stop); a trailing partial batch is dropped only when
    the model's batch axis is fixed (the caller reports how many samples were used)."""
    per = plan.samples_per_run
    stop = min(stop, plan.num_samples)
    if fixed_batch(plan, inputs):
        stop = start + ((stop - start) // per) * per
    if stop <= start:
        return
    iters: dict[str, Iterator[np.ndarray]] = {
        i.name: reader.iter_chunks(i.name, start, stop, per) for i in inputs
    }
    label_iter = reader.iter_chunks(LABELS_KEY, start, stop, per) if with_labels and plan.has_labels else None
    pos = start
    while pos < stop:
        feed: dict[str, Any] = {}
        for inp in inputs:
            chunk = next(iters[inp.name])
            # A complete feed is one sample with its leading axis dropped; reshape (not chunk[0]) keeps a
            # 0-d input (silero's int64 sample rate) a 0-d ndarray, where indexing gives a numpy scalar
            # that ONNX Runtime refuses as a feed.
            feed[inp.name] = chunk.reshape(chunk.shape[1:]) if plan.modes[inp.name] == COMPLETE else chunk
        n = min(per, stop - pos)
        labels = next(label_iter) if label_iter is not None else None
        yield Batch(feed, pos, n, labels)
        pos += n


def batch_source(
    reader: NpzReader, inputs: Sequence[TensorInfo], plan: FeedPlan, start: int, stop: int
) -> Callable[[], Iterator[tuple[dict[str, np.ndarray], int]]]:
    """A re-runnable source of (feed, sample count) pairs over samples [start, stop): what the
    calibrators and 4-bit algorithms call once per pass over the data."""

    def gen() -> Iterator[tuple[dict[str, np.ndarray], int]]:
        for b in iter_batches(reader, inputs, plan, start, stop):
            yield b.feed, b.count

    return gen
