"""Import boundaries: the engine is a library, the API stays light."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_client_imports_nothing_of_the_server_engine_or_ml() -> None:
    mods = _modules_after("import app.client, app.client.cli\nfrom app.client import Client")
    heavy = {"fastapi", "starlette", "sqlalchemy", "celery", "kombu", "pydantic", "uvicorn", "torch", "onnxruntime",
             "onnx", "numpy", "worker"}
    assert not _top(mods) & heavy, _top(mods) & heavy
    assert {m for m in mods if m.startswith("app.")} <= {"app.client", "app.client.cli", "app.client.config",
                                                        "app.client.core", "app.client.errors",
                                                        "app.client.recipes"}
