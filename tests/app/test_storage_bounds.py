"""The data directory stays in bounds: per-tenant storage quotas (507), the retention of finished jobs' files
(410 artifact_expired, `lowbit gc`), stray files, and a job that finds no room on disk (disk_full, no partial
artifact). Through the real API and the real worker code path (sandboxed engine)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from app.db import utcnow
from app.jobs.models import Job
from app.tenants.models import LOCAL_TENANT, Tenant
from tests import builders
from tests.app.conftest import Harness, harness
from tests.app.helpers import submit, upload_dataset, upload_model

DYNAMIC = {"recipe": "int8_dynamic", "options": {"latency_runs": 2}}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(params=["sqlite", "postgres"])
def quota_api(request: pytest.FixtureRequest, tmp_path: Path, zoo: dict[str, Path]) -> Iterator[Harness]:
    # Room for the mlp and its data and 100 bytes more: no artifact fits.
    quota = zoo["mlp"].stat().st_size + zoo["mlp_data"].stat().st_size + 100
    with harness(request, tmp_path, request.param, tenant_storage_quota_bytes=quota) as h:
        yield h


def test_storage_quota_refuses_uploads_and_artifacts_past_it(quota_api: Harness, zoo: dict[str, Path]) -> None:
    api = quota_api
    quota = api.settings.tenant_storage_quota_bytes
    m = upload_model(api.client, zoo["mlp"])
    d = upload_dataset(api.client, zoo["mlp_data"])
    used = m["size_bytes"] + d["size_bytes"]
    # Another upload would pass the quota: 507 with what is used, allowed and asked for; nothing is kept.
    before = _files(api.settings.data_dir)
    r = api.client.post("/api/v1/datasets", files={"file": ("again.npz", zoo["mlp_data"].read_bytes())})
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "storage_quota_exceeded"
    assert (err["used_bytes"], err["quota_bytes"], err["adding_bytes"]) == (used, quota, d["size_bytes"])
    assert f"{used} bytes" in err["message"] and f"{quota} bytes" in err["message"]
    assert _files(api.settings.data_dir) == before
    # A job may start (there is room left), but its artifact does not fit: it fails and keeps no file.
    job_id = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], **DYNAMIC).json()["id"]
    assert api.run_queued() == ["failed"]
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["error"]["code"] == "storage_quota_exceeded", job["error"]
    assert "this job's artifact adds" in job["error"]["message"]
    assert not list((api.settings.data_dir / "jobs").rglob("*.onnx"))
    # The tenant's own quota (lowbit keys create --storage-quota-bytes) replaces the server's: at exactly
    # what it keeps, a new job is refused up front; with room, the job succeeds and its artifact counts.
    with api.factory.begin() as s:
        tenant = s.get(Tenant, LOCAL_TENANT)
        assert tenant is not None
        tenant.storage_quota_bytes = used
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], **DYNAMIC)
    assert r.status_code == 507 and "could not be kept" in r.json()["error"]["message"], r.text
    with api.factory.begin() as s:
        tenant = s.get(Tenant, LOCAL_TENANT)
        assert tenant is not None
        tenant.storage_quota_bytes = 10 * 1024 * 1024
    job_id = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], **DYNAMIC).json()["id"]
    assert api.run_queued() == ["succeeded"]
    from app.tenants.service import storage_used

    with api.factory() as s:
        job_row = s.get(Job, job_id)
        assert job_row is not None and job_row.artifact_bytes
        assert storage_used(s, LOCAL_TENANT) == used + job_row.artifact_bytes


def test_retention_expires_finished_jobs_files_and_gc_removes_strays(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["mlp"])
    d = upload_dataset(api.client, zoo["mlp_data"])
    old_id, new_id = (submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], **DYNAMIC).json()["id"]
                      for _ in range(2))
    assert api.run_queued() == ["succeeded", "succeeded"]
    with api.factory.begin() as s:  # one ended 3 days ago, the other just now
        row = s.get(Job, old_id)
        assert row is not None
        row.finished_at = utcnow() - timedelta(days=3)
    data = api.settings.data_dir
    # Strays: an upload cut off a day ago, the folder of a job whose row is gone, and a fresh part (kept).
    (data / "incoming").mkdir(exist_ok=True)
    stale_part, fresh_part = data / "incoming" / "cut.part", data / "incoming" / "now.part"
    stale_part.write_bytes(b"x" * 1000)
    fresh_part.write_bytes(b"y")
    orphan = data / "jobs" / str(uuid.uuid4())
    orphan.mkdir(parents=True)
    (orphan / "model.quantized.1.onnx").write_bytes(b"z" * 500)
    long_ago = time.time() - 2 * 24 * 3600
    for p in (stale_part, orphan / "model.quantized.1.onnx", orphan):
        os.utime(p, (long_ago, long_ago))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")},
           "LOWBIT_DATA_DIR": str(data), "LOWBIT_DATABASE_URL": api.settings.resolved_database_url}
    out = subprocess.run([sys.executable, "-m", "app.cli", "gc", "--retention-days", "2"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "removed the files of 1 finished job(s)" in out.stdout and "removed 2 stray file(s)" in out.stdout
    assert not stale_part.exists() and fresh_part.exists() and not orphan.exists()
    assert not (data / "jobs" / old_id).exists() and list((data / "jobs" / new_id).glob("model.quantized.*.onnx"))
    # The expired job keeps its row and report; its artifact answers 410, and the API and page say so.
    job = api.client.get(f"/api/v1/jobs/{old_id}").json()
    assert job["status"] == "succeeded" and job["artifact_expired_at"] is not None
    r = api.client.get(f"/api/v1/jobs/{old_id}/artifact")
    assert r.status_code == 410 and r.json()["error"]["code"] == "artifact_expired", r.text
    assert "LOWBIT_RETENTION_DAYS" in r.json()["error"]["message"]
    assert api.client.get(f"/api/v1/jobs/{old_id}/report").status_code == 200
    page = api.client.get(f"/jobs/{old_id}").text
    assert "The quantized model expired" in page and 'data-field="download"' not in page
    assert api.client.get(f"/api/v1/jobs/{new_id}/artifact").status_code == 200
    assert api.client.get(f"/api/v1/jobs/{new_id}").json()["artifact_expired_at"] is None
    # Collecting again changes nothing; an expired artifact no longer counts against the quota.
    from app import gc
    from app.storage import Storage
    from app.tenants.service import storage_used

    again = gc.collect(api.factory, Storage(data), api.settings.model_copy(update={"retention_days": 2}))
    assert again.expired_jobs == [] and again.stray_paths == []
    with api.factory() as s:
        kept = s.get(Job, new_id)
        assert kept is not None and kept.artifact_bytes
        assert storage_used(s, LOCAL_TENANT) == m["size_bytes"] + d["size_bytes"] + kept.artifact_bytes


def test_disk_errors_are_recognised_through_wrappers() -> None:
    from worker.sandbox import Limits, disk_full

    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert (e := disk_full(enospc, Limits())) is not None and e.code == "disk_full"
    assert "LOWBIT_DATA_DIR" in e.message
    try:
        try:
            raise enospc
        except OSError as inner:
            raise RuntimeError("SerializeToString failed") from inner
    except RuntimeError as wrapped:
        assert (w := disk_full(wrapped, Limits())) is not None and w.code == "disk_full"
    onnx_style = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : write failed: No space left on device")
    assert disk_full(onnx_style, Limits()) is not None
    big = disk_full(OSError(errno.EFBIG, "File too large"), Limits(file_mb=5))
    assert big is not None and "5 MB" in big.message and "LOWBIT_JOB_FILE_LIMIT_MB" in big.message
    assert disk_full(OSError(errno.ENOENT, "No such file"), Limits()) is None
    assert disk_full(ValueError("bad shape"), Limits()) is None


@pytest.fixture
def bigger_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A transformer of about 3 MB (the engine's work files are at least as large), and its token data."""
    d = tmp_path_factory.mktemp("bigger")
    model = builders.tiny_transformer(d / "tf3.onnx", vocab=4000, dim=160, seq=16, layers=1)
    assert model.stat().st_size > 2 * 1024 * 1024
    return model, builders.token_data(d / "tokens.npz", n=16, vocab=4000, seq=16)


def _fails_with_disk_full(api: Harness, model: Path, data: Path) -> str:
    m = upload_model(api.client, model)
    d = upload_dataset(api.client, data)
    job_id = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], **DYNAMIC).json()["id"]
    assert api.run_queued() == ["failed"]
    job = api.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["error"]["code"] == "disk_full", job["error"]
    # No artifact, whole or partial, and no work files are left behind.
    folder = api.settings.data_dir / "jobs" / job_id
    assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]
    assert api.client.get(f"/api/v1/jobs/{job_id}/artifact").status_code == 409
    return str(job["error"]["message"])


def test_a_job_past_the_file_size_limit_fails_with_disk_full(tmp_path: Path, request: pytest.FixtureRequest,
                                                             bigger_model: tuple[Path, Path]) -> None:
    with harness(request, tmp_path, "sqlite", job_file_limit_mb=1) as api:
        message = _fails_with_disk_full(api, *bigger_model)
    assert "1 MB" in message and "LOWBIT_JOB_FILE_LIMIT_MB" in message


def test_a_job_on_a_full_disk_fails_with_disk_full(tmp_path: Path, request: pytest.FixtureRequest,
                                                   bigger_model: tuple[Path, Path]) -> None:
    """A real ENOSPC: the jobs folder is a 1 MB tmpfs (needs root and mount(2); skipped otherwise)."""
    jobs = tmp_path / "data" / "jobs"
    jobs.mkdir(parents=True)
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None or subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(jobs)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root and mount(2) (CAP_SYS_ADMIN)")
    try:
        with harness(request, tmp_path, "sqlite") as api:
            message = _fails_with_disk_full(api, *bigger_model)
        assert "No space left on device" in message
        assert not [p for p in jobs.rglob("*") if p.is_file()]
    finally:
        subprocess.run(["umount", str(jobs)], check=False)


def test_keys_create_sets_a_tenants_storage_quota(tmp_path: Path) -> None:
    import sqlalchemy as sa

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}, "LOWBIT_DATA_DIR": str(tmp_path)}

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "acme", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    assert keys("--storage-quota-bytes", "5000000").returncode == 0
    refused = keys("--storage-quota-bytes", "-1")
    assert refused.returncode == 2 and "invalid_storage_quota" in refused.stderr and "Traceback" not in refused.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'lowbit.db'}")
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT storage_quota_bytes FROM tenants WHERE name = 'acme'")).scalar_one() == 5000000
    engine.dispose()
