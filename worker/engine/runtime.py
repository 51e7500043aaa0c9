"""ONNX Runtime sessions: one place that picks the execution provider and thread count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError


def select_providers(device: str = "auto") -> list[str]:
    """CUDA when asked for or available (device='auto'), else CPU. CPU is always the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and device in ("auto", "cuda", "gpu"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device in ("cuda", "gpu"):
        raise EngineError(
            "gpu_unavailable",
            "the job asked for a GPU but this worker's ONNX Runtime has no CUDA execution provider "
            f"(available: {', '.join(available)})",
        )
    return ["CPUExecutionProvider"]


def make_session(model: Path | bytes, providers: list[str], threads: int, what: str = "model") -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        src = str(model) if isinstance(model, Path) else model
        return ort.InferenceSession(src, sess_options=so, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(
            "model_not_runnable",
            f"ONNX Runtime cannot load the {what}: {msg[:600]}",
        ) from exc


def run(session: Any, feed: dict[str, Any], what: str = "model") -> list[Any]:
    try:
        return list(session.run(None, feed))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError("model_run_failed", f"ONNX Runtime failed to run the {what}: {msg[:600]}") from exc
