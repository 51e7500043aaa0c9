"""ONNX Runtime's quantizers as the recipes call them: static QDQ int8 from calibrated ranges, dynamic int8,
4-bit weights with int8 elsewhere, and the graph surgery around them (nodes that must stay in float, excluded
nodes reading float inputs, models whose layers the QDQ quantizer cannot reach)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from onnx import numpy_helper

from worker.engine import runtime
from worker.engine.calibrate import (
    CalibrationSettings,
    calibrate,
    quantizable_op_types,
    select_tensors,
    write_ort_ranges,
)
from worker.engine.errors import EngineError
from worker.engine.feeds import batch_source
from worker.engine.index_math import find as find_index_math
from worker.engine.inspect import default_opset
from worker.engine.normalize import all_graphs, nonfinite_constant_nodes, prepare_for_static, subgraph_op_types

if TYPE_CHECKING:  # annotations only: the option tables import the recipes, whose handlers import this module
    from worker.engine.config import QuantizeConfig, RecipeOptions
    from worker.engine.context import ProgressFn, RunData
    from worker.engine.inspect import ModelInfo
    from worker.engine.int4 import Int4Result
    from worker.engine.preflight import Split

# onnxruntime.quantization (~0.3 s and 15 MB) is imported inside the quantizers that call it: the pipeline imports
# this module, and an fp16 run, which uses neither, skips it.

log = logging.getLogger(__name__)


class _OrtRootNotices(logging.Filter):
    """ONNX Runtime's quantizer logs some notices on the root logger (``logging.warning``), which reached a CLI
    user's terminal as bare ``WARNING:root:`` lines: all-MiniLM-L6-v2's int8_static job printed "Axis 1 is
    out-of-range for weight '...LayerNorm.weight' with rank 1" 24 times, for weights it then quantizes per tensor
    as it should. Below ERROR they go to this module's logger at debug level instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and f"{os.sep}onnxruntime{os.sep}" in record.pathname:
            log.debug("onnxruntime: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def ort_root_notices_quiet() -> Iterator[None]:
    """While ONNX Runtime's quantizer runs: its root-logger notices below ERROR are kept out of the terminal."""
    notices = _OrtRootNotices()
    root = logging.getLogger()
    root.addFilter(notices)
    try:
        yield
    finally:
        root.removeFilter(notices)


def excluded_nodes(
    src: Path, opts: RecipeOptions, float_tensors: list[str] | None = None, model: onnx.ModelProto | None = None,
    index_math: Sequence[str] = (),
) -> tuple[list[str] | None, list[str]]:
    """The user's exclusions plus nodes fed by NaN/infinite constants (which would quantize to garbage)
    and nodes that read or write ``float_tensors`` (activations that held infinity or NaN), and ``index_math``
    (static quantization, option float_index_math: ``index_math_nodes``). The second list is the NaN/infinity
    nodes alone (the run warns of them)."""
    model = model if model is not None else onnx.load(str(src))
    forced = nonfinite_constant_nodes(model)
    if float_tensors:
        keep = set(float_tensors)
        forced += [n.name for n in model.graph.node if keep & {*n.input, *n.output}]
    forced = list(dict.fromkeys(n for n in forced if n not in opts.nodes_to_exclude))
    return list(dict.fromkeys([*opts.nodes_to_exclude, *forced, *index_math])) or None, forced


def index_math_nodes(model: onnx.ModelProto, opts: RecipeOptions) -> tuple[str, ...]:
    """The nodes option float_index_math keeps in float (none when it is off)."""
    return find_index_math(model).nodes if opts.float_index_math else ()


# The operators whose input 1 ONNX Runtime's static quantizer treats as a weight (int8, per channel where asked).
WEIGHT_READERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# The suffix ONNX Runtime's QDQ quantizer gives a quantized initializer (quant_utils.TENSOR_NAME_QUANT_SUFFIX).
QUANTIZED_SUFFIX = "_quantized"


def weight_params(quantized: Path) -> dict[str, list[dict[str, Any]]]:
    """The int8 weights of a model ONNX Runtime's quantizer wrote, as TensorQuantOverrides that give each weight
    the scale and zero point it has there (one entry per channel with its axis, or one for the tensor): a later
    quantize_static of the same float model with them quantizes the weights to the same bytes without computing
    their parameters again (ONNX Runtime does that channel by channel in Python: 0.85 s of each of MiniLM's two
    quantizations). Only a weight a Conv/ConvTranspose/Gemm/MatMul reads at input 1 through its
    DequantizeLinear is taken, never a bias or an activation-type constant."""
    model = onnx.load(str(quantized))
    inits = {t.name: t for t in model.graph.initializer}
    reads_as_weight = {n.input[1] for n in model.graph.node if n.op_type in WEIGHT_READERS and len(n.input) > 1}
    out: dict[str, list[dict[str, Any]]] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in reads_as_weight or len(node.input) < 3:
            continue
        q, scale, zero = (inits.get(name) for name in node.input[:3])
        if q is None or scale is None or zero is None or q.data_type != onnx.TensorProto.INT8 or \
                not node.input[0].endswith(QUANTIZED_SUFFIX):
            continue
        s, z = numpy_helper.to_array(scale), numpy_helper.to_array(zero)
        name = node.input[0][:-len(QUANTIZED_SUFFIX)]
        if s.ndim == 0:
            out[name] = [{"scale": float(s), "zero_point": int(z)}]
        else:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            out[name] = [{"axis": axis, "scale": float(sc), "zero_point": int(zp)} for sc, zp in zip(s, z, strict=True)]
    return out


def quantize_static(
    src: Path, dest: Path, ranges_path: Path, opts: RecipeOptions, float_tensors: list[str] | None = None,
    weights: dict[str, list[dict[str, Any]]] | None = None,
) -> list[str]:
    """Returns the nodes that had to stay in float (beyond the user's exclusions). ``weights``: the parameters
    an earlier quantization of the same float model gave its weights (weight_params), reused for those of this
    model's initializers that have the same shape."""
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    model = onnx.load(str(src))
    index_math = index_math_nodes(model, opts)
    exclude, forced = excluded_nodes(src, opts, float_tensors, model, index_math)
    # Excluded nodes read float inputs (see _float_inputs_for): the user's and the index math, whose exact values
    # are the point of keeping it in float.
    rewire = {*opts.nodes_to_exclude, *index_math}
    # Shared and [1, N] biases trip ONNX Runtime's quantizer (see prepare_for_static); the file is
    # handed over as is when neither occurs.
    prepared = bool(prepare_for_static(model))
    act = QuantType.QInt8 if opts.symmetric_activations else QuantType.QUInt8
    extra: dict[str, Any] = {"ActivationSymmetric": opts.symmetric_activations, "WeightSymmetric": True}
    # Not strict: the recipe checked the names on the prepared model; a rewritten copy (cross-layer equalization
    # folds BatchNormalization nodes) may lack a few, which then have nothing to widen.
    wide = a16_tensors(model, opts.activations_16bit, opts.op_types_to_quantize, strict=False) \
        if opts.activations_16bit else []
    if wide:
        # A16W8 (option activations_16bit): these tensors' QDQ pairs hold 16 bits with the same calibrated range.
        # ONNX Runtime converts a model below opset 21 to opset 21 for them (standard 16-bit Q/DQ).
        act16 = QuantType.QInt16 if opts.symmetric_activations else QuantType.QUInt16
        extra["TensorQuantOverrides"] = {t: [{"quant_type": act16}] for t in wide}
        prepared = bump_to_opset21(model) or prepared
    if weights:
        shapes = {t.name: len(t.dims) for t in model.graph.initializer}
        reuse = {name: params for name, params in weights.items()
                 if name in shapes and ("axis" not in params[0] or -shapes[name] <= params[0]["axis"] < shapes[name])}
        if reuse:
            extra["TensorQuantOverrides"] = {**reuse, **extra.get("TensorQuantOverrides", {})}
    source: str | onnx.ModelProto = str(src)
    if prepared:
        # Handed over as a file: given a ModelProto, ONNX Runtime's quantizer copies it through its own shape
        # inference, a copy of the weights more at the step's peak.
        staged = dest.with_name(dest.stem + "-staged.onnx")
        onnx.save(model, str(staged))
        source = str(staged)
    del model
    try:
        with ort_root_notices_quiet():
            ort_quantize_static(
                source,
                str(dest),
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(opts.op_types_to_quantize) or None,
                per_channel=opts.per_channel,
                reduce_range=bool(opts.reduce_range),  # None (not resolved: no recipe of its own) is off
                activation_type=act,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(ranges_path),
                extra_options=extra,
            )
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(
            "quantization_failed",
            f"ONNX Runtime's static quantizer failed on this model: {str(exc).strip()[:500]}. "
            "Excluding the node it names (option nodes_to_exclude) or trying int8_dynamic may help",
        ) from exc
    finally:
        if source != str(src):
            Path(source).unlink(missing_ok=True)
    if rewire:
        _float_inputs_for(dest, rewire)
    return forced


# Operators whose meaning changed between opset 18 and 21 (GroupNormalization's scale and bias went from per
# group to per channel in 21; DFT's axis went from an attribute to an input in 20, and GridSample's modes were
# renamed in 20): a model with one is left to ONNX's version converter. fracast's dynamo export (opset 18, an
# FFT as DFT) declared 21 gave a model ONNX Runtime refuses ("Unrecognized attribute: axis for operator DFT").
CHANGED_SINCE_18 = frozenset({"GroupNormalization", "DFT", "GridSample"})


def bump_to_opset21(model: onnx.ModelProto) -> bool:
    """Declare opset 21 on a model of opset 18-20 (in place; True when it did), so that ONNX Runtime's quantizer
    needs no version conversion for 16-bit Q/DQ: ONNX's converter holds several copies of the model (a 90 MB
    sentence encoder's int8_static job peaked at 919 MB in it). From 18 to 21 the standard operators gained
    types (int4, float8, 16-bit Q/DQ) and attributes whose defaults keep the old meaning, except those in
    CHANGED_SINCE_18; below 18, the Reduce operators' axes moved from an attribute to an input, and the
    converter is left to do it."""
    opset = default_opset(model)
    if not 18 <= opset < 21:
        return False
    if any(n.op_type in CHANGED_SINCE_18 and n.domain in ("", "ai.onnx") for g in all_graphs(model) for n in g.node):
        return False
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 21
    model.ir_version = max(model.ir_version, 10)  # opset 21 comes with IR version 10
    return True


def a16_tensors(model: onnx.ModelProto, names: Sequence[str], op_types: Sequence[str] = (),
                strict: bool = True) -> list[str]:
    """The activation tensors option activations_16bit names: each name is a quantizable activation (an input
    or output of a node the static quantizer takes) or a node whose outputs are; EngineError('invalid_option')
    for any other name (skipped when not ``strict``)."""
    quantizable = select_tensors(model, op_types or None)
    known = set(quantizable)
    by_node = {n.name: [o for o in n.output if o in known] for n in model.graph.node if n.name}
    out: list[str] = []
    unknown: list[str] = []
    for name in names:
        if name in known:
            out.append(name)
        elif by_node.get(name):
            out.extend(by_node[name])
        else:
            unknown.append(name)
    if unknown and strict:
        examples = [n for n, outs in by_node.items() if outs][:3] + quantizable[:3]
        raise EngineError(
            "invalid_option",
            f"option 'activations_16bit': {', '.join(repr(u) for u in unknown[:5])} "
            f"{'is' if len(unknown) == 1 else 'are'} neither a quantized activation tensor nor a node producing "
            f"one in the prepared model ({len(known)} such tensors, e.g. {', '.join(examples)})",
        )
    return list(dict.fromkeys(out))


def _float_inputs_for(path: Path, excluded: set[str]) -> None:
    """Excluded nodes read their inputs in float. ONNX Runtime's QDQ quantizer also quantizes the outputs
    of the nodes it quantizes, so a node excluded after a quantized one would still see int8-rounded
    inputs (and an excluded layer whose input has outliers would gain nothing): rewire such inputs to the
    float tensor before its QuantizeLinear, and drop the Q/DQ pairs nothing reads any more,
    with their scales and zero points."""
    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    changed = False
    for node in nodes:
        if node.name not in excluded:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a quantized weight initializer: the quantizer left excluded weights alone anyway
            node.input[i] = q.input[0]
            changed = True
    if not changed:
        return
    outputs = {o.name for o in model.graph.output}
    params: set[str] = set()  # what the dropped pairs read
    while True:
        # If/Loop bodies may read the main graph's tensors by name.
        read = {i for g in all_graphs(model) for n in g.node for i in n.input} | outputs
        dead = [n for n in model.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not set(n.output) & read]
        if not dead:
            break
        for n in dead:
            params.update(n.input)
            model.graph.node.remove(n)
    # Left behind, they were 36 unread initializers in basic-pitch's int8 model (1.8 KB of 223 KB).
    unread = [t for t in model.graph.initializer if t.name in params and t.name not in read]
    for t in unread:
        model.graph.initializer.remove(t)
    onnx.save(model, str(path))


def quantize_dynamic(src: Path, dest: Path, opts: RecipeOptions) -> list[str]:
    runtime.ort_quantization()  # first: see there
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    exclude, forced = excluded_nodes(src, opts)

    def quantize(subgraphs: bool) -> None:
        with ort_root_notices_quiet():
            ort_quantize_dynamic(
                str(src),
                str(dest),
                op_types_to_quantize=list(opts.op_types_to_quantize) or None,
                per_channel=opts.per_channel,
                reduce_range=bool(opts.reduce_range),  # None (not resolved: no recipe of its own) is off
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                extra_options={"EnableSubgraph": subgraphs},
            )

    try:
        try:
            # Reach into If/Loop/Scan bodies too (silero_vad has all its layers in If branches); normalize
            # moved the weights those bodies read into them, where the quantizer looks for them.
            quantize(True)
        except Exception:
            # ONNX Runtime's subgraph support is partial: the main graph alone is still worth quantizing.
            log.info("dynamic quantization with subgraphs failed; retrying on the main graph only", exc_info=True)
            quantize(False)
    except Exception as exc:
        raise EngineError(
            "quantization_failed",
            f"ONNX Runtime's dynamic quantizer failed on this model: {str(exc).strip()[:500]}",
        ) from exc
    return forced


def warn_forced(forced: list[str], warnings: list[str]) -> None:
    if forced:
        warnings.append(
            f"{len(forced)} node(s) touch a constant or activation holding infinity or NaN (e.g. an attention "
            f"mask) and stay in float, since quantizing it would break the model: {', '.join(forced[:5])}"
        )


def refuse_subgraphs_only(model: onnx.ModelProto, opts: RecipeOptions) -> None:
    """int8_static's QDQ quantizer works on the main graph only: a model whose quantizable layers all sit
    in If/Loop/Scan bodies would come out unchanged, so say so instead of delivering a float copy."""
    wanted = set(opts.op_types_to_quantize) if opts.op_types_to_quantize else quantizable_op_types()
    inner = subgraph_op_types(model) & wanted
    if inner:
        weighted = inner & {"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "Attention"}
        raise EngineError(
            "nothing_to_quantize",
            f"every quantizable layer of this model ({', '.join(sorted(weighted or inner)[:8])}) is inside an "
            "If/Loop/Scan body, which int8_static's quantizer does not reach, so nothing would be quantized; use "
            "int8_dynamic (which quantizes inside those bodies) or fp16",
        )


def int8_elsewhere(cfg: QuantizeConfig, opts: RecipeOptions, info: ModelInfo, split: Split, data: RunData,
                   model: Path, work: Path, providers: list[str], step: ProgressFn,
                   warnings: list[str]) -> dict[str, Any]:
    """int4 weights plus int8 activations: calibrate the 4-bit model (its MatMulNBits stay as they are) and
    quantize every other quantizable operator to int8 QDQ, in place of ``model``."""
    assert data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
    c0, c1 = split.calib_range
    int4_model = onnx.load(str(model))
    tensors = select_tensors(int4_model, opts.op_types_to_quantize or None)
    step("calibrating", 0.5)
    settings = CalibrationSettings(opts.method, opts.percentile, opts.symmetric_activations)
    cal = calibrate(model, tensors, batch_source(data.calib_reader, info.inputs, split.calib_plan, c0, c1),
                    settings, providers, cfg.threads, op_types=opts.op_types_to_quantize or None,
                    excluded_nodes=opts.nodes_to_exclude, model=int4_model)
    ranges_path = work / "int8-elsewhere-ranges.json"
    write_ort_ranges(cal.ranges, ranges_path)
    hybrid = work / "int4-int8.onnx"
    step("quantizing", 0.5)
    warn_forced(quantize_static(model, hybrid, ranges_path, opts, cal.nonfinite_tensors), warnings)
    os.replace(hybrid, model)
    return {"method": cal.method, "samples": cal.samples, "tensors": cal.tensors, "observed_tensors": cal.observed,
            "seconds": round(cal.seconds, 3)}


def run_int4(
    cfg: QuantizeConfig,
    opts: RecipeOptions,
    info: ModelInfo,
    split: Split,
    data: RunData,
    src: Path,
    dest: Path,
    providers: list[str],
    step: ProgressFn,
    warnings: list[str],
) -> Int4Result:
    algorithm = opts.algorithm or ("clip_search" if data.calib_reader is not None else "rtn")
    batches = None
    if algorithm in ("clip_search", "gptq"):
        assert data.calib_reader is not None and split.calib_plan is not None and split.calib_range is not None
        c0, c1 = split.calib_range
        batches = batch_source(data.calib_reader, info.inputs, split.calib_plan, c0, c1)
        step("calibrating", 0.0)
    elif cfg.calibration_path is None:
        warnings.append(
            "no calibration data: the 4-bit weights were rounded to nearest without seeing any real input, and "
            "the accuracy above was measured on synthetic inputs. Round-to-nearest 4-bit can lose accuracy on "
            "inputs unlike the training data; give a calibration set to calibrate and to measure on real data"
        )
    step("quantizing", 0.0)
    # lazy: the 4-bit quantizer (with its streaming and block-quantization modules) loads with 4-bit jobs, not with
    # every int8 job that imports this module (a small model's job is held to a peak, issue #14)
    from worker.engine.int4 import quantize_int4

    res = quantize_int4(src, dest, opts, algorithm, batches, providers, cfg.threads)
    warnings.extend(res.warnings)
    if res.calibration is not None:
        res.calibration["algorithm"] = algorithm
    return res
