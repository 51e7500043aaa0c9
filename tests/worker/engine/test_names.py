"""The long names quantization adds are shortened in the artifact; the source's names, the outputs and the
model's function are not touched (worker/engine/names.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from worker.engine import names
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.pipeline import run

# tf2onnx's way: a tensor named by every op folded into it.
LONG_A = ";".join(f"model_1/block_{i}/conv2d_{i}/Conv2D" for i in range(4))
LONG_B = ";".join(f"model_1/block_{i}/re_lu_{i}/Relu" for i in range(4))
LONG_W = ";".join(f"model_1/block_{i}/conv2d_{i}/Conv2D/ReadVariableOp" for i in range(3))


def _model(path: Path, rng: np.random.Generator, value_info: bool = False) -> Path:
    nodes = [helper.make_node("Conv", ["x", LONG_W, "b1"], [LONG_A], name=LONG_A + "_node", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [LONG_A], [LONG_B], name=LONG_B + "_node"),
             helper.make_node("Conv", [LONG_B, "w2", "b2"], ["y"], name="head", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), LONG_W),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b2")]
    g = helper.make_graph(nodes, "tf2onnx_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], inits)
    if value_info:
        g.value_info.append(helper.make_tensor_value_info(LONG_A, TensorProto.FLOAT, ["N", 8, 16, 16]))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _job(model: Path, calib: Path, tmp: Path, recipe: str = "int8_static") -> tuple[Path, dict]:
    out = tmp / f"{recipe}.onnx"
    res = run(QuantizeConfig(model_path=model, output_path=out, recipe=recipe,
                             options=parse_options(recipe, {}), calibration_path=calib, threads=1,
                             work_dir=tmp / f"work-{recipe}"))
    return out, res.report


def _calib(tmp: Path, rng: np.random.Generator) -> Path:
    path = tmp / "calib.npz"
    np.savez(path, x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    return path


def test_int8_static_artifact_shortens_added_names_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = _model(tmp_path / "m.onnx", rng)
    calib = _calib(tmp_path, rng)
    out, report = _job(model, calib, tmp_path)
    q = onnx.load(str(out))
    tensors, nodes = names.graph_names(q)
    src_tensors, src_nodes = names.graph_names(onnx.load(str(model)))
    added = tensors - src_tensors
    assert added, "the quantizer added tensors"
    # Every added name is short now (the longest before: LONG_B + "_DequantizeLinear_Output", 144 characters);
    # the long names left are the source's, as they were (the layer table and the options name them).
    assert max(len(t) for t in added) <= 2 * names.KEEP + 10 + len("_DequantizeLinear_Output")
    assert {t for t in tensors if len(t) > 80} == {LONG_B}
    assert {LONG_A + "_node", "head"} <= nodes
    assert {n["name"] for n in report["layers"]} >= {LONG_A + "_node", "head"}
    # A weight's quantized copy and its scale still share one stem, as ONNX Runtime wrote them.
    quantized = [i.name for i in q.graph.initializer if i.name.endswith("_quantized") and "~" in i.name]
    assert len(quantized) == 1 and quantized[0].removesuffix("_quantized") + "_scale" in tensors
    # The same function: the artifact against the uncompacted model ONNX Runtime would run.
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99


def test_compaction_makes_the_file_smaller_and_runs_the_same(tmp_path: Path) -> None:
    # compact() on ONNX Runtime's own QDQ model of the long-named graph: outputs bit for bit, fewer bytes.
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(1)
    model = _model(tmp_path / "m.onnx", rng, value_info=True)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    qpath = tmp_path / "q.onnx"
    quantize_static(str(model), str(qpath), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    q = onnx.load(str(qpath))
    q.graph.value_info.append(helper.make_tensor_value_info(LONG_B, TensorProto.FLOAT, ["N", 8, 16, 16]))
    before = len(q.SerializeToString())
    src = onnx.load(str(model))
    tensors, nodes = names.graph_names(src)
    done = names.compact(q, tensors, nodes, {v.name for v in src.graph.value_info})
    assert done.tensors > 0 and done.nodes > 0
    # The upload's own annotation stays; the one preparation added goes.
    assert [v.name for v in q.graph.value_info] == [LONG_A] and done.value_info >= 1
    after = len(q.SerializeToString())
    assert after < 0.7 * before  # measured: 6022 -> 3787 bytes (0.63)
    onnx.checker.check_model(q)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    a = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(a, b)


def test_subgraphs_read_the_renamed_outer_tensor(tmp_path: Path) -> None:
    # An If branch reads an added tensor of the main graph by name: it must follow the rename.
    added = LONG_A + "_DequantizeLinear_Output"
    then = helper.make_graph([helper.make_node("Neg", [added], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Identity", [added], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], [LONG_A], name="src"),
         helper.make_node("Identity", [LONG_A], [added], name=added + "_node"),
         helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    known_t = {"x", "c", "y", LONG_A, "t", "e"}
    done = names.compact(m, known_t, {"src", "branch"}, set())
    assert done.tensors == 1
    body_inputs = {i for a in m.graph.node[2].attribute for n in a.g.node for i in n.input}
    assert body_inputs == {m.graph.node[1].output[0]} and len(m.graph.node[1].output[0]) < len(added)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([1.0, -2.0], np.float32)
    assert np.array_equal(s.run(None, {"x": x, "c": np.array(True)})[0], -x)


def test_a_clash_leaves_every_name_alone() -> None:
    stem = LONG_A
    taken = names.short_stem(stem) + "_scale"  # the graph already has a tensor with the short form
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], [stem], name="a"),
         helper.make_node("Identity", [stem], [stem + "_scale"], name="b"),
         helper.make_node("Identity", [stem + "_scale"], ["y"], name="c"),
         helper.make_node("Identity", ["x"], [taken], name="d")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info(taken, TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    # stem + "_scale" is added (not the source's) and its short form is taken: nothing is renamed.
    done = names.compact(m, {"x", "y", stem}, {"a", "b", "c", "d"}, set())
    assert done.tensors == 0 and m.graph.node[1].output[0] == stem + "_scale"
    # Without the clash the same name is shortened.
    del m.graph.node[3]
    del m.graph.output[1]
    assert names.compact(m, {"x", "y", stem}, {"a", "b", "c"}, set()).tensors == 1
    assert m.graph.node[1].output[0] == taken == m.graph.node[2].input[0]
