"""Calibration on the CUDA execution provider against the CPU: the same results?

    .venv/bin/python benchmarks/calibration_devices.py            # needs onnxruntime-gpu and a GPU
    .venv/bin/python benchmarks/calibration_devices.py --samples 32 --models conv

A worker with a GPU calibrates and validates on CUDA, one without on the CPU; a job must not come out
differently depending on which worker took it. For the calibration benchmark's two models (a 20M+
parameter transformer over int64 token ids and a 224x224 conv net) and each method, this runs
lowbit's calibrator once with the CPU provider and once with CUDA on the same samples, and prints

- the time of each (the GPU's is a side note, not a target);
- the largest relative difference between the two sets of ranges as the quantizer uses them;
- the SQNR (dB) against fp32 of the model quantized with each set of ranges, on held-out samples
  (evaluated on the CPU, so only the ranges differ).

Then it runs the whole int8_static pipeline (calibration, quantization, validation) on the conv net with
device=cuda and device=cpu and compares the artifacts' scales and the reports' accuracy figures.
Without a CUDA provider it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("calibration_bench", ROOT / "benchmarks" / "calibration.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def max_rel_diff(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> float:
    common = set(a) & set(b)
    if set(a) != set(b):
        return float("inf")
    return max((abs(a[t][i] - b[t][i]) / max(abs(a[t][i]), abs(b[t][i]), 1e-12) for t in common for i in (0, 1)),
               default=0.0)


def scales(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer
            if i.name.endswith("_scale")}


def calibrations(kind: str, n: int, holdout: int, threads: int, work: Path) -> None:
    import onnx

    from worker.engine.calibrate import CalibrationSettings, calibrate, effective_ranges, select_tensors
    from worker.engine.normalize import normalize

    raw = (bench.build_transformer if kind == "transformer" else bench.build_conv)(work / f"{kind}.onnx")
    model = normalize(raw, work / f"{kind}-prep", per_channel=True).path
    data = bench.build_data(kind, work / f"{kind}.npz", n + holdout)
    bench.HOLDOUT = holdout  # type: ignore[attr-defined]  # calibration.py's module global, loaded by path
    proto = onnx.load(str(model))
    tensors = select_tensors(proto)
    print(f"\n== {kind}: {model.stat().st_size / 1e6:.1f} MB, {len(tensors)} tensors, {n} samples, "
          f"holdout {holdout}")
    print(f"{'method':<11} {'CPU s':>7} {'CUDA s':>7} {'max rel range diff':>19} {'SQNR CPU':>9} {'SQNR CUDA':>10}")
    for method in ("minmax", "entropy", "percentile", "mse"):
        got: dict[str, Any] = {}
        for name, providers in (("cpu", CPU), ("cuda", CUDA)):
            t0 = time.perf_counter()
            res = calibrate(model, tensors, bench._batches(model, data, 0, n), CalibrationSettings(method), providers,
                            threads, total_samples=n, model=proto)
            got[name] = (time.perf_counter() - t0, effective_ranges(proto, res.ranges))
        diff = max_rel_diff(got["cpu"][1], got["cuda"][1])
        s_cpu = bench.sqnr_with(model, data, n + holdout, got["cpu"][1], work)
        s_gpu = bench.sqnr_with(model, data, n + holdout, got["cuda"][1], work)
        print(f"{method:<11} {got['cpu'][0]:>7.2f} {got['cuda'][0]:>7.2f} {diff:>19.2e} {s_cpu:>9.3f} {s_gpu:>10.3f}",
              flush=True)


def pipeline(n: int, work: Path) -> None:
    from worker.engine.config import QuantizeConfig
    from worker.engine.pipeline import run

    model = bench.build_conv(work / "pipe.onnx")
    data = bench.build_data("conv", work / "pipe.npz", n)
    out: dict[str, Any] = {}
    for device in ("cpu", "cuda"):
        t0 = time.perf_counter()
        res = run(QuantizeConfig(model_path=model, output_path=work / f"pipe-{device}.onnx", recipe="int8_static",
                                 calibration_path=data, work_dir=work / f"pipe-{device}", threads=8,
                                 device="cpu" if CUDA == CPU else device))
        out[device] = (time.perf_counter() - t0, res)
    a, b = scales(out["cpu"][1].artifact_path), scales(out["cuda"][1].artifact_path)
    worst = max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(a[k]), 1e-30))) for k in a) if set(a) == set(b) \
        else float("inf")
    print(f"\n== int8_static pipeline, conv net, {n} calibration samples")
    for device, (secs, res) in out.items():
        acc = res.report["accuracy"]["outputs"][0]
        print(f"{device:<5} {secs:6.1f} s  validated on {res.report['latency']['provider']:<24} "
              f"cosine {acc.get('cosine')}  sqnr_db {acc.get('sqnr_db')}  sha256 {res.artifact_sha256[:12]}")
    print(f"scale initializers: {len(a)}; largest relative difference CPU vs CUDA {worst:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--holdout", type=int, default=32)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--models", default="conv,transformer")
    ap.add_argument("--cpu-twice", action="store_true", help="compare the CPU with itself (tries the script here)")
    args = ap.parse_args()
    global CUDA
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401  (loads the CUDA libraries ONNX Runtime's CUDA provider links against)
    import onnxruntime as ort

    from worker.engine.runtime import select_providers

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    print(f"onnxruntime {ort.__version__}; available {ort.get_available_providers()}; "
          f"select_providers('auto') = {select_providers('auto')}")
    if args.cpu_twice:
        CUDA = CPU
    elif "CUDAExecutionProvider" not in ort.get_available_providers():
        print("no CUDA execution provider here: nothing to compare")
        sys.exit(2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-devices-") as tmp:
        work = Path(tmp)
        for kind in args.models.split(","):
            calibrations(kind, args.samples, args.holdout, args.threads, work)
        pipeline(args.samples, work)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
