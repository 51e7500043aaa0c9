from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.examples import MODEL_EXAMPLE, TENSOR_SPEC_EXAMPLE


class TensorSpec(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [TENSOR_SPEC_EXAMPLE]})

    name: str
    dtype: str
    shape: list[int | str]


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [MODEL_EXAMPLE]})

    id: str
    filename: str
    format: str
    size_bytes: int
    sha256: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data_bytes: int = Field(0, description="weights kept in external data files (a .zip/.tar bundle "
                                     "upload); 0 for a self-contained model")
    created_at: datetime


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [MODEL_EXAMPLE]}]})

    items: list[ModelOut]
