"""A model with external data through real servers: a resumable upload interrupted by killing `lowbit serve`
and finished by the client after the restart (only the missing parts sent), then int4 to a .zip that ONNX
Runtime loads; and the production setup (PostgreSQL, Redis, a separate `lowbit worker`) taking a model folder
from the Python client."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import sqlalchemy as sa

from app.client import Client
from tests.builders import external_decoder, save_npz
from tests.e2e.conftest import Proc, env_for, lowbit_cmd, start_serve, wait_job

pytestmark = pytest.mark.slow
PART = 256 * 1024


def _bundle(tmp_path: Path) -> tuple[Path, Path]:
    src = external_decoder(tmp_path / "decoder", vocab=4096, dim=256, ff=1024, layers=2)
    bundle = tmp_path / "decoder.zip"
    with zipfile.ZipFile(bundle, "w") as zf:
        for p in sorted(src.parent.iterdir()):
            zf.write(p, p.name)
    return src, bundle


def _check_artifact(src: Path, artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "unzipped"
    with zipfile.ZipFile(artifact) as zf:
        assert zf.namelist() == ["model.onnx", "model.onnx.data"]
        zf.extractall(out)
    feed = {"input_ids": np.random.default_rng(9).integers(0, 4096, (1, 16))}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos >= 0.99, cos


def test_an_interrupted_resumable_upload_finishes_after_a_restart(tmp_path: Path) -> None:
    src, bundle = _bundle(tmp_path)
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    env = env_for(tmp_path / "lowbit-data", LOWBIT_UPLOAD_PART_BYTES=str(PART))
    proc, client = start_serve(tmp_path / "lowbit-data", tmp_path / "first.log", env=env)
    try:
        up = client.post("/api/v1/uploads", json={"filename": bundle.name, "size_bytes": len(data),
                                                  "sha256": sha}).json()
        sent = up["parts"] // 2
        assert sent >= 4
        for i in range(sent):
            r = client.put(f"/api/v1/uploads/{up['id']}/parts/{i}", content=data[i * PART:(i + 1) * PART])
            assert r.status_code == 204, r.text
    finally:
        client.close()
        os.killpg(proc.p.pid, signal.SIGKILL)  # the server dies mid-upload
        proc.p.wait()
        proc.stop()
    proc2, client2 = start_serve(tmp_path / "lowbit-data", tmp_path / "second.log", env=env)
    try:
        server = str(client2.base_url)
        puts: list[int] = []
        with Client(server) as c:
            original_put = c._http.put

            def counting_put(url: str, **kw: object) -> object:
                puts.append(int(url.rsplit("/", 1)[1]))
                return original_put(url, **kw)  # type: ignore[arg-type]

            c._http.put = counting_put  # type: ignore[assignment]
            model = c.upload_model(bundle)
            assert sorted(puts) == list(range(sent, up["parts"]))  # only what the first server did not get
            assert model.sha256 == sha and model.raw["external_data_bytes"] > 0
            calib = c.upload_dataset(save_npz(tmp_path / "tokens.npz",
                                              input_ids=np.random.default_rng(1).integers(0, 4096, (20, 16))))
            job = c.submit(model.id, "int4_weight_only", calibration_dataset_id=calib.id)
        done = wait_job(client2, job.id, proc2)
        assert done["status"] == "succeeded", done["error"]
        with Client(server) as c:
            got = c.download(job.id, tmp_path)
            # Asked for an .onnx file name, the client keeps the server's kind of file: a .zip.
            named = c.download(job.id, tmp_path / "mine.onnx")
        assert got.path.name == "decoder.int4_weight_only.zip" and named.path.name == "mine.zip"
        _check_artifact(src, got.path, tmp_path)
    finally:
        client2.close()
        proc2.stop()


def test_the_production_setup_takes_a_model_folder(postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    src, _bundle_path = _bundle(tmp_path)
    data = tmp_path / "prod-data"
    env = env_for(data, LOWBIT_DATABASE_URL=postgres_url, LOWBIT_BROKER_URL=redis_url,
                  LOWBIT_UPLOAD_PART_BYTES=str(PART))
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    worker = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1", "--memory-gb", "8"), env,
                  data / "worker.log")
    api, client = start_serve(data, data / "api.log", "--no-worker", "--no-migrate", env=env)
    try:
        with Client(str(client.base_url)) as c:
            model = c.upload_model(src.parent)  # the folder: model.onnx and model.onnx.data
            assert model.raw["external_data_bytes"] > 0
            job = c.submit(model.id, "int8_dynamic")
        done = wait_job(client, job.id, worker)
        assert done["status"] == "succeeded", done["error"]
        report = client.get(f"/api/v1/jobs/{job.id}/report").json()
        assert report["external_data"]["quantize_peak_rss_mb"] > 0
        engine = sa.create_engine(postgres_url)
        with engine.connect() as conn:  # the worker declared what --memory-gb said, for routing
            assert 8192 in conn.execute(sa.text("SELECT memory_mb FROM workers")).scalars().all()
        engine.dispose()
        with Client(str(client.base_url)) as c:
            got = c.download(job.id, tmp_path)
        _check_artifact(src, got.path, tmp_path)
    finally:
        client.close()
        api.stop()
        worker.stop()
