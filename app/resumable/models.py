from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow
from app.tenants.models import LOCAL_TENANT

RECEIVING = "receiving"
FINISHING = "finishing"  # complete is checking the file and making the model
COMPLETE = "complete"


class Upload(Base):
    """A resumable upload of one large file: its parts arrive in any order, each written in place into
    uploads/<id>.part, and the file becomes a model when the client finishes it."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="RESTRICT"), index=True,
                                           default=LOCAL_TENANT)
    filename: Mapped[str] = mapped_column(sa.String(255))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    part_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    status: Mapped[str] = mapped_column(sa.String(16), default=RECEIVING)
    model_id: Mapped[str | None] = mapped_column(sa.String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UploadPart(Base):
    """One received part (a row per part, so that parts sent at the same time never overwrite each other's
    record)."""

    __tablename__ = "upload_parts"

    upload_id: Mapped[str] = mapped_column(sa.ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(sa.String(64))
