from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JSONType, UTCDateTime, utcnow
from app.tenants.models import LOCAL_TENANT


class ModelFile(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="RESTRICT"), index=True,
                                           default=LOCAL_TENANT)
    filename: Mapped[str] = mapped_column(sa.String(255))
    format: Mapped[str] = mapped_column(sa.String(16))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    opset: Mapped[int] = mapped_column(sa.Integer)
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    storage_path: Mapped[str] = mapped_column(sa.String(512))
    # Bytes of weights in external data files beside the .onnx file (a bundle upload); 0 when self-contained.
    external_data_bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
