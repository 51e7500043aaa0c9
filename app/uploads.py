"""Helpers shared by the upload services."""

from __future__ import annotations

import re
import uuid

# C0/C1 control characters, and the Unicode format characters that reorder or hide text (bidi overrides
# and isolates, zero-width joiners): a name like 'model\u202egnp.onnx' would display as something else.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff]")
MAX_NAME = 255


def new_id() -> str:
    return str(uuid.uuid4())


def clean_filename(name: str | None, default: str) -> str:
    """The original name, for display only: no directories, no control characters, bounded length.
    Files are always stored under server-generated names."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _CONTROL.sub("", base).strip()
    if base in (".", ".."):
        base = ""
    if len(base) > MAX_NAME:
        # Keep the extension (it says what the file is meant to be) and cut the stem.
        stem, dot, ext = base.rpartition(".")
        base = f"{stem[: MAX_NAME - len(ext) - 1]}.{ext}" if dot and stem and len(ext) <= 16 else base[:MAX_NAME]
    return base or default


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True
