"""An auto job through the API and the real worker code path: the job's task runs the analysis candidate
and sends the others as sub-tasks; here they run in this process, one after another, as workers would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import builders
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_dataset, upload_model
from worker import auto_tasks


@pytest.fixture
def subtasks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int, str]]:
    from worker import runner
    from worker.engine import pipeline

    # The engine runs in this process rather than a sandboxed child per candidate (a second of start-up each;
    # tests/worker/test_sandbox.py covers the sandbox, tests/e2e/test_auto_workers.py runs auto through it).
    monkeypatch.setattr(runner, "run_engine", lambda cfg, progress, settings=None: pipeline.run(cfg, progress))
    sent: list[tuple[str, int, int, str]] = []
    monkeypatch.setattr(auto_tasks, "send", lambda job_id, attempt, idx, queue: sent.append((job_id, attempt, idx,
                                                                                              queue)))
    return sent


def _run(api: Harness, sent: list[tuple[str, int, int, str]]) -> int:
    """Run the job and every candidate sub-task it (and they) send; returns how many sub-tasks ran."""
    api.run_queued()
    ran = 0
    while sent:
        job_id, attempt, idx, _ = sent.pop(0)
        auto_tasks.run_candidate(job_id, attempt, idx, api.settings, api.factory)
        ran += 1
    return ran


def _submit_auto(api: Harness, tmp_path: Path, target: dict[str, Any], **options: Any) -> str:
    """An auto job on the planted-outlier model. The tests that check which layers are kept in float choose by
    size only (prefer: size): on a model this small every quantized candidate is slower than fp32. SmoothQuant is
    off: on by default where inputs have outlier channels, it would let plain static int8 meet the targets."""
    model = upload_model(api.client, builders.planted_outlier_mlp(tmp_path / "planted.onnx"))
    data = upload_dataset(api.client, builders.planted_data(tmp_path / "planted.npz"))
    r = submit(api.client, model_id=model["id"], calibration_dataset_id=data["id"], recipe="auto",
               options={"latency_runs": 3, "smoothquant": "off", **options}, accuracy_target=target)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_auto_job_finds_the_planted_layers(api: Harness, tmp_path: Path,
                                           subtasks: list[tuple[str, int, int, str]]) -> None:
    job_id = _submit_auto(api, tmp_path, {"metric": "sqnr_db", "min": 21.0}, prefer="size")
    ran = _run(api, subtasks)
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert report["recipe"] == "auto"
    assert sorted(report["chosen"]["excluded_nodes"]) == sorted(builders.PLANTED_SENSITIVE)
    assert report["accuracy_target"]["met"] is True and report["accuracy_target"]["value"] >= 21.0
    rows = report["candidates"]
    assert len(rows) == ran + 1  # the analysis candidate ran in the job's own task
    assert all(r["status"] == "done" and r["worker"] for r in rows)
    keys = {"recipe", "options", "excluded_nodes", "size_bytes", "metric", "latency_ms_p50", "met_target"}
    assert keys <= set(rows[0])
    # Calibrated once: the first candidate collected statistics, every later static one read the cache.
    analysis = rows[0]
    assert analysis["recipe"] == "int8_static" and not analysis["excluded_nodes"]
    assert {k["name"] for k in report["kept_in_float"]} == set(builders.PLANTED_SENSITIVE)
    assert any(layer.get("sensitivity") for layer in report["layers"])
    # The artifact is the chosen candidate's, and the exported config reproduces it.
    art = api.client.get(f"/api/v1/jobs/{job_id}/artifact")
    assert art.status_code == 200
    chosen = next(r for r in rows if r["met_target"] and sorted(r["excluded_nodes"]) == sorted(
        builders.PLANTED_SENSITIVE) and r["recipe"] == report["chosen"]["recipe"])
    assert len(art.content) == chosen["size_bytes"]
    # The candidates' own files are gone; only the chosen artifact stays.
    job_dir = api.settings.data_dir / "jobs" / job_id
    assert not list(job_dir.glob("auto-*")) and not list(job_dir.glob("work-*"))


def test_auto_job_searching_float_fallback_alone_takes_float_steps_only(
        sqlite_api: Harness, tmp_path: Path, subtasks: list[tuple[str, int, int, str]]) -> None:
    api = sqlite_api
    job_id = _submit_auto(api, tmp_path, {"metric": "sqnr_db", "min": 21.0}, prefer="size", search="float_fallback")
    _run(api, subtasks)
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert report["options"]["search"] == "float_fallback"
    assert sorted(report["chosen"]["excluded_nodes"]) == sorted(builders.PLANTED_SENSITIVE)
    # The queue's rounds took the same steps as the in-process search: layers in float, nothing else.
    rows = report["candidates"]
    assert any(r["excluded_nodes"] for r in rows)
    assert not [r for r in rows if r["activations_16bit"] or r["blocks"] or r["options"].get("adaround") == "on"]
    page = api.client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and 'search: "float_fallback"' in page.text.replace("&#34;", '"')


def test_auto_job_that_misses_fails_with_its_report(sqlite_api: Harness, tmp_path: Path,
                                                     subtasks: list[tuple[str, int, int, str]]) -> None:
    api = sqlite_api
    job_id = _submit_auto(api, tmp_path, {"metric": "sqnr_db", "min": 200.0}, max_fallback_steps=1)
    _run(api, subtasks)
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "accuracy_target_not_met"
    assert "fp16" in job["error"]["message"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert report["chosen"] is None and report["best"]["recipe"] == "fp16"
    assert report["best"]["distance_to_target"] > 100
    assert report["accuracy_target"]["met"] is False
    assert api.client.get(f"/api/v1/jobs/{job_id}/artifact").status_code in (404, 409)


def test_auto_time_budget_skips_candidates(sqlite_api: Harness, tmp_path: Path,
                                           subtasks: list[tuple[str, int, int, str]]) -> None:
    api = sqlite_api
    job_id = _submit_auto(api, tmp_path, {"metric": "sqnr_db", "min": 21.0, "time_budget_s": 0.001})
    _run(api, subtasks)
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert report["auto"]["skipped"]
    assert all(r["status"] == "skipped" for r in report["candidates"])
    assert api.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "failed"


def test_auto_needs_an_accuracy_target(sqlite_api: Harness, tmp_path: Path) -> None:
    api = sqlite_api
    model = upload_model(api.client, builders.mlp(tmp_path / "m.onnx"))
    data = upload_dataset(api.client, builders.mlp_data(tmp_path / "d.npz"))
    r = submit(api.client, model_id=model["id"], calibration_dataset_id=data["id"], recipe="auto")
    assert r.status_code == 422
    assert error_of(r) == "invalid_request"
    assert "accuracy_target" in r.json()["error"]["message"]
    assert not api.queue.enqueued


def test_auto_page_config_export_and_cli_reproduce(sqlite_api: Harness, tmp_path: Path,
                                                   subtasks: list[tuple[str, int, int, str]]) -> None:
    import hashlib
    import json
    import re

    from app.cli import main
    from app.security import CSP

    api = sqlite_api
    job_id = _submit_auto(api, tmp_path, {"metric": "sqnr_db", "min": 21.0}, prefer="size")
    _run(api, subtasks)
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    page = api.client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    html = page.text
    # The accuracy-against-size chart: one point per measured candidate, the chosen one ringed, the target line.
    svg = html[html.index('class="chart chart-pareto"'):]
    svg = svg[:svg.index("</svg>")]
    measured = [c for c in report["candidates"] if c["metric"] is not None]
    assert svg.count('class="point ') == len(measured)
    assert svg.count('class="chosen"') == 1 and 'class="target"' in svg
    # The candidate table: a row per candidate, one marked chosen; the layers kept in float with sensitivity.
    assert html.count('data-field="candidate"') == len(report["candidates"])
    assert html.count("(chosen)") == 1
    kept = html[html.index('id="kept-in-float"'):]
    kept = kept[:kept.index("</ul>")]
    assert all(f"<code>{n}</code>" in kept for n in builders.PLANTED_SENSITIVE)
    assert "Sensitivity</button>" in html  # the layer table's sensitivity column
    assert "style=" not in html and "<script>" not in html
    # The chosen configuration as a file, which the offline CLI reproduces byte for byte.
    r = api.client.get(f"/api/v1/jobs/{job_id}/config")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    config = r.json()
    assert config["recipe"] == report["chosen"]["recipe"]
    assert sorted(config["options"]["nodes_to_exclude"]) == sorted(builders.PLANTED_SENSITIVE)
    assert f'href="/api/v1/jobs/{job_id}/config"' in html
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(config))
    out = tmp_path / "reproduced.onnx"
    rc = main(["quantize", str(tmp_path / "planted.onnx"), "--calib", str(tmp_path / "planted.npz"),
               "--config", str(cfg_file), "-o", str(out), "--threads", "1", "--device", "cpu"])
    assert rc == 0
    served = api.client.get(f"/api/v1/jobs/{job_id}/artifact").content
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(served).hexdigest()
    assert re.search(r"Download the quantized model", html)


def test_failed_auto_job_page_shows_the_closest_candidate(sqlite_api: Harness, tmp_path: Path,
                                                          subtasks: list[tuple[str, int, int, str]]) -> None:
    api = sqlite_api
    job_id = _submit_auto(api, tmp_path, {"metric": "sqnr_db", "min": 200.0}, max_fallback_steps=0)
    _run(api, subtasks)
    html = api.client.get(f"/jobs/{job_id}").text
    assert 'data-field="error-code">accuracy_target_not_met<' in html
    assert "None met the target: the closest is fp16" in html
    assert 'class="chart chart-pareto"' in html and "(chosen)" not in html
    assert "Closest configuration" in html
    assert 'data-field="download"' not in html  # no artifact to download
    assert api.client.get(f"/api/v1/jobs/{job_id}/config").json()["recipe"] == "fp16"


def test_pareto_chart_escapes_names_and_joins_the_front() -> None:
    from app.pages.charts import _pareto_front, pareto_chart
    from worker.engine.report import STORED, AccuracyTargetSpec, Candidate, CandidateConfig

    assert _pareto_front([(3.0, 0.9), (1.0, 0.5), (2.0, 0.95), (2.5, 0.7)]) == [(1.0, 0.5), (2.0, 0.95)]
    rows = [{"recipe": "int8_static", "options": {"method": "minmax"}, "excluded_nodes": [builders.SCRIPT_TAG],
             "size_bytes": 1000, "metric": 0.99, "met_target": True},
            {"recipe": "fp16", "options": {}, "excluded_nodes": [], "size_bytes": 2000, "metric": 0.999,
             "met_target": True}]
    # Hand-made partial candidates, read as a stored report's are (context STORED: missing keys are None).
    candidates = [Candidate.model_validate(r, context={STORED: True}) for r in rows]
    svg = str(pareto_chart(candidates, AccuracyTargetSpec(metric="cosine", min=0.98), "cosine",
                           CandidateConfig.model_validate({k: rows[0][k] for k in ("recipe", "options",
                                                                                   "excluded_nodes")})))
    assert "<script>" not in svg and 'class="front"' in svg and svg.count('class="point point-met"') == 2


def test_cli_runs_auto_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    model = builders.mlp(tmp_path / "m.onnx")
    data = builders.mlp_data(tmp_path / "d.npz")
    common = ["quantize", str(model), "--calib", str(data), "--recipe", "auto", "--threads", "1", "--device", "cpu",
              "--option", "max_fallback_steps=0", "--option", "latency_runs=2"]
    out = tmp_path / "m.auto.onnx"
    assert main([*common, "--accuracy-target", '{"metric": "cosine", "min": 0.99}', "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size < model.stat().st_size and "chosen:" in text and text.count("candidate ") >= 6
    missed = tmp_path / "never.onnx"
    assert main([*common, "--accuracy-target", '{"metric": "sqnr_db", "min": 500}', "-o", str(missed)]) == 1
    assert "accuracy_target_not_met" in capsys.readouterr().err and not missed.exists()
    assert main([*common, "-o", str(missed)]) == 2  # no target
    assert "accuracy_target_required" in capsys.readouterr().err


def test_a_crashing_candidate_fails_alone(sqlite_api: Harness, tmp_path: Path,
                                          subtasks: list[tuple[str, int, int, str]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import runner

    real = runner.run_engine

    def flaky(cfg: Any, progress: Any, settings: Any = None) -> Any:
        if cfg.recipe == "int8_dynamic":
            raise RuntimeError("boom")
        return real(cfg, progress, settings)

    monkeypatch.setattr(runner, "run_engine", flaky)
    api = sqlite_api
    job_id = _submit_auto(api, tmp_path, {"metric": "sqnr_db", "min": 21.0}, prefer="size")
    _run(api, subtasks)
    assert api.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"
    rows = api.client.get(f"/api/v1/jobs/{job_id}/report").json()["candidates"]
    dynamic = [r for r in rows if r["recipe"] == "int8_dynamic"]
    assert dynamic and all(r["status"] == "failed" and r["error"]["code"] == "internal_error" for r in dynamic)
    assert "boom" in dynamic[0]["error"]["message"]


def test_auto_through_the_upload_form(sqlite_api: Harness, tmp_path: Path) -> None:
    from tests.app.test_pages import submit_through_form

    api = sqlite_api
    assert '<option value="auto"' in api.client.get("/").text
    files = {"model": ("m.onnx", builders.mlp(tmp_path / "m.onnx").read_bytes()),
             "calibration": ("d.npz", builders.mlp_data(tmp_path / "d.npz").read_bytes())}
    job_id = submit_through_form(api, files, recipe="auto", target_metric="cosine", target_bound="min",
                                 target_value="0.99")
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["recipe"] == "auto" and job["accuracy_target"] == {"metric": "cosine", "min": 0.99}
    assert api.queue.enqueued == [(job_id, "cpu")]


def test_candidates_are_named_alike_on_the_page_in_warnings_and_on_the_terminal() -> None:
    from app.client.cli import _candidate_name
    from app.pages.charts import candidate_label as chart_label
    from worker.engine import auto
    from worker.engine.labels import candidate_name, recipe_label
    from worker.engine.report import CandidateConfig

    assert recipe_label("int4_weight_only", {"int8_activations": True, "method": "entropy"}) == \
        "int4_weight_only + int8 activations (entropy)"
    assert recipe_label("int8_static", {"method": "minmax"}) == "int8_static (minmax)"
    assert recipe_label("fp16", {}) == "fp16"
    cases = [
        (auto.Candidate("int8_static", {"method": "entropy"}, ("a", "b")), "int8_static (entropy) + 2 layers in float"),
        (auto.Candidate("int8_dynamic", {}, ("a",)), "int8_dynamic + 1 layer in float"),
        (auto.Candidate("int8_static", {"method": "minmax", "smoothquant": "on", "smoothquant_alpha": 0.25}, (),
                        ("x",)), "int8_static (minmax, SmoothQuant 0.25) + 1 activation in 16 bits"),
        (auto.Candidate("int8_static", {"method": "entropy", "adaround": "on"}),
         "int8_static (entropy) + learned rounding"),
        # A block step: its layers are its excluded nodes; the blocks name it.
        (auto.Candidate("int8_static", {"method": "entropy"}, ("l1", "l2", "l3"), (), ("b0", "b1")),
         "int8_static (entropy) + 2 residual blocks in float"),
        (auto.Candidate("int4_weight_only", {"int8_activations": True, "method": "entropy"}),
         "int4_weight_only + int8 activations (entropy)"),
        # An 8-bit step of a 4-bit branch.
        (auto.Candidate("int4_weight_only", {"int8_activations": True, "method": "entropy", "int8_most_sensitive": 2}),
         "int4_weight_only + int8 activations (entropy) + 2 layers in 8 bits"),
        (auto.Candidate("int4_weight_only", {"int8_most_sensitive": 1}), "int4_weight_only + 1 layer in 8 bits"),
        # A 4-bit candidate whose embedding tables are 4-bit too.
        (auto.Candidate("int4_weight_only", {"quantize_embeddings": True, "accuracy_level": 4,
                                             "int8_most_sensitive": 12}),
         "int4_weight_only + 4-bit embeddings + 12 layers in 8 bits"),
    ]
    for cand, text in cases:
        row = cand.to_dict()
        assert candidate_name(cand.recipe, cand.options, cand.excluded_nodes, cand.activations_16bit,
                              cand.blocks) == text
        # The engine's warnings, the page's chart and one-line briefs, and the client (which keeps its own copy).
        assert auto._name(cand) == text
        assert chart_label(CandidateConfig.model_validate(row)) == text
        assert _candidate_name(row) == text


def test_auto_job_whose_every_candidate_failed_renders_everywhere(sqlite_api: Harness, tmp_path: Path,
                                                                 subtasks: list[tuple[str, int, int, str]],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """No candidate measured: the report has the candidate table and nothing else (no size, latency,
    accuracy, layers). The job page, the job list, the API and the client's summary still show it."""
    from app.cli import main
    from app.client import Client
    from app.client import cli as client_cli
    from worker import runner
    from worker.engine.errors import EngineError

    def failing(cfg: Any, progress: Any, settings: Any = None) -> Any:
        raise EngineError("quantization_failed", f"{cfg.recipe} cannot quantize this model (a test double)")

    monkeypatch.setattr(runner, "run_engine", failing)
    api = sqlite_api
    job_id = _submit_auto(api, tmp_path, {"metric": "cosine", "min": 0.99}, max_fallback_steps=0)
    _run(api, subtasks)
    r = api.client.get(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200
    job = r.json()
    assert job["status"] == "failed" and job["error"]["code"] == "accuracy_target_not_met"
    assert "no candidate could be measured" in job["error"]["message"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert report["chosen"] is None and report["best"] is None
    assert not {"size", "latency", "accuracy", "layers"} & set(report)
    rows = report["candidates"]
    assert len(rows) >= 7 and all(c["status"] == "failed" for c in rows)

    page = api.client.get(f"/jobs/{job_id}", headers={"accept": "text/html"})
    assert page.status_code == 200, page.text[-2000:]
    html = page.text
    assert 'data-field="error-code">accuracy_target_not_met<' in html
    assert "No candidate could be measured" in html
    assert html.count('data-field="candidate"') == len(rows)
    assert html.count("cannot quantize this model (a test double)") == len(rows)  # each row's reason
    assert 'aria-label="verdict"' not in html and 'id="card-size"' not in html and 'id="layers"' not in html
    assert "configuration</h3>" not in html  # neither a chosen nor a closest one to offer
    assert api.client.get("/").status_code == 200  # the job list, with this job in it

    # `lowbit report` (the summary `lowbit submit` prints too), through this server.
    monkeypatch.setattr(client_cli, "_client",
                        lambda args: Client("http://testserver", None, transport=api.client._transport))
    assert main(["report", job_id]) == 0
    out = capsys.readouterr().out
    assert "no candidate could be measured" in out
    assert f"auto: {len(rows)} candidates, 0 measured, {len(rows)} failed, 0 skipped" in out
    assert "candidate int8_static (minmax) failed: [quantization_failed]" in out
    assert "accuracy target cosine min 0.99: NOT met" in out


def test_auto_job_on_a_pt2_upload_plans_4bit_from_its_export(sqlite_api: Harness, tmp_path: Path,
                                                             subtasks: list[tuple[str, int, int, str]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A .pt2 upload used to fail planning with internal_error (its zip was parsed as ONNX). Planning now runs
    in the sandbox on the upload's ONNX export, which the candidates' runs then read from the export cache.
    Only the analysis candidate runs for real here; the others fail at once, to keep the test short."""
    import numpy as np

    from tests import pt2_builders as pb
    from worker import runner
    from worker.engine.errors import EngineError

    real = runner.run_engine

    def first_only(cfg: Any, progress: Any, settings: Any = None) -> Any:
        if not cfg.layer_sensitivity:
            raise EngineError("quantization_failed", "not run in this test")
        return real(cfg, progress, settings)

    monkeypatch.setattr(runner, "run_engine", first_only)
    api = sqlite_api
    model = upload_model(api.client, pb.outlier_mlp(tmp_path / "mlp.pt2"))
    feats = np.random.default_rng(0).standard_normal((48, 32)).astype(np.float32)
    data = upload_dataset(api.client, builders.save_npz(tmp_path / "f.npz", features=feats))
    r = submit(api.client, model_id=model["id"], calibration_dataset_id=data["id"], recipe="auto",
               options={"latency_runs": 3, "max_fallback_steps": 0}, accuracy_target={"metric": "cosine", "min": 0.9})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    _run(api, subtasks)
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    four_bit = [c for c in report["candidates"] if c["recipe"] == "int4_weight_only"]
    assert len(four_bit) == 2  # planned from the export's Linear weights
    assert report["model"]["source_format"] == "pt2"
    assert report["model"]["export"]["cache_used"] is True  # the export planning made, reused
    assert api.client.get(f"/jobs/{job_id}").status_code == 200


def test_auto_job_reports_selection_and_confirmation(sqlite_api: Harness, tmp_path: Path,
                                                      subtasks: list[tuple[str, int, int, str]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's fan-out behaves as the in-process search: candidates validate on the selection part of
    the evaluation samples, the chosen model once more (through the same runner) on the confirmation part,
    and the report carries both; with too few samples there is no confirmation and a warning says so."""
    import hashlib

    from worker import runner

    api = sqlite_api
    real = runner.run_engine
    parts: list[tuple[str | None, int]] = []

    def recording(cfg: Any, progress: Any, settings: Any = None) -> Any:
        res = real(cfg, progress, settings)
        parts.append((cfg.eval_part, res.report["accuracy"]["samples"]))
        return res

    monkeypatch.setattr(runner, "run_engine", recording)
    model = upload_model(api.client, builders.mlp(tmp_path / "m.onnx"))
    calib = upload_dataset(api.client, builders.mlp_data(tmp_path / "c.npz"))
    ev = upload_dataset(api.client, builders.mlp_data(tmp_path / "e.npz", n=40, seed=3))
    target = {"metric": "cosine", "min": 0.99}
    options = {"latency_runs": 2, "max_fallback_steps": 0, "prefer": "size"}
    r = submit(api.client, model_id=model["id"], calibration_dataset_id=calib["id"], eval_dataset_id=ev["id"],
               recipe="auto", options=options, accuracy_target=target)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    _run(api, subtasks)
    assert api.client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    *candidates, last = parts
    assert len(candidates) == len(report["candidates"]) and set(candidates) == {("selection", 24)}
    assert last == ("confirmation", 16)
    sel, conf = report["auto"]["selection"], report["auto"]["confirmation"]
    assert (sel["samples"], sel["range"], conf["samples"], conf["range"]) == (24, [0, 24], 16, [24, 40])
    assert conf["same_artifact"] is True and report["accuracy"]["samples"] == 16
    assert report["accuracy"]["part"]["name"] == "confirmation"
    assert report["accuracy_target"]["value"] == conf["target"]["value"] == report["accuracy"]["outputs"][0]["cosine"]
    assert report["accuracy_target"]["confirmed"] is True
    assert report["accuracy_target"]["selection"]["samples"] == 24
    assert conf["outputs"][0]["cosine_ci"] and sel["outputs"][0]["cosine_ci"]  # the 95% intervals, both parts
    served = api.client.get(f"/api/v1/jobs/{job_id}/artifact").content
    assert hashlib.sha256(served).hexdigest() == conf["artifact_sha256"]

    # No evaluation set: 13 held-out calibration samples, too few to split.
    parts.clear()
    r = submit(api.client, model_id=model["id"], calibration_dataset_id=calib["id"], recipe="auto",
               options=options, accuracy_target=target)
    job_id = r.json()["id"]
    _run(api, subtasks)
    report = api.client.get(f"/api/v1/jobs/{job_id}/report").json()
    assert set(parts) == {("selection", 13)}  # no confirmation run
    assert report["auto"]["confirmation"] is None and report["auto"]["selection"]["samples"] == 13
    assert report["accuracy_target"]["confirmed"] is False
    assert any("optimistic" in w for w in report["warnings"]), report["warnings"]
