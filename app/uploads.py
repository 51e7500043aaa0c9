"""Helpers shared by the upload services."""

from __future__ import annotations

import re
import uuid

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def new_id() -> str:
    return str(uuid.uuid4())


def clean_filename(name: str | None, default: str) -> str:
    """The original name, for display only: no directories, no control characters, bounded length.
    Files are always stored under server-generated names."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _CONTROL.sub("", base).strip()
    return base[:255] or default


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True
