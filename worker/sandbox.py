"""Run untrusted work (parsing a model, ONNX Runtime sessions, quantization) in a child process with limits.

The worker's side of ``worker.engine.subprocess_runner``, the one child runner (a ``.pt2`` upload's PyTorch
child goes through it too): the child is started fresh, never forked, with an environment allow-list (no
secrets), its own address-space, CPU-time and file-size limits, a wall clock enforced by the parent, and
it dies with its parent. A model that segfaults, hangs or balloons then ends its own job with a specific
error code, and the worker process lives on to run the next job. Results come back as size-bounded JSON,
never pickles. This module adds the engine's entry point in the child (``quantize``) and the way its result
is read back (``result_from``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from worker.engine.files import temp_in
from worker.engine.subprocess_runner import (
    EVENT_INTERVAL_S,
    MAX_MESSAGE_BYTES,
    ORT_TELEMETRY_OFF,
    TICK_S,
    ChildFailed,
    Emit,
    Limits,
    absolute_paths,
    child_env,
    disk_full,
    drop_spares,
    out_of_memory,
    prctl,
    run,
    spare_pids,
)

__all__ = [
    "EVENT_INTERVAL_S", "MAX_MESSAGE_BYTES", "ORT_TELEMETRY_OFF", "TICK_S", "ChildFailed", "Emit", "Limits",
    "absolute_paths", "child_env", "disk_full", "drop_spares", "out_of_memory", "prctl", "quantize", "result_from",
    "run", "spare_pids",
]


def quantize(cfg: Any, emit: Emit) -> Any:
    """The engine's entry point in the child: ``pipeline.run(cfg)``, its progress sent to the parent, its
    QuantizeResult returned as a dict (see ``result_from``)."""
    from worker.engine import pipeline  # lazy: loaded in the sandbox child, which runs the engine

    temp_in(cfg.work_dir)

    def progress(stage: str, fraction: float) -> None:
        emit((stage, float(fraction)))

    return dataclasses.asdict(pipeline.run(cfg, progress))


def result_from(data: dict[str, Any]) -> Any:
    """The QuantizeResult a ``quantize`` child sent back (as JSON)."""
    # lazy: the engine's pipeline loads ONNX Runtime, kept out of the worker's main process
    from worker.engine.pipeline import QuantizeResult

    return QuantizeResult(**{**data, "artifact_path": Path(data["artifact_path"])})
