"""Fracast-0, a small quantile forecaster, rebuilt from its published weights and release notes.

Encoder: per time step, the (normalised) value, its observed flag and five bounded recency channels are
projected to 64 wide; a parameter-free periodogram picks up to four significant periods whose phase
(sin/cos) is projected and added. One shared block (dilated causal depthwise conv + pointwise linear,
then a SwiGLU feed-forward, each with an RMSNorm residual) runs at dilations 1, 2, ..., 512, each pass
preceded by a FiLM scaling computed from the dilation. Head: the mean and last encoder states plus the
recency channels of the 48 future steps feed a projection and learnt per-step queries, a SwiGLU layer and
two causal depthwise convolutions along the horizon; a seasonal prior (the context folded by its main
period into 16 phase bins, read at the future phases) goes through the same kind of shared block at
dilations 1..32 over the last 128 context states, and the result is added before the 9-quantile output.

Module input: ``values`` [N, 2048] float32, the context scaled to [0, 1] by its own min and max, zero
where unobserved, left-padded to 2048 steps; ``mask`` [N, 2048] bool, True where observed. Output:
``quantiles`` [N, 48, 9] (q = 0.1 ... 0.9) in the same scaled units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT = 2048
HORIZON = 48
QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WIDTH = 64
HIDDEN = 96  # int(64 * 1.5)
TOP_K = 4
PHASE_BINS = 16
SEED_STEPS = 128


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, None)


def _recency(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Five bounded channels of the signed distance to the last context step, in context lengths."""
    d = (positions.to(torch.float32) - float(length - 1)) / float(length)
    a = d.abs()
    return torch.stack(
        [d, torch.sign(d) * torch.log1p(a) / math.log(2.0), torch.exp(-0.5 * a), torch.exp(-2.0 * a),
         torch.exp(-8.0 * a)],
        dim=-1,
    )


def _fill_unobserved(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ok = mask & torch.isfinite(v)
    n = ok.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.where(ok, v, torch.zeros_like(v)).sum(dim=1, keepdim=True) / n
    return torch.where(ok, v, mean)


def significant_periods(x: torch.Tensor, top_k: int = TOP_K, min_period: int = 2, alpha: float = 0.05) -> torch.Tensor:
    """Up to ``top_k`` integer periods per row [N, top_k] from the normalised periodogram: local maxima in
    the allowed band whose share of the total power passes a Bonferroni threshold ln(bins / alpha) / bins,
    strongest first; 0 where fewer pass."""
    _, length = x.shape
    n_fft = 1 << max(1, math.ceil(math.log2(max(2, length))))
    max_period = max(2, length // 2)
    xc = x - x.mean(dim=1, keepdim=True)
    spec = torch.fft.rfft(xc, n=n_fft)
    power = (spec.real * spec.real + spec.imag * spec.imag)[:, 1:]
    bins = power.shape[1]
    share = power / power.sum(dim=1, keepdim=True).clamp(min=1e-12)
    lo = max(0, n_fft // max_period - 1)
    hi = min(bins - 1, max(0, n_fft // max(2, min_period) - 1))
    mid = share[:, 1:-1]
    peak = F.pad((mid > share[:, :-2]) & (mid > share[:, 2:]), (1, 1), value=False)
    band = torch.zeros(bins, dtype=torch.bool, device=x.device)
    if hi > lo:
        band[lo : hi + 1] = True
    n_eff = max(2, bins)
    threshold = math.log(n_eff / min(max(alpha, 1e-12), 1.0)) / n_eff
    keep = peak & band & (share >= threshold)
    scored = torch.where(keep, share, torch.full_like(share, float("-inf")))
    top, idx = scored.topk(min(top_k, bins), dim=1)
    periods = torch.round(n_fft / (idx + 1).to(torch.float32)).to(torch.int64)
    return torch.where(torch.isfinite(top), periods, torch.zeros_like(periods))


def _phase(positions: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """sin/cos of position / period for each period, zero for rejected (0) periods: [N, T, 2 * K]."""
    n, t = positions.shape
    k = periods.shape[1]
    ok = (periods > 0).to(torch.float32).view(n, 1, k)
    per = periods.clamp(min=1).to(torch.float32).view(n, 1, k)
    ang = 2.0 * math.pi * positions.to(torch.float32).view(n, t, 1) / per
    return torch.stack([torch.sin(ang) * ok, torch.cos(ang) * ok], dim=-1).reshape(n, t, 2 * k)


class SwiGLU(nn.Module):
    def __init__(self, d: int = WIDTH, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, val = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * val)


class SharedBlock(nn.Module):
    """Causal dilated depthwise conv (kernel 3) + pointwise linear, then SwiGLU; RMSNorm residuals. The
    dilation is an argument: one set of weights serves every scale."""

    def __init__(self, d: int = WIDTH) -> None:
        super().__init__()
        self.dw_weight = nn.Parameter(torch.zeros(d, 1, 3))
        self.dw_bias = nn.Parameter(torch.zeros(d))
        self.pw = nn.Linear(d, d)
        self.ffn = SwiGLU(d)
        self.norm1 = nn.RMSNorm(d)
        self.norm2 = nn.RMSNorm(d)

    def forward(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        xt = F.pad(x.transpose(1, 2), (2 * dilation, 0))
        dw = F.conv1d(xt, self.dw_weight, self.dw_bias, dilation=dilation, groups=x.shape[-1])
        x = _rms(x + self.pw(dw.transpose(1, 2)), self.norm1.weight)
        return _rms(x + self.ffn(x), self.norm2.weight)


class FiLM(nn.Module):
    def __init__(self, d: int = WIDTH, n_freq: int = 4) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.to_gb = nn.Linear(2 * n_freq, 2 * d)

    def forward(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        tau = math.log2(float(dilation))
        ang = torch.tensor([tau / 2.0**k * math.pi for k in range(self.n_freq)], dtype=torch.float32)
        gamma, beta = self.to_gb(torch.cat([torch.sin(ang), torch.cos(ang)])).chunk(2, dim=-1)
        return x * (1.0 + gamma) + beta


class PeriodicPhase(nn.Module):
    def __init__(self, d: int = WIDTH) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * TOP_K, d)


class Core(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(7, WIDTH)
        self.periodic = PeriodicPhase()
        self.block = SharedBlock()
        self.scale = FiLM()
        self.norm = nn.RMSNorm(WIDTH)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length = values.shape
        v = torch.where(mask, torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), torch.zeros_like(values))
        pos = torch.arange(length, device=v.device).unsqueeze(0).expand(n, length)
        feats = torch.cat([v.unsqueeze(-1), mask.to(v.dtype).unsqueeze(-1), _recency(pos, length)], dim=-1)
        x = self.in_proj(feats)
        periods = significant_periods(_fill_unobserved(v, mask))
        x = x + self.periodic.proj(_phase(pos, periods))
        for i in range(10):
            dil = 2**i
            x = self.block(self.scale(x, dil), dil)
        return _rms(x, self.norm.weight)


class HorizonConv(nn.Module):
    def __init__(self, dilation: int, d: int = WIDTH) -> None:
        super().__init__()
        self.dilation = dilation
        self.dw_weight = nn.Parameter(torch.zeros(d, 1, 3))
        self.dw_bias = nn.Parameter(torch.zeros(d))
        self.norm = nn.RMSNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = F.pad(x.transpose(1, 2), (2 * self.dilation, 0))
        y = F.conv1d(xt, self.dw_weight, self.dw_bias, dilation=self.dilation, groups=x.shape[-1])
        return _rms(x + y.transpose(1, 2), self.norm.weight)


class FutureStates(nn.Module):
    def __init__(self, d: int = WIDTH, layers: int = 6) -> None:
        super().__init__()
        self.layers = layers
        self.in_proj = nn.Linear(6, d)
        self.block = SharedBlock(d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, fill: torch.Tensor, future_pe: torch.Tensor) -> torch.Tensor:
        ft = self.in_proj(torch.cat([fill.unsqueeze(-1), future_pe], dim=-1))
        z = torch.cat([h[:, -min(SEED_STEPS, h.shape[1]) :], ft], dim=1)
        for i in range(self.layers):
            z = self.block(z, 2**i)
        return self.out_proj(z[:, -fill.shape[1] :])


def seasonal_fill(
    ctx: torch.Tensor, mask: torch.Tensor, future_pos: torch.Tensor, period: torch.Tensor
) -> torch.Tensor:
    """Mean of the observed context values in each of 16 phase bins of the main period, read at the future
    steps' phases (the row's observed mean for an empty bin): [N, H]."""
    n, length = ctx.shape
    w = mask.to(ctx.dtype)
    vals = torch.where(mask, torch.nan_to_num(ctx, nan=0.0, posinf=0.0, neginf=0.0), torch.zeros_like(ctx))
    p = period.clamp(min=1).to(torch.float32).view(n, 1)
    pos = torch.arange(length, device=ctx.device).to(torch.float32).view(1, length)
    bins = torch.clamp(((pos % p) / p * PHASE_BINS).to(torch.int64), max=PHASE_BINS - 1)
    onehot = F.one_hot(bins, PHASE_BINS).to(ctx.dtype) * w.unsqueeze(-1)
    counts = onehot.sum(dim=1)
    totals = torch.bmm(onehot.transpose(1, 2), vals.unsqueeze(-1)).squeeze(-1)
    mean = vals.sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1.0)
    per_bin = torch.where(counts > 0, totals / counts.clamp(min=1.0), mean.expand(n, PHASE_BINS))
    fut = torch.clamp((future_pos.to(torch.float32) % p) / p * PHASE_BINS, max=PHASE_BINS - 1).to(torch.int64)
    return torch.gather(per_bin, 1, fut)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.summary_proj = nn.Linear(2 * WIDTH + 5, WIDTH)
        self.queries = nn.Parameter(torch.zeros(HORIZON, WIDTH))
        self.decoder_ffns = nn.ModuleList([SwiGLU()])
        self.decoder_norms = nn.ModuleList([nn.RMSNorm(WIDTH)])
        self.fc_blocks = nn.ModuleList([HorizonConv(1), HorizonConv(2)])
        self.future_conv = FutureStates()
        self.out_proj = nn.Linear(WIDTH, len(QUANTILES))

    def forward(self, h: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, d = h.shape
        summary = torch.cat([h.mean(dim=1), h[:, -1]], dim=-1)
        fpos = torch.arange(length, length + HORIZON, device=h.device).unsqueeze(0).expand(n, HORIZON)
        pe = _recency(fpos, length)
        x = self.summary_proj(torch.cat([pe, summary.unsqueeze(1).expand(n, HORIZON, 2 * d)], dim=-1))
        x = x + self.queries.unsqueeze(0)
        for ffn, norm in zip(self.decoder_ffns, self.decoder_norms, strict=True):
            assert isinstance(norm, nn.RMSNorm) and norm.weight is not None
            x = _rms(x + ffn(x), norm.weight)
        for blk in self.fc_blocks:
            x = blk(x)
        periods = significant_periods(_fill_unobserved(ctx, mask))
        fill = seasonal_fill(ctx, mask, fpos, periods[:, 0])
        x = x + self.future_conv(h, fill, pe)
        return self.out_proj(x)


class Fracast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.core = Core()
        self.head = Head()

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.core(values, mask), values, mask)

