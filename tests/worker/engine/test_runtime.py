"""Execution provider choice. CUDA cannot run on the test machines, so ONNX Runtime's list of
available providers (an edge we do not own) is replaced for the GPU cases."""

from __future__ import annotations

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
