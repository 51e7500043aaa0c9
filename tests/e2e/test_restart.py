"""A job cut off by a killed `lowbit serve` is picked up again when the server comes back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import start_serve, wait_job

pytestmark = pytest.mark.slow


def test_killed_server_resumes_the_interrupted_job(big: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "lowbit-data"
    proc, client = start_serve(data, tmp_path / "first.log")
    try:
        files = {"model": ("t.onnx", big["tf"].read_bytes()), "calibration": ("d.npz", big["tf_data"].read_bytes())}
        r = client.post("/api/v1/jobs", files=files,
                        data={"config": '{"recipe": "int8_dynamic", "options": {"latency_runs": 1000}}'})
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/api/v1/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline, proc.tail()
            time.sleep(0.1)
    finally:
        client.close()
        os.killpg(proc.p.pid, signal.SIGKILL)  # the whole server, worker included, dies mid-job
        proc.p.wait()
        proc.stop()
    proc2, client2 = start_serve(data, tmp_path / "second.log")
    try:
        assert "interrupted job(s) queued again" in proc2.tail()
        job = wait_job(client2, job_id, proc2)
        assert job["status"] == "succeeded", job["error"]
        assert client2.get(f"/api/v1/jobs/{job_id}/report").json()["accuracy"]["samples"] > 0
    finally:
        client2.close()
        proc2.stop()


def test_a_second_server_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    import subprocess

    from tests.e2e.conftest import env_for, free_port, lowbit_cmd

    data = tmp_path / "lowbit-data"
    proc, client = start_serve(data, tmp_path / "first.log")
    try:
        second = subprocess.run(lowbit_cmd("serve", "--port", str(free_port())), env=env_for(data),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "another 'lowbit serve' is using" in second.stderr
        assert client.get("/readyz").status_code == 200  # the first one is untouched
    finally:
        client.close()
        proc.stop()
