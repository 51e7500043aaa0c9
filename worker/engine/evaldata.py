"""The samples a run validates on: its data plan (calibration, evaluation or synthetic samples), synthetic
inputs when there is no data, and the batch-1 feed latency is timed on."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from worker.engine.config import QuantizeConfig
from worker.engine.context import RunData
from worker.engine.feeds import Batch, FeedPlan
from worker.engine.hygiene import Overlap, overlap
from worker.engine.inspect import ModelInfo, TensorInfo
from worker.engine.npz import DatasetInfo, NpzReader, inspect_npz
from worker.engine.preflight import plan_split


def plan_data(cfg: QuantizeConfig, info: ModelInfo, warnings: list[str]) -> RunData:
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


def synthetic_batches(inputs: tuple[TensorInfo, ...], count: int) -> Iterator[Batch]:
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


def first_sample_feed(feed: dict[str, np.ndarray], inputs: tuple[TensorInfo, ...], plan: FeedPlan | None) -> tuple[
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


