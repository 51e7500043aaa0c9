"""Models with external data through the API (SQLite and PostgreSQL): bundle uploads, hostile bundles refused
with nothing kept, recipes that cannot stream refused at submit time, a job run through the worker's code path
to a .zip download (Range served), and resumable uploads sent out of order, retried, interrupted by a server
restart and finished."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_dataset
from tests.builders import external_decoder, save_npz

PART = 64 * 1024


def _bundle_bytes(tmp_path: Path, kind: str = "zip", **build: object) -> bytes:
    folder = external_decoder(tmp_path / "src", **build).parent  # type: ignore[arg-type]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


def _kept(api: Harness) -> list[Path]:
    root = Path(api.settings.data_dir)
    return [p for d in ("models", "incoming", "uploads") for p in (root / d).rglob("*") if p.is_file()]


def test_a_bundle_upload_keeps_the_model_and_its_data_in_one_folder(api: Harness, tmp_path: Path) -> None:
    data = _bundle_bytes(tmp_path)
    r = api.client.post("/api/v1/models", files={"file": ("decoder.zip", data)})
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["external_data_bytes"] > 0 and m["sha256"] == hashlib.sha256(data).hexdigest()
    folder = Path(api.settings.data_dir) / "models" / m["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert [p for p in _kept(api) if "incoming" in p.parts] == []  # the archive itself is not kept


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


def test_hostile_bundles_get_a_clear_4xx_and_nothing_is_kept(api: Harness, tmp_path: Path) -> None:
    folder = external_decoder(tmp_path / "src").parent
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../../etc/passwd"
    cases = {
        "zip slip": (_zip({"../x.onnx": b"x"}), "unsafe_bundle"),
        "reference outside the folder": (_zip({"model.onnx": model.SerializeToString(),
                                               "model.onnx.data": (folder / "model.onnx.data").read_bytes()}),
                                         "unsafe_model"),
        "bomb": (_zip_deflated({"model.onnx": b"x", "w.data": b"\0" * (32 << 20)}), "unsafe_bundle"),
        "no model": (_zip({"weights.data": b"x"}), "invalid_model"),
    }
    for name, (body, code) in cases.items():
        r = api.client.post("/api/v1/models", files={"file": ("bundle.zip", body)})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert error_of(r) == code, (name, r.text)
        assert _kept(api) == [], name


def _zip_deflated(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


def test_a_lone_onnx_file_with_external_data_is_told_to_bundle(api: Harness, tmp_path: Path) -> None:
    path = external_decoder(tmp_path / "src")
    r = api.client.post("/api/v1/models", files={"file": ("model.onnx", path.read_bytes())})
    assert r.status_code == 422 and error_of(r) == "external_data_not_supported"
    assert ".zip or .tar bundle" in r.json()["error"]["message"]


def test_recipes_that_cannot_stream_are_refused_at_submit_time(api: Harness, tmp_path: Path) -> None:
    m = api.client.post("/api/v1/models", files={"file": ("d.zip", _bundle_bytes(tmp_path))}).json()
    for recipe, options in (("int8_static", {}), ("int4_weight_only", {"algorithm": "gptq"}),
                            ("int4_weight_only", {"int8_activations": True}),
                            ("int8_dynamic", {"four_bit_weights": True})):
        r = submit(api.client, model_id=m["id"], recipe=recipe, options=options)
        assert r.status_code == 422, (recipe, r.text)
        assert error_of(r) == "external_data_not_supported"
    assert api.queue.enqueued == []


def test_an_external_data_job_runs_to_a_zip_download(api: Harness, tmp_path: Path) -> None:
    m = api.client.post("/api/v1/models", files={"file": ("decoder.zip", _bundle_bytes(tmp_path))}).json()
    ids = np.random.default_rng(2).integers(0, 512, (20, 8))
    ds = upload_dataset(api.client, save_npz(tmp_path / "tokens.npz", input_ids=ids))
    r = submit(api.client, model_id=m["id"], recipe="int4_weight_only", calibration_dataset_id=ds["id"],
               options={"int8_last_matmul": True})
    assert r.status_code == 202, r.text
    job = r.json()
    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{job['id']}/report").json()
    assert report["options"]["algorithm"] == "clip_search"  # calibrated, as on a self-contained model
    assert report["calibration"]["samples"] + report["accuracy"]["samples"] == 20
    assert report["external_data"]["int8_layers"] == ["lm_head"]
    assert report["accuracy"]["outputs"][0]["cosine"] >= 0.99
    d = api.client.get(f"/api/v1/jobs/{job['id']}/artifact")
    assert d.status_code == 200 and d.headers["content-type"] == "application/zip"
    assert 'filename="decoder.int4_weight_only.zip"' in d.headers["content-disposition"]
    part = api.client.get(f"/api/v1/jobs/{job['id']}/artifact", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == d.content[:100]
    out = tmp_path / "unzipped"
    zipfile.ZipFile(io.BytesIO(d.content)).extractall(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input_ids": ids[:1]})[0].shape == (1, 8, 512)


@pytest.mark.parametrize(("recipe", "options"), [("fp16", {}), ("int4_weight_only", {"quantize_embeddings": True})])
def test_fp16_and_4_bit_embeddings_run_on_a_bundle(api: Harness, tmp_path: Path, recipe: str,
                                                   options: dict[str, object]) -> None:
    m = api.client.post("/api/v1/models", files={"file": ("decoder.zip", _bundle_bytes(tmp_path))}).json()
    r = submit(api.client, model_id=m["id"], recipe=recipe, options=options)
    assert r.status_code == 202, r.text
    assert api.run_queued() == ["succeeded"]
    report = api.client.get(f"/api/v1/jobs/{r.json()['id']}/report").json()
    precisions = {row["name"]: row["precision"] for row in report["layers"]}
    if recipe == "fp16":
        assert precisions["layers.0.up"] == "fp16" and report["size"]["bits_per_weight"] == 16.0
        assert report["accuracy"]["outputs"][0]["cosine"] >= 0.9999
    else:
        assert report["external_data"]["embedding_layers"] == ["embed"] and precisions["embed"] == "int4"
        assert report["accuracy"]["outputs"][0]["cosine"] >= 0.99


# -- resumable uploads -------------------------------------------------------------------------------------------

def _announce(client: TestClient, data: bytes, name: str = "decoder.zip") -> dict[str, object]:
    r = client.post("/api/v1/uploads", json={"filename": name, "size_bytes": len(data),
                                             "sha256": hashlib.sha256(data).hexdigest()})
    assert r.status_code == 201, r.text
    return r.json()


def _put(client: TestClient, upload: dict[str, object], data: bytes, i: int, **headers: str) -> int:
    size = int(upload["part_bytes"])  # type: ignore[call-overload]
    r = client.put(f"/api/v1/uploads/{upload['id']}/parts/{i}", content=data[i * size:(i + 1) * size],
                   headers=headers)
    return r.status_code


def test_a_resumable_upload_survives_bad_parts_and_a_server_restart(api: Harness, tmp_path: Path) -> None:
    api.client.app.state.settings = api.settings.model_copy(update={"upload_part_bytes": PART})  # type: ignore[attr-defined]
    data = _bundle_bytes(tmp_path)
    up = _announce(api.client, data)
    parts = int(up["parts"])  # type: ignore[call-overload]
    assert up["part_bytes"] == PART and parts == -(-len(data) // PART) and parts >= 4
    # Backwards, the first half only; one part corrupted on the way, one cut short.
    for i in reversed(range(parts // 2)):
        assert _put(api.client, up, data, i) == 204
    bad = hashlib.sha256(b"something else").hexdigest()
    assert _put(api.client, up, data, parts // 2, **{"Content-SHA256": bad}) == 422
    short = api.client.put(f"/api/v1/uploads/{up['id']}/parts/{parts // 2}", content=data[:10])
    assert short.status_code == 422 and error_of(short) == "part_length_mismatch"
    early = api.client.post(f"/api/v1/uploads/{up['id']}/complete")
    assert early.status_code == 409 and error_of(early) == "upload_incomplete"
    # A server restart: a new app on the same database and data directory carries on.
    app = create_app(api.client.app.state.settings, queue=api.queue)  # type: ignore[attr-defined]
    with TestClient(app) as again:
        state = again.get(f"/api/v1/uploads/{up['id']}").json()
        assert state["received"] == list(range(parts // 2))
        assert state["missing"] == list(range(parts // 2, parts))
        for i in state["missing"]:
            sha = hashlib.sha256(data[i * PART:(i + 1) * PART]).hexdigest()
            assert _put(again, up, data, i, **{"Content-SHA256": sha}) == 204
        assert _put(again, up, data, 0) == 204  # a part sent twice is fine
        done = again.post(f"/api/v1/uploads/{up['id']}/complete")
        assert done.status_code == 201, done.text
        model = done.json()
        assert model["sha256"] == hashlib.sha256(data).hexdigest() and model["external_data_bytes"] > 0
        assert again.post(f"/api/v1/uploads/{up['id']}/complete").json()["id"] == model["id"]
        assert again.get(f"/api/v1/uploads/{up['id']}").json()["status"] == "complete"
        assert not (Path(api.settings.data_dir) / "uploads" / f"{up['id']}.part").exists()
    app.state.engine.dispose()


def test_a_resumable_upload_checks_the_whole_file_and_the_model(api: Harness, tmp_path: Path) -> None:
    api.client.app.state.settings = api.settings.model_copy(update={"upload_part_bytes": PART})  # type: ignore[attr-defined]
    data = _bundle_bytes(tmp_path)
    up = _announce(api.client, data)
    wrong = bytes([data[0] ^ 1]) + data[1:]
    for i in range(int(up["parts"])):  # type: ignore[call-overload]
        assert _put(api.client, up, wrong, i) == 204
    r = api.client.post(f"/api/v1/uploads/{up['id']}/complete")
    assert r.status_code == 422 and error_of(r) == "checksum_mismatch"
    assert api.client.get(f"/api/v1/uploads/{up['id']}").json()["status"] == "receiving"  # the parts stay
    assert _put(api.client, up, data, 0) == 204
    assert api.client.post(f"/api/v1/uploads/{up['id']}/complete").status_code == 201
    # A file that is no model: refused with the reason, the upload and its file removed.
    junk = _zip({"weights.data": b"x" * 100})
    up2 = _announce(api.client, junk, "junk.zip")
    assert _put(api.client, up2, junk, 0) == 204
    r = api.client.post(f"/api/v1/uploads/{up2['id']}/complete")
    assert r.status_code == 422 and error_of(r) == "invalid_model"
    assert api.client.get(f"/api/v1/uploads/{up2['id']}").status_code == 404
    assert not (Path(api.settings.data_dir) / "uploads" / f"{up2['id']}.part").exists()


def test_uploads_too_large_or_of_the_wrong_kind_are_refused_when_announced(api: Harness) -> None:
    big = api.client.post("/api/v1/uploads", json={"filename": "m.zip", "size_bytes": api.settings.max_bundle_bytes + 1,
                                                   "sha256": "0" * 64})
    assert big.status_code == 413 and error_of(big) == "upload_too_large"
    pickle = api.client.post("/api/v1/uploads", json={"filename": "m.pth", "size_bytes": 10, "sha256": "0" * 64})
    assert pickle.status_code == 422 and error_of(pickle) == "unsupported_model_format"
    other = api.client.get("/api/v1/uploads/00000000-0000-0000-0000-000000000000")
    assert other.status_code == 404 and error_of(other) == "upload_not_found"


def test_a_job_goes_to_a_queue_whose_workers_have_the_memory_or_is_refused(api: Harness, tmp_path: Path) -> None:
    from datetime import timedelta

    from app import workers
    from app.db import utcnow
    from app.jobs.models import Worker
    from app.jobs.service import memory_estimate_mb
    from app.modelfiles.models import ModelFile

    m = api.client.post("/api/v1/models", files={"file": ("d.zip", _bundle_bytes(tmp_path))}).json()
    with api.factory() as s:
        row = s.get(ModelFile, m["id"])
        assert row is not None
        need = memory_estimate_mb(row)
    # A streamed model: about its size plus a base (here a few hundred KB: the base dominates).
    assert 512 <= need < 520

    def worker(name: str, queues: str, memory_mb: int | None) -> None:
        workers.beat(api.factory, name, queues.split(","), 60.0, memory_mb)

    worker("small:1", "cpu", need - 1)
    r = submit(api.client, model_id=m["id"], recipe="int8_dynamic")
    assert r.status_code == 422 and error_of(r) == "not_enough_worker_memory"
    body = r.json()["error"]
    assert body["estimate_mb"] == need and body["largest_worker_mb"] == need - 1
    assert "--memory-gb" in body["message"]
    worker("big:2", "cpu-large,cpu", need)
    r = submit(api.client, model_id=m["id"], recipe="int8_dynamic")
    assert r.status_code == 202 and r.json()["queue"] == "cpu"  # a worker on the job's own queue has enough
    workers.forget(api.factory, ["big:2"])
    worker("big:3", "cpu-large", need + 1000)
    r = submit(api.client, model_id=m["id"], recipe="int8_dynamic")
    assert r.status_code == 202 and r.json()["queue"] == "cpu-large"
    assert api.queue.enqueued[-1][1] == "cpu-large"
    with api.factory() as s:  # a worker that declares nothing takes anything, as before
        s.query(Worker).delete()
        s.add(Worker(id="old:4", hostname="old", queues="cpu", expires_at=utcnow() + timedelta(minutes=1)))
        s.commit()
    assert submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()["queue"] == "cpu"


def test_a_refused_one_shot_submission_keeps_no_bundle_folder(api: Harness, tmp_path: Path) -> None:
    files = {"model": ("decoder.zip", _bundle_bytes(tmp_path))}
    r = api.client.post("/api/v1/jobs", files=files, data={"config": '{"recipe": "int8_static"}'})
    assert r.status_code == 422 and error_of(r) == "external_data_not_supported"
    assert _kept(api) == []
    assert list((Path(api.settings.data_dir) / "models").iterdir()) == []


def test_gc_removes_an_abandoned_upload_and_an_orphaned_bundle_folder(api: Harness, tmp_path: Path) -> None:
    import os
    import time

    from app import gc
    from app.storage import Storage

    data = _bundle_bytes(tmp_path)
    up = _announce(api.client, data)
    m = api.client.post("/api/v1/models", files={"file": ("d.zip", data)}).json()
    storage = Storage(api.settings.data_dir)
    part, folder = storage.upload_path(str(up["id"])), storage.model_dir(m["id"])
    old = time.time() - 2 * gc.ORPHAN_GRACE_S
    for p in (part, folder):
        os.utime(p, (old, old))
    assert gc.strays(api.factory, storage).stray_paths == []  # rows own both: kept
    assert api.client.delete(f"/api/v1/uploads/{up['id']}").status_code == 204
    assert not part.exists()
    with api.factory() as s:  # a model row lost while its folder stayed (a crash between the two)
        from app.modelfiles.models import ModelFile

        s.query(ModelFile).filter(ModelFile.id == m["id"]).delete()
        s.commit()
    assert gc.strays(api.factory, storage).stray_paths == [str(folder)]
    assert not folder.exists()


def test_quota_counts_unfinished_uploads_and_bundles_are_checked_before_unpacking(request: pytest.FixtureRequest,
                                                                                  tmp_path: Path) -> None:
    from tests.app.conftest import harness

    data = _bundle_bytes(tmp_path)
    unpacked = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(data)).infolist())
    (tmp_path / "q").mkdir()
    with harness(request, tmp_path / "q", "sqlite", tenant_storage_quota_bytes=unpacked - 1) as api:
        r = api.client.post("/api/v1/models", files={"file": ("d.zip", data)})
        assert r.status_code == 507 and error_of(r) == "storage_quota_exceeded"
        assert r.json()["error"]["adding_bytes"] == unpacked  # the declared sizes, before anything was unpacked
        assert _kept(api) == []
        small = _zip({"x.onnx": b"x" * 10})
        up = _announce(api.client, small, "x.zip")
        used = api.client.post("/api/v1/uploads", json={"filename": "y.zip", "size_bytes": unpacked - 5,
                                                        "sha256": "0" * 64})
        assert used.status_code == 507  # the first upload's announced bytes count until it is finished
        assert api.client.delete(f"/api/v1/uploads/{up['id']}").status_code == 204


def test_a_failed_resend_makes_the_part_missing_and_a_finished_upload_takes_no_parts(api: Harness,
                                                                                      tmp_path: Path) -> None:
    api.client.app.state.settings = api.settings.model_copy(update={"upload_part_bytes": PART})  # type: ignore[attr-defined]
    data = _bundle_bytes(tmp_path)
    up = _announce(api.client, data)
    for i in range(int(up["parts"])):  # type: ignore[call-overload]
        assert _put(api.client, up, data, i) == 204
    # Part 1 sent again, cut short: its bytes in the file are now half overwritten, so it is missing again.
    short = api.client.put(f"/api/v1/uploads/{up['id']}/parts/1", content=data[PART:PART + 10])
    assert short.status_code == 422
    assert api.client.get(f"/api/v1/uploads/{up['id']}").json()["missing"] == [1]
    assert _put(api.client, up, data, 1) == 204
    assert api.client.post(f"/api/v1/uploads/{up['id']}/complete").status_code == 201
    late = api.client.put(f"/api/v1/uploads/{up['id']}/parts/0", content=data[:PART])
    assert late.status_code == 409 and error_of(late) in ("upload_complete", "upload_closed")


def test_unfinished_uploads_expire(api: Harness, tmp_path: Path) -> None:
    from datetime import timedelta

    from app import gc
    from app.db import utcnow
    from app.storage import Storage

    up = _announce(api.client, b"x" * 100, "m.onnx")
    storage = Storage(api.settings.data_dir)
    assert gc.expire_uploads(api.factory, storage, 7.0).stray_paths == []
    later = utcnow() + timedelta(days=8)
    out = gc.expire_uploads(api.factory, storage, 7.0, now=later)
    assert out.stray_paths == [str(storage.upload_path(str(up["id"])))]
    assert api.client.get(f"/api/v1/uploads/{up['id']}").status_code == 404


def test_a_malformed_zip_is_a_clear_4xx(api: Harness) -> None:
    good = _zip({"model.onnx": b"x" * 100})
    broken = good.replace(b"PK\x01\x02", b"PX\x01\x02")  # the central directory no longer parses
    r = api.client.post("/api/v1/models", files={"file": ("b.zip", broken)})
    assert r.status_code == 422 and error_of(r) == "invalid_model", r.text
    long_name = _zip({"a" * 300 + ".onnx": b"x"})
    r = api.client.post("/api/v1/models", files={"file": ("b.zip", long_name)})
    assert r.status_code == 422 and error_of(r) == "unsafe_bundle"
    assert _kept(api) == []


def test_a_bundle_with_its_model_in_a_subfolder_is_removed_whole(api: Harness, tmp_path: Path) -> None:
    folder = external_decoder(tmp_path / "src").parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"export/{p.name}")
    r = api.client.post("/api/v1/jobs", files={"model": ("d.zip", buf.getvalue())},
                        data={"config": '{"recipe": "int8_static"}'})
    assert r.status_code == 422 and error_of(r) == "external_data_not_supported"
    assert list((Path(api.settings.data_dir) / "models").iterdir()) == []


def test_a_second_finish_that_lost_the_race_returns_the_model(api: Harness, tmp_path: Path) -> None:
    """Two finishes at once on SQLite (no row lock): the one that finds the file gone after the other made the
    model answers with that model, not upload_lost."""
    from app.resumable import service
    from app.resumable.models import Upload
    from app.storage import Storage

    data = _bundle_bytes(tmp_path)
    up = _announce(api.client, data)
    for i in range(int(up["parts"])):  # type: ignore[call-overload]
        assert _put(api.client, up, data, i) == 204
    with api.factory() as db:
        stale = db.get(Upload, up["id"])  # read before the other finish
        assert stale is not None and stale.status == "receiving"
        first = api.client.post(f"/api/v1/uploads/{up['id']}/complete").json()
        model = service.complete(db, Storage(api.settings.data_dir), row=stale, settings=api.settings)
        assert model.id == first["id"]
