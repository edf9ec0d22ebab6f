"""Building blocks shared by the text decoder, the audio encoder and the multimodal embedders:
the checkpoint-named RMSNorm and Linear, and the CPU compute-dtype policy for matmuls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x · (mean(x²)+eps)^-½ · w, computed in fp32 (weight used as is, not 1+w: §7.1-2)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = as_dtype(x, torch.float32)
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * as_dtype(self.weight, torch.float32)
        return as_dtype(out, x.dtype)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` without the call when it is a no-op: decoding one token of a small model is
    bound by per-op dispatch, and these no-op casts were a fifth of its ops (bench/README.md)."""
    return x if x.dtype == dtype else x.to(dtype)


# Rows at or below which a half-precision weight is used by its own kernel (decode is bound by
# reading weights: converting them would triple the bytes moved); above it, the weight is
# converted into a reused scratch buffer and multiplied in fp32 (prefill is bound by FLOPs,
# and fp32 runs 5-20x faster than bf16 on CPUs without bf16 units). See placement.py.
DIRECT_HALF_ROWS = 4
_scratch: dict[tuple, torch.Tensor] = {}


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ in x's dtype (the compute dtype), whatever dtype `w` is stored in."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    if x.shape[:-1].numel() <= DIRECT_HALF_ROWS:
        return F.linear(x.to(w.dtype), w).to(x.dtype)
    return F.linear(x, converted(w, x.dtype))


def converted(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w` in `dtype`, written into a scratch buffer reused across calls: a fresh allocation
    per call page-faults and costs 5x more than the copy itself (measured)."""
    key = (dtype, w.device)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < w.numel():
        buf = _scratch[key] = torch.empty(w.numel(), dtype=dtype, device=w.device)
    return buf[: w.numel()].view(w.shape).copy_(w)


class Linear(nn.Linear):
    """nn.Linear (checkpoint names) that computes in its input's dtype, see `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
