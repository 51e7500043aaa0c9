"""Loading published weights: safetensors parsed by hand, torch state dicts loaded weights-only."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

_DTYPES: dict[str, tuple[np.dtype[Any], torch.dtype]] = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the ``__metadata__`` of a .safetensors file: an 8-byte little-endian header length,
    a JSON header naming each tensor's dtype, shape and byte range, then the raw little-endian bytes."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    meta: dict[str, str] = header.pop("__metadata__", {}) or {}
    out: dict[str, torch.Tensor] = {}
    for name, spec in header.items():
        dtype = spec["dtype"]
        if dtype == "BF16":
            begin, end = spec["data_offsets"]
            raw = np.frombuffer(data, dtype="<u2", count=(end - begin) // 2, offset=base + begin)
            wide = raw.astype(np.uint32) << 16
            out[name] = torch.from_numpy(wide.view(np.float32).reshape(spec["shape"]).copy()).to(torch.bfloat16)
            continue
        np_dtype, _ = _DTYPES[dtype]
        begin, end = spec["data_offsets"]
        count = (end - begin) // np_dtype.itemsize
        arr = np.frombuffer(data, dtype=np_dtype, count=count, offset=base + begin).reshape(spec["shape"])
        out[name] = torch.from_numpy(arr.astype(np_dtype.newbyteorder("="), copy=True))
    return out, meta


def load_state_dict(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A torch checkpoint's tensors, loaded with ``weights_only=True`` (no code runs); ``key`` picks a
    nested state dict (Resemblyzer keeps its weights under ``model_state``)."""
    obj = torch.load(path, weights_only=True, map_location="cpu")
    if key is not None:
        obj = obj[key]
    if not isinstance(obj, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
