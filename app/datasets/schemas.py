from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from app.examples import ARRAY_SPEC_EXAMPLE, DATASET_EXAMPLE


class ArraySpec(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ARRAY_SPEC_EXAMPLE]})

    dtype: str
    shape: list[int]


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [DATASET_EXAMPLE]})

    id: str
    filename: str
    size_bytes: int
    sha256: str
    num_samples: int
    arrays: dict[str, ArraySpec]
    created_at: datetime


class DatasetList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [DATASET_EXAMPLE]}]})

    items: list[DatasetOut]
