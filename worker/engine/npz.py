"""Read ``.npz`` datasets safely and in a streaming fashion.

Arrays are read member by member from the zip, a slice of samples at a time, so calibrating on a
large dataset never holds more than one batch per input in memory. Nothing is ever unpickled.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from worker.engine.errors import EngineError

LABELS_KEY = "labels"
MAX_MEMBERS = 256
# Declared (uncompressed) size of all members together. The zip's central directory is read before any
# member is decompressed, so a zip bomb is refused from its declarations alone.
MAX_UNCOMPRESSED_BYTES = 64 * 1024**3
# np.savez stores members, np.savez_compressed deflates them; deflate cannot do better than about 1032:1
# (all zeros), so a member declaring more than this ratio is lying about its size: a decompression bomb.
# Other methods (bzip2, lzma) are refused: numpy never writes them and their ratios are unbounded.
MAX_COMPRESSION_RATIO = 1100
_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
# Elements one array may declare; checked from the .npy header, before anything is allocated.
MAX_ARRAY_ELEMENTS = 1 << 36


@dataclass(frozen=True)
class ArrayInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    member: str
    fortran_order: bool
    # The stored dtype including byte order ('<f4'); ``dtype`` is its plain name ('float32').
    descr: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample (one index of the first axis)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class DatasetInfo:
    arrays: dict[str, ArrayInfo]
    num_samples: int

    @property
    def has_labels(self) -> bool:
        return LABELS_KEY in self.arrays

    def feature_arrays(self) -> dict[str, ArrayInfo]:
        return {k: v for k, v in self.arrays.items() if k != LABELS_KEY}


def _read_header(fp: IO[bytes], member: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:
        raise EngineError("invalid_dataset", f"member '{member}' is not a valid .npy array: {exc}") from exc
    return tuple(int(s) for s in shape), bool(fortran), dtype


def inspect_npz(path: Path) -> DatasetInfo:
    """Read only the array headers; refuse anything that is not a plain numeric npz."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngineError(
            "invalid_dataset", "the dataset is not an .npz file (np.savez / np.savez_compressed output)"
        ) from exc
    with zf:
        members = zf.infolist()
        if not members:
            raise EngineError("invalid_dataset", "the .npz file contains no arrays")
        if len(members) > MAX_MEMBERS:
            raise EngineError("invalid_dataset", f"the .npz file has {len(members)} members; at most {MAX_MEMBERS}")
        _check_declared_sizes(members)
        arrays: dict[str, ArrayInfo] = {}
        for m in members:
            if not m.filename.endswith(".npy") or "/" in m.filename:
                raise EngineError(
                    "invalid_dataset",
                    f"the .npz member '{_short(m.filename)}' is not a .npy array; save datasets with np.savez",
                )
            name = m.filename[: -len(".npy")]
            try:
                with zf.open(m) as fp:
                    shape, fortran, dtype = _read_header(fp, m.filename)
            except EngineError:
                raise
            except (RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                # Encrypted members, unsupported compression, corrupt streams.
                raise EngineError(
                    "invalid_dataset", f"member '{m.filename[:200]}' cannot be read: {exc}; save with np.savez"
                ) from exc
            if dtype.hasobject or dtype.kind not in "biuf":
                raise EngineError(
                    "invalid_dataset",
                    f"array '{name}' has dtype {dtype}; only numeric and bool arrays are accepted "
                    "(object arrays would need pickle, which lowbit never loads)",
                )
            if len(shape) == 0:
                raise EngineError("invalid_dataset", f"array '{name}' is a scalar; the first axis must be samples")
            elements = 1
            for d in shape:  # Python ints: np.prod would wrap around on a crafted header
                elements *= d
            if elements > MAX_ARRAY_ELEMENTS:
                raise EngineError(
                    "dataset_too_large",
                    f"array '{_short(name)}' declares shape {list(shape)[:8]} ({elements} elements), more than "
                    f"the {MAX_ARRAY_ELEMENTS} one array may hold",
                )
            expected = elements * dtype.itemsize
            if m.file_size < expected:
                raise EngineError(
                    "invalid_dataset",
                    f"array '{name}' declares shape {list(shape)} ({expected} bytes) but holds only "
                    f"{m.file_size} bytes; the file is truncated or corrupt",
                )
            arrays[name] = ArrayInfo(name, dtype.name, shape, m.filename, fortran, dtype.str)
    counts = {a.shape[0] for a in arrays.values()}
    if len(counts) != 1:
        detail = ", ".join(f"{a.name}: {a.shape[0]}" for a in arrays.values())
        raise EngineError(
            "invalid_dataset", f"arrays disagree on the number of samples (first axis): {detail}"
        )
    num = counts.pop()
    if num == 0:
        raise EngineError("empty_dataset", "the dataset has zero samples (first axis of every array is 0)")
    if LABELS_KEY in arrays:
        lab = arrays[LABELS_KEY]
        if len(lab.shape) != 1 or np.dtype(lab.dtype).kind not in "iu":
            raise EngineError(
                "invalid_dataset",
                f"'labels' must be a 1-D integer array with one class index per sample, got "
                f"{lab.dtype} of shape {list(lab.shape)}",
            )
    return DatasetInfo(arrays, num)


def _short(text: str, n: int = 200) -> str:
    """A member name from the file, for a message: bounded, control characters shown escaped."""
    return repr(text[:n])[1:-1] + ("..." if len(text) > n else "")


def _check_declared_sizes(members: list[zipfile.ZipInfo]) -> None:
    """Refuse decompression bombs from the central directory: total declared size, and per member the
    ratio of declared to compressed size."""
    total = sum(m.file_size for m in members)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise EngineError(
            "dataset_too_large",
            f"the .npz declares {total} bytes of arrays once decompressed, more than the limit of "
            f"{MAX_UNCOMPRESSED_BYTES}; split the dataset or use fewer samples",
        )
    for m in members:
        if m.compress_type not in _COMPRESSION:
            raise EngineError(
                "invalid_dataset",
                f"member '{_short(m.filename)}' uses zip compression method {m.compress_type}; save datasets "
                "with np.savez or np.savez_compressed (stored or deflated members)",
            )
        stored_lies = m.compress_type == zipfile.ZIP_STORED and m.file_size != m.compress_size
        if stored_lies or m.file_size > MAX_COMPRESSION_RATIO * max(m.compress_size, 1):
            raise EngineError(
                "invalid_dataset",
                f"member '{_short(m.filename)}' declares {m.file_size} bytes from {m.compress_size} "
                f"{_COMPRESSION[m.compress_type]} bytes; the file is a decompression bomb or corrupt",
            )


class NpzReader:
    """Reads sample ranges of the arrays of an .npz without loading whole arrays."""

    def __init__(self, path: Path, info: DatasetInfo | None = None) -> None:
        self.path = Path(path)
        self.info = info or inspect_npz(self.path)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of array ``name`` (a fresh, C-contiguous array)."""
        a = self.info.arrays[name]
        stop = min(stop, a.shape[0])
        if a.fortran_order and len(a.shape) > 1:
            # Fortran-ordered arrays are not laid out by sample; fall back to a full load.
            with zipfile.ZipFile(self.path) as zf, zf.open(a.member) as fp:
                full = np.lib.format.read_array(fp, allow_pickle=False)
            return np.ascontiguousarray(full[start:stop])
        per_sample = a.sample_bytes
        with zipfile.ZipFile(self.path) as zf, zf.open(a.member) as fp:
            _read_header(fp, a.member)
            _skip(fp, start * per_sample)
            nbytes = (stop - start) * per_sample
            buf = fp.read(nbytes)
        if len(buf) != nbytes:
            raise EngineError("invalid_dataset", f"array '{name}' is truncated")
        return _decode(buf, a, stop - start)

    def iter_chunks(self, name: str, start: int, stop: int, chunk: int) -> Iterator[np.ndarray]:
        """Consecutive chunks of samples from one open member: one decompression pass."""
        a = self.info.arrays[name]
        if a.fortran_order and len(a.shape) > 1:
            for s in range(start, stop, chunk):
                yield self.read(name, s, min(s + chunk, stop))
            return
        per_sample = a.sample_bytes
        with zipfile.ZipFile(self.path) as zf, zf.open(a.member) as fp:
            _read_header(fp, a.member)
            _skip(fp, start * per_sample)
            for s in range(start, stop, chunk):
                n = min(chunk, stop - s)
                buf = fp.read(n * per_sample)
                if len(buf) != n * per_sample:
                    raise EngineError("invalid_dataset", f"array '{name}' is truncated")
                yield _decode(buf, a, n)


def _decode(buf: bytes, a: ArrayInfo, n: int) -> np.ndarray:
    stored = np.dtype(a.descr or a.dtype)
    arr = np.frombuffer(buf, dtype=stored).reshape((n, *a.shape[1:]))
    # Always hand out native byte order, writable memory.
    return arr.astype(np.dtype(a.dtype), copy=True)


def _skip(fp: IO[bytes], nbytes: int) -> None:
    while nbytes > 0:
        got = fp.read(min(nbytes, 1 << 22))
        if not got:
            raise EngineError("invalid_dataset", "unexpected end of array data")
        nbytes -= len(got)
