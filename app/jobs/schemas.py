from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.examples import (
    ACCURACY_TARGET_EXAMPLE,
    DELIVERY_EXAMPLE,
    JOB_CREATE_EXAMPLE,
    JOB_EXAMPLE,
    JOB_FAILED_EXAMPLE,
    JOB_LINKS_EXAMPLE,
)
from worker.engine.recipes import REGISTRY, describe_recipes


def recipe_description() -> str:
    """JobCreate.recipe's OpenAPI text, generated from the recipe registry (worker/engine/recipes)."""
    return "One of " + " | ".join(REGISTRY) + ":\n" + describe_recipes()


def options_description() -> str:
    """JobCreate.options' OpenAPI text: every recipe's options, from the registry."""
    return (
        "The recipe's options (all optional; each recipe refuses the ones it does not take):\n"
        + "\n".join(f"- {r.name}: " + "; ".join(f"{o.name} ({o.describe()})" for o in r.options)
                    for r in REGISTRY.values())
    )


# Built once, when JobCreate is defined: the registry a process imports is the one its schema documents.
RECIPE_DESCRIPTION = recipe_description()
OPTIONS_DESCRIPTION = options_description()


class AccuracyTarget(BaseModel):
    # NaN/Infinity are JSON extensions the request parser accepts; no target can be NaN.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False,
                              json_schema_extra={"examples": [ACCURACY_TARGET_EXAMPLE]})

    metric: Literal["label_accuracy", "top1_agreement", "multilabel_f1", "cosine", "sqnr_db"]
    min: float | None = Field(default=None, description="The metric must be at least this value.")
    max_drop: float | None = Field(default=None, ge=0, description="The metric may drop at most this much.")
    confidence: float | None = Field(
        default=None, ge=0.95, le=0.95,
        description="Met only when the 95% bootstrap interval's lower bound meets the target, not just the "
        "point estimate (reports carry 95% intervals, so 0.95 is the one level)")
    time_budget_s: float | None = Field(
        default=None, gt=0,
        description="recipe auto: candidates not started within this many seconds of the job's start are skipped "
        "(and listed as such in the report)")

    @model_validator(mode="after")
    def _one_bound(self) -> AccuracyTarget:
        if (self.min is None) == (self.max_drop is None):
            raise ValueError("give exactly one of 'min' or 'max_drop'")
        if self.metric == "sqnr_db" and self.max_drop is not None:
            # The original's SQNR against itself is infinite: a drop from it means nothing.
            raise ValueError("sqnr_db takes a minimum ('min', in dB), not 'max_drop'")
        return self


def check_callback_url(value: str | None) -> str | None:
    """An absolute http(s) URL with a host, no spaces or control characters, at most 2048 characters."""
    if value is None:
        return None
    if len(value) > 2048 or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be an http or https URL of at most 2048 characters, without spaces")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL, e.g. https://ci.example.com/hooks/lowbit")
    del port
    return value


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_CREATE_EXAMPLE]})

    model_id: str
    calibration_dataset_id: str | None = None
    eval_dataset_id: str | None = None
    recipe: str = Field(description=RECIPE_DESCRIPTION)
    options: dict[str, Any] = Field(default_factory=dict, description=OPTIONS_DESCRIPTION)
    accuracy_target: AccuracyTarget | None = None
    # The hardware asked for (stored as the job's `device`); the service picks the queue from it (jobs.service.route).
    device: Literal["cpu", "gpu"] | None = Field(
        default=None,
        description="The hardware the job asks for: 'gpu' runs the engine on CUDA (ONNX Runtime's CUDA provider, "
        "PyTorch on CUDA for qat_int8), 'cpu' on the worker's own device (LOWBIT_WORKER_DEVICE). The job is "
        "routed to the queue of that name ('cpu' or 'gpu'; the job's `queue`). Default: the server's default "
        "queue (LOWBIT_DEFAULT_QUEUE), and the device 'gpu' if that queue is 'gpu', else 'cpu'.",
    )
    callback_url: str | None = Field(
        default=None,
        description="http(s) URL that gets one signed POST of the job's summary when the job finishes "
        "(succeeded, failed or cancelled); see the README's Webhooks section.",
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, value: str | None) -> str | None:
        return check_callback_url(value)

    @model_validator(mode="after")
    def _auto_needs_target(self) -> JobCreate:
        recipe = REGISTRY.get(self.recipe)
        if recipe is not None and recipe.needs_accuracy_target and self.accuracy_target is None:
            # auto searches for the smallest model that meets the target: without one there is nothing to meet.
            raise ValueError(
                f"recipe {self.recipe} needs an accuracy_target, e.g. "
                "{\"metric\": \"cosine\", \"min\": 0.99} or "
                "{\"metric\": \"label_accuracy\", \"max_drop\": 0.01}, optionally with \"time_budget_s\""
            )
        return self


class JobError(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_FAILED_EXAMPLE["error"]]})

    code: str
    message: str


class JobLinks(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_LINKS_EXAMPLE]})

    self: str
    artifact: str
    report: str
    page: str


class DeliveryOut(BaseModel):
    """A webhook delivery: the POST of the job's summary to its callback_url, with its retries."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [DELIVERY_EXAMPLE]})

    id: str
    event: str = Field(description="job.succeeded | job.failed | job.cancelled")
    url: str
    status: str = Field(description="pending (being delivered) | delivered | failed (every attempt failed)")
    attempts: int
    last_status_code: int | None = Field(description="HTTP status of the last attempt; null if none answered")
    last_error: str | None = Field(description="Why the last attempt failed, if it did")
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None


class JobOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE, JOB_FAILED_EXAMPLE]})

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
    device: str = Field(description="The hardware the job asked for: 'cpu' (the worker's own device) or 'gpu' "
                        "(CUDA)")
    queue: str = Field(description="The broker queue the job was routed to; workers consume queues by name "
                       "(lowbit worker --queues)")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    links: JobLinks
    callback_url: str | None = None
    deliveries: list[DeliveryOut] = Field(default_factory=list,
                                          description="Webhook deliveries to callback_url, oldest first")
    artifact_expired_at: datetime | None = Field(
        default=None, description="When the retention (LOWBIT_RETENTION_DAYS) removed the artifact; the report stays "
        "and the artifact answers 410 artifact_expired")
    waiting_reason: str | None = Field(
        default=None, description="A queued job that no live worker can run: 'waiting for a worker on queue gpu: "
        "...' (null otherwise)")


class JobList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [JOB_EXAMPLE], "next_cursor": None}]})

    items: list[JobOut]
    next_cursor: str | None
