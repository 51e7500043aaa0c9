from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.datasets.models import Dataset
from app.errors import NotFound, from_engine
from app.settings import Settings
from app.storage import Storage
from app.tenants import service as tenants
from app.uploads import clean_filename, is_uuid, new_id
from worker.engine.errors import EngineError
from worker.engine.npz import ArrayInfo, DatasetInfo, inspect_npz


def create_dataset(db: Session, storage: Storage, *, src: BinaryIO, filename: str | None, max_bytes: int,
                   tenant_id: str, settings: Settings | None = None) -> Dataset:
    """Store an uploaded .npz after reading its array headers (never unpickling anything). With ``settings``,
    refused (507) if it would take the tenant past its storage quota."""
    name = clean_filename(filename, "data.npz")
    stored = storage.receive(src, max_bytes)
    try:
        if settings is not None:
            tenants.check_storage_quota(db, tenant_id, settings=settings, adding=stored.size_bytes, what="this upload")
        try:
            info = inspect_npz(stored.path)
        except EngineError as exc:
            raise from_engine(exc) from exc
        dataset_id = new_id()
        dest = storage.place(stored.path, storage.dataset_path(dataset_id))
    except BaseException:
        storage.discard(stored.path)
        raise
    row = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        filename=name,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        num_samples=info.num_samples,
        arrays={k: v.to_dict() for k, v in info.arrays.items()},
        storage_path=str(dest),
    )
    db.add(row)
    db.flush()
    return row


def get_dataset(db: Session, dataset_id: str, *, tenant_id: str, role: str = "dataset") -> Dataset:
    """The tenant's dataset; another tenant's answers exactly like a missing one."""
    row = db.get(Dataset, dataset_id) if is_uuid(dataset_id) else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no {role} with id '{dataset_id}'", code="dataset_not_found")
    return row


def find_by_sha256(db: Session, sha256: str, *, tenant_id: str) -> Dataset | None:
    """The newest stored dataset with exactly this content (its file still in storage), so a client can skip
    uploading a file the server already has."""
    rows = db.scalars(sa.select(Dataset).where(Dataset.sha256 == sha256.lower(), Dataset.tenant_id == tenant_id)
                      .order_by(Dataset.created_at.desc()).limit(10))
    return next((row for row in rows if Path(row.storage_path).is_file()), None)


def dataset_info(row: Dataset) -> DatasetInfo:
    """The stored header summary, in the engine's terms (for pre-flight checks without reading the file)."""
    arrays = {
        name: ArrayInfo(name, spec["dtype"], tuple(spec["shape"]), f"{name}.npy", False)
        for name, spec in row.arrays.items()
    }
    return DatasetInfo(arrays, row.num_samples)
