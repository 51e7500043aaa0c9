"""The offline `lowbit quantize` command runs the same engine as the service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from app.cli import main
from app.client.cli import EXIT_INTERNAL
from tests import builders
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
    # the figures come with their 95% intervals (the change in points, the speed-up over interleaved runs)
    assert re.search(r"label accuracy [\d.]+ % -> [\d.]+ %  [+-][\d.]+ pt \([+-]?[\d.]+ \u2026 [+-]?[\d.]+\)",
                     proc.stdout), proc.stdout
    assert re.search(r"latency p50 .* \(([\d.]+) \u2026 ([\d.]+)\), \d+ runs", proc.stdout), proc.stdout
    assert re.search(r"output \S+: cosine [\d.]+ \([\d.]+ \u2026 [\d.]+\)", proc.stdout), proc.stdout
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


@pytest.fixture(scope="module")
def unmerged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("unmerged")
    return {"model": builders.unmerged_dims_mlp(d / "model.onnx"), "data": builders.unmerged_dims_data(d / "data.npz")}


@pytest.fixture
def empty_cwd_and_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An empty working directory, and an empty folder standing in for the system temp folder (TMPDIR)."""
    cwd, systmp = tmp_path / "cwd", tmp_path / "systmp"
    cwd.mkdir()
    systmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(systmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return cwd, systmp


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("recipe, extra", [
    ("int8_static", []),
    ("int8_dynamic", []),
    ("int4_weight_only", ["--option", "algorithm=rtn"]),
    ("int4_weight_only", ["--option", "algorithm=clip_search"]),
    ("fp16", []),
    ("auto", ["--accuracy-target", '{"metric": "cosine", "min": 0.9}']),
])
def test_quantize_writes_nothing_but_its_output(recipe: str, extra: list[str], unmerged: dict[str, Path],
                                                empty_cwd_and_tmp: tuple[Path, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # This model makes ONNX Runtime's symbolic shape inference stop and save sym_shape_infer_temp.onnx and a
    # <uuid1>.data file (512 kB) in the working directory (tests/worker/test_sandbox.py sees them land in the
    # job's work folder). Run from an empty folder with relative paths, as a user would: only the output appears.
    cwd, systmp = empty_cwd_and_tmp
    (cwd / "out").mkdir()
    rc = main(["quantize", os.path.relpath(unmerged["model"]), "--calib", os.path.relpath(unmerged["data"]),
               "--recipe", recipe, *extra, "--option", "latency_runs=2", "--threads", "1",
               "-o", "out/q.onnx", "--report", "out/r.json"])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0, err
    if recipe == "auto":  # each candidate by the name the page and the client give it
        assert re.search(r"candidate int8_static \(entropy\): done, \d+ bytes, cosine [\d.]+, met (True|False)",
                         captured.out), captured.out
    assert _tree(cwd) == ["out", "out/q.onnx", "out/r.json"]
    assert _tree(systmp) == []
    assert json.loads((cwd / "out" / "r.json").read_text())["recipe"] in (recipe, "auto")


def test_quantize_a_pt2_with_relative_paths(pt2_zoo: dict[str, Path], empty_cwd_and_tmp: tuple[Path, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # The .pt2 export runs in a child process with another working directory: a relative --calib used to reach
    # it as is and fail "not an .npz file".
    cwd, systmp = empty_cwd_and_tmp
    rc = main(["quantize", os.path.relpath(pt2_zoo["outlier"]), "--calib", os.path.relpath(pt2_zoo["outlier_cal"]),
               "--recipe", "qat_int8", "--option", "steps=3", "--option", "latency_runs=2", "--threads", "1",
               "-o", "q.onnx"])
    assert rc == 0, capsys.readouterr().err
    assert _tree(cwd) == ["q.onnx"] and _tree(systmp) == []
    ort.InferenceSession(str(cwd / "q.onnx"), providers=["CPUExecutionProvider"])


def test_quantize_names_missing_files_and_folders(zoo: dict[str, Path], empty_cwd_and_tmp: tuple[Path, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cwd, _ = empty_cwd_and_tmp
    rc = main(["quantize", "nope.onnx", "--calib", str(cwd), "-o", "no/such/folder/q.onnx"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lowbit: error [invalid_path]: ")
    assert f"model {cwd / 'nope.onnx'}: no such file" in err
    assert f"--calib {cwd}: is a folder, not a file" in err
    assert f"the folder {cwd / 'no/such/folder'} does not exist" in err
    assert _tree(cwd) == []


def test_an_unexpected_error_is_one_line_not_a_traceback(zoo: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from worker.engine import pipeline

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected\nsecond line")

    monkeypatch.setattr(pipeline, "run", broken)
    argv = ["quantize", str(zoo["mlp"]), "--calib", str(zoo["mlp_data"]), "-o", str(tmp_path / "q.onnx")]
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    assert main(argv) == EXIT_INTERNAL
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "lowbit: error [internal_error]: unexpected RuntimeError: injected second line; this is a lowbit problem, "
        "please report it (set LOWBIT_DEBUG=1 to see the traceback)"]
    assert not (tmp_path / "q.onnx").exists()
    monkeypatch.setenv("LOWBIT_DEBUG", "1")
    assert main(argv) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("lowbit: error [internal_error]: unexpected RuntimeError")


def test_a_value_error_in_the_run_is_not_called_a_bad_accuracy_target(zoo: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """pydantic's ValidationError is a ValueError: one from inside the run (a report the contract refused) was
    reported as [invalid_accuracy_target], naming the user's target for lowbit's own fault."""
    from worker.engine import pipeline

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a report field the contract does not know")

    monkeypatch.setattr(pipeline, "run", broken)
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    argv = ["quantize", str(zoo["mlp"]), "--calib", str(zoo["mlp_data"]), "-o", str(tmp_path / "q.onnx")]
    assert main(argv) == EXIT_INTERNAL
    assert capsys.readouterr().err.strip().startswith("lowbit: error [internal_error]: unexpected ValueError")
    assert main([*argv, "--accuracy-target", "{not json"]) == 2
    assert "lowbit: error [invalid_accuracy_target]" in capsys.readouterr().err


def test_an_unexpected_error_in_a_client_command_or_at_start(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from app.client.core import Client

    def broken(self: Client, job_id: str) -> None:
        raise KeyError("status")  # e.g. a server answer without a field the client expects

    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    monkeypatch.setattr(Client, "job", broken)
    job_id = "3f0c2a8e-5b1d-4c47-9a2e-7d7f4b1e9c20"
    assert main(["status", job_id, "--server", "http://127.0.0.1:9"]) == EXIT_INTERNAL
    assert capsys.readouterr().err.splitlines() == [
        "lowbit: error [internal_error]: unexpected KeyError: 'status'; this is a lowbit problem, please report it "
        "(set LOWBIT_DEBUG=1 to see the traceback)"]
    assert main(["status", job_id, "--server", "http://127.0.0.1:9", "--json"]) == EXIT_INTERNAL
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "internal_error"

    def no_parser(sub: Any) -> None:
        raise ImportError("cannot import name 'x' from 'y'")

    import app.cli

    monkeypatch.setattr(app.cli, "add_commands", no_parser)  # fails while the parser is built
    assert main(["jobs"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error [internal_error]: unexpected ImportError: cannot import name 'x'")
    assert "Traceback" not in err
