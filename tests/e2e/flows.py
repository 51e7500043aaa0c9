"""The user-level flow both setups must pass: upload, submit, poll, download, check the numbers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.e2e.conftest import Proc, wait_job
from tests.reports import assert_report_complete, recompute_cosines


def upload(client: httpx.Client, kind: str, path: Path) -> str:
    r = client.post(f"/api/v1/{kind}", files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def run_job(client: httpx.Client, proc: Proc, model: Path, data: Path, recipe: str, tmp: Path,
            **options: Any) -> tuple[dict[str, Any], Path]:
    """Submit a job as JSON after uploads, wait for it, download and check the artifact."""
    mid, did = upload(client, "models", model), upload(client, "datasets", data)
    r = client.post("/api/v1/jobs", json={"model_id": mid, "calibration_dataset_id": did, "recipe": recipe,
                                          "options": options})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], proc)
    assert job["status"] == "succeeded", (job["error"], proc.tail())
    report = client.get(job["links"]["report"]).json()
    assert_report_complete(report, recipe)
    art = client.get(job["links"]["artifact"])
    assert art.status_code == 200
    assert art.headers["etag"] == f'"{hashlib.sha256(art.content).hexdigest()}"'
    out = tmp / f"{job['id']}.onnx"
    out.write_bytes(art.content)
    assert out.stat().st_size == report["size"]["quantized_bytes"]
    page = client.get(job["links"]["page"])
    assert page.status_code == 200 and str(report["size"]["quantized_bytes"]) in page.text
    return report, out


def check_against_report(model: Path, artifact: Path, data: Path, report: dict[str, Any], batch: int) -> None:
    """The downloaded artifact reproduces the report's cosine on the samples the report used."""
    d = np.load(data)
    names = [k for k in d.files if k != "labels"]
    n = d[names[0]].shape[0]
    used = report["accuracy"]["samples"]
    start = 0 if report["accuracy"]["source"] == "calibration_set" else n - used
    feeds = [{k: d[k][i:min(i + batch, n)] for k in names} for i in range(start, n, batch)]
    cos = recompute_cosines(model, artifact, feeds)
    for got, out in zip(cos, report["accuracy"]["outputs"], strict=True):
        assert abs(got - out["cosine"]) < 1e-4, (got, out)


def one_shot(client: httpx.Client, proc: Proc, model: Path, data: Path, config: dict[str, Any]) -> dict[str, Any]:
    files = {"model": (model.name, model.read_bytes()), "calibration": (data.name, data.read_bytes())}
    r = client.post("/api/v1/jobs", files=files, data={"config": json.dumps(config)})
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["id"], proc)
