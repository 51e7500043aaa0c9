"""Server secrets kept in the data directory, generated once by whichever process needs them first."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def data_dir_secret(data_dir: Path, filename: str) -> str:
    """The secret in ``data_dir/filename`` (mode 0600), created atomically if missing, so the API and
    every worker sharing the data directory agree on it."""
    path = Path(data_dir) / filename
    existing = _read(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{filename}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)  # fails if another process got there first: then theirs is the secret
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    secret = _read(path)
    if not secret:
        raise RuntimeError(f"could not read the secret from {path}")
    return secret


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
