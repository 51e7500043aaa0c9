"""The PyTorch half of learned rounding (worker/engine/adaround.py): runs only in the PyTorch child process
(``worker.engine.pt2_child:adaround``), one group of layers per request, each layer's inputs and weights read
from the .npz file the engine wrote, its learned int8 weight written back next to it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from worker.engine.adaround import (
    BETA,
    CONV_SAMPLES_PER_STEP,
    GAMMA,
    LEARNING_RATE,
    MAX_STEPS,
    MIN_STEPS,
    REG_WEIGHT,
    ROWS_PER_STEP,
    WARMUP,
    ZETA,
    Target,
)

Emit = Callable[[dict[str, Any]], None]


class _Op:
    """The layer's linear map of its input, op(x, W) without the bias, in PyTorch."""

    def __init__(self, t: Target, w_shape: tuple[int, ...]) -> None:
        self.t = t
        self.rank = len(w_shape)

    def __call__(self, x: Any, w: Any) -> Any:
        t = self.t
        if t.op_type == "Conv":
            spatial = self.rank - 2
            pads = list(t.attrs.get("pads", [0] * (2 * spatial)))
            # ONNX pads are [begin_1, ..., begin_n, end_1, ..., end_n]; F.pad takes the last axis first.
            torch_pads: list[int] = []
            for k in reversed(range(spatial)):
                torch_pads += [int(pads[k]), int(pads[k + spatial])]
            if any(torch_pads):
                x = F.pad(x, torch_pads)
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
            return conv(x, w, None, stride=list(t.attrs.get("strides", [1] * spatial)),
                        dilation=list(t.attrs.get("dilations", [1] * spatial)), groups=int(t.attrs.get("group", 1)))
        if t.op_type == "Gemm":
            w = w.T if int(t.attrs.get("transB", 0)) else w
            return x @ w * float(t.attrs.get("alpha", 1.0))
        return x @ w


def _learn_layer(t: Target, w: np.ndarray, q: np.ndarray, scale: np.ndarray, x: np.ndarray, seconds: float,
                 rng: np.random.Generator, levels: tuple[int, int] = (-128, 127)) -> tuple[np.ndarray, dict[str, Any]]:
    """The learned int8 weight of one layer, and its figures; ``levels``: the integer range the weights use."""
    lo, hi = levels
    shape = [1] * w.ndim
    shape[t.axis] = -1
    s = torch.from_numpy(scale.astype(np.float32).reshape(shape) if scale.ndim else scale.astype(np.float32))
    wt = torch.from_numpy(w.astype(np.float32))
    floor = torch.floor(wt / s)
    rest = (wt / s - floor).clamp(0.0, 1.0)
    # h(V) starts at the fractional part, so that the soft weight starts at W itself.
    v0 = -torch.log((ZETA - GAMMA) / (rest * 0.98 + 0.01 - GAMMA) - 1.0)
    v = v0.clone().requires_grad_(True)
    op = _Op(t, w.shape)
    xs = torch.from_numpy(x)
    per_step = CONV_SAMPLES_PER_STEP if t.op_type == "Conv" else ROWS_PER_STEP

    def soft() -> Any:
        h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        return s * (floor + h).clamp(float(lo), float(hi)), h

    def error(w_try: Any, rows: Any) -> Any:
        return (op(rows, wt - w_try) ** 2).mean()

    with torch.no_grad():
        nearest = s * torch.from_numpy(q.astype(np.float32))
        base = float(error(nearest, xs))
    opt = torch.optim.Adam([v], lr=LEARNING_RATE)
    started = time.perf_counter()
    steps = 0
    norm = max(base, 1e-30)
    while steps < MAX_STEPS:
        if steps >= MIN_STEPS and steps % 10 == 0 and time.perf_counter() - started > seconds:
            break
        idx = torch.from_numpy(rng.integers(0, xs.shape[0], min(per_step, xs.shape[0])))
        w_soft, h = soft()
        loss = error(w_soft, xs[idx]) / norm
        frac = steps / MAX_STEPS
        if frac >= WARMUP:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (frac - WARMUP) / (1 - WARMUP))
            loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    optimised_s = time.perf_counter() - started
    with torch.no_grad():
        h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        learned_q = (floor + (h >= 0.5).float()).clamp(lo, hi)
        learned = float(error(s * learned_q, xs))
    new_q = learned_q.numpy().astype(np.int8)
    changed = int((new_q != q).sum())
    figures = {"layer": t.name, "op_type": t.op_type, "weights": int(q.size), "steps": steps,
               "seconds": round(optimised_s, 3), "rounded_other_way": changed, "output_mse_nearest": _sig(base),
               "output_mse_learned": _sig(learned)}
    if not learned < base:  # no gain on the samples: nearest rounding stays
        figures["kept"] = False
        return q, figures
    figures["kept"] = True
    return new_q, figures


def _sig(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


def learn_layers(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Each of the request's layers: {"target": Target fields, "npz": inputs and weights, "out": where the learned
    int8 weight goes, "seconds": its time}. Returns the layers' figures in order."""
    # One thread: the layers are small problems, and on a busy machine two threads spun (33 ms a step against
    # 0.5 ms on a 4x8x3x3 conv).
    torch.set_num_threads(1)
    rng = np.random.default_rng(int(req.get("seed", 0)))
    figures = []
    lo, hi = req.get("levels", (-128, 127))
    for k, layer in enumerate(req["layers"]):
        t = Target(**layer["target"])
        with np.load(layer["npz"]) as z:
            w, q, scale, x = z["w"], z["q"], z["scale"], z["x"]
        new_q, got = _learn_layer(t, w, q, scale, x, float(layer["seconds"]), rng, (int(lo), int(hi)))
        np.save(layer["out"], new_q)
        figures.append(got)
        emit({"layer": k + 1, "layers": len(req["layers"])})
    return {"layers": figures}
