"""Resumable uploads: a large file sent in parts, in any order, each part retried as often as needed, and
finished into a model. Each part is streamed to its place in one preallocated file (the API process holds a
chunk of it at a time), the database records which parts arrived, and an upload interrupted by a client or a
server restart goes on from the parts it has."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, LowbitError, NotFound, TooLarge
from app.limits import MAX_PART_BYTES
from app.modelfiles import service as models
from app.modelfiles.models import ModelFile
from app.resumable.models import COMPLETE, FINISHING, RECEIVING, Upload, UploadPart
from app.resumable.schemas import UploadCreate, UploadOut
from app.settings import Settings
from app.storage import Storage, Stored
from app.tenants import service as tenants
from app.uploads import clean_filename, is_uuid, new_id

ACCEPTED_SUFFIXES = (".onnx", ".pt2", ".zip", ".tar")
MAX_LISTED = 1000


class UploadRefused(Exception):
    """The finished file is not a model lowbit takes (``error`` says why); its data is gone, so the upload goes."""

    def __init__(self, error: LowbitError) -> None:
        super().__init__(error.message)
        self.error = error


def create_upload(db: Session, storage: Storage, *, req: UploadCreate, tenant_id: str,
                  settings: Settings) -> Upload:
    """Announce a file: refused now if it is too large for the server or the tenant's storage quota."""
    name = clean_filename(req.filename, "model.onnx")
    if not name.lower().endswith(ACCEPTED_SUFFIXES):
        raise Invalid(f"'{name}' is not a file a model can be made of: resumable uploads take "
                      f"{', '.join(ACCEPTED_SUFFIXES)} files (a bundle: one .onnx and its external data files)",
                      code="unsupported_model_format")
    if req.size_bytes > settings.max_bundle_bytes:
        raise TooLarge(f"the file is {req.size_bytes} bytes, more than this server's limit of "
                       f"{settings.max_bundle_bytes} (LOWBIT_MAX_BUNDLE_BYTES)", code="upload_too_large")
    tenants.check_storage_quota(db, tenant_id, settings=settings, adding=req.size_bytes, what="this upload")
    row = Upload(id=new_id(), tenant_id=tenant_id, filename=name, size_bytes=req.size_bytes,
                 sha256=req.sha256.lower(), part_bytes=min(settings.upload_part_bytes, MAX_PART_BYTES))
    path = storage.upload_path(row.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(req.size_bytes)  # sparse: the disk fills as parts arrive
    db.add(row)
    db.flush()
    return row


def get_upload(db: Session, upload_id: str, *, tenant_id: str, lock: bool = False) -> Upload:
    """The tenant's upload; another tenant's answers exactly like a missing one. ``lock``: held (FOR UPDATE on
    PostgreSQL) until the transaction ends, so that one request finishes an upload at a time."""
    row = (db.get(Upload, upload_id, with_for_update=lock, populate_existing=lock)
           if is_uuid(upload_id) else None)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no upload with id '{upload_id}'", code="upload_not_found")
    return row


def find_unfinished(db: Session, sha256: str, *, tenant_id: str) -> list[Upload]:
    """The tenant's unfinished uploads of the file with this SHA-256, newest first."""
    return list(db.scalars(sa.select(Upload).where(Upload.sha256 == sha256.lower(), Upload.tenant_id == tenant_id,
                                                   Upload.status == RECEIVING)
                           .order_by(Upload.created_at.desc()).limit(5)))


def part_count(row: Upload) -> int:
    return -(-row.size_bytes // row.part_bytes)


def part_span(row: Upload, index: int) -> tuple[int, int]:
    """Where part ``index`` goes in the file: (offset, length)."""
    count = part_count(row)
    if not 0 <= index < count:
        raise NotFound(f"upload '{row.id}' has parts 0..{count - 1}; there is no part {index}",
                       code="part_not_found")
    offset = index * row.part_bytes
    return offset, min(row.part_bytes, row.size_bytes - offset)


def received(db: Session, row: Upload) -> list[int]:
    return list(db.scalars(sa.select(UploadPart.index).where(UploadPart.upload_id == row.id)
                           .order_by(UploadPart.index)))


def describe(db: Session, row: Upload) -> UploadOut:
    got = received(db, row)
    have = set(got)
    missing = [i for i in range(part_count(row)) if i not in have][:MAX_LISTED]
    return UploadOut(id=row.id, filename=row.filename, size_bytes=row.size_bytes, sha256=row.sha256,
                     part_bytes=row.part_bytes, parts=part_count(row), received=got, missing=missing,
                     status=row.status, model_id=row.model_id, created_at=row.created_at)


async def write_part(storage: Storage, row: Upload, *, index: int, body: AsyncIterator[bytes],
                     declared_sha256: str | None) -> str:
    """Stream one part's body into its place in the file; returns its SHA-256. Refused (422) when it is not
    exactly the part's length or not the hash the client declared; nothing is recorded then, and the part
    can be sent again."""
    if row.status == COMPLETE:
        raise Conflict(f"upload '{row.id}' is complete (model {row.model_id}); it takes no more parts",
                       code="upload_complete")
    offset, length = part_span(row, index)
    h = hashlib.sha256()
    written = 0
    try:
        fd = os.open(storage.upload_path(row.id), os.O_WRONLY)
    except FileNotFoundError:
        raise Conflict(f"upload '{row.id}' is being finished or was deleted; it takes no more parts",
                       code="upload_closed") from None
    try:
        async for chunk in body:
            if not chunk:
                continue
            if written + len(chunk) > length:
                raise Invalid(f"part {index} is {length} bytes long; more was sent", code="part_length_mismatch")
            os.pwrite(fd, chunk, offset + written)
            h.update(chunk)
            written += len(chunk)
    finally:
        os.close(fd)
    if written != length:
        raise Invalid(f"part {index} is {length} bytes long; {written} arrived (send it again)",
                      code="part_length_mismatch")
    digest = h.hexdigest()
    if declared_sha256 is not None and declared_sha256.lower() != digest:
        raise Invalid(f"part {index} arrived with SHA-256 {digest}, not the {declared_sha256} its "
                      "Content-SHA256 header declared (send it again)", code="part_checksum_mismatch")
    return digest


def record_part(db: Session, upload_id: str, *, index: int, sha256: str) -> None:
    """Note that part ``index`` arrived (again: its hash is replaced)."""
    part = db.get(UploadPart, (upload_id, index))
    if part is None:
        db.add(UploadPart(upload_id=upload_id, index=index, sha256=sha256))
    else:
        part.sha256 = sha256
    db.flush()


def forget_part(db: Session, upload_id: str, *, index: int) -> None:
    """A part whose sending failed: its bytes in the file were overwritten in part, so it is missing again."""
    db.execute(sa.delete(UploadPart).where(UploadPart.upload_id == upload_id, UploadPart.index == index))
    db.flush()


def complete(db: Session, storage: Storage, *, row: Upload, settings: Settings) -> ModelFile:
    """Check that every part arrived and the whole file has the announced SHA-256, then make it a model (checked
    as a one-shot upload is: a bundle unpacked and every reference checked). Finishing a finished upload
    returns its model again."""
    if row.status == COMPLETE and row.model_id:
        return models.get_model(db, row.model_id, tenant_id=row.tenant_id)
    path = storage.upload_path(row.id)
    if not path.exists():
        db.refresh(row)  # another finish may have just made the model (SQLite takes no row lock)
        if row.status == COMPLETE and row.model_id:
            return models.get_model(db, row.model_id, tenant_id=row.tenant_id)
        # A finish cut off after its file was consumed (a server killed mid-way).
        raise UploadRefused(Conflict(f"upload '{row.id}' lost its file while being finished; start the upload "
                                     "again", code="upload_lost"))
    have = set(received(db, row))
    missing = [i for i in range(part_count(row)) if i not in have]
    if missing:
        raise Conflict(f"upload '{row.id}' is missing {len(missing)} of its {part_count(row)} parts "
                       f"({', '.join(map(str, missing[:20]))}{'...' if len(missing) > 20 else ''}); send them, "
                       "then finish it", code="upload_incomplete", extra={"missing": missing[:MAX_LISTED]})
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != row.sha256:
        raise Invalid(f"the file's SHA-256 is {h.hexdigest()}, not the {row.sha256} announced; a part was "
                      "corrupted on the way or the file changed; send the parts again (a Content-SHA256 header on "
                      "each part lets the server check it as it arrives)", code="checksum_mismatch")
    suffix = "." + row.filename.rsplit(".", 1)[-1].lower()
    # No longer counted as an upload against the quota: the model it becomes is counted instead.
    row.status = FINISHING
    db.flush()
    stored = Stored(path, row.size_bytes, row.sha256)
    try:
        model = models.store_model(db, storage, stored=stored, name=row.filename, suffix=suffix,
                                   tenant_id=row.tenant_id, settings=settings)
    except LowbitError as exc:
        raise UploadRefused(exc) from exc
    row.status, row.model_id = COMPLETE, model.id
    db.flush()
    return model


def delete_upload(db: Session, storage: Storage, *, row: Upload) -> None:
    storage.discard(storage.upload_path(row.id))
    db.execute(sa.delete(UploadPart).where(UploadPart.upload_id == row.id))
    db.delete(row)
    db.flush()
