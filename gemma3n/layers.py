"""Building blocks shared by the text decoder, the audio encoder and the multimodal embedders:
the checkpoint-named RMSNorm, Linear and Embedding, and `matmul`, which picks how a product with
a stored weight runs.

A `Linear` is called with optional *views*: `rows` (a prefix length or an index tensor: which
output features) and `cols` (a prefix length: which input features). The MatFormer widths
(gate/up rows, down columns), the activation-sparse decode's fired rows and the tied LM head all
run on the loaded weight through these views, without copying it. Quantized layers
(quantize.QLinear) take the same arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .hardware import gemm_dtype

# Rows (tokens x sequences) up to which a product is a decode step: bound by reading the weight,
# so it streams the stored weight once (native kernels, or PyTorch's in the stored dtype).
# Above it (prefill) the product is bound by FLOPs and runs in the machine's GEMM dtype.
DECODE_ROWS = 8
_scratch: dict[tuple, torch.Tensor] = {}


class RMSNorm(nn.Module):
    """x · (mean(x²)+eps)^-½ · w, computed in fp32 (weight used as is, not 1+w: docs/text-decoder.md#rmsnorm)."""

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


Rows = int | torch.Tensor | None


def view(w: torch.Tensor, rows: Rows = None, cols: int | None = None) -> torch.Tensor:
    """The part of `w` [N, K] a call uses: a row prefix or gather, a column prefix (strided view)."""
    if cols is not None and cols != w.shape[1]:
        w = w[:, :cols]
    if isinstance(rows, torch.Tensor):
        return w.index_select(0, rows)
    return w if rows is None or rows == w.shape[0] else w[:rows]


def matmul(x: torch.Tensor, w: torch.Tensor, rows: Rows = None, cols: int | None = None) -> torch.Tensor:
    """x @ view(w, rows, cols)ᵀ in x's dtype, whatever dtype `w` is stored in. x [..., K']."""
    if w.dtype == x.dtype:
        return F.linear(x, view(w, rows, cols))
    lead = x.shape[:-1]
    m = lead.numel()
    if m <= DECODE_ROWS:
        native = kernels.loaded() if w.dtype == torch.bfloat16 and w.device.type == "cpu" else None
        if native is not None:
            w_used = w if cols is None or cols == w.shape[1] else w[:, :cols]
            idx = rows if isinstance(rows, torch.Tensor) else None
            if isinstance(rows, int) and rows != w.shape[0]:
                w_used = w_used[:rows]
            y = native.linear_bf16(x.reshape(m, -1), w_used, idx, 0)
            return as_dtype(y, x.dtype).view(*lead, y.shape[-1])
        return F.linear(x.to(w.dtype), view(w, rows, cols)).to(x.dtype)
    wv = view(w, rows, cols)
    gemm = gemm_dtype(w.device, w.dtype)
    if gemm == w.dtype:  # the machine multiplies the stored dtype fast: round the inputs only
        return F.linear(x.to(gemm), wv).to(x.dtype)
    return F.linear(x, converted(wv, x.dtype))


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A [shape] view of a buffer reused across calls (one per dtype and device): a fresh
    allocation per matmul page-faults and costs 5x more than filling it (measured).
    The buffer is always a normal tensor: one made under `torch.inference_mode` (generation)
    could not be written again outside it (a later forward under `no_grad`, or none). With grad
    mode on, a fresh tensor each call: autograd may keep it for the backward pass."""
    if torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    key = (dtype, torch.device(device))
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):
            buf = _scratch[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def converted(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w` in `dtype`, written into the scratch buffer."""
    return scratch(tuple(w.shape), dtype, w.device).copy_(w)


class Linear(nn.Linear):
    """nn.Linear (checkpoint names, no bias) computing in its input's dtype, with views (module doc)."""

    def forward(self, x: torch.Tensor, rows: Rows = None, cols: int | None = None) -> torch.Tensor:
        return matmul(x, self.weight, rows, cols)


class Embedding(nn.Embedding):
    """nn.Embedding whose table doubles as the tied output projection (`as_linear`)."""

    # rows of a half-precision table converted at once when a long prefill needs logits at every
    # position in fp32 (bounded scratch: the 262k-row head is 2 GB in fp32)
    HEAD_BLOCK = 32768

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == x.dtype or x.shape[:-1].numel() <= DECODE_ROWS or gemm_dtype(w.device, w.dtype) == w.dtype:
            return matmul(x, w)
        return torch.cat([matmul(x, w[i : i + self.HEAD_BLOCK]) for i in range(0, w.shape[0], self.HEAD_BLOCK)], -1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
