"""Index math in float (worker/engine/index_math.py, int8_static option float_index_math): the nodes that compute
shapes, indices, coordinates or a decision's inputs are found, kept in float, and that keeps outputs which 8 bits
would move exactly as the float model computes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from app.pages import present
from tests.builders import save_npz
from tests.reports import assert_report_complete
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.index_math import find
from worker.engine.pipeline import run
from worker.engine.report import Report


def _const(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _model(path: Path) -> Path:
    """A conv layer with the arithmetic exported detectors carry beside it: a grid of coordinates from the input's
    width (Shape -> Range), scaled and floored (``corners``); a score thresholded (``keep``); a position table
    looked up by that grid (a weight: ``positions``); a reshape to (batch, -1) whose shape is read off an
    activation. H and W are dynamic, so nothing here folds to a constant."""
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["feat"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["feat"], ["act"], name="relu"),
        # Shape math: the coordinates of the W grid, times 0.999, floored (values just below each integer).
        helper.make_node("Shape", ["image"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "three"], ["width"], name="width", axis=0),
        helper.make_node("Cast", ["width"], ["width_f"], name="width_f", to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "width_f", "one"], ["grid"], name="grid"),
        helper.make_node("Mul", ["grid", "step"], ["scaled"], name="scaled"),
        helper.make_node("Floor", ["scaled"], ["corners"], name="floor"),
        # A lookup of a float table by that grid: data-independent, but a weight worth 8 bits.
        helper.make_node("Cast", ["width"], ["width_i"], name="width_i", to=TensorProto.INT64),
        helper.make_node("Range", ["zero_i", "width_i", "one_i"], ["index"], name="index"),
        helper.make_node("Gather", ["table", "index"], ["rows"], name="lookup", axis=0),
        helper.make_node("ReduceMean", ["act"], ["mean"], name="mean", axes=[0, 1, 2, 3], keepdims=0),
        helper.make_node("Add", ["rows", "mean"], ["positions"], name="positions"),
        helper.make_node("ReduceMean", ["act"], ["level"], name="level", axes=[1, 2, 3], keepdims=0),
        # A decision: the mean response through a sigmoid, thresholded.
        helper.make_node("Sigmoid", ["level"], ["score"], name="sigmoid"),
        helper.make_node("Greater", ["score", "half"], ["keep"], name="threshold"),
        # A reshape whose shape is read off an activation: the activation itself is data, not index math.
        helper.make_node("Shape", ["act"], ["act_shape"], name="act_shape"),
        helper.make_node("Gather", ["act_shape", "zero_i"], ["batch"], name="batch", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="batch1"),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Reshape", ["act", "flat_shape"], ["flat"], name="flat"),
    ]
    rng = np.random.default_rng(0)
    inits = [
        _const("w", rng.normal(0, 0.5, (1, 1, 3, 3))), _const("b", [0.1]),
        _const("three", 3, np.int64), _const("zero", 0.0), _const("one", 1.0), _const("step", 0.999),
        _const("zero_i", 0, np.int64), _const("one_i", 1, np.int64),
        _const("table", rng.normal(0, 1, (32, 4))), _const("axes0", [0], np.int64),
        _const("half", 0.5), _const("minus_one", [-1], np.int64),
    ]
    graph = helper.make_graph(
        nodes, "index_math",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("corners", TensorProto.FLOAT, ["w"]),
         helper.make_tensor_value_info("positions", TensorProto.FLOAT, ["w", 4]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, ["n"]),
         helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["n", None])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_shape_and_decision_nodes_are_found(tmp_path: Path) -> None:
    found = find(onnx.load(str(_model(tmp_path / "m.onnx"))))
    # From shapes and constants only; the table lookup reads a weight, so it is not among them, and neither is
    # the Add that mixes its rows with data.
    assert set(found.shape_nodes) == {"shape", "width", "width_f", "grid", "scaled", "floor", "width_i", "index",
                                      "act_shape", "batch", "batch1", "flat_shape"}, found
    # Back from the threshold: the sigmoid, the mean it reads and the Relu before it, up to the conv (weights);
    # the reshape's shape comes from shape nodes already counted, and the walk does not pass a Shape node.
    assert set(found.decision_nodes) == {"sigmoid", "level", "relu"}, found
    assert "conv" not in found.nodes and "lookup" not in found.nodes and "flat" not in found.nodes
    assert len(found.nodes) == len(set(found.nodes)) == 15


def test_a_weighted_layer_stops_the_walk_back(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("ArgMax", ["r"], ["label"], name="argmax", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["n", 1])],
                              [_const("w", np.ones((4, 3)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    found = find(model)
    assert found.shape_nodes == () and found.decision_nodes == found.nodes == ("relu",)
    # Exclusion lists name nodes: an unnamed one is not listed (normalize names every node of an upload).
    model.graph.node[1].name = ""
    assert find(model).nodes == ()


def _quantize(tmp: Path, model: Path, tag: str, **options: object) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    calib = save_npz(tmp / "c.npz", image=rng.normal(0, 1, (32, 1, 8, 12)).astype(np.float32))
    ev = save_npz(tmp / "e.npz", image=rng.normal(0, 1, (16, 1, 8, 12)).astype(np.float32))
    out = tmp / f"{tag}.onnx"
    cfg = QuantizeConfig(model_path=model, output_path=out, recipe="int8_static",
                         options=parse_options("int8_static", dict(options)), calibration_path=calib,
                         eval_path=ev, threads=1, device="cpu", work_dir=tmp / f"work-{tag}")
    return out, run(cfg).report


def _outputs(path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": image}), strict=True))


def test_int8_static_keeps_index_math_in_float(tmp_path: Path) -> None:
    """With the option on (the default) the floored coordinates come out as the float model computes them and the
    thresholded score is the float model's; off, 8 bits move the coordinates (values just below integers)."""
    model = _model(tmp_path / "m.onnx")
    on_path, on = _quantize(tmp_path, model, "on")
    off_path, off = _quantize(tmp_path, model, "off", float_index_math=False)
    assert_report_complete(on, "int8_static")
    image = np.random.default_rng(2).normal(0, 1, (4, 1, 8, 12)).astype(np.float32)
    ref, got_on, got_off = (_outputs(p, image) for p in (model, on_path, off_path))
    np.testing.assert_array_equal(got_on["corners"], ref["corners"])
    np.testing.assert_array_equal(got_on["keep"], ref["keep"])
    # Measured (onnxruntime 1.32): 3 of the 12 coordinates move up by one when the Mul before the Floor is 8-bit.
    assert (got_off["corners"] != ref["corners"]).sum() >= 3, (got_off["corners"], ref["corners"])
    # The conv and the table lookup are still quantized: their weights are int8 either way.
    graph = onnx.load(str(on_path)).graph
    dq_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert {"w_quantized", "table_quantized"} <= dq_inputs, sorted(dq_inputs)
    # The Q/DQ pairs the float nodes no longer read went with their scales and zero points.
    read = {i for n in graph.node for i in n.input}
    assert [t.name for t in graph.initializer if t.name not in read] == []
    section = on["index_math"]
    # Counted on the prepared model: ONNX Runtime's basic optimizations fold the reshape's shape to a constant and
    # drop the int64 -> int64 Cast, which leaves 7 of the 12 shape nodes; the decision nodes are the same 3.
    assert section["enabled"] and section["nodes"] == 10, section
    assert (section["shape_nodes"], section["decision_nodes"]) == (7, 3)
    assert section["examples"][:4] == ["relu", "level", "sigmoid", "shape"], section["examples"]
    assert off["index_math"]["enabled"] is False and "off" in off["index_math"]["reason"]
    assert off["options"]["float_index_math"] is False and on["options"]["float_index_math"] is True
    # Calibration observes only tensors that a quantized node reads or writes: with the option on, the 4 that only
    # the index math touches get no range (measured: 7 tensors calibrated against 11 with the option off).
    assert (on["calibration"]["tensors"], off["calibration"]["tensors"]) == (7, 11)
    line = present.index_math_line(Report.model_validate(on).index_math)
    assert line.startswith("10 node(s) kept in float (7 computing from shapes and constants, 3 feeding"), line
