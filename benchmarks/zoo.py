"""Quantize the test models with every int8 recipe and print what the reports say.

    .venv/bin/python benchmarks/zoo.py

Builds its own models (a conv net at 32x32 and a 20 MB+ transformer with int64 token inputs), runs
each through the same engine the service uses, and prints size, accuracy and latency before/after.
Latencies are p50 at batch 1 on this machine's CPU, original and quantized measured in the same run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import builders  # noqa: E402
from worker.engine.config import QuantizeConfig, parse_options  # noqa: E402
from worker.engine.pipeline import run  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        conv = builders.conv_net(d / "conv.onnx", width=64)
        models = {
            "conv net (64-128 ch, 32x32)": (conv, builders.image_data(d / "img.npz", n=64, labels=True, model=conv)),
            "transformer (2 layers, vocab 8000, int64 ids)": (
                builders.tiny_transformer(d / "tf.onnx", vocab=8000, dim=256, seq=32, layers=2),
                builders.token_data(d / "tok.npz", n=48, vocab=8000, seq=32),
            ),
        }
        print(f"{'model':<46} {'recipe':<22} {'fp32 MB':>8} {'int8 MB':>8} {'ratio':>6} {'cosine':>8} "
              f"{'SQNR dB':>8} {'top1 agr':>8} {'labels':>15} {'fp32 ms':>8} {'int8 ms':>8} {'speedup':>7}")
        for name, (model, data) in models.items():
            for recipe, opts in (("int8_static", {"method": "minmax"}), ("int8_static", {"method": "entropy"}),
                                 ("int8_static", {"method": "percentile"}), ("int8_static", {"method": "mse"}),
                                 ("int8_dynamic", {})):
                cfg = QuantizeConfig(model_path=model, output_path=d / "out.onnx", recipe=recipe,
                                     options=parse_options(recipe, {**opts, "batch_size": 4, "latency_runs": 100}),
                                     calibration_path=data, threads=2, device="cpu")
                r = run(cfg).report
                o = r["accuracy"]["outputs"][0]
                lab = r["accuracy"]["labels"]
                labs = f"{lab['original']:.3f}->{lab['quantized']:.3f}" if lab else "-"
                label = f"{recipe} {opts.get('method', '')}".strip()
                print(f"{name:<46} {label:<22} {r['size']['original_bytes'] / 1e6:8.2f} "
                      f"{r['size']['quantized_bytes'] / 1e6:8.2f} {r['size']['ratio']:6.3f} {o['cosine']:8.5f} "
                      f"{o['sqnr_db']:8.2f} {o['top1_agreement']:8.3f} {labs:>15} "
                      f"{r['latency']['original_ms_p50']:8.3f} {r['latency']['quantized_ms_p50']:8.3f} "
                      f"{r['latency']['speedup']:7.2f}")


if __name__ == "__main__":
    main()
