"""Functions that misbehave on purpose, run by tests in the sandbox's child process."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError


def echo(payload: Any, emit: Any) -> Any:
    for i in range(3):
        emit(("calibrating", i / 2))
    return {"doubled": payload * 2}


def loaded(payload: list[str], emit: Any) -> dict[str, bool]:
    """Which of the modules named in ``payload`` the child holds."""
    import sys

    return {name: name in sys.modules for name in payload}


@dataclass(frozen=True)
class Job:
    """A payload shaped like the engine's QuantizeConfig where it matters to the sandbox: paths, a work folder."""

    source: Path
    work_dir: Path | None = None


def where(payload: Job, emit: Any) -> dict[str, Any]:
    """Where the child runs (working directory, temp folder), and whether the payload's path still names its file."""
    return {"cwd": os.getcwd(), "tmp": tempfile.gettempdir(), "tmpdir_env": os.environ.get("TMPDIR"),
            "source": payload.source.read_text(), "source_path": str(payload.source)}


def segfault(payload: Any, emit: Any) -> None:
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV


def balloon(payload: Any, emit: Any) -> list[bytearray]:
    chunks = []
    for _ in range(1000):  # 64 GB in 64 MB steps: touches far more than any test limit
        chunks.append(bytearray(64 * 1024 * 1024))
    return chunks


def spin(payload: Any, emit: Any) -> int:
    n = 0
    while True:
        n += 1


def sleep(payload: Any, emit: Any) -> None:
    emit(("preparing", 0.0))
    time.sleep(float(payload))


def refuse(payload: Any, emit: Any) -> None:
    raise EngineError("invalid_model", "this model is not one we can read")


def bug(payload: Any, emit: Any) -> None:
    raise KeyError("missing")


def pid(payload: Any, emit: Any) -> None:
    import os

    emit(("pid", float(os.getpid())))
    time.sleep(float(payload))


def balloon_model(path: Any, gigabytes: int = 40) -> Any:
    """A valid ONNX model whose ConstantOfShape asks for ``gigabytes`` of float32: y = x + sum(zeros(n))."""
    import onnx
    from onnx import TensorProto, helper

    n = int(gigabytes * 1024**3 / 4)
    side = int(n**0.5)
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"],
                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "total"], ["y"]),
        ],
        "balloon",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [side, side])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def endless_loop_model(path: Any, trips: int = 2**62) -> Any:
    """A valid ONNX model whose Loop runs ``trips`` times (for ever, in practice): y = x + loop count."""
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "cond", "zero"], ["count"], body=body),
            helper.make_node("Add", ["x", "count"], ["y"]),
        ],
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
         helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


class _Canary:
    """Unpickling this creates the file named in its state: the parent must never unpickle it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def forge(payload: Any, emit: Any) -> None:
    """A child taken over by its input: writes a pickle with a payload straight into the pipe to the parent."""
    import sys
    from multiprocessing.connection import Connection

    Connection(int(sys.argv[2]), readable=False).send(("ok", _Canary(str(payload))))
    time.sleep(30)


def last_words_then_segfault(payload: Any, emit: Any) -> None:
    import sys

    print("last words before the crash", file=sys.stderr, flush=True)
    segfault(payload, emit)


def nest(payload: Any, emit: Any) -> None:
    """Start a child of its own through the shared runner (as a job's engine starts a .pt2 child), tell its pid."""
    from worker.engine import subprocess_runner

    subprocess_runner.run("tests.worker.faults:sleep", 60, subprocess_runner.Limits(),
                          on_start=lambda pid: emit(("grandchild", float(pid))))
