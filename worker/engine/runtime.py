"""ONNX Runtime sessions: one place that picks the execution provider and thread count."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import platform
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from worker.engine.errors import EngineError


def _ort_tools_without_torch() -> None:
    """Register the package ``onnxruntime.tools`` without running its ``__init__``, which imports torch whenever
    torch is installed (for a PyTorch export helper lowbit never calls). The quantization pre-processing imports
    ``onnxruntime.tools.symbolic_shape_infer``, so every ONNX job paid for importing torch: 3-9 s, more than the
    whole job on a small model, and a few hundred MB of RSS. Its submodules still import normally."""
    if "onnxruntime.tools" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("onnxruntime.tools")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType("onnxruntime.tools")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__package__ = "onnxruntime.tools"
    sys.modules["onnxruntime.tools"] = package


_ort_tools_without_torch()

_REFERENCE_STAND_INS = ("onnx.reference", "onnx.reference.op_run")


def _reference_evaluator(*args: Any, **kwargs: Any) -> Any:
    from onnx.reference import ReferenceEvaluator  # lazy: see ort_quantization

    return ReferenceEvaluator(*args, **kwargs)


def _to_array_extended(tensor: Any) -> Any:
    # lazy: see ort_quantization (the name is onnx's, untyped there)
    from onnx.reference.op_run import to_array_extended  # type: ignore[attr-defined]

    return to_array_extended(tensor)


def ort_quantization() -> types.ModuleType:
    """``onnxruntime.quantization``, imported once, without the ONNX reference evaluator it never runs for lowbit.

    Its quant_utils and base_quantizer import ``onnx.reference`` at module level, and that import builds a table
    of every ONNX operator schema: 10 MB of the engine's import floor (``benchmarks/import_floor.py``: 83.1 ->
    72.6 MB with the quantizer) and 5 MB of a small model's job (openWakeWord's: 112 -> 107 MB). The two names they
    take from it serve float8 weights only (``ReferenceEvaluator`` to quantize to float8, ``to_array_extended``
    to check a float8 initializer), which no lowbit recipe makes. The package is imported with stand-ins for those
    two names that import the real ones when called (a float8 call still works); the stand-in modules leave
    ``sys.modules`` right after, so a later ``import onnx.reference`` gets the real module. Every
    ``from onnxruntime.quantization... import`` in the engine runs after this call.
    """
    loaded = sys.modules.get("onnxruntime.quantization")
    if loaded is not None:
        return loaded
    placed = [name for name in _REFERENCE_STAND_INS if name not in sys.modules]
    for name in placed:
        sys.modules[name] = types.ModuleType(name)
    reference, op_run = (sys.modules[name] for name in _REFERENCE_STAND_INS)
    if "onnx.reference" in placed:
        reference.ReferenceEvaluator = _reference_evaluator  # type: ignore[attr-defined]
    if "onnx.reference.op_run" in placed:
        op_run.to_array_extended = _to_array_extended  # type: ignore[attr-defined]
    try:
        return importlib.import_module("onnxruntime.quantization")
    finally:
        for name in placed:
            del sys.modules[name]


def select_providers(device: str = "auto") -> list[str]:
    """CUDA when asked for or available (device='auto'), else CPU. CPU is always the fallback."""
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


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_pairs_overflow(machine: str, flags: set[str]) -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels on such a CPU add each pair of products in 16 bits with
    saturation: x86-64 without VNNI (no avx512_vnni, no avx_vnni), where they use VPMADDUBSW. Two products of
    a uint8 activation and an int8 weight reach 2 x 255 x 127 = 64,770, twice what 16 bits hold, so large
    activations against large weights are clipped; 7-bit weights (reduce_range) bound the pair to 32,130. With
    VNNI the products add in 32 bits, and ARM's kernels widen first. Unknown flags count as no overflow."""
    if machine.lower() not in ("x86_64", "amd64", "x64"):
        return False
    return bool(flags) and not ({"avx512_vnni", "avx_vnni"} & flags)


@functools.cache
def int8_overflows_here() -> bool:
    """int8_pairs_overflow for this machine's CPU (Linux: /proc/cpuinfo; elsewhere: assumed not)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return int8_pairs_overflow(platform.machine(), cpu_flags(text))


# On CUDA, ONNX Runtime multiplies fp32 matrices in TF32 by default (10-bit mantissa) and lets cuDNN
# pick any convolution algorithm; both would make a GPU worker's calibration ranges and accuracy
# figures drift from a CPU worker's on the same model and data. Keep fp32 arithmetic.
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}


def provider_options(providers: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Each provider with the options lowbit runs it with."""
    return [(p, dict(CUDA_OPTIONS) if p == "CUDAExecutionProvider" else {}) for p in providers]


def make_session(model: Path | bytes, providers: list[str], threads: int, what: str = "model",
                 observing: bool = False, external_folder: Path | None = None) -> Any:
    """``observing``: the model has extra nodes or outputs that read many activations (calibration, layer
    analysis). ONNX Runtime's default node order then runs those readers late and keeps every activation
    they read alive until they do (a transformer at batch 8: 1.2 GB instead of 0.4 GB); its priority-based
    order runs each as soon as its input exists. Same kernels, same results.

    Observing sessions also stop at the extended optimization level, before the CPU layout transforms: with
    those, every observed activation of a conv net sits in ONNX Runtime's blocked NCHWc layout and each reader
    needs its own reordered copy, which kept them all alive (PP-LCNet as published, at batch 8: 671 MB against
    212 MB, and twice the time). The extended level keeps every fusion the observed tensors allow, the QDQ
    ones included, so a quantized model under observation still runs its int8 kernels."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    if observing:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    if external_folder is not None:  # a model given as bytes whose external data lies in that folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
    if "CUDAExecutionProvider" in providers:
        so.use_deterministic_compute = True
    try:
        src = str(model) if isinstance(model, Path) else model
        return ort.InferenceSession(src, sess_options=so, providers=provider_options(providers))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(
            "model_not_runnable",
            f"ONNX Runtime cannot load the {what}: {msg[:600]}",
        ) from exc


def run(session: Any, feed: dict[str, Any], what: str = "model", outputs: list[str] | None = None) -> list[Any]:
    """The session's outputs on ``feed`` (only ``outputs``, in that order, when given)."""
    if outputs is not None and not outputs:
        return []  # nothing asked for (ONNX Runtime would read an empty list as "every output")
    try:
        return list(session.run(outputs, feed))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError("model_run_failed", f"ONNX Runtime failed to run the {what}: {msg[:600]}") from exc


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand what the stages that ended freed back to the system. glibc keeps freed heap pages for reuse, so a
    job's resident memory only grew: a stage's sessions and arrays, gone, still counted at the next stage's peak
    (the mel spectrogram's job held 23 MB that way at its end). Called between stages, where nothing is running.
    No gc.collect: what the stages free goes by reference counting, and a collection took 12-16 ms a call for the
    same peaks."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
