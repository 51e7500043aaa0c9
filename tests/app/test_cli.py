"""The offline `lowbit quantize` command runs the same engine as the service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

from tests.reports import assert_report_complete


def test_quantize_command(zoo: dict[str, Path], tmp_path: Path) -> None:
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "quantize", str(zoo["conv"]), "--calib", str(zoo["conv_data"]),
         "--eval", str(zoo["conv_eval"]), "--recipe", "int8_static", "--method", "percentile",
         "--option", "percentile=99.9", "--option", "batch_size=4", "-o", str(out), "--report", str(rep),
         "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert_report_complete(report, "int8_static")
    assert report["options"]["percentile"] == 99.9 and report["calibration"]["method"] == "percentile"
    assert report["accuracy"]["source"] == "eval_set"
    assert f"wrote {out}" in proc.stdout and "label accuracy" in proc.stdout
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_quantize_command_reports_errors(zoo: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "quantize", str(zoo["conv"]), "--recipe", "int8_static",
         "-o", str(tmp_path / "q.onnx")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "calibration_required" in proc.stderr
    assert not (tmp_path / "q.onnx").exists()
