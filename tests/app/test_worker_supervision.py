"""`lowbit serve`'s supervision of its workers, in process: the supervisor restarts a worker that dies, kills
what it left behind and reports the dead processes; the jobs those processes ran go back to the queue at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.jobs.models import Job
from tests.app.conftest import Harness
from tests.app.helpers import submit, upload_model


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_jobs_of_dead_processes_are_queued_again_at_once(api: Harness, zoo: dict[str, Path]) -> None:
    from app.jobs.lifecycle import MAX_ATTEMPTS
    from app.jobs.service import requeue_lost
    from app.procs import process_gone

    host = socket.gethostname()
    dead, live = f"{host}:{_dead_pid()}", f"{host}:{os.getpid()}"
    m = upload_model(api.client, zoo["mlp"])
    ids = [submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"] for _ in range(5)]
    rows = [  # (worker, attempts, cancel requested)
        (dead, 1, False),  # lost: queued again
        (live, 1, False),  # its process runs: left alone
        (dead, MAX_ATTEMPTS, False),  # lost once too often: failed
        (dead, 1, True),  # lost while being cancelled: cancelled
        (f"elsewhere:{_dead_pid()}", 1, False),  # another host's process: cannot tell, left to the lease
    ]
    with api.factory.begin() as s:
        for job_id, (worker, attempts, cancel) in zip(ids, rows, strict=True):
            row = s.get(Job, job_id)
            assert row is not None
            row.status, row.stage, row.attempts, row.worker = "running", "calibrating", attempts, worker
            row.cancel_requested = cancel
    with api.factory() as s:
        requeued, failed = requeue_lost(s, process_gone)
        s.commit()
    assert requeued == [(ids[0], "cpu")] and failed == [ids[2]]
    states = [api.client.get(f"/api/v1/jobs/{i}").json() for i in ids]
    assert [j["status"] for j in states] == ["queued", "running", "failed", "cancelled", "running"]
    assert states[2]["error"]["code"] == "worker_lost" and f"died {MAX_ATTEMPTS} times" in states[2]["error"]["message"]
    with api.factory() as s:
        first = s.get(Job, ids[0])
        assert first is not None and first.attempts == 1 and first.enqueued_at is not None
    # The next attempt takes it over and it succeeds.
    api.queue.enqueued[:] = [(ids[0], "cpu")]
    assert api.run_queued() == ["succeeded"]
    with api.factory() as s:
        assert (j := s.get(Job, ids[0])) is not None and j.attempts == 2


# Runs in a child process: the supervisor makes its process a subreaper, which should not leak into pytest.
SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    from app.procs import alive, children
    from app.supervisor import Supervisor

    # A "worker" that starts a "pool process" of its own, which its death orphans.
    worker = [sys.executable, "-c", "import os, time\\nif os.fork() == 0:\\n    time.sleep(600)\\ntime.sleep(600)"]
    lost = []
    sup = Supervisor(lambda i: worker, 2, lambda dead: lost.append(sorted(dead)))
    sup.start()

    def wait_for(check, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    wait_for(lambda: len(sup.pids()) == 2 and all(children(p) for p in sup.pids()))
    first = sup.pids()[0]
    pool = children(first)[0]
    t0 = time.monotonic()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(sup.pids()) == 2 and first not in sup.pids())
    restarted_after = time.monotonic() - t0
    pool_alive = alive(pool)
    everything = set(sup.pids()) | {c for p in sup.pids() for c in children(p)}
    sup.stop(timeout=5)
    print(json.dumps({"first": first, "pool": pool, "lost": lost, "restarts": sup.restarts,
                      "restarted_after": restarted_after, "pool_alive": pool_alive,
                      "left": [p for p in everything if alive(p)], "children": children(os.getpid()),
                      "deaths": [s.deaths for s in sup.slots]}))
""")


def test_supervisor_restarts_a_dead_worker_and_stops_everything() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["restarts"] == 1
    assert out["restarted_after"] < 5  # 1 s backoff after the first death
    assert not out["pool_alive"]  # the dead worker's orphan was killed, not left running
    assert out["lost"] and out["first"] in out["lost"][0] and out["pool"] in out["lost"][0]
    assert out["deaths"][0] == ["killed by SIGKILL"] and out["deaths"][1] == []
    assert out["left"] == [] and out["children"] == []  # stop: every worker and its children gone, and reaped
    assert "embedded worker 1" in proc.stderr and "restarted as pid" in proc.stderr


def test_readiness_and_jobs_say_when_no_live_worker_consumes_a_queue(
        api: Harness, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import time

    from app import workers
    from app.client import cli as client_cli
    from app.client.core import Client

    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["workers"] == "ok"  # nothing waits: nothing to serve
    m = upload_model(api.client, zoo["mlp"])
    job_id = submit(api.client, model_id=m["id"], recipe="int8_dynamic", device="gpu").json()["id"]
    r = api.client.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["checks"]["workers"] == "no live worker consumes queue gpu (1 job(s) waiting)"
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["waiting_reason"].startswith("waiting for a worker on queue gpu")
    assert 'lowbit_live_workers{queue="gpu"} 0.0' in api.client.get("/metrics").text
    assert "waiting for a worker on queue gpu" in api.client.get(f"/jobs/{job_id}").text
    # `lowbit status` says it too.
    monkeypatch.setattr(client_cli, "_client",
                        lambda args: Client("http://testserver", transport=api.client._transport))
    ns = argparse.Namespace(job_id=job_id, json=False, server=None, api_key=None)
    assert client_cli.cmd_status(ns) == 0
    assert "waiting for a worker on queue gpu" in capsys.readouterr().out

    # A CPU-only worker changes nothing for the gpu queue; one that consumes it does.
    workers.beat(api.factory, "box:11", ["cpu"], 5)
    assert api.client.get("/readyz").status_code == 503
    workers.beat(api.factory, "box:12", ["cpu", "gpu"], 5)
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["workers"] == "ok", r.text
    assert api.client.get(f"/api/v1/jobs/{job_id}").json()["waiting_reason"] is None
    text = api.client.get("/metrics").text
    assert 'lowbit_live_workers{queue="gpu"} 1.0' in text and 'lowbit_live_workers{queue="cpu"} 2.0' in text
    assert client_cli.cmd_status(ns) == 0 and "waiting for a worker" not in capsys.readouterr().out
    # A worker that stops beating stops counting after three intervals; one that stops removes itself.
    workers.beat(api.factory, "box:12", ["cpu", "gpu"], 0.05)
    time.sleep(0.3)
    assert api.client.get("/readyz").json()["checks"]["workers"].startswith("no live worker consumes queue gpu")
    workers.forget(api.factory, ["box:11"])
    assert 'lowbit_live_workers{queue="cpu"} 0.0' in api.client.get("/metrics").text
    # A cancelled job waits for nothing.
    assert api.client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    assert api.client.get("/readyz").status_code == 200


def test_worker_health_checks_this_hosts_heartbeat(tmp_path: Path) -> None:
    from app import workers
    from app.db import make_engine, make_sessionmaker
    from app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'lowbit.db'}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")},
           "LOWBIT_DATA_DIR": str(tmp_path), "LOWBIT_DATABASE_URL": url}

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "worker-health"], env=env, capture_output=True,
                              text=True, timeout=60)

    unmigrated = health()
    assert unmigrated.returncode == 1 and "cannot read the workers table" in unmigrated.stderr
    assert "Traceback" not in unmigrated.stderr
    upgrade(url)
    none = health()
    assert none.returncode == 1 and f"no worker on {socket.gethostname()}" in none.stderr
    engine = make_engine(url)
    workers.beat(make_sessionmaker(engine), "some-other-host:7", ["cpu"], 30)
    assert health().returncode == 1  # another machine's worker does not make this one healthy
    workers.beat(make_sessionmaker(engine), f"{socket.gethostname()}:7", ["cpu"], 30)
    engine.dispose()
    ok = health()
    assert ok.returncode == 0 and f"{socket.gethostname()}:7 alive on queues cpu" in ok.stdout
