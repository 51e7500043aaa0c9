from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class ArraySpec(BaseModel):
    dtype: str
    shape: list[int]


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    size_bytes: int
    sha256: str
    num_samples: int
    arrays: dict[str, ArraySpec]
    created_at: datetime
