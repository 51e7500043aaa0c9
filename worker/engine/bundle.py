"""Unpacking an uploaded model bundle (a ``.zip`` or ``.tar`` holding one ``.onnx`` file and its external data
files) without trusting it.

Every member is checked before a byte of it is written: a plain relative name (no absolute path, drive, ``..``,
backslash or control character), a regular file or a folder (no links, devices or FIFOs), no name twice. The
number of members and the bytes they unpack to are bounded, and counted as they are written, so a member
that expands beyond what it declared (a zip bomb) stops the unpacking. Files are created only inside the
destination, never replacing anything, with O_NOFOLLOW. Nothing outside the destination is opened.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from worker.engine.errors import EngineError

BUNDLE_SUFFIXES = (".zip", ".tar")
MAX_MEMBERS = 1000
# Names: at most this long in all, and each part at most 255 bytes (what file systems take).
MAX_NAME = 1024
MAX_PART = 255
# The .onnx file itself holds the graph and small tensors; protobuf cannot parse one over 2 GB, and it is read
# whole to be parsed, so a larger one is refused before it is unpacked.
MAX_MODEL_FILE = (2 << 30) - 1
# A member unpacking to more than this many times its compressed size, once past MIN_RATIO_BYTES, is refused:
# weights hardly compress (float32 weights zip to about 90% of their size); what expands a thousandfold is
# a bomb.
MAX_RATIO = 100
MIN_RATIO_BYTES = 16 << 20
CHUNK = 1 << 20
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class Unpacked:
    model: Path  # the .onnx file, inside the destination
    files: int
    total_bytes: int


def is_bundle_name(name: str) -> bool:
    return name.lower().endswith(BUNDLE_SUFFIXES)


def _refuse(why: str) -> EngineError:
    return EngineError("unsafe_bundle", f"the bundle was refused: {why}")


def safe_member_name(name: str) -> PurePosixPath:
    """A member's name as a relative path inside the destination, or the reason it cannot be one."""
    shown = repr(name[:120])
    if not name or _BAD_NAME.search(name):
        raise _refuse(f"member {shown} has an empty name or one with a backslash or control character")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _refuse(f"member {shown} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise _refuse(f"member {shown} steps out of the bundle's folder")
    if len(name) > MAX_NAME or any(len(p.encode()) > MAX_PART for p in parts):
        raise _refuse(f"member {shown} has a name longer than {MAX_NAME} characters or a part over {MAX_PART} bytes")
    return PurePosixPath(*parts)


@dataclass(frozen=True)
class _Member:
    name: PurePosixPath
    is_dir: bool
    size: int  # declared, unpacked
    packed: int  # compressed size (zip), else the size


def _zip_members(zf: zipfile.ZipFile) -> list[tuple[_Member, zipfile.ZipInfo]]:
    out = []
    if len(zf.infolist()) > MAX_MEMBERS:
        raise _refuse(f"it has more than {MAX_MEMBERS} members")
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if info.flag_bits & 0x1:
            raise _refuse(f"member {info.filename[:120]!r} is encrypted")
        # Unix zips carry the file type in the high bits (0 when the writer set none: a plain file).
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _refuse(f"member {info.filename[:120]!r} is a link or a special file")
        is_dir = info.is_dir()
        out.append((_Member(safe_member_name(info.filename.rstrip("/") if is_dir else info.filename), is_dir,
                            info.file_size, info.compress_size), info))
    return out


def _tar_members(tf: tarfile.TarFile) -> list[tuple[_Member, tarfile.TarInfo]]:
    out: list[tuple[_Member, tarfile.TarInfo]] = []
    for info in tf:  # reads headers only, and stops once there are too many
        if len(out) >= MAX_MEMBERS:
            raise _refuse(f"it has more than {MAX_MEMBERS} members")
        if not (info.isreg() or info.isdir()):
            kind = "link" if info.issym() or info.islnk() else "special file"
            raise _refuse(f"member {info.name[:120]!r} is a {kind}")
        out.append((_Member(safe_member_name(info.name), info.isdir(), info.size, info.size), info))
    return out


def _check(members: list[_Member], max_bytes: int) -> int:
    """Check the members' names, kinds and declared sizes; returns the bytes they unpack to."""
    if len(members) > MAX_MEMBERS:
        raise _refuse(f"it has more than {MAX_MEMBERS} members")
    seen: set[str] = set()
    files = {str(m.name) for m in members if not m.is_dir}
    total = 0
    for m in members:
        key = str(m.name)
        if key in seen:
            raise _refuse(f"member '{key[:120]}' appears twice")
        seen.add(key)
        # A file whose name is also used as a folder on another member's path.
        for parent in m.name.parents:
            if str(parent) in files:
                raise _refuse(f"member '{key[:120]}' lies under '{str(parent)[:120]}', which is a file")
        if m.is_dir:
            continue
        total += m.size
        if m.size > MIN_RATIO_BYTES and m.size > MAX_RATIO * max(m.packed, 1):
            raise _refuse(f"member '{key[:120]}' unpacks to {m.size} bytes from {m.packed} "
                          f"(more than {MAX_RATIO} times): a compression bomb")
    if total > max_bytes:
        raise _refuse(f"it unpacks to {total} bytes, more than this server's limit of {max_bytes}")
    models = [m for m in members if not m.is_dir and m.name.suffix.lower() == ".onnx"]
    if len(models) != 1:
        raise EngineError("invalid_model", f"a bundle holds exactly one .onnx file and its data files; this one "
                          f"holds {len(models)} .onnx files"
                          + (f" ({', '.join(str(m.name)[:80] for m in models[:5])})" if models else ""))
    if models[0].size > MAX_MODEL_FILE:
        raise EngineError("invalid_model", f"'{str(models[0].name)[:120]}' is {models[0].size} bytes; an .onnx file "
                          "holds at most 2 GB (protobuf's limit): save the weights as external data beside it")
    return total


def _create(dest: Path, rel: PurePosixPath) -> int:
    """A new file at dest/rel, its folders made inside dest, never following a link or replacing a file."""
    here = dest
    try:
        for part in rel.parts[:-1]:
            here = here / part
            try:
                os.mkdir(here, 0o750)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(here).st_mode):
                    raise _refuse(f"'{rel}' lies under a file") from None
        return os.open(here / rel.parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    except OSError as exc:  # a name the file system will not take, a second member of the same name
        raise _refuse(f"member '{str(rel)[:120]}' cannot be created: {exc.strerror}") from exc


def _copy(src: IO[bytes], fd: int, declared: int, name: str, budget: list[int]) -> int:
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            budget[0] -= len(chunk)
            if written > declared or budget[0] < 0:
                raise _refuse(f"member '{name[:120]}' unpacks to more than it declares")
            out.write(chunk)
    if written != declared:
        raise _refuse(f"member '{name[:120]}' holds {written} bytes, not the {declared} it declares")
    return written


@contextmanager
def _open_archive(path: Path) -> Iterator[tuple[str, object]]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            yield "zip", zf
        return
    try:
        tf = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed below
    except tarfile.TarError:
        raise EngineError("invalid_model", "the bundle is neither a zip nor an uncompressed tar archive; pack "
                          "the .onnx file and its data files with `zip -0` or `tar cf`") from None
    try:
        yield "tar", tf
    finally:
        tf.close()


def unpack(archive: Path, dest: Path, max_bytes: int,
           before_writing: Callable[[int], None] | None = None) -> Unpacked:
    """Unpack ``archive`` into the new folder ``dest`` (which must not exist) after checking every member;
    ``max_bytes`` bounds what it may unpack to, and ``before_writing`` gets the declared total before anything
    is written (a storage quota check). On failure ``dest`` is left for the caller to remove."""
    os.mkdir(dest, 0o750)
    try:
        return _unpack(Path(archive), dest, max_bytes, before_writing or (lambda _n: None))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, NotImplementedError, zipfile.LargeZipFile,
            ValueError, OverflowError) as exc:
        raise EngineError("invalid_model", f"the bundle could not be read: {str(exc)[:300]}") from exc


def _unpack(archive: Path, dest: Path, max_bytes: int, before_writing: Callable[[int], None]) -> Unpacked:
    budget = [max_bytes]
    total = 0
    with _open_archive(archive) as (kind, arc):
        if isinstance(arc, zipfile.ZipFile):
            zmembers = _zip_members(arc)
            members = [m for m, _ in zmembers]
            before_writing(_check(members, max_bytes))
            for m, zinfo in zmembers:
                if not m.is_dir:
                    with arc.open(zinfo) as src:
                        total += _copy(src, _create(dest, m.name), m.size, str(m.name), budget)
        else:
            assert isinstance(arc, tarfile.TarFile) and kind == "tar"
            tmembers = _tar_members(arc)
            members = [m for m, _ in tmembers]
            before_writing(_check(members, max_bytes))
            for m, tinfo in tmembers:
                if m.is_dir:
                    continue
                member = arc.extractfile(tinfo)
                if member is None:
                    raise _refuse(f"member '{str(m.name)[:120]}' cannot be read as a file")
                with member:
                    total += _copy(member, _create(dest, m.name), m.size, str(m.name), budget)
    onnx_member = next(m for m in members if not m.is_dir and m.name.suffix.lower() == ".onnx")
    return Unpacked(dest / onnx_member.name, sum(1 for m in members if not m.is_dir), total)
