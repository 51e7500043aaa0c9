"""Local file storage under the data directory. Files are written to a temp name and renamed."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.errors import TooLarge

CHUNK = 1 << 20


@dataclass(frozen=True)
class Stored:
    path: Path
    size_bytes: int
    sha256: str


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def model_path(self, model_id: str, suffix: str = ".onnx") -> Path:
        return self.root / "models" / f"{model_id}{suffix}"

    def model_dir(self, model_id: str) -> Path:
        """The folder of a model uploaded as a bundle (its .onnx file and external data files)."""
        return self.root / "models" / model_id

    def upload_path(self, upload_id: str) -> Path:
        """A resumable upload's file, its parts written in place as they arrive."""
        return self.root / "uploads" / f"{upload_id}.part"

    def dataset_path(self, dataset_id: str) -> Path:
        return self.root / "datasets" / f"{dataset_id}.npz"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def incoming(self) -> Path:
        d = self.root / "incoming"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def receive(self, src: BinaryIO, max_bytes: int) -> Stored:
        """Copy an upload to a temp file in chunks, hashing on the way; 413 past ``max_bytes``."""
        fd, tmp = tempfile.mkstemp(dir=self.incoming(), suffix=".part")
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                    h.update(chunk)
                    out.write(chunk)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Stored(Path(tmp), size, h.hexdigest())

    def place(self, tmp: Path, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return dest

    def discard(self, path: Path | str | None) -> None:
        """Remove a stored file; a bundle's model file takes its whole folder (models/<id>/) with it."""
        if not path:
            return
        p = Path(path)
        models = self.root / "models"
        rel = p.relative_to(models).parts if p.is_relative_to(models) else ()
        if len(rel) >= 2:  # models/<id>/.../model.onnx: the bundle's folder
            shutil.rmtree(models / rel[0], ignore_errors=True)
            return
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            return
        p.unlink(missing_ok=True)

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
