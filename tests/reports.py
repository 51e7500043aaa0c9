"""Checks of the report contract (README.md, "The report") shared by engine, API and end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TOP_KEYS = {"report_version", "job_id", "recipe", "options", "size", "accuracy", "latency", "layers", "calibration",
            "warnings", "environment"}


def assert_report_valid(report: dict[str, Any]) -> None:
    """The typed contract (worker/engine/report.py): every section's keys and types, and the version."""
    from worker.engine.report import Report
    from worker.engine.report_check import REPORT_VERSION

    Report.model_validate(report)
    assert report["report_version"] == REPORT_VERSION


def assert_report_complete(report: dict[str, Any], recipe: str) -> None:
    assert_report_valid(report)
    assert set(report) >= TOP_KEYS, TOP_KEYS - set(report)
    assert report["recipe"] == recipe
    size = report["size"]
    assert size["original_bytes"] > 0 and size["quantized_bytes"] > 0
    assert abs(size["ratio"] - size["quantized_bytes"] / size["original_bytes"]) < 1e-5
    acc = report["accuracy"]
    assert acc["samples"] > 0
    assert acc["source"] in ("eval_set", "calibration_holdout", "calibration_set", "synthetic")
    for o in acc["outputs"]:
        assert {"name", "cosine", "sqnr_db", "max_abs_error", "top1_agreement"} <= set(o)
        assert -1.0 <= o["cosine"] <= 1.0 + 1e-9
        assert o["max_abs_error"] >= 0
    lat = report["latency"]
    assert {"provider", "batch_size", "threads", "original_ms_p50", "quantized_ms_p50", "speedup"} <= set(lat)
    assert lat["provider"].endswith("ExecutionProvider")
    assert lat["original_ms_p50"] > 0 and lat["quantized_ms_p50"] > 0
    assert abs(lat["speedup"] - lat["original_ms_p50"] / lat["quantized_ms_p50"]) < 1e-2 * lat["speedup"] + 1e-3
    assert report["layers"], "no layers reported"
    for layer in report["layers"]:
        assert {"name", "op_type", "precision", "sqnr_db"} <= set(layer)
        assert layer["precision"] in ("int4", "int8", "fp16", "fp32")
    expected = {"int4_weight_only": "int4", "fp16": "fp16"}.get(recipe, "int8")
    assert any(layer["precision"] == expected for layer in report["layers"]), expected
    if recipe == "int8_static":
        cal = report["calibration"]
        assert cal["method"] and cal["samples"] > 0 and cal["seconds"] >= 0
        im = report["index_math"]
        assert im["nodes"] == im["shape_nodes"] + im["decision_nodes"] and len(im["examples"]) == min(im["nodes"], 10)
    env = report["environment"]
    for k in ("lowbit", "onnxruntime", "onnx", "torch", "python"):
        assert env.get(k), k


def recompute_cosines(original: Path, quantized: Path, feeds: list[dict[str, np.ndarray]]) -> list[float]:
    """Cosine similarity per output between two models, computed independently of the engine."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    ra: list[list[np.ndarray]] = []
    rb: list[list[np.ndarray]] = []
    for feed in feeds:
        ra.append(a.run(None, feed))
        rb.append(b.run(None, feed))
    out = []
    for k in range(len(ra[0])):
        x = np.concatenate([r[k].astype(np.float64).ravel() for r in ra])
        y = np.concatenate([r[k].astype(np.float64).ravel() for r in rb])
        out.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return out


def expected_verdict(report: dict[str, Any]) -> str:
    """The report page's verdict line for a job with labels, worked out independently of app.pages:
    size factor, speed factor (or 'no measurable speed-up' when the speed-up's 95% interval holds 1.0),
    label accuracy change in points."""
    ratio, speed = report["size"]["ratio"], report["latency"]["speedup"]
    size = f"{1 / ratio:.1f}\u00d7 smaller" if ratio <= 1 else f"{ratio:.1f}\u00d7 larger"
    faster = f"{speed:.1f}\u00d7 faster" if speed >= 1 else f"{1 / speed:.1f}\u00d7 slower"
    if report["latency"].get("speedup_measurable") is False:
        faster = "no measurable speed-up"
    pt = report["accuracy"]["labels"]["delta"] * 100
    sign = "\u00b1" if f"{abs(pt):.1f}" == "0.0" else ("\u2212" if pt < 0 else "+")
    return f"{size}, {faster}, {sign}{abs(pt):.1f} pt label accuracy"


def shown_as(value: Any) -> str:
    """How the report page writes an exact report value (the elements with a data-key attribute)."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def at(report: dict[str, Any], path: str) -> Any:
    """report["a"]["b"][0]... for the dotted path 'a.b.0'."""
    node: Any = report
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node
