"""The engine checks every report against the typed contract (worker/engine/report.py) and measures the
accuracy target itself."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.reports import assert_report_complete, assert_report_valid
from worker.engine import auto, files, pipeline
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.report_check import REPORT_VERSION, ReportContractError
from worker.engine.target import evaluate_target


def _cfg(zoo: dict[str, Path], tmp: Path, recipe: str, **options: object) -> QuantizeConfig:
    return QuantizeConfig(
        model_path=zoo["mlp"], output_path=tmp / f"mlp.{recipe}.onnx", recipe=recipe,
        options=parse_options(recipe, {"latency_runs": 3, **options}), calibration_path=zoo["mlp_data"],
        threads=1, device="cpu",
    )


@pytest.mark.parametrize("recipe, options", [
    ("int8_dynamic", {}),
    ("int4_weight_only", {"algorithm": "clip_search"}),  # with its round-to-nearest baseline
    ("fp16", {}),
])
def test_every_recipe_report_follows_the_contract(zoo: dict[str, Path], tmp_path: Path, recipe: str,
                                                  options: dict[str, Any]) -> None:
    report = pipeline.run(_cfg(zoo, tmp_path, recipe, **options)).report
    assert_report_complete(report, recipe)
    assert report["report_version"] == REPORT_VERSION
    assert "accuracy_target" not in report  # no target given


@pytest.mark.parametrize("target", [
    {"metric": "label_accuracy", "max_drop": 0.05},
    {"metric": "cosine", "min": 0.99, "confidence": 0.95},
    {"metric": "sqnr_db", "min": 100.0},
])
def test_the_engine_reports_the_accuracy_target(zoo: dict[str, Path], tmp_path: Path,
                                                target: dict[str, Any]) -> None:
    cfg = dataclasses.replace(_cfg(zoo, tmp_path, "int8_static"), accuracy_target=target)
    report = pipeline.run(cfg).report
    assert_report_valid(report)
    got = report["accuracy_target"]
    assert got == evaluate_target(target, report)
    assert {k: got[k] for k in target} == target
    if target["metric"] == "label_accuracy":
        labels = report["accuracy"]["labels"]
        assert got["value"] == labels["quantized"]
        assert got["met"] is (labels["original"] - labels["quantized"] <= 0.05)
    elif target["metric"] == "cosine":
        assert got["value"] == min(o["cosine"] for o in report["accuracy"]["outputs"])
    else:
        assert got["met"] is False  # no int8 model reaches 100 dB


def test_a_report_that_breaks_the_contract_fails_the_run(zoo: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # An engine change that adds a key without adding it to the contract (here: to the environment section).
    real = files.environment
    monkeypatch.setattr(pipeline, "environment", lambda: {**real(), "gpu_driver": "none"})
    with pytest.raises(ReportContractError, match="gpu_driver"):
        pipeline.run(_cfg(zoo, tmp_path, "int8_dynamic"))
    assert not (tmp_path / "mlp.int8_dynamic.onnx").exists()  # nothing delivered


def test_the_contract_imports_no_ml_library() -> None:
    # The API process reads it (the report endpoint's response model), and must not load torch or onnxruntime.
    code = "import sys, json\nimport worker.engine.report\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    top = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not top & {"torch", "onnxruntime", "onnx", "numpy"}, top & {"torch", "onnxruntime", "onnx", "numpy"}


def test_auto_with_no_candidate_measured_reports_the_missed_target() -> None:
    target = {"metric": "cosine", "min": 0.99}
    failed = [auto.CandidateResult(auto.Candidate("int8_dynamic"), "failed",
                                   error={"code": "quantization_failed", "message": "no"})]
    report = auto.conclude(failed, target, "j", {}, 1.0, 1).report
    assert_report_valid(report)
    assert report["accuracy_target"] == {**target, "value": None, "met": False, "distance": None}
