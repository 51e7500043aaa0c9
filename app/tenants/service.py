"""Tenants, API keys, browser sessions and per-tenant limits.

A key is ``lb_<prefix>_<secret>``: the prefix finds its row, the SHA-256 of the whole key is what is stored,
and the comparison is constant-time. Browser sessions are signed cookies (HMAC-SHA256 with a server secret
kept in the data directory) naming the tenant and the key that signed in, so revoking the key ends them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.datasets.models import Dataset
from app.db import utcnow
from app.errors import Invalid, NotFound, RateLimited, StorageQuotaExceeded, Unauthorized
from app.jobs.models import QUEUED, RUNNING, Job
from app.keyfile import data_dir_secret
from app.modelfiles.models import ModelFile
from app.resumable.models import RECEIVING, Upload
from app.settings import Settings
from app.tenants.models import LOCAL_TENANT, ApiKey, Tenant
from app.uploads import new_id

SESSION_SECRET_FILE = "session_secret"
KEY_PATTERN = re.compile(r"^lb_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Time for the limits' rolling window.
RATE_WINDOW_S = 60


@dataclass(frozen=True)
class Principal:
    """Who is asking: a tenant, and the key it authenticated with (None for the keyless local tenant)."""

    tenant_id: str
    key_id: str | None = None
    tenant_name: str = LOCAL_TENANT


LOCAL = Principal(LOCAL_TENANT)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: Session, tenant_name: str, *, max_active_jobs: int | None = None,
               uploads_per_minute: int | None = None, storage_quota_bytes: int | None = None) -> tuple[Tenant, str]:
    """A new key for ``tenant_name`` (the tenant is created if new; limits given here replace its own).
    Returns the tenant and the key, which is shown this once and never stored."""
    if not TENANT_NAME.match(tenant_name):
        raise Invalid("a tenant name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                      code="invalid_tenant_name")
    tenant = db.scalars(sa.select(Tenant).where(Tenant.name == tenant_name)).first()
    if tenant is None:
        tenant = Tenant(id=LOCAL_TENANT if tenant_name == LOCAL_TENANT else new_id(), name=tenant_name,
                        created_at=utcnow())
        db.add(tenant)
        db.flush()  # the key row below refers to it, and there is no relationship to order the inserts
    if max_active_jobs is not None:
        tenant.max_active_jobs = max_active_jobs
    if uploads_per_minute is not None:
        tenant.uploads_per_minute = uploads_per_minute
    if storage_quota_bytes is not None:
        if storage_quota_bytes < 0:
            raise Invalid("a storage quota is a number of bytes, 0 for none", code="invalid_storage_quota")
        tenant.storage_quota_bytes = storage_quota_bytes
    prefix = secrets.token_hex(6)
    key = f"lb_{prefix}_{secrets.token_urlsafe(32)}"
    db.add(ApiKey(id=new_id(), tenant_id=tenant.id, prefix=prefix, key_hash=_hash(key), created_at=utcnow()))
    db.flush()
    return tenant, key


def list_keys(db: Session) -> list[tuple[ApiKey, Tenant]]:
    rows = db.execute(sa.select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
                      .order_by(Tenant.name, ApiKey.created_at))
    return [(k, t) for k, t in rows.tuples()]


def revoke_key(db: Session, prefix: str) -> ApiKey:
    key = db.scalars(sa.select(ApiKey).where(ApiKey.prefix == prefix.removeprefix("lb_").split("_")[0])).first()
    if key is None:
        raise NotFound(f"no API key with prefix '{prefix}'", code="key_not_found")
    key.revoked_at = key.revoked_at or utcnow()
    db.flush()
    return key


def authenticate(db: Session, key: str) -> Principal:
    """The tenant a presented key belongs to; 401 for a malformed, unknown or revoked key."""
    m = KEY_PATTERN.match(key.strip())
    found = db.execute(sa.select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
                       .where(ApiKey.prefix == m.group(1))).first() if m else None
    row, name = (found[0], found[1]) if found else (None, "")
    # Compare even when there is no row, so a wrong prefix takes as long as a wrong secret.
    expected = row.key_hash if row is not None else _hash("lb_000000000000_" + "x" * 43)
    if not hmac.compare_digest(expected, _hash(key.strip())) or row is None or row.revoked_at is not None:
        raise Unauthorized("the API key is not valid (unknown, mistyped or revoked); create one with "
                           "'lowbit keys create --tenant NAME' on the server", code="invalid_api_key")
    return Principal(row.tenant_id, row.id, name)


def key_is_active(db: Session, key_id: str, *, tenant_id: str) -> bool:
    row = db.get(ApiKey, key_id)
    return row is not None and row.revoked_at is None and row.tenant_id == tenant_id


# --- browser sessions -------------------------------------------------------------------------------------

def session_secret(settings: Settings) -> bytes:
    return data_dir_secret(Path(settings.data_dir), SESSION_SECRET_FILE).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, purpose: str, *, payload: str) -> str:
    return _b64(hmac.new(secret, f"{purpose}|{payload}".encode(), hashlib.sha256).digest())


def make_token(secret: bytes, purpose: str, *, who: Principal, ttl_s: float, **extra: str) -> str:
    """A signed, expiring token for ``purpose`` ('session' cookies, 'link' one-click page links)."""
    body = {"t": who.tenant_id, "k": who.key_id, "n": who.tenant_name, "exp": int(time.time() + ttl_s), **extra}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_sign(secret, purpose, payload=payload)}"


def read_token(secret: bytes, purpose: str, *, token: str) -> tuple[Principal, dict[str, str]] | None:
    """The principal a token names, or None if it is forged, for another purpose, expired or malformed."""
    payload, _, sig = token.partition(".")
    if not payload or not sig or not hmac.compare_digest(_sign(secret, purpose, payload=payload), sig):
        return None
    try:
        body = json.loads(_unb64(payload))
        exp, tenant, key, name = int(body["exp"]), str(body["t"]), body.get("k"), str(body.get("n") or "")
    except (ValueError, KeyError, TypeError):
        return None
    if exp < time.time():
        return None
    return Principal(tenant, str(key) if key else None, name), {k: str(v) for k, v in body.items()}


def csrf_token(secret: bytes, session: str) -> str:
    """The token the pages' forms carry: bound to the session cookie (or, keyless, to the server)."""
    return _sign(secret, "csrf", payload=session)


def check_csrf(secret: bytes, session: str, *, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(secret, session), presented or "")


# --- limits -----------------------------------------------------------------------------------------------

def _limits(db: Session, tenant_id: str, *, settings: Settings) -> tuple[int, int]:
    tenant = db.get(Tenant, tenant_id)
    uploads = tenant.uploads_per_minute if tenant and tenant.uploads_per_minute is not None \
        else settings.uploads_per_minute
    active = tenant.max_active_jobs if tenant and tenant.max_active_jobs is not None else settings.max_active_jobs
    return uploads, active


def tenant_name(db: Session, tenant_id: str) -> str:
    tenant = db.get(Tenant, tenant_id)
    return tenant.name if tenant else tenant_id


def check_upload_rate(db: Session, tenant_id: str, *, settings: Settings, files: int = 1) -> None:
    """429 when ``files`` more uploads would pass the tenant's uploads per rolling minute."""
    limit, _ = _limits(db, tenant_id, settings=settings)
    if limit <= 0:
        return
    if files > limit:  # this request alone is over the limit: waiting would never help
        raise Invalid(
            f"this request uploads {files} files and tenant '{tenant_name(db, tenant_id)}' may upload {limit} a "
            "minute: upload them one at a time (POST /api/v1/models, /api/v1/datasets), then submit the job with "
            "their ids", code="upload_rate_limited",
        )
    since = utcnow() - timedelta(seconds=RATE_WINDOW_S)
    times = sorted(
        t for t in [
            *db.scalars(sa.select(ModelFile.created_at).where(ModelFile.tenant_id == tenant_id,
                                                               ModelFile.created_at >= since)),
            *db.scalars(sa.select(Dataset.created_at).where(Dataset.tenant_id == tenant_id,
                                                            Dataset.created_at >= since)),
            *db.scalars(sa.select(Upload.created_at).where(Upload.tenant_id == tenant_id,
                                                           Upload.created_at >= since)),
        ]
    )
    if len(times) + files > limit:
        # Room for this request once enough of the window's uploads have aged out of it.
        oldest_needed = times[max(0, len(times) + files - limit - 1)] if times else utcnow()
        wait = RATE_WINDOW_S - (utcnow() - oldest_needed).total_seconds()
        raise RateLimited(
            f"tenant '{tenant_name(db, tenant_id)}' may upload {limit} file(s) a minute and has uploaded "
            f"{len(times)} in the last minute; retry in {max(1, int(wait + 0.999))} s",
            retry_after_s=int(wait + 0.999), code="upload_rate_limited",
        )


def check_active_jobs(db: Session, tenant_id: str, *, settings: Settings) -> None:
    """429 when the tenant already has as many queued or running jobs as it may."""
    _, limit = _limits(db, tenant_id, settings=settings)
    if limit <= 0:
        return
    active = db.scalar(sa.select(sa.func.count()).select_from(Job)
                       .where(Job.tenant_id == tenant_id, Job.status.in_((QUEUED, RUNNING)))) or 0
    if active >= limit:
        raise RateLimited(
            f"tenant '{tenant_name(db, tenant_id)}' may have {limit} job(s) queued or running at once and has "
            f"{active}; wait for one to finish (or cancel one), then submit again",
            retry_after_s=30, code="too_many_active_jobs",
        )


def storage_quota(db: Session, tenant_id: str, *, settings: Settings) -> int:
    """The bytes of uploads and artifacts the tenant may keep (0: no limit)."""
    tenant = db.get(Tenant, tenant_id)
    if tenant is not None and tenant.storage_quota_bytes is not None:
        return int(tenant.storage_quota_bytes)
    return int(settings.tenant_storage_quota_bytes)


def storage_used(db: Session, tenant_id: str) -> int:
    """Bytes the tenant keeps: its uploaded models and datasets, and the artifacts of its jobs that still have
    them (not expired). Work files of running jobs are temporary and not counted."""
    models_b = db.scalar(sa.select(sa.func.coalesce(sa.func.sum(ModelFile.size_bytes), 0))
                         .where(ModelFile.tenant_id == tenant_id)) or 0
    data_b = db.scalar(sa.select(sa.func.coalesce(sa.func.sum(Dataset.size_bytes), 0))
                       .where(Dataset.tenant_id == tenant_id)) or 0
    artifacts_b = db.scalar(sa.select(sa.func.coalesce(sa.func.sum(Job.artifact_bytes), 0)).where(
        Job.tenant_id == tenant_id, Job.artifact_path.is_not(None), Job.artifact_expired_at.is_(None))) or 0
    # A resumable upload's file takes its whole announced size (sparse until its parts arrive) until it is being
    # finished (then the model it becomes is checked against the quota instead).
    uploads_b = db.scalar(sa.select(sa.func.coalesce(sa.func.sum(Upload.size_bytes), 0)).where(
        Upload.tenant_id == tenant_id, Upload.status == RECEIVING)) or 0
    return int(models_b) + int(data_b) + int(artifacts_b) + int(uploads_b)


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_storage_quota(db: Session, tenant_id: str, *, settings: Settings, adding: int, what: str) -> None:
    """507 when keeping ``adding`` more bytes (``what``: 'this upload', 'this job's artifact') would take the
    tenant past its storage quota; with ``adding`` 0, when it is already at or past it (a new job's artifact
    could not be kept)."""
    quota = storage_quota(db, tenant_id, settings=settings)
    if quota <= 0:
        return
    used = storage_used(db, tenant_id)
    if (used + adding <= quota) if adding else (used < quota):
        return
    raise StorageQuotaExceeded(
        f"tenant '{tenant_name(db, tenant_id)}' keeps {_mb(used)} ({used} bytes) of uploads and artifacts and may "
        f"keep {_mb(quota)} ({quota} bytes){'' if adding else ', all of it'}"
        + (f"; {what} adds {_mb(adding)} ({adding} bytes)" if adding else f", so {what} could not be kept")
        + ": delete finished jobs (DELETE /api/v1/jobs/ID) to free their artifacts, or ask for a larger quota "
        "(lowbit keys create --storage-quota-bytes, LOWBIT_TENANT_STORAGE_QUOTA_BYTES)",
        used_bytes=used, quota_bytes=quota, adding_bytes=adding)
