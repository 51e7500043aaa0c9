from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AccuracyTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["label_accuracy", "top1_agreement", "cosine", "sqnr_db"]
    min: float | None = Field(default=None, description="The metric must be at least this value.")
    max_drop: float | None = Field(default=None, ge=0, description="The metric may drop at most this much.")
    time_budget_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_bound(self) -> AccuracyTarget:
        if (self.min is None) == (self.max_drop is None):
            raise ValueError("give exactly one of 'min' or 'max_drop'")
        return self


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    calibration_dataset_id: str | None = None
    eval_dataset_id: str | None = None
    recipe: str = Field(description="int8_static | int8_dynamic")
    options: dict[str, Any] = Field(default_factory=dict)
    accuracy_target: AccuracyTarget | None = None
    device: Literal["cpu", "gpu"] | None = Field(
        default=None, description="Queue to run on: 'gpu' workers use CUDA. Default: the server's default queue."
    )


class JobError(BaseModel):
    code: str
    message: str


class JobLinks(BaseModel):
    self: str
    artifact: str
    report: str
    page: str


class JobOut(BaseModel):
    id: str
    status: str
    stage: str | None
    progress: int
    recipe: str
    options: dict[str, Any]
    accuracy_target: dict[str, Any] | None
    model_id: str
    calibration_dataset_id: str | None
    eval_dataset_id: str | None
    queue: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    links: JobLinks


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
