"""Quantizing a model that keeps its weights in external data files, one tensor at a time.

The whole-model pipeline loads the model (and ONNX Runtime's quantizers copy it), which a model of many
gigabytes cannot afford. Here the graph is loaded without its weights, each MatMul weight is read through a
memory map, quantized and appended to the output's data file, and the other external tensors are copied in
chunks: the process holds one weight (and its quantized form) at a time. The output is ``model.onnx`` and
``model.onnx.data`` in one folder.

Recipes: ``int4_weight_only`` with round-to-nearest (ONNX Runtime's own 4-bit kernel, MatMulNBits; chosen
MatMuls in 8 bits; 4-bit embedding tables in GatherBlockQuantized), ``int8_dynamic`` (int8 per-channel weights,
DynamicQuantizeMatMul) and ``fp16`` (the whole-model conversion on the weight-free graph). Validation runs the
original and the quantized model in turn in a child process (``validate_in_turn``), never both at once.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.blockquant import clip_search, four_bit_error
from worker.engine.errors import EngineError
from worker.engine.external import DataWriter, ExternalRef, TensorReader, point_to
from worker.engine.inspect import check_external, external_tensors, walk_graphs

if TYPE_CHECKING:  # annotations only (the option tables import the recipes)
    from worker.engine.config import RecipeOptions

ProgressFn = Callable[[str, float], None]
MS_DOMAIN = "com.microsoft"
DATA_NAME = "model.onnx.data"
MODEL_NAME = "model.onnx"
# Recipes (and their options) this engine runs; anything else on a model with external data is refused at
# submit time with ``refusal``'s message.
STREAMED_RECIPES = ("int4_weight_only", "int8_dynamic", "fp16")


def refusal(recipe: str, options: dict[str, Any]) -> str | None:
    """Why ``recipe`` with ``options`` cannot run on a model with external data yet (None when it can)."""
    if recipe not in STREAMED_RECIPES:
        return (f"recipe {recipe} cannot quantize a model whose weights are in external data files yet; "
                f"use {' or '.join(STREAMED_RECIPES)} (weights streamed one tensor at a time)")
    if recipe == "int4_weight_only":
        algorithm = options.get("algorithm")
        if algorithm not in (None, "rtn", "clip_search", "hqq", "k_quant"):
            return (f"int4_weight_only algorithm {algorithm} cannot run on a model with external data yet; "
                    "use algorithm rtn, clip_search (calibrated), hqq or k_quant, all streamed")
        if options.get("int8_activations"):
            return "int4_weight_only option int8_activations cannot run on a model with external data yet"
    if recipe == "int8_dynamic" and options.get("four_bit_weights"):
        return ("int8_dynamic option four_bit_weights cannot run on a model with external data yet; use "
                "int4_weight_only, whose 4-bit weights are streamed")
    return None


@dataclass
class StreamResult:
    quantized_layers: list[str]
    int8_layers: list[str]
    kept_layers: list[str]
    weights: int = 0
    weight_bytes_fp32: int = 0
    weight_bytes_quantized: int = 0
    original_bytes: int = 0
    quantized_bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    warnings: list[str] = field(default_factory=list)
    embedding_layers: list[str] = field(default_factory=list)  # Gathers now reading 4-bit tables
    # clip_search: the mean clipping ratio of each slab, with its size; 4-bit MatMuls without moments.
    clip_ratios: list[tuple[float, int]] = field(default_factory=list, repr=False)
    unclipped: list[str] = field(default_factory=list)
    # A tied table's 4-bit scales [vocab, blocks], kept for its Gather (quantize_embeddings) to share the data.
    tied_scales: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def bits_per_weight(self) -> float | None:
        return 8.0 * self.weight_bytes_quantized / self.weights if self.weights else None


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB: VmHWM, which starts afresh in a new program (ru_maxrss
    carries the parent's peak across fork and exec: a child of a large worker would report the worker's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_bytes(path: Path, refs: dict[str, ExternalRef]) -> int:
    """A model's size on disk: its .onnx file and every data file its (checked) references name, once each."""
    files = {r.file for r in refs.values()}
    return os.path.getsize(path) + sum(os.path.getsize(Path(path).parent / f) for f in files)


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for graph, _depth in walk_graphs(model):
        for node in graph.node:
            for name in node.input:
                if name:
                    counts[name] = counts.get(name, 0) + 1
    return counts


@dataclass(frozen=True)
class _Target:
    node: onnx.NodeProto
    weight: str  # the initializer
    # B is Transpose(weight) (a tied lm_head reading the [vocab, dim] embedding table) or a Gemm's transB weight
    transposed: bool
    bias: str = ""  # a Gemm's C, added after the quantized product

    def kn(self, inits: dict[str, TensorProto]) -> tuple[int, int]:
        rows, cols = (int(d) for d in inits[self.weight].dims)
        return (cols, rows) if self.transposed else (rows, cols)


def _targets(model: onnx.ModelProto, excluded_nodes: Iterable[str]) -> list[_Target]:
    """The main graph's MatMuls whose second input is a 2-D float32 initializer, or its 2-D transpose (how
    exporters write an lm_head tied to the embedding table), not excluded by name."""
    inits = {t.name: t for t in model.graph.initializer}
    transposes = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose" and len(n.input) == 1}
    excluded = set(excluded_nodes)
    out = []
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.name not in excluded:
            target = _gemm_target(node, inits)
            if target is not None:
                out.append(target)
            continue
        if node.op_type != "MatMul" or len(node.input) < 2 or node.name in excluded:
            continue
        b, transposed = node.input[1], False
        if b not in inits and b in transposes:
            tr = transposes[b]
            perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0])
            if perm == [1, 0]:
                b, transposed = tr.input[0], True
        w = inits.get(b)
        if w is not None and w.data_type == TensorProto.FLOAT and len(w.dims) == 2 and min(w.dims) > 0:
            out.append(_Target(node, b, transposed))
    return out


def matmul_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Each quantizable MatMul/Gemm (nothing excluded) -> the activation it multiplies: what clip_search's
    moments are measured on."""
    return {t.node.name: t.node.input[0] for t in _targets(model, ())}


def _gemm_target(node: onnx.NodeProto, inits: dict[str, TensorProto]) -> _Target | None:
    """A Gemm that is a plain linear layer (alpha and beta 1, A not transposed, a 2-D float32 weight B): how
    PyTorch exports nn.Linear (transB=1, the bias as C)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return None
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 2 or min(w.dims) <= 0:
        return None
    bias = node.input[2] if len(node.input) > 2 else ""
    return _Target(node, node.input[1], bool(attrs.get("transB", 0)), bias)


def eight_bit_names(opts: RecipeOptions, targets: list[str], errors: dict[str, float] | None = None) -> set[str]:
    """int4_weight_only's MatMuls to keep in 8 bits: options int8_nodes, with int8_last_matmul the last target in
    graph order (the MatMul nearest the outputs: an LLM's lm_head), and with int8_most_sensitive N the N others
    whose weights lose most in 4 bits (``errors``: each target's ``blockquant.four_bit_error``). ``targets``: the
    MatMuls that can be quantized, in graph order."""
    names = set(opts.int8_nodes)
    if opts.int8_last_matmul and targets:
        names.add(targets[-1])
    unknown = sorted(names - set(targets))
    if unknown:
        raise EngineError("invalid_option", f"int8_nodes names {unknown[:5]}, which are not MatMuls with a "
                          "constant 2-D float32 weight in this model (or are excluded)")
    if opts.int8_most_sensitive and errors:
        ranked = sorted((n for n in targets if n not in names and n in errors), key=lambda n: -errors[n])
        names.update(ranked[:opts.int8_most_sensitive])
    return names


def ranking_note(errors: dict[str, float], int8: set[str], n: int) -> str:
    """The job's note on int8_most_sensitive: which MatMuls it kept in 8 bits, with their 4-bit errors."""
    ranked = sorted(errors, key=lambda k: -errors[k])
    chosen = [k for k in ranked if k in int8][:n]
    lost = ", ".join(f"{k} ({errors[k]:.4g})" for k in chosen)
    rest = [errors[k] for k in ranked if k not in int8]
    top = f"; the largest left in 4 bits: {max(rest):.4g}" if rest else ""
    return (f"int8_most_sensitive: kept in 8 bits the {len(chosen)} MatMul(s) whose weights lose most in 4 bits "
            f"(relative error): {lost}{top}")


def eight_bit_inline(model: onnx.ModelProto, names: set[str], opts: RecipeOptions) -> None:
    """Turn the float MatMuls ``names`` of an in-memory (self-contained) model into 8-bit MatMulNBits, their
    tensors kept in the model: the whole-model int4 path's int8_nodes and int8_last_matmul."""
    if not names:
        return
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits) | {o for n in graph.node for o in n.output}
    res = StreamResult([], [], [])
    for node in graph.node:
        if node.name in names and node.op_type == "MatMul":
            w_t = inits[node.input[1]]
            new = _quantize_one(graph, TensorReader(Path("."), {}), w_t, False, "int8", opts, None, taken, res)
            _replace(node, new, "int8", opts, int(w_t.dims[0]), int(w_t.dims[1]))
    if not any(i.domain == MS_DOMAIN for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    used = _uses(model)
    keep = [t for t in graph.initializer if used.get(t.name, 0)]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# Bytes of float weights read at a time: a weight of any size is quantized a slab of rows at a time.
CHUNK_BYTES = 16 << 20


def _chunk_rows(k: int, n: int, multiple: int) -> int:
    rows = max(multiple, (CHUNK_BYTES // max(4 * n, 1)) // multiple * multiple)
    return min(rows, -(-k // multiple) * multiple)


# A slab quantizer: float [rows of whole blocks, N] -> packed data [N, blocks, block*bits/8], scales [N, blocks]
# and zero points (uint8 packed [N, ceil(blocks * bits / 8)], float [N, blocks], or None when symmetric).
SlabQuantizer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def ort_kernel(bits: int, block: int, symmetric: bool) -> SlabQuantizer:
    """ONNX Runtime's own round-to-nearest kernel (what MatMulNBitsQuantizer's default config runs)."""
    from onnxruntime.capi import _pybind_state as ort_c

    kernel = ort_c.quantize_matmul_4bits if bits == 4 else ort_c.quantize_matmul_8bits
    per_byte = 8 // bits

    def quantize(slab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        kb, n = slab.shape
        cb = kb // block
        p = np.zeros((n, cb, block * bits // 8), dtype=np.uint8)
        z = np.zeros((n, -(-cb // per_byte)), dtype=np.uint8)
        sc = np.zeros((n, cb), dtype=np.float32)
        kernel(p, np.ascontiguousarray(slab), sc, z, block, n, kb, symmetric)
        return p, sc, None if symmetric else z

    return quantize


def _pack4(q: np.ndarray, n: int, cb: int, block: int) -> np.ndarray:
    """4-bit levels [N, blocks * block] (0..15) packed two to a byte, the low nibble first: [N, blocks, block/2]."""
    q = q.astype(np.uint8).reshape(n, cb * block)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, cb, block // 2)


def k_quant(block: int) -> SlabQuantizer:
    """ONNX Runtime's k-quant (its neural_compressor port of llama.cpp's search for each block's scale and
    minimum), asymmetric 4 bits."""
    from worker.engine import runtime  # lazy: it imports onnxruntime, and the app imports this module

    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    def quantize(slab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        kb, n = slab.shape
        cb = kb // block
        q, scale, zp = quant_tensor_k_quant_cpu(np.ascontiguousarray(slab.T), 4, block)
        z = np.asarray(zp, dtype=np.uint8).reshape(n, cb)
        if cb % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        return (_pack4(q, n, cb, block), np.asarray(scale, dtype=np.float32).reshape(n, cb),
                z[:, 0::2] | (z[:, 1::2] << 4))

    return quantize


def hqq(block: int) -> SlabQuantizer:
    """ONNX Runtime's HQQ (half-quadratic optimisation of each block's zero point; float zero points), asymmetric
    4 bits. Its iterations stop when the mean error over what it is given stops falling: given a slab, that is
    the slab's error rather than the whole weight's."""
    from worker.engine import runtime  # lazy: it imports onnxruntime, and the app imports this module

    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    hq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block))

    def quantize(slab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        # Through its MatMul entry point, on a one-node graph holding the slab as the weight: it takes and gives
        # ONNX tensors (its PyTorch stays inside ONNX Runtime's module).
        kb, n = slab.shape
        cb = kb // block
        graph = onnx.GraphProto()
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(slab), "w"))
        hq.quantize(helper.make_node("MatMul", ["a", "w"], ["y"], name="slab"), [graph])
        made = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        return (made["w_Q4"].reshape(n, cb, block // 2), made["w_scales"].astype(np.float32).reshape(n, cb),
                made["w_zero_points"].astype(np.float32).reshape(n, cb))

    return quantize


def slab_quantizer(kind: str, opts: RecipeOptions) -> SlabQuantizer:
    """The 4-bit algorithm of option ``algorithm`` (rtn and clip_search round with ONNX Runtime's kernel; clip_search
    clips first), or 8 bits for ``kind`` int8."""
    block = int(getattr(opts, "block_size", 32) or 32)
    symmetric = bool(getattr(opts, "symmetric", True))
    if kind == "int8":
        return ort_kernel(8, block, symmetric)
    algorithm = getattr(opts, "algorithm", None)
    if algorithm == "k_quant":
        return k_quant(block)
    if algorithm == "hqq":
        return hqq(block)
    return ort_kernel(4, block, symmetric)


def _pack_nbits(reader: TensorReader, w_t: TensorProto, transposed: bool, bits: int, block: int,
                quantizer: SlabQuantizer, weighting: np.ndarray | None = None, res: StreamResult | None = None,
                symmetric: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``quantizer`` on one [K, N] weight (stored as [N, K] when ``transposed``), a slab at a time: slabs of whole
    blocks of rows (blocks run along K, so they quantize independently), or of output columns for a transposed
    table. Returns packed data [N, blocks, block*bits/8], scales [N * blocks] and zero points (flat; None when
    symmetric), as MatMulNBits reads them. ``weighting`` [K]: each slab's blocks are clipped by clip_search
    first (4 bits, ``symmetric`` or not)."""

    def clipped(w_kn: np.ndarray, k0: int) -> np.ndarray:
        if weighting is None:
            return w_kn
        out, ratio = clip_search(w_kn, weighting[k0:k0 + w_kn.shape[0]] + 1e-12, block, symmetric)
        if res is not None:
            res.clip_ratios.append((ratio, w_kn.size))
        return out

    rows_, cols_ = (int(d) for d in w_t.dims)
    k, n = (cols_, rows_) if transposed else (rows_, cols_)
    nb = -(-k // block)
    per_byte = 8 // bits
    packed = np.zeros((n, nb, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, nb), dtype=np.float32)
    zp: np.ndarray | None = None

    def place(rows: slice, b0: int, got: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> None:
        nonlocal zp
        p_c, s_c, z_c = got
        cb = s_c.shape[1]
        packed[rows, b0:b0 + cb] = p_c
        scales[rows, b0:b0 + cb] = s_c
        if z_c is None:
            return
        packed_zp = z_c.dtype == np.uint8  # else float zero points, one a block
        if zp is None:
            zp = np.zeros((n, -(-nb // per_byte) if packed_zp else nb), dtype=z_c.dtype)
        z0 = b0 // per_byte if packed_zp else b0
        zp[rows, z0:z0 + z_c.shape[1]] = z_c

    if transposed:
        for n0, rows in reader.rows(w_t, _chunk_rows(n, k, 1)):
            nc = rows.shape[0]
            slab = np.zeros((nb * block, nc), dtype=np.float32)
            slab[:k] = clipped(rows.T, 0)
            place(slice(n0, n0 + nc), 0, quantizer(slab))
    else:
        # Whole zero-point bytes per slab: 4-bit zero points pack two blocks to a byte.
        for r0, rows in reader.rows(w_t, _chunk_rows(k, n, block * per_byte)):
            cb = -(-rows.shape[0] // block)
            slab = np.zeros((cb * block, n), dtype=np.float32)
            slab[:rows.shape[0]] = clipped(rows, r0)
            place(slice(0, n), r0 // block, quantizer(slab))
    return packed, scales.reshape(-1), None if zp is None else zp.reshape(-1)


def _int8_columns(reader: TensorReader, w_t: TensorProto, transposed: bool, per_channel: bool,
                  reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights, one scale per output column (or one for the tensor): [K, N] int8 and scales.
    Two passes over slabs of the stored rows: the ranges, then the rounding."""
    rows_, cols_ = (int(d) for d in w_t.dims)
    k, n = (cols_, rows_) if transposed else (rows_, cols_)
    step = _chunk_rows(rows_, cols_, 1)
    amax = np.zeros(n, dtype=np.float32)
    for r0, rows in reader.rows(w_t, step):
        if transposed:
            amax[r0:r0 + rows.shape[0]] = np.abs(rows).max(axis=1)
        else:
            np.maximum(amax, np.abs(rows).max(axis=0), out=amax)
    if not per_channel:
        amax = np.full(1, amax.max(), dtype=np.float32)
    qmax = 64.0 if reduce_range else 127.0
    scale = (np.maximum(amax, 1e-12) / qmax).astype(np.float32)
    q = np.empty((k, n), dtype=np.int8)
    for r0, rows in reader.rows(w_t, step):
        if transposed:
            s = scale[r0:r0 + rows.shape[0]] if per_channel else scale
            q[:, r0:r0 + rows.shape[0]] = np.clip(np.rint(rows / s[:, None]), -qmax, qmax).T
        else:
            q[r0:r0 + rows.shape[0]] = np.clip(np.rint(rows / scale), -qmax, qmax)
    return q, scale if per_channel else scale.reshape(())


def _add_tensor(graph: onnx.GraphProto, name: str, a: np.ndarray, onnx_type: int, writer: DataWriter | None,
                dims: tuple[int, ...] | None = None) -> None:
    """A new initializer: appended to the data file, or (``writer`` None) kept in the model itself."""
    if writer is None:
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a).reshape(dims or a.shape), name))
        return
    t = graph.initializer.add()
    t.name = name
    t.data_type = onnx_type
    t.dims.extend(dims if dims is not None else a.shape)
    point_to(t, writer.write_array(a))


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def quantize_streaming(src: Path, out_dir: Path, recipe: str, opts: RecipeOptions,
                       step: ProgressFn | None = None, moments: dict[str, np.ndarray] | None = None) -> StreamResult:
    """Quantize the model at ``src`` (weights in external data beside it) into ``out_dir/model.onnx`` and
    ``out_dir/model.onnx.data``, one weight at a time. ``moments``: E[x_k^2] of each MatMul's input per input
    channel (``channel_moments``), for int4_weight_only's clip_search."""
    t0 = time.monotonic()
    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    refs = check_external(model, src.parent)
    reader = TensorReader(src.parent, refs)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = DataWriter(out_dir / DATA_NAME)
    res = StreamResult([], [], [])
    try:
        if recipe == "fp16":
            model = _fp16(model, refs, reader, writer, opts, res, step)
        else:
            _low_bits(model, refs, reader, writer, recipe, opts, res, step, moments)
        writer.close()
        onnx.save_model(model, str(out_dir / MODEL_NAME))
    except BaseException:
        writer.close()
        raise
    res.original_bytes = model_bytes(src, refs)
    res.quantized_bytes = os.path.getsize(out_dir / MODEL_NAME) + os.path.getsize(out_dir / DATA_NAME)
    res.seconds = time.monotonic() - t0
    res.peak_rss_mb = peak_rss_mb()
    if step:
        step("quantizing", 1.0)
    return res


def _low_bits(model: onnx.ModelProto, refs: dict[str, ExternalRef], reader: TensorReader, writer: DataWriter,
              recipe: str, opts: RecipeOptions, res: StreamResult, step: ProgressFn | None,
              moments: dict[str, np.ndarray] | None = None) -> None:
    """int4_weight_only and int8_dynamic: each MatMul/Gemm weight quantized in turn, the rest copied. With
    ``moments`` (clip_search), each 4-bit weight's blocks are clipped first to the ratio that minimises the
    error weighted by its input's second moments (``blockquant.clip_search``, block by block, so a slab of rows
    at a time gives what the whole weight would)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = _targets(model, opts.nodes_to_exclude)
    if not targets:
        raise EngineError("unsupported_model", "the model has no MatMul with a constant 2-D float32 weight; "
                          f"{recipe} quantizes only those")
    int8_names: set[str] = set()
    if recipe == "int4_weight_only":
        errors = _errors(reader, inits, targets, moments or {}, opts) if opts.int8_most_sensitive else None
        int8_names = eight_bit_names(opts, [t.node.name for t in targets], errors)
        if errors:
            res.warnings.append(ranking_note(errors, int8_names, opts.int8_most_sensitive))
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    # (weight, transposed, kind) -> the new node's inputs after A: a weight several MatMuls read is stored once.
    made: dict[tuple[str, bool, str], list[str]] = {}
    biases: dict[str, list[onnx.NodeProto]] = {}  # a Gemm's name -> the Add of its bias
    done_w = 0
    total_w = len({(t.weight, t.transposed) for t in targets})
    # A weight several MatMuls read is clipped for all of their inputs: their moments summed.
    weighting: dict[tuple[str, bool], np.ndarray] = {}
    for t in targets:
        h = moments.get(t.node.name) if moments is not None else None
        if h is not None and h.shape == (t.kn(inits)[0],):
            key2 = (t.weight, t.transposed)
            weighting[key2] = weighting[key2] + h if key2 in weighting else np.asarray(h, dtype=np.float64)
    for t in targets:
        kind = "int8" if t.node.name in int8_names else recipe
        key = (t.weight, t.transposed, kind)
        k, n = t.kn(inits)
        if key not in made:
            res.weights += k * n
            res.weight_bytes_fp32 += 4 * k * n
            h = weighting.get((t.weight, t.transposed)) if kind == "int4_weight_only" else None
            if moments is not None and kind == "int4_weight_only" and h is None:
                res.unclipped.append(t.node.name)
            made[key] = _quantize_one(graph, reader, inits[t.weight], t.transposed, kind, opts, writer, taken, res,
                                      h)
            done_w += 1
            if step:
                step("quantizing", 0.9 * done_w / total_w)
        if t.bias:  # the Gemm's C, added to the quantized product under the Gemm's output name
            product = _unique(f"{t.node.output[0]}_product", taken)
            biases[t.node.name] = [helper.make_node("Add", [product, t.bias], [t.node.output[0]],
                                                    name=_unique(f"{t.node.name}.bias", taken))]
            t.node.output[0] = product
        _replace(t.node, made[key], kind, opts, k, n)
        (res.int8_layers if kind == "int8" else res.quantized_layers).append(t.node.name)
    _insert_after(graph, biases)
    if recipe == "int4_weight_only" and opts.quantize_embeddings:
        _embeddings(graph, reader, inits, opts, writer, taken, made, res)
    _drop_unused_transposes(graph)
    if not any(i.domain == MS_DOMAIN for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    # The float weights the quantized nodes replaced, unless something else still reads them (a tied
    # embedding table read by a Gather keeps its float copy).
    used = _uses(model)
    keep = [t for t in graph.initializer if used.get(t.name, 0) or t.name in {i.name for i in graph.input}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for _where, t in list(external_tensors(model)):
        if t.name in refs:  # not written by this run
            point_to(t, reader.copy_bytes(t, writer))
    res.kept_layers = [n.name for n in graph.node if n.op_type == "MatMul"]


def _errors(reader: TensorReader, inits: dict[str, TensorProto], targets: list[_Target],
            moments: dict[str, np.ndarray], opts: RecipeOptions) -> dict[str, float]:
    """Each target's 4-bit error (``blockquant.four_bit_error``, weighted by its input's moments where measured),
    read a slab at a time: a pass over the weights before the one that quantizes them."""
    block = int(getattr(opts, "block_size", 32) or 32)
    symmetric = bool(getattr(opts, "symmetric", True))
    out: dict[str, float] = {}
    for t in targets:
        w_t = inits[t.weight]
        k, n = t.kn(inits)
        if t.transposed:
            slabs: Iterable[tuple[int, np.ndarray]] = ((0, rows.T) for _r0, rows in
                                                       reader.rows(w_t, _chunk_rows(n, k, 1)))
        else:
            slabs = reader.rows(w_t, _chunk_rows(k, n, block))
        h = moments.get(t.node.name)
        out[t.node.name] = four_bit_error(slabs, h if h is not None and h.shape == (k,) else None, block, symmetric)
    return out


def _fp16(model: onnx.ModelProto, refs: dict[str, ExternalRef], reader: TensorReader, writer: DataWriter,
          opts: RecipeOptions, res: StreamResult, step: ProgressFn | None) -> onnx.ModelProto:
    """fp16: the weight-free graph goes through the same conversion as the whole-model recipe (ONNX Runtime's
    converter, the same blocked ops, then the same repairs); the converter retypes each external float32
    tensor it converts without touching its data, whose bytes are then converted here a slab at a time
    (with the converter's own rounding and clamping). Tensors left in float32 are copied."""
    # lazy: ONNX Runtime's converter, and the API imports this module for ``refusal``
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from worker.engine.fp16 import block_list, convert_graph

    types = {t.name: t.data_type for _w, t in external_tensors(model)}
    block = block_list(opts)
    excluded = set(opts.nodes_to_exclude)
    nodes = [(n.name, n.op_type) for n in model.graph.node]  # the converter adds Casts to the graph it is given
    # Shapes inferred here, from the declared dims; the converter then sees one-element stand-ins for the external
    # tensors (it reads every initializer it converts, and would read external data relative to the current
    # directory), which get their dims and references back after it.
    model = onnx.shape_inference.infer_shapes(model)
    stand_ins = []
    for _w, t in external_tensors(model):
        stand_ins.append((t, list(t.dims), list(t.external_data)))
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        rank = len(t.dims)
        del t.dims[:], t.external_data[:]
        t.dims.extend([1] * rank)
        t.data_location = TensorProto.DEFAULT
        t.raw_data = b"\0" * itemsize
    converted = convert_graph(model, opts, infer=False)
    for t, dims, entries in stand_ins:
        t.ClearField("raw_data")
        del t.dims[:]
        t.dims.extend(dims)
        t.external_data.extend(entries)
        t.data_location = TensorProto.EXTERNAL
    external = [t for t, _d, _e in stand_ins if t.name in refs]
    for i, t in enumerate(external):
        if types.get(t.name) == TensorProto.FLOAT and t.data_type == TensorProto.FLOAT16:
            stored = TensorProto()
            stored.CopyFrom(t)
            stored.data_type = TensorProto.FLOAT
            if not stored.dims:
                stored.dims.append(1)
            numel = int(np.prod(stored.dims, dtype=np.int64))
            row = max(numel // max(int(stored.dims[0]), 1), 1)
            slabs = reader.rows(stored, max(1, CHUNK_BYTES // (4 * row)))
            point_to(t, writer.write_parts(convert_np_to_float16(rows) for _r0, rows in slabs))
            res.weights += numel
            res.weight_bytes_fp32 += 4 * numel
            res.weight_bytes_quantized += 2 * numel
        else:
            point_to(t, reader.copy_bytes(t, writer))
        if step:
            step("quantizing", 0.9 * (i + 1) / len(external))
    for name, op_type in nodes:
        if name:
            (res.kept_layers if op_type in block or name in excluded else res.quantized_layers).append(name)
    blocked = sorted({op_type for _n, op_type in nodes} & set(block))
    if blocked:
        res.warnings.append(f"kept in float32 (unsafe or slow in float16): {', '.join(blocked)}")
    res.warnings.append("no float16 range check on a model with external data: it would run every activation of "
                        "the model at once; nodes whose values exceed float16's range (65504) would give inf, "
                        "which the validation's figures show (name such nodes in nodes_to_exclude)")
    return converted


def _embeddings(graph: onnx.GraphProto, reader: TensorReader, inits: dict[str, TensorProto], opts: RecipeOptions,
                writer: DataWriter, taken: set[str], made: dict[tuple[str, bool, str], list[str]],
                res: StreamResult) -> None:
    """quantize_embeddings: each Gather of rows of a 2-D float32 table becomes GatherBlockQuantized, 4-bit blocks
    along the rows. A table tied to a 4-bit lm_head is quantized once: the Gather reads the lm_head's
    MatMulNBits data (the same [vocab, blocks, bytes] layout) and only its scales are stored a second time
    (1 bit a weight, against 4 for the data), in the [vocab, blocks, 1] shape the Gather needs."""
    block = int(getattr(opts, "block_size", 32) or 32)
    symmetric = bool(getattr(opts, "symmetric", True))
    after: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or attrs.get("axis", 0):
            continue
        vocab, dim = (int(d) for d in table.dims)
        if dim % block:
            res.warnings.append(f"embedding '{node.name}' kept in float: its rows ({dim}) are not whole blocks of "
                                f"{block}")
            continue
        ids, out = node.input[1], node.output[0]
        shared = made.get((table.name, True, "int4_weight_only"))
        # Shared only without zero points: the Gather reads 3-D data, whose zero points would pack one a byte.
        if shared is not None and len(shared) == 2:
            scales = _unique(f"{table.name}_gather_scales", taken)
            _add_tensor(graph, scales, res.tied_scales[table.name], TensorProto.FLOAT, writer,
                        (vocab, dim // block, 1))
            res.weight_bytes_quantized += 4 * vocab * (dim // block)
            gathered = _unique(f"{out}_blocks", taken)
            inputs, axis, outputs = [shared[0], ids, scales, *shared[2:]], 2, [gathered]
            shape, target = _unique(f"{out}_ids_shape", taken), _unique(f"{out}_shape", taken)
            row = _unique(f"{out}_row", taken)
            graph.initializer.append(numpy_helper.from_array(np.array([dim], dtype=np.int64), row))
            after[node.name] = [
                helper.make_node("Shape", [ids], [shape], name=_unique(f"{node.name}.ids_shape", taken)),
                helper.make_node("Concat", [shape, row], [target], name=_unique(f"{node.name}.shape", taken),
                                 axis=0),
                helper.make_node("Reshape", [gathered, target], [out], name=_unique(f"{node.name}.rows", taken)),
            ]
        else:
            packed, scale, zp = _pack_nbits(reader, table, True, 4, block, ort_kernel(4, block, symmetric))
            names = [_unique(f"{table.name}_Q4", taken), _unique(f"{table.name}_scales", taken)]
            _add_tensor(graph, names[0], packed, TensorProto.UINT8, writer, (vocab, dim // 2))
            _add_tensor(graph, names[1], scale, TensorProto.FLOAT, writer, (vocab, dim // block))
            res.weights += vocab * dim
            res.weight_bytes_fp32 += 4 * vocab * dim
            res.weight_bytes_quantized += packed.nbytes + scale.nbytes
            if zp is not None:
                names.append(_unique(f"{table.name}_zero_points", taken))
                _add_tensor(graph, names[2], zp, TensorProto.UINT8, writer, (vocab, -(-(dim // block) // 2)))
                res.weight_bytes_quantized += zp.nbytes
            inputs, axis, outputs = [names[0], ids, *names[1:]], 1, [out]
        node.op_type, node.domain = "GatherBlockQuantized", MS_DOMAIN
        del node.input[:], node.output[:], node.attribute[:]
        node.input.extend(inputs)
        node.output.extend(outputs)
        node.attribute.extend([helper.make_attribute("gather_axis", 0), helper.make_attribute("quantize_axis", axis),
                               helper.make_attribute("block_size", block), helper.make_attribute("bits", 4)])
        res.embedding_layers.append(node.name)
    _insert_after(graph, after)


def _insert_after(graph: onnx.GraphProto, after: dict[str, list[onnx.NodeProto]]) -> None:
    """The nodes of ``after`` placed right behind the node each is keyed by (graph order stays topological)."""
    if not after:
        return
    nodes = []
    for n in graph.node:
        nodes.append(n)
        nodes.extend(after.get(n.name, []))
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused_transposes(graph: onnx.GraphProto) -> None:
    """Transposes of tied tables whose MatMul now reads the quantized weight directly."""
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] not in read)]
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _quantize_one(graph: onnx.GraphProto, reader: TensorReader, w_t: TensorProto, transposed: bool, kind: str,
                  opts: RecipeOptions, writer: DataWriter | None, taken: set[str], res: StreamResult,
                  weighting: np.ndarray | None = None) -> list[str]:
    """Quantize one [K, N] weight, append its tensors to the data file; the new node's inputs after A.
    ``weighting``: the input's per-channel second moments, for clip_search (4 bits only)."""
    wname = w_t.name
    if kind in ("int4_weight_only", "int8"):
        bits = 4 if kind == "int4_weight_only" else 8
        block = int(getattr(opts, "block_size", 32) or 32)
        symmetric = bool(getattr(opts, "symmetric", True))
        packed, scales, zp = _pack_nbits(reader, w_t, transposed, bits, block, slab_quantizer(kind, opts), weighting,
                                         res, symmetric)
        if transposed and bits == 4 and opts.quantize_embeddings and writer is not None:
            res.tied_scales[w_t.name] = scales.reshape(int(w_t.dims[0]), -1)
        wname = f"{wname}_T" if transposed else wname
        names = [_unique(f"{wname}_Q{bits}", taken), _unique(f"{wname}_scales", taken)]
        _add_tensor(graph, names[0], packed, TensorProto.UINT8, writer)
        _add_tensor(graph, names[1], scales, TensorProto.FLOAT, writer)
        res.weight_bytes_quantized += packed.nbytes + scales.nbytes
        if zp is not None:
            names.append(_unique(f"{wname}_zero_points", taken))
            _add_tensor(graph, names[2], zp, TensorProto.UINT8 if zp.dtype == np.uint8 else TensorProto.FLOAT, writer)
            res.weight_bytes_quantized += zp.nbytes
        return names
    # int8_dynamic
    q, scale = _int8_columns(reader, w_t, transposed, bool(opts.per_channel), bool(opts.reduce_range))
    wname = f"{wname}_T" if transposed else wname
    names = [_unique(f"{wname}_quantized", taken), _unique(f"{wname}_scale", taken)]
    _add_tensor(graph, names[0], q, TensorProto.INT8, writer)
    _add_tensor(graph, names[1], scale, TensorProto.FLOAT, writer, tuple(scale.shape))
    res.weight_bytes_quantized += q.nbytes + scale.nbytes
    return names


def _replace(node: onnx.NodeProto, inputs: list[str], kind: str, opts: RecipeOptions, k: int, n: int) -> None:
    """Turn the MatMul ``node`` into its quantized form in place (same name and output)."""
    a = node.input[0]
    del node.input[:]
    del node.attribute[:]
    node.domain = MS_DOMAIN
    if kind in ("int4_weight_only", "int8"):
        node.op_type = "MatMulNBits"
        node.input.extend([a, *inputs])
        node.attribute.extend([
            helper.make_attribute("K", k), helper.make_attribute("N", n),
            helper.make_attribute("bits", 4 if kind == "int4_weight_only" else 8),
            helper.make_attribute("block_size", int(getattr(opts, "block_size", 32) or 32)),
            helper.make_attribute("accuracy_level", int(getattr(opts, "accuracy_level", 0) or 0)),
        ])
    else:
        node.op_type = "DynamicQuantizeMatMul"
        node.input.extend([a, *inputs])


def layer_rows(original: onnx.ModelProto, res: StreamResult, recipe: str) -> list[dict[str, Any]]:
    """The report's per-layer rows: every main-graph node with the precision it has now (no per-layer SQNR:
    measuring it would hold both models' activations, which this path avoids)."""
    low = {"int4_weight_only": "int4", "fp16": "fp16"}.get(recipe, "int8")
    quantized, int8 = set(res.quantized_layers) | set(res.embedding_layers), set(res.int8_layers)
    rows = []
    for node in original.graph.node:
        if not node.name:
            continue
        precision = low if node.name in quantized else "int8" if node.name in int8 else "fp32"
        rows.append({"name": node.name, "op_type": node.op_type, "precision": precision, "sqnr_db": None})
    return rows
