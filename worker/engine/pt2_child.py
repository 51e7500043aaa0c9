"""What runs in the child process that loads .pt2 archives (``run_child`` in ``worker.engine.pt2`` starts it
through ``worker.engine.subprocess_runner``, as ``worker.engine.pt2_child:COMMAND``).

Runs only on copies that ``worker.engine.pt2.sanitize`` wrote after ``check_archive`` passed. Commands:

- ``inspect``: load the program and describe its tensor inputs and outputs (for the upload response);
- ``export``: export it to ONNX (dynamic axes kept) and check ONNX Runtime against PyTorch on real samples;
- ``qat``: quantization-aware fine-tuning (``worker.engine.qat_torch``), then the same export and check;
- ``adaround``: learned rounding of int8 weights, a group of layers (``worker.engine.adaround_torch``).

Each takes the request (a dict) and an ``emit`` for progress events (dicts), and returns its result as a
JSON-ready dict. A failure of torch's becomes an EngineError with the command's own code; its traceback goes
to the child's log (stderr), whose tail the parent reads when the process dies instead.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.engine.adaround_torch import learn_layers
from worker.engine.errors import EngineError
from worker.engine.pt2 import EXPORT_OPSET
from worker.engine.qat_torch import run_qat
from worker.engine.torch_export import describe, export_onnx, sample_feeds, tensor_infos

Emit = Callable[[dict[str, Any]], None]
FAILURE_CODES = {"inspect": "invalid_model", "export": "export_failed", "qat": "training_failed",
                 "adaround": "quantization_failed"}


def load(path: str) -> Any:
    import torch

    try:
        return torch.export.load(path)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError("invalid_model", f"PyTorch could not load the torch.export archive: {msg[:400]}") from exc


def cmd_inspect(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    import torch


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
    warnings = list(desc.get("warnings", []))  # export_onnx's, e.g. sizes it had to fix
    if source != "dataset":
        warnings.append("the ONNX export was checked against PyTorch on random inputs only (no dataset was given)")
    return {"check": check, "dynamic_dims": desc["dim_names"], "torch": torch.__version__,
            "inputs": desc["inputs"], "outputs": desc["outputs"], "warnings": warnings}


def cmd_qat(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    ep = load(req["model"])
    desc = describe(ep)
    return run_qat(ep, desc, req, emit)


COMMANDS: dict[str, Callable[[dict[str, Any], Emit], dict[str, Any]]] = {
    "inspect": cmd_inspect, "export": cmd_export, "qat": cmd_qat, "adaround": learn_layers,
}


def _command(command: str, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """``command`` on ``req`` with torch's threads set; its result with ``ok`` and the seconds it took."""
    started = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(max(1, int(req.get("threads", 1))))
        out = {"ok": True, **COMMANDS[command](req, emit)}
    except EngineError:
        raise
    except Exception as exc:
        traceback.print_exc()  # to the child's log
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EngineError(FAILURE_CODES.get(command, "torch_failed"),
                          f"PyTorch failed during '{command}' ({type(exc).__name__}: {msg[:400]})") from exc
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


# The entry points ``run_child`` names (``worker.engine.pt2_child:COMMAND``).
def inspect(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    return _command("inspect", req, emit)


def export(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    return _command("export", req, emit)


def qat(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    return _command("qat", req, emit)


def adaround(req: dict[str, Any], emit: Emit) -> dict[str, Any]:
    return _command("adaround", req, emit)
