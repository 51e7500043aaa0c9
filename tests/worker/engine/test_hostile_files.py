"""Hostile model and dataset files against the engine's checks: each is refused from what it declares,
before anything reads a file it names, recurses into it or allocates what it claims."""

from __future__ import annotations

import ast
import io
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine import inspect as model_inspect
from worker.engine import npz
from worker.engine.errors import EngineError
from worker.engine.inspect import check_model, parse_model_bytes
from worker.engine.npz import inspect_npz

ROOT = Path(__file__).resolve().parents[3]


# ---- builders -------------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_if_model(depth: int) -> bytes:
    """A model whose main graph holds an If whose then-branch holds an If... ``depth`` levels deep.

    Written as bytes by wrapping each level's serialized graph, since the onnx helpers themselves go
    through protobuf's parser and stop at its depth limit (which is part of what is tested)."""
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])  # noqa: E731
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "g0", [], [out("y0")])
    graph = leaf.SerializeToString()
    for i in range(1, depth + 1):
        # Fields may come in any order and repeat: the node's own fields, then the then_branch attribute
        # (AttributeProto.g = 6) appended by hand, and a tiny else_branch.
        other = helper.make_graph([helper.make_node("Identity", ["x"], [f"e{i}"])], f"e{i}", [], [out(f"e{i}")])
        node = helper.make_node("If", ["c"], [f"y{i}"], name=f"if{i}", else_branch=other)
        then_attr = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
        node_bytes = node.SerializeToString() + _field(5, then_attr + _field(6, graph))  # NodeProto.attribute = 5
        outer = helper.make_graph([], f"g{i}", [], [out(f"y{i}")]) if i < depth else helper.make_graph(
            [], "main", [out("x"), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [out(f"y{i}")])
        graph = outer.SerializeToString() + _field(1, node_bytes)  # GraphProto.node = 1
    model = helper.make_model(helper.make_graph([], "placeholder", [], []),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph)  # ModelProto.graph = 7


def small_model(initializer: TensorProto | None = None, input_shape: list[int | str] | None = None) -> onnx.ModelProto:
    """x [batch, 4] -> Add(x, w) -> y, with ``initializer`` as w if given."""
    w = initializer if initializer is not None else numpy_helper.from_array(np.ones(4, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", w.name], ["y"])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape or ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def external_initializer(location: str, offset: int | None = None, length: int | None = None) -> TensorProto:
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    t.data_location = TensorProto.EXTERNAL
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)
    return t


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def declare_size(data: bytes, member_size: int) -> bytes:
    """Rewrite the uncompressed size a one-member zip declares (local header and central directory) to
    ``member_size``, as a zip bomb's author would (without the gigabytes behind it)."""
    out = bytearray(data)
    local = out.index(b"PK\x03\x04")
    struct.pack_into("<I", out, local + 22, member_size)
    central = out.index(b"PK\x01\x02")
    struct.pack_into("<I", out, central + 24, member_size)
    return bytes(out)


def _code(fn, *args) -> str:
    with pytest.raises(EngineError) as e:
        fn(*args)
    assert e.value.message
    return e.value.code


# ---- ONNX --------------------------------------------------------------------------------------------

def test_moderately_nested_control_flow_still_loads() -> None:
    info = check_model(parse_model_bytes(nested_if_model(4)))
    assert [i.name for i in info.inputs] == ["x", "c"]


@pytest.mark.parametrize("depth", [model_inspect.MAX_SUBGRAPH_DEPTH + 1, 30, 300, 5000])
def test_deeply_nested_graph_is_refused_without_recursion(depth: int) -> None:
    data = nested_if_model(depth)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a recursive walk of 300 levels would fail here; the checks do not recurse
    try:
        code = _code(lambda: check_model(parse_model_bytes(data)))
    finally:
        sys.setrecursionlimit(limit)
    assert code == "model_too_complex"


@pytest.mark.parametrize("shape", [[2**40, 4], ["batch", 2**20, 2**20], [65536, 65536, 2]])
def test_graph_input_declaring_a_huge_shape_is_refused(shape: list[int | str]) -> None:
    model = small_model(input_shape=shape)
    assert _code(check_model, model) == "model_too_large"


@pytest.mark.parametrize("dim", [-1, 0])
def test_a_non_positive_dim_value_is_a_dynamic_dimension(dim: int) -> None:
    # Paddle2ONNX declares its dynamic batch as dim_value -1: a dynamic axis, not 2^32 elements.
    info = check_model(small_model(input_shape=[dim, 3]))
    assert info.inputs[0].shape == ("?", 3)


def test_initializer_declaring_more_than_it_holds_is_refused() -> None:
    # 2^40 float32 elements declared, 16 bytes stored: anything that trusted the dims would allocate 4 TiB.
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**20, 2**20], raw_data=b"\0" * 16)
    code = _code(check_model, small_model(t))
    assert code == "invalid_model"
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**20, 2**20], float_data=[1.0, 2.0])
    assert _code(check_model, small_model(t)) == "invalid_model"


def test_constant_node_declaring_a_huge_tensor_is_refused() -> None:
    model = small_model()
    huge = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[2**33], raw_data=b"\0" * 4)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], value=huge))
    assert _code(check_model, model) == "invalid_model"


@pytest.mark.parametrize("location, offset, length", [
    ("../../etc/passwd", None, None),
    ("/etc/passwd", None, None),
    ("weights.bin", 2**62, 2**62),
    ("weights.bin", -1, None),
    ("\x00evil", None, None),
])
def test_external_data_is_refused_from_the_declaration(location: str, offset: int | None, length: int | None) -> None:
    e = pytest.raises(EngineError, check_model, small_model(external_initializer(location, offset, length)))
    assert e.value.code == "external_data_not_supported"
    assert "\x00" not in e.value.message  # control characters from the file are shown escaped


def test_external_data_inside_a_subgraph_is_refused() -> None:
    inner = helper.make_graph([helper.make_node("Identity", ["w"], ["t"])], "then", [],
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
                              [external_initializer("../../etc/shadow")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "else", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", 4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=other)], "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert _code(check_model, model) == "external_data_not_supported"


# ---- .npz --------------------------------------------------------------------------------------------

def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "d.npz"
    p.write_bytes(data)
    return p


def test_npz_zip_bomb_is_refused_by_ratio(tmp_path: Path) -> None:
    member = npy_header((1024, 256)) + b"\0" * (1024 * 256 * 4)
    data = declare_size(zip_bytes({"x.npy": member}, zipfile.ZIP_DEFLATED), 2**32 - 2)
    e = pytest.raises(EngineError, inspect_npz, _write(tmp_path, data))
    assert e.value.code == "invalid_dataset" and "decompression bomb" in e.value.message


def test_npz_stored_member_lying_about_its_size_is_refused(tmp_path: Path) -> None:
    member = npy_header((4, 4)) + b"\0" * 64
    data = declare_size(zip_bytes({"x.npy": member}), 10**9)
    e = pytest.raises(EngineError, inspect_npz, _write(tmp_path, data))
    assert e.value.code == "invalid_dataset" and "decompression bomb" in e.value.message


def test_npz_total_declared_size_is_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = {f"x{i}.npy": npy_header((1000, 250)) + b"\0" * 1_000_000 for i in range(3)}
    path = _write(tmp_path, zip_bytes(members, zipfile.ZIP_DEFLATED))
    inspect_npz(path)  # 3 MB of zeros, deflated ~1000:1: a real dataset, accepted
    monkeypatch.setattr(npz, "MAX_UNCOMPRESSED_BYTES", 2_000_000)
    assert _code(inspect_npz, path) == "dataset_too_large"


def test_npz_other_compression_methods_are_refused(tmp_path: Path) -> None:
    member = npy_header((4, 4)) + b"\0" * 64
    assert _code(inspect_npz, _write(tmp_path, zip_bytes({"x.npy": member}, zipfile.ZIP_BZIP2))) == "invalid_dataset"


@pytest.mark.parametrize("shape", [(2**40,), (2**20, 2**20), (2**62, 2**62, 2**62)])
def test_npy_header_declaring_a_huge_array_is_refused_before_allocating(tmp_path: Path,
                                                                        shape: tuple[int, ...]) -> None:
    data = zip_bytes({"x.npy": npy_header(shape) + b"\0" * 64})
    assert _code(inspect_npz, _write(tmp_path, data)) == "dataset_too_large"


def test_npz_with_thousands_of_members_is_refused(tmp_path: Path) -> None:
    member = npy_header((1, 1)) + b"\0" * 4
    data = zip_bytes({f"a{i}.npy": member for i in range(3000)})
    e = pytest.raises(EngineError, inspect_npz, _write(tmp_path, data))
    assert e.value.code == "invalid_dataset" and "3000 members" in e.value.message


@pytest.mark.parametrize("members", [
    {"x.npy": npy_header((2,), "|O") + b"\x80\x04N."},  # an object array: its data is a pickle
    {"x.npy": npy_header((2, 2)) + b"\0" * 16, "run.sh": b"#!/bin/sh\n"},
    {"../x.npy": npy_header((2, 2)) + b"\0" * 16},
])
def test_npz_object_arrays_and_foreign_members_are_refused(tmp_path: Path, members: dict[str, bytes]) -> None:
    assert _code(inspect_npz, _write(tmp_path, zip_bytes(members))) == "invalid_dataset"


# ---- PyTorch -----------------------------------------------------------------------------------------

def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_nothing_unpickles_with_weights_only_false() -> None:
    """No call in the service's code runs torch.load without weights_only=True, passes weights_only=False, or
    unpickles at all; torch.export.load is only called by the child, on a sanitized copy."""
    offenders = []
    for path in sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            weights_only = kw.get("weights_only")
            if isinstance(weights_only, ast.Constant) and weights_only.value is False:
                offenders.append(f"{rel}:{node.lineno} {name}(weights_only=False)")
            if name.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value):
                offenders.append(f"{rel}:{node.lineno} {name} without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                offenders.append(f"{rel}:{node.lineno} {name}")
            if name.endswith("export.load") and rel != "worker/engine/pt2_child.py":
                offenders.append(f"{rel}:{node.lineno} {name}")
    assert offenders == []
