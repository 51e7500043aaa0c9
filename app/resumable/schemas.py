from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

UPLOAD_EXAMPLE: dict[str, Any] = {
    "id": "7d0c7d7e-4a8e-4d55-9d8e-2f4a3c1b9e10",
    "filename": "decoder.zip",
    "size_bytes": 3221225472,
    "sha256": "e27d6365b184087e4d225e07f7c6cbd9609548dea34e6e7ef8329ef25176acad",
    "part_bytes": 67108864,
    "parts": 48,
    "received": [0, 1, 2],
    "missing": [3, 4],
    "status": "receiving",
    "model_id": None,
    "created_at": "2026-12-03T18:00:00Z",
}


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"filename": "decoder.zip", "size_bytes": 3221225472,
         "sha256": "e27d6365b184087e4d225e07f7c6cbd9609548dea34e6e7ef8329ef25176acad"}]})

    filename: str = Field(min_length=1, max_length=1024, description="An .onnx, .pt2, or a .zip/.tar bundle of an "
                          "ONNX model with its external data files")
    size_bytes: int = Field(gt=0, description="The whole file's size")
    sha256: str = Field(pattern="^[0-9a-fA-F]{64}$", description="The whole file's SHA-256, checked when it is "
                        "finished")


class UploadOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [UPLOAD_EXAMPLE]})

    id: str
    filename: str
    size_bytes: int
    sha256: str
    part_bytes: int = Field(description="Every part is this long but the last, which holds the rest")
    parts: int = Field(description="How many parts the file is sent in")
    received: list[int] = Field(description="Part numbers received (0-based)")
    missing: list[int] = Field(description="Part numbers still to send (first 1000)")
    status: str = Field(description="receiving | complete")
    model_id: str | None = Field(description="The model it became, once complete")
    created_at: datetime


class UploadList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [UPLOAD_EXAMPLE]}]})

    items: list[UploadOut]
