"""A small typed client for the lowbit API (httpx only: no server, engine or ML imports).

    from app.client import Client
    from app.client.cli import ReportSections

    with Client("http://127.0.0.1:8000") as client:
        result = client.quantize("model.onnx", calib="calib.npz", recipe="int8_static")
        print(ReportSections.of(result.report or {}).size.get("ratio"))
        result.download("model.int8.onnx")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from app.client.config import resolve
from app.client.errors import (
    ApiError,
    ChecksumMismatch,
    JobCancelled,
    JobFailed,
    LowbitClientError,
    ServerUnreachable,
    WaitTimeout,
)

FINISHED = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20
# Models this large, and every bundle (.zip/.tar: an ONNX model with its external data), go through a resumable
# upload: parts retried on their own, and an interrupted upload of the same file continued where it stopped.
RESUMABLE_FROM = 256 * 1024 * 1024
BUNDLE_SUFFIXES = (".zip", ".tar")
PART_TRIES = 4
USER_AGENT = "lowbit-client/0.1"

# (label, bytes done, bytes in all) during an upload or a download.
TransferFn = Callable[[str, int, int], None]
JobFn = Callable[["Job"], None]
StageFn = Callable[[str], None]


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Job:
    """A job as the server last described it (``raw`` is the full JSON)."""

    id: str
    status: str
    stage: str | None
    progress: int
    recipe: str
    options: dict[str, Any]
    model_id: str
    calibration_dataset_id: str | None
    eval_dataset_id: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: JobError | None
    links: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Job:
        err = d.get("error")
        return cls(
            id=str(d["id"]), status=str(d["status"]), stage=d.get("stage"), progress=int(d.get("progress") or 0),
            recipe=str(d.get("recipe", "")), options=dict(d.get("options") or {}), model_id=str(d.get("model_id", "")),
            calibration_dataset_id=d.get("calibration_dataset_id"), eval_dataset_id=d.get("eval_dataset_id"),
            created_at=str(d.get("created_at", "")), started_at=d.get("started_at"),
            finished_at=d.get("finished_at"),
            error=JobError(str(err.get("code", "")), str(err.get("message", ""))) if err else None,
            links=dict(d.get("links") or {}), raw=dict(d),
        )

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Upload:
    """An uploaded (or already stored: ``reused``) model or dataset."""

    id: str
    filename: str
    sha256: str
    size_bytes: int
    reused: bool
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Download:
    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Event:
    """One server-sent event: ``event`` is its type (stage, job, end, gone), ``data`` its decoded JSON."""

    event: str
    data: Any


@dataclass
class Result:
    """What ``Client.quantize`` returns: the job and (once it succeeded) its report."""

    client: Client = field(repr=False)
    job: Job
    report: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.job.id

    def wait(self, timeout: float | None = None, on_job: JobFn | None = None,
             on_stage: StageFn | None = None) -> Result:
        """Follow the job to its end; raises JobFailed / JobCancelled unless it succeeded."""
        self.job = self.client.wait(self.job.id, timeout=timeout, on_job=on_job, on_stage=on_stage)
        _raise_unless_succeeded(self.job)
        self.report = self.client.report(self.job.id)
        return self

    def download(self, path: str | os.PathLike[str], on_progress: TransferFn | None = None) -> Download:
        """Download the quantized model to ``path``, verified against the server's SHA-256."""
        return self.client.download(self.job.id, path, on_progress=on_progress)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _raise_unless_succeeded(job: Job) -> None:
    if job.status == "failed":
        raise JobFailed(job)
    if job.status == "cancelled":
        raise JobCancelled(job)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# The pages and `lowbit jobs` show a job's first 8 characters; that much (or more) of an id names a job.
JOB_ID_MIN_PREFIX = 8
_JOB_ID_PREFIX = re.compile(r"^[0-9a-f]{8}[0-9a-f-]{0,28}$")


def etag_sha256(etag: str | None) -> str | None:
    """The SHA-256 in an ETag header (``"<hex>"``, possibly weak), or None."""
    if not etag:
        return None
    value = etag.strip().removeprefix("W/").strip('"').lower()
    return value if _HEX64.match(value) else None


def _filename_from(disposition: str | None, default: str) -> str:
    m = re.search(r'filename="?([^";]+)"?', disposition or "")
    name = (m.group(1) if m else default).replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name if name not in ("", ".", "..") else default


class _Reader:
    """A file that reports how much of it has been read (httpx streams multipart file fields by reading)."""

    def __init__(self, fh: IO[bytes], size: int, label: str, on_progress: TransferFn) -> None:
        self.fh, self.size, self.label, self.on_progress = fh, size, label, on_progress

    def read(self, n: int = -1) -> bytes:
        chunk = self.fh.read(n)
        self.on_progress(self.label, min(self.fh.tell(), self.size), self.size)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def fileno(self) -> int:
        return self.fh.fileno()


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from a stream's lines (``retry:`` skipped, data lines joined). A comment line (the
    server's keep-alive) comes out as a ``heartbeat`` event, so a waiting client can check its deadline."""

    event, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield Event(event, payload)
            event, data = "message", []
            continue
        if line.startswith(":"):
            yield Event("heartbeat", None)
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


class _NoStream(Exception):
    """The events endpoint is not usable here (an older server, a proxy in the way): poll instead."""


class Client:
    """The lowbit API. ``server`` and ``api_key`` default to LOWBIT_SERVER / LOWBIT_API_KEY, then the client
    config file (see ``app.client.config``); the key is sent as ``Authorization: Bearer KEY``."""

    def __init__(self, server: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 poll_interval: float = 1.0, transport: httpx.BaseTransport | None = None) -> None:
        cfg = resolve(server, api_key)
        self.server = cfg.server
        self.api_key = cfg.api_key
        self.timeout = timeout
        self.poll_interval = poll_interval
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=transport)

    # -- plumbing --------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _unreachable(self, exc: Exception) -> ServerUnreachable:
        return ServerUnreachable(
            f"could not reach the lowbit server at {self.server} ({type(exc).__name__}: {exc}); is it running? "
            "Give its URL with --server or LOWBIT_SERVER")

    @staticmethod
    def _error(r: httpx.Response) -> ApiError:
        try:
            err = r.json()["error"]
            return ApiError(str(err["message"]), code=str(err["code"]), status_code=r.status_code)
        except (ValueError, KeyError, TypeError):
            text = r.text.strip()[:300] if r.text else r.reason_phrase
            return ApiError(f"HTTP {r.status_code} from {r.request.url}: {text}", code=f"http_{r.status_code}",
                            status_code=r.status_code)

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _json(self, method: str, url: str, **kw: Any) -> Any:
        r = self._request(method, url, **kw)
        if r.status_code >= 400:
            raise self._error(r)
        return r.json()

    # -- uploads ---------------------------------------------------------------------------------------------

    def upload_model(self, path: str | os.PathLike[str], on_progress: TransferFn | None = None,
                     reuse: bool = True) -> Upload:
        """Upload a model file, unless the server already has one with the same SHA-256 (then that one is
        used: re-uploading is free)."""
        return self._upload("models", Path(path), on_progress, reuse)

    def upload_dataset(self, path: str | os.PathLike[str], on_progress: TransferFn | None = None,
                       reuse: bool = True) -> Upload:
        """Upload an .npz dataset, unless the server already has one with the same SHA-256."""
        return self._upload("datasets", Path(path), on_progress, reuse)

    def find(self, kind: str, sha256: str) -> Upload | None:
        """The stored model or dataset (``kind`` models|datasets) with this SHA-256, if the server has one."""
        r = self._request("GET", f"/api/v1/{kind}", params={"sha256": sha256})
        if r.status_code != 200:  # an older server without the lookup: upload as usual
            return None
        items = r.json().get("items") or []
        return self._upload_of(items[0], reused=True) if items else None

    @staticmethod
    def _upload_of(d: Mapping[str, Any], reused: bool) -> Upload:
        return Upload(str(d["id"]), str(d.get("filename", "")), str(d.get("sha256", "")),
                      int(d.get("size_bytes") or 0), reused, dict(d))

    def _upload(self, kind: str, path: Path, on_progress: TransferFn | None, reuse: bool) -> Upload:
        if kind == "models" and path.is_dir():
            return self._upload_folder(path, on_progress, reuse)
        if not path.is_file():
            raise LowbitClientError(f"no such file: {path}", code="file_not_found")
        size = path.stat().st_size
        digest = sha256_file(path)
        if reuse:
            found = self.find(kind, digest)
            if found is not None:
                return found
        if kind == "models" and (size >= RESUMABLE_FROM or path.suffix.lower() in BUNDLE_SUFFIXES):
            return self._upload_of(self._upload_resumable(path, size, digest, on_progress), reused=False)
        with open(path, "rb") as fh:
            body: Any = _Reader(fh, size, path.name, on_progress) if on_progress else fh
            timeout = httpx.Timeout(self.timeout, write=max(self.timeout, 600.0), read=max(self.timeout, 600.0))
            data = self._json("POST", f"/api/v1/{kind}", timeout=timeout,
                              files={"file": (path.name, body, "application/octet-stream")})
        if data.get("sha256") != digest:
            raise ChecksumMismatch(f"the server stored {path.name} with SHA-256 {data.get('sha256')}, but the file's "
                                   f"is {digest}: it changed while uploading, or was damaged on the way")
        return self._upload_of(data, reused=False)

    def _upload_folder(self, folder: Path, on_progress: TransferFn | None, reuse: bool) -> Upload:
        """A folder holding one .onnx file and its external data files, sent as one uncompressed .zip."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        if sum(1 for p in files if p.suffix.lower() == ".onnx") != 1:
            raise LowbitClientError(f"{folder} is a folder: it must hold exactly one .onnx file (and the data files "
                                    "it names) to be uploaded as a bundle", code="not_a_bundle")
        with tempfile.TemporaryDirectory(prefix="lowbit-bundle-") as tmp:
            bundle = Path(tmp) / f"{folder.name or 'model'}.zip"
            with zipfile.ZipFile(bundle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for p in files:
                    zf.write(p, p.relative_to(folder).as_posix())
            return self._upload("models", bundle, on_progress, reuse)

    def _upload_resumable(self, path: Path, size: int, digest: str, on_progress: TransferFn | None) -> dict[str, Any]:
        """Send ``path`` through /api/v1/uploads: continue an unfinished upload of the same file if the server
        has one, send the missing parts (each retried on its own, with its SHA-256), then finish it."""
        found = self._request("GET", "/api/v1/uploads", params={"sha256": digest})
        items = found.json().get("items", []) if found.status_code == 200 else []
        up = next((u for u in items if u.get("size_bytes") == size and u.get("status") == "receiving"), None)
        if up is None:
            up = self._json("POST", "/api/v1/uploads", json={"filename": path.name, "size_bytes": size,
                                                             "sha256": digest})
        part = int(up["part_bytes"])
        done = size - sum(min(part, size - i * part) for i in up["missing"])
        timeout = httpx.Timeout(self.timeout, write=max(self.timeout, 600.0), read=max(self.timeout, 600.0))
        with open(path, "rb") as fh:
            while up["missing"]:
                for i in up["missing"]:
                    fh.seek(i * part)
                    body = fh.read(part)
                    headers = {"Content-SHA256": hashlib.sha256(body).hexdigest(),
                               "Content-Type": "application/octet-stream"}
                    for attempt in range(PART_TRIES):
                        try:
                            r = self._http.put(f"/api/v1/uploads/{up['id']}/parts/{i}", content=body,
                                               headers=headers, timeout=timeout)
                        except httpx.TransportError as exc:
                            if attempt == PART_TRIES - 1:
                                raise self._unreachable(exc) from exc
                            time.sleep(0.5 * 2 ** attempt)
                            continue
                        if r.status_code == 204:
                            break
                        if r.status_code < 500 or attempt == PART_TRIES - 1:
                            raise self._error(r)
                    done = min(size, done + len(body))
                    if on_progress:
                        on_progress(path.name, done, size)
                up = self._json("GET", f"/api/v1/uploads/{up['id']}")
        data: dict[str, Any] = self._json("POST", f"/api/v1/uploads/{up['id']}/complete", timeout=timeout)
        if data.get("sha256") != digest:
            raise ChecksumMismatch(f"the server stored {path.name} with SHA-256 {data.get('sha256')}, but the file's "
                                   f"is {digest}: it changed while uploading, or was damaged on the way")
        return data

    # -- jobs ------------------------------------------------------------------------------------------------

    def submit(self, model_id: str, recipe: str = "int8_static", *, calibration_dataset_id: str | None = None,
               eval_dataset_id: str | None = None, options: Mapping[str, Any] | None = None,
               accuracy_target: Mapping[str, Any] | None = None, callback_url: str | None = None,
               device: str | None = None) -> Job:
        body: dict[str, Any] = {"model_id": model_id, "recipe": recipe, "options": dict(options or {})}
        for key, value in (("calibration_dataset_id", calibration_dataset_id), ("eval_dataset_id", eval_dataset_id),
                           ("accuracy_target", dict(accuracy_target) if accuracy_target else None),
                           ("callback_url", callback_url), ("device", device)):
            if value is not None:
                body[key] = value
        return Job.from_json(self._json("POST", "/api/v1/jobs", json=body))

    def job(self, job_id: str) -> Job:
        return Job.from_json(self._json("GET", f"/api/v1/jobs/{job_id}"))

    def resolve_job_id(self, job_id: str) -> str:
        """The full id of the job whose id is ``job_id`` or starts with it (at least 8 characters, as the pages
        show ids). Raises ApiError ``job_not_found`` when no job matches, LowbitClientError ``ambiguous_job_id``
        when several do, and ``invalid_job_id`` for text that cannot begin an id."""
        text = job_id.strip().lower()
        if _JOB_ID.match(text):
            return text
        if not _JOB_ID_PREFIX.match(text):
            raise LowbitClientError(
                f"'{job_id}' is not a job id: give the whole id or its first {JOB_ID_MIN_PREFIX} characters or more "
                "(as the job pages and 'lowbit jobs' show it)", code="invalid_job_id")
        page = self._json("GET", "/api/v1/jobs", params={"id_prefix": text, "limit": 5})
        # Filtered here too: a server without the id_prefix filter answers with its newest jobs.
        matches = [str(j["id"]) for j in page.get("items") or [] if str(j.get("id", "")).startswith(text)]
        if not matches:
            raise ApiError(f"no job id starts with '{text}' (lowbit jobs lists them)", code="job_not_found",
                           status_code=404)
        if len(matches) > 1:
            more = " and more" if page.get("next_cursor") else ""
            raise LowbitClientError(f"'{text}' is the beginning of several job ids ({', '.join(matches)}{more}); "
                                    "give more characters", code="ambiguous_job_id")
        return matches[0]

    def jobs(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> tuple[list[Job],
                                                                                                   str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None on the last)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        page = self._json("GET", "/api/v1/jobs", params=params)
        return [Job.from_json(j) for j in page["items"]], page.get("next_cursor")

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"/api/v1/jobs/{job_id}/cancel"))

    def report(self, job_id: str) -> dict[str, Any]:
        report: dict[str, Any] = self._json("GET", f"/api/v1/jobs/{job_id}/report")
        return report

    def events(self, job_id: str) -> Iterator[Event]:
        """The job's server-sent events (stage, job, end, gone) as they come; ends after ``end`` or ``gone``."""
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 120.0))
        try:
            with self._http.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=timeout,
                                   headers={"Accept": "text/event-stream"}) as r:
                if r.status_code != 200:
                    r.read()
                    err = self._error(r)
                    if err.code == "job_not_found":
                        raise err
                    raise _NoStream(str(err))
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    raise _NoStream(f"the events endpoint answered {r.headers.get('content-type')}")
                for ev in parse_sse(r.iter_lines()):
                    yield ev
                    if ev.event in ("end", "gone"):
                        return
        except httpx.TransportError as exc:
            raise _NoStream(f"{type(exc).__name__}: {exc}") from exc

    def wait(self, job_id: str, *, timeout: float | None = None, on_job: JobFn | None = None,
             on_stage: StageFn | None = None) -> Job:
        """Follow the job until it finishes and return it (whatever its end state): through its event stream,
        or by polling when the stream is not available. ``on_stage`` gets each stage once, in order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: list[str] = []

        def stage(name: str | None) -> None:
            if name and name not in seen:
                seen.append(name)
                if on_stage:
                    on_stage(name)

        def check_deadline() -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} did not finish within {timeout} s; it keeps running "
                                  f"(lowbit status {job_id})")

        for _ in range(5):  # a stream that ends early (a restart, a proxy's time limit) is reopened
            try:
                for ev in self.events(job_id):
                    check_deadline()
                    if ev.event == "stage" and isinstance(ev.data, dict):
                        stage(ev.data.get("stage"))
                    elif ev.event in ("job", "end") and isinstance(ev.data, dict):
                        job = Job.from_json(ev.data)
                        stage(job.stage)
                        if on_job:
                            on_job(job)
                        if ev.event == "end":
                            return job
                    elif ev.event == "gone":
                        raise ApiError(f"job {job_id} was deleted", code="job_not_found", status_code=404)
            except _NoStream:
                break
            check_deadline()
        last: tuple[Any, ...] | None = None
        while True:
            job = self.job(job_id)
            stage(job.stage)
            if (job.status, job.stage, job.progress) != last:
                last = (job.status, job.stage, job.progress)
                if on_job:
                    on_job(job)
            if job.finished:
                return job
            check_deadline()
            time.sleep(self.poll_interval)

    def download(self, job_id: str, path: str | os.PathLike[str], on_progress: TransferFn | None = None) -> Download:
        """Download a succeeded job's quantized model to ``path`` (a file, or a folder to put the server's file
        name in). The bytes' SHA-256 must equal the ETag the server sent; otherwise ChecksumMismatch is raised
        and nothing is written."""
        dest = Path(path)
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 600.0))
        tmp: Path | None = None
        try:
            with self._http.stream("GET", f"/api/v1/jobs/{job_id}/artifact", timeout=timeout,
                                   headers={"Accept": "application/octet-stream"}) as r:
                if r.status_code != 200:
                    r.read()
                    raise self._error(r)
                expected = etag_sha256(r.headers.get("etag"))
                if expected is None:
                    raise ChecksumMismatch(f"the server sent no SHA-256 ETag for job {job_id}'s artifact "
                                           f"(got {r.headers.get('etag')!r}), so the download cannot be verified; "
                                           "nothing was written", code="checksum_missing")
                served = _filename_from(r.headers.get("content-disposition"), f"{job_id}.onnx")
                if dest.is_dir():
                    dest = dest / served
                elif served.endswith(".zip") and dest.suffix.lower() == ".onnx":
                    # A model with external data comes as a .zip of model.onnx and its data file.
                    dest = dest.with_suffix(".zip")
                total = int(r.headers.get("content-length") or 0)
                tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
                h = hashlib.sha256()
                done = 0
                with open(tmp, "wb") as out:
                    for chunk in r.iter_bytes(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if on_progress:
                            on_progress(dest.name, done, max(total, done))
            digest = h.hexdigest()
            if digest != expected:
                raise ChecksumMismatch(
                    f"the downloaded artifact of job {job_id} does not match the server's checksum (ETag sha256 "
                    f"{expected}, received {done} bytes with sha256 {digest}); it was damaged on the way and "
                    f"{dest} was not written. Download it again")
            os.replace(tmp, dest)
            tmp = None
            return Download(dest, digest, done)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        except OSError as exc:
            raise LowbitClientError(f"cannot write {dest}: {exc}", code="cannot_write") from exc
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    # -- everything at once ----------------------------------------------------------------------------------

    def quantize(self, model: str | os.PathLike[str], *, calib: str | os.PathLike[str] | None = None,
                 eval: str | os.PathLike[str] | None = None, recipe: str = "int8_static",
                 options: Mapping[str, Any] | None = None, accuracy_target: Mapping[str, Any] | None = None,
                 callback_url: str | None = None, device: str | None = None, wait: bool = True,
                 timeout: float | None = None, on_upload: TransferFn | None = None,
                 on_submit: JobFn | None = None, on_job: JobFn | None = None,
                 on_stage: StageFn | None = None) -> Result:
        """Upload the model and data (skipping files the server already has), submit the job and, with
        ``wait``, follow it to its end. Raises JobFailed (with the job's error code and message) or
        JobCancelled unless it succeeded; the result then holds the report and downloads the model."""
        m = self.upload_model(model, on_progress=on_upload)
        c = self.upload_dataset(calib, on_progress=on_upload) if calib is not None else None
        e = self.upload_dataset(eval, on_progress=on_upload) if eval is not None else None
        job = self.submit(m.id, recipe, calibration_dataset_id=c.id if c else None,
                          eval_dataset_id=e.id if e else None, options=options, accuracy_target=accuracy_target,
                          callback_url=callback_url, device=device)
        if on_submit:
            on_submit(job)
        result = Result(self, job)
        return result.wait(timeout=timeout, on_job=on_job, on_stage=on_stage) if wait else result
