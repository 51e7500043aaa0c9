from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class TensorSpec(BaseModel):
    name: str
    dtype: str
    shape: list[int | str]


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: str
    size_bytes: int
    sha256: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    created_at: datetime
