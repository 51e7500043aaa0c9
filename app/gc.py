"""Keeping the data directory in bounds: finished jobs' files go after the retention time (LOWBIT_RETENTION_DAYS;
the job's row, report and metadata stay, and its artifact answers 410 artifact_expired), and files that no row
owns any more (an upload cut off mid-way, a job or upload deleted while its files could not be removed) go too.
Workers run ``collect`` every LOWBIT_GC_INTERVAL_S, `lowbit serve` when it starts, and `lowbit gc` on demand."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.datasets.models import Dataset
from app.db import utcnow
from app.jobs.models import FINISHED, Job
from app.modelfiles.models import ModelFile
from app.resumable.models import COMPLETE, Upload, UploadPart
from app.settings import Settings
from app.storage import Storage

log = logging.getLogger(__name__)
# A file in incoming/ is an upload being received; one this old was cut off (the API died mid-upload).
INCOMING_STALE_S = 24 * 3600
# Files no row owns are left alone this long: an upload between placing its file and committing its row, a job
# folder a worker creates for a job the API is deleting.
ORPHAN_GRACE_S = 3600


@dataclass
class Collected:
    expired_jobs: list[str] = field(default_factory=list)
    stray_paths: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _old(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _remove(path: Path, out: Collected) -> None:
    try:
        size = _size(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        return
    out.freed_bytes += size
    out.stray_paths.append(str(path))


def expire(factory: sessionmaker[Session], storage: Storage, retention_days: float,
           now: datetime | None = None) -> Collected:
    """Remove the files of jobs that finished more than ``retention_days`` ago and mark them expired. Each job is
    marked with a conditional UPDATE first, so several workers collecting at once remove each folder once."""
    out = Collected()
    if retention_days <= 0:
        return out
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    with factory() as db:
        due = list(db.scalars(sa.select(Job.id).where(
            Job.status.in_(FINISHED), Job.finished_at < cutoff, Job.artifact_expired_at.is_(None))))
    for job_id in due:
        with factory.begin() as db:
            res = db.execute(sa.update(Job).where(Job.id == job_id, Job.artifact_expired_at.is_(None),
                                                  Job.status.in_(FINISHED)).values(artifact_expired_at=now))
        if not res.rowcount:  # type: ignore[attr-defined]
            continue
        folder = storage.job_dir(job_id)
        if folder.exists():
            out.freed_bytes += _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
        out.expired_jobs.append(job_id)
    if out.expired_jobs:
        log.warning("retention: removed the files of %d job(s) that ended more than %g day(s) ago (%d bytes)",
                    len(out.expired_jobs), retention_days, out.freed_bytes)
    return out


def expire_uploads(factory: sessionmaker[Session], storage: Storage, expiry_days: float,
                   now: datetime | None = None) -> Collected:
    """Remove resumable uploads never finished within ``expiry_days`` of being announced: their rows, parts
    and files (each counts against its tenant's quota until then)."""
    out = Collected()
    if expiry_days <= 0:
        return out
    cutoff = (now or utcnow()) - timedelta(days=expiry_days)
    with factory.begin() as db:
        ids = list(db.scalars(sa.select(Upload.id).where(Upload.status != COMPLETE, Upload.created_at < cutoff)))
        if ids:
            db.execute(sa.delete(UploadPart).where(UploadPart.upload_id.in_(ids)))
            db.execute(sa.delete(Upload).where(Upload.id.in_(ids)))
    for upload_id in ids:
        _remove(storage.upload_path(upload_id), out)
    if ids:
        log.warning("removed %d resumable upload(s) not finished within %g day(s)", len(ids), expiry_days)
    return out


def strays(factory: sessionmaker[Session], storage: Storage) -> Collected:
    """Remove files that no row owns: stale partial uploads, and job folders, models and datasets whose row is
    gone (after ORPHAN_GRACE_S, so that nothing still being created is touched)."""
    out = Collected()
    root = storage.root
    for part in (root / "incoming").glob("*") if (root / "incoming").is_dir() else []:
        if _old(part, INCOMING_STALE_S):
            _remove(part, out)
    for folder, table in ((root / "jobs", Job), (root / "models", ModelFile), (root / "datasets", Dataset),
                          (root / "uploads", Upload)):
        if not folder.is_dir():
            continue
        candidates = [p for p in folder.iterdir() if _old(p, ORPHAN_GRACE_S)]
        if not candidates:
            continue
        # Job folders and bundles' model folders are named by the id; uploads are <id>.<extension>.
        ids = {p.name.split(".", 1)[0] for p in candidates}
        with factory() as db:
            known = set(db.scalars(sa.select(table.id).where(table.id.in_(ids))))
        for p in candidates:
            if p.name.split(".", 1)[0] not in known:
                _remove(p, out)
    if out.stray_paths:
        log.warning("removed %d stray file(s) no job or upload owns (%d bytes)", len(out.stray_paths),
                    out.freed_bytes)
    return out


def collect(factory: sessionmaker[Session], storage: Storage, settings: Settings,
            now: datetime | None = None) -> Collected:
    """The retention, then the strays."""
    expired = expire(factory, storage, settings.retention_days, now)
    uploads = expire_uploads(factory, storage, settings.upload_expiry_days, now)
    stray = strays(factory, storage)
    return Collected(expired.expired_jobs, uploads.stray_paths + stray.stray_paths,
                     expired.freed_bytes + uploads.freed_bytes + stray.freed_bytes)
