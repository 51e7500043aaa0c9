"""The report's typed contract (worker/engine/report.py): the API declares and serves its JSON Schema, and
`lowbit quantize` writes the same report as a service job for the same input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.examples import REPORT_EXAMPLE
from tests.app.conftest import Harness
from tests.app.helpers import submit, upload_dataset, upload_model
from tests.reports import assert_report_complete, assert_report_valid
from worker.engine.report import Report, report_schema
from worker.engine.report_check import REPORT_VERSION

TARGET = {"metric": "label_accuracy", "max_drop": 0.05}
# An auto report's own section, for hand-made auto reports.
AUTO_SECTION: dict[str, Any] = {
    "target": {"metric": "cosine", "min": 0.99}, "rounds": 1, "seconds": 0.5, "evaluated": 0, "failed": 0,
    "skipped": [], "workers": [], "sensitivity_ranking": [], "prefer": "size_and_speed", "speed_tolerance": 0.1,
    "chosen_speedup": None, "chosen_slower_than_fp32": None, "passed_over_as_slower": []}


def test_report_schema_is_served_at_a_stable_url_and_in_the_openapi_document(sqlite_api: Harness) -> None:
    r = sqlite_api.client.get("/api/v1/schemas/report.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    schema = r.json()
    assert schema == json.loads(json.dumps(report_schema()))
    assert schema["title"] == "Report" and "report_version" in schema["required"]
    assert {"size", "accuracy", "latency", "layers", "accuracy_target", "auto"} <= set(schema["properties"])
    doc = sqlite_api.client.get("/openapi.json").json()
    ok = doc["paths"]["/api/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"] == {"$ref": "#/components/schemas/Report"}
    assert doc["components"]["schemas"]["Report"]["properties"]["report_version"]["type"] == "integer"
    assert "/api/v1/schemas/report.json" in doc["paths"]


def test_the_documented_example_follows_the_contract() -> None:
    Report.model_validate(REPORT_EXAMPLE)
    assert REPORT_EXAMPLE["report_version"] == REPORT_VERSION


def test_the_contract_refuses_a_broken_report() -> None:
    from pydantic import ValidationError

    broken = copy.deepcopy(REPORT_EXAMPLE)
    del broken["latency"]
    with pytest.raises(ValidationError, match="latency"):
        Report.model_validate(broken)
    renamed = copy.deepcopy(REPORT_EXAMPLE)
    renamed["size"]["quantised_bytes"] = renamed["size"].pop("quantized_bytes")
    with pytest.raises(ValidationError):
        Report.model_validate(renamed)
    wrong = copy.deepcopy(REPORT_EXAMPLE)
    wrong["layers"][0]["precision"] = "int7"
    with pytest.raises(ValidationError):
        Report.model_validate(wrong)
    # auto with no candidate measured: the candidate table alone is a whole report.
    Report.model_validate({"report_version": 1, "job_id": None, "recipe": "auto", "options": {}, "chosen": None,
                           "best": None, "candidates": [], "kept_in_float": [], "auto": AUTO_SECTION})


def test_a_report_stored_before_versioning_is_served_as_stored(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    from app.jobs.models import Job

    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    old = {k: v for k, v in REPORT_EXAMPLE.items() if k not in ("report_version", "model")}
    old["latency"] = {**old["latency"], "since_removed": 1}
    with sqlite_api.factory.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.report = "succeeded", old
    r = sqlite_api.client.get(f"/api/v1/jobs/{job_id}/report")
    assert r.status_code == 200 and r.json() == json.loads(json.dumps(old))


# Measured times, which differ between any two runs; everything else must match.
TIMING = {("latency", "original_ms_p50"), ("latency", "quantized_ms_p50"), ("latency", "speedup"),
          ("latency", "speedup_ci"), ("latency", "speedup_measurable"), ("calibration", "seconds"),
          ("layer_sqnr", "seconds"), ("smoothquant", "seconds"), ("equalization", "seconds"),
          ("bias_correction", "seconds")}


def _without_timing(report: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(report)
    for section, key in TIMING:
        (out.get(section) or {}).pop(key, None)
    # The slow-down warning quotes both latencies.
    out["warnings"] = [w for w in out["warnings"] if "is slower than the original here" not in w]
    out["job_id"] = None  # the service's job id; `lowbit quantize` has none
    return out


def test_lowbit_quantize_and_a_service_job_write_the_same_report(sqlite_api: Harness, zoo: dict[str, Path],
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    api = sqlite_api
    options = {"method": "percentile", "percentile": 99.9, "latency_runs": 3}
    m = upload_model(api.client, zoo["mlp"])
    cal = upload_dataset(api.client, zoo["mlp_data"])
    ev = upload_dataset(api.client, zoo["mlp_data"], name="eval.npz")
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=cal["id"], eval_dataset_id=ev["id"],
               recipe="int8_static", options=options, accuracy_target=TARGET)
    assert r.status_code == 202, r.text
    assert api.run_queued() == ["succeeded"]
    served = api.client.get(f"/api/v1/jobs/{r.json()['id']}/report").json()

    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    rc = main(["quantize", str(zoo["mlp"]), "--calib", str(zoo["mlp_data"]), "--eval", str(zoo["mlp_data"]),
               "--recipe", "int8_static", "--method", "percentile", "--option", "percentile=99.9",
               "--option", "latency_runs=3", "--accuracy-target", json.dumps(TARGET),
               "--threads", str(api.settings.worker_threads), "--device", "cpu", "-o", str(out), "--report", str(rep)])
    assert rc == 0, capsys.readouterr().err
    offline = json.loads(rep.read_text())

    for report in (served, offline):
        assert_report_complete(report, "int8_static")
        assert_report_valid(report)
    # The target is measured by the engine, so the offline run reports it too.
    assert offline["accuracy_target"]["metric"] == "label_accuracy" and "met" in offline["accuracy_target"]
    assert list(offline) == list(served)
    assert _without_timing(offline) == _without_timing(served)


def test_the_webhook_summary_names_report_sections() -> None:
    from app.webhooks import SUMMARY_KEYS

    assert set(SUMMARY_KEYS) <= set(Report.model_fields)


@pytest.mark.parametrize("versioned", [True, False])
def test_an_auto_jobs_config_comes_from_its_report_with_or_without_report_version(
        sqlite_api: Harness, zoo: dict[str, Path], versioned: bool) -> None:
    """GET /config reads chosen (else best) through the Report model, and a report stored before report_version
    (here: no version, and a chosen without excluded_nodes) as stored."""
    from app.jobs.models import Job

    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    chosen = {"recipe": "int8_static", "options": {"method": "entropy", "nodes_to_exclude": ["/0/Gemm"]}}
    if versioned:
        report = {**copy.deepcopy(REPORT_EXAMPLE), "recipe": "auto", "options": {},
                  "chosen": {**chosen, "excluded_nodes": ["/0/Gemm"]},
                  "best": {**chosen, "excluded_nodes": ["/0/Gemm"], "metric": 0.99, "distance_to_target": 0.0},
                  "candidates": [], "kept_in_float": [], "auto": AUTO_SECTION}
        Report.model_validate(report)  # so the model, not the fallback, reads it
    else:
        report = {"recipe": "auto", "options": {}, "chosen": chosen, "best": None}
    with sqlite_api.factory.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.recipe, job.report = "succeeded", "auto", report
    r = sqlite_api.client.get(f"/api/v1/jobs/{job_id}/config")
    assert r.status_code == 200 and r.json() == chosen


def _pre_version_reports() -> list[tuple[str, str, dict[str, Any]]]:
    """(what, job status, report) as engines before report_version stored them: no version, no model section,
    latency without runs/order, outputs without role_source, a key since removed; and an auto search that
    failed, without size, latency or accuracy, and without the auto section's later keys."""
    old = {k: v for k, v in copy.deepcopy(REPORT_EXAMPLE).items() if k not in ("report_version", "model")}
    old["latency"] = {k: v for k, v in old["latency"].items() if k not in ("runs", "order")}
    old["latency"]["since_removed"] = 1
    for o in old["accuracy"]["outputs"]:
        o.pop("role_source", None)
    auto_failed = {"job_id": "j", "recipe": "auto", "options": {}, "chosen": None, "best": None,
                   "candidates": [{"recipe": "int8_static", "options": {"method": "minmax"}, "status": "failed",
                                   "size_bytes": None, "metric": None, "met_target": None,
                                   "error": {"code": "quantization_failed", "message": "no"}}],
                   "kept_in_float": [], "warnings": [],
                   "auto": {"target": {"metric": "cosine", "min": 0.99}, "rounds": 1, "seconds": 0.5,
                            "evaluated": 0, "failed": 1, "skipped": [], "workers": []}}
    return [("pre-version measured", "succeeded", old), ("pre-version auto failure", "failed", auto_failed)]


def test_a_report_stored_before_versioning_loads_typed_and_renders(sqlite_api: Harness, zoo: dict[str, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Report.from_stored upgrades a pre-version report (version filled in, keys since removed dropped, keys it
    lacks read as None), and the job page, the job list, `lowbit status`'s summary and the offline CLI's
    figures show it."""
    from app.cli import print_figures
    from app.client.cli import summary_lines
    from app.jobs.models import Job

    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    for what, status, stored in _pre_version_reports():
        typed = Report.from_stored(stored)
        assert typed.report_version == REPORT_VERSION, what
        with sqlite_api.factory.begin() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.report = status, stored
            job.error_code, job.error_message = ("accuracy_target_not_met", "missed") if status == "failed" else \
                (None, None)
        page = sqlite_api.client.get(f"/jobs/{job_id}")
        assert page.status_code == 200 and "Reproducibility" in page.text, what
        assert sqlite_api.client.get("/").status_code == 200, what
        lines = summary_lines(sqlite_api.client.get(f"/api/v1/jobs/{job_id}").json(), stored)
        assert lines[0].startswith(f"job {job_id} {status}"), what
        print_figures(typed.model_dump(mode="json", exclude_unset=True))
        out = capsys.readouterr().out
        if typed.size is not None:
            assert 'id="card-size"' in page.text and 'id="card-latency"' in page.text
            assert typed.latency is not None and typed.latency.runs is None and typed.model is None
            assert "latency p50" in out and "interleaved" not in " ".join(lines)
        else:
            assert "candidate int8_static (minmax) failed: [quantization_failed] no" in " ".join(lines)
            assert 'id="card-size"' not in page.text and out == ""
            assert typed.auto is not None and typed.auto.prefer is None  # before "prefer": chose by size


def test_the_clients_report_reader_names_report_sections() -> None:
    """The client reads the report's JSON (it imports no pydantic); its one reader uses Report's field names."""
    import dataclasses

    from app.client.cli import ReportSections

    assert {f.name for f in dataclasses.fields(ReportSections)} <= set(Report.model_fields)
