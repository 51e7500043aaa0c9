"""Import boundaries: the engine is a library, the API stays light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest


def _modules_after(stmt: str) -> set[str]:
    code = f"import sys, json\n{stmt}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _top(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


@pytest.mark.parametrize(
    "module",
    ["worker.engine", "worker.engine.pipeline", "worker.engine.calibrate", "worker.engine.validate",
     "worker.engine.preflight", "worker.engine.normalize"],
)
def test_engine_imports_no_web_queue_or_database(module: str) -> None:
    top = _top(_modules_after(f"import {module}"))
    assert not top & {"fastapi", "starlette", "celery", "kombu", "sqlalchemy", "app"}, top & {
        "fastapi", "starlette", "celery", "kombu", "sqlalchemy", "app"}


def test_app_does_not_import_torch_or_onnxruntime() -> None:
    top = _top(_modules_after(
        "import os, tempfile; os.environ['LOWBIT_DATA_DIR'] = tempfile.mkdtemp()\n"
        "import app.main; app.main.create_app()"
    ))
    assert "fastapi" in top  # the probe itself works
    assert "torch" not in top
    assert "onnxruntime" not in top


def test_engine_imports_onnxruntime_lazily() -> None:
    top = _top(_modules_after("import worker.engine.inspect, worker.engine.npz, worker.engine.preflight"))
    assert "onnxruntime" not in top and "torch" not in top


def test_an_int8_run_loads_no_pydantic_openssl_random_masked_arrays_or_other_recipes_machinery(tmp_path: Path) -> None:
    # What an ONNX int8_static `lowbit quantize` leaves out, each a share of a small model's job's peak (README,
    # "benchmarks/zoo.py"): the report's typed contract (pydantic: the job checks the report against its committed
    # schema, report_check), OpenSSL's libcrypto (hashlib's default: the engine hashes with CPython's own SHA-256
    # below files.OPENSSL_FROM_BYTES), numpy.random (which loads libcrypto through secrets and hmac; the bootstrap
    # draws with metrics.resample_indices), numpy.ma (which np.median, np.percentile and np.unique import: the job
    # takes order statistics with metrics.percentile and metrics.median), the .pt2 export's child-process
    # launcher (multiprocessing), and the modules of what the job does not run: the 4-bit quantizer (int4,
    # streaming, blockquant, four_bit_weights), fp16's converter and learned rounding.
    from tests import builders

    model = builders.mlp(tmp_path / "m.onnx")
    calib = builders.mlp_data(tmp_path / "c.npz", n=32)
    out = tmp_path / "q.onnx"
    mods = _modules_after(
        "import contextlib, io\nfrom app.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main(['quantize', {str(model)!r}, '--calib', {str(calib)!r}, '-o', {str(out)!r}])\n"
        "assert code == 0, code")
    assert out.exists() and "onnxruntime.quantization" in mods  # the probe itself ran a job
    loaded = {m for m in mods if m.split(".")[0] in {"pydantic", "pydantic_core", "_hashlib", "hmac", "secrets",
                                                      "multiprocessing"} or m.startswith("numpy.random")
              or m == "numpy.ma" or m.startswith("numpy.ma.")
              or m in {"worker.engine.pt2", "worker.engine.subprocess_runner", "worker.engine.report",
                       "worker.engine.int4", "worker.engine.streaming", "worker.engine.blockquant",
                       "worker.engine.four_bit_weights", "worker.engine.fp16", "worker.engine.adaround",
                       "onnxruntime.transformers.float16"}}
    assert not loaded, sorted(loaded)


def test_client_imports_nothing_of_the_server_engine_or_ml() -> None:
    mods = _modules_after("import app.client, app.client.cli\nfrom app.client import Client")
    heavy = {"fastapi", "starlette", "sqlalchemy", "celery", "kombu", "pydantic", "uvicorn", "torch", "onnxruntime",
             "onnx", "numpy", "worker"}
    assert not _top(mods) & heavy, _top(mods) & heavy
    assert {m for m in mods if m.startswith("app.")} <= {"app.client", "app.client.cli", "app.client.config",
                                                        "app.client.core", "app.client.errors",
                                                        "app.client.recipes"}


# The engine's own import graph, read from the source with ast (no import runs): every ``import`` and
# ``from ... import`` of a worker.engine module, at module level or inside a function. Imports under
# ``if TYPE_CHECKING:`` never run, so they make no cycle; they still may not reach for another module's
# private names.
ENGINE = Path(__file__).resolve().parents[1] / "worker" / "engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _engine_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of the module with whether it runs (False: under ``if TYPE_CHECKING``)."""

    def walk(node: ast.AST, runs: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, runs
            elif isinstance(child, ast.If) and _type_checking_only(child):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), runs)
            else:
                yield from walk(child, runs)

    yield from walk(tree, True)


def _resolve(module: str, stmt: ast.ImportFrom) -> str:
    if not stmt.level:
        return stmt.module or ""
    base = module.split(".")[: len(module.split(".")) - stmt.level]
    return ".".join([*base, *([stmt.module] if stmt.module else [])])


def _engine_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> engine modules it imports at run time, cross-module imports of underscore names)."""
    modules = _engine_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for name, path in modules.items():
        for stmt, runs in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names if a.name in modules]
            else:
                source = _resolve(name, stmt)
                if source not in modules:
                    continue
                # ``from package import module`` imports that module; ``from module import name`` the module.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in stmt.names]
                private += [f"{name} imports {source}.{a.name}" for a in stmt.names
                            if a.name.startswith("_") and f"{source}.{a.name}" not in modules]
            if runs:
                graph[name].update(t for t in targets if t != name)
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_engine_graph_reader_sees_imports_inside_functions() -> None:
    graph, _ = _engine_graph()
    assert "worker.engine.calibrate" in graph["worker.engine.recipes.int8_static"]  # imported in its handler
    assert "worker.engine.recipes.options" in graph["worker.engine.recipes.int8_static"]  # from package import mod
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engine_modules_import_no_cycle() -> None:
    graph, _ = _engine_graph()
    assert _cycles(graph) == []


def test_engine_modules_import_no_private_name_of_another() -> None:
    _, private = _engine_graph()
    assert private == []


# The import contracts in pyproject.toml ([tool.importlinter]): import-linter is a dev dependency, so a missing
# lint-imports fails here rather than skipping the check.
ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} is missing: pip install -e '.[dev]' installs import-linter"
    run = subprocess.run([str(lint_imports), "--no-logo", "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout, run.stdout


def test_import_contracts_name_every_worker_service_module() -> None:
    """The contracts list the worker's modules outside the engine one by one: a new one must join them, or the
    engine could import it and app could import it unchecked."""
    contracts = {c["id"]: c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]}
    service = {f"worker.{p.stem}" for p in (ROOT / "worker").glob("*.py") if p.stem != "__init__"}
    assert set(contracts["engine-is-a-library"]["forbidden_modules"]) == {"app", *service}
    top_layer = contracts["worker-over-app-over-engine"]["layers"][0]
    assert {m.strip() for m in top_layer.split(":")} == service


# Code style across the service and the engine (issue #16): short functions, and no reaching into another
# module's private names (the engine's own check above also sees its cycles; this one covers app and worker).
MAX_FUNCTION_LINES = 80


def _source_modules() -> dict[str, Path]:
    return {_module_name(p): p for top in ("app", "worker") for p in sorted((ROOT / top).rglob("*.py"))}


def test_app_and_worker_have_short_functions_and_import_no_private_name_of_another() -> None:
    modules = _source_modules()
    assert {"app.main", "app.pages.present", "worker.tasks", "worker.engine.pipeline"} <= set(modules)
    long: list[str] = []
    private: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):  # nested functions and methods too
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
        for stmt, _ in _imports(tree):  # function-level and TYPE_CHECKING imports included
            if not isinstance(stmt, ast.ImportFrom):
                continue
            source = _resolve(name, stmt)
            if source.split(".")[0] not in ("app", "worker"):
                continue  # other libraries' private modules (torch.utils._pytree) are theirs to name
            private += [f"{name} imports {source}.{a.name}" for a in stmt.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                        and f"{source}.{a.name}" not in modules]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert private == []


def test_service_functions_take_what_follows_their_first_two_parameters_by_keyword() -> None:
    """A service function with more than two parameters makes the rest keyword-only (``*,``): a call such as
    ``get_job(db, job_id, tenant_id=...)`` cannot pass a tenant where another id belongs."""
    positional: list[str] = []
    for path in sorted((ROOT / "app").glob("*/service.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                named = [*args.posonlyargs, *args.args]
                if len(named) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg) > 2 and len(named) > 2:
                    positional.append(f"{_module_name(path)}.{node.name}")
    assert positional == []


# Function-level imports (issue #16): an import inside a function hides a dependency from the module's header.
# Each one either imports a module of LAZY_MODULES or says why it is there in a comment on its line or the line
# before it (one comment covers a run of consecutive imports). A new hidden import fails here.
LAZY_MODULES = {
    "torch": "PyTorch (2-3 s, 200+ MB) runs only in the .pt2 child (worker.engine.pt2_child), which imports it after "
             "moving stdout aside and inside its error handling; app imports no torch (the app-without-torch contract)",
    "onnxruntime": "ONNX Runtime stays out of the API and the worker's main process (app imports no onnxruntime), and "
                   "onnxruntime.quantization (0.3-0.7 s, 15-50 MB) out of runs that do not quantize with it",
}
# Uncommented function-level imports in files other changes were editing when this test came in: (module, imported
# module). Comment each or move it to the module top, then drop its entry; an entry that no longer matches fails.
PENDING: set[tuple[str, str]] = set()


def _comment_lines(source: str) -> set[int]:
    import io
    import tokenize

    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def _import_runs(tree: ast.Module) -> Iterator[list[ast.Import | ast.ImportFrom]]:
    """Runs of consecutive import statements inside functions (each statement list of each function)."""
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        stack: list[ast.AST] = [fn]
        while stack:
            node = stack.pop()
            bodies = [getattr(node, f) for f in ("body", "orelse", "finalbody")
                      if isinstance(getattr(node, f, None), list)]
            bodies += [h.body for h in getattr(node, "handlers", [])] + [c.body for c in getattr(node, "cases", [])]
            for body in bodies:
                run: list[ast.Import | ast.ImportFrom] = []
                for stmt in [*body, None]:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        run.append(stmt)
                        continue
                    if run:
                        yield run
                    run = []
                    if stmt is not None and not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        stack.append(stmt)


def _unexplained_imports(name: str, source: str, modules: set[str] | None = None) -> list[tuple[str, str]]:
    """(module, imported module) of each function-level import that is neither lazy by LAZY_MODULES nor commented
    (``from package import module`` names the module when ``modules`` has it)."""
    lines, comments = source.splitlines(), _comment_lines(source)
    found = []
    for run in _import_runs(ast.parse(source)):
        first, last = run[0].lineno, run[-1].end_lineno or run[-1].lineno
        if lines[first - 2].strip().startswith("#") or comments & set(range(first, last + 1)):
            continue
        for stmt in run:
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                source_module = _resolve(name, stmt)
                known = modules or set()
                targets = [f"{source_module}.{a.name}" if f"{source_module}.{a.name}" in known else source_module
                           for a in stmt.names]
            found += [(name, t) for t in targets if t.split(".")[0] not in LAZY_MODULES]
    return found


def test_the_function_import_reader_sees_comments_and_runs() -> None:
    source = ("def f():\n    import json\n\n    import torch\n"
              "def g():\n    # why\n    import json\n\n    import csv\n"
              "def h():\n    if True:\n        import csv  # why\n        from . import x\n"
              "def k():\n    x = 1  # unrelated\n    import csv\n")
    assert _unexplained_imports("pkg.mod", source) == [("pkg.mod", "json"), ("pkg.mod", "csv")]


def test_function_level_imports_say_why() -> None:
    modules = _source_modules()
    found = {hit for name, path in modules.items()
             for hit in _unexplained_imports(name, path.read_text(), set(modules))}
    assert sorted(found - PENDING) == [], "a function-level import without a comment saying why (or move it to the top)"
    assert sorted(PENDING - found) == [], "no longer hidden: drop these from PENDING"


# Readers of the report (pages, client, CLIs, webhooks) read it through a typed model (worker.engine.report's
# Report, via Report.from_stored) or, in the client, which imports no pydantic, through its one JSON reader
# ReportSections.of, whose parameter is the JSON ``body``: never by indexing a report dict with a string key.
REPORT_READERS = ("app/pages", "app/client", "app/cli.py", "app/webhooks.py")


def _report_name(node: ast.expr) -> str | None:
    """The name of ``report``, ``job.report``, ``result.report`` ... when it contains 'report'."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    return name if name and "report" in name.lower() else None


def _string_key_reads(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _report_name(node.value) and not (
                isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)):
            yield node.lineno, f"{_report_name(node.value)}[...]"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "get", "pop", "setdefault") and _report_name(node.func.value):
            yield node.lineno, f"{_report_name(node.func.value)}.{node.func.attr}(...)"


def test_report_readers_do_not_index_reports_by_key() -> None:
    root = Path(__file__).resolve().parents[1]
    files = [p for top in REPORT_READERS for p in sorted((root / top).rglob("*.py")) + [root / top]
             if p.is_file() and p.suffix == ".py"]
    assert len(files) > 10  # the scan finds the readers
    found = [f"{p.relative_to(root)}:{line}: {what}" for p in files
             for line, what in _string_key_reads(ast.parse(p.read_text(), str(p)))]
    assert not found, "read the report through Report.from_stored (client: ReportSections.of):\n" + "\n".join(found)
