"""Hostile uploads against the real app (SQLite and PostgreSQL): oversized and endless bodies, hostile file
names, files that are not what they claim, ONNX external data that points outside, .npz bombs, pickled
payloads; and the headers every response carries. Each attack gets the safe result named in its test."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import re
import threading
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from app.datasets.models import Dataset
from app.limits import MULTIPART_OVERHEAD, UPLOAD_ROUTES
from app.modelfiles.models import ModelFile
from app.security import CSP
from tests import pt2_builders as pb
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_dataset, upload_model
from tests.worker.engine.test_hostile_files import (
    declare_size,
    external_initializer,
    nested_if_model,
    npy_header,
    small_model,
    zip_bytes,
)

LIMIT = 1024 * 1024
CHUNK = 64 * 1024
BOUNDARY = "lowbit-test-boundary"
FILE_FIELD = {"/api/v1/models": "file", "/api/v1/datasets": "file", "/api/v1/jobs": "model", "/jobs/new": "model"}


def _small_limit(api: Harness) -> None:
    api.client.app.state.settings = api.settings.model_copy(update={"max_upload_bytes": LIMIT})  # type: ignore[attr-defined]


def _incoming_files(api: Harness) -> list[Path]:
    incoming = Path(api.settings.data_dir) / "incoming"
    return [p for p in incoming.rglob("*") if p.is_file()] if incoming.exists() else []


def _stored_files(api: Harness) -> list[Path]:
    """Uploaded files the server kept (models, datasets, anything half-received)."""
    root = Path(api.settings.data_dir)
    return [p for d in ("models", "datasets", "incoming") for p in (root / d).rglob("*") if p.is_file()]


class Counter:
    def __init__(self) -> None:
        self.sent = 0


async def _endless_multipart(field: str, counter: Counter, total: int) -> AsyncIterator[bytes]:
    """A multipart body whose one file part would be ``total`` bytes long; counts what was actually sent."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"big.onnx\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    counter.sent += len(head)
    yield head
    chunk = b"\0" * CHUNK
    for _ in range(total // CHUNK):
        counter.sent += len(chunk)
        yield chunk
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    counter.sent += len(tail)
    yield tail


async def _endless_json(counter: Counter, total: int) -> AsyncIterator[bytes]:
    counter.sent += 12
    yield b'{"recipe": "'
    for _ in range(total // CHUNK):
        counter.sent += CHUNK
        yield b"x" * CHUNK


def _post_streaming(api: Harness, path: str, body: AsyncIterator[bytes], headers: dict[str, str]) -> httpx.Response:
    """POST a streamed body to the app in process. The ASGI transport hands the body to the app one chunk per
    ``receive`` call, as a server does, so what the generator yielded is what the app read."""
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=api.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            r = await client.post(path, content=body, headers=headers)
            await r.aread()
            return r

    return asyncio.run(go())


def _assert_too_large(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    assert error_of(r) == "upload_too_large"
    assert r.headers["connection"] == "close"  # the server drops the connection instead of draining the body
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["content-security-policy"] == CSP


@pytest.mark.parametrize("path", list(UPLOAD_ROUTES))
def test_endless_chunked_upload_is_cut_off_at_the_limit(api: Harness, path: str) -> None:
    _small_limit(api)
    limit = UPLOAD_ROUTES[path] * LIMIT + MULTIPART_OVERHEAD
    counter = Counter()
    r = _post_streaming(api, path, _endless_multipart(FILE_FIELD[path], counter, total=512 * LIMIT),
                        {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    _assert_too_large(r)
    # It stopped reading within one chunk of the limit: ~1-5 MB of a 512 MB body.
    assert limit < counter.sent <= limit + CHUNK + 512, counter.sent
    assert _incoming_files(api) == [] and _stored_files(api) == []


@pytest.mark.parametrize("path", list(UPLOAD_ROUTES))
def test_declared_content_length_over_the_limit_is_refused_before_reading(api: Harness, path: str) -> None:
    _small_limit(api)
    counter = Counter()
    r = _post_streaming(api, path, _endless_multipart(FILE_FIELD[path], counter, total=512 * LIMIT),
                        {"content-type": f"multipart/form-data; boundary={BOUNDARY}",
                         "content-length": str(512 * LIMIT + 200)})
    _assert_too_large(r)
    assert counter.sent == 0  # not a byte of the body was read
    assert _incoming_files(api) == [] and _stored_files(api) == []


@pytest.mark.parametrize("declared", [True, False])
def test_a_browser_posting_the_page_form_gets_a_page_not_json(api: Harness, declared: bool) -> None:
    _small_limit(api)
    counter = Counter()
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", "accept": "text/html,*/*;q=0.8"}
    if declared:
        headers["content-length"] = str(512 * LIMIT + 200)
    r = _post_streaming(api, "/jobs/new", _endless_multipart("model", counter, total=512 * LIMIT), headers)
    assert r.status_code == 413 and r.headers["content-type"].startswith("text/html")
    assert r.headers["connection"] == "close"
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["content-security-policy"] == CSP
    assert "upload_too_large" in r.text and "<script" not in r.text and 'href="/"' in r.text
    assert f"at most {LIMIT / 2**20:.1f} MB each" in r.text
    assert _incoming_files(api) == [] and _stored_files(api) == []
    # The API answers JSON whatever the client accepts.
    r = _post_streaming(api, "/api/v1/models", _endless_multipart("file", Counter(), total=512 * LIMIT), headers)
    _assert_too_large(r)


def test_endless_json_body_is_cut_off(api: Harness) -> None:
    counter = Counter()
    r = _post_streaming(api, "/api/v1/jobs", _endless_json(counter, total=512 * LIMIT),
                        {"content-type": "application/json"})
    _assert_too_large(r)
    assert counter.sent <= 2 * LIMIT


@pytest.mark.parametrize("path", ["/api/v1/models", "/api/v1/datasets"])
def test_file_between_the_per_file_limit_and_the_body_limit_is_refused_after_streaming(api: Harness,
                                                                                     path: str) -> None:
    """The body limit leaves room for multipart framing; the per-file limit is still exact, and the part
    already written to the incoming folder is removed."""
    _small_limit(api)
    r = api.client.post(path, files={"file": ("f.onnx", b"\0" * (LIMIT + 1))})
    assert r.status_code == 413 and error_of(r) == "upload_too_large"
    assert _incoming_files(api) == [] and _stored_files(api) == []


def test_uploads_under_the_limit_still_work(api: Harness, zoo: dict[str, Path]) -> None:
    _small_limit(api)
    assert upload_model(api.client, zoo["mlp"])["size_bytes"] == zoo["mlp"].stat().st_size
    r = api.client.post("/api/v1/jobs", data={"config": json.dumps({"recipe": "int8_dynamic"})},
                        files={"model": ("m.onnx", zoo["mlp"].read_bytes()),
                               "calibration": ("c.npz", zoo["mlp_data"].read_bytes())})
    assert r.status_code == 202, r.text


# ---- file names ----------------------------------------------------------------------------------------

def _post_raw_multipart(api: Harness, path: str, field: str, filename: str, data: bytes) -> httpx.Response:
    """A multipart upload whose filename goes out byte for byte (httpx would percent-encode the NUL); only
    CR, LF and the quote are escaped, as browsers do, since raw they would end the part header."""
    name = filename.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22").encode()
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"".encode() + name
            + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + f"\r\n--{BOUNDARY}--\r\n".encode())
    return api.client.post(path, content=body,
                           headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})


HOSTILE_NAMES = [
    ("../../x", "x"),
    ("../../../../etc/cron.d/evil.onnx", "evil.onnx"),
    ("/etc/passwd", "passwd"),
    ("C:\\Windows\\system32\\evil.onnx", "evil.onnx"),
    ("mo\x00del.onnx", "model.onnx"),
    ("model\r\nX-Injected: 1.onnx", "model%0D%0AX-Injected: 1.onnx"),  # as browsers send it: escaped
    ("report\u202egnp.onnx", "reportgnp.onnx"),
    ("..", None),
    ("a" * 4000 + ".onnx", "a" * 250 + ".onnx"),
]


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_hostile_file_names_are_stored_under_server_names(api: Harness, zoo: dict[str, Path], kind: str) -> None:
    src = zoo["mlp"] if kind == "model" else zoo["mlp_data"]
    root = Path(api.settings.data_dir).resolve()
    for sent, shown in HOSTILE_NAMES:
        if kind == "dataset":
            sent = sent.replace(".onnx", ".npz")
            shown = shown and (shown.replace(".onnx", ".npz") if len(shown) < 255 else "a" * 251 + ".npz")
        r = _post_raw_multipart(api, f"/api/v1/{kind}s", "file", sent, src.read_bytes())
        assert r.status_code == 201, (sent[:50], r.text)
        body = r.json()
        assert body["filename"] == (shown or ("model.onnx" if kind == "model" else "data.npz")), sent[:50]
        table = ModelFile if kind == "model" else Dataset
        with api.factory() as s:
            stored = Path(s.get(table, body["id"]).storage_path)  # type: ignore[union-attr]
        # Stored inside the data dir, named by the server (the row's id), whatever the client called it.
        assert stored.resolve().parent == root / f"{kind}s"
        assert stored.stem == body["id"] and uuid.UUID(stored.stem)
    # A 10 kB name does not fit the multipart parser's 4 kB part-header limit: the upload is refused whole.
    kept = _stored_files(api)
    r = _post_raw_multipart(api, f"/api/v1/{kind}s", "file", "b" * 10_000 + ".onnx", src.read_bytes())
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    assert _stored_files(api) == kept and _incoming_files(api) == []
    names = {p.name for p in kept}
    assert not names & {"x", "passwd", "evil.onnx", "evil.npz"}
    assert not (root.parent / "x").exists() and not Path("/etc/cron.d/evil.onnx").exists()


def test_hostile_names_are_escaped_on_the_pages(api: Harness, zoo: dict[str, Path]) -> None:
    # No '/' or '\\' (the name would be cut there) and no '"' (clients send it as %22).
    name = "<img src=x onerror=alert(1)><script>alert(1).onnx"
    m = upload_model(api.client, zoo["mlp"], name=name)
    assert m["filename"] == name
    r = submit(api.client, model_id=m["id"], recipe="int8_dynamic")
    assert r.status_code == 202, r.text
    for page in ("/", f"/jobs/{r.json()['id']}"):
        html = api.client.get(page, headers={"accept": "text/html"}).text
        assert "<script>alert(1)" not in html and "<img src=x" not in html, page
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(1).onnx" in api.client.get("/").text


# ---- model content ---------------------------------------------------------------------------------------

def _post_model(api: Harness, data: bytes, name: str = "model.onnx") -> httpx.Response:
    return api.client.post("/api/v1/models", files={"file": (name, data)})


def _huge_initializer() -> bytes:
    t = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[2**20, 2**20], raw_data=b"\0" * 16)
    return small_model(t).SerializeToString()


MODEL_ATTACKS = [
    ("a zip posing as .onnx", lambda: zip_bytes({"model.onnx": b"\0" * 64}), "invalid_model", "zip"),
    ("a pickle posing as .onnx", lambda: pb.pickle_payload(Path("/nonexistent/canary")), "invalid_model", "pickle"),
    ("HTML posing as .onnx", lambda: b"<!doctype html><script>alert(1)</script>", "invalid_model", "not a valid"),
    ("subgraphs nested 300 deep", lambda: nested_if_model(300), "model_too_complex", "nest"),
    ("subgraphs nested 20 deep", lambda: nested_if_model(20), "model_too_complex", "nest"),
    ("an input declaring 2^40 elements", lambda: small_model(input_shape=[2**40, 4]).SerializeToString(),
     "model_too_large", "shape"),
    ("an initializer declaring 2^40 elements", _huge_initializer, "invalid_model", "declares shape"),
]


@pytest.mark.parametrize("attack, make, code, words", MODEL_ATTACKS, ids=[a[0] for a in MODEL_ATTACKS])
def test_model_content_attacks_are_refused(api: Harness, attack: str, make: Any, code: str, words: str) -> None:
    r = _post_model(api, make())
    assert r.status_code == 422 and error_of(r) == code, r.text
    assert words in r.json()["error"]["message"]
    assert _stored_files(api) == []


# ---- ONNX external data ------------------------------------------------------------------------------------

@contextmanager
def fifo_canary(path: Path) -> Iterator[list[str]]:
    """A FIFO that reports whether anything opened it for reading while the block ran.

    Opening a FIFO for writing without blocking succeeds only while a reader has it open, and a reader's open
    blocks until a writer comes: so polling catches every open by the server (and unblocks it)."""
    os.mkfifo(path)
    opened: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                time.sleep(0.001)
                continue
            opened.append("opened")
            os.close(fd)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield opened
    finally:
        stop.set()
        t.join()


EXTERNAL = [
    ("relative path out of the data dir", "../" * 40 + "{canary}", None, None),
    ("absolute path", "{canary}", None, None),
    ("symlink beside the model", "weights.bin", None, None),
    ("absurd offset and length", "weights.bin", 2**62, 2**62),
]


@pytest.mark.parametrize("case, location, offset, length", EXTERNAL, ids=[e[0] for e in EXTERNAL])
def test_external_data_is_refused_without_opening_it(api: Harness, tmp_path: Path, case: str, location: str,
                                                     offset: int | None, length: int | None) -> None:
    canary = tmp_path / "canary.fifo"
    # Symlinks named like the external file wherever the server might resolve a relative location.
    root = Path(api.settings.data_dir)
    for d in (root / "incoming", root / "models", root):
        d.mkdir(parents=True, exist_ok=True)
    links = [d / "weights.bin" for d in (root / "incoming", root / "models", root)]
    for link in links:
        link.symlink_to(canary)
    try:
        with fifo_canary(canary) as opened:
            loc = location.format(canary=str(canary).lstrip("/") if location.startswith("..") else canary)
            r = _post_model(api, small_model(external_initializer(loc, offset, length)).SerializeToString())
            time.sleep(0.05)
        assert r.status_code == 422 and error_of(r) == "external_data_not_supported", r.text
        assert "save_as_external_data=False" in r.json()["error"]["message"]
        assert opened == [], "the server opened the file the model named"
    finally:
        for link in links:
            link.unlink()
    assert _stored_files(api) == []


def test_quantizing_writes_only_inside_the_job_folder(api: Harness, zoo: dict[str, Path]) -> None:
    """The artifact is self-contained and the job's files are under its own folder: nothing the model declares
    steers where the worker writes."""
    m = upload_model(api.client, zoo["mlp"])
    d = upload_dataset(api.client, zoo["mlp_data"])
    root = Path(api.settings.data_dir).resolve()
    before = {p for p in root.rglob("*") if p.is_file()}
    job = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_static").json()
    assert api.run_queued() == ["succeeded"]
    new = {p for p in root.rglob("*") if p.is_file()} - before
    job_dir = (root / "jobs" / job["id"]).resolve()
    outside = [p for p in new if job_dir not in p.resolve().parents and p.name != "lowbit.db"
               and "cache" not in p.relative_to(root).parts]
    assert outside == []
    artifact = onnx.load(str(next(p for p in new if p.suffix == ".onnx" and "work" not in p.parent.name)),
                         load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in artifact.graph.initializer)


# ---- .npz --------------------------------------------------------------------------------------------------

def _bomb() -> bytes:
    member = npy_header((1024, 256)) + b"\0" * (1024 * 256 * 4)
    return declare_size(zip_bytes({"x.npy": member}, zipfile.ZIP_DEFLATED), 2**32 - 2)


def _object_array() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}, None], dtype=object))
    return buf.getvalue()


NPZ_ATTACKS = [
    ("zip bomb", _bomb, "invalid_dataset", "decompression bomb"),
    ("2^40-element header", lambda: zip_bytes({"x.npy": npy_header((2**40,)) + b"\0" * 64}), "dataset_too_large",
     "elements"),
    ("thousands of members", lambda: zip_bytes({f"a{i}.npy": npy_header((1, 1)) + b"\0" * 4 for i in range(3000)}),
     "invalid_dataset", "members"),
    ("object array", _object_array, "invalid_dataset", "pickle"),
    ("a member that is not .npy", lambda: zip_bytes({"x.npy": npy_header((2, 2)) + b"\0" * 16, "evil.sh": b"rm"}),
     "invalid_dataset", "not a .npy"),
    ("bzip2 member", lambda: zip_bytes({"x.npy": npy_header((2, 2)) + b"\0" * 16}, zipfile.ZIP_BZIP2),
     "invalid_dataset", "compression"),
]


@pytest.mark.parametrize("attack, make, code, words", NPZ_ATTACKS, ids=[a[0] for a in NPZ_ATTACKS])
def test_npz_attacks_are_refused(api: Harness, attack: str, make: Any, code: str, words: str) -> None:
    r = api.client.post("/api/v1/datasets", files={"file": ("d.npz", make())})
    assert r.status_code == 422 and error_of(r) == code, r.text
    assert words in r.json()["error"]["message"]
    assert _stored_files(api) == []


# ---- PyTorch pickles ------------------------------------------------------------------------------------

def test_pt2_payload_never_runs_on_upload_or_in_a_job(sqlite_api: Harness, pt2_zoo: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """A .pt2 whose sample-inputs member is a pickle with a __reduce__ payload (torch.export.load would
    unpickle it with weights_only=False) is accepted without that member: the upload and a whole job on it
    leave no canary. Pickles elsewhere in an archive are refused (tests/app/test_pt2_api.py)."""
    api = sqlite_api
    canary = tmp_path / "canary"
    path = pb.pt2_with_sample_inputs_payload(pt2_zoo["conv"], tmp_path / "conv.pt2", canary)
    m = upload_model(api.client, path)
    d = upload_dataset(api.client, pt2_zoo["conv_data"])
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_dynamic")
    assert r.status_code == 202, r.text
    assert api.run_queued() == ["succeeded"]
    assert not canary.exists()


@pytest.mark.parametrize("name", ["model.pt", "model.pt2", "model.onnx"])
def test_raw_pickle_payload_is_refused_and_never_runs(api: Harness, tmp_path: Path, name: str) -> None:
    canary = tmp_path / "canary"
    r = _post_model(api, pb.pickle_payload(canary), name)
    assert 400 <= r.status_code < 500, r.text
    assert not canary.exists()


# ---- headers ---------------------------------------------------------------------------------------------

def _assert_security_headers(r: httpx.Response, what: str) -> None:
    assert r.headers.get("content-security-policy") == CSP, what
    assert r.headers.get("x-content-type-options") == "nosniff", what


def test_pages_api_and_downloads_send_security_headers(api: Harness, zoo: dict[str, Path]) -> None:
    hostile = '../../evil"; filename="passwd\u202e\r\nSet-Cookie: a=b;.onnx'
    m = upload_model(api.client, zoo["mlp"], name=hostile)
    d = upload_dataset(api.client, zoo["mlp_data"])
    job = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_dynamic").json()
    assert api.run_queued() == ["succeeded"]
    for path in ("/", f"/jobs/{job['id']}", "/api/v1/jobs", f"/api/v1/jobs/{job['id']}",
                 f"/api/v1/jobs/{job['id']}/report", "/api/v1/nothing", "/static/style.css", "/healthz"):
        _assert_security_headers(api.client.get(path), path)
    art = api.client.get(f"/api/v1/jobs/{job['id']}/artifact")
    assert art.status_code == 200
    _assert_security_headers(art, "artifact")
    assert art.headers["content-type"] == "application/octet-stream"
    cd = art.headers["content-disposition"]
    assert cd.startswith("attachment;")
    assert "\r" not in cd and "\n" not in cd and "set-cookie" not in {k.lower() for k in art.headers}
    # One filename parameter; the name in it has no path, no quote breaking out and no control characters.
    params = re.findall(r"filename\*?=", cd)
    assert len(params) == 1, cd
    raw = cd.split("=", 1)[1]
    if raw.startswith("utf-8''"):
        from urllib.parse import unquote

        shown = unquote(raw[len("utf-8''"):])
    else:
        assert raw.startswith('"') and raw.endswith('"') and '"' not in raw[1:-1], cd
        shown = raw[1:-1]
    assert "/" not in shown and "\\" not in shown and not re.search(r"[\x00-\x1f\u202e]", shown), shown
    assert shown.endswith(".int8_dynamic.onnx")
