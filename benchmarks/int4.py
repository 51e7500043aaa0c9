"""4-bit weight-only benchmark: every algorithm and block size on a 20M+ parameter transformer-style model.

    .venv/bin/python benchmarks/int4.py

The model is built here: 4 pre-norm transformer layers (hidden 768, MLP 3072) over float hidden
states, with the structure real LLM weights and activations show: a few hidden channels carry
activations ~20x larger than the rest, and weight rows have heavy tails. For each algorithm and block
size it prints the 4-bit weight bytes against fp32, effective bits per weight (scales and zero points
included), accuracy against fp32 on held-out inputs (SQNR and cosine of the output) and the time the
quantization took. Numbers are from this run, on this machine.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.config import parse_options  # noqa: E402
from worker.engine.int4 import quantize_int4  # noqa: E402

HIDDEN, MLP, LAYERS, SEQ = 768, 3072, 4, 32
OUTLIER_CHANNELS = [17, 300, 511, 700]


def build(path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.qkv, self.out = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
            self.up, self.down = nn.Linear(HIDDEN, MLP), nn.Linear(MLP, HIDDEN)
            for lin in (self.qkv, self.out, self.up, self.down):
                # Heavy-tailed weights (Student-t, 4 dof), as trained transformer weights have.
                w = torch.distributions.StudentT(4.0).sample(lin.weight.shape) * 0.02
                lin.weight.data.copy_(w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            q, k, v = self.qkv(self.ln1(x)).reshape(b, SEQ, 3, 12, 64).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
            x = x + self.out((att @ v).transpose(1, 2).reshape(b, SEQ, HIDDEN))
            return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))

    class Model(nn.Module):
        gain: torch.Tensor  # a buffer (register_buffer)

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            gain = torch.ones(HIDDEN)
            gain[OUTLIER_CHANNELS] = 20.0  # a few outlier activation channels
            self.register_buffer("gain", gain)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            h = h * self.gain
            for layer in self.layers:
                h = layer(h)
            return h

    m = Model().eval()
    params = sum(p.numel() for p in m.parameters())
    assert params >= 20_000_000, params
    with torch.no_grad():
        torch.onnx.export(m, (torch.randn(1, SEQ, HIDDEN),), str(path), input_names=["hidden"],
                          output_names=["out"], dynamic_axes={"hidden": {0: "b"}, "out": {0: "b"}},
                          opset_version=17, dynamo=False)
    print(f"model: {params / 1e6:.1f}M parameters, {path.stat().st_size / 1e6:.1f} MB")
    return path


def main() -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    calib = [{"hidden": rng.standard_normal((4, SEQ, HIDDEN)).astype(np.float32)} for _ in range(8)]
    held = [{"hidden": rng.standard_normal((4, SEQ, HIDDEN)).astype(np.float32)} for _ in range(8)]

    def batches():
        for feed in calib:
            yield feed, 4

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = build(d / "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        ref_sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        ref = [ref_sess.run(None, f)[0].astype(np.float64) for f in held]
        print(f"{'algorithm':<12} {'block':>5} {'fp32 MB':>8} {'4-bit MB':>8} {'% of fp32':>9} {'bits/w':>7} "
              f"{'SQNR dB':>8} {'cosine':>9} {'quant s':>8}")
        for algorithm in ("rtn", "hqq", "gptq", "clip_search"):
            for block in (16, 32, 64, 128):
                out = d / f"{algorithm}-{block}.onnx"
                opts = parse_options("int4_weight_only", {"algorithm": algorithm, "block_size": block})
                t0 = time.perf_counter()
                res = quantize_int4(model, out, opts, algorithm, batches, ["CPUExecutionProvider"], 2)
                secs = time.perf_counter() - t0
                sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
                sig = noise = dot = qq = 0.0
                for f, r in zip(held, ref, strict=True):
                    y = sess.run(None, f)[0].astype(np.float64)
                    sig += float((r * r).sum())
                    noise += float(((r - y) ** 2).sum())
                    dot += float((r * y).sum())
                    qq += float((y * y).sum())
                print(f"{algorithm:<12} {block:>5} {res.weight_bytes_fp32 / 1e6:8.2f} "
                      f"{res.weight_bytes_quantized / 1e6:8.2f} "
                      f"{100 * res.weight_bytes_quantized / res.weight_bytes_fp32:8.1f}% "
                      f"{res.bits_per_weight:7.3f} {10 * np.log10(sig / noise):8.2f} "
                      f"{dot / np.sqrt(sig * qq):9.6f} {secs:8.2f}")


if __name__ == "__main__":
    main()
