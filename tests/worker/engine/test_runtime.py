"""Execution provider choice. CUDA cannot run on the test machines, so ONNX Runtime's list of
available providers (an edge we do not own) is replaced for the GPU cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from worker.engine.errors import EngineError
from worker.engine.runtime import provider_options, select_providers


def test_cpu_only_machine() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the CPU-only case is covered elsewhere")
    assert select_providers("auto") == ["CPUExecutionProvider"]
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(EngineError) as e:
        select_providers("cuda")
    assert e.value.code == "gpu_unavailable"


def test_cuda_is_preferred_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert select_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cpu") == ["CPUExecutionProvider"]


def test_cuda_runs_in_plain_fp32() -> None:
    # TF32 matrix products would make a GPU worker's ranges differ from a CPU worker's.
    opts = dict(provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert opts["CUDAExecutionProvider"]["use_tf32"] == "0"
    assert opts["CPUExecutionProvider"] == {}
    assert provider_options(["CPUExecutionProvider"]) == [("CPUExecutionProvider", {})]


# Run in a fresh interpreter, whose heap holds nothing else: 400 blocks of 100 kB (below glibc's mmap threshold,
# so they come from the heap), all freed but the last, which keeps the heap's top in use so that free() alone
# cannot shrink it.
_HELD = """
from worker.engine import runtime

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20

blocks = [bytearray(100_000) for _ in range(400)]
for b in blocks:
    b[::4096] = b"\\x01" * len(b[::4096])  # touch every page
keep = blocks[-1]
del blocks
held = rss()
runtime.release_freed_memory()
print(held, rss())
"""


def test_memory_freed_between_stages_goes_back_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", _HELD], capture_output=True, text=True, check=True)
    held, after = map(float, out.stdout.split())
    # Measured: 84 MB held after the free, 46 MB after the release (the 38 MB of freed blocks).
    assert held - after > 30, (held, after)


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def test_ort_quantization_imports_without_onnx_reference_and_float8_still_works() -> None:
    # A fresh interpreter: this one may hold onnx.reference already.
    line = _fresh(
        "import sys, json, numpy as np, onnx\n"
        "from worker.engine import runtime\n"
        "q = runtime.ort_quantization()\n"
        "held = 'onnx.reference' in sys.modules\n"
        "from onnxruntime.quantization import quant_utils\n"
        # float8 goes through the stand-in, which imports the real evaluator when called
        "f8 = quant_utils.quantize_nparray(onnx.TensorProto.FLOAT8E4M3FN, np.array([1.0, 2.5, -3.0], np.float32),"
        " np.array(0.5, np.float32), 0)\n"
        "import onnx.reference\n"
        "real = onnx.reference.ReferenceEvaluator.__module__\n"
        "print(json.dumps([held, q.__name__, f8.astype(np.float32).tolist(), real]))"
    )
    held, name, f8, real = json.loads(line)
    assert held is False
    assert name == "onnxruntime.quantization"
    assert f8 == [2.0, 5.0, -6.0]
    assert real == "onnx.reference.reference_evaluator"


@pytest.mark.parametrize("recipe", ["int8_static", "int8_dynamic"])
def test_a_quantize_run_never_builds_onnx_reference(recipe: str, zoo: dict[str, Path], tmp_path: Path) -> None:
    argv = ["lowbit", "quantize", str(zoo["mlp"]), "--calib", str(zoo["mlp_data"]), "--recipe", recipe, "-o",
            str(tmp_path / "q.onnx"), "--threads", "1", "--device", "cpu"]
    line = _fresh(
        "import sys\n"
        "from app.cli import main\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('onnx.reference' in sys.modules, 'onnxruntime.quantization' in sys.modules)"
    )
    assert line == "False True"
    assert (tmp_path / "q.onnx").exists()
