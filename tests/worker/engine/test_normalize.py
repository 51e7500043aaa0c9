from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tests import builders
from worker.engine.normalize import normalize, shapes_known

ROOT = Path(__file__).resolve().parents[3]


def _contrib_op(path: Path) -> Path:
    """A model with an operator ONNX does not know (ONNX Runtime's com.microsoft Gelu, as in a model ONNX
    Runtime has fused): ONNX's shape inference leaves its output untyped, symbolic shape inference types it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"), helper.make_node("Relu", ["g"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
              path)
    return path


def _reshape_by_runtime_shape(path: Path) -> Path:
    """A model whose Reshape target is computed from a runtime value (sizes ONNX inference cannot tell)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Reshape", ["x", "k"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x, k], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_shape_check_tells_complete_from_incomplete_inference(tmp_path: Path) -> None:
    conv = builders.conv_net(tmp_path / "conv.onnx")
    assert shapes_known(onnx.load(str(conv)), conv)
    # Unknown sizes with known types and ranks need nothing more; an untyped output does.
    reshaped = _reshape_by_runtime_shape(tmp_path / "reshaped.onnx")
    assert shapes_known(onnx.load(str(reshaped)), reshaped)
    odd = _contrib_op(tmp_path / "odd.onnx")
    assert not shapes_known(onnx.load(str(odd)), odd)


def test_complete_shapes_skip_symbolic_inference_and_sympy(tmp_path: Path) -> None:
    """A model ONNX's shape inference types throughout is pre-processed without symbolic shape inference, so
    the job never imports sympy (33 MB); one with an untyped tensor still gets it. Each in a fresh interpreter."""
    conv = builders.conv_net(tmp_path / "conv.onnx")
    odd = _contrib_op(tmp_path / "odd.onnx")
    probe = ("import sys; from pathlib import Path; from worker.engine.normalize import normalize; "
             "r = normalize(Path(sys.argv[1]), Path(sys.argv[2]), per_channel=True); "
             "print(r.steps[-1]); print('sympy' in sys.modules)")
    out = {}
    for name, model in (("conv", conv), ("odd", odd)):
        done = subprocess.run([sys.executable, "-c", probe, str(model), str(tmp_path / name)], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        out[name] = done.stdout.split("\n")[:2]
    assert out["conv"] == ["pre-processed (ONNX shape inference (every tensor typed) and graph optimisation)", "False"]
    assert out["odd"][1] == "True" and "(complete)" not in out["odd"][0]


def test_skipping_symbolic_inference_leaves_the_graph_as_it_was(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.engine.normalize as norm

    conv = builders.conv_net(tmp_path / "conv.onnx")
    fast = onnx.load(str(normalize(conv, tmp_path / "fast", per_channel=True).path))
    monkeypatch.setattr(norm, "shapes_known", lambda model, path: False)
    full = onnx.load(str(normalize(conv, tmp_path / "full", per_channel=True).path))
    assert [(n.op_type, list(n.input), list(n.output)) for n in fast.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in full.graph.node]
    assert sorted((i.name, i.raw_data) for i in fast.graph.initializer) == \
        sorted((i.name, i.raw_data) for i in full.graph.initializer)


def test_pre_processing_leaves_the_callers_folder_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This model stops ONNX Runtime's symbolic shape inference, which then saves sym_shape_infer_temp.onnx and a
    <uuid1>.data file into the working directory: a script calling the engine in-process (no CLI, no worker
    scratch folder around it) must find its own folder as it was."""
    model = builders.unmerged_dims_mlp(tmp_path / "unmerged.onnx")
    cwd = tmp_path / "caller"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    import worker.engine.normalize as norm

    monkeypatch.setattr(norm, "shapes_known", lambda m, p: False)  # ONNX's inference shapes it; force symbolic
    res = normalize(model, tmp_path / "prep", per_channel=True)
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert (tmp_path / "prep" / "sym_shape_infer_temp.onnx").exists()  # it did stop early, in the prep folder
    assert res.path.exists()


def test_pre_processing_without_symbolic_inference_matches_onnx_runtimes(tmp_path: Path) -> None:
    """lowbit's file-to-file pre-processing (ONNX Runtime's basic optimisations, then ONNX's shape inference)
    writes the graph ONNX Runtime's quant_pre_process(skip_symbolic_shape=True) writes, and the tag it leaves."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    conv = builders.conv_net(tmp_path / "conv.onnx")
    ours = onnx.load(str(normalize(conv, tmp_path / "ours", per_channel=True).path))
    quant_pre_process(str(tmp_path / "ours" / "staged.onnx"), str(tmp_path / "ort.onnx"), skip_symbolic_shape=True)
    theirs = onnx.load(str(tmp_path / "ort.onnx"))
    assert ours.graph.SerializeToString(deterministic=True) == theirs.graph.SerializeToString(deterministic=True)
    assert {p.key: p.value for p in ours.metadata_props} == {"onnx.quant.pre_process": "onnxruntime.quant"}
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["normalized.onnx", "staged.onnx"]
