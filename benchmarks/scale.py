"""A model of several gigabytes with external data, through the service: upload, int4, int8_dynamic, fp16, download.

    .venv/bin/python benchmarks/scale.py --out /tmp/lowbit-scale [--layers 15] [--setups embedded,production]

The model is built here, one tensor at a time, straight into its data file: a decoder with a 32000-token
embedding, N pre-norm blocks (multi-head attention with a causal mask over a fixed 32-token window, a SiLU-gated
MLP), a final norm and an lm_head tied to the embedding table (MatMul over Transpose(table)). Hidden 2048, MLP
5632, 16 heads: at 15 blocks, 835 M parameters, 3.34 GB of float32. Weights have per-output-channel scales
spread over two orders of magnitude and a few input rows 20x larger (outlier channels).

For each setup (embedded: `lowbit serve` with SQLite and its own worker; production: `lowbit serve --no-worker`
and a `lowbit worker` on PostgreSQL and Redis) it times the resumable upload of the bundle through the Python
client and reads the API process's peak resident memory, runs int4_weight_only (rtn and the calibrated
clip_search, lm_head in 8 bits) and (embedded only) int4 with 4-bit embeddings (the tied table stored once),
int8_dynamic and fp16, and reads from each job's report the engine process's wall time and peak memory, the
calibrating process's (clip_search's statistics pass) and the validating process's. Each artifact is
downloaded, unzipped and run in ONNX Runtime on held-out token sequences, the original then the quantized
model, each in its own process: cosine of the last token's logits
and next-token top-1 agreement. ONNX Runtime's own MatMulNBitsQuantizer runs on the same file in a child
process for comparison (time, peak memory, whether it completes). Everything printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, HIDDEN, MLP, HEADS, SEQ = 32000, 2048, 5632, 16, 32
ROOT = Path(__file__).resolve().parents[1]


# -- the model ---------------------------------------------------------------------------------------------------

def build(folder: Path, layers: int, seed: int = 0) -> Path:
    """Write model.onnx and model.onnx.data into ``folder``, one tensor (in row slabs) at a time."""
    import onnx
    from onnx import TensorProto, helper

    from worker.engine.external import DataWriter, point_to

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    writer = DataWriter(folder / "model.onnx.data")
    inits: list[TensorProto] = []

    def external(name: str, shape: tuple[int, ...], fill: Any) -> None:
        """A float32 tensor whose rows ``fill(r0, r1)`` makes, written a slab at a time."""
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        start = writer._align()
        step = max(1, (16 << 20) // (4 * int(np.prod(shape[1:], dtype=np.int64))))
        for r0 in range(0, shape[0], step):
            rows = np.ascontiguousarray(fill(r0, min(shape[0], r0 + step)), dtype=np.float32)
            writer.file.write(rows.tobytes())
            writer.pos += rows.nbytes
        from worker.engine.external import ExternalRef

        point_to(t, ExternalRef(writer.path.name, start, writer.pos - start))
        inits.append(t)

    def inline(name: str, a: np.ndarray) -> None:
        inits.append(onnx.numpy_helper.from_array(a, name))

    def weight(name: str, k: int, n: int) -> None:
        scales = np.geomspace(0.02, 2.0, n).astype(np.float32)
        rng.shuffle(scales)
        outliers = set(rng.choice(k, max(1, k // 512), replace=False).tolist())

        def fill(r0: int, r1: int) -> np.ndarray:
            rows = rng.standard_normal((r1 - r0, n), dtype=np.float32) * (scales / np.float32(np.sqrt(k)))
            for r in outliers:
                if r0 <= r < r1:
                    rows[r - r0] *= 20.0
            return rows
        external(name, (k, n), fill)

    external("embed.weight", (VOCAB, HIDDEN),
             lambda r0, r1: rng.standard_normal((r1 - r0, HIDDEN), dtype=np.float32) * np.float32(0.5))
    ones, zeros = np.ones(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32)
    inline("ln.scale", ones)
    inline("ln.bias", zeros)
    inline("heads.shape", np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64))
    inline("hidden.shape", np.array([0, 0, HIDDEN], np.int64))
    inline("att.scale", np.array(1.0 / np.sqrt(HIDDEN // HEADS), np.float32))
    inline("causal", np.triu(np.full((SEQ, SEQ), -1e4, np.float32), 1))
    n = helper.make_node
    nodes = [n("Gather", ["embed.weight", "input_ids"], ["h0"], name="embed")]
    h = "h0"
    for i in range(layers):
        p = f"layers.{i}"
        for w, (k, m) in {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN),
                          "o": (HIDDEN, HIDDEN), "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP),
                          "down": (MLP, HIDDEN)}.items():
            weight(f"{p}.{w}.weight", k, m)
        nodes += [
            n("LayerNormalization", [h, "ln.scale", "ln.bias"], [f"{p}.x"], name=f"{p}.ln1", axis=-1),
            *[n("MatMul", [f"{p}.x", f"{p}.{w}.weight"], [f"{p}.{w}"], name=f"{p}.attn.{w}") for w in "qkv"],
            *[n("Reshape", [f"{p}.{w}", "heads.shape"], [f"{p}.{w}4"], name=f"{p}.attn.{w}_heads") for w in "qkv"],
            n("Transpose", [f"{p}.q4"], [f"{p}.qh"], name=f"{p}.attn.q_t", perm=[0, 2, 1, 3]),
            n("Transpose", [f"{p}.k4"], [f"{p}.kh"], name=f"{p}.attn.k_t", perm=[0, 2, 3, 1]),
            n("Transpose", [f"{p}.v4"], [f"{p}.vh"], name=f"{p}.attn.v_t", perm=[0, 2, 1, 3]),
            n("MatMul", [f"{p}.qh", f"{p}.kh"], [f"{p}.s"], name=f"{p}.attn.scores"),
            n("Mul", [f"{p}.s", "att.scale"], [f"{p}.ss"], name=f"{p}.attn.scale"),
            n("Add", [f"{p}.ss", "causal"], [f"{p}.sm"], name=f"{p}.attn.mask"),
            n("Softmax", [f"{p}.sm"], [f"{p}.pr"], name=f"{p}.attn.softmax", axis=-1),
            n("MatMul", [f"{p}.pr", f"{p}.vh"], [f"{p}.c"], name=f"{p}.attn.context"),
            n("Transpose", [f"{p}.c"], [f"{p}.ct"], name=f"{p}.attn.c_t", perm=[0, 2, 1, 3]),
            n("Reshape", [f"{p}.ct", "hidden.shape"], [f"{p}.c2"], name=f"{p}.attn.merge"),
            n("MatMul", [f"{p}.c2", f"{p}.o.weight"], [f"{p}.o"], name=f"{p}.attn.o"),
            n("Add", [h, f"{p}.o"], [f"{p}.h1"], name=f"{p}.attn.residual"),
            n("LayerNormalization", [f"{p}.h1", "ln.scale", "ln.bias"], [f"{p}.x2"], name=f"{p}.ln2", axis=-1),
            n("MatMul", [f"{p}.x2", f"{p}.gate.weight"], [f"{p}.g"], name=f"{p}.mlp.gate"),
            n("MatMul", [f"{p}.x2", f"{p}.up.weight"], [f"{p}.u"], name=f"{p}.mlp.up"),
            n("Sigmoid", [f"{p}.g"], [f"{p}.gs"], name=f"{p}.mlp.sigmoid"),
            n("Mul", [f"{p}.g", f"{p}.gs"], [f"{p}.silu"], name=f"{p}.mlp.silu"),
            n("Mul", [f"{p}.silu", f"{p}.u"], [f"{p}.a"], name=f"{p}.mlp.gated"),
            n("MatMul", [f"{p}.a", f"{p}.down.weight"], [f"{p}.d"], name=f"{p}.mlp.down"),
            n("Add", [f"{p}.h1", f"{p}.d"], [f"{p}.h2"], name=f"{p}.mlp.residual"),
        ]
        h = f"{p}.h2"
    nodes += [
        n("LayerNormalization", [h, "ln.scale", "ln.bias"], ["hf"], name="final_norm", axis=-1),
        n("Transpose", ["embed.weight"], ["embed.weight_T"], name="lm_head.transpose", perm=[1, 0]),
        n("MatMul", ["hf", "embed.weight_T"], ["logits"], name="lm_head"),
    ]
    writer.close()
    graph = helper.make_graph(
        nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SEQ, VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


def bundle(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in ("model.onnx", "model.onnx.data"):
            zf.write(folder / name, name)
    return dest


# -- measuring processes -----------------------------------------------------------------------------------------

def vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


_LOGITS_CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
from worker.engine.streaming import peak_rss_mb
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
t0 = time.monotonic()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
load_s = time.monotonic() - t0
ids = np.load(sys.argv[2])["input_ids"]
last = np.concatenate([s.run(None, {"input_ids": ids[i:i + 1]})[0][:, -1] for i in range(len(ids))])
np.save(sys.argv[3], last)
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "load_s": load_s}))
"""


def last_token_logits(model: Path, ids: Path, out: Path) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", _LOGITS_CHILD, str(model), str(ids), str(out)], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def fidelity(ref: Path, got: Path) -> dict[str, float]:
    a, b = np.load(ref), np.load(got)
    cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"last_token_cosine_mean": round(float(cos.mean()), 5), "last_token_cosine_min": round(float(cos.min()), 5),
            "next_token_top1_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4),
            "sequences": int(len(a))}


_ORT_CHILD = r"""
import json, sys, time
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from worker.engine.streaming import peak_rss_mb
t0 = time.monotonic()
model = onnx.load(sys.argv[1])
q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
q.process()
onnx.save_model(q.model.model, sys.argv[2], save_as_external_data=True, location="ort.onnx.data")
print(json.dumps({"seconds": round(time.monotonic() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}))
"""


def ort_quantizer(model: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _ORT_CHILD, str(model), str(out / "ort.onnx")], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"completed": False, "seconds": round(time.monotonic() - t0, 1),
                "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {"completed": True, **json.loads(r.stdout.strip().splitlines()[-1])}


# -- the service -------------------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}
    env.update({"LOWBIT_DATA_DIR": str(data), "LOWBIT_WORKER_THREADS": "2", "LOWBIT_WORKER_DEVICE": "cpu",
                "PYTHONUNBUFFERED": "1", **extra})
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server died:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise SystemExit(f"the server did not become ready:\n{log.read_text()[-3000:]}")


def run_setup(name: str, work: Path, src: Path, zipped: Path, calib: Path, held_out: Path,
              recipes: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    from app.client import Client

    data = work / f"{name}-data"
    procs: list[subprocess.Popen[bytes]] = []
    port = _free_port()
    if name == "embedded":
        env = _env(data)
        api = _start(["serve", "--port", str(port)], env, work / f"{name}-serve.log")
        procs.append(api)
    else:
        import sqlalchemy as sa

        db = f"lowbit_scale_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(os.environ.get("LOWBIT_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
                                 isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{db}"'))
        url = admin.url.set(database=db).render_as_string(hide_password=False)
        env = _env(data, LOWBIT_DATABASE_URL=url, LOWBIT_BROKER_URL=os.environ.get(
            "LOWBIT_BENCH_REDIS", "redis://127.0.0.1:6379/0"))
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        procs.append(_start(["worker", "--queues", "cpu", "--concurrency", "1"], env, work / f"{name}-worker.log"))
        api = _start(["serve", "--port", str(port), "--no-worker", "--no-migrate"], env, work / f"{name}-serve.log")
        procs.append(api)
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"setup": name}
    try:
        _wait_ready(url, api, work / f"{name}-serve.log")
        before = vm_hwm_mb(api.pid)
        with Client(url, timeout=600) as c:
            t0 = time.monotonic()
            model = c.upload_model(zipped)
            up_s = time.monotonic() - t0
            size = zipped.stat().st_size
            out["upload"] = {"bytes": size, "seconds": round(up_s, 1), "mb_per_s": round(size / 2**20 / up_s, 1),
                             "api_peak_rss_mb_before": round(before, 1),
                             "api_peak_rss_mb": round(vm_hwm_mb(api.pid), 1)}
            ds = c.upload_dataset(calib)
            out["jobs"] = []
            for i, (recipe, options) in enumerate(recipes):
                t0 = time.monotonic()
                job = c.submit(model.id, recipe, calibration_dataset_id=ds.id, options=options)
                done = c.wait(job.id, timeout=7200)
                wall = time.monotonic() - t0
                if done.status != "succeeded":
                    out["jobs"].append({"recipe": recipe, "status": done.status, "error": done.raw.get("error")})
                    continue
                report = c.report(job.id)
                tag = f"{name}-{i}-{recipe}"
                art = c.download(job.id, work / f"{tag}.zip")
                unz = work / tag
                with zipfile.ZipFile(art.path) as zf:
                    zf.extractall(unz)
                ref = work / "original_last.npy"
                got = work / f"{tag}_last.npy"
                q_run = last_token_logits(unz / "model.onnx", held_out, got)
                ext, acc = report["external_data"], report["accuracy"]["outputs"][0]
                calibration = report.get("calibration") or {}
                shutil.rmtree(unz)
                art.path.unlink()
                out["jobs"].append({
                    "calibration_s": calibration.get("seconds"),
                    "calibration_peak_rss_mb": calibration.get("peak_rss_mb"),
                    "algorithm": report["options"].get("algorithm"),
                    "recipe": recipe, "options": options, "status": "succeeded", "job_wall_s": round(wall, 1),
                    "quantized_bytes": report["size"]["quantized_bytes"], "ratio": report["size"]["ratio"],
                    "bits_per_weight": report["size"]["bits_per_weight"],
                    "quantize_s": ext["quantize_seconds"], "engine_peak_rss_mb": ext["quantize_peak_rss_mb"],
                    "validation_s": ext["validation_seconds"],
                    "validation_peak_rss_mb": ext["validation_peak_rss_mb"],
                    "validation_after_original_peak_rss_mb": ext["validation_original_peak_rss_mb"],
                    "report_cosine": acc.get("cosine"), "report_top1_agreement": acc.get("top1_agreement"),
                    "report_samples": report["accuracy"]["samples"],
                    "latency_ms_p50": [report["latency"]["original_ms_p50"], report["latency"]["quantized_ms_p50"]],
                    "held_out": fidelity(ref, got), "quantized_run_peak_rss_mb": round(q_run["peak_rss_mb"], 1),
                })
                print(json.dumps(out["jobs"][-1]), flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    return out


def markdown(f: dict[str, Any]) -> str:
    """The figures as the README's tables."""
    gb = f["model"]["bytes"] / 1e9
    lines = [f"Model: {f['model']['layers']} blocks, {f['model']['parameters'] / 1e6:.0f} M parameters, "
             f"{gb:.2f} GB float32 with external data ("
             + (f"built in {f['model']['build_s']:.0f} s" if f["model"]["build_s"] >= 1 else "built by an earlier run")
             + "). fp32 on 16 held-out "
             f"sequences: {f['original_run']['peak_rss_mb']:.0f} MB peak in a plain ONNX Runtime session.", "",
             "| setup | upload (zip) | API peak | recipe | size | engine peak (x model) | calibration (peak) "
             "| quantize | validation (peak) | job | last-token cosine mean/min | next-token top-1 "
             "| latency fp32 / quantized |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in f["setups"]:
        up = s["upload"]
        for j in s["jobs"]:
            if j["status"] != "succeeded":
                lines.append(f"| {s['setup']} | | | {j['recipe']} | {j['status']}: {j.get('error')} "
                             "| | | | | | | | |")
                continue
            h = j["held_out"]
            engine_x = j["engine_peak_rss_mb"] * 2**20 / f["model"]["bytes"]
            valid_x = j["validation_peak_rss_mb"] * 2**20 / f["model"]["bytes"]
            calib = "none"
            if j.get("calibration_peak_rss_mb"):
                calib = (f"{j['calibration_s']:.0f} s ({j['calibration_peak_rss_mb']:.0f} MB, "
                         f"{j['calibration_peak_rss_mb'] * 2**20 / f['model']['bytes']:.2f}x)")
            label = j["recipe"] + "".join(
                f", {k}" if v is True else f", {k} {v}" for k, v in j["options"].items())
            lines.append(
                f"| {s['setup']} | {up['seconds']:.0f} s ({up['mb_per_s']:.0f} MB/s) | {up['api_peak_rss_mb']:.0f} MB "
                f"| {label} | {j['quantized_bytes'] / 1e9:.2f} GB ({j['ratio']:.3f}x, {j['bits_per_weight']:.2f} "
                f"bits/weight) | {j['engine_peak_rss_mb']:.0f} MB ({engine_x:.3f}x) | {calib} "
                f"| {j['quantize_s']:.0f} s | {j['validation_s']:.0f} s ({j['validation_peak_rss_mb']:.0f} MB, "
                f"{valid_x:.2f}x) | {j['job_wall_s']:.0f} s "
                f"| {h['last_token_cosine_mean']:.4f} / {h['last_token_cosine_min']:.4f} "
                f"| {h['next_token_top1_agreement']:.3f} "
                f"| {j['latency_ms_p50'][0]:.0f} / {j['latency_ms_p50'][1]:.0f} ms |")
    o = f.get("onnxruntime_matmulnbits")
    if o:
        if o["completed"]:
            h = o.get("held_out", {})
            nan = float("nan")
            lines += ["", f"ONNX Runtime's MatMulNBitsQuantizer (RTN, block 32, symmetric; whole model loaded) on the "
                      f"same file: completed in {o['seconds']:.0f} s, peak {o['peak_rss_mb']:.0f} MB "
                      f"({o['peak_rss_mb'] * 2**20 / f['model']['bytes']:.2f}x the model), "
                      f"{o.get('bytes', 0) / 1e9:.2f} GB; held-out last-token cosine "
                      f"{h.get('last_token_cosine_mean', nan):.4f} / {h.get('last_token_cosine_min', nan):.4f}, "
                      f"next-token top-1 {h.get('next_token_top1_agreement', nan):.3f}."]
        else:
            lines += ["", f"ONNX Runtime's MatMulNBitsQuantizer did not complete ({o['seconds']:.0f} s): {o['error']}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--setups", default="embedded,production")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="use the model and bundle already in --out")
    args = ap.parse_args()
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.reuse and (work / "decoder.zip").exists():
        src, zipped = work / "model" / "model.onnx", work / "decoder.zip"
    else:
        src = build(work / "model", args.layers)
        zipped = bundle(work / "model", work / "decoder.zip")
    model_bytes = sum(os.path.getsize(work / "model" / f) for f in ("model.onnx", "model.onnx.data"))
    build_s = time.monotonic() - t0
    rng = np.random.default_rng(7)
    calib = work / "tokens.npz"
    np.savez(calib, input_ids=rng.integers(0, VOCAB, (24, SEQ)))
    held_out = work / "held_out.npz"
    np.savez(held_out, input_ids=rng.integers(0, VOCAB, (16, SEQ)))
    figures: dict[str, Any] = {"model": {"bytes": model_bytes, "layers": args.layers, "build_s": round(build_s, 1),
                                         "parameters": model_bytes // 4}}
    print(json.dumps(figures), flush=True)
    figures["original_run"] = last_token_logits(src, held_out, work / "original_last.npy")
    print(json.dumps(figures["original_run"]), flush=True)
    recipes: list[tuple[str, dict[str, Any]]] = [("int4_weight_only", {"algorithm": "rtn", "int8_last_matmul": True}),
                                                 ("int4_weight_only", {"algorithm": "clip_search",
                                                                       "int8_last_matmul": True})]
    figures["setups"] = []
    for name in filter(None, args.setups.split(",")):
        extra: list[tuple[str, dict[str, Any]]] = [
            ("int4_weight_only", {"algorithm": "rtn", "quantize_embeddings": True}), ("int8_dynamic", {}),
            ("fp16", {})] if name == "embedded" else []
        figures["setups"].append(run_setup(name, work, src, zipped, calib, held_out, recipes + extra))
    if not args.skip_ort:
        ort_fig = ort_quantizer(src, work / "ort")
        if ort_fig["completed"]:  # the same held-out check as the service's artifacts
            q = work / "ort" / "ort.onnx"
            ort_fig["bytes"] = q.stat().st_size + (work / "ort" / "ort.onnx.data").stat().st_size
            last_token_logits(q, held_out, work / "ort_last.npy")
            ort_fig["held_out"] = fidelity(work / "original_last.npy", work / "ort_last.npy")
        figures["onnxruntime_matmulnbits"] = ort_fig
        print(json.dumps(ort_fig), flush=True)
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(markdown(figures))


if __name__ == "__main__":
    main()
