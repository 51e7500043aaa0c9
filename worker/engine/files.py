"""File and environment helpers every part of the engine uses: content hashes, atomic placement of a finished
file, and the library versions a report and a cache key record."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

# Inputs from this size on are hashed by OpenSSL (hashlib's default): CPython's own SHA-256 took 3.1 ms a MB on
# this project's machine against OpenSSL's 0.66, so below it the builtin costs at most about 80 ms more.
OPENSSL_FROM_BYTES = 32 << 20


def builtin_hash(name: str, data: bytes = b"") -> Any:
    """A hash object (``name``: sha256 or sha1) from CPython's own implementation where the build has it, else
    from hashlib. hashlib's default maps OpenSSL's libcrypto, 3.3 MB of resident pages, into the process: on a
    small model, whose whole job sits near the interpreter's floor, that was a visible share of the job's peak
    (and the only other reason the engine loaded it went with numpy.random; metrics.resample_indices)."""
    modules = {"sha256": ("_sha2", "_sha256"), "sha1": ("_sha1",)}[name]
    for module in modules:  # _sha2 from Python 3.12, _sha256 before
        try:
            return getattr(importlib.import_module(module), name)(data)
        except (ImportError, AttributeError):
            continue
    # lazy: only where the interpreter was built without its own hashes
    import hashlib

    return hashlib.new(name, data)


def sha256_for(total_bytes: int) -> Any:
    """A SHA-256 object for an input of ``total_bytes``: OpenSSL's from OPENSSL_FROM_BYTES on, where its speed
    counts and its pages are small against the job, else CPython's own (builtin_hash)."""
    if total_bytes >= OPENSSL_FROM_BYTES:
        # lazy: loads OpenSSL's libcrypto, which a job on small files goes without
        import hashlib

        return hashlib.sha256()
    return builtin_hash("sha256")


def sha256_file(path: Path) -> str:
    h = sha256_for(os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return str(h.hexdigest())


def environment() -> dict[str, str | None]:
    def v(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "lowbit": v("lowbit"),
        "onnxruntime": v("onnxruntime") or v("onnxruntime-gpu"),
        "onnx": v("onnx"),
        "torch": v("torch"),
        "python": platform.python_version(),
        "numpy": v("numpy"),
        "platform": platform.platform(),
    }


def place(src: Path, dest: Path) -> None:
    """Write to a temp file beside the destination, then rename: readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_in(work_dir: Path | None) -> Path | None:
    """Send this process's temporary files into the job's work folder (returned: ``work_dir/tmp``). ONNX
    Runtime's quantizer writes whole copies of the model to the temp folder; the worker removes the work
    folder after every attempt, also one whose child was killed at a limit, whereas files in the system temp
    folder would stay."""
    if work_dir is None:
        return None
    tmp = Path(os.path.abspath(work_dir)) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp)
    os.environ["TMPDIR"] = str(tmp)  # for processes the engine starts (the .pt2 export child)
    return tmp
