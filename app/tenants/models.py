from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow

# The tenant of a keyless server (bound to loopback) and of rows from before tenants existed.
LOCAL_TENANT = "local"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    # Per-tenant limits; None: the server's defaults (settings).
    max_active_jobs: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    uploads_per_minute: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    storage_quota_bytes: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the whole key (keys are 256 random bits, so a fast hash
    suffices); ``prefix`` (the part before the secret) finds the row without scanning."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(sa.String(16), index=True)
    key_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
