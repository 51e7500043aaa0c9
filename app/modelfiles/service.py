from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound, from_engine
from app.modelfiles.models import ModelFile
from app.settings import Settings
from app.storage import Storage, Stored
from app.tenants import service as tenants
from app.uploads import clean_filename, is_uuid, new_id
from worker.engine import bundle, pt2
from worker.engine.errors import EngineError
from worker.engine.inspect import ModelInfo, check_model, parse_model_bytes

REFUSED_SUFFIXES = {
    ".pt": "a pickled PyTorch checkpoint",
    ".pth": "a pickled PyTorch checkpoint",
    ".pkl": "a Python pickle",
    ".bin": "a raw weights file",
    ".safetensors": "a weights-only file",
}


def create_model(db: Session, storage: Storage, *, src: BinaryIO, filename: str | None, max_bytes: int,
                 tenant_id: str, settings: Settings | None = None) -> ModelFile:
    """Store an uploaded model after checking that it is a loadable ONNX model, a .zip/.tar bundle of one with
    its external data files, or a torch.export archive (.pt2, checked without unpickling and loaded in a child
    process). With ``settings``, refused (507) if it would take the tenant past its storage quota."""
    name = clean_filename(filename, "model.onnx")
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix in REFUSED_SUFFIXES:
        raise Invalid(
            f"'{name}' looks like {REFUSED_SUFFIXES[suffix]}, which lowbit does not load (it could run "
            f"arbitrary code). Upload an ONNX export, or {pt2.HOW_TO_MAKE_PT2}",
            code="unsupported_model_format",
        )
    stored = storage.receive(src, max_bytes)
    return store_model(db, storage, stored=stored, name=name, suffix=suffix, tenant_id=tenant_id, settings=settings)


def store_model(db: Session, storage: Storage, *, stored: Stored, name: str, suffix: str, tenant_id: str,
                settings: Settings | None = None) -> ModelFile:
    """Check a received file (an ONNX model, a .pt2 archive, or a .zip/.tar bundle of an ONNX model with its
    external data) and keep it: the row is added (not committed) and the file placed; the temp file goes
    either way."""
    if bundle.is_bundle_name(name):
        return _store_bundle(db, storage, stored=stored, name=name, tenant_id=tenant_id, settings=settings)
    try:
        if settings is not None:
            tenants.check_storage_quota(db, tenant_id, settings=settings, adding=stored.size_bytes, what="this upload")
        try:
            info = _inspect(storage, stored.path, suffix=suffix)
        except EngineError as exc:
            raise from_engine(exc) from exc
        model_id = new_id()
        dest = storage.place(stored.path, storage.model_path(model_id, "." + info.format))
    except BaseException:
        storage.discard(stored.path)
        raise
    row = ModelFile(
        id=model_id,
        tenant_id=tenant_id,
        filename=name,
        format=info.format,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        opset=info.opset,
        inputs=[i.to_dict() for i in info.inputs],
        outputs=[o.to_dict() for o in info.outputs],
        storage_path=str(dest),
    )
    db.add(row)
    db.flush()
    return row


def _store_bundle(db: Session, storage: Storage, *, stored: Stored, name: str, tenant_id: str,
                  settings: Settings | None) -> ModelFile:
    """Unpack a bundle into models/<id>/ (every member checked first, worker/engine/bundle.py), then check the
    model and every external reference against that folder. The archive itself is not kept."""
    model_id = new_id()
    folder = storage.model_dir(model_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    limit = settings.max_bundle_bytes if settings is not None else bundle_default_limit()
    try:
        try:
            def quota(declared: int) -> None:  # before a byte is unpacked
                if settings is not None:
                    tenants.check_storage_quota(db, tenant_id, settings=settings, adding=declared,
                                                what="this upload")

            unpacked = bundle.unpack(stored.path, folder, limit, quota)
            info = check_model(parse_model_bytes(unpacked.model.read_bytes()), unpacked.model)
        except EngineError as exc:
            raise from_engine(exc) from exc
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        storage.discard(stored.path)
    row = ModelFile(
        id=model_id, tenant_id=tenant_id, filename=name, format=info.format, size_bytes=unpacked.total_bytes,
        sha256=stored.sha256, opset=info.opset, inputs=[i.to_dict() for i in info.inputs],
        outputs=[o.to_dict() for o in info.outputs], storage_path=str(unpacked.model),
        external_data_bytes=info.external_bytes,
    )
    db.add(row)
    db.flush()
    return row


def bundle_default_limit() -> int:
    return int(Settings.model_fields["max_bundle_bytes"].default)


def _inspect(storage: Storage, path: Path, *, suffix: str) -> ModelInfo:
    """A zip is a torch.export archive or nothing; a .pt2 that is not a zip gets the .pt2 explanation unless it
    is, after all, an ONNX model."""
    if pt2.looks_like_zip(path):
        return _inspect_pt2(storage, path)
    if suffix == ".pt2":
        try:
            return check_model(parse_model_bytes(path.read_bytes()))
        except EngineError:
            pt2.check_archive(path)  # raises the archive's own error
            raise
    return check_model(parse_model_bytes(path.read_bytes()))


def _inspect_pt2(storage: Storage, path: Path) -> ModelInfo:
    """Static checks here; loading and describing in a child process (this process never imports torch)."""
    work = storage.incoming() / f"pt2-{uuid.uuid4().hex}"
    try:
        return pt2.inspect_pt2(path, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def get_model(db: Session, model_id: str, *, tenant_id: str) -> ModelFile:
    """The tenant's model; another tenant's answers exactly like a missing one."""
    row = db.get(ModelFile, model_id) if is_uuid(model_id) else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no model with id '{model_id}'", code="model_not_found")
    return row


def find_by_sha256(db: Session, sha256: str, *, tenant_id: str) -> ModelFile | None:
    """The newest stored model with exactly this content (its file still in storage), so a client can skip
    uploading a file the server already has."""
    rows = db.query(ModelFile).filter(ModelFile.sha256 == sha256.lower(), ModelFile.tenant_id == tenant_id) \
        .order_by(ModelFile.created_at.desc())
    return next((row for row in rows.limit(10) if Path(row.storage_path).is_file()), None)
