"""The child process that loads .pt2 archives: ``python -m worker.engine.pt2_child COMMAND REQUEST.json``.

Runs only on copies that ``worker.engine.pt2.sanitize`` wrote after ``check_archive`` passed. Commands:

- ``inspect``: load the program and describe its tensor inputs and outputs (for the upload response);
- ``export``: export it to ONNX (dynamic axes kept) and check ONNX Runtime against PyTorch on real samples;
- ``qat``: quantization-aware fine-tuning (``worker.engine.qat_torch``), then the same export and check.

The result is written as JSON to the request's ``result`` path; progress events are JSON lines on stdout.
Everything the process prints itself goes to stderr, which the parent keeps in a log file.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError
from worker.engine.torch_export import describe, export_onnx, sample_feeds, tensor_infos

Emit = Callable[[dict[str, Any]], None]
FAILURE_CODES = {"inspect": "invalid_model", "export": "export_failed", "qat": "training_failed"}


def _limits() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        soft = 64 * (1 << 30)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, soft))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX, or limits already lower
        pass


def load(path: str) -> Any:
    import torch

    try:
        return torch.export.load(path)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError("invalid_model", f"PyTorch could not load the torch.export archive: {msg[:400]}") from exc


def cmd_inspect(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    import torch

    from worker.engine.pt2 import EXPORT_OPSET

    ep = load(req["model"])
    desc = describe(ep)
    return {"opset": EXPORT_OPSET, "inputs": desc["inputs"], "outputs": desc["outputs"],
            "num_nodes": desc["num_nodes"], "producer": f"torch.export (torch {torch.__version__})"}


def cmd_export(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    import torch

    ep = load(req["model"])
    desc = describe(ep)
    emit({"event": "loaded"})
    feeds, source = sample_feeds(tensor_infos(desc["inputs"]), req.get("data"), int(req.get("batch_size", 8)),
                                 int(req.get("check_samples", 64)))
    check = export_onnx(ep, desc, feeds, Path(req["output"]), int(req["opset"]), int(req.get("threads", 1)))
    check["source"] = "calibration samples" if source == "dataset" else "random inputs (no dataset given)"
    warnings = []
    if source != "dataset":
        warnings.append("the ONNX export was checked against PyTorch on random inputs only (no dataset was given)")
    return {"check": check, "dynamic_dims": desc["dim_names"], "torch": torch.__version__,
            "inputs": desc["inputs"], "outputs": desc["outputs"], "warnings": warnings}


def cmd_qat(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    from worker.engine.qat_torch import run_qat

    ep = load(req["model"])
    desc = describe(ep)
    return run_qat(ep, desc, req, emit)


COMMANDS: dict[str, Callable[[dict[str, Any], Emit], dict[str, Any]]] = {
    "inspect": cmd_inspect, "export": cmd_export, "qat": cmd_qat,
}


def main(argv: list[str]) -> int:
    # Events go to the real stdout; anything else printed (by torch, too) goes to stderr.
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _limits()
    command, req_path = argv[1], argv[2]
    req = json.loads(Path(req_path).read_text())
    result_path = Path(req["result"])

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")

    started = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(max(1, int(req.get("threads", 1))))
        out = {"ok": True, **COMMANDS[command](req, emit)}
    except EngineError as exc:
        out = {"ok": False, "code": exc.code, "message": exc.message}
    except Exception as exc:
        traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out = {"ok": False, "code": FAILURE_CODES.get(command, "torch_failed"),
               "message": f"PyTorch failed during '{command}' ({type(exc).__name__}: {msg[:400]})"}
    out["seconds"] = round(time.perf_counter() - started, 3)
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, result_path)
    events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
