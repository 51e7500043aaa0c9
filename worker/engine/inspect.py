"""Load and check an uploaded ONNX model without running it (only the ``onnx`` package is needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from worker.engine.errors import EngineError

MIN_OPSET = 11

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


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)  # noqa: SLF001 - walks subgraphs too
    )


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
        raise EngineError(
            "invalid_model", f"the file is not a valid ONNX model (protobuf parse failed: {exc}); "
            "it may be truncated or not an ONNX file"
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise EngineError("invalid_model", "the file does not contain an ONNX graph (no nodes, no outputs)")
    return model


def check_model(model: onnx.ModelProto) -> ModelInfo:
    """Check structure, opset and self-containedness; describe inputs and outputs."""
    if not model.opset_import:
        raise EngineError("invalid_model", "the model declares no opset; it is not a valid ONNX model")
    opset = default_opset(model)
    if opset and opset < MIN_OPSET:
        raise EngineError(
            "unsupported_opset",
            f"the model uses ONNX opset {opset}; lowbit needs opset {MIN_OPSET} or newer. "
            f"Re-export it with a newer opset (e.g. torch.onnx.export(..., opset_version=17))",
        )
    if _has_external_data(model):
        raise EngineError(
            "external_data_not_supported",
            "the model stores weights in external data files; upload a self-contained .onnx "
            "(onnx.save_model(model, path, save_as_external_data=False))",
        )
    try:
        onnx.checker.check_model(model)
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
    )


def inspect_model_file(path: Path) -> ModelInfo:
    return check_model(parse_model_bytes(Path(path).read_bytes()))
