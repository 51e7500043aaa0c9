"""The HTML pages at the HTTP level: the upload form, the job list, the report page and its charts, failed,
cancelled and running states, escaping of hostile model text, and the security headers."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from markupsafe import escape

from app.examples import REPORT_EXAMPLE
from app.jobs.models import Job
from app.pages import charts, present
from app.security import CSP
from tests import builders
from tests.app.conftest import Harness
from tests.app.helpers import submit, upload_model
from tests.reports import at, expected_verdict, shown_as
from worker.engine.config import parse_options
from worker.engine.report import Layer, Report

FORM = {"recipe": "int8_static", "method": "entropy", "per_channel": "on", "batch_size": "4"}


class Tags(HTMLParser):
    """Every start tag with its attributes, as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags_of(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Tags()
    p.feed(html)
    return p.tags


def post_form(h: Harness, files: dict[str, tuple[str, bytes]], **fields: str) -> Any:
    return h.client.post("/jobs/new", files=files, data={"csrf_token": h.csrf(), **FORM, **fields},
                         follow_redirects=False)


def submit_through_form(h: Harness, files: dict[str, tuple[str, bytes]], **fields: str) -> str:
    r = post_form(h, files, **fields)
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[-1]
    assert r.headers["location"] == f"/jobs/{job_id}"
    return job_id


def keyed_values(html: str) -> dict[str, str]:
    """data-key="path" -> the text of that element."""
    return {k: v for k, v in re.findall(r'<span data-key="([^"]+)">([^<]*)</span>', html)}


def test_form_submission_runs_a_job_and_its_page_shows_the_report(api: Harness, zoo: dict[str, Path]) -> None:
    files = {"model": ("conv.onnx", zoo["conv"].read_bytes()),
             "calibration": ("conv_data.npz", zoo["conv_data"].read_bytes()),
             "eval": ("conv_eval.npz", zoo["conv_eval"].read_bytes())}
    job_id = submit_through_form(api, files, target_metric="label_accuracy", target_bound="max_drop",
                                 target_value="0.05")
    assert api.queue.committed_before_enqueue == [True] and api.queue.enqueued == [(job_id, "cpu")]
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["options"]["method"] == "entropy" and job["options"]["batch_size"] == 4
    assert job["options"]["per_channel"] is True
    assert job["accuracy_target"] == {"metric": "label_accuracy", "max_drop": 0.05}
    assert job["eval_dataset_id"] and job["calibration_dataset_id"]

    queued = api.client.get(f"/jobs/{job_id}")
    assert queued.status_code == 200 and f'data-live-job="{job_id}"' in queued.text
    assert '<progress max="100" value="0"' in queued.text and "waiting for a worker" in queued.text

    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    page = api.client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "data-live-job" not in html  # finished: nothing left to poll

    verdict = re.search(r'<p data-field="verdict">([^<]*)</p>', html)
    assert verdict is not None
    assert verdict.group(1).startswith(expected_verdict(report))
    met = "meets" if report["accuracy_target"]["met"] else "misses"
    assert f"{met} the accuracy target (label_accuracy drop \u2264 0.05)" in verdict.group(1)

    # Every exact number on the page is the report's number.
    values = keyed_values(html)
    for key in ("size.original_bytes", "size.quantized_bytes", "size.ratio", "latency.original_ms_p50",
                "latency.quantized_ms_p50", "latency.speedup", "accuracy.samples", "accuracy.outputs.0.cosine",
                "accuracy.outputs.0.sqnr_db", "accuracy.outputs.0.max_abs_error", "accuracy.outputs.0.top1_agreement",
                "accuracy.labels.original", "accuracy.labels.quantized", "accuracy.labels.delta",
                "calibration.method", "calibration.samples", "calibration.seconds", "model.quantized_sha256",
                "accuracy_target.value"):
        assert key in values, key
    for key, text in values.items():
        assert text == shown_as(at(report, key)), key
    for i in range(len(report["layers"])):
        assert f"layers.{i}.sqnr_db" in values

    # Four server-drawn charts, inline; no <img>, no external resources.
    tags = tags_of(html)
    assert sum(1 for t, _ in tags if t == "svg") == 4
    assert not [t for t, _ in tags if t in ("img", "iframe", "object", "embed")]
    assert {a.get("src") for t, a in tags if t == "script"} == {"/static/live.js", "/static/sort.js"}
    assert {a.get("href") for t, a in tags if t == "link"} == {"data:,", "/static/style.css"}
    assert not [a for _, a in tags if "style" in a]
    assert "<style" not in html

    # Downloads, calibration, warnings and the reproducibility box.
    assert f'href="/api/v1/jobs/{job_id}/artifact"' in html and f'href="/api/v1/jobs/{job_id}/report"' in html
    assert report["model"]["original_sha256"] in html and report["model"]["quantized_sha256"] in html
    assert "conv_data.npz" in html and "conv_eval.npz" in html
    for lib in ("onnxruntime", "onnx", "torch", "python"):
        assert f"<dt>{lib}</dt><dd>{report['environment'][lib]}</dd>" in html
    config = re.search(r'<pre data-field="config">([^<]*)</pre>', html)
    assert config is not None
    assert json.loads(config.group(1).replace("&#34;", '"')) == {
        "recipe": "int8_static", "options": report["options"],
        "accuracy_target": {"metric": "label_accuracy", "max_drop": 0.05}}
    # reduce_range, left unset, is what the worker's CPU decided (true on x86-64 without VNNI, else false): the
    # command and the config box hold the value used.
    seven = f" --option reduce_range={'true' if report['options']['reduce_range'] else 'false'}"
    assert "lowbit quantize conv.onnx --calib conv_data.npz --eval conv_eval.npz --recipe int8_static " \
           f"--method entropy{seven} --option batch_size=4 -o conv.int8_static.onnx --report report.json" in html
    for w in report["warnings"]:
        assert str(escape(w)) in html

    # The list shows it with its size ratio and accuracy change.
    listing = api.client.get("/").text
    row = re.search(rf'<tr data-job-id="{job_id}" data-status="succeeded">(.*?)</tr>', listing, re.S)
    assert row is not None
    assert "conv.onnx" in row.group(1) and "Succeeded" in row.group(1)
    assert f"{report['size']['ratio']:.3f} ({1 / report['size']['ratio']:.1f}\u00d7 smaller)" in row.group(1)
    assert "pt label accuracy" in row.group(1)


def test_headers_on_pages_static_files_and_api(sqlite_api: Harness) -> None:
    c = sqlite_api.client
    for url in ("/", "/static/style.css", "/static/live.js", "/static/sort.js", "/api/v1/jobs", "/healthz",
                "/jobs/00000000-0000-0000-0000-000000000000"):
        r = c.get(url)
        assert r.headers["x-content-type-options"] == "nosniff", url
        assert r.headers["content-security-policy"] == CSP, url
    assert c.get("/").headers["x-frame-options"] == "DENY"
    assert c.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert "javascript" in c.get("/static/live.js").headers["content-type"]
    docs = c.get("/docs")
    assert docs.status_code == 200 and "content-security-policy" not in docs.headers
    assert docs.headers["x-content-type-options"] == "nosniff"
    # A browser gets an error page; other clients the API's JSON error.
    html = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    missing = c.get("/jobs/00000000-0000-0000-0000-000000000000", headers=html)
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
    assert "no job with id" in missing.text and "job_not_found" in missing.text
    assert missing.headers["content-security-policy"] == CSP
    assert c.get("/jobs/00000000-0000-0000-0000-000000000000").json()["error"]["code"] == "job_not_found"
    bad_cursor = c.get("/?cursor=!!nonsense", headers=html)
    assert bad_cursor.status_code == 422 and "the cursor is not valid" in bad_cursor.text
    assert c.get("/?cursor=!!nonsense").json()["error"]["code"] == "invalid_cursor"


def test_a_hostile_model_renders_as_text(sqlite_api: Harness, tmp_path: Path) -> None:
    model = builders.hostile_mlp(tmp_path / "hostile.onnx")
    rng = np.random.default_rng(0)
    data = builders.save_npz(tmp_path / "h.npz", x=rng.standard_normal((40, 16)).astype(np.float32))
    name = f"{builders.IMG_TAG}.onnx"
    job_id = submit_through_form(sqlite_api, {"model": (name, model.read_bytes()),
                                              "calibration": (f"{builders.IMG_TAG}.npz", data.read_bytes())},
                                 batch_size="")
    assert sqlite_api.run_queued() == ["succeeded"]
    report = sqlite_api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert any(builders.SCRIPT_TAG in layer["name"] for layer in report["layers"])
    assert builders.IMG_TAG in report["accuracy"]["outputs"][0]["name"]
    for url in (f"/jobs/{job_id}", "/"):
        html = sqlite_api.client.get(url).text
        assert builders.SCRIPT_TAG not in html and builders.IMG_TAG not in html and "<img" not in html
        assert "&gt;&lt;img src=x onerror=alert(1)&gt;" in html  # the file name (a client may send %22 for ")
        tags = tags_of(html)
        assert not [t for t, _ in tags if t == "img"]
        assert all((a.get("src") or "").startswith("/static/") for t, a in tags if t == "script")
        assert not [k for _, a in tags for k in a if k.startswith("on")]
    page = sqlite_api.client.get(f"/jobs/{job_id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # layer names, in the table and in the chart
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page  # a layer and the output
    assert page.count("<svg") == 4


def test_form_mistakes_show_the_form_again_with_the_reason(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    model = ("mlp.onnx", zoo["mlp"].read_bytes())
    calib = ("mlp_data.npz", zoo["mlp_data"].read_bytes())
    cases: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
        ({}, {}, 422, "choose a model file"),
        ({"model": model}, {}, 422, "choose a calibration file"),
        ({"model": model, "calibration": calib}, {"batch_size": "eight"}, 422, "batch size must be a whole number"),
        ({"model": model, "calibration": calib}, {"batch_size": "0"}, 422, "batch_size"),
        ({"model": model, "calibration": calib}, {"recipe": "int9_magic"}, 422, "unknown recipe"),
        ({"model": model, "calibration": calib}, {"recipe": "auto"}, 422, "recipe auto needs an accuracy_target"),
        ({"model": model, "calibration": calib}, {"recipe": "int4_weight_only", "block_size": "48"}, 422,
         "block_size"),
        ({"model": model, "calibration": calib}, {"target_metric": "cosine", "target_value": ""}, 422,
         "give the accuracy target a number"),
        ({"model": model, "calibration": calib},
         {"target_metric": "cosine", "target_bound": "max_drop", "target_value": "-1"}, 422, "greater than or equal"),
        ({"model": ("model.onnx", b"not a model"), "calibration": calib}, {}, 422, "model"),
        ({"model": ("weights.pt", b"pickle"), "calibration": calib}, {}, 422, "pickled PyTorch checkpoint"),
        ({"model": model, "calibration": ("d.npz", builders.npz_bytes(other=np.zeros((4, 3), np.float32)))},
         {}, 422, "features"),
    ]
    for files, fields, status, message in cases:
        r = post_form(sqlite_api, files, **fields)
        assert r.status_code == status, (fields, r.text[:300])
        assert "text/html" in r.headers["content-type"]
        error = re.search(r'<span data-field="form-error">([^<]*)</span>', r.text)
        assert error is not None and message in error.group(1), (message, error and error.group(1))
        assert 'action="/jobs/new"' in r.text
    # What was typed is kept.
    r = post_form(sqlite_api, {"model": model}, method="percentile", batch_size="16", target_metric="cosine",
                  target_bound="min", target_value="0.99")
    assert '<option value="percentile" selected>' in r.text and 'value="16"' in r.text
    assert '<option value="min" selected>' in r.text and 'value="0.99"' in r.text
    assert '<option value="cosine" selected>' in r.text
    # Nothing was recorded or queued by any of these.
    assert sqlite_api.client.get("/api/v1/jobs").json()["items"] == []
    assert sqlite_api.queue.enqueued == []


def test_dynamic_recipe_without_calibration_through_the_form(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    job_id = submit_through_form(sqlite_api, {"model": ("mlp.onnx", zoo["mlp"].read_bytes()),
                                              "calibration": ("", b"")},
                                 recipe="int8_dynamic", per_channel="", method="entropy")
    job = sqlite_api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["calibration_dataset_id"] is None and job["options"]["per_channel"] is False
    assert "method" not in job["options"]
    assert sqlite_api.run_queued() == ["succeeded"]
    html = sqlite_api.client.get(f"/jobs/{job_id}").text
    assert "nothing was calibrated" in html and "synthetic" in html


def test_broker_down_on_form_submission(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    sqlite_api.queue.fail = True
    r = post_form(sqlite_api, {"model": ("mlp.onnx", zoo["mlp"].read_bytes()),
                               "calibration": ("d.npz", zoo["mlp_data"].read_bytes())})
    assert r.status_code == 503 and "job queue is unreachable" in r.text
    [job] = sqlite_api.client.get("/api/v1/jobs").json()["items"]
    assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"
    page = sqlite_api.client.get(f"/jobs/{job['id']}").text
    assert "The job failed" in page and "broker_unavailable" in page


def test_failed_job_page_says_what_went_wrong(sqlite_api: Harness, tmp_path: Path) -> None:
    model = builders.mismatched_mlp(tmp_path / "mismatched.onnx")
    data = builders.save_npz(tmp_path / "d.npz", x=np.ones((20, 20), np.float32))
    job_id = submit_through_form(sqlite_api, {"model": ("mismatched.onnx", model.read_bytes()),
                                              "calibration": ("d.npz", data.read_bytes())})
    assert sqlite_api.run_queued() == ["failed"]
    job = sqlite_api.client.get(f"/api/v1/jobs/{job_id}").json()
    html = sqlite_api.client.get(f"/jobs/{job_id}").text
    assert f"The job failed while {job['stage']}" in html
    assert f'<code data-field="error-code">{job["error"]["code"]}</code>' in html
    message = re.search(r'<p class="errmsg" data-field="error-message">([^<]*)</p>', html, re.S)
    assert message is not None and "dimension mismatch" in message.group(1)
    assert "\x1b" not in message.group(1)
    assert "What to do:</strong> The model could not run on the given data" in html
    assert 'class="badge status-failed" data-field="status">Failed<' in html
    assert "data-live-job" not in html and "<svg" not in html
    row = re.search(rf'<tr data-job-id="{job_id}" data-status="failed">(.*?)</tr>', sqlite_api.client.get("/").text,
                    re.S)
    assert row is not None and "Failed" in row.group(1) and job["error"]["code"] in row.group(1)


def test_cancel_from_the_page(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    token = sqlite_api.csrf()
    # Without the form's token (a cross-site form post) nothing is cancelled.
    r = sqlite_api.client.post(f"/jobs/{job_id}/cancel", follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    assert sqlite_api.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued"
    r = sqlite_api.client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job_id}"
    html = sqlite_api.client.get(f"/jobs/{job_id}").text
    assert "The job was cancelled" in html and "before a worker picked it up" in html
    assert 'data-field="status">Cancelled<' in html and "data-live-job" not in html
    # Cancelling again (it is finished) just shows the page.
    assert sqlite_api.client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token},
                                  follow_redirects=False).status_code == 303


def test_running_job_page_shows_stage_and_progress(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    with sqlite_api.factory.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.stage, job.progress = "running", "quantizing", 55
    html = sqlite_api.client.get(f"/jobs/{job_id}").text
    assert '<progress max="100" value="55"' in html and '<span data-field="progress-text">55 %</span>' in html
    assert 'data-stage="calibrating" class="stage-done"' in html
    assert 'data-stage="quantizing" class="stage-current"' in html and "(in progress)" in html
    assert 'data-stage="validating" class="stage-todo"' in html
    assert f'action="/jobs/{job_id}/cancel"' in html
    listing = sqlite_api.client.get("/").text
    assert f'<tr data-job-id="{job_id}" data-status="running">' in listing and "quantizing 55 %" in listing
    assert 'data-live-list="/api/v1/jobs?limit=25"' in listing


def test_list_pages_newest_first(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(sqlite_api.client, zoo["mlp"])
    ids = [submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"] for _ in range(27)]
    first = sqlite_api.client.get("/").text
    shown = re.findall(r'<tr data-job-id="([^"]+)"', first)
    assert shown == list(reversed(ids))[:25]
    more = re.search(r'href="(/\?cursor=[^"]+)">Older jobs', first)
    assert more is not None
    second = sqlite_api.client.get(more.group(1).replace("&amp;", "&")).text
    assert re.findall(r'<tr data-job-id="([^"]+)"', second) == list(reversed(ids))[25:]
    assert "Newest jobs" in second and "Older jobs" not in second
    assert "data-live-list=\"/api/v1/jobs?limit=25&amp;cursor=" in second


def test_svg_builder_escapes_text_and_attributes() -> None:
    svg = charts.el("text", builders.SCRIPT_TAG, x=1, class_="label", data_name=builders.IMG_TAG)
    assert str(svg) == ('<text x="1" class="label" data-name="&#34;&gt;&lt;img src=x onerror=alert(1)&gt;">'
                        "&lt;script&gt;alert(1)&lt;/script&gt;</text>")
    nested = charts.el("g", svg, "<b>")
    assert str(nested).endswith("&lt;b&gt;</g>") and "<text " in str(nested)


def test_layer_chart_puts_the_worst_layers_first_and_marks_float_ones() -> None:
    layers = [
        {"name": "a", "op_type": "Conv", "precision": "int8", "sqnr_db": 30.0},
        {"name": "b", "op_type": "MatMul", "precision": "fp32", "sqnr_db": None},
        {"name": "c", "op_type": "Conv", "precision": "int8", "sqnr_db": 12.5},
        {"name": "d", "op_type": "Gemm", "precision": "fp32", "sqnr_db": 50.0},
    ]
    svg, shown = charts.layer_chart([Layer.model_validate(layer) for layer in layers])
    assert shown == 4
    labels = re.findall(r'class="label">([^<]*)<', str(svg))
    assert labels == ["c", "a", "d", "b"]
    assert len(re.findall(r'fill="url\(#c\d+-hatch\)" class="bar bar-fp32"', str(svg))) == 1
    assert "n/a \u00b7 fp32" in str(svg) and "12.5 dB \u00b7 int8" in str(svg)
    many = [{"name": f"l{i}", "op_type": "Conv", "precision": "int8", "sqnr_db": float(i)} for i in range(100)]
    assert charts.layer_chart([Layer.model_validate(layer) for layer in many])[1] == charts.MAX_LAYERS


@pytest.mark.parametrize(("report", "verdict"), [
    ({"size": {"ratio": 0.25}, "latency": {"speedup": 2.1},
      "accuracy": {"samples": 9, "outputs": [{"cosine": 0.99, "top1_agreement": 0.997}], "labels": None}},
     "4.0\u00d7 smaller, 2.1\u00d7 faster, 99.7 % top-1 agreement"),
    ({"size": {"ratio": 0.5}, "latency": {"speedup": 0.5},
      "accuracy": {"samples": 9, "outputs": [{"cosine": 0.99, "top1_agreement": None}], "labels": {
          "original": 0.9, "quantized": 0.897, "delta": -0.003}},
      "accuracy_target": {"metric": "label_accuracy", "max_drop": 0.001, "value": 0.897, "met": False}},
     "2.0\u00d7 smaller, 2.0\u00d7 slower, \u22120.3 pt label accuracy; misses the accuracy target "
     "(label_accuracy drop \u2264 0.001)"),
    ({"size": {"ratio": 0.3}, "latency": {"speedup": None},
      "accuracy": {"samples": 9, "outputs": [{"cosine": 0.999871, "top1_agreement": None},
                                             {"cosine": 0.99, "top1_agreement": None}], "labels": None}},
     "3.3\u00d7 smaller, latency not measured, cosine 0.99000"),
    # a speed-up whose 95% interval holds 1.0 claims no factor, faster or slower
    ({"size": {"ratio": 0.25}, "latency": {"speedup": 0.97, "speedup_ci": [0.9, 1.05], "speedup_measurable": False},
      "accuracy": {"samples": 9, "outputs": [{"cosine": 0.99, "top1_agreement": 0.997}], "labels": None}},
     "4.0\u00d7 smaller, no measurable speed-up, 99.7 % top-1 agreement"),
])
def test_verdict_line(report: dict[str, Any], verdict: str) -> None:
    # Hand-made partial reports: read as a stored report is (Report.from_stored tolerates what they lack).
    assert present.verdict(Report.from_stored(report)) == verdict


def test_number_formatting() -> None:
    assert present.fmt_bytes(59906) == "59.9 kB" and present.fmt_bytes(21_500_000) == "21.5 MB"
    assert present.fmt_bytes(512) == "512 B"
    assert present.fmt_ms(0.040439) == "0.0404 ms" and present.fmt_ms(12.34) == "12.3 ms"
    assert present.fmt_signed(-0.3) == "\u22120.3" and present.fmt_signed(0.04) == "\u00b10.0"
    assert present.fmt_signed(1.25, 2) == "+1.25"
    assert present.clean_message("bad\x1b[1;31m thing\x1b[m\x00") == "bad thing"
    assert present.fmt_shape(["batch", 3, 32]) == "[batch, 3, 32]"
    cmd = present.cli_command("int8_static", {"method": "mse", "per_channel": False, "batch_size": 8},
                              "my model.onnx", "c.npz", None)
    assert cmd == ("lowbit quantize 'my model.onnx' --calib c.npz --recipe int8_static --method mse "
                   "--option per_channel=false -o 'my model.int8_static.onnx' --report report.json")


@pytest.mark.parametrize(("ratio", "speedup", "target", "tone"), [
    (0.26, 1.7, None, "good"),
    (0.26, 0.7, None, "warn"),
    (1.2, 1.5, None, "warn"),
    (0.26, 1.7, {"metric": "cosine", "min": 0.99, "value": 0.98, "met": False}, "bad"),
    (0.26, 1.7, {"metric": "label_accuracy", "max_drop": 0.01, "value": None, "met": None}, "warn"),
])
def test_verdict_tone(ratio: float, speedup: float, target: dict[str, Any] | None, tone: str) -> None:
    report: dict[str, Any] = {"size": {"ratio": ratio}, "latency": {"speedup": speedup}}
    if target:
        report["accuracy_target"] = target
    assert present.verdict_tone(Report.from_stored(report)) == tone
    # a slow-down inside the timing noise (its interval holds 1.0) is no reason to warn; a measured one is
    report["latency"]["speedup_measurable"] = False
    expected = "good" if tone == "warn" and ratio <= 1 and not target else tone
    assert present.verdict_tone(Report.from_stored(report)) == expected


def test_axis_ticks_are_round() -> None:
    assert [charts.tick_step(t) for t in (26.8, 40.1, 102.0, 3.2, 0.5)] == [5.0, 10.0, 20.0, 1.0, 0.1]


def _partial_reports(tmp: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(what, job status, report): the example report with each section (and each key of each section)
    missing, null or empty, and the auto reports of searches that measured nothing or predate speed-ups."""
    import copy

    from worker.engine import auto

    full = copy.deepcopy(REPORT_EXAMPLE)
    out: list[tuple[str, str, dict[str, Any]]] = [("full", "succeeded", full)]
    for key, value in full.items():
        if key in ("job_id", "recipe"):
            continue
        out.append((f"no {key}", "succeeded", {k: v for k, v in full.items() if k != key}))
        out.append((f"{key} null", "succeeded", {**full, key: None}))
        if isinstance(value, dict):
            out.append((f"{key} empty", "succeeded", {**full, key: {}}))
            for inner in value:
                out.append((f"{key} without {inner}", "succeeded",
                            {**full, key: {k: v for k, v in value.items() if k != inner}}))
                out.append((f"{key}.{inner} null", "succeeded", {**full, key: {**value, inner: None}}))
    out.append(("bare outputs and layers", "succeeded",
                {**full, "accuracy": {"outputs": [{"name": "y"}]}, "layers": [{"name": "a"}]}))
    target = {"metric": "cosine", "min": 0.99}
    failed = [auto.CandidateResult(c, "failed", error={"code": "quantization_failed", "message": "no"})
              for c in auto.plan_candidates(builders.mlp(tmp / "m.onnx"), parse_options("auto", {}))]
    out.append(("auto, every candidate failed", "failed",
                {**auto.conclude(failed, target, "j", {}, 1.0, 1).report, "accuracy_target": {**target, "met": False}}))
    skipped = [auto.skipped(r.candidate, "not started") for r in failed]
    out.append(("auto, every candidate skipped", "failed", auto.conclude(skipped, target, "j", {}, 1.0, 1).report))
    # An auto report from before candidates carried speed-ups (and from before "prefer").
    older = [{"recipe": "int8_static", "options": {"method": "minmax"}, "excluded_nodes": [], "status": "done",
              "size_bytes": 100, "metric": 0.995, "met_target": True, "latency_ms_p50": 1.0}]
    out.append(("auto, older report", "succeeded",
                {**full, "recipe": "auto", "candidates": older, "chosen": {**older[0], "options": {"method": "minmax"}},
                 "auto": {"target": target}, "kept_in_float": []}))
    out.append(("auto, candidates null", "failed", {"recipe": "auto", "candidates": None, "auto": None}))
    return out


def test_every_partial_report_shape_renders(sqlite_api: Harness, zoo: dict[str, Path], tmp_path: Path) -> None:
    """A report missing any section or key (a failed auto search has no size, latency or accuracy; older
    engines wrote fewer keys) still gives the job page, the job list and the client summary, never a 500."""
    from app.client.cli import summary_lines

    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    for what, status, report in _partial_reports(tmp_path):
        with sqlite_api.factory.begin() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.report = status, report
            job.error_code, job.error_message = ("accuracy_target_not_met", "missed") if status == "failed" else \
                (None, None)
        page = sqlite_api.client.get(f"/jobs/{job_id}")
        assert page.status_code == 200, (what, page.text[-3000:])
        assert "Reproducibility" in page.text, what
        assert sqlite_api.client.get("/").status_code == 200, what
        api_job = sqlite_api.client.get(f"/api/v1/jobs/{job_id}")
        assert api_job.status_code == 200, what
        lines = summary_lines(api_job.json(), report)
        assert lines[0].startswith(f"job {job_id} {status}"), what
        if report.get("size") and report["size"].get("quantized_bytes") and report["size"].get("original_bytes"):
            assert 'id="card-size"' in page.text, what
        if what.startswith("auto, every"):
            assert "No candidate could be measured" in page.text, what
            assert "  no candidate could be measured" in lines, what


def test_auto_page_and_summary_show_speed_against_fp32(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    """Each candidate's speed against fp32 in the table; a chosen model slower than fp32 is called out on the
    page (notice and warning) and in the client summary; smaller candidates passed over for speed are named."""
    from app.client.cli import summary_lines
    from worker.engine import auto

    def measured(recipe: str, size: int, speedup: float, method: str | None = None) -> auto.CandidateResult:
        report = {**json.loads(json.dumps(REPORT_EXAMPLE)), "warnings": []}
        report["latency"] = {**report["latency"], "original_ms_p50": 10.0, "quantized_ms_p50": 10.0 / speedup,
                             "speedup": speedup}
        return auto.CandidateResult(auto.Candidate(recipe, {"method": method} if method else {}), "done",
                                    size_bytes=size, metric=0.995, met_target=True, latency_ms_p50=10.0 / speedup,
                                    fp32_latency_ms_p50=10.0, report=report)

    rows = [measured("int8_dynamic", 1_760_000, 0.23), measured("int8_static", 1_900_000, 1.8, "minmax")]
    target = {"metric": "cosine", "min": 0.99}
    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]

    def show(report: dict[str, Any]) -> tuple[str, list[str]]:
        with sqlite_api.factory.begin() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.report = "succeeded", {**report, "accuracy_target": {**target, "met": True}}
        html = sqlite_api.client.get(f"/jobs/{job_id}").text
        return html, summary_lines(sqlite_api.client.get(f"/api/v1/jobs/{job_id}").json(), report)

    html, lines = show(auto.conclude(rows, target, job_id, {}, 1.0, 1).report)  # size and speed
    speeds = re.findall(r'<td class="num( slower)?" data-field="speedup" data-value="([^"]*)">([^<]*)</td>', html)
    assert sorted(speeds) == [("", "1.8", "1.8\u00d7 faster"), (" slower", "0.23", "4.3\u00d7 slower")]
    assert "the smallest that is not slower than\n    the fp32 model is chosen" in html
    assert 'data-field="chosen-slower"' not in html
    assert re.search(r'data-field="passed-over">Smaller, but passed over for being slower than the fp32 model:\s+'
                     r'int8_dynamic, 1.8 MB, 4.3\u00d7 slower', html)
    assert "  chosen: int8_static (minmax), 1.80x faster than fp32" in lines

    html, lines = show(auto.conclude(rows, target, job_id, {}, 1.0, 1, prefer="size").report)
    assert 'data-field="chosen-slower"' in html and "(4.3\u00d7 slower)" in html
    warnings = html[html.index('id="warnings"'):]
    assert "auto chose int8_dynamic for its size only" in warnings[:warnings.index("</section>")]
    assert "  chosen: int8_dynamic, 4.35x slower than fp32 (SLOWER than the fp32 model)" in lines
    assert any(line.startswith("  warning: auto chose int8_dynamic") for line in lines)

    # auto's A16W8 step: the table shows its 16-bit activations beside the layers kept in float.
    wide = measured("int8_static", 1_900_100, 1.5, "entropy")
    wide.candidate = auto.Candidate("int8_static", {"method": "entropy"}, (), ("expand1.out",))
    floated = measured("int8_static", 2_100_000, 1.6, "entropy")
    floated.candidate = auto.Candidate("int8_static", {"method": "entropy"}, ("squeeze1",))
    html, lines = show(auto.conclude([wide, floated], target, job_id, {}, 1.0, 1).report)
    assert "Kept in float / 16-bit activations" in html
    assert re.search(r'<span data-field="a16">16-bit: <code>expand1.out</code></span>', html)
    assert "<td><code>squeeze1</code></td>" in html
    assert "  chosen: int8_static (entropy) + 1 activation in 16 bits, 1.50x faster than fp32" in lines


def _report_with_intervals() -> dict[str, Any]:
    """The example report (one classification output with labels) plus an embedding, a bit-identical and a
    CTC sequence output, an evaluation set sharing samples with the calibration set, and a confident target."""
    report: dict[str, Any] = json.loads(json.dumps(REPORT_EXAMPLE))
    acc = report["accuracy"]
    acc["outputs"] += [
        {"name": "embedding", "role": "embedding", "role_source": "declared", "role_reason": "declared in "
         "options.outputs", "samples": 64, "cosine": 0.998765, "cosine_ci": [0.998112, 0.999301], "sqnr_db": 26.2,
         "sqnr_db_ci": [25.1, 27.4], "identical": False, "max_abs_error": 0.03, "top1_agreement": None,
         "top1_agreement_ci": None, "neighbour_agreement": 0.96875, "neighbour_agreement_ci": [0.921875, 1.0],
         "neighbour_samples": 64},
        {"name": "boxes", "role": "regression", "role_source": "inferred", "role_reason": "4 values per sample "
         "(box-like)", "samples": 64, "cosine": 1.0, "cosine_ci": [1.0, 1.0], "sqnr_db": None, "sqnr_db_ci": None,
         "identical": True, "max_abs_error": 0.0, "top1_agreement": None, "top1_agreement_ci": None},
        {"name": "ctc", "role": "classification", "role_source": "inferred", "role_reason": "[samples, steps, 37] "
         "scores per step", "samples": 64, "cosine": 0.9991, "cosine_ci": [0.9987, 0.9994], "sqnr_db": 27.0,
         "sqnr_db_ci": [26.0, 28.1], "identical": False, "max_abs_error": 0.2, "top1_agreement": 0.9921875,
         "top1_agreement_ci": [0.984375, 0.998047], "sequence_agreement": 0.90625,
         "sequence_agreement_ci": [0.828125, 0.96875], "ctc_sequence_agreement": 0.953125,
         "ctc_sequence_agreement_ci": [0.90625, 1.0]},
    ]
    acc["overlap"] = {"evaluation_samples": 64, "shared_with_calibration": 12, "identical_to_calibration": False}
    report["warnings"] = ["12 of the 64 evaluation samples also occur in the calibration set: figures on them "
                          "are optimistic; give an evaluation set of other samples"]
    report["accuracy_target"] = {**report["accuracy_target"], "confidence": 0.95, "bound": 0.875}
    return report


def _without_intervals(report: dict[str, Any]) -> dict[str, Any]:
    """The same report as an engine from before intervals and roles wrote it."""
    old: dict[str, Any] = json.loads(json.dumps(report))
    new_keys = ("_ci", "role", "identical", "sqnr_note", "samples", "sequence_agreement", "neighbour")
    for o in old["accuracy"]["outputs"]:
        for k in [k for k in o if k != "name" and any(x in k for x in new_keys)]:
            del o[k]
    for k in ("original_ci", "quantized_ci", "delta_ci"):
        del old["accuracy"]["labels"][k]
    del old["accuracy"]["overlap"]
    for k in ("speedup_ci", "speedup_measurable", "runs", "order"):
        del old["latency"][k]
    old["accuracy_target"] = {k: v for k, v in old["accuracy_target"].items() if k not in ("confidence", "bound")}
    return old


def _field(html: str, name: str) -> list[str]:
    """The text of every element with data-field=name (tags inside removed, entities decoded, space folded)."""
    import html as html_lib

    found = re.findall(rf'<(\w+)[^>]* data-field="{name}"[^>]*>(.*?)</\1>', html, re.S)
    return [" ".join(html_lib.unescape(re.sub(r"<[^>]+>", "", inner)).split()) for _, inner in found]


def test_report_page_shows_intervals_roles_and_how_to_read(sqlite_api: Harness, zoo: dict[str, Path]) -> None:
    """Each figure with its 95% interval, each output's role (declared or inferred, the reason as its title),
    the overlap warning, and a how-to-read section carrying this job's numbers; a slow-down inside the timing
    noise reads 'no measurable speed-up'; a report from before intervals renders without them."""
    m = upload_model(sqlite_api.client, zoo["mlp"])
    job_id = submit(sqlite_api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]

    def page(report: dict[str, Any]) -> str:
        with sqlite_api.factory.begin() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.report = "succeeded", report
        r = sqlite_api.client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text[-2000:]
        return r.text

    report = _report_with_intervals()
    html = page(report)
    assert _field(html, "verdict")[0].startswith(expected_verdict(report))
    assert _field(html, "headline-delta") == ["\u22121.6 pt (\u22124.7 \u2026 0.0)"]
    assert _field(html, "headline-after-ci") == ["after: 90.6 % (82.8 \u2026 96.9 %), 95% interval"]
    assert _field(html, "speed") == ["2.6\u00d7 faster (2.4 \u2026 2.7), 30 interleaved runs"]
    assert _field(html, "speedup-ci") == ["(2.45 \u2026 2.69)"]
    assert _field(html, "target-bound") == ["decided by the 95% interval's lower end, 0.875, not the measured value"]
    assert _field(html, "cosine-ci")[:2] == ["(0.9992 \u2026 0.9996)", "(0.9981 \u2026 0.9993)"]
    assert _field(html, "sqnr-ci")[0] == "(27.9 \u2026 30.8)" and _field(html, "top1-ci")[0] == "(95.3 \u2026 100.0 %)"
    assert _field(html, "sqnr-note") == ["\u221e (identical)"]
    assert _field(html, "labels-delta-ci") == ["(\u22124.7 \u2026 0.0) pt"]
    assert _field(html, "role") == ["classification", "embedding", "regression", "classification"]
    assert _field(html, "role-source") == ["(inferred)", "(declared)", "(inferred)", "(inferred)"]
    assert 'title="labels in [0, 10) were given">classification</span>' in html
    assert _field(html, "output-extra") == [
        "nearest neighbour 96.9 % (92.2 \u2026 100.0 %) among 64 samples",
        "whole sequence 90.6 % (82.8 \u2026 96.9 %)", "CTC-decoded 95.3 % (90.6 \u2026 100.0 %)"]
    assert _field(html, "overlap") == ["12 of the 64 evaluation samples also occur in the calibration set: the "
                                       "figures on them are optimistic."]
    # The exact figures stay exact beside their intervals (the identical output's SQNR is written out instead).
    for key, text in keyed_values(html).items():
        assert text == shown_as(at(report, key)), key
    assert "accuracy.outputs.2.sqnr_db" not in keyed_values(html)

    read = {p: " ".join(_field(html, f"read-{p}")) for p in (
        "calibration", "recipe", "figures", "trust-0", "trust-1", "trust-2", "trust-3", "intervals", "overlap")}
    assert "entropy method on 192 samples (2.41 s)" in read["calibration"]
    assert "post-training quantization (PTQ, recipe int8_static)" in read["recipe"]
    assert "on the same 64 samples, from the evaluation set" in read["figures"]
    assert "26.2 dB (embedding), means an error about 4.9 % of the output's size" in read["figures"]
    assert "boxes: bit-identical" in read["figures"]
    assert "trust label accuracy" in read["trust-0"]
    assert "92.2 % before, 90.6 % after (\u22121.6 pt, between \u22124.7 and 0.0 pt)" in read["trust-0"]
    assert "(inferred: labels in [0, 10) were given)" in read["trust-0"]
    assert "trust nearest-neighbour agreement" in read["trust-1"] and "96.9 % (92.2 \u2026 100.0 %) among 64" \
        in read["trust-1"] and "declared in the job's options" in read["trust-1"]
    assert "Output boxes is a regression output (inferred: 4 values per sample (box-like)): bit-identical" \
        in read["trust-2"]
    assert "Output embedding is an embedding output" in read["trust-1"]
    assert "trust CTC-decoded sequence agreement, 95.3 % (90.6 \u2026 100.0 %)" in read["trust-3"]
    assert "with 64 evaluation samples the label-accuracy change is between \u22124.7 and 0.0 points with 95% " \
           "confidence" in read["intervals"]
    assert "cannot be told apart from chance" in read["intervals"]
    assert "30 timed runs" in read["intervals"] and "(0.875)" in read["intervals"]
    assert "12 of the 64 evaluation samples also occur in the calibration set" in read["overlap"]

    # A speed-up whose interval holds 1.0 is no speed-up, in the verdict and the card, and no reason to warn.
    report["latency"].update(speedup=0.98, speedup_ci=[0.93, 1.08], speedup_measurable=False,
                             quantized_ms_p50=1.912 / 0.98)
    html = page(report)
    verdict = _field(html, "verdict")[0]
    assert verdict.startswith(expected_verdict(report)) and "no measurable speed-up, \u22121.6 pt" in verdict
    assert 'class="verdict verdict-bad"' in html  # the target, not the speed, decides the tone
    assert _field(html, "speed") == ["no measurable speed-up (0.93 \u2026 1.08), 30 interleaved runs"]
    assert "includes 1.0: on this machine the two models' speeds cannot be told apart" in \
        " ".join(_field(html, "read-intervals"))

    # An older report: the same figures, no intervals, no roles, and still a how-to-read from its numbers.
    old = _without_intervals(_report_with_intervals())
    html = page(old)
    assert _field(html, "verdict")[0].startswith(expected_verdict(old))
    assert _field(html, "headline-delta") == ["\u22121.6 pt"] and not _field(html, "headline-after-ci")
    assert _field(html, "speed") == ["2.6\u00d7 faster"] and _field(html, "speedup-ci") == ["n/a"]
    for name in ("cosine-ci", "sqnr-ci", "top1-ci", "role", "overlap", "output-extra", "target-bound",
                 "sqnr-note", "read-overlap"):
        assert not _field(html, name), name
    assert 'class="ci"' not in html
    assert "entropy method on 192 samples" in " ".join(_field(html, "read-calibration"))
    assert "trust SQNR 29.3 dB and cosine 0.99941" in " ".join(_field(html, "read-trust-0"))
    assert not _field(html, "read-intervals")
