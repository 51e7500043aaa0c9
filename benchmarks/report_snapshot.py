"""Reports of a fixed set of jobs (every recipe on the test models), without their timing fields: run it on two
versions of the code and compare, to show that a refactor changed no number and no key.

    .venv/bin/python benchmarks/report_snapshot.py run OUT.json [--models DIR]  # every job via `lowbit quantize`
    .venv/bin/python benchmarks/report_snapshot.py compare A.json B.json

The jobs run with one thread each, so the figures are deterministic; fields that measure time (latency,
seconds, speed-up and the environment's versions) and warnings that quote timings are dropped before the
comparison. Give both runs the same ``--models`` folder (built by the first run): a ``.pt2`` that torch.export
writes records the path of the code that built it, so models built from two checkouts differ in bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import builders, pt2_builders  # noqa: E402

# (name, model key, data key, recipe, options, accuracy target)
JOBS: list[tuple[str, str, str, str, dict[str, Any], dict[str, Any] | None]] = [
    ("mlp-static-minmax", "mlp", "mlp_data", "int8_static", {"method": "minmax"}, None),
    ("mlp-static-entropy", "mlp", "mlp_data", "int8_static", {"method": "entropy"}, None),
    ("conv-static-percentile", "conv", "conv_data", "int8_static", {"method": "percentile"}, None),
    ("conv-static-mse", "conv", "conv_data", "int8_static", {"method": "mse", "layer_sensitivity": True}, None),
    ("tf-static", "tf", "tf_data", "int8_static", {}, None),
    ("mlp-dynamic", "mlp", "mlp_data", "int8_dynamic", {}, None),
    ("tf-dynamic", "tf", "tf_data", "int8_dynamic", {}, None),
    ("tf-int4-rtn", "tf", "tf_data", "int4_weight_only", {"algorithm": "rtn"}, None),
    ("mlp-int4-gptq", "mlp", "mlp_data", "int4_weight_only", {"algorithm": "gptq"}, None),
    ("mlp-int4-a8", "mlp", "mlp_data", "int4_weight_only", {"int8_activations": True}, None),
    ("conv-fp16", "conv", "conv_data", "fp16", {}, None),
    # By size only: which candidate is "not slower than fp32" on a 0.01 ms model is timing noise.
    ("mlp-auto", "mlp", "mlp_data", "auto", {"max_fallback_steps": 1, "prefer": "size"},
     {"metric": "cosine", "min": 0.99}),
    ("pt2-static", "pt2", "pt2_data", "int8_static", {}, None),
    ("pt2-qat", "pt2", "pt2_data", "qat_int8", {"steps": 10}, None),
]
TIMING = ("latency", "seconds", "speedup", "elapsed", "duration", "environment", "started", "finished", "worker",
          "slower", "faster")


def _timing(key: str) -> bool:
    k = key.lower()
    return any(t in k for t in TIMING) or k.endswith(("_s", "_ms"))


def build(d: Path) -> dict[str, Path]:
    import numpy as np

    z = {"mlp": builders.mlp(d / "mlp.onnx"), "conv": builders.conv_net(d / "conv.onnx"),
         "tf": builders.tiny_transformer(d / "tf.onnx"), "pt2": pt2_builders.conv_net(d / "pt2.pt2")}
    z["mlp_data"] = builders.mlp_data(d / "mlp_data.npz", n=48, labels=True, model=z["mlp"])
    z["conv_data"] = builders.image_data(d / "conv_data.npz", n=32)
    z["tf_data"] = builders.token_data(d / "tf_data.npz", n=32)
    image = np.random.default_rng(5).standard_normal((32, 3, 32, 32)).astype(np.float32)
    z["pt2_data"] = builders.save_npz(d / "pt2_data.npz", image=image)
    return z


def strip(value: Any) -> Any:
    """The report without fields that measure time."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not _timing(k)}
    if isinstance(value, list):
        return [strip(v) for v in value if not (isinstance(v, str) and (" slower than " in v or " ms " in v))]
    return value


def run(out: Path, models: Path | None) -> None:
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-snapshot-") as tmp:
        d = Path(tmp)
        if models is None:
            z = build(d)
        else:
            if not (models / "pt2_data.npz").exists():
                models.mkdir(parents=True, exist_ok=True)
                build(models)
            z = {p.stem: p for p in models.iterdir()}  # build() names each file by its key
        for name, model, data, recipe, options, target in JOBS:
            cmd = [sys.executable, "-m", "app.cli", "quantize", str(z[model]), "--calib", str(z[data]),
                   "--recipe", recipe, "--threads", "1", "-o", str(d / f"{name}.onnx"),
                   "--report", str(d / f"{name}.json")]
            for k, v in {"latency_runs": 2, **options}.items():
                cmd += ["--option", f"{k}={json.dumps(v)}"]
            if target:
                cmd += ["--accuracy-target", json.dumps(target)]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if p.returncode != 0:
                reports[name] = {"failed": p.returncode, "stderr": p.stderr.strip().splitlines()[-1:]}
            else:
                reports[name] = strip(json.loads((d / f"{name}.json").read_text()))
            print(f"{name}: {'ok' if p.returncode == 0 else 'FAILED ' + p.stderr[-300:]}", flush=True)
    out.write_text(json.dumps(reports, indent=1, sort_keys=True))


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in A" for k in a.keys() - b.keys()]
        out += [f"{path}.{k}: only in B" for k in b.keys() - a.keys()]
        for k in sorted(a.keys() & b.keys()):
            out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items in A, {len(b)} in B"]
        return [x for i, (u, v) in enumerate(zip(a, b, strict=True)) for x in diff(u, v, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--models", type=Path, help="build the test models here once and reuse them")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.out, args.models)
        return 0
    # Stripped again: a snapshot taken by an older copy of this script may keep fields now known to be timing.
    found = diff(strip(json.loads(args.a.read_text())), strip(json.loads(args.b.read_text())))
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) between {args.a} and {args.b}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
