from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from app.auth import ApiPrincipal
from app.datasets import service as datasets
from app.deps import SessionDep, StorageDep
from app.errors import Invalid, Unavailable, error_responses
from app.examples import EVENTS_EXAMPLE, JOB_CREATE_EXAMPLE, JOB_RUNNING_EXAMPLE, REPORT_EXAMPLE
from app.jobs import events, service
from app.jobs.models import Job
from app.jobs.schemas import JobCreate, JobList, JobOut
from app.modelfiles import service as models
from app.queue import mark_published
from app.settings import Settings
from app.storage import Storage
from app.tenants import service as tenants
from worker.engine.report import Report, report_schema

log = logging.getLogger(__name__)
PAGE_LINK_TTL_S = 300
router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=error_responses(401, 422))

_SUBMIT_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/json": {"schema": JobCreate.model_json_schema(), "example": JOB_CREATE_EXAMPLE},
            "multipart/form-data": {
                "example": {"model": "(the bytes of model.onnx)", "calibration": "(the bytes of calib.npz)",
                            "config": '{"recipe": "int8_static", "options": {"method": "entropy"}}'},
                "schema": {
                    "type": "object",
                    "required": ["model", "config"],
                    "properties": {
                        "model": {"type": "string", "format": "binary"},
                        "calibration": {"type": "string", "format": "binary"},
                        "eval": {"type": "string", "format": "binary"},
                        "config": {"type": "string", "description": 'JSON: {"recipe": ..., "options": {...}}'},
                    },
                }
            },
        },
        "required": True,
    }
}


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def _submit_multipart(db: Session, storage: Storage, form: Any, settings: Settings, tenant_id: str) -> Any:
    model_file = form.get("model")
    if model_file is None or isinstance(model_file, str):
        raise Invalid("multipart submission needs a 'model' file field", code="missing_field")
    raw_config = form.get("config") or "{}"
    if not isinstance(raw_config, str):
        raw_config = raw_config.file.read().decode("utf-8", "replace")
    try:
        config = json.loads(raw_config)
    except json.JSONDecodeError as exc:
        raise Invalid(f"the 'config' field is not valid JSON: {exc}", code="invalid_config") from exc
    if not isinstance(config, dict):
        raise Invalid("the 'config' field must be a JSON object", code="invalid_config")
    for key in ("model_id", "calibration_dataset_id", "eval_dataset_id"):
        if key in config:
            raise Invalid(f"'{key}' cannot be given in a multipart submission; upload the file instead",
                          code="invalid_config")
    files = sum(1 for f in ("model", "calibration", "eval") if not isinstance(form.get(f), str | None))
    tenants.check_upload_rate(db, tenant_id, settings=settings, files=files)
    max_bytes = settings.max_upload_bytes
    # One request, one transaction: if anything below fails, the files stored so far go too.
    placed: list[str] = []
    try:
        model = models.create_model(db, storage, src=model_file.file, filename=model_file.filename, max_bytes=max_bytes,
                                    tenant_id=tenant_id, settings=settings)
        placed.append(model.storage_path)
        ids: dict[str, str] = {"model_id": model.id}
        for field, key in (("calibration", "calibration_dataset_id"), ("eval", "eval_dataset_id")):
            f = form.get(field)
            if f is not None and not isinstance(f, str):
                ds = datasets.create_dataset(db, storage, src=f.file, filename=f.filename, max_bytes=max_bytes,
                                             tenant_id=tenant_id, settings=settings)
                placed.append(ds.storage_path)
                ids[key] = ds.id
        try:
            req = JobCreate.model_validate({**config, **ids})
        except ValidationError as exc:
            raise Invalid(_validation_message(exc)) from exc
        return service.create_job(db, req, settings=settings, tenant_id=tenant_id)
    except BaseException:
        for path in placed:
            storage.discard(path)
        raise


@router.post("", status_code=202, response_model=JobOut, openapi_extra=_SUBMIT_DOC,
             responses={202: {"content": {"application/json": {"example": {**JOB_RUNNING_EXAMPLE, "status": "queued",
                                                                           "stage": None, "progress": 0,
                                                                           "started_at": None}}}},
                        **error_responses(400, 404, 413, 415, 422, 429, 503, 507)})
async def submit_job(request: Request, db: SessionDep, storage: StorageDep, who: ApiPrincipal) -> JobOut:
    """Submit a job: JSON with uploaded ids, or multipart with the files themselves (model, calibration, eval,
    config)."""
    settings = request.app.state.settings
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=3, max_fields=10)
        job = await run_in_threadpool(
            _submit_multipart, db, storage, form, settings, who.tenant_id
        )
    elif ctype.startswith("application/json") or not ctype:
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
        try:
            req = JobCreate.model_validate(payload)
        except ValidationError as exc:
            raise Invalid(_validation_message(exc)) from exc
        job = await run_in_threadpool(service.create_job, db, req, settings=settings, tenant_id=who.tenant_id)
    else:
        raise Invalid(f"unsupported content type '{ctype}'; send application/json or multipart/form-data",
                      code="unsupported_media_type", status_code=415)
    await run_in_threadpool(db.commit)
    out = service.to_out(job)
    await enqueue_committed(request, db, job)
    return out


async def enqueue_committed(request: Request, db: Session, job: Job) -> None:
    """Hand a committed job to the broker; if the broker is down, record the job as failed and raise 503."""
    try:
        await run_in_threadpool(request.app.state.queue.enqueue, job.id, job.queue)
    except Exception as exc:  # the broker is down: the job must not sit in 'queued' forever
        log.exception("enqueue failed for job %s", job.id)
        await run_in_threadpool(service.mark_enqueue_failed, db, job.id, reason=type(exc).__name__)
        await run_in_threadpool(db.commit)
        raise Unavailable("the job queue is unreachable; the job was recorded as failed, try again shortly",
                          code="broker_unavailable") from exc
    try:
        await run_in_threadpool(mark_published, db, job.id)
    except Exception:  # published all the same; the reconciler sees the message and leaves the job alone
        log.warning("job %s: could not record that it was published", job.id, exc_info=True)


@router.get("", response_model=JobList, responses=error_responses(422))
def list_jobs(
    db: SessionDep,
    who: ApiPrincipal,
    status: str | None = Query(default=None, description="queued|running|succeeded|failed|cancelled"),
    limit: int = Query(default=20, ge=1, le=200),
    cursor: str | None = Query(default=None, description="next_cursor from the previous page"),
    id_prefix: str | None = Query(default=None, description="only jobs whose id starts with this (e.g. the "
                                  "8 characters the pages show)"),
) -> JobList:
    """List jobs, newest first, with cursor pagination."""
    rows, next_cursor = service.list_jobs(db, status, limit=limit, cursor=cursor, tenant_id=who.tenant_id,
                                          id_prefix=id_prefix)
    return JobList(items=[service.to_out(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404))
def get_job(job_id: str, db: SessionDep, who: ApiPrincipal) -> JobOut:
    """Job status, stage, progress and links."""
    return service.to_out(service.get_job(db, job_id, tenant_id=who.tenant_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut,
             responses={202: {"content": {"application/json": {"example": {
                 **JOB_RUNNING_EXAMPLE, "status": "cancelled", "finished_at": "2026-11-27T10:15:20.500000Z"}}}},
                 **error_responses(404, 409)})
def cancel_job(job_id: str, db: SessionDep, who: ApiPrincipal) -> JobOut:
    """Cancel a queued or running job."""
    job = service.cancel_job(db, job_id, tenant_id=who.tenant_id)
    db.commit()
    return service.to_out(job)


@router.delete("/{job_id}", status_code=204, responses=error_responses(404))
def delete_job(job_id: str, db: SessionDep, storage: StorageDep, who: ApiPrincipal) -> Response:
    """Delete a job with its artifact and report."""
    service.delete_job(db, job_id, tenant_id=who.tenant_id)
    db.commit()
    storage.remove_job(job_id)
    return Response(status_code=204)


@router.head("/{job_id}/artifact", include_in_schema=False)
@router.get("/{job_id}/artifact", response_class=FileResponse,
            responses={200: {"description": "The quantized model; its ETag is its SHA-256 in quotes.",
                             "content": {"application/octet-stream": {
                                 "schema": {"type": "string", "format": "binary"},
                                 "example": "(the bytes of model.int8_static.onnx)"}}},
                       304: {"description": "If-None-Match matched the ETag"}, **error_responses(404, 409, 410)})
def download_artifact(job_id: str, request: Request, db: SessionDep, who: ApiPrincipal) -> Response:
    """Download the quantized model (Range requests served): one .onnx file, or for a model with external
    data a .zip holding model.onnx and model.onnx.data."""
    job = service.artifact_for(db, job_id, tenant_id=who.tenant_id)
    etag = f'"{job.artifact_sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    model = models.get_model(db, job.model_id, tenant_id=who.tenant_id)
    stem = model.filename.rsplit(".", 1)[0] or "model"
    # A model with external data comes back as a .zip of model.onnx and model.onnx.data.
    bundled = str(job.artifact_path).endswith(".zip")
    return FileResponse(
        job.artifact_path,  # type: ignore[arg-type]
        media_type="application/zip" if bundled else "application/octet-stream",
        filename=f"{stem}.{job.recipe}.{'zip' if bundled else 'onnx'}",
        headers={"ETag": etag},
    )


class PageLink(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"url": "/login/link?token=eyJ0IjoibG9jYWwi...Zx8", "expires_in_s": 300}]})

    url: str = Field(description="Open within expires_in_s seconds; it signs the browser in and shows the job")
    expires_in_s: int


@router.post("/{job_id}/page-link", response_model=PageLink,
             responses={200: {"content": {"application/json": {"example": {
                 "url": "/login/link?token=eyJ0IjoibG9jYWwi...Zx8", "expires_in_s": PAGE_LINK_TTL_S}}}},
                 **error_responses(401, 404)})
def page_link(job_id: str, request: Request, db: SessionDep, who: ApiPrincipal) -> PageLink:
    """A short-lived signed link that opens the job's page in a browser without putting the API key in a URL."""
    job = service.get_job(db, job_id, tenant_id=who.tenant_id)
    token = tenants.make_token(request.app.state.session_secret, "link", who=who, ttl_s=PAGE_LINK_TTL_S, job=job.id)
    return PageLink(url=f"/login/link?{urlencode({'token': token})}", expires_in_s=PAGE_LINK_TTL_S)


@router.get("/{job_id}/report", response_model=Report,
            responses={200: {"content": {"application/json": {"example": REPORT_EXAMPLE}}},
                       **error_responses(404, 409)})
def get_report(job_id: str, db: SessionDep, who: ApiPrincipal) -> JSONResponse:
    """The job's report: size, accuracy, latency, layers, calibration, warnings, environment. Its JSON Schema is
    also at /api/v1/schemas/report.json."""
    # Served as stored: the engine checked it against Report when it wrote it, and a report stored before
    # report_version existed (or by an older version) is still served whole rather than refused or trimmed.
    return JSONResponse(service.report_for(db, job_id, tenant_id=who.tenant_id))


schemas_router = APIRouter(prefix="/api/v1/schemas", tags=["schemas"])


@schemas_router.get("/report.json", responses={200: {
    "description": "The report's JSON Schema (draft 2020-12).",
    # The head of the real schema (the whole one is long): its title, required keys and the version field.
    "content": {"application/json": {"example": {
        **{k: report_schema()[k] for k in ("title", "type", "required")},
        "properties": {"report_version": report_schema()["properties"]["report_version"], "...": {}}}}}}})
def get_report_schema() -> JSONResponse:
    """The JSON Schema of `GET /api/v1/jobs/{id}/report`, at a stable URL for clients that validate reports;
    its `report_version` field says which version of the format a report follows."""
    return JSONResponse(report_schema())


def _auto_pick(report: dict[str, Any]) -> dict[str, Any] | None:
    """An auto report's chosen candidate, else the closest one (``best``), as {"recipe", "options"}; None when
    it has neither. Read through the Report model (Report.from_stored also reads a report stored before
    report_version existed); options are an open dict, so they come back as stored."""
    parsed = Report.from_stored(report)
    pick = parsed.chosen or parsed.best
    return {"recipe": pick.recipe, "options": pick.options} if pick else None


@router.get("/{job_id}/config",
            responses={200: {"description": "The configuration, as a JSON file (Content-Disposition: attachment).",
                             "content": {"application/json": {"example": {
                                 "recipe": "int8_static",
                                 "options": {"method": "percentile", "nodes_to_exclude": ["/layers.0/up/MatMul"]}}}}},
                       **error_responses(404)})
def get_config(job_id: str, db: SessionDep, who: ApiPrincipal) -> Response:
    """The job's configuration as a file for `lowbit quantize --config`: for an auto job, the candidate it chose
    (or, if none met the target, the closest one), with the layers it kept in float."""
    job = service.get_job(db, job_id, tenant_id=who.tenant_id)
    pick = _auto_pick(job.report or {}) if job.recipe == "auto" else None
    body = pick or {"recipe": job.recipe, "options": job.options}
    return Response(json.dumps(body, indent=2), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{job.id}.config.json"'})


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"description": "A text/event-stream of `stage`, `job` and `end` events.",
                             "content": {"text/event-stream": {"schema": {"type": "string"},
                                                               "example": EVENTS_EXAMPLE}}},
                       **error_responses(404)})
async def job_events(job_id: str, request: Request, who: ApiPrincipal) -> StreamingResponse:
    """Follow a job as server-sent events: `stage` once per stage entered (in order), `job` (the job, as GET
    /jobs/{id} returns it) whenever status, stage or progress changes, and `end` with the finished job, after
    which the stream closes. Comments (`: keep-alive`) keep a quiet connection open."""
    factory = request.app.state.sessionmaker
    settings = request.app.state.settings
    first = await run_in_threadpool(events.first_snapshot, factory, job_id, who.tenant_id)
    return StreamingResponse(
        events.stream(request, factory, job_id, first, settings.events_poll_s, settings.events_heartbeat_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
