"""Content hashes (worker/engine/files.py): CPython's own SHA-256 for small inputs, OpenSSL's for large ones, the
same digests either way."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from worker.engine import files


def test_small_inputs_use_the_builtin_hash_and_large_ones_openssl_with_the_same_digest(tmp_path: Path) -> None:
    data = os.urandom(3000)
    small, large = files.sha256_for(len(data)), files.sha256_for(files.OPENSSL_FROM_BYTES)
    assert type(small).__module__ != "_hashlib" and type(large).__module__ == "_hashlib"
    small.update(data)
    large.update(data)
    assert small.hexdigest() == large.hexdigest() == hashlib.sha256(data).hexdigest()
    assert files.builtin_hash("sha1", data).hexdigest() == hashlib.sha1(data).hexdigest()
    path = tmp_path / "f.bin"
    path.write_bytes(data * 700)  # 2.1 MB: more than one read
    assert files.sha256_file(path) == hashlib.sha256(data * 700).hexdigest()
