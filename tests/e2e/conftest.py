"""End-to-end harness: real processes (a Celery worker, `lowbit serve`) on real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import builders

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose output goes to a log file that failing tests print."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.env = env
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                  start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._fh.close()


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}
    env.update({"LOWBIT_DATA_DIR": str(data_dir), "LOWBIT_WORKER_THREADS": "1", "LOWBIT_WORKER_DEVICE": "cpu",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def lowbit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def wait_job(client: httpx.Client, job_id: str, proc: Proc, timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stages: list[str] = []
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job.get("stage"):
            stages.append(job["stage"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            job["_stages_seen"] = stages
            return job
        if not proc.alive():
            pytest.fail(f"process died while job {job_id} was {job['status']}:\n{proc.tail()}")
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish in {timeout}s:\n{proc.tail()}")


def start_serve(data: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 120.0) -> tuple[Proc, httpx.Client]:
    """`lowbit serve ARGS` on a free port, once /readyz says ready. By default the embedded setup (worker,
    SQLite, filesystem broker) under ``data``; ``env`` replaces the environment (e.g. PostgreSQL + Redis).
    With jobs waiting (a restart), ready means the embedded worker is up too, which takes longer on a busy
    machine."""
    port = free_port()
    proc = Proc(lowbit_cmd("serve", "--port", str(port), *args), env or env_for(data), log)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return proc, client
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not proc.alive():
            client.close()
            proc.stop()
            pytest.fail(f"lowbit serve did not become ready:\n{proc.tail()}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 20 MB+ transformer with int64 inputs and its token data."""
    d = tmp_path_factory.mktemp("big")
    model = builders.tiny_transformer(d / "transformer.onnx", vocab=8000, dim=256, seq=32, layers=2)
    assert model.stat().st_size > 20 * 1024 * 1024
    conv = builders.conv_net(d / "convnet.onnx", width=64)
    return {
        "tf": model,
        "tf_data": builders.token_data(d / "tokens.npz", n=32, vocab=8000, seq=32),
        "conv": conv,
        "conv_data": builders.image_data(d / "images.npz", n=40, labels=True, model=conv),
    }


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
