"""Option reduce_range left unset: decided by the worker's CPU. ONNX Runtime's uint8 x int8 kernels on x86-64
without VNNI add pairs of products in 16 bits with saturation (VPMADDUBSW), which 8-bit weights overflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import builders
from worker.engine import runtime
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.pipeline import run
from worker.engine.runtime import cpu_flags, int8_overflows_here, int8_pairs_overflow

AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 ssse3 avx avx2 fma\n"


def test_the_cpus_whose_int8_kernels_overflow() -> None:
    assert int8_pairs_overflow("x86_64", cpu_flags(AVX2_ONLY))
    assert int8_pairs_overflow("x86_64", {"avx2", "avx512f", "avx512bw"})  # AVX-512 without VNNI: Skylake-SP
    assert not int8_pairs_overflow("x86_64", {"avx2", "avx512f", "avx512_vnni"})
    assert not int8_pairs_overflow("x86_64", {"avx2", "avx_vnni"})
    assert not int8_pairs_overflow("aarch64", cpu_flags("Features\t: fp asimd asimddp\n"))
    assert not int8_pairs_overflow("x86_64", set())  # flags unknown: not assumed


def _weights_q(path: Path) -> list[np.ndarray]:
    """The int8 weights of a QDQ model (the DequantizeLinear inputs that are initializers)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == TensorProto.INT8]


def _job(tmp: Path, model: Path, data: Path, recipe: str, **opts: object) -> dict:
    cfg = QuantizeConfig(model_path=model, output_path=tmp / f"{recipe}-{len(list(tmp.iterdir()))}.onnx",
                         recipe=recipe, options=parse_options(recipe, dict(opts)), calibration_path=data,
                         threads=1, device="cpu")
    res = run(cfg)
    return res.report | {"artifact": res.artifact_path}


@pytest.mark.parametrize("recipe", ["int8_static", "int8_dynamic"])
def test_unset_reduce_range_follows_the_cpu_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        recipe: str) -> None:
    model = builders.mlp(tmp_path / "mlp.onnx")
    data = builders.mlp_data(tmp_path / "mlp.npz")
    for overflows in (True, False):
        monkeypatch.setattr(runtime, "int8_overflows_here", lambda o=overflows: o)
        report = _job(tmp_path, model, data, recipe, latency_runs=1)
        # The report records the value used, so its options rerun the same job anywhere.
        assert report["options"]["reduce_range"] is overflows
        peak = max(int(np.abs(w.astype(np.int32)).max()) for w in _weights_q(report["artifact"])) \
            if recipe == "int8_static" else None
        said = [w for w in report["warnings"] if "reduce_range" in w]
        if overflows:
            assert said and "x86-64 without VNNI" in said[0] and "reduce_range=false" in said[0]
            assert peak is None or peak <= 64
        else:
            assert not said
            assert peak is None or peak == 127
    # Set by the job, it is the job's, whatever the CPU.
    monkeypatch.setattr(runtime, "int8_overflows_here", lambda: True)
    report = _job(tmp_path, model, data, recipe, latency_runs=1, reduce_range=False)
    assert report["options"]["reduce_range"] is False
    assert not [w for w in report["warnings"] if "reduce_range" in w]


def _saturating_matmul(path: Path, k: int = 64) -> tuple[Path, np.ndarray]:
    """y = x @ W with x in [0, 1] and W's columns of +-1 (each pair of products at the int8 extremes)."""
    rng = np.random.default_rng(0)
    w = np.sign(rng.standard_normal((k, 8))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "sat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.uniform(0.9, 1.0, (32, k)).astype(np.float32)
    return path, x


@pytest.mark.skipif(not int8_overflows_here(), reason="this machine's CPU has VNNI (or is not x86-64): its int8 "
                                                      "kernels do not overflow, so there is nothing to show")
def test_on_an_overflowing_cpu_seven_bit_weights_compute_what_the_model_says(tmp_path: Path) -> None:
    """On this CPU, ONNX Runtime's int8 kernel clips the 8-bit model's products; with 7-bit weights it computes
    what the QDQ model means (graph optimizations off: dequantize, then float arithmetic)."""
    model, x = _saturating_matmul(tmp_path / "sat.onnx")
    data = builders.save_npz(tmp_path / "sat.npz", x=x)

    def error(artifact: Path, level: ort.GraphOptimizationLevel) -> float:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        got = ort.InferenceSession(str(artifact), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return float(np.abs(got - x @ onnx.numpy_helper.to_array(onnx.load(str(model)).graph.initializer[0])).max())

    eight = _job(tmp_path, model, data, "int8_static", reduce_range=False, latency_runs=1)["artifact"]
    seven = _job(tmp_path, model, data, "int8_static", latency_runs=1)["artifact"]
    kernel8, exact8 = error(eight, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), \
        error(eight, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    kernel7 = error(seven, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # Measured on an AMD EPYC with AVX2 only: max error 4.822 (8-bit, kernel), 0.043 (8-bit, exact), 0.043 (7-bit).
    assert kernel8 > 10 * max(exact8, 1e-3), (kernel8, exact8)  # the kernel clipped
    assert kernel7 < kernel8 / 10, (kernel7, kernel8)
