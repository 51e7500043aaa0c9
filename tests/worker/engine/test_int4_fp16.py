from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import builders
from tests.reports import assert_report_complete
from worker.engine.blockquant import block_dequant, clip_search
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError
from worker.engine.pipeline import run

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")


def _run(model: Path, tmp: Path, data: Path | None, recipe: str = "int4_weight_only", evald: Path | None = None,
         **opts: object) -> dict:
    cfg = QuantizeConfig(model_path=model, output_path=tmp / f"{recipe}-{len(list(tmp.iterdir()))}.onnx",
                         recipe=recipe, options=parse_options(recipe, dict(opts)), calibration_path=data,
                         eval_path=evald, threads=1, device="cpu")
    res = run(cfg)
    ort.InferenceSession(str(res.artifact_path), providers=["CPUExecutionProvider"])
    return res.report


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq", "clip_search"])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_mlp_every_algorithm_and_block_size(zoo: dict[str, Path], tmp_path: Path, algorithm: str,
                                            block_size: int) -> None:
    rep = _run(zoo["mlp"], tmp_path, zoo["mlp_data"], algorithm=algorithm, block_size=block_size)
    assert_report_complete(rep, "int4_weight_only")
    # torch exports nn.Linear as Gemm with transB=1: rewritten as MatMul and quantized, not skipped.
    assert any("rewrote" in w and "Gemm" in w for w in rep["warnings"])
    layers = [x for x in rep["layers"] if x["op_type"] in ("MatMul", "Gemm")]
    assert layers and all(x["precision"] == "int4" for x in layers)
    assert rep["accuracy"]["outputs"][0]["cosine"] > 0.98
    # Effective bits: 4 per weight plus scales (and zero points), and the zero padding that the first
    # layer's 20 inputs need to fill a block.
    assert 4.0 + 32 / block_size - 1e-9 <= rep["size"]["bits_per_weight"] < 16.0
    if algorithm in ("gptq", "clip_search"):
        assert rep["calibration"]["algorithm"] == algorithm and rep["accuracy"]["source"] == "calibration_holdout"
    if algorithm != "rtn":
        assert rep["accuracy"]["baselines"][0]["algorithm"] == "rtn"


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq", "clip_search"])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_transformer_block_every_algorithm_and_block_size(zoo: dict[str, Path], tmp_path: Path, algorithm: str,
                                                          block_size: int) -> None:
    rep = _run(zoo["tf"], tmp_path, zoo["tf_data"], algorithm=algorithm, block_size=block_size)
    assert_report_complete(rep, "int4_weight_only")
    assert rep["accuracy"]["outputs"][0]["cosine"] > 0.99
    # The 4-bit weights with their scales (and hqq's zero points): 4 + 32/block (+ 32/block) bits per weight.
    extra = (64 if algorithm == "hqq" else 32) / block_size
    if block_size <= 64:
        assert rep["size"]["bits_per_weight"] == pytest.approx(4 + extra, abs=1e-3)
    else:  # most layers have 64 inputs: a 128 block is half zero padding, and that is counted
        assert rep["size"]["bits_per_weight"] > 4 + extra
        assert any("not a multiple of block size 128" in w for w in rep["warnings"])
    if 32 <= block_size <= 64 and algorithm != "hqq":
        assert rep["size"]["quantized_weight_bytes"] <= 0.2 * rep["size"]["fp32_weight_bytes"]


def _outlier_model(tmp: Path) -> tuple[Path, Path, Path]:
    """y = x @ W where four input channels carry 40x larger weights but near-silent activations:
    round-to-nearest spends each block's 16 levels on those outliers; the activations show they
    barely matter."""
    rng = np.random.default_rng(0)
    k, n = 128, 64
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    w[[3, 40, 77, 100]] *= 40.0
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")], "outliers",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp / "outliers.onnx"
    onnx.save_model(m, str(path))

    def data(seed: int, count: int) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal((count, k)).astype(np.float32)
        x[:, [3, 40, 77, 100]] *= 0.01
        return x

    return path, builders.save_npz(tmp / "cal.npz", x=data(1, 64)), builders.save_npz(tmp / "ev.npz", x=data(2, 64))


def test_calibration_recovers_what_round_to_nearest_loses(tmp_path: Path) -> None:
    model, cal, ev = _outlier_model(tmp_path)
    clip = _run(model, tmp_path, cal, evald=ev, algorithm="clip_search", block_size=32)
    rtn = _run(model, tmp_path, cal, evald=ev, algorithm="rtn", block_size=32)
    s_clip = clip["accuracy"]["outputs"][0]["sqnr_db"]
    s_rtn = rtn["accuracy"]["outputs"][0]["sqnr_db"]
    assert s_clip >= s_rtn + 6.0, (s_clip, s_rtn)
    # The job also measured round-to-nearest on the same samples and says so.
    base = clip["accuracy"]["baselines"][0]
    assert base["algorithm"] == "rtn" and base["outputs"][0]["sqnr_db"] == pytest.approx(s_rtn, abs=1e-6)
    assert clip["calibration"]["mean_clip_ratio"] < 1.0


@pytest.mark.parametrize("model, data", [("mlp", "mlp_data"), ("tf", "tf_data"), ("conv", "conv_data")])
def test_calibrated_is_at_least_as_accurate_as_rtn(zoo: dict[str, Path], tmp_path: Path, model: str,
                                                   data: str) -> None:
    rep = _run(zoo[model], tmp_path, zoo[data], algorithm="clip_search")
    mine = rep["accuracy"]["outputs"][0]["sqnr_db"]
    assert mine >= rep["accuracy"]["baselines"][0]["outputs"][0]["sqnr_db"] - 1e-6


def test_model_without_matmul_weights_is_refused_clearly(tmp_path: Path) -> None:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, str(tmp_path / "relu.onnx"))
    with pytest.raises(EngineError) as e:
        _run(tmp_path / "relu.onnx", tmp_path, None)
    assert e.value.code == "nothing_to_quantize" and "MatMul" in e.value.message


def test_clip_search_never_increases_the_weighted_error() -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 16)) * 0.05).astype(np.float32)
    w[5] *= 20
    h = rng.uniform(0.1, 2.0, 96)
    clipped, ratio = clip_search(w, h, 32, True)
    err = lambda q: float((h[:, None] * (w - q) ** 2).sum())  # noqa: E731
    assert err(block_dequant(clipped, 32, True)) <= err(block_dequant(w, 32, True)) + 1e-9
    assert ratio < 1.0


def test_block_size_that_does_not_divide_the_inner_dimension(tmp_path: Path) -> None:
    path = builders.mlp(tmp_path / "odd.onnx", in_features=50)
    data = builders.mlp_data(tmp_path / "odd.npz", n=40, in_features=50)
    rep = _run(path, tmp_path, data, block_size=32)
    assert any("not a multiple of block size 32" in w for w in rep["warnings"])
    assert rep["accuracy"]["outputs"][0]["cosine"] > 0.98


def test_tied_weights_stay_in_float_with_a_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 32)) * 0.1).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
         helper.make_node("MatMul", ["h", "W"], ["y"], name="b"),
         helper.make_node("MatMul", ["y", "V"], ["z"], name="c")],
        "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w.copy(), "V")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, str(tmp_path / "tied.onnx"))
    data = builders.save_npz(tmp_path / "t.npz", x=rng.standard_normal((20, 32)).astype(np.float32))
    rep = _run(tmp_path / "tied.onnx", tmp_path, data)
    prec = {x["name"]: x["precision"] for x in rep["layers"]}
    assert prec == {"a": "fp32", "b": "fp32", "c": "int4"}
    assert any("tied" in w for w in rep["warnings"])


def test_int4_without_calibration_succeeds_with_a_warning(zoo: dict[str, Path], tmp_path: Path) -> None:
    rep = _run(zoo["mlp"], tmp_path, None)
    assert rep["calibration"] is None and rep["accuracy"]["baselines"] is None
    assert any("without seeing any real input" in w for w in rep["warnings"])


def test_fp16(zoo: dict[str, Path], tmp_path: Path) -> None:
    rep = _run(zoo["tf"], tmp_path, zoo["tf_data"], recipe="fp16")
    assert_report_complete(rep, "fp16")
    assert rep["accuracy"]["outputs"][0]["cosine"] > 0.9999
    assert 0.45 < rep["size"]["ratio"] < 0.6
    prec = {x["op_type"]: x["precision"] for x in rep["layers"]}
    assert prec["MatMul"] == "fp16"
    assert any("LayerNormalization" in w for w in rep["warnings"])
    q = onnx.load(str(tmp_path / next(p.name for p in tmp_path.iterdir() if p.name.startswith("fp16"))))
    # Inputs and outputs keep their types by default.
    assert [i.type.tensor_type.elem_type for i in q.graph.input] == [TensorProto.INT64, TensorProto.INT64]
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_embedding_tables_can_be_4bit_too(zoo: dict[str, Path], tmp_path: Path) -> None:
    plain = _run(zoo["tf"], tmp_path, zoo["tf_data"], algorithm="rtn")
    emb = _run(zoo["tf"], tmp_path, zoo["tf_data"], algorithm="rtn", quantize_embeddings=True)
    gathers = {x["name"]: x["precision"] for x in emb["layers"] if x["op_type"] == "Gather"}
    assert "int4" in gathers.values()
    assert emb["size"]["quantized_bytes"] < 0.6 * plain["size"]["quantized_bytes"]
    assert 4.0 < emb["size"]["bits_per_weight"] < 6.0
    assert emb["accuracy"]["outputs"][0]["cosine"] > 0.99


def test_gemm_rewrite_keeps_initializers_used_by_subgraphs() -> None:
    from worker.engine.int4 import gemm_to_matmul

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("Mul", ["y", "scale"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["y"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], name="g", transB=1),
         helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g, else_branch=else_g)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(2.0, np.float32), "scale")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    assert gemm_to_matmul(m) == 1
    names = {t.name for t in m.graph.initializer}
    assert "scale" in names and "W" not in names and "W_kn" in names
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    (z,) = sess.run(None, {"x": x, "cond": np.array(True)})
    np.testing.assert_allclose(z, 2.0 * x @ w.T, rtol=1e-5)


def test_int4_weights_with_int8_activations_elsewhere(zoo: dict[str, Path], tmp_path: Path) -> None:
    plain = _run(zoo["tf"], tmp_path, zoo["tf_data"], algorithm="rtn")
    hybrid = _run(zoo["tf"], tmp_path, zoo["tf_data"], algorithm="rtn", int8_activations=True)
    artifact = onnx.load(str(max(tmp_path.glob("int4_weight_only-*.onnx"), key=lambda p: p.stat().st_mtime)))
    ops = {n.op_type for n in artifact.graph.node}
    # Weight MatMuls in 4 bits, the rest (attention's activation MatMuls, embeddings...) in int8 QDQ.
    assert {"MatMulNBits", "QuantizeLinear", "DequantizeLinear"} <= ops
    precisions = {x["precision"] for x in hybrid["layers"]}
    assert {"int4", "int8"} <= precisions, hybrid["layers"]
    assert hybrid["size"]["quantized_bytes"] < plain["size"]["quantized_bytes"]
    assert hybrid["calibration"]["int8_elsewhere"]["samples"] > 0
    assert hybrid["accuracy"]["outputs"][0]["cosine"] > 0.98


def test_int8_activations_needs_calibration_data(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        _run(zoo["mlp"], tmp_path, None, algorithm="rtn", int8_activations=True)
    assert info.value.code == "calibration_required"


def test_fp16_keeps_ops_without_a_float16_cpu_kernel_in_float32(tmp_path: Path) -> None:
    """IsInf and IsNaN have no float16 kernel on ONNX Runtime's CPU: converted, the artifact did not load
    (fracast's forecaster, model_not_runnable). They stay in float32 and the model runs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("IsInf", ["m"], ["inf"]),
             helper.make_node("IsNaN", ["m"], ["nan"]), helper.make_node("Or", ["inf", "nan"], ["bad"]),
             helper.make_node("Where", ["bad", "zero", "m"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, zero]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32))
    res = run(QuantizeConfig(model_path=tmp_path / "m.onnx", output_path=tmp_path / "q.onnx", recipe="fp16",
                             options=parse_options("fp16", {}), calibration_path=tmp_path / "c.npz",
                             work_dir=tmp_path / "w", threads=1))
    assert res.report["accuracy"]["outputs"][0]["cosine"] > 0.999
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert any(i.data_type == TensorProto.FLOAT16 for i in q.graph.initializer)  # the MatMul is in float16
    ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
