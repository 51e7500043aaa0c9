"""Recognising a torch.export archive (.pt2) without loading what reads one.

``pt2`` (the export, its child process and their imports: multiprocessing, OpenSSL's hashing) loads only for a
.pt2 upload; an ONNX job asks these questions and goes on without it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

MAX_MEMBERS = 200_000

HOW_TO_MAKE_PT2 = (
    "save the model as a torch.export archive instead: "
    "torch.export.save(torch.export.export(model.eval(), example_inputs, dynamic_shapes=...), 'model.pt2'), "
    "e.g. dynamic_shapes=({0: torch.export.Dim('batch')},) for one input with a dynamic batch axis"
)


def looks_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def is_pt2(path: Path) -> bool:
    """A zip with a top-level ``<name>/archive_format`` member: what the pipeline treats as a .pt2."""
    try:
        if not looks_like_zip(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return any(n.count("/") == 1 and n.endswith("/archive_format") for n in zf.namelist()[:MAX_MEMBERS])
    except (OSError, zipfile.BadZipFile):
        return False
