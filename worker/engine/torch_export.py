"""A PyTorch program's inputs and outputs, sample feeds, runs in PyTorch, and its ONNX export checked against
PyTorch. Runs only in the .pt2 child process (worker/engine/pt2_child.py), which loads the program; the export
command and quantization-aware training (worker/engine/qat_torch.py) both use it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from worker.engine.errors import EngineError
from worker.engine.feeds import iter_batches, plan_feeds
from worker.engine.inspect import TensorInfo
from worker.engine.npz import NpzReader, inspect_npz

# torch and onnxruntime are imported inside the functions: worker.engine.pt2_child imports this module before it
# moves stdout aside and imports torch inside its own error handling, and its inspect command needs no ONNX Runtime.

# ONNX Runtime must reproduce PyTorch within these (relative L2 error, or absolute error for tiny outputs).
CHECK_REL_L2 = 1e-3
CHECK_ABS = 1e-5
_SYMBOL = re.compile(r"\b[a-z]{1,8}[0-9]{1,9}\b")


TORCH_TO_NUMPY = {
    "torch.float32": "float32", "torch.float16": "float16", "torch.float64": "float64", "torch.int64": "int64",
    "torch.int32": "int32", "torch.int16": "int16", "torch.int8": "int8", "torch.uint8": "uint8", "torch.bool": "bool",
}


def describe(ep: Any) -> dict[str, Any]:
    """Inputs and outputs of an exported program, with symbolic sizes named ('batch' on axis 0)."""
    import torch
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    nodes = {n.name: n for n in ep.graph.nodes}
    user_in = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    user_out = [s for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if not user_in:
        raise EngineError("unsupported_model", "the exported program has no inputs")
    vals: list[tuple[str, Any]] = []
    for spec, what in [(s, "input") for s in user_in] + [(s, "output") for s in user_out]:
        if not isinstance(spec.arg, TensorArgument):
            raise EngineError(
                "unsupported_model",
                f"model {what} '{getattr(spec.arg, 'name', spec.arg)}' is not a tensor; lowbit takes models whose "
                "inputs and outputs are tensors (export with the other arguments fixed)",
            )
        val = nodes[spec.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise EngineError("unsupported_model", f"model {what} '{spec.arg.name}' has no tensor metadata")
        vals.append((spec.arg.name, val))
    names: dict[str, str] = {}
    used: set[str] = set()
    for _, val in vals[: len(user_in)]:
        for axis, d in enumerate(val.shape):
            if isinstance(d, int) or not getattr(d.node.expr, "is_Symbol", False):
                continue
            key = str(d.node.expr)
            if key in names:
                continue
            base = "batch" if axis == 0 else f"dim{axis}"
            new, k = base, 2
            while new in used:
                new, k = f"{base}_{k}", k + 1
            names[key] = new
            used.add(new)

    def info(name: str, val: Any, what: str) -> dict[str, Any]:
        dtype = TORCH_TO_NUMPY.get(str(val.dtype))
        if dtype is None:
            raise EngineError("unsupported_model", f"model {what} '{name}' has dtype {val.dtype}, which lowbit's "
                                                   "datasets cannot feed (use float32, float16 or an integer type)")
        shape: list[int | str] = [int(d) if isinstance(d, int) else rename(str(d.node.expr), names) for d in val.shape]
        return {"name": name, "dtype": dtype, "shape": shape}

    inputs = [info(n, v, "input") for n, v in vals[: len(user_in)]]
    outputs = [info(n, v, "output") for n, v in vals[len(user_in):]]
    return {"inputs": inputs, "outputs": outputs, "dim_names": names,
            "num_nodes": sum(1 for n in ep.graph.nodes if n.op == "call_function")}


def rename(expr: str, names: dict[str, str]) -> str:
    return _SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), expr)


def tensor_infos(items: list[dict[str, Any]]) -> list[TensorInfo]:
    return [TensorInfo(i["name"], i["dtype"], tuple(i["shape"])) for i in items]


def sample_feeds(inputs: list[TensorInfo], data: str | None, batch_size: int, limit: int) -> tuple[
    list[tuple[dict[str, np.ndarray], int]], str
]:
    """Up to ``limit`` samples as model feeds: from the dataset, or random inputs of batch 2 without one."""
    if data:
        ds = inspect_npz(Path(data))
        plan = plan_feeds(inputs, ds, batch_size, "calibration")
        reader = NpzReader(Path(data), ds)
        feeds = [(b.feed, b.count) for b in iter_batches(reader, inputs, plan, 0, min(limit, ds.num_samples))]
        if feeds:
            return feeds, "dataset"
    rng = np.random.default_rng(0)
    feed: dict[str, np.ndarray] = {}
    for inp in inputs:
        shape = [d if isinstance(d, int) else 2 for d in inp.shape]
        dt = np.dtype(inp.dtype)
        feed[inp.name] = rng.standard_normal(shape).astype(dt) if dt.kind == "f" else np.zeros(shape, dt)
    return [(feed, 1)], "random"


def torch_args(ep: Any, inputs: list[TensorInfo], feed: dict[str, np.ndarray], device: str = "cpu") -> tuple[
    tuple[Any, ...], dict[str, Any]
]:
    import torch
    from torch.utils import _pytree as pytree

    flat = [torch.from_numpy(np.ascontiguousarray(feed[i.name])).to(device) for i in inputs]
    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def run_torch(module: Any, ep: Any, inputs: list[TensorInfo], feed: dict[str, np.ndarray], device: str = "cpu") -> list[
    np.ndarray
]:
    import torch
    from torch.utils import _pytree as pytree

    args, kwargs = torch_args(ep, inputs, feed, device)
    with torch.no_grad():
        out = module(*args, **kwargs)
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(out)]


def export_onnx(ep: Any, desc: dict[str, Any], feeds: list[tuple[dict[str, np.ndarray], int]], dest: Path,
                opset: int, threads: int) -> dict[str, Any]:
    """torch.onnx.export (dynamo) of the program, symbolic sizes renamed as ``describe`` names them, then a
    check of ONNX Runtime against PyTorch on ``feeds``."""
    import torch

    inputs = tensor_infos(desc["inputs"])
    args, kwargs = torch_args(ep, inputs, feeds[0][0])
    tmp = dest.with_name(dest.stem + ".raw.onnx")
    try:
        torch.onnx.export(ep, args, str(tmp), kwargs=kwargs or None, dynamo=True, opset_version=opset,
                          external_data=False, verbose=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # torch's ONNX exporter fails on sizes derived from others (a ceil-mode max-pool's 2*s87 in
        # facenet-pytorch's MTCNN: "expected sympy.Symbol"). The program re-traced with every size but the
        # batch fixed at the samples' own exports; the warning says what the artifact then accepts.
        fixed = _export_fixed_sizes(ep, args, kwargs, inputs, tmp, opset)
        if fixed is None:
            raise EngineError("export_failed",
                              f"torch.onnx.export could not export the program to ONNX: {first[:500]}") from exc
        desc.setdefault("warnings", []).append(fixed)
    model = onnx.load(str(tmp))
    names = desc["dim_names"]
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = rename(d.dim_param, names)
    got = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    want = [i.name for i in inputs]
    if got != want:
        raise EngineError(
            "export_failed",
            f"the ONNX export has inputs {got}, the exported program {want}; lowbit cannot feed it the same data",
        )
    onnx.save_model(model, str(dest))
    tmp.unlink(missing_ok=True)
    return check_onnx(ep.module(), ep, inputs, feeds, dest, threads)


def _export_fixed_sizes(ep: Any, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[TensorInfo],
                        dest: Path, opset: int) -> str | None:
    """Export the program re-traced with the sample's sizes fixed, except a dynamic batch axis that every input
    shares (when the sample has at least two, which torch does not specialize). A warning naming the fixed
    sizes, or None when this fails too."""
    import torch

    batch = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], str)}
    flat_positional = not kwargs and len(args) == len(inputs) and all(isinstance(a, torch.Tensor) for a in args)
    dynamic_batch = (flat_positional and len(batch) == 1 and all(i.shape and isinstance(i.shape[0], str)
                                                                  for i in inputs) and int(args[0].shape[0]) >= 2)
    shapes = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
    try:
        program = torch.export.export(ep.module(), args, kwargs or None, dynamic_shapes=shapes)
        torch.onnx.export(program, args, str(dest), kwargs=kwargs or None, dynamo=True, opset_version=opset,
                          external_data=False, verbose=False)
    except Exception:
        return None
    sizes = ", ".join(f"{i.name} {'x'.join(str(d) for d in a.shape[1 if dynamic_batch else 0:])}"
                      for i, a in zip(inputs, args, strict=False))
    return (f"the program's sizes other than the batch could not be exported as symbols, so the ONNX model and "
            f"the artifact take fixed sizes ({sizes}{' after the batch' if dynamic_batch else ''}): those of the "
            "calibration samples")


def check_onnx(module: Any, ep: Any, inputs: list[TensorInfo], feeds: list[tuple[dict[str, np.ndarray], int]],
               onnx_path: Path, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError("export_failed", f"ONNX Runtime cannot load the exported model: {str(exc)[:400]}") from exc
    names = [o.name for o in sess.get_outputs()]
    stats = [{"name": n, "sq_ref": 0.0, "sq_err": 0.0, "max_abs_error": 0.0, "equal": 0, "total": 0} for n in names]
    samples = 0
    for feed, count in feeds:
        ref = run_torch(module, ep, inputs, feed)
        got = sess.run(None, feed)
        if len(ref) != len(got):
            raise EngineError("export_mismatch", f"the ONNX export has {len(got)} outputs, PyTorch returns {len(ref)}")
        for s, r, g in zip(stats, ref, got, strict=True):
            if r.shape != g.shape:
                raise EngineError(
                    "export_mismatch",
                    f"output '{s['name']}' has shape {list(g.shape)} in ONNX Runtime but {list(r.shape)} in PyTorch",
                )
            if r.dtype.kind == "f":
                rf, gf = r.astype(np.float64), g.astype(np.float64)
                # Non-finite values must sit in the same places (NaN where NaN, the same infinities).
                r_bad, g_bad = ~np.isfinite(rf), ~np.isfinite(gf)
                if (r_bad != g_bad).any() or (r_bad.any() and not np.array_equal(rf[r_bad], gf[g_bad], equal_nan=True)):
                    raise EngineError(
                        "export_mismatch",
                        f"the ONNX export gives NaN or infinity where PyTorch does not (or the other way) in output "
                        f"'{s['name']}'",
                    )
                rf, gf = rf[~r_bad], gf[~g_bad]
                r, d = rf, rf - gf
                s["sq_ref"] += float(np.sum(rf**2))
                s["sq_err"] += float(np.sum(d * d))
                s["max_abs_error"] = max(s["max_abs_error"], float(np.max(np.abs(d))) if d.size else 0.0)
            else:
                s["equal"] += int(np.sum(r == g))
                s["total"] += int(r.size)
        samples += count
    outputs = []
    for s in stats:
        if s["total"]:
            agree = s["equal"] / s["total"]
            ok = agree >= 0.999
            outputs.append({"name": s["name"], "agreement": round(agree, 6)})
        else:
            rel = (s["sq_err"] ** 0.5) / max(s["sq_ref"] ** 0.5, 1e-30)
            ok = rel <= CHECK_REL_L2 or s["max_abs_error"] <= CHECK_ABS
            outputs.append({"name": s["name"], "rel_l2_error": float(f"{rel:.3g}"),
                            "max_abs_error": float(f"{s['max_abs_error']:.3g}")})
        if not ok:
            raise EngineError(
                "export_mismatch",
                f"the ONNX export of the model disagrees with PyTorch on output '{s['name']}' ({outputs[-1]}); "
                "lowbit will not quantize a model that does not compute what the .pt2 does. An operator may be "
                "exported imprecisely; please report it with the model",
            )
    return {"samples": samples, "outputs": outputs}
