"""4-bit blocks as ONNX Runtime's kernel makes them: the dequantized weight, a weight's relative 4-bit error, and
clip_search's per-block clipping. Pure numpy, used by the whole-model (int4.py) and the streamed (streaming.py)
paths."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Clipping ratios tried per block: fine steps near 1 (ordinary blocks), and far down (a block whose
# maximum is a rare outlier many times its typical weight).
# Descending, 0.7 once. Not np.unique: it loads numpy.ma (1.3 MB resident), which every job paid at import.
CLIP_GRID = np.concatenate([np.linspace(1.0, 0.7, 7), np.geomspace(0.7, 0.02, 14)[1:]])


def block_dequant(w: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """Quantize with ONNX Runtime's own 4-bit kernel and dequantize: exactly what MatMulNBits computes
    with. ``w`` is [K, N]; returns the dequantized [K, N]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    nb = -(-k // block)
    padded = np.zeros((nb * block, n), dtype=np.float32)
    padded[:k] = w
    packed = np.zeros((n, nb, block // 2), dtype=np.uint8)
    zp = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
    scales = np.zeros((n, nb), dtype=np.float32)
    quantize_matmul_4bits(packed, padded, scales, zp, block, n, nb * block, symmetric)
    q = np.empty((n, nb, block), dtype=np.int16)
    q[:, :, 0::2] = packed & 0x0F
    q[:, :, 1::2] = packed >> 4
    if symmetric:
        z = np.full((n, nb), 8, dtype=np.int16)
    else:
        zb = np.empty((n, 2 * zp.shape[1]), dtype=np.int16)
        zb[:, 0::2] = zp & 0x0F
        zb[:, 1::2] = zp >> 4
        z = zb[:, :nb]
    dq = (q - z[:, :, None]) * scales[:, :, None]
    return dq.reshape(n, nb * block)[:, :k].T.astype(np.float32)


def four_bit_error(slabs: Iterable[tuple[int, np.ndarray]], h: np.ndarray | None, block: int,
                   symmetric: bool) -> float:
    """A weight's relative error in 4 bits (round to nearest, ONNX Runtime's kernel): sum_k h_k ||w_k - q(w_k)||^2
    over sum_k h_k ||w_k||^2, with h_k the input's second moment per channel (1 without), from [rows, N] slabs
    of whole blocks of rows, each with its first row. How int8_most_sensitive ranks the MatMuls."""
    num = den = 0.0
    for k0, w in slabs:
        hk = np.ones((w.shape[0], 1)) if h is None else np.asarray(h[k0:k0 + w.shape[0]], dtype=np.float64)[:, None]
        err = (w - block_dequant(w, block, symmetric)).astype(np.float64)
        num += float((hk * err * err).sum())
        den += float((hk * w.astype(np.float64) ** 2).sum())
    return num / den if den > 0 else 0.0


def clip_search(w: np.ndarray, h: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, float]:
    """Per (block, column) clipping ratio minimising sum_k h_k (w_k - q(w_k))^2. Returns the clipped
    float weight and the mean chosen ratio."""
    k, n = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    wp = np.pad(w, ((0, pad), (0, 0))).reshape(nb, block, n)
    hp = np.pad(h, (0, pad)).reshape(nb, block, 1)
    if symmetric:
        amax = np.abs(wp).max(axis=1, keepdims=True)
        lo_b, hi_b = -amax, amax
    else:
        lo_b, hi_b = np.minimum(wp.min(axis=1, keepdims=True), 0), np.maximum(wp.max(axis=1, keepdims=True), 0)
    best_err = np.full((nb, 1, n), np.inf)
    best_alpha = np.ones((nb, 1, n))
    for alpha in CLIP_GRID:
        clipped = np.clip(wp, alpha * lo_b, alpha * hi_b).reshape(nb * block, n)[:k]
        dq = np.pad(block_dequant(clipped, block, symmetric), ((0, pad), (0, 0))).reshape(nb, block, n)
        err = (hp * (wp - dq) ** 2).sum(axis=1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_alpha = np.where(better, alpha, best_alpha)
    out = np.clip(wp, best_alpha * lo_b, best_alpha * hi_b).reshape(nb * block, n)[:k]
    return out.astype(np.float32), float(best_alpha.mean())
