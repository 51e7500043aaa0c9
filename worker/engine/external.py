"""Models that keep their weights in ONNX external data files (``model.onnx`` beside ``model.onnx.data``).

Such a model arrives as a folder (an upload's bundle, unpacked by the API). Every external reference is
checked before anything is read: its location is a plain relative path inside the model's own folder (no
absolute path, no ``..``, no link anywhere on the way, a regular file), its offset and length lie within the
file, its length is what the tensor's type and shape need, and no two tensors share bytes. Weights are then
read one tensor at a time through read-only memory maps, so a model of many gigabytes is never held whole.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from onnx import TensorProto, numpy_helper

from worker.engine.errors import EngineError

# The keys ONNX's external data entries may carry; anything else is a file this engine would not understand.
KNOWN_KEYS = {"location", "offset", "length", "checksum", "basepath"}
# Each tensor in an output data file starts on a page boundary, so ONNX Runtime can map it instead of copying.
ALIGN = 4096
# Fixed-size element types external tensors may hold (strings cannot be stored externally).
ITEM_BYTES: dict[int, int] = {
    TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1,
}


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor's bytes are: a file inside the model's folder and a byte range of it."""

    file: str  # the location, relative to the model's folder, as checked
    offset: int
    length: int


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def _short(text: str, n: int = 120) -> str:
    return repr(text[:n])[1:-1] + ("..." if len(text) > n else "")


def _bad(where: str, why: str) -> EngineError:
    return EngineError("unsafe_model", f"{where}: {why}; lowbit never opens a file outside the model's own folder")


def safe_location(location: str, where: str) -> PurePosixPath:
    """A location as ONNX writes it (a relative path with '/'), refused if it could leave the folder."""
    if not location:
        raise _bad(where, "its external data entry names no file")
    if "\x00" in location or "\\" in location:
        raise _bad(where, f"the data file name '{_short(location)}' holds a NUL or a backslash")
    p = PurePosixPath(location)
    if p.is_absolute() or location.startswith("~"):
        raise _bad(where, f"the data file '{_short(location)}' is an absolute path")
    parts = [part for part in location.split("/") if part != "."]
    if not parts or any(part in ("..", "") for part in parts):
        raise _bad(where, f"the data file '{_short(location)}' steps out of the folder ('..' or an empty part)")
    return PurePosixPath(*parts)


def _regular_file_inside(folder: Path, rel: PurePosixPath, where: str) -> os.stat_result:
    """The file's status, checked component by component without following links."""
    here = folder
    for i, part in enumerate(rel.parts):
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise EngineError("invalid_model", f"{where}: its data file '{_short(str(rel))}' is not in the "
                              "upload; a bundle must hold the .onnx file and every data file it names") from None
        if stat.S_ISLNK(st.st_mode):
            raise _bad(where, f"'{_short(str(rel))}' goes through a symbolic link")
        last = i == len(rel.parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise _bad(where, f"'{_short(str(rel))}' is not a path to a file")
        if last and not stat.S_ISREG(st.st_mode):
            raise _bad(where, f"'{_short(str(rel))}' is not a regular file")
    return st


def _int_key(value: str, key: str, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise EngineError("invalid_model", f"{where}: external data {key} '{_short(value)}' is not a number") from None
    if n < 0:
        raise EngineError("invalid_model", f"{where}: external data {key} {n} is negative")
    return n


def declared_bytes(t: TensorProto, where: str) -> int:
    item = ITEM_BYTES.get(int(t.data_type))
    if item is None:
        name = TensorProto.DataType.Name(t.data_type) if t.data_type else "UNDEFINED"
        raise EngineError("unsupported_model", f"{where}: a {name} tensor cannot be stored as external data")
    if any(int(d) < 0 for d in t.dims):
        raise EngineError("invalid_model", f"{where} declares a negative dimension {list(t.dims)}")
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * item


def check_ref(t: TensorProto, folder: Path, where: str, sizes: dict[str, int]) -> ExternalRef:
    """One tensor's external reference, checked against the folder; ``sizes`` caches each file's size."""
    entries = {e.key: e.value for e in t.external_data}
    unknown = sorted(set(entries) - KNOWN_KEYS)
    if unknown:
        raise EngineError("invalid_model", f"{where}: unknown external data keys {unknown[:5]}")
    if "basepath" in entries:
        raise _bad(where, "it sets a 'basepath' for its data file")
    rel = safe_location(entries.get("location", ""), where)
    key = str(rel)
    if key not in sizes:
        sizes[key] = _regular_file_inside(folder, rel, where).st_size
    size = sizes[key]
    offset = _int_key(entries.get("offset", "0"), "offset", where)
    need = declared_bytes(t, where)
    length = _int_key(entries["length"], "length", where) if "length" in entries else size - offset
    if offset > size or length > size - offset:
        raise EngineError("invalid_model", f"{where}: bytes {offset}..{offset + length} of '{_short(key)}' lie "
                          f"beyond the file's {size} bytes; the bundle is truncated or its model was altered")
    if length != need:
        raise EngineError("invalid_model", f"{where} declares shape {list(t.dims)} ({need} bytes) but its external "
                          f"data holds {length} bytes; the file is corrupt or crafted")
    return ExternalRef(key, offset, length)


def check_refs(tensors: Iterable[tuple[str, TensorProto]], folder: Path) -> dict[str, ExternalRef]:
    """Check the external references of ``tensors`` ((where, tensor) pairs: every external tensor of a model
    loaded without its data, inspect.external_tensors) against ``folder``; returns them by tensor name.
    Overlapping byte ranges are refused: a crafted file could otherwise make one range
    stand for many tensors (a small upload that expands into a huge model)."""
    folder = Path(folder)
    refs: dict[str, ExternalRef] = {}
    sizes: dict[str, int] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for where, t in tensors:
        ref = check_ref(t, folder, _short(where), sizes)
        if t.name in refs:
            raise EngineError("invalid_model", f"two external tensors are both named '{_short(t.name)}'")
        refs[t.name] = ref
        spans.setdefault(ref.file, []).append((ref.offset, ref.offset + ref.length, t.name))
    for file, ranges in spans.items():
        ranges.sort()
        for (_a0, a1, an), (b0, _b1, bn) in zip(ranges, ranges[1:], strict=False):
            if b0 < a1:
                raise EngineError("invalid_model", f"tensors '{_short(an)}' and '{_short(bn)}' share bytes of "
                                  f"'{_short(file)}'; each tensor must have its own range")
    return refs


def external_bytes(refs: dict[str, ExternalRef]) -> int:
    return sum(r.length for r in refs.values())


class TensorReader:
    """Reads a model's tensors one at a time: inline ones from the proto, external ones through a read-only
    memory map of their range (nothing else of the file is touched)."""

    def __init__(self, folder: Path, refs: dict[str, ExternalRef]) -> None:
        self.folder = Path(folder)
        self.refs = refs

    def rows(self, t: TensorProto, step: int) -> Iterator[tuple[int, np.ndarray]]:
        """A 2-D tensor ``step`` rows at a time: (first row, rows). External ones are read with plain file reads
        into a fresh buffer each time, so only one chunk is ever resident (a memory map's pages would count in
        the process's memory until it is unmapped)."""
        shape = tuple(int(d) for d in t.dims)
        if not is_external(t):
            a = numpy_helper.to_array(t)
            for r0 in range(0, shape[0], step):
                yield r0, a[r0:r0 + step]
            return
        ref = self.refs[t.name]
        dtype = np.dtype(numpy_helper.helper.tensor_dtype_to_np_dtype(t.data_type))
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        with open(self.folder / ref.file, "rb") as f:
            for r0 in range(0, shape[0], step):
                n = min(step, shape[0] - r0)
                f.seek(ref.offset + r0 * row_bytes)
                buf = np.fromfile(f, dtype=dtype, count=n * row_bytes // dtype.itemsize)
                yield r0, buf.reshape((n, *shape[1:]))

    def copy_bytes(self, t: TensorProto, out: DataWriter) -> ExternalRef:
        """Copy an external tensor's bytes to ``out`` in bounded chunks."""
        ref = self.refs[t.name]
        with open(self.folder / ref.file, "rb") as f:
            f.seek(ref.offset)
            return out.write_stream(f, ref.length)


class DataWriter:
    """Appends tensors to one external data file, each at a page-aligned offset."""

    CHUNK = 16 << 20

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.pos = 0

    def _align(self) -> int:
        pad = (-self.pos) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.pos += pad
        return self.pos

    def write_array(self, a: np.ndarray) -> ExternalRef:
        start = self._align()
        data = np.ascontiguousarray(a)
        # Written in slices: tobytes() of a large array would copy it whole.
        flat = data.reshape(-1).view(np.uint8) if data.size else np.zeros(0, np.uint8)
        for i in range(0, flat.size, self.CHUNK):
            self.file.write(flat[i:i + self.CHUNK].tobytes())
        self.pos += flat.size
        return ExternalRef(self.path.name, start, flat.size)

    def write_parts(self, parts: Iterable[np.ndarray]) -> ExternalRef:
        """One tensor written a part at a time (its slabs in order): one part is held at a time."""
        start = self._align()
        for part in parts:
            flat = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            for i in range(0, flat.size, self.CHUNK):
                self.file.write(flat[i:i + self.CHUNK].tobytes())
            self.pos += flat.size
        return ExternalRef(self.path.name, start, self.pos - start)

    def write_stream(self, src: object, length: int) -> ExternalRef:
        start = self._align()
        left = length
        read = src.read  # type: ignore[attr-defined]
        while left:
            chunk = read(min(self.CHUNK, left))
            if not chunk:
                raise EngineError("invalid_model", "a data file ended before the tensor it holds")
            self.file.write(chunk)
            left -= len(chunk)
        self.pos += length
        return ExternalRef(self.path.name, start, length)

    def close(self) -> None:
        self.file.close()


def point_to(t: TensorProto, ref: ExternalRef) -> None:
    """Make ``t`` (its data cleared) refer to ``ref``."""
    t.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", ref.file), ("offset", str(ref.offset)), ("length", str(ref.length))):
        e = t.external_data.add()
        e.key, e.value = k, v
