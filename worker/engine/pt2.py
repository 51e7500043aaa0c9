"""PyTorch ``torch.export`` archives (.pt2): checked without unpickling anything, loaded only in a child process.

``torch.export.load`` is not safe on a file from a stranger. Weights or constants marked ``use_pickle`` go
through ``torch.load(weights_only=False)``, opaque constants through ``pickle.loads``, custom objects
through TorchScript's unpickler, the sample inputs file falls back to ``weights_only=False`` when the safe
load fails, symbolic shape expressions are parsed by ``sympy.sympify`` (which evaluates Python), tree specs
import modules by name, ``guards_code`` is compiled and run by ``ExportedProgram.module()``, and
``data/aotinductor/`` holds compiled shared libraries. So, before torch sees a byte of an upload, this module
(which imports neither torch nor onnxruntime) opens the zip itself and

- refuses what is not a torch.export archive: a raw pickle, a ``torch.save`` checkpoint, a TorchScript
  archive, any other zip, an archive of several programs;
- refuses every pickled payload (``use_pickle``, custom and opaque objects, legacy ``.pt`` weight files) and
  compiled code (AOTInductor, ExecuTorch, MTIA);
- refuses graph nodes whose target is not an ATen/prims operator or a small allow-list of Python
  arithmetic, shape expressions that are not plain sympy arithmetic over shape symbols, and tree specs of
  other than builtin containers or whose context asks for an enum by module name;
- writes a sanitized copy holding only the program JSON (``guards_code`` dropped: they are input checks
  only, and running them means ``exec``), the weight and constant files the configs name, and an empty
  sample-inputs file (an empty payload deserializes to ``{}`` without ``torch.load``).

Only that copy is ever loaded, and only in a child process (``worker.engine.pt2_child``, run by the one
child runner, ``worker.engine.subprocess_runner``: no secrets, a time limit, dies with its parent) so neither
the API server nor the worker imports torch for it, and a crash or a hang in torch's deserializer, exporter
or training loop fails one request or job instead of the server.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.engine import subprocess_runner
from worker.engine.errors import EngineError
from worker.engine.files import environment, sha256_file
from worker.engine.inspect import ModelInfo, TensorInfo
from worker.engine.pt2_format import HOW_TO_MAKE_PT2 as HOW_TO_MAKE_PT2
from worker.engine.pt2_format import MAX_MEMBERS as MAX_MEMBERS
from worker.engine.pt2_format import is_pt2 as is_pt2
from worker.engine.pt2_format import looks_like_zip as looks_like_zip
from worker.engine.subprocess_runner import ChildFailed, Ended, Limits, Spawn

# The ONNX opset lowbit exports .pt2 programs to (torch.onnx's own opset: no version conversion).
EXPORT_OPSET = 18
INSPECT_TIMEOUT_S = 180.0
EXPORT_TIMEOUT_S = 1800.0
MAX_JSON_BYTES = 256 << 20
# The largest file a .pt2 child may write (RLIMIT_FSIZE): far above any real export, below a filled disk.
CHILD_FILE_LIMIT_MB = 64 << 10

_ATEN_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
_OPERATOR_TARGET = re.compile(
    r"_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|xor|"
    r"not_|invert|lshift|rshift|matmul)$"
)
_MATH_TARGET = re.compile(r"math\.(ceil|floor|trunc|sqrt|exp|log|log2|log10|fabs|isnan|isinf|isfinite)$")
_TORCH_TARGETS = frozenset({
    "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_float", "torch.sym_int", "torch.sym_ite",
    "torch.sym_sqrt", "torch.sym_sum", "torch._sym_sqrt", "torch.sym_constrain_range",
    "torch.sym_constrain_range_for_size", "torch._check", "torch._check_is_size", "torch._assert",
    "torch.ops.higher_order.cond", "torch.ops.higher_order.while_loop",
    "torch.ops.higher_order.wrap_with_set_grad_enabled", "torch.ops.higher_order.wrap_with_autocast",
})
# Names sympy may call in a shape expression: its own arithmetic and torch's shape functions.
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor",
    "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Tuple",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity",
})
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "pi", "E"})
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]{1,9}$")
_KEYWORD = re.compile(r"[a-z]{1,32}$")
_TREESPEC_TYPES = frozenset({
    None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict", "collections.namedtuple",
    "collections.deque", "torch.fx.immutable_collections.immutable_list",
    "torch.fx.immutable_collections.immutable_dict",
})
_PAYLOAD_NAME = {"weights": re.compile(r"weight_[0-9]{1,9}$"), "constants": re.compile(r"tensor_[0-9]{1,9}$")}
# torch.export's ScalarType codes (torch._export.serde.schema.ScalarType): every known one but UNKNOWN.
_SCALAR_TYPES = frozenset({*range(1, 14), *range(28, 36)})


def _unsafe(message: str) -> EngineError:
    return EngineError("unsafe_model", message)


def _unsupported(message: str) -> EngineError:
    return EngineError("unsupported_model", message)


@dataclass
class Pt2Archive:
    """What the static check found; enough to write the sanitized copy."""

    prefix: str
    program: dict[str, Any]
    weights: dict[str, Any]
    constants: dict[str, Any]
    members: dict[str, zipfile.ZipInfo]
    dropped: list[str] = field(default_factory=list)


def check_archive(path: Path) -> Pt2Archive:
    """Everything about an upload that can be decided without torch. Raises EngineError."""
    try:
        return _check_archive(Path(path))
    except ZIP_ERRORS as exc:
        raise EngineError("invalid_model", f"the .pt2 archive is damaged or unreadable ({exc})") from exc


# Damaged, encrypted or oddly compressed zip members surface as these.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError)


def _check_archive(path: Path) -> Pt2Archive:
    _check_head(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngineError("invalid_model", f"the .pt2 file is not a readable zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise EngineError("invalid_model", f"the archive has {len(infos)} members; at most {MAX_MEMBERS}")
        prefix = _top_folder([i.filename for i in infos])
        members = {i.filename[len(prefix):]: i for i in infos if not i.is_dir()}
        models = sorted(r for r in members if r.startswith("models/") and r.endswith(".json"))
        fmt = _read(zf, members, "archive_format", 64) if "archive_format" in members else b""
        if fmt.strip() != b"pt2" or not models:
            raise EngineError(
                "invalid_model",
                "the zip file is not a torch.export archive (no archive_format 'pt2' or no models/*.json); "
                f"{HOW_TO_MAKE_PT2}",
            )
        _check_member_names(members, models)
        program = _json(zf, members, "models/model.json")
        weights = _json(zf, members, "data/weights/model_weights_config.json") \
            if "data/weights/model_weights_config.json" in members else {"config": {}}
        constants = _json(zf, members, "data/constants/model_constants_config.json") \
            if "data/constants/model_constants_config.json" in members else {"config": {}}
        total = sum(i.file_size for i in infos)
        archive_bytes = path.stat().st_size
        # torch.export.save stores members uncompressed; a member that inflates far beyond its stored size is
        # not what it claims and would fill the disk when copied out (a zip bomb).
        if total > 2 * archive_bytes + (16 << 20):
            raise EngineError(
                "invalid_model",
                f"the archive declares {total} bytes of content in a {archive_bytes}-byte file; torch.export "
                "archives are stored uncompressed, so this one is refused",
            )
    try:
        for kind, config in (("weights", weights), ("constants", constants)):
            _check_payloads(kind, config, members)
        _check_program(program)
    except (TypeError, AttributeError, KeyError, IndexError) as exc:  # malformed, not merely unexpected
        raise EngineError("invalid_model", f"the archive's JSON is malformed ({type(exc).__name__}: {exc})") from exc
    dropped = sorted(r for r in members if r.startswith("extra/") or r.startswith("data/sample_inputs/"))
    arc = Pt2Archive(prefix, program, weights, constants, members, dropped)
    if total > 64 * (1 << 30):
        raise EngineError("invalid_model", "the archive unpacks to more than 64 GiB")
    return arc


def _check_head(path: Path) -> None:
    """The file's first bytes: not empty, not a pickle, a zip file."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise EngineError("invalid_model", "the model file is empty")
    if head[:1] == b"\x80":
        raise EngineError(
            "unsupported_model_format",
            "the file is a Python pickle (a torch.save checkpoint or a pickled module), which lowbit never loads: "
            f"unpickling can run arbitrary code. {HOW_TO_MAKE_PT2}",
        )
    if head != b"PK\x03\x04":
        raise EngineError(
            "invalid_model",
            f"the file is neither an ONNX model nor a torch.export archive (.pt2 is a zip file); {HOW_TO_MAKE_PT2}",
        )


def _top_folder(names: list[str]) -> str:
    """The archive's one top-level folder ("name/"); refuses pickled checkpoints and TorchScript archives."""
    tops = {n.split("/", 1)[0] for n in names}
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    if rel & {"data.pkl", "constants.pkl"} or any(r.startswith("code/") for r in rel):
        kind = "a TorchScript archive (torch.jit.save)" if any(r.startswith("code/") for r in rel) \
            else "a torch.save checkpoint"
        raise EngineError(
            "unsupported_model_format",
            f"the file is {kind}: its weights and code are pickled, and lowbit never unpickles uploads. "
            f"{HOW_TO_MAKE_PT2}",
        )
    if len(tops) != 1 or any("/" not in n for n in names):
        raise EngineError(
            "invalid_model",
            "the zip file is not a torch.export archive (its files are not under one top-level folder); "
            f"{HOW_TO_MAKE_PT2}",
        )
    return tops.pop() + "/"


def _check_member_names(members: dict[str, zipfile.ZipInfo], models: list[str]) -> None:
    """No compiled code, no legacy pickled weights, one program."""
    for r in members:
        if any(r.startswith(d) for d in ("data/aotinductor/", "data/executorch/", "data/mtia")) \
                or r.endswith((".so", ".dll", ".dylib")):
            raise _unsafe(
                f"the archive contains compiled code ('{r[:120]}', e.g. AOTInductor output), which lowbit does "
                "not load; save the exported program alone with torch.export.save"
            )
        if r in ("data/weights/model.pt", "data/constants/model.pt") or r.startswith("xl_model_weights/"):
            raise _unsafe(
                f"the archive stores weights in the legacy pickled format ('{r}'), which lowbit does not "
                "unpickle; save it again with a current torch.export.save"
            )
    if models != ["models/model.json"]:
        raise _unsupported(
            f"the archive holds {len(models)} programs ({', '.join(m[7:-5] for m in models[:5])}); lowbit takes "
            "an archive of one exported program, as torch.export.save writes it"
        )


def _read(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], name: str, limit: int) -> bytes:
    info = members[name]
    if info.file_size > limit:
        raise EngineError("invalid_model", f"archive member '{name}' is {info.file_size} bytes; at most {limit}")
    with zf.open(info) as f:
        return f.read(limit + 1)[:limit]


def _json(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], name: str) -> dict[str, Any]:
    try:
        data = json.loads(_read(zf, members, name, MAX_JSON_BYTES))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise EngineError("invalid_model", f"archive member '{name}' is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise EngineError("invalid_model", f"archive member '{name}' is not a JSON object")
    return data


def _check_payloads(kind: str, config: dict[str, Any], members: dict[str, zipfile.ZipInfo]) -> None:
    entries = config.get("config")
    if not isinstance(entries, dict):
        raise EngineError("invalid_model", f"the {kind} config of the archive has no 'config' object")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise EngineError("invalid_model", f"{kind} entry '{fqn}' is not an object")
        path_name = meta.get("path_name")
        if meta.get("use_pickle") is not False:
            raise _unsafe(
                f"{kind} entry '{str(fqn)[:100]}' is stored as a pickle (use_pickle), which lowbit never loads: "
                "unpickling can run arbitrary code. Tensor subclasses and custom or opaque objects are pickled "
                "by torch.export.save; export a model whose parameters, buffers and constants are plain tensors"
            )
        if not isinstance(path_name, str) or not _PAYLOAD_NAME[kind].match(path_name):
            raise _unsafe(
                f"{kind} entry '{str(fqn)[:100]}' is stored as '{str(path_name)[:60]}', not as a plain tensor file "
                "(custom and opaque objects are pickles, which lowbit never loads)"
            )
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            raise EngineError("invalid_model", f"{kind} entry '{fqn}' has no tensor metadata")
        record = f"data/{kind}/{path_name}"
        if record not in members:
            raise EngineError("invalid_model", f"{kind} entry '{fqn}' names '{record}', which is not in the archive")
        sizes = [s.get("as_int") for s in tm.get("sizes", []) if isinstance(s, dict)]
        if members[record].file_size == 0 and any(not isinstance(s, int) or s != 0 for s in sizes) and sizes:
            raise EngineError("invalid_model", f"{kind} entry '{fqn}' declares a non-empty tensor with no data")
        if tm.get("dtype") not in _SCALAR_TYPES:
            raise _unsupported(f"{kind} entry '{fqn}' has an unsupported dtype code {tm.get('dtype')!r}")


def _check_target(target: str) -> None:
    if _ATEN_TARGET.match(target):
        if "file" in target.split(".")[3].lower():
            raise _unsafe(f"the program calls '{target}', which reads or writes files; lowbit does not load it")
        return
    if _OPERATOR_TARGET.match(target) or _MATH_TARGET.match(target) or target in _TORCH_TARGETS:
        return
    raise _unsupported(
        f"the program calls '{target[:200]}', which is not an ATen operator; lowbit loads programs made of "
        "ATen operators only (custom operators and most higher-order operators are refused)"
    )


def _check_sym_expr(expr: str) -> None:
    """A shape expression must be plain sympy arithmetic over shape symbols: sympy evaluates it as Python."""
    bad = _unsafe(f"the program contains a shape expression that is not plain arithmetic: {expr[:200]!r}")
    if len(expr) > 20_000:
        raise bad
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise bad from exc
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator,
                             ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context)):
            continue
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
                raise bad
        elif isinstance(node, ast.keyword):
            if node.arg is None or not _KEYWORD.match(node.arg):
                raise bad
        elif isinstance(node, ast.Name):
            if not (node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES or _SYMBOL.match(node.id)):
                raise bad
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, str):
                if not _SYMBOL.match(v):
                    raise bad
            elif not isinstance(v, (bool, int, float)):
                raise bad
        else:
            raise bad


def _check_treespec(spec: str) -> None:
    try:
        data = json.loads(spec)
    except ValueError as exc:
        raise EngineError("invalid_model", "the program's input/output structure is not valid JSON") from exc
    stack = [data[1]] if isinstance(data, list) and len(data) == 2 else []
    if not stack:
        raise EngineError("invalid_model", "the program's input/output structure has an unknown format")
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            raise EngineError("invalid_model", "the program's input/output structure is malformed")
        if node.get("type") not in _TREESPEC_TYPES:
            raise _unsupported(
                f"the model's inputs or outputs are a '{str(node.get('type'))[:100]}', which lowbit does not load; "
                "export a model whose forward takes tensors and returns a tensor or a tuple/list/dict of tensors"
            )
        context = node.get("context")
        if isinstance(context, str) and context not in ("null", "[]"):
            _check_context(context)
        stack.extend(node.get("children_spec") or [])


def _check_context(context: str) -> None:
    """Tree-spec contexts are JSON that torch decodes with a hook importing any ``{"__enum__": ...}``."""
    try:
        data = json.loads(context)
    except ValueError:
        return  # torch fails on it too, importing nothing
    stack = [data]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if "__enum__" in o:
                raise _unsafe("the model's input/output structure names a Python enum to import; lowbit does not "
                              "import modules named by an upload")
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def _check_program(program: dict[str, Any]) -> None:
    if not isinstance(program.get("graph_module"), dict):
        raise EngineError("invalid_model", "models/model.json is not a serialized exported program")
    for name in (program.get("range_constraints") or {}):
        if not isinstance(name, str):
            raise _unsafe(f"the program has a shape symbol with an unexpected name: {str(name)[:100]!r}")
        if not _SYMBOL.match(name):
            # A derived dimension is keyed by its expression (a ceil-mode max-pool gives 2*s87): the same check
            # as every other shape expression, since sympy evaluates these too.
            _check_sym_expr(name)
    stack: list[Any] = [program]
    while stack:
        o = stack.pop()
        if isinstance(o, list):
            stack.extend(o)
            continue
        if not isinstance(o, dict):
            continue
        for key, value in o.items():
            if key in ("as_custom_obj", "custom_obj", "as_custom_objs") and value:
                raise _unsafe("the program uses custom (TorchScript) objects, which are pickles; lowbit does not "
                              "load them")
            if key == "custom_obj_values" and value:
                raise _unsafe("the program holds custom (TorchScript) objects, which lowbit does not load")
            if isinstance(value, str) and (key == "target" and "inputs" in o or key == "as_operator"):
                _check_target(value)
            elif key == "expr_str" and isinstance(value, str):
                _check_sym_expr(value)
            elif key in ("in_spec", "out_spec") and isinstance(value, str):
                _check_treespec(value)
            stack.append(value)


def sanitize(arc: Pt2Archive, src: Path, dest: Path) -> Path:
    """Write the copy that torch may load: program (without guards code), weights, constants, and an empty
    sample-inputs file. Nothing else from the upload is carried over."""
    try:
        return _sanitize(arc, src, dest)
    except ZIP_ERRORS as exc:
        dest.with_name(dest.name + ".tmp").unlink(missing_ok=True)
        raise EngineError("invalid_model", f"the .pt2 archive is damaged or unreadable ({exc})") from exc


def _sanitize(arc: Pt2Archive, src: Path, dest: Path) -> Path:
    program = dict(arc.program)
    program["guards_code"] = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    root = "archive/"
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for small in ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"):
            if small in arc.members:
                zout.writestr(root + small, _read(zin, arc.members, small, 4096))
        zout.writestr(root + "models/model.json", json.dumps(program))
        for kind, config in (("weights", arc.weights), ("constants", arc.constants)):
            zout.writestr(root + f"data/{kind}/model_{kind}_config.json", json.dumps(config))
            for path_name in sorted({m["path_name"] for m in config["config"].values()}):
                record = f"data/{kind}/{path_name}"
                with zin.open(arc.members[record]) as f, zout.open(root + record, "w", force_zip64=True) as out:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
        zout.writestr(root + "data/sample_inputs/model.pt", b"")
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# The child process


def run_child(
    command: str,
    request: dict[str, Any],
    work_dir: Path,
    timeout_s: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Run ``worker.engine.pt2_child``'s ``command`` on ``request`` in a child process (through the one child
    runner, ``worker.engine.subprocess_runner``: no secrets, its own session, dies with its parent, results
    as bounded JSON) and return its result.

    The child's own output goes to ``work_dir/COMMAND.log``, whose tail explains a crash; it runs with its
    temporary files in ``work_dir/tmp``. ``on_event`` receives its progress events and may raise (e.g.
    JobCancelled): the child is killed and the exception propagates.
    """
    # The child runs in work_dir: every path it is given (this folder's, and the request's) must be absolute.
    work_dir = Path(os.path.abspath(work_dir))
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / f"{command}.log"
    log_path.unlink(missing_ok=True)
    n = str(max(1, threads))
    spawn = Spawn(env=(("OMP_NUM_THREADS", n), ("MKL_NUM_THREADS", n)), log=log_path)
    # No memory or CPU limit of its own: inside a job's engine child it inherits the job's; the file limit
    # stops an archive that would write without end.
    limits = Limits(timeout_s=timeout_s, file_mb=CHILD_FILE_LIMIT_MB)

    def timed_out(_: Limits) -> EngineError:
        return EngineError(
            "torch_timeout",
            f"PyTorch did not finish '{command}' within {int(timeout_s)} s; the model may be too large "
            "for this worker, or the run too long (for qat_int8, fewer steps)",
        )

    def ended(end: Ended) -> EngineError:
        return EngineError(
            "torch_process_failed",
            f"the PyTorch process for '{command}' exited with status {end.returncode} without a result"
            + (f": {end.log_tail}" if end.log_tail else ""),
        )

    try:
        result: dict[str, Any] = subprocess_runner.run(
            f"worker.engine.pt2_child:{command}", request, limits, on_event, spawn=spawn, work_dir=work_dir,
            timed_out=timed_out, ended=ended, event_interval_s=0.0,  # every training step counts in progress
        )
    except ChildFailed as exc:  # pt2_child words torch's failures itself: this one came before it could
        raise EngineError(
            "torch_process_failed",
            f"the PyTorch process for '{command}' failed without a result: {exc.type_name}: {exc.message[:400]}",
        ) from exc
    return result


def _tensor_infos(items: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(str(t["name"]), str(t["dtype"]), tuple(t["shape"])) for t in items)


def inspect_pt2(path: Path, work_dir: Path, threads: int = 1) -> ModelInfo:
    """Check an uploaded .pt2 and describe its inputs and outputs (loads it in a child process)."""
    arc = check_archive(path)
    safe = sanitize(arc, Path(path), Path(os.path.abspath(work_dir)) / "sanitized.pt2")
    result = run_child("inspect", {"model": str(safe), "threads": threads}, Path(work_dir), INSPECT_TIMEOUT_S,
                       threads=threads)
    return ModelInfo(
        format="pt2",
        opset=int(result["opset"]),
        inputs=_tensor_infos(result["inputs"]),
        outputs=_tensor_infos(result["outputs"]),
        num_nodes=int(result["num_nodes"]),
        producer=str(result["producer"]),
    )


@dataclass
class Pt2Source:
    """A .pt2 prepared for a run: its sanitized copy and its ONNX export (checked against PyTorch)."""

    uploaded: Path
    sanitized: Path
    onnx_path: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def export_for_run(
    model_path: Path,
    work_dir: Path,
    *,
    calibration_path: Path | None,
    eval_path: Path | None,
    batch_size: int,
    threads: int,
    device: str,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    cache_dir: Path | None = None,
) -> Pt2Source:
    """Export an uploaded .pt2 to ONNX for the pipeline, in a child process, and check that ONNX Runtime
    reproduces PyTorch's outputs on (up to 64 of) the calibration samples (evaluation samples, or random
    inputs, when there is no calibration set). With ``cache_dir``, an export of the same archive checked
    on the same data is reused."""


    # Absolute: the export child runs in its work folder, where a relative path would name nothing.
    work_dir = Path(os.path.abspath(work_dir))
    arc = check_archive(model_path)
    safe = sanitize(arc, Path(model_path), work_dir / "sanitized.pt2")
    onnx_path = work_dir / "exported.onnx"
    data = calibration_path or eval_path
    data = Path(os.path.abspath(data)) if data else None
    uploaded_sha = sha256_file(Path(model_path))
    env = environment()
    key_parts = {"pt2": uploaded_sha, "data": sha256_file(Path(data)) if data else None, "batch_size": batch_size,
                 "opset": EXPORT_OPSET, "torch": env.get("torch"), "lowbit": env.get("lowbit"), "v": 1}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    cached = _cache_load(cache_dir, key, onnx_path) if cache_dir is not None else None
    started = time.perf_counter()
    if cached is not None:
        result = cached
    else:
        request = {
            "model": str(safe), "output": str(onnx_path), "opset": EXPORT_OPSET, "threads": threads,
            "data": str(data) if data else None, "batch_size": batch_size, "check_samples": 64, "device": device,
        }
        result = run_child("export", request, work_dir, EXPORT_TIMEOUT_S, on_event=on_event, threads=threads)
        if cache_dir is not None:
            _cache_save(cache_dir, key, onnx_path, result)
    report = {
        "uploaded_bytes": os.path.getsize(model_path),
        "uploaded_sha256": uploaded_sha,
        "exporter": f"torch.onnx.export(dynamo=True), torch {result.get('torch')}",
        "opset": EXPORT_OPSET,
        "seconds": round(time.perf_counter() - started, 3),
        "cache_used": cached is not None,
        "dynamic_dims": result.get("dynamic_dims", {}),
        "check": result["check"],
        "sanitized": {"guards_code_dropped": len(arc.program.get("guards_code") or []),
                      "members_dropped": arc.dropped},
    }
    return Pt2Source(Path(model_path), safe, onnx_path, report, list(result.get("warnings", [])))


def _cache_load(cache_dir: Path, key: str, dest: Path) -> dict[str, Any] | None:
    onnx_file, meta = Path(cache_dir) / f"{key}.onnx", Path(cache_dir) / f"{key}.json"
    try:
        result = json.loads(meta.read_text())
        if not isinstance(result, dict) or "check" not in result:
            return None
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(onnx_file, tmp)
        os.replace(tmp, dest)
        return result
    except (OSError, ValueError):
        return None  # a missing or damaged entry is a miss, never an error


def _cache_save(cache_dir: Path, key: str, onnx_path: Path, result: dict[str, Any]) -> None:
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for src, name in ((onnx_path, f"{key}.onnx"), (None, f"{key}.json")):
            tmp = Path(cache_dir) / f".{name}.{os.getpid()}.tmp"
            if src is not None:
                shutil.copyfile(src, tmp)
            else:
                tmp.write_text(json.dumps(result))
            os.replace(tmp, Path(cache_dir) / name)
    except OSError:
        pass  # caching is an optimisation only
