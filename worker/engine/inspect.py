"""Load and check an uploaded ONNX model without running it (only the ``onnx`` package is needed)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from worker.engine.errors import EngineError
from worker.engine.external import ExternalRef, check_refs, external_bytes, is_external

MIN_OPSET = 11
# If/Loop/Scan bodies nested deeper than this are refused. Real exports nest a few levels; protobuf itself
# stops parsing at about 30 (each level is three nested messages), and the checks below walk the graph
# without recursion, so the limit is the product's choice, not a stack's.
MAX_SUBGRAPH_DEPTH = 16
# The most elements a declared shape (graph inputs, outputs, value_info) may hold: 2^32 is 16 GiB of
# float32, far above any activation lowbit could calibrate. Anything larger is a hostile declaration.
MAX_DECLARED_ELEMENTS = 1 << 32
MAX_DIM = (1 << 31) - 1

# ONNX element types to numpy dtype names, for the types users feed through .npz files.
ONNX_TO_NUMPY: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT16: "int16",
    TensorProto.UINT16: "uint16",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64",
    TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    # Fixed sizes as ints; symbolic or unknown sizes as strings (the symbol, or "?").
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelInfo:
    format: str
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    num_nodes: int
    producer: str
    # Bytes of weights kept in external data files (0 for a self-contained model).
    external_bytes: int = 0


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    if not vi.type.HasField("tensor_type"):
        raise EngineError(
            "unsupported_model",
            f"graph input/output '{vi.name}' is not a tensor (sequence or map types are not supported)",
        )
    tt = vi.type.tensor_type
    dtype = ONNX_TO_NUMPY.get(int(tt.elem_type))
    if dtype is None:
        name = TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "UNDEFINED"
        raise EngineError("unsupported_model", f"graph input/output '{vi.name}' has unsupported type {name}")
    shape: list[int | str] = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or "?")
    return TensorInfo(vi.name, dtype, tuple(shape))


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def walk_graphs(model: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto, int]]:
    """Every graph of the model with its nesting depth (the main graph is 0), without recursion, refusing
    nesting deeper than MAX_SUBGRAPH_DEPTH before descending further."""
    stack: list[tuple[onnx.GraphProto, int]] = [(model.graph, 0)]
    while stack:
        graph, depth = stack.pop()
        if depth > MAX_SUBGRAPH_DEPTH:
            raise EngineError(
                "model_too_complex",
                f"the model nests subgraphs (If/Loop/Scan bodies) more than {MAX_SUBGRAPH_DEPTH} levels deep; "
                "lowbit does not load such graphs. Flatten the control flow before exporting",
            )
        yield graph, depth
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append((attr.g, depth + 1))
                stack.extend((g, depth + 1) for g in attr.graphs)


def graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, TensorProto]]:
    """The tensors stored in one graph (not its subgraphs): initializers, sparse initializers' values and
    indices, and tensor-valued node attributes (Constant, ConstantOfShape...)."""
    for t in graph.initializer:
        yield f"initializer '{t.name}'", t
    for sp in graph.sparse_initializer:
        yield f"sparse initializer '{sp.values.name}'", sp.values
        yield f"sparse initializer '{sp.values.name}' indices", sp.indices
    for node in graph.node:
        for attr in node.attribute:
            where = f"attribute '{attr.name}' of node '{node.name or node.op_type}'"
            if attr.HasField("t"):
                yield where, attr.t
            for t in attr.tensors:
                yield where, t
            if attr.HasField("sparse_tensor"):
                yield where, attr.sparse_tensor.values


def _elements(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= max(int(d), 0)
    return n


def _stored_values(t: TensorProto) -> int:
    """How many element slots the tensor's data actually holds (raw bytes count as up to two 4-bit
    elements each), an upper bound on what its declared shape may claim."""
    typed = (len(t.float_data) + len(t.int32_data) + len(t.string_data) + len(t.int64_data)
             + len(t.double_data) + len(t.uint64_data))
    return 2 * len(t.raw_data) + 2 * typed


def _short(text: str, n: int = 120) -> str:
    """A name from the file, for a message: bounded, control characters shown escaped."""
    return repr(text[:n])[1:-1] + ("..." if len(text) > n else "")


def _check_tensor(where: str, t: TensorProto, bundled: bool) -> None:
    if is_external(t):
        if bundled:
            return  # external.check_external checks the reference against the model's folder
        # Refused from the declaration alone: the location (which may be '../../etc/passwd', an absolute
        # path or a symlink) is never opened.
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        raise EngineError(
            "external_data_not_supported",
            f"{_short(where)} keeps its data in an external file ('{_short(location)}'), which a single .onnx "
            "upload does not bring. Upload the model as a .zip or .tar bundle holding the .onnx file and its "
            "data files, or save it self-contained with onnx.save_model(model, path, save_as_external_data=False) "
            "if it is under 2 GB",
        )
    if any(int(d) < 0 for d in t.dims):
        raise EngineError("invalid_model", f"{_short(where)} declares a negative dimension {list(t.dims)}")
    declared = _elements(t.dims)
    if declared > _stored_values(t):
        raise EngineError(
            "invalid_model",
            f"{_short(where)} declares shape {list(t.dims)} ({declared} elements) but holds data for far fewer; "
            "the file is corrupt or crafted",
        )


def _check_declared_shape(vi: onnx.ValueInfoProto) -> None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return
    # A dim_value of 0 or below is how some exporters (Paddle2ONNX: -1) spell a dynamic dimension, as
    # inspect_model_file reads it; only positive sizes are declarations to check.
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value") and d.dim_value > 0]
    if any(d > MAX_DIM for d in dims) or _elements(dims) > MAX_DECLARED_ELEMENTS:
        raise EngineError(
            "model_too_large",
            f"tensor '{_short(vi.name)}' declares shape {dims[:8]}{'...' if len(dims) > 8 else ''}, more than "
            f"{MAX_DECLARED_ELEMENTS} elements; lowbit refuses absurd declared shapes before allocating anything",
        )


def check_declarations(model: onnx.ModelProto, folder: Path | None = None) -> None:
    """What the file declares, checked before anything reads, allocates or validates it: subgraph depth,
    tensors kept in external files (refused, or with ``folder``, the unpacked bundle the model came in,
    checked against it), stored tensors whose shape claims more data than they hold, and declared shapes
    beyond any real model. Runs in time linear in the file, without recursion."""
    for graph, _depth in walk_graphs(model):
        for where, t in graph_tensors(graph):
            _check_tensor(where, t, folder is not None)
        for vi in (*graph.input, *graph.output, *graph.value_info):
            _check_declared_shape(vi)
    for fn in model.functions:  # model-local functions' Constant tensors: never external
        for node in fn.node:
            for attr in node.attribute:
                for t in (attr.t, *attr.tensors) if attr.HasField("t") else attr.tensors:
                    if is_external(t):
                        raise EngineError("unsupported_model", f"function '{_short(fn.name)}' keeps a tensor in an "
                                          "external file; lowbit reads external data only from the model's graphs")


def parse_model_bytes(data: bytes) -> onnx.ModelProto:
    """Parse a serialized ONNX model; EngineError('invalid_model') when it is not one."""
    if not data:
        raise EngineError("invalid_model", "the model file is empty")
    head = data[:4]
    if head.startswith(b"PK"):
        raise EngineError(
            "invalid_model",
            "the file is a zip archive, not an ONNX model; upload the .onnx file itself "
            "(PyTorch .pt/.pth checkpoints are not accepted)",
        )
    if head[:1] == b"\x80":
        raise EngineError("invalid_model", "the file is a Python pickle, not an ONNX model; export it to ONNX first")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        if "depth" in str(exc).lower():
            raise EngineError(
                "model_too_complex",
                "the model nests messages too deeply to parse (subgraphs inside subgraphs, dozens of levels); "
                f"lowbit loads graphs nested at most {MAX_SUBGRAPH_DEPTH} levels. Flatten the control flow",
            ) from exc
        raise EngineError(
            "invalid_model", f"the file is not a valid ONNX model (protobuf parse failed: {exc}); "
            "it may be truncated or not an ONNX file"
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise EngineError("invalid_model", "the file does not contain an ONNX graph (no nodes, no outputs)")
    return model


def check_model(model: onnx.ModelProto, path: Path | None = None) -> ModelInfo:
    """Check structure, opset and self-containedness; describe inputs and outputs. With ``path`` (the model's
    file in its unpacked bundle, ``model`` loaded without its external data), external data is allowed and
    every reference is checked against the file's folder (worker/engine/external.py)."""
    if not model.opset_import:
        raise EngineError("invalid_model", "the model declares no opset; it is not a valid ONNX model")
    opset = default_opset(model)
    if opset and opset < MIN_OPSET:
        raise EngineError(
            "unsupported_opset",
            f"the model uses ONNX opset {opset}; lowbit needs opset {MIN_OPSET} or newer. "
            f"Re-export it with a newer opset (e.g. torch.onnx.export(..., opset_version=17))",
        )
    folder = Path(path).parent if path is not None else None
    check_declarations(model, folder)
    refs = check_external(model, folder) if folder is not None else {}
    try:
        # With external data the checker reads the file by path (it checks the data files exist, which
        # check_external already did without following links); the proto alone would be read against the
        # current directory.
        onnx.checker.check_model(str(path) if refs else model)
    except Exception as exc:
        raise EngineError("invalid_model", f"the ONNX model failed validation: {str(exc).strip()[:500]}") from exc
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_tensor_info(vi) for vi in model.graph.input if vi.name not in initializers)
    outputs = tuple(_tensor_info(vi) for vi in model.graph.output)
    if not inputs:
        raise EngineError("unsupported_model", "the model has no runtime inputs (every input is an initializer)")
    if not outputs:
        raise EngineError("invalid_model", "the model has no outputs")
    return ModelInfo(
        format="onnx",
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        num_nodes=len(model.graph.node),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        external_bytes=external_bytes(refs),
    )


def external_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor of every graph that keeps its data externally, with where it is (for messages)."""
    for graph, _depth in walk_graphs(model):
        for where, t in graph_tensors(graph):
            if is_external(t):
                yield where, t


def check_external(model: onnx.ModelProto, folder: Path) -> dict[str, ExternalRef]:
    """Every external reference of ``model`` (loaded without its data), checked against ``folder``."""
    return check_refs(external_tensors(model), folder)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(True for _ in external_tensors(model))


def inspect_model_file(path: Path) -> ModelInfo:
    """Check a model file; one whose weights are in external data files is checked against its folder."""
    model = parse_model_bytes(Path(path).read_bytes())
    return check_model(model, Path(path) if has_external_data(model) else None)
