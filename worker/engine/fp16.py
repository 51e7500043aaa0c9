"""float16 weights and compute, with float32 inputs/outputs kept by default."""

from __future__ import annotations

from pathlib import Path

import onnx

from worker.engine.config import RecipeOptions
from worker.engine.errors import EngineError

# Kept in float32 on top of ONNX Runtime's default list: ops whose fp16 results overflow or lose too
# much (large reductions, exponentials, normalisation statistics) or that have no fp16 CPU kernel.
FP16_UNSAFE = (
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceLogSumExp",
    "Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "Range", "CumSum",
    "TopK", "NonMaxSuppression", "RoiAlign", "Resize", "Upsample", "Einsum",
)


def convert_fp16(src: Path, dest: Path, opts: RecipeOptions) -> list[str]:
    """Convert ``src`` to float16; returns the op types kept in float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = list(opts.op_block_list) if opts.op_block_list is not None else [*DEFAULT_OP_BLOCK_LIST, *FP16_UNSAFE]
    model = onnx.load(str(src))
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=opts.keep_io_types, op_block_list=block,
            node_block_list=list(opts.nodes_to_exclude) or None,
        )
    except Exception as exc:
        raise EngineError("quantization_failed", f"float16 conversion failed: {str(exc).strip()[:400]}") from exc
    onnx.save_model(converted, str(dest))
    present = {n.op_type for n in model.graph.node}
    return sorted(present & set(block))
