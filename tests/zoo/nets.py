"""PyTorch definitions of the published networks whose weights ship as state dicts.

Each module is written from its published state dict (parameter names and shapes) and the published
description of the architecture; ``load`` checks that every parameter of the module is matched by a tensor
of the same shape and that the checkpoint holds nothing else but the tensors listed as unused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

M = TypeVar("M", bound=nn.Module)


def load(module: M, state: dict[str, torch.Tensor], unused: Iterable[str] = ()) -> M:
    """Load ``state`` into ``module`` strictly; ``unused`` names checkpoint tensors the module does not use
    (an optimizer's leftovers, a pooler the sentence encoder skips)."""
    own = module.state_dict()
    skip = set(unused)
    extra = sorted(set(state) - set(own) - skip)
    missing = sorted(set(own) - set(state))
    if extra or missing:
        raise ValueError(f"state dict does not match {type(module).__name__}: extra {extra[:8]}, missing {missing[:8]}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(state[k].shape)} != module shape {tuple(v.shape)}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    return module.eval()


# --------------------------------------------------------------------------------------------- CREPE
class Crepe(nn.Module):
    """CREPE "full" pitch estimator (torchcrepe's port): a 1024-sample frame of 16 kHz audio, normalised to
    zero mean and unit variance, through six conv/ReLU/batch-norm/max-pool stages to 360 sigmoid pitch bins
    (20 cents apart). Input ``audio`` [N, 1024] float32; output ``probabilities`` [N, 360]."""

    CHANNELS = (1, 1024, 128, 128, 128, 256, 512)
    KERNELS = (512, 64, 64, 64, 64, 64)

    def __init__(self) -> None:
        super().__init__()
        for i in range(6):
            stride = 4 if i == 0 else 1
            conv = nn.Conv2d(self.CHANNELS[i], self.CHANNELS[i + 1], (self.KERNELS[i], 1), stride=(stride, 1))
            setattr(self, f"conv{i + 1}", conv)
            # The original Keras batch norm: epsilon 1e-3.
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(self.CHANNELS[i + 1], eps=0.0010000000474974513))
        self.classifier = nn.Linear(2048, 360)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio[:, None, :, None]
        for i in range(6):
            conv: nn.Conv2d = getattr(self, f"conv{i + 1}")
            bn: nn.BatchNorm2d = getattr(self, f"conv{i + 1}_BN")
            # "same" padding of the Keras original: 254 each side for the first layer, 31/32 after.
            x = F.pad(x, (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32))
            x = bn(F.relu(conv(x)))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], 2048)
        return torch.sigmoid(self.classifier(x))


# ---------------------------------------------------------------------------------------- Resemblyzer
class SpeakerEncoder(nn.Module):
    """GE2E speaker encoder (Resemblyzer): 3-layer LSTM over 40-band mel frames, last hidden state through a
    linear layer and ReLU, L2-normalised. Input ``mels`` [N, 160, 40] (power mel, 25 ms / 10 ms frames at
    16 kHz); output ``embedding`` [N, 256]."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, num_layers=3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = F.relu(self.linear(hidden[-1]))
        return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------- MTCNN
class PNet(nn.Module):
    """MTCNN proposal net, fully convolutional: ``image`` [N, 3, H, W] scaled as (x - 127.5) / 128 ->
    ``prob`` [N, 2, h, w] (softmax; channel 1 = face) and ``reg`` [N, 4, h, w] (box offsets), one cell per
    12x12 window at stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(image))
        x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return torch.softmax(self.conv4_1(x), dim=1), self.conv4_2(x)


class ONet(nn.Module):
    """MTCNN output net: a 48x48 crop scaled as (x - 127.5) / 128 -> ``prob`` [N, 2] (face / not),
    ``reg`` [N, 4] box refinement and ``landmarks`` [N, 10] (five x then five y, relative to the crop)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(image)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        # The weights come from Caffe models trained on transposed images: flatten in (W, H, C) order.
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], 1152)
        x = self.prelu5(self.dense5(x))
        return torch.softmax(self.dense6_1(x), dim=1), self.dense6_2(x), self.dense6_3(x)


# ------------------------------------------------------------------------------------------ MiniLM
class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, positions: int, types: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _AttentionOutput(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)


class _Attention(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden)
        self.output = _AttentionOutput(hidden, eps)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)


class _Output(nn.Module):
    def __init__(self, hidden: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(ffn, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(hidden, eps)
        self.intermediate = _Intermediate(hidden, ffn)
        self.output = _Output(hidden, ffn, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads
        sa = self.attention.self

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(n, t, h, d // h).transpose(1, 2)

        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h) + bias
        ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(n, t, d)
        att = self.attention.output
        x = att.LayerNorm(att.dense(ctx) + x)
        ff = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(ff + x)


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, ffn, eps) for _ in range(layers))


class SentenceEncoder(nn.Module):
    """A BERT encoder (all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads) with the sentence-transformers
    head: mean of the token states under the attention mask, L2-normalised. Inputs ``input_ids`` and
    ``attention_mask`` [N, T] int64; output ``embedding`` [N, 384]. Padding is masked out of attention
    with the dtype's most negative value added to the scores, as Hugging Face BERT does."""

    UNUSED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")

    def __init__(self, vocab: int = 30522, hidden: int = 384, layers: int = 6, heads: int = 12,
                 ffn: int = 1536, positions: int = 512, types: int = 2, eps: float = 1e-12) -> None:
        super().__init__()
        self.embeddings = _Embeddings(vocab, hidden, positions, types, eps)
        self.encoder = _Encoder(layers, hidden, heads, ffn, eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        m = attention_mask.to(x.dtype)
        bias = (1.0 - m)[:, None, None, :] * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, bias)
        pooled = (x * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
        return pooled / torch.linalg.vector_norm(pooled, dim=1, keepdim=True).clamp_min(1e-12)
