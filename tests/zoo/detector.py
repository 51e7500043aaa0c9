"""An MTCNN first-stage face detector with its post-processing inside the ONNX graph.

The proposal net (PNet) is exported to ONNX with ``torch.onnx.export(dynamo=True)``; around it, plain ONNX
nodes scale the RGB image, build an image pyramid with ``Resize``, run one copy of the PNet nodes per
pyramid level (all copies share the same weight initializers), turn each level's face-probability and
box-regression maps into image-space boxes (12x12 cells at stride 2, refined by the regression), and
keep the best of them with ``NonMaxSuppression``; the kept boxes are padded to a fixed count.

Input ``image`` [1, 3, height, width] float32, RGB 0..255 (height and width dynamic, at least 80).
Outputs ``boxes`` [1, 16, 4] (x1, y1, x2, y2 in input pixels) and ``scores`` [1, 16] (face
probability), best first; rows past the detections found are all zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.zoo.nets import PNet

# Pyramid for faces from about 20 px (12 / 0.6) up: the usual MTCNN factor of 0.709 between levels.
SCALES = tuple(0.6 * 0.709**k for k in range(5))
MAX_DETECTIONS = 16
IOU_THRESHOLD = 0.5
SCORE_THRESHOLD = 0.6
OPSET = 18


def export_pnet(pnet: PNet) -> onnx.ModelProto:
    """PNet alone as ONNX (batch 1, dynamic even height and width), via the dynamo exporter."""
    h = 2 * torch.export.Dim("half_height", min=7, max=2048)
    w = 2 * torch.export.Dim("half_width", min=7, max=2048)
    prog = torch.onnx.export(
        pnet.eval(), (torch.zeros(1, 3, 64, 80),), dynamo=True, opset_version=OPSET, input_names=["image"],
        output_names=["prob", "reg"], dynamic_shapes=({2: h, 3: w},), verbose=False,
    )
    assert prog is not None
    model = prog.model_proto
    if model.functions:
        raise RuntimeError("the exported PNet holds ONNX functions; expected a flat graph")
    return model


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"post/{hint}_{self._n}"

    def const(self, value: np.ndarray | float | int | list[int], hint: str = "c") -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           out_names: list[str] | None = None, **attrs: Any) -> str:
        outs = out_names or [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0]


def _pnet_copy(b: _Builder, pnet: onnx.ModelProto, image: str, prefix: str) -> tuple[str, str]:
    """Append PNet's nodes reading ``image``; tensors renamed under ``prefix``, weights shared."""
    weights = {i.name for i in pnet.graph.initializer}
    ren = {pnet.graph.input[0].name: image}

    def rename(t: str) -> str:
        if t == "" or t in weights:
            return t
        return ren.setdefault(t, f"{prefix}/{t}")

    for n in pnet.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(n)
        node.name = f"{prefix}/{n.name or n.op_type}"
        node.ClearField("metadata_props")
        del node.input[:]
        node.input.extend(rename(t) for t in n.input)
        del node.output[:]
        node.output.extend(rename(t) for t in n.output)
        b.nodes.append(node)
    outs = {o.name: rename(o.name) for o in pnet.graph.output}
    return outs["prob"], outs["reg"]


def _level_boxes(b: _Builder, prob: str, reg: str, scale: float) -> tuple[str, str]:
    """Boxes [M, 4] and face scores [M] of one pyramid level, in input-image pixels."""
    score = b.op("Reshape", [b.op("Slice", [prob, b.const([1]), b.const([2]), b.const([1])]), b.const([-1])],
                 "score")
    shape = b.op("Shape", [prob])
    h = b.op("Slice", [shape, b.const([2]), b.const([3]), b.const([0])])
    w = b.op("Slice", [shape, b.const([3]), b.const([4]), b.const([0])])
    hw = b.op("Concat", [h, w], axis=0)
    zero, one = b.const(np.array(0, dtype=np.int64)), b.const(np.array(1, dtype=np.int64))
    ys = b.op("Cast", [b.op("Range", [zero, b.op("Squeeze", [h, b.const([0])]), one])], to=TensorProto.FLOAT)
    xs = b.op("Cast", [b.op("Range", [zero, b.op("Squeeze", [w, b.const([0])]), one])], to=TensorProto.FLOAT)
    grid_y = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [ys, b.const([1])]), hw]), b.const([-1])], "gy")
    grid_x = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [xs, b.const([0])]), hw]), b.const([-1])], "gx")

    def edge(g: str, offset: float) -> str:
        # floor((2 * cell + offset) / scale): the 12x12 window of a cell, mapped back to the input.
        return b.op("Floor", [b.op("Div", [b.op("Add", [b.op("Mul", [g, b.const(2.0)]), b.const(offset)]),
                                           b.const(scale)])])

    x1, y1, x2, y2 = edge(grid_x, 1.0), edge(grid_y, 1.0), edge(grid_x, 12.0), edge(grid_y, 12.0)
    bw = b.op("Add", [b.op("Sub", [x2, x1]), b.const(1.0)])
    bh = b.op("Add", [b.op("Sub", [y2, y1]), b.const(1.0)])
    r = b.op("Reshape", [reg, b.const([4, -1])], "reg")
    coords = []
    for c, (base, size) in enumerate(((x1, bw), (y1, bh), (x2, bw), (y2, bh))):
        rc = b.op("Gather", [r, b.const(np.array(c, dtype=np.int64))], axis=0)
        coords.append(b.op("Unsqueeze", [b.op("Add", [base, b.op("Mul", [rc, size])]), b.const([1])]))
    return b.op("Concat", coords, "boxes", axis=1), score


def build_detector(pnet: PNet, path: Path) -> Path:
    pnet_onnx = export_pnet(pnet)
    b = _Builder()
    image = "image"
    norm = b.op("Mul", [b.op("Sub", [image, b.const(127.5)]), b.const(0.0078125)], "normalized")
    hw = b.op("Cast", [b.op("Slice", [b.op("Shape", [image]), b.const([2]), b.const([4]), b.const([0])])],
              to=TensorProto.FLOAT)
    level_boxes, level_scores = [], []
    for k, s in enumerate(SCALES):
        # Even sizes: floor(side * s / 2) * 2, as the PNet export was traced for.
        side = b.op("Mul", [b.op("Floor", [b.op("Div", [b.op("Mul", [hw, b.const(s)]), b.const(2.0)])]),
                            b.const(2.0)])
        sizes = b.op("Concat", [b.const([1, 3]), b.op("Cast", [side], to=TensorProto.INT64)], axis=0)
        level = b.op("Resize", [norm, "", "", sizes], f"level{k}", mode="linear", antialias=1)
        prob, reg = _pnet_copy(b, pnet_onnx, level, f"pnet{k}")
        boxes, scores = _level_boxes(b, prob, reg, s)
        level_boxes.append(boxes)
        level_scores.append(scores)
    boxes = b.op("Concat", level_boxes, "all_boxes", axis=0)
    scores = b.op("Concat", level_scores, "all_scores", axis=0)
    selected = b.op(
        "NonMaxSuppression",
        [b.op("Unsqueeze", [boxes, b.const([0])]), b.op("Unsqueeze", [scores, b.const([0, 1])]),
         b.const(np.array([MAX_DETECTIONS], dtype=np.int64)), b.const(np.array([IOU_THRESHOLD], dtype=np.float32)),
         b.const(np.array([SCORE_THRESHOLD], dtype=np.float32))],
        "selected", center_point_box=0,
    )
    idx = b.op("Reshape", [b.op("Gather", [selected, b.const([2])], axis=1), b.const([-1])], "kept")
    kept_boxes = b.op("Gather", [boxes, idx], axis=0)
    kept_scores = b.op("Gather", [scores, idx], axis=0)
    missing = b.op("Sub", [b.const([MAX_DETECTIONS]), b.op("Shape", [idx])])
    padded_boxes = b.op("Pad", [kept_boxes, b.op("Concat", [b.const([0, 0]), missing, b.const([0])], axis=0)])
    padded_scores = b.op("Pad", [kept_scores, b.op("Concat", [b.const([0]), missing], axis=0)])
    b.op("Unsqueeze", [padded_boxes, b.const([0])], out_names=["boxes"])
    b.op("Unsqueeze", [padded_scores, b.const([0])], out_names=["scores"])

    graph = helper.make_graph(
        b.nodes,
        "mtcnn_pnet_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, MAX_DETECTIONS, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, MAX_DETECTIONS])],
        initializer=list(pnet_onnx.graph.initializer) + b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lowbit-zoo")
    model.ir_version = 9
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    from tests.zoo.recipes import check_runs

    check_runs(path)
    return path
