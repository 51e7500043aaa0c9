"""What a quantizing process holds before it quantizes anything: peak RSS after its imports and its first ONNX
Runtime session, each setup in a fresh Python process.

    .venv/bin/python benchmarks/import_floor.py [MODEL.onnx]

The rows: ONNX Runtime's own quantizer's imports (``onnxruntime.quantization``, which brings numpy, onnx and ONNX
Runtime), then with one session on MODEL (default: the corpus' openWakeWord hey-jarvis model, when the corpus is
built); lowbit's engine pipeline (what ``lowbit quantize`` imports before a job), then with the quantizer it
calls too, imported the way the engine imports it (``runtime.ort_quantization``: without ``onnx.reference``).
This is the floor under the peak of any job on a small model: benchmarks/zoo.py compares whole jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("LOWBIT_ZOO_DIR", Path.home() / ".cache/lowbit/zoo"))
DEFAULT_MODEL = ZOO / "corpus/oww_hey_jarvis/model.onnx"

SESSION = ("import onnxruntime as ort; so = ort.SessionOptions(); so.intra_op_num_threads = 2; "
           "ort.InferenceSession({model!r}, so, providers=['CPUExecutionProvider'])")
ENGINE = "import worker.engine.pipeline, worker.engine.runtime; worker.engine.runtime.ort_quantization()"
SETUPS = {
    "onnxruntime.quantization": "import onnxruntime.quantization",
    "onnxruntime.quantization + one session": "import onnxruntime.quantization; " + SESSION,
    "worker.engine.pipeline": "import worker.engine.pipeline",
    "worker.engine.pipeline + its quantizer import": ENGINE,
    "both + one session": ENGINE + "; " + SESSION,
}
PEAK = "; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"


def main() -> int:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL
    if not model.is_file():
        print(f"no model at {model}: build the corpus (python -m tests.zoo.corpus) or name an .onnx file")
        return 2
    print(f"peak RSS of a fresh process (session: {model.name}, 2 threads)")
    for label, code in SETUPS.items():
        out = subprocess.run([sys.executable, "-c", code.format(model=str(model)) + PEAK], cwd=ROOT,
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"  {label:<52} {float(out.stdout.split()[-1]):6.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
