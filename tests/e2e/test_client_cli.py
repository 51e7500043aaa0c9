"""The `lowbit` client commands against a real `lowbit serve` (embedded worker), run as the user runs them: as
processes, with stdout piped (so no progress bars), the server from LOWBIT_SERVER, --server or a config file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.client import Client
from tests import builders
from tests.e2e.conftest import Proc, env_for, free_port, lowbit_cmd, start_serve, wait_job
from tests.httpd import proxy

pytestmark = pytest.mark.slow

STAGES = ["preparing", "calibrating", "quantizing", "validating", "reporting"]


@dataclass
class Served:
    proc: Proc
    client: httpx.Client
    base: str
    home: Path
    files: dict[str, Path]
    key: str  # a real key of the local tenant, whose jobs keyless requests see too


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, zoo: dict[str, Path]) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("client-cli")
    proc, client = start_serve(root / "lowbit-data", root / "serve.log")
    key = subprocess.run(lowbit_cmd("keys", "create", "--tenant", "local"), env=env_for(root / "lowbit-data"),
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    files = dict(zoo)
    files["mismatched"] = builders.mismatched_mlp(root / "mismatched.onnx")
    files["features"] = builders.save_npz(root / "features.npz", x=np.ones((20, 20), np.float32))
    try:
        yield Served(proc, client, str(client.base_url).rstrip("/"), root / "home", files, key)
    finally:
        client.close()
        proc.stop()


def lowbit(s: Served, *args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `lowbit ARGS` with a clean environment: no LOWBIT_* variables and no config file unless given."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}
    e.update(HOME=str(s.home), XDG_CONFIG_HOME=str(s.home / ".config"), PYTHONUNBUFFERED="1", **env)
    return subprocess.run(lowbit_cmd(*map(str, args)), cwd=cwd, env=e, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def etag(s: Served, job_id: str) -> str:
    return str(s.client.head(f"/api/v1/jobs/{job_id}/artifact").headers["etag"]).strip('"')


def test_submit_follows_the_job_prints_the_summary_and_writes_the_verified_model(served: Served,
                                                                               tmp_path: Path) -> None:
    s, f = served, served.files
    p = lowbit(s, "submit", f["conv"], "--calib", f["conv_data"], "--eval", f["conv_eval"], "--recipe", "int8_static",
               "--option", "method=entropy", "--option", "batch_size=4", cwd=tmp_path, LOWBIT_SERVER=s.base)
    assert p.returncode == 0, p.stderr + s.proc.tail()
    assert p.stderr == ""  # stderr is not a terminal: no progress bars, nothing else
    m = re.match(r"job ([0-9a-f-]{36}) succeeded: int8_static in [0-9.]+ s\n", p.stdout)
    assert m, p.stdout
    job = s.client.get(f"/api/v1/jobs/{m.group(1)}").json()
    report = s.client.get(f"/api/v1/jobs/{job['id']}/report").json()
    assert job["status"] == "succeeded" and job["options"]["method"] == "entropy" and job["eval_dataset_id"]

    out = tmp_path / "conv.int8.onnx"  # named after the model and the recipe, in the current folder
    assert out.stat().st_size == report["size"]["quantized_bytes"]
    assert sha256(out) == etag(s, job["id"]) == report["model"]["quantized_sha256"]
    assert f"wrote {out} (" in p.stdout and sha256(out) in p.stdout
    lab = report["accuracy"]["labels"]
    for line in ("size", "label accuracy", "latency p50", "output logits: cosine",
                 f"{lab['original'] * 100:.2f} %  ->  {lab['quantized'] * 100:.2f} %",
                 f"{report['latency']['original_ms_p50']:.4g} ms  ->  {report['latency']['quantized_ms_p50']:.4g} ms",
                 "samples of the evaluation set"):
        assert line in p.stdout, (line, p.stdout)


def test_no_wait_then_status_download_report_and_jobs(served: Served, tmp_path: Path) -> None:
    s, f = served, served.files
    config = tmp_path / "client.toml"  # the server and key from the client's config file this time
    config.write_text(f'server = "{s.base}"\napi_key = "{s.key}"\n')
    env = {"LOWBIT_CLIENT_CONFIG": str(config)}
    ids, jobs = [], []
    for _ in range(2):
        p = lowbit(s, "submit", f["conv"], "--calib", f["conv_data"], "--recipe", "int8_dynamic", "--no-wait",
                   "--json", cwd=tmp_path, **env)
        assert p.returncode == 0, p.stderr
        jobs.append(json.loads(p.stdout))
        ids.append(jobs[-1]["id"])
    assert jobs[0]["status"] == "queued"
    # The second submission sent no file: the server already had both, and said so by their SHA-256.
    assert jobs[0]["model_id"] == jobs[1]["model_id"]
    assert jobs[0]["calibration_dataset_id"] == jobs[1]["calibration_dataset_id"]
    p = lowbit(s, "submit", f["conv"], "--recipe", "int8_dynamic", "--no-wait", cwd=tmp_path, **env)
    assert p.returncode == 0 and re.fullmatch(r"[0-9a-f-]{36}\n", p.stdout), p.stdout + p.stderr
    ids.append(p.stdout.strip())

    job_id = ids[0]
    deadline = time.monotonic() + 120
    while True:
        p = lowbit(s, "status", job_id, cwd=tmp_path, **env)
        assert p.returncode == 0 and p.stdout.startswith(job_id), p.stderr
        if "succeeded" in p.stdout:
            break
        assert re.match(r"\S+  (queued|running)", p.stdout) and time.monotonic() < deadline, p.stdout
        time.sleep(0.3)
    status = json.loads(lowbit(s, "status", job_id, "--json", cwd=tmp_path, **env).stdout)
    assert status == s.client.get(f"/api/v1/jobs/{job_id}").json()

    p = lowbit(s, "download", job_id, "-o", tmp_path / "dl.onnx", cwd=tmp_path, **env)
    assert p.returncode == 0, p.stderr
    assert sha256(tmp_path / "dl.onnx") == etag(s, job_id) and f"wrote {tmp_path / 'dl.onnx'}" in p.stdout
    p = lowbit(s, "download", job_id, "--json", cwd=tmp_path, **env)  # no -o: the server's file name, here
    got = json.loads(p.stdout)
    assert got["path"] == str(tmp_path / "conv.int8_dynamic.onnx") and got["sha256"] == etag(s, job_id)

    p = lowbit(s, "report", job_id, "--json", cwd=tmp_path, **env)
    assert json.loads(p.stdout) == s.client.get(f"/api/v1/jobs/{job_id}/report").json()
    p = lowbit(s, "report", job_id, cwd=tmp_path, **env)
    assert p.stdout.startswith(f"job {job_id} succeeded: int8_dynamic") and "size" in p.stdout

    listed = json.loads(lowbit(s, "jobs", "--json", "--limit", "50", cwd=tmp_path, **env).stdout)
    assert set(ids) <= {j["id"] for j in listed["items"]}
    text = lowbit(s, "jobs", cwd=tmp_path, **env).stdout
    assert text.startswith("ID") and all(i in text for i in ids)


def test_a_failed_job_exits_non_zero_with_its_error(served: Served, tmp_path: Path) -> None:
    s, f = served, served.files
    out = tmp_path / "never.onnx"
    p = lowbit(s, "submit", f["mismatched"], "--calib", f["features"], "--option", "batch_size=4", "-o", out,
               cwd=tmp_path, LOWBIT_SERVER=s.base)
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"^lowbit: job [0-9a-f-]{36} failed while calibrating$", p.stderr, re.M), p.stderr
    assert "lowbit: error [model_run_failed]: " in p.stderr and "dimension mismatch" in p.stderr
    assert p.stdout == "" and not out.exists()

    p = lowbit(s, "submit", f["mismatched"], "--calib", f["features"], "--option", "batch_size=4", "--json",
               cwd=tmp_path, LOWBIT_SERVER=s.base)
    assert p.returncode == 1
    body = json.loads(p.stdout)
    assert body["error"]["code"] == "model_run_failed" and body["job"]["status"] == "failed"
    assert body["job"]["error"] == body["error"]

    # Refused before anything runs: the server's code, exit 2.
    p = lowbit(s, "submit", f["conv"], "--recipe", "int8_static", cwd=tmp_path, LOWBIT_SERVER=s.base)
    assert p.returncode == 2 and "[calibration_required]" in p.stderr, p.stderr
    p = lowbit(s, "status", "00000000-0000-0000-0000-000000000000", cwd=tmp_path, LOWBIT_SERVER=s.base)
    assert p.returncode == 2 and "[job_not_found]" in p.stderr
    # No server there: exit 3, and the message says how to point at one.
    p = lowbit(s, "jobs", "--server", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert p.returncode == 3 and "[server_unreachable]" in p.stderr and "LOWBIT_SERVER" in p.stderr


def _finished_job(s: Served, model: Path) -> dict[str, Any]:
    up = s.client.post("/api/v1/models", files={"file": (model.name, model.read_bytes())}).json()
    r = s.client.post("/api/v1/jobs", json={"model_id": up["id"], "recipe": "int8_dynamic"})
    job = wait_job(s.client, r.json()["id"], s.proc)
    assert job["status"] == "succeeded", job
    return job


def test_a_damaged_download_is_refused_and_polling_stands_in_for_events(served: Served, tmp_path: Path) -> None:
    s, f = served, served.files
    job = _finished_job(s, f["mlp"])
    with proxy(s.base) as px:
        # Through the proxy untouched, the download verifies...
        p = lowbit(s, "download", job["id"], "-o", tmp_path / "ok.onnx", "--server", px.url, "--api-key", s.key,
                   cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert sha256(tmp_path / "ok.onnx") == etag(s, job["id"])
        # ...with one byte flipped (and the real ETag), it is refused and nothing is left behind.
        px.corrupt = True
        p = lowbit(s, "download", job["id"], "-o", tmp_path / "bad.onnx", "--server", px.url, "--api-key", s.key,
                   cwd=tmp_path)
        assert p.returncode == 3, p.stdout + p.stderr
        assert "[checksum_mismatch]" in p.stderr and etag(s, job["id"]) in p.stderr
        assert not (tmp_path / "bad.onnx").exists() and list(tmp_path.glob(".bad.onnx*")) == []
        assert px.seen and all(h.get("authorization") == f"Bearer {s.key}" for _, _, h in px.seen)

        # Without the event stream (a proxy that does not pass it), submit follows the job by polling.
        px.corrupt, px.hide_events = False, True
        seen_before = len(px.seen)
        p = lowbit(s, "submit", f["mlp"], "--calib", f["mlp_data"], "--recipe", "int8_static", "--json",
                   "-o", tmp_path / "polled.onnx", "--server", px.url, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout)
        assert got["job"]["status"] == "succeeded" and got["artifact"]["sha256"] == sha256(tmp_path / "polled.onnx")
        paths = [path for _, path, _ in px.seen[seen_before:]]
        assert any(path.endswith("/events") for path in paths)
        assert any(path == f"/api/v1/jobs/{got['job']['id']}" for path in paths)


def test_event_stream_shows_every_stage_in_order_then_the_end(served: Served) -> None:
    s, f = served, served.files
    ids = [s.client.post(f"/api/v1/{kind}", files={"file": (p.name, p.read_bytes())}).json()["id"]
           for kind, p in (("models", f["conv"]), ("datasets", f["conv_data"]))]
    r = s.client.post("/api/v1/jobs", json={"model_id": ids[0], "calibration_dataset_id": ids[1],
                                            "recipe": "int8_static", "options": {"batch_size": 4,
                                                                                 "latency_runs": 200}})
    job_id = r.json()["id"]
    with Client(s.base) as c:
        events = list(c.events(job_id))
        assert events[-1].event == "end" and events[-1].data["status"] == "succeeded"
        assert [e.event for e in events].count("end") == 1
        assert [e.data["stage"] for e in events if e.event == "stage"] == STAGES
        # Live, not a replay: the stream saw the job before it finished, never going backwards.
        snapshots = [e.data for e in events if e.event == "job"]
        assert snapshots and {j["status"] for j in snapshots} <= {"queued", "running"}
        order = {"queued": 0, "running": 1}
        assert [order[j["status"]] for j in snapshots] == sorted(order[j["status"]] for j in snapshots)
        progress = [j["progress"] for j in snapshots]
        assert progress == sorted(progress)
        announced: set[str] = set()
        for e in events:
            if e.event == "stage":
                announced.add(e.data["stage"])
            elif e.event == "job" and e.data["stage"]:
                assert e.data["stage"] in announced  # a stage is announced before the job is shown in it
        # The client's wait() gives the same stages through its callback.
        seen: list[str] = []
        assert c.wait(job_id, on_stage=seen.append).status == "succeeded" and seen == STAGES


def test_wait_timeout_holds_while_the_job_is_quiet(zoo: dict[str, Path], tmp_path: Path) -> None:
    """No worker: the job stays queued and its stream carries only keep-alives. The client's timeout
    must still end the wait on time."""
    import time as _time

    from app.client import Client
    from app.client.errors import WaitTimeout
    from tests.e2e.conftest import env_for, start_serve

    env = env_for(tmp_path / "data", LOWBIT_EVENTS_HEARTBEAT_S="0.3")
    proc, http = start_serve(tmp_path / "data", tmp_path / "serve.log", "--no-worker", env=env)
    http.close()
    try:
        with Client(str(http.base_url)) as client:
            model = client.upload_model(zoo["mlp"])
            job = client.submit(model.id, recipe="int8_dynamic")
            t0 = _time.monotonic()
            with pytest.raises(WaitTimeout):
                client.wait(job.id, timeout=2.0)
            assert _time.monotonic() - t0 < 10
    finally:
        proc.stop()
