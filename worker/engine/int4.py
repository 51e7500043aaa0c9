"""4-bit blockwise weight-only quantization: MatMul weights to ONNX Runtime's MatMulNBits.

Algorithms: ``rtn`` (round to nearest, no data), ``hqq`` (half-quadratic, no data), ``k_quant`` (ONNX
Runtime's k-quant: each block's scale and minimum searched, asymmetric, no data), ``gptq``
(ONNX Runtime's GPTQ on the calibration set) and ``clip_search``: for every block of every weight
column, the clipping ratio that minimises the activation-weighted squared error
sum_k E[x_k^2] (w_k - q(w_k))^2, with E[x_k^2] measured on the calibration set. Clipping a block's rare
large weights buys resolution for all the others; the activations say which weights matter. The
chosen clipping is applied to the float weights, and ONNX Runtime's round-to-nearest kernel then
quantizes them, so the packed format is ONNX Runtime's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine import runtime
from worker.engine.blockquant import clip_search, four_bit_error
from worker.engine.errors import EngineError
from worker.engine.normalize import subgraph_op_types
from worker.engine.streaming import eight_bit_inline, eight_bit_names, ranking_note

if TYPE_CHECKING:  # annotations only: the option tables import the recipes, whose int4 handler imports this module
    from worker.engine.config import RecipeOptions

# onnxruntime.quantization and its matmul_nbits_quantizer (~0.7 s and 50 MB) are imported inside the functions that
# run ONNX Runtime's 4-bit quantizer: the pipeline, and auto for find_targets, import this module without them.

log = logging.getLogger(__name__)
Batches = Callable[[], Iterable[tuple[dict[str, np.ndarray], int]]]


@dataclass
class Int4Result:
    algorithm: str
    quantized_layers: list[str]
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    weights: int = 0
    weight_bytes_fp32: int = 0
    weight_bytes_quantized: int = 0

    @property
    def bits_per_weight(self) -> float | None:
        return 8.0 * self.weight_bytes_quantized / self.weights if self.weights else None


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm nodes with a constant weight as MatMul (+ Add for the bias), transposing a
    ``transB`` weight, so the 4-bit MatMul kernel can take them. Returns how many were rewritten."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    count = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = (
            node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
            and uses.get(node.input[1], 0) == 1
        )
        if not ok:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = node.input[1] + "_kn"
        replaced.add(node.input[1])
        model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                              name=node.name + "_bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        # Drop only the weights this rewrite replaced (each had a single use: that Gemm); other
        # initializers may be read by If/Loop bodies or be graph outputs.
        keep = [t for t in model.graph.initializer if t.name not in replaced]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def find_targets(model: onnx.ModelProto, opts: RecipeOptions) -> tuple[dict[str, str], list[str]]:
    """MatMul nodes whose weight (input B) is a 2-D float initializer: {node name: weight name}.
    Also returns warnings naming what stays in float and why."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n.name)
    targets: dict[str, str] = {}
    warnings: list[str] = []
    shared: list[str] = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in opts.nodes_to_exclude:
            continue
        b = node.input[1]
        if b not in inits:
            continue  # activation x activation (attention scores): nothing to quantize
        t = inits[b]
        if t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            warnings.append(f"MatMul '{node.name}' kept in float: its weight is not a 2-D float32 matrix")
            continue
        if len(uses.get(b, [])) > 1:
            shared.append(node.name)
            continue
        k = int(t.dims[0])
        if k % opts.block_size:
            warnings.append(
                f"MatMul '{node.name}': inner dimension {k} is not a multiple of block size {opts.block_size}; "
                "its last block is zero-padded"
            )
        targets[node.name] = b
    if shared:
        warnings.append(
            f"{len(shared)} MatMul(s) share their weight with another node (tied weights) and were kept in "
            f"float, since quantizing each use would store the weight twice: {', '.join(shared[:5])}"
        )
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1] in inits:
            warnings.append(f"Gemm '{node.name}' kept in float (alpha/beta/transA or a shared weight)")
    return targets, warnings


def activation_moments(
    model: onnx.ModelProto, targets: dict[str, str], batches: Batches, providers: list[str], threads: int
) -> tuple[dict[str, np.ndarray], int]:
    """E[x_k^2] of each target MatMul's input, per input channel k, over the calibration set."""
    nodes = {n.name: n for n in model.graph.node}
    act = {name: nodes[name].input[0] for name in targets}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for a in sorted(set(act.values()) - have):
        m.graph.output.append(onnx.ValueInfoProto(name=a))
    sess = runtime.make_session(m.SerializeToString(), providers, threads, "model for calibration")
    return moments_over(sess, act, batches())


def moments_over(sess: Any, act: dict[str, str], feeds: Iterable[tuple[dict[str, np.ndarray], int]],
                 done: Callable[[], None] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """E[x_k^2] per input channel k of each activation ``act`` names (node -> tensor), over (feed, samples)
    pairs run through ``sess``, a session whose outputs include those tensors; ``done`` is called after each
    run. Returns the moments by node and the number of samples."""
    names = [o.name for o in sess.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples = 0
    for feed, n in feeds:
        outs = dict(zip(names, runtime.run(sess, feed, "model during calibration"), strict=True))
        outs.update(feed)
        for a in set(act.values()):
            x = np.asarray(outs[a], dtype=np.float64)
            x2 = (x * x).reshape(-1, x.shape[-1])
            sums[a] = sums.get(a, 0.0) + x2.sum(axis=0)
            counts[a] = counts.get(a, 0) + x2.shape[0]
        del outs
        samples += n
        if done is not None:
            done()
    return {name: sums[a] / max(counts[a], 1) for name, a in act.items() if a in sums}, samples


def _reader(batches: Batches) -> Any:
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    # ONNX Runtime's GPTQ deep-copies the reader, so it holds the (bounded) calibration feeds.
    pairs = list(batches())
    feeds = [feed for feed, _ in pairs]

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information: its reader class is Any
        def __init__(self) -> None:
            self.pos = 0
            self.samples = sum(n for _, n in pairs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.pos >= len(feeds):
                return None
            self.pos += 1
            return feeds[self.pos - 1]

        def rewind(self) -> None:
            self.pos = 0

    return Reader()


def quantize_int4(
    src: Path,
    dest: Path,
    opts: RecipeOptions,
    algorithm: str,
    batches: Batches | None,
    providers: list[str],
    threads: int,
) -> Int4Result:
    """Quantize the MatMul weights of ``src`` to 4 bits and write the model to ``dest``."""
    model = onnx.load(str(src))
    rewritten = gemm_to_matmul(model)
    targets, warnings = find_targets(model, opts)
    if rewritten:
        warnings.insert(0, f"rewrote {rewritten} Gemm node(s) as MatMul (+Add) so their weights can be 4-bit")
    if not targets:
        _refuse_no_targets(model)
    calibration: dict[str, Any] | None = None
    started = time.perf_counter()
    op_types = ("MatMul", "Gather") if opts.quantize_embeddings else ("MatMul",)
    moments: dict[str, np.ndarray] = {}
    samples = 0
    if algorithm == "clip_search":
        assert batches is not None
        moments, samples = activation_moments(model, targets, batches, providers, threads)
    errors = None
    if opts.int8_most_sensitive:
        inits = {t.name: t for t in model.graph.initializer}
        errors = {name: four_bit_error([(0, numpy_helper.to_array(inits[w]).astype(np.float32))], moments.get(name),
                                       opts.block_size, opts.symmetric) for name, w in targets.items()}
    eight = eight_bit_names(opts, list(targets), errors)
    if errors:
        warnings.append(ranking_note(errors, eight, opts.int8_most_sensitive))
    if algorithm == "clip_search":
        # The 8-bit layers keep their weights: clipping is chosen for 4-bit levels.
        calibration = _clip_weights(model, {n: w for n, w in targets.items() if n not in eight}, moments, samples,
                                    opts, started)
    config, reader = _algorithm_config(algorithm, opts, op_types, batches)
    include = [t for t in targets if t not in eight]
    if opts.quantize_embeddings:
        include += [n.name for n in model.graph.node if n.op_type == "Gather"]
    # ONNX Runtime's nodes_to_include adds to its op-type selection rather than restricting it, so
    # everything else of those op types is excluded explicitly.
    exclude = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in set(include)]
    out_model = _run_quantizer(model, opts, algorithm, config, exclude)
    eight_bit_inline(out_model, eight, opts)
    if reader is not None:
        calibration = {"method": "gptq", "samples": reader.samples, "seconds": round(time.perf_counter() - started, 3)}
    res = Int4Result(algorithm=algorithm, quantized_layers=[], warnings=warnings, calibration=calibration)
    _account(model, out_model, res)
    onnx.save_model(out_model, str(dest))
    return res


def _refuse_no_targets(model: onnx.ModelProto) -> None:
    inside = " outside If/Loop/Scan bodies (which 4-bit quantization does not reach, and where this " \
        "model's MatMuls are)" if "MatMul" in subgraph_op_types(model) else ""
    raise EngineError(
        "nothing_to_quantize",
        f"the model has no MatMul with a constant 2-D weight{inside}, so there is nothing for 4-bit "
        "weight-only quantization to do; try int8_dynamic or fp16",
    )


def _clip_weights(model: onnx.ModelProto, targets: dict[str, str], moments: dict[str, np.ndarray], samples: int,
                  opts: RecipeOptions, started: float) -> dict[str, Any]:
    """clip_search: each target's weights clipped, in place in ``model``, to the ratio that minimises the
    error weighted by its input's second moments on the calibration data; returns the calibration record."""
    inits = {t.name: t for t in model.graph.initializer}
    ratios = []
    for name, wname in targets.items():
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        h = moments.get(name)
        if h is None or h.shape[0] != w.shape[0]:
            h = np.ones(w.shape[0])
        clipped, ratio = clip_search(w, h + 1e-12, opts.block_size, opts.symmetric)
        ratios.append(ratio)
        inits[wname].CopyFrom(numpy_helper.from_array(clipped, wname))
    return {"method": "clip_search", "samples": samples, "seconds": round(time.perf_counter() - started, 3),
            # None where no weight was clipped (nothing to average: numpy's mean of none is NaN and a warning)
            "mean_clip_ratio": round(float(np.mean(ratios)), 4) if ratios else None}


def _algorithm_config(algorithm: str, opts: RecipeOptions, op_types: tuple[str, ...],
                      batches: Batches | None) -> tuple[Any, Any]:
    """ONNX Runtime's configuration for ``algorithm``, and GPTQ's calibration reader (None for the others)."""
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
    )

    quant_axes = (("MatMul", 0), ("Gather", 1))
    level = opts.accuracy_level or None
    if algorithm in ("clip_search", "rtn"):
        # clip_search has clipped the weights already: they are rounded to nearest like rtn's.
        return DefaultWeightOnlyQuantConfig(
            block_size=opts.block_size, is_symmetric=opts.symmetric, accuracy_level=level,
            op_types_to_quantize=op_types, quant_axes=quant_axes,
        ), None
    if algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=opts.block_size, op_types_to_quantize=op_types,
                                        quant_axes=quant_axes), None
    if algorithm == "k_quant":
        return KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types), None
    if algorithm == "gptq":
        assert batches is not None
        reader = _reader(batches)
        return GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=opts.block_size,
                                         op_types_to_quantize=op_types), reader
    # parse_options refuses any other algorithm
    raise EngineError("invalid_option", f"unknown int4 algorithm {algorithm}")  # pragma: no cover


def _run_quantizer(model: onnx.ModelProto, opts: RecipeOptions, algorithm: str, config: Any,
                   exclude: list[str]) -> onnx.ModelProto:
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Its warning that it raised the opset to 21 ("the generated model may not be a valid model"), printed on
    # every job with 4-bit embeddings, says nothing to act on: the pipeline loads and validates what it wrote.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    level = opts.accuracy_level or None
    try:
        quantizer = MatMulNBitsQuantizer(
            model, block_size=opts.block_size, is_symmetric=opts.symmetric, accuracy_level=level,
            nodes_to_exclude=exclude, algo_config=config,
        )
        quantizer.process()
        out_model: onnx.ModelProto = quantizer.model.model
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(
            "quantization_failed",
            f"ONNX Runtime's 4-bit quantizer ({algorithm}) failed on this model: {str(exc).strip()[:400]}",
        ) from exc
    return out_model


def _account(before: onnx.ModelProto, after: onnx.ModelProto, res: Int4Result) -> None:
    """Bits per weight, including scales and zero points, over the weights that became 4-bit."""
    inits = {t.name: t for t in after.graph.initializer}
    for node in after.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        res.quantized_layers.append(node.name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # MatMulNBits(A, B, scales, zero_points...): A is the activation. GatherBlockQuantized(data,
        # indices, scales, zero_points): every initializer input is stored weight data.
        candidates = node.input[1:] if node.op_type == "MatMulNBits" else node.input
        stored = [inits[i] for i in candidates if i in inits]
        res.weight_bytes_quantized += sum(_nbytes(t) for t in stored)
        if node.op_type == "MatMulNBits":
            count = int(attrs["K"]) * int(attrs["N"])
        else:
            data = inits[node.input[0]]
            count = int(np.prod(data.dims)) * (2 if data.data_type in (TensorProto.UINT8, TensorProto.INT8) else 1)
        res.weights += count
        res.weight_bytes_fp32 += 4 * count


def _nbytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return int(numpy_helper.to_array(t).nbytes)
