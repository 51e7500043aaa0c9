"""What the pages need: the job list and a job's page read from the database, and the upload form turned
into a job with the same services the API uses. Nothing here commits; the routes do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile

from app.datasets import service as datasets
from app.datasets.models import Dataset
from app.errors import Invalid, from_engine
from app.jobs import service as jobs
from app.jobs.models import Job
from app.jobs.schemas import JobCreate, JobOut
from app.modelfiles import service as models
from app.modelfiles.models import ModelFile
from app.pages import charts, explain, present
from app.settings import Settings
from app.storage import Storage
from app.tenants import service as tenants
from worker.engine.config import BLOCK_SIZES, CALIBRATION_METHODS, INT4_CALIBRATED, parse_options
from worker.engine.errors import EngineError
from worker.engine.recipes import REGISTRY
from worker.engine.report import Report, Training

PAGE_SIZE = 25
INT4_CHOICES = {
    "": "automatic (clip_search with calibration data, else rtn)",
    "clip_search": "clip_search (calibrated)",
    "gptq": "gptq (calibrated)",
    "hqq": "hqq",
    "rtn": "rtn (round to nearest)",
}
TARGET_METRICS = {
    "": "no target",
    "label_accuracy": "label accuracy (needs a labels array)",
    "top1_agreement": "top-1 agreement with the original",
    "multilabel_f1": "multi-label F1 with the original",
    "cosine": "cosine similarity",
    "sqnr_db": "SQNR (dB)",
}
TARGET_BOUNDS = {"max_drop": "may drop at most", "min": "must be at least"}


def form_recipes() -> dict[str, str]:
    """The upload form's recipes (name -> label), read from the registry (worker/engine/recipes) when a page
    is built or a form is read."""
    return {r.name: r.label for r in REGISTRY.values()}


def form_field_recipes() -> dict[str, tuple[str, ...]]:
    """Form input -> the recipes whose options it sets (the page shows which recipes a field is for)."""
    out: dict[str, tuple[str, ...]] = {}
    for r in REGISTRY.values():
        for f in r.form_fields:
            out[f.input] = (*out.get(f.input, ()), r.name)
    return out


def form_choices() -> dict[str, Any]:
    """The upload form's choices (index.html's ``choices``): recipes and their fields from the registry."""
    return {"recipes": form_recipes(), "methods": CALIBRATION_METHODS, "metrics": TARGET_METRICS,
            "algorithms": INT4_CHOICES, "block_sizes": BLOCK_SIZES, "bounds": TARGET_BOUNDS,
            "field_recipes": form_field_recipes()}


@dataclass
class FormValues:
    """The upload form's fields as the user typed them (files cannot be refilled by a server)."""

    recipe: str = "int8_static"
    method: str = "minmax"
    per_channel: bool = True
    batch_size: str = ""
    target_metric: str = ""
    target_bound: str = "max_drop"
    target_value: str = ""
    algorithm: str = ""
    block_size: str = "32"


@dataclass(frozen=True)
class JobRow:
    job: JobOut
    model_name: str
    size: str
    accuracy: str
    created: str


def list_context(db: Session, cursor: str | None, *, tenant_id: str, limit: int = PAGE_SIZE) -> dict[str, Any]:
    """The job list page: newest first, one page, with model names and size/accuracy at a glance."""
    rows, next_cursor = jobs.list_jobs(db, None, limit=limit, cursor=cursor, tenant_id=tenant_id)
    ids = {j.model_id for j in rows}
    names: dict[str, str] = {}
    if ids:
        for model_id, filename in db.execute(sa.select(ModelFile.id, ModelFile.filename).where(ModelFile.id.in_(ids))):
            names[model_id] = filename
    items = []
    for j in rows:
        size, accuracy = present.list_summary(Report.from_stored(j.report) if j.report else None)
        items.append(JobRow(jobs.to_out(j), names.get(j.model_id, "?"), size, accuracy,
                            present.fmt_time(j.created_at)))
    query = {"limit": limit, **({"cursor": cursor} if cursor else {})}
    return {
        "rows": items,
        "next_cursor": next_cursor,
        "cursor": cursor,
        "api_url": f"/api/v1/jobs?{urlencode(query)}",
        "form": FormValues(),
        "form_error": None,
        "choices": form_choices(),
        "status_words": present.STATUS_WORDS,
    }


def _dataset(db: Session, dataset_id: str | None) -> Dataset | None:
    return db.get(Dataset, dataset_id) if dataset_id else None


def job_context(db: Session, job_id: str, *, tenant_id: str) -> dict[str, Any]:
    """A job's page: status and progress while it runs; the report, charts and provenance when it is done."""
    job = jobs.get_job(db, job_id, tenant_id=tenant_id)
    model = models.get_model(db, job.model_id, tenant_id=tenant_id)
    calib, ev = _dataset(db, job.calibration_dataset_id), _dataset(db, job.eval_dataset_id)
    out = jobs.to_out(job)
    report = Report.from_stored(job.report) if job.report else None
    ctx: dict[str, Any] = {
        "job": out,
        "model": model,
        "calib": calib,
        "eval": ev,
        "status_word": present.STATUS_WORDS.get(job.status, job.status),
        "stages": present.STAGES,
        "stage_index": present.STAGES.index(job.stage) if job.stage in present.STAGES else -1,
        "error_message": present.clean_message(job.error_message),
        "failure_hint": present.failure_hint(job.error_code),
        "times": {k: present.fmt_time(getattr(job, k)) for k in ("created_at", "started_at", "finished_at")},
        # The typed report (Report.from_stored: reports stored before report_version load too); the template
        # reads its attributes, and the open sections' (calibration, environment) keys through *_rows below.
        "report": report,
        # The options the run used (the report's: reduce_range left unset is decided by the worker's CPU), so
        # the box reruns the same job anywhere; before a report exists, the job's.
        "config_json": present.config_json(job.recipe, dict(report.options) if report and report.options else
                                           job.options, job.accuracy_target),
    }
    if report:
        ctx.update(report_context(report, model.filename, calib_name=calib.filename if calib else None,
                                  eval_name=ev.filename if ev else None))
    return ctx


def _loss_curve(training: Training | None) -> list[dict[str, Any]]:
    """qat_int8's loss curve: a key of the trainer's own log, which the open Training section keeps as written."""
    curve = (training.model_extra or {}).get("loss_curve") if training else None
    return curve if isinstance(curve, list) else []


def report_context(report: Report, model_name: str, *, calib_name: str | None,
                   eval_name: str | None) -> dict[str, Any]:
    """Everything the finished report renders, computed from the report alone."""
    layers = report.layers or []
    acc, lat, target = report.accuracy, report.latency, report.accuracy_target
    layer_svg, layers_shown = charts.layer_chart(layers)
    return {
        "verdict": present.verdict(report),
        "verdict_tone": present.verdict_tone(report),
        "headline": present.accuracy_headline(report),
        "source_text": present.source_text(acc.source if acc else None),
        "target": target,
        "target_text": present.target_text(target) if target else "",
        "target_verdict": present.target_verdict(target),
        "size_phrase": present.size_phrase(report.size.ratio if report.size else None),
        "speed_phrase": present.speed_text(lat),
        "speedup_ci": present.fmt_interval(lat.speedup_ci if lat else None, lambda x: f"{x:.2f}"),
        "output_rows": present.output_rows(acc.outputs if acc else []),
        "label_ci": present.label_intervals(acc.labels if acc else None),
        "overlap_text": present.overlap_text(acc),
        "target_bound": present.target_bound_text(target),
        "how_to_read": explain.how_to_read(report),
        "charts": {
            "size": charts.size_chart(report.size),
            "latency": charts.latency_chart(lat),
            "layers": layer_svg,
            "outputs": charts.output_chart(acc.outputs if acc else []),
            "loss": charts.loss_chart(_loss_curve(report.training)),
        },
        "baseline_title": "What training bought" if report.recipe == "qat_int8" else "What calibration bought",
        "layers_shown": layers_shown,
        "fp32_layers": sum(1 for layer in layers if layer.precision == "fp32"),
        "calibration_rows": present.calibration_rows(report.calibration),
        "smoothquant_lines": present.smoothquant_lines(report.smoothquant),
        "equalization_line": present.equalization_line(report.equalization),
        "bias_correction_line": present.bias_correction_line(report.bias_correction),
        "adaround_line": present.adaround_line(report.adaround),
        "residual_16bit_line": present.residual_16bit_line(report.residual_16bit),
        "index_math_line": present.index_math_line(report.index_math),
        "four_bit_weights_line": present.four_bit_weights_line(report.four_bit_weights),
        # As stored (keys an older engine did not write are not shown as empty rows).
        "environment_rows": report.environment.model_dump(exclude_unset=True) if report.environment else {},
        "cli": present.cli_command(report.recipe, report.options, model_name, calib_name, eval_name),
        "has_sensitivity": any(layer.sensitivity is not None for layer in layers),
        "auto": _auto_context(report),
    }


def _auto_context(report: Report) -> dict[str, Any] | None:
    """An auto job's search: every candidate (table and accuracy-against-size chart), the layers kept in float
    with their sensitivity, and the chosen configuration as a file to reproduce it."""
    if report.recipe != "auto" or report.candidates is None:
        return None
    search = report.auto
    target = (search.target if search else None) or report.accuracy_target
    metric = str(target.metric) if target else "metric"
    chosen_speedup = search.chosen_speedup if search else None
    return {
        "rows": present.candidate_rows(report),
        # Reports from before the choice weighed speed have no "prefer": they chose by size alone.
        "prefer": (search.prefer if search else None) or "size",
        "float_fallback": (report.options or {}).get("search") == "float_fallback",
        "chosen_slower": bool(search and search.chosen_slower_than_fp32),
        "chosen_speed": present.speed_phrase(chosen_speedup) if isinstance(chosen_speedup, (int, float)) else "",
        "passed_over": [present.candidate_brief(c) for c in (search.passed_over_as_slower if search else [])],
        "pareto": charts.pareto_chart(report.candidates, target, metric, report.chosen),
        "metric": metric,
        "kept": [{**k.model_dump(exclude_unset=True), "output_db": present.sensitivity_db(k.sensitivity)}
                 for k in report.kept_in_float or []],
        "config": present.chosen_config_json(report),
        "skipped": len(search.skipped) if search else 0,
        "workers": search.workers if search else [],
    }


def _text(form: FormData, name: str, *, default: str = "") -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else default


def _file(form: FormData, name: str) -> UploadFile | None:
    """A chosen file; browsers send an unchosen file input as an empty part without a file name."""
    value = form.get(name)
    if isinstance(value, UploadFile) and value.filename:
        return value
    return None


def form_values(form: FormData) -> FormValues:
    """What was submitted, to fill the form in again next to an error message."""
    return FormValues(
        recipe=_text(form, "recipe", default="int8_static"),
        method=_text(form, "method", default="minmax"),
        per_channel=_text(form, "per_channel") in ("on", "true", "1"),
        batch_size=_text(form, "batch_size"),
        target_metric=_text(form, "target_metric"),
        target_bound=_text(form, "target_bound", default="max_drop"),
        target_value=_text(form, "target_value"),
        algorithm=_text(form, "algorithm"),
        block_size=_text(form, "block_size", default="32"),
    )


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors())


def _form_option(values: FormValues, name: str) -> Any:
    """The option value of one form input, None when the input was left empty (the option's default)."""
    if name == "per_channel":
        return values.per_channel
    if name == "method":
        return values.method
    if name == "algorithm":
        return values.algorithm or None
    if name == "block_size":
        try:
            return int(values.block_size)
        except ValueError:
            raise Invalid(f"block size must be 16, 32, 64 or 128, got '{values.block_size}'",
                          code="invalid_option") from None
    if name == "batch_size":
        if not values.batch_size:
            return None
        try:
            return int(values.batch_size)
        except ValueError:
            raise Invalid(f"batch size must be a whole number from 1 to 1024, got '{values.batch_size}'",
                          code="invalid_option") from None
    raise ValueError(f"the upload form has no input '{name}'")  # a recipe's form_fields names a missing input


def form_config(values: FormValues) -> dict[str, Any]:
    """The form's fields as a job configuration (recipe, options, accuracy_target); Invalid if a field is wrong."""
    recipes = form_recipes()
    if values.recipe not in recipes:
        raise Invalid(f"unknown recipe '{values.recipe}'; choose one of {', '.join(recipes)}",
                      code="unknown_recipe")
    options: dict[str, Any] = {}
    for form_field in REGISTRY[values.recipe].form_fields:
        value = _form_option(values, form_field.input)
        if value is not None:
            options[form_field.option] = value
    config: dict[str, Any] = {"recipe": values.recipe, "options": options}
    if values.target_metric:
        if values.target_bound not in TARGET_BOUNDS:
            raise Invalid("the accuracy target needs 'may drop at most' or 'must be at least'",
                          code="invalid_target")
        try:
            bound = float(values.target_value)
        except ValueError:
            raise Invalid(f"give the accuracy target a number (e.g. 0.01 or 0.99), got '{values.target_value}'",
                          code="invalid_target") from None
        config["accuracy_target"] = {"metric": values.target_metric, values.target_bound: bound}
    try:
        parse_options(values.recipe, options)
        JobCreate.model_validate({"model_id": "", **config})
    except EngineError as exc:
        raise from_engine(exc) from exc
    except ValidationError as exc:
        raise Invalid(_validation_message(exc), code="invalid_target") from exc
    return config


def submit_form(db: Session, storage: Storage, *, form: FormData, settings: Settings, tenant_id: str) -> Job:
    """Check the fields, store the uploaded files and record a queued job (the caller commits and enqueues)."""
    config = form_config(form_values(form))
    model_file = _file(form, "model")
    if model_file is None:
        raise Invalid("choose a model file (.onnx) to upload", code="missing_field")
    calib_file, eval_file = _file(form, "calibration"), _file(form, "eval")
    if config["recipe"] == "int8_static" and calib_file is None:
        raise Invalid("int8_static calibrates activation ranges on your data: choose a calibration file (.npz), "
                      "or pick int8_dynamic", code="calibration_required")
    if config["options"].get("algorithm") in INT4_CALIBRATED and calib_file is None:
        raise Invalid(f"the 4-bit algorithm {config['options']['algorithm']} learns from your data: choose a "
                      "calibration file (.npz), or pick rtn", code="calibration_required")
    tenants.check_upload_rate(db, tenant_id, settings=settings,
                              files=sum(f is not None for f in (model_file, calib_file, eval_file)))
    max_bytes = settings.max_upload_bytes
    placed: list[str] = []  # removed again if the submission fails: the rows roll back, the files must too
    try:
        model = models.create_model(db, storage, src=model_file.file, filename=model_file.filename, max_bytes=max_bytes,
                                    tenant_id=tenant_id, settings=settings)
        placed.append(model.storage_path)
        ids: dict[str, str] = {"model_id": model.id}
        for f, key in ((calib_file, "calibration_dataset_id"), (eval_file, "eval_dataset_id")):
            if f is not None:
                ds = datasets.create_dataset(db, storage, src=f.file, filename=f.filename, max_bytes=max_bytes,
                                             tenant_id=tenant_id, settings=settings)
                placed.append(ds.storage_path)
                ids[key] = ds.id
        return jobs.create_job(db, JobCreate.model_validate({**config, **ids}), settings=settings, tenant_id=tenant_id)
    except BaseException:
        for path in placed:
            storage.discard(path)
        raise
