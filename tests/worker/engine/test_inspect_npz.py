from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests import builders
from worker.engine.errors import EngineError
from worker.engine.feeds import COMPLETE, STACKED, iter_batches, plan_feeds
from worker.engine.inspect import TensorInfo, check_model, inspect_model_file, parse_model_bytes
from worker.engine.npz import NpzReader, inspect_npz


def test_inspect_conv_net(zoo: dict[str, Path]) -> None:
    info = inspect_model_file(zoo["conv"])
    assert info.opset == 17
    assert [i.to_dict() for i in info.inputs] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert info.outputs[0].shape == ("batch", 10)


def test_inspect_transformer_has_int64_inputs(zoo: dict[str, Path]) -> None:
    info = inspect_model_file(zoo["tf"])
    assert {i.name: i.dtype for i in info.inputs} == {"input_ids": "int64", "attention_mask": "int64"}


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "invalid_model"),
        (b"PK\x03\x04rest-of-a-zip", "invalid_model"),
        (b"\x80\x04\x95pickle", "invalid_model"),
        (b"<html><body>not a model</body></html>", "invalid_model"),
    ],
)
def test_parse_refuses_non_models(data: bytes, code: str) -> None:
    with pytest.raises(EngineError) as e:
        check_model(parse_model_bytes(data))
    assert e.value.code == code


def test_truncated_model_is_refused(zoo: dict[str, Path]) -> None:
    data = zoo["conv"].read_bytes()
    with pytest.raises(EngineError) as e:
        check_model(parse_model_bytes(data[: len(data) // 2]))
    assert e.value.code == "invalid_model"


def test_old_opset_is_refused_with_advice(zoo: dict[str, Path]) -> None:
    m = onnx.load(str(zoo["const"]))
    m.opset_import[0].version = 9
    with pytest.raises(EngineError) as e:
        check_model(m)
    assert e.value.code == "unsupported_opset" and "opset" in e.value.message


def test_npz_headers_and_streaming_reads(tmp_path: Path) -> None:
    x = np.arange(10 * 3 * 2, dtype=np.float32).reshape(10, 3, 2)
    p = builders.save_npz(tmp_path / "d.npz", x=x, labels=np.arange(10))
    info = inspect_npz(p)
    assert info.num_samples == 10 and info.has_labels
    assert info.arrays["x"].to_dict() == {"dtype": "float32", "shape": [10, 3, 2]}
    r = NpzReader(p, info)
    np.testing.assert_array_equal(r.read("x", 3, 6), x[3:6])
    chunks = list(r.iter_chunks("x", 2, 10, 3))
    assert [c.shape[0] for c in chunks] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), x[2:10])


def test_npz_compressed_and_big_endian(tmp_path: Path) -> None:
    x = np.arange(12, dtype=">f4").reshape(6, 2)
    p = tmp_path / "c.npz"
    np.savez_compressed(p, x=x)
    info = inspect_npz(p)
    assert info.arrays["x"].dtype == "float32"
    got = NpzReader(p, info).read("x", 1, 4)
    assert got.dtype == np.dtype("float32")
    np.testing.assert_array_equal(got, x[1:4].astype(np.float32))


def test_npz_refuses_object_arrays(tmp_path: Path) -> None:
    p = tmp_path / "o.npz"
    np.savez(p, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(EngineError) as e:
        inspect_npz(p)
    assert e.value.code == "invalid_dataset" and "pickle" in e.value.message


def test_npz_refuses_non_zip_zero_samples_and_mismatched_counts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(EngineError) as e:
        inspect_npz(bad)
    assert e.value.code == "invalid_dataset"
    with pytest.raises(EngineError) as e:
        inspect_npz(builders.save_npz(tmp_path / "z.npz", x=np.zeros((0, 4), np.float32)))
    assert e.value.code == "empty_dataset"
    with pytest.raises(EngineError) as e:
        inspect_npz(builders.save_npz(tmp_path / "m.npz", a=np.zeros((3, 4)), b=np.zeros((4, 4))))
    assert e.value.code == "invalid_dataset" and "number of samples" in e.value.message


def test_npz_refuses_non_npy_members(tmp_path: Path) -> None:
    p = tmp_path / "x.npz"
    with zipfile.ZipFile(p, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 2), np.float32))
        zf.writestr("x.npy", buf.getvalue())
        zf.writestr("evil.py", "print('hi')")
    with pytest.raises(EngineError) as e:
        inspect_npz(p)
    assert "not a .npy" in e.value.message


IMG = (TensorInfo("image", "float32", ("batch", 3, 8, 8)),)


def test_feed_plan_stacked_dynamic_batch(tmp_path: Path) -> None:
    p = builders.save_npz(tmp_path / "a.npz", image=np.zeros((20, 3, 8, 8), np.float32))
    info = inspect_npz(p)
    plan = plan_feeds(IMG, info, batch_size=8)
    assert plan.modes == {"image": STACKED} and plan.samples_per_run == 8
    batches = list(iter_batches(NpzReader(p, info), IMG, plan, 0, 20))
    assert [b.feed["image"].shape[0] for b in batches] == [8, 8, 4]


def test_feed_plan_complete_feeds_for_inputs_without_batch_axis(tmp_path: Path) -> None:
    state = (TensorInfo("h0", "float32", (2, 1, 16)),)
    p = builders.save_npz(tmp_path / "s.npz", h0=np.ones((5, 2, 1, 16), np.float32))
    info = inspect_npz(p)
    plan = plan_feeds(state, info)
    assert plan.modes == {"h0": COMPLETE} and plan.samples_per_run == 1
    feeds = [b.feed["h0"] for b in iter_batches(NpzReader(p, info), state, plan, 0, 5)]
    assert len(feeds) == 5 and feeds[0].shape == (2, 1, 16)


def test_feed_plan_fixed_batch_drops_partial_tail(tmp_path: Path) -> None:
    fixed = (TensorInfo("x", "float32", (4, 6)),)
    p = builders.save_npz(tmp_path / "f.npz", x=np.zeros((10, 6), np.float32))
    info = inspect_npz(p)
    plan = plan_feeds(fixed, info)
    assert plan.samples_per_run == 4
    assert [b.count for b in iter_batches(NpzReader(p, info), fixed, plan, 0, 10)] == [4, 4]


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"wrong": np.zeros((4, 3, 8, 8), np.float32)}, "missing array"),
        ({"image": np.zeros((4, 3, 8, 8), np.float32), "extra": np.zeros((4, 1))}, "match no model input"),
        ({"image": np.zeros((4, 3, 8, 8), np.float64)}, "dtype float64"),
        ({"image": np.zeros((4, 3, 9, 8), np.float32)}, "shape [4, 3, 9, 8]"),
    ],
)
def test_feed_plan_reports_mismatches(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    info = inspect_npz(builders.save_npz(tmp_path / "m.npz", **arrays))
    with pytest.raises(EngineError) as e:
        plan_feeds(IMG, info)
    assert e.value.code == "dataset_mismatch"
    assert needle in e.value.message


def test_encrypted_npz_member_is_a_clear_error(tmp_path: Path) -> None:
    p = builders.save_npz(tmp_path / "e.npz", x=np.zeros((3, 2), np.float32))
    data = bytearray(p.read_bytes())
    # Set the "encrypted" flag bit in the local and central headers.
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        i = data.find(sig)
        off = i + (6 if sig == b"PK\x03\x04" else 8)
        data[off] |= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(EngineError) as e:
        inspect_npz(p)
    assert e.value.code == "invalid_dataset"
