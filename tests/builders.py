"""Small models and datasets built by the tests themselves (no model hubs)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _export(module, args, path: Path, input_names, output_names, dynamic_axes=None, opset=17) -> Path:
    import torch

    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def conv_net(path: Path, seed: int = 0, width: int = 16) -> Path:
    """A small CNN classifier: [N, 3, 32, 32] float32 -> [N, 10] logits."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    w = width
    net = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10),
    )
    return _export(net, (torch.randn(1, 3, 32, 32),), path, ["image"], ["logits"],
                   {"image": {0: "batch"}, "logits": {0: "batch"}})


def mlp(path: Path, in_features: int = 20, classes: int = 5, seed: int = 0) -> Path:
    """An MLP classifier: [N, in_features] float32 -> [N, classes]."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))
    return _export(net, (torch.randn(1, in_features),), path, ["features"], ["scores"],
                   {"features": {0: "batch"}, "scores": {0: "batch"}})


def tiny_transformer(path: Path, vocab: int = 1000, dim: int = 64, seq: int = 16, layers: int = 1,
                     seed: int = 0, classes: int | None = None, mask_value: float = -1e4,
                     outliers: float = 1.0) -> Path:
    """A transformer encoder over int64 token ids: [N, seq] int64 (+ mask) -> [N, seq, vocab] logits, or with
    ``classes``, a text classifier: mean-pooled over the unmasked tokens -> [N, classes] scores. ``mask_value``
    is what masked scores get (real exports use float32's minimum); ``outliers`` scales two channels of the
    embeddings, which the residual stream then carries through every block (as trained encoders' do)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
            self.layers = nn.ModuleList()
            for _ in range(layers):
                self.layers.append(nn.ModuleDict({
                    "ln1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                    "ln2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim),
                }))
            self.head = nn.Linear(dim, classes or vocab)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = self.emb(input_ids) + self.pos
            if outliers != 1.0:
                x = x * torch.tensor([outliers, outliers] + [1.0] * (dim - 2))
            bias = (1.0 - attention_mask.to(x.dtype))[:, None, :] * mask_value
            for layer in self.layers:
                blk = cast(nn.ModuleDict, layer)  # a ModuleList's items are typed as plain Modules
                h = blk["ln1"](x)
                q, k, v = blk["qkv"](h).chunk(3, dim=-1)
                att = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5 + bias, dim=-1)
                x = x + blk["proj"](att @ v)
                x = x + blk["fc2"](torch.nn.functional.gelu(blk["fc1"](blk["ln2"](x))))
            if classes:
                m = attention_mask.to(x.dtype)[:, :, None]
                return self.head((x * m).sum(1) / m.sum(1).clamp(min=1.0))
            return self.head(x)

    ids = torch.randint(0, vocab, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.int64)
    return _export(Block(), (ids, mask), path, ["input_ids", "attention_mask"], ["logits"],
                   {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "logits": {0: "batch"}})


def constant_weights_opset11(path: Path, seed: int = 0) -> Path:
    """An opset-11 MLP whose weights are Constant nodes, as some exporters write them."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(32).astype(np.float32) * 0.1
    w2 = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1c")),
        helper.make_node("Constant", [], ["b1"], value=numpy_helper.from_array(b1, "b1c")),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2c")),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "const_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="lowbit-tests")
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    kw: dict[str, Any] = dict(arrays)  # numpy's stub types savez's keywords as bool (allow_pickle)
    np.savez(path, **kw)
    return path


def image_data(path: Path, n: int = 64, seed: int = 1, labels: bool = False, model: Path | None = None) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    arrays: dict[str, np.ndarray] = {"image": x}
    if labels:
        arrays["labels"] = _labels_from_model(model, {"image": x}) if model else rng.integers(0, 10, n)
    return save_npz(path, **arrays)


def mlp_data(path: Path, n: int = 64, in_features: int = 20, seed: int = 1, labels: bool = False,
             model: Path | None = None) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, in_features)).astype(np.float32)
    arrays: dict[str, np.ndarray] = {"features": x}
    if labels:
        arrays["labels"] = _labels_from_model(model, {"features": x}) if model else rng.integers(0, 5, n)
    return save_npz(path, **arrays)


def token_data(path: Path, n: int = 32, vocab: int = 1000, seq: int = 16, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n, seq)).astype(np.int64)
    mask = np.ones((n, seq), dtype=np.int64)
    mask[:, seq - 3:] = rng.integers(0, 2, (n, 3))
    return save_npz(path, input_ids=ids, attention_mask=mask)


def _labels_from_model(model: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Labels the float model gets mostly right (its own argmax, with 10% flipped), so label
    accuracy is meaningful and not at chance."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pred = sess.run(None, feed)[0].argmax(-1)
    rng = np.random.default_rng(7)
    flip = rng.random(len(pred)) < 0.1
    return np.where(flip, (pred + 1) % sess.get_outputs()[0].shape[-1], pred).astype(np.int64)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    kw: dict[str, Any] = dict(arrays)
    np.savez(buf, **kw)
    return buf.getvalue()


SCRIPT_TAG = "<script>alert(1)</script>"
IMG_TAG = '"><img src=x onerror=alert(1)>'


def hostile_mlp(path: Path, seed: int = 0) -> Path:
    """An MLP whose node, output and graph names (and doc string) are HTML/JS injection attempts."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) * 0.1, "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32) * 0.3, "w2")
    out = f"scores{IMG_TAG}"
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name=SCRIPT_TAG),
        helper.make_node("Add", ["h", "b1"], ["hb"], name=f"add{IMG_TAG}"),
        helper.make_node("Relu", ["hb"], ["r"], name=IMG_TAG),
        helper.make_node("MatMul", ["r", "w2"], [out], name=f"head{SCRIPT_TAG}"),
    ]
    graph = helper.make_graph(
        nodes, f"graph{SCRIPT_TAG}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 4])],
        [w1, b1, w2],
        doc_string=IMG_TAG,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=SCRIPT_TAG)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def mismatched_mlp(path: Path) -> Path:
    """A model that loads and passes every upload check but cannot run on 20-feature data: its input's
    feature axis is symbolic while the weight expects 16. Jobs on it fail in the worker, with a message."""
    w = numpy_helper.from_array(np.full((16, 4), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "mismatched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "features"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def unmerged_dims_mlp(path: Path, width: int = 256, seed: int = 0) -> Path:
    """``y = relu(x @ w1 + skip) @ w2`` whose inputs name their batch axes differently (x [batch, width], skip
    [rows, width]): ONNX Runtime's symbolic shape inference cannot merge the two without auto_merge and stops,
    and on the way out saves ``sym_shape_infer_temp.onnx`` and a ``<uuid1>.data`` file holding every weight
    of 1 KB or more (here 2 x width² floats, 512 KB) in the working directory. Jobs still succeed (the
    pre-processing falls back to ONNX shape inference)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((width, 8)) / np.sqrt(width)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Add", ["h", "skip"], ["hs"], name="skip_add"),
         helper.make_node("Relu", ["hs"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "unmerged_dims",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width]),
         helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["rows", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def unmerged_dims_data(path: Path, n: int = 40, width: int = 256, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    return save_npz(path, x=rng.standard_normal((n, width)).astype(np.float32),
                    skip=(0.5 * rng.standard_normal((n, width))).astype(np.float32))


def token_labels(path: Path, model: Path, n: int = 32, vocab: int = 1000, seq: int = 64, seed: int = 1) -> Path:
    """Token data with a labels array the classifier ``model`` mostly gets right."""
    tokens = np.load(token_data(path, n=n, vocab=vocab, seq=seq, seed=seed))
    feed = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    return save_npz(path, **feed, labels=_labels_from_model(model, feed))


def _matmul_chain(path: Path, name: str, weights: list[tuple[str, np.ndarray]], relu_after: set[str],
                  in_name: str = "x", out_name: str = "y") -> Path:
    """MatMul nodes named after their weights, applied in order, with a Relu after those in ``relu_after``."""
    nodes, inits = [], []
    cur = in_name
    for i, (node, w) in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{node}.weight"))
        last = i == len(weights) - 1
        out = out_name if last else f"{node}.out"
        nodes.append(helper.make_node("MatMul", [cur, f"{node}.weight"], [out], name=node))
        cur = out
        if node in relu_after and not last:
            nodes.append(helper.make_node("Relu", [cur], [f"{node}.relu"], name=f"{node}_relu"))
            cur = f"{node}.relu"
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", weights[0][1].shape[0]])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", weights[-1][1].shape[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


PLANTED_SENSITIVE = ("squeeze1", "squeeze2")


def planted_outlier_mlp(path: Path, width: int = 256, seed: int = 0) -> Path:
    """An MLP with two planted sensitive layers: ``expand1``/``expand2`` give a few output channels weights
    300x larger (activations with huge outliers), and the MatMuls reading them, ``squeeze1``/``squeeze2``
    (small: width x 16), barely use those channels. Quantizing their input per tensor spends the whole int8
    range on the outliers; every other layer quantizes well. [N, 32] -> [N, 10]."""
    rng = np.random.default_rng(seed)

    def dense(i: int, o: int) -> np.ndarray:
        return rng.standard_normal((i, o)) / np.sqrt(i)

    def outliers(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[:, :3] *= 300.0
        return w

    def ignore_outliers(w: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[:3, :] *= 1e-3
        return w

    layers = [
        ("fc1", dense(32, width)), ("expand1", outliers(dense(width, width))),
        ("squeeze1", ignore_outliers(dense(width, 16))), ("fc2", dense(16, width)),
        ("expand2", outliers(dense(width, width))), ("squeeze2", ignore_outliers(dense(width, 16))),
        ("head", dense(16, 10)),
    ]
    return _matmul_chain(path, "planted_outliers", layers, {"fc1", "squeeze1", "fc2", "squeeze2"})


def four_bit_outlier_mlp(path: Path, seed: int = 0) -> Path:
    """Two MatMuls, [N, 64] -> [N, 512]: ``spiky`` (64 x 64) has one weight in every block of 32 along its input
    axis 10x larger than the rest, so a 4-bit block scale spends its 7 levels on it and rounds the others to a
    few steps (relative error ~0.2; in 8 bits, negligible); ``wide`` (64 x 512, most of the weights) is plain and
    loses little in 4 bits. 4 bits everywhere misses an output cosine of 0.99; ``spiky`` alone in 8 bits meets it,
    at about half an int8 model's size."""
    rng = np.random.default_rng(seed)
    spiky = rng.standard_normal((64, 64)) / 8.0
    spiky[::32, :] *= 10.0
    wide = rng.standard_normal((64, 512)) / 8.0
    return _matmul_chain(path, "four_bit_outliers", [("spiky", spiky), ("wide", wide)], {"spiky"})


def scale_free_mlp(path: Path, width: int = 128, seed: int = 0) -> Path:
    """A bias-free ReLU MLP (f(a x) = a f(x)): with inputs whose scale varies 1000x between samples, one
    calibrated int8 range cannot fit them all, while ranges measured at run time (dynamic) can. [N, 32] -> [N, 10]."""
    rng = np.random.default_rng(seed)
    layers = [("fc1", rng.standard_normal((32, width)) / np.sqrt(32)),
              ("fc2", rng.standard_normal((width, width)) / np.sqrt(width)),
              ("head", rng.standard_normal((width, 10)) / np.sqrt(width))]
    return _matmul_chain(path, "scale_free", layers, {"fc1", "fc2"})


def scale_varying_data(path: Path, n: int = 64, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32)) * 10.0 ** rng.uniform(-2, 1, (n, 1))
    return save_npz(path, x=x.astype(np.float32))


def spike_ignoring_mlp(path: Path, in_features: int = 512, width: int = 128, seed: int = 0) -> Path:
    """An MLP whose input feature 0 carries rare huge spikes the model almost ignores (its weights are
    1e-3 of the others): a percentile range clips the spikes at no cost, while a range measured on each
    batch (dynamic) stretches to them and flattens every other feature. [N, in_features] -> [N, 10]."""
    rng = np.random.default_rng(seed)
    # Heavy-tailed weights: a few large ones per 4-bit block cost 4-bit weights more than int8 ones.
    w1 = rng.standard_t(3, (in_features, width)) / np.sqrt(in_features)
    w1[0, :] *= 1e-3
    layers = [("fc1", w1), ("fc2", rng.standard_t(3, (width, width)) / np.sqrt(width)),
              ("head", rng.standard_t(3, (width, 10)) / np.sqrt(width))]
    return _matmul_chain(path, "spike_ignoring", layers, {"fc1", "fc2"})


def spiky_data(path: Path, n: int = 64, spiky_share: float = 0.0, in_features: int = 512, seed: int = 1) -> Path:
    """Inputs for ``spike_ignoring_mlp``: one spike of 3000 on feature 0 in one sample (rare enough for a
    99.99th percentile to clip), or in ``spiky_share`` of the samples."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, in_features))
    spiky = rng.random(n) < spiky_share if spiky_share else np.arange(n) == n // 2
    x[spiky, 0] = 3000.0
    return save_npz(path, x=x.astype(np.float32))


def planted_data(path: Path, n: int = 80, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    return save_npz(path, x=rng.standard_normal((n, 32)).astype(np.float32))


def external_decoder(folder: Path, vocab: int = 512, dim: int = 64, ff: int = 128, layers: int = 2, seed: int = 0,
                     location: str = "model.onnx.data", tied: bool = True) -> Path:
    """A small decoder-shaped model with every weight in an external data file: a token embedding, ``layers``
    residual MLP blocks (MatMul-Relu-MatMul) with RMS-style normalisation, and an lm_head that reads the
    embedding table through a Transpose (``tied``) or its own table.
    Weights have per-column scales spread over two orders of magnitude and a few outlier columns."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def weight(k: int, n: int) -> np.ndarray:
        scales = np.geomspace(0.005, 0.5, n).astype(np.float32)
        rng.shuffle(scales)
        w = (rng.standard_normal((k, n)) * scales / np.sqrt(k) * 4).astype(np.float32)
        w[:, rng.choice(n, max(1, n // 64), replace=False)] *= 8.0
        return w

    emb = (rng.standard_normal((vocab, dim)) * 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(emb, "embed.weight")]
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"], name="embed")]
    h = "h0"
    for i in range(layers):
        up, down = weight(dim, ff), weight(ff, dim)
        inits += [numpy_helper.from_array(up, f"layers.{i}.up.weight"),
                  numpy_helper.from_array(down, f"layers.{i}.down.weight")]
        nodes += [
            helper.make_node("ReduceL2", [h], [f"n{i}"], name=f"layers.{i}.norm", axes=[-1], keepdims=1),
            helper.make_node("Div", [h, f"n{i}"], [f"x{i}"], name=f"layers.{i}.scale"),
            helper.make_node("MatMul", [f"x{i}", f"layers.{i}.up.weight"], [f"u{i}"], name=f"layers.{i}.up"),
            helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"layers.{i}.act"),
            helper.make_node("MatMul", [f"r{i}", f"layers.{i}.down.weight"], [f"d{i}"], name=f"layers.{i}.down"),
            helper.make_node("Add", [h, f"d{i}"], [f"h{i + 1}"], name=f"layers.{i}.residual"),
        ]
        h = f"h{i + 1}"
    if tied:  # as exporters write a tied lm_head: the MatMul reads the table through a Transpose
        nodes.append(helper.make_node("Transpose", ["embed.weight"], ["embed.weight_T"], name="lm_head.transpose",
                                      perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [h, "embed.weight_T"], ["logits"], name="lm_head"))
    else:
        inits.append(numpy_helper.from_array(weight(dim, vocab), "lm_head.weight"))
        nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path
