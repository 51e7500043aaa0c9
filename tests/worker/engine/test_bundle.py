"""Unpacking model bundles (.zip/.tar of one .onnx and its data files): real bundles unpack; every hostile
one (paths outside, links, devices, duplicates, bombs, lying sizes) is refused before anything lands outside
the destination."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.builders import external_decoder
from worker.engine.bundle import MAX_MEMBERS, unpack
from worker.engine.errors import EngineError
from worker.engine.inspect import inspect_model_file

LIMIT = 1 << 30


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        for info in members:
            body = (data or {}).get(info.name)
            tf.addfile(info, io.BytesIO(body) if body is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _model_files(tmp_path: Path) -> dict[str, bytes]:
    folder = external_decoder(tmp_path / "src", location="weights/model.data").parent
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _outside(tmp_path: Path) -> list[Path]:
    """Files anywhere under tmp_path except the sources and the destination."""
    return [p for p in tmp_path.rglob("*") if p.is_file() and not {"src", "dest"} & set(p.relative_to(tmp_path).parts)
            and p.suffix not in (".zip", ".tar")]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_real_bundle_unpacks_and_its_model_checks(tmp_path: Path, kind: str) -> None:
    files = _model_files(tmp_path)
    if kind == "zip":
        archive = _zip(tmp_path / "b.zip", {f"exported/{k}": v for k, v in files.items()}, zipfile.ZIP_DEFLATED)
    else:
        archive = _tar(tmp_path / "b.tar", [_file(f"exported/{k}", v)[0] for k, v in files.items()],
                       {f"exported/{k}": v for k, v in files.items()})
    out = unpack(archive, tmp_path / "dest", LIMIT)
    assert out.model == tmp_path / "dest" / "exported" / "model.onnx"
    assert out.files == 2 and out.total_bytes == sum(len(v) for v in files.values())
    assert inspect_model_file(out.model).external_bytes > 0


def _symlink_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("model.onnx.data")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
        zf.writestr("model.onnx", b"x")
    return path


def _tar_of(kind: str, path: Path) -> Path:
    info = tarfile.TarInfo("model.onnx.data")
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    onnx_info, data = _file("model.onnx", b"x")
    return _tar(path, [onnx_info, info], {"model.onnx": data})


def _lying_zip(path: Path) -> Path:
    """A member that declares 16 bytes and holds 1 MB (the central directory and local header both lie)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.onnx.data", b"\0" * (1 << 20))
        zf.writestr("model.onnx", b"x")
    out = bytearray(buf.getvalue())
    struct.pack_into("<I", out, out.index(b"PK\x03\x04") + 22, 16)
    struct.pack_into("<I", out, out.index(b"PK\x01\x02") + 24, 16)
    path.write_bytes(bytes(out))
    return path


HOSTILE = {
    "zip slip": lambda p: _zip(p / "b.zip", {"../evil.onnx": b"x"}),
    "absolute path": lambda p: _zip(p / "b.zip", {"/tmp/evil.onnx": b"x"}),
    "windows drive": lambda p: _zip(p / "b.zip", {"C:/evil.onnx": b"x"}),
    "backslash": lambda p: _zip(p / "b.zip", {"..\\evil.onnx": b"x"}),
    "zip symlink": lambda p: _symlink_zip(p / "b.zip"),
    "tar symlink": lambda p: _tar_of("symlink", p / "b.tar"),
    "tar hardlink": lambda p: _tar_of("hardlink", p / "b.tar"),
    "tar device": lambda p: _tar_of("device", p / "b.tar"),
    "tar fifo": lambda p: _tar_of("fifo", p / "b.tar"),
    "tar slip": lambda p: _tar(p / "b.tar", [_file("../evil.onnx", b"x")[0]], {"../evil.onnx": b"x"}),
    "duplicate name": lambda p: _tar(p / "b.tar", [_file("model.onnx", b"x")[0], _file("model.onnx", b"y")[0]],
                                     {"model.onnx": b"x"}),
    "file under a file": lambda p: _zip(p / "b.zip", {"model.onnx": b"x", "model.onnx/data": b"y"}),
    "too many members": lambda p: _zip(p / "b.zip", {f"f{i}": b"" for i in range(MAX_MEMBERS + 1)}),
    "compression bomb": lambda p: _zip(p / "b.zip", {"model.onnx": b"x", "w.data": b"\0" * (64 << 20)},
                                       zipfile.ZIP_DEFLATED),
    "size that lies": lambda p: _lying_zip(p / "b.zip"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_bundles_are_refused_and_nothing_lands_outside(tmp_path: Path, kind: str) -> None:
    archive = HOSTILE[kind](tmp_path)
    with pytest.raises(EngineError) as exc:
        unpack(archive, tmp_path / "dest", LIMIT)
    if kind == "size that lies":
        # zipfile reads no further than the declared size, and the checksum then fails.
        assert exc.value.code == "invalid_model" and "Bad CRC" in exc.value.message
        assert all(p.stat().st_size <= 16 for p in (tmp_path / "dest").rglob("*") if p.is_file())
    else:
        assert exc.value.code == "unsafe_bundle", exc.value.message
        assert "the bundle was refused" in exc.value.message
    assert _outside(tmp_path) == []
    assert not Path("/tmp/evil.onnx").exists()


def test_a_bundle_over_the_limit_is_refused_before_unpacking(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "b.zip", {"model.onnx": b"x", "model.onnx.data": os.urandom(4096)})
    with pytest.raises(EngineError) as exc:
        unpack(archive, tmp_path / "dest", 1024)
    assert exc.value.code == "unsafe_bundle" and "limit of 1024" in exc.value.message
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize(("members", "count"), [({"a.data": b"x"}, 0), ({"a.onnx": b"x", "b.onnx": b"y"}, 2)])
def test_a_bundle_holds_exactly_one_model(tmp_path: Path, members: dict[str, bytes], count: int) -> None:
    with pytest.raises(EngineError) as exc:
        unpack(_zip(tmp_path / "b.zip", members), tmp_path / "dest", LIMIT)
    assert exc.value.code == "invalid_model" and f"holds {count} .onnx files" in exc.value.message


def test_a_file_that_is_no_archive_says_how_to_pack_one(tmp_path: Path) -> None:
    (tmp_path / "b.zip").write_bytes(b"not an archive at all" * 100)
    with pytest.raises(EngineError) as exc:
        unpack(tmp_path / "b.zip", tmp_path / "dest", LIMIT)
    assert exc.value.code == "invalid_model" and "zip -0" in exc.value.message


def test_an_onnx_member_over_2_gb_is_refused_from_its_declared_size() -> None:
    from pathlib import PurePosixPath

    from worker.engine.bundle import _check, _Member

    big = _Member(PurePosixPath("model.onnx"), False, 3 << 30, 3 << 30)
    with pytest.raises(EngineError) as exc:
        _check([big], 1 << 40)
    assert exc.value.code == "invalid_model" and "at most 2 GB" in exc.value.message
