"""The auto recipe through real workers: one auto job on a 21M-parameter transformer-style model, with one
`lowbit worker` process and then with two, on PostgreSQL and Redis.

    .venv/bin/python benchmarks/auto.py [--target-sqnr 28] [--fallback-steps 3] [--workers 1 2]

The model is benchmarks/int4.py's (hidden 768, MLP 3072, heavy-tailed weights, a few outlier activation
channels) with 3 layers. It prints the candidate table of the job (recipe, layers kept in float, size,
the target's metric, latency, whether it met the target, which worker ran it) and the job's wall time
(started to finished, as the server recorded it) for each worker count. Each run gets a fresh database
(created on the PostgreSQL server of LOWBIT_BENCH_POSTGRES, default postgresql+psycopg://postgres@127.0.0.1:5432)
and a fresh data directory, so the second run calibrates again instead of reading the first one's cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("int4_bench", ROOT / "benchmarks" / "int4.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    setattr(mod, "LAYERS", 3)  # noqa: B010 - 21.2M parameters: real, yet small enough to search on 2 CPU cores
    result: Path = mod.build(path)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_database(server: str, name: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{server}/{name}"


def run_once(workers: int, model: Path, calib: Path, ev: Path, target: dict[str, Any], options: dict[str, Any],
             server: str, redis: str, tmp: Path) -> dict[str, Any]:
    import httpx

    data = tmp / f"data-{workers}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}
    env.update(LOWBIT_DATA_DIR=str(data), LOWBIT_WORKER_THREADS="1", LOWBIT_WORKER_DEVICE="cpu",
               LOWBIT_DATABASE_URL=fresh_database(server, f"lowbit_bench_auto_{workers}"),
               LOWBIT_BROKER_URL=redis, PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "app.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    port = free_port()
    procs = [subprocess.Popen([*cli, "serve", "--port", str(port), "--no-worker", "--no-migrate"], env=env, cwd=ROOT,
                              stdout=open(tmp / f"api-{workers}.log", "wb"),  # noqa: SIM115
                              stderr=subprocess.STDOUT, start_new_session=True)]
    for i in range(workers):
        procs.append(subprocess.Popen([*cli, "worker", "--queues", "cpu", "--concurrency", "1"], env=env, cwd=ROOT,
                                      stdout=open(tmp / f"worker-{workers}-{i}.log", "wb"),  # noqa: SIM115
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        time.sleep(5)  # let the workers connect before the job is sent
        config = {"recipe": "auto", "options": options, "accuracy_target": target}
        r = client.post("/api/v1/jobs", files={"model": ("model.onnx", model.read_bytes()),
                                               "calibration": ("calib.npz", calib.read_bytes()),
                                               "eval": ("eval.npz", ev.read_bytes())},
                        data={"config": json.dumps(config)})
        r.raise_for_status()
        job_id = r.json()["id"]
        t0 = time.monotonic()
        while True:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
        client_wall = time.monotonic() - t0
        report = client.get(f"/api/v1/jobs/{job_id}/report").json()
        client.close()
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    from datetime import datetime

    started = datetime.fromisoformat(job["started_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    return {"job": job, "report": report, "wall_s": (finished - started).total_seconds(), "client_s": client_wall}


def print_table(report: dict[str, Any], metric: str) -> None:
    from worker.engine.labels import recipe_label

    chosen = report.get("chosen") or {}
    print(f"{'#':>2} {'recipe':<26} {'kept in float':<34} {'size MB':>8} {metric:>9} {'p50 ms':>8} {'met':>5} "
          f"{'secs':>6}  worker")
    for i, c in enumerate(report["candidates"]):
        method = c["options"].get("method")
        # The page's label, shortened to fit the column.
        name = recipe_label(c["recipe"], c["options"]).replace("_weight_only", "").replace(
            " + int8 activations", " +int8 act")
        kept = ", ".join(c["excluded_nodes"]) or "-"
        mark = " *" if chosen and c["recipe"] == chosen.get("recipe") and \
            c["excluded_nodes"] == chosen.get("excluded_nodes") and method == chosen["options"].get("method") else ""
        size = f"{c['size_bytes'] / 1e6:8.2f}" if c["size_bytes"] else f"{'-':>8}"
        value = f"{c['metric']:9.3f}" if c["metric"] is not None else f"{c['status']:>9}"
        lat = f"{c['latency_ms_p50']:8.2f}" if c["latency_ms_p50"] is not None else f"{'-':>8}"
        print(f"{i:>2} {name + mark:<26} {kept[:34]:<34} {size} {value} {lat} {str(c['met_target']):>5} "
              f"{c['seconds'] or 0:6.1f}  {c['worker']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-sqnr", type=float, default=28.0)
    ap.add_argument("--fallback-steps", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--postgres", default=os.environ.get("LOWBIT_BENCH_POSTGRES",
                                                         "postgresql+psycopg://postgres@127.0.0.1:5432"))
    ap.add_argument("--redis", default=os.environ.get("LOWBIT_BENCH_REDIS", "redis://127.0.0.1:6379/14"))
    args = ap.parse_args()
    target = {"metric": "sqnr_db", "min": args.target_sqnr}
    options = {"batch_size": 4, "latency_runs": 10, "max_fallback_steps": args.fallback_steps,
               "max_calibration_samples": 16}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_model(tmp / "model.onnx")
        rng = np.random.default_rng(0)
        calib, ev = tmp / "calib.npz", tmp / "eval.npz"
        np.savez(calib, hidden=rng.standard_normal((16, 32, 768)).astype(np.float32))
        np.savez(ev, hidden=rng.standard_normal((8, 32, 768)).astype(np.float32))
        print(f"target: {json.dumps(target)}; options: {json.dumps(options)}; CPU cores: {os.cpu_count()}")
        walls = {}
        for n in args.workers:
            res = run_once(n, model, calib, ev, target, options, args.postgres, args.redis, tmp)
            rep = res["report"]
            print(f"\n== {n} worker(s): job {res['job']['status']}"
                  f"{' (' + res['job']['error']['code'] + ')' if res['job']['error'] else ''}, "
                  f"wall {res['wall_s']:.1f} s (started -> finished), {len(rep['candidates'])} candidates in "
                  f"{rep['auto']['rounds']} round(s), workers {rep['auto']['workers']}")
            print_table(rep, "sqnr_db")
            walls[n] = res["wall_s"]
        print("\nwall time: " + ", ".join(f"{n} worker(s) {w:.1f} s" for n, w in walls.items()))


if __name__ == "__main__":
    main()
