"""The towers' row epilogue in one pass: RMSNorm (+ weight) (+ activation) (+ scaled residual).

    out = act(c · rsqrt(mean(c²) + eps) · weight) · scale + residual,   c = clamp(x, ±clip)

over the last dimension, statistics and arithmetic in fp32, stored in `out_dtype`. Both towers
normalise every position between their matrix products; as separate PyTorch ops this epilogue
is 6-10 passes over the activations and took longer than the products themselves once those ran
on bf16 matrix units. On a CPU it runs as one native pass
(kernels/towers.cpp, built with the decode kernels); elsewhere, or without the native build,
as the PyTorch ops below, which are also the tests' reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import kernels

ACTS = {None: 0, "gelu_tanh": 1, "silu": 2, "relu": 3}
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    act: str | None = None,
    clip: float | None = None,
    residual: torch.Tensor | None = None,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    native: bool = True,
    isa: int = 0,
) -> torch.Tensor:
    """The epilogue above; `native=False` forces the PyTorch ops, `isa` picks a native body (tests)."""
    out_dtype = out_dtype or x.dtype
    module = kernels.loaded() if native else None
    if (
        module is not None
        and x.device.type == "cpu"
        and x.dtype in NATIVE_DTYPES
        and out_dtype in NATIVE_DTYPES
        and not torch.is_grad_enabled()
    ):
        if residual is not None and residual.dtype != out_dtype:
            residual = residual.to(out_dtype)
        limit = math.inf if clip is None else float(clip)
        return torch.ops.gemma3n_towers.norm_act(
            x, weight, float(eps), ACTS[act], limit, residual, float(scale), out_dtype == torch.bfloat16, isa
        )
    return _torch_ops(x, weight, eps, act, clip, residual, scale, out_dtype)


def _torch_ops(x, weight, eps, act, clip, residual, scale, out_dtype) -> torch.Tensor:
    """`norm_act` as PyTorch ops, its arguments in its order (any device and dtype; the fallback
    and the tests' reference, reached as `norm_act(..., native=False)`)."""
    y = x.float()
    if clip is not None:
        y = y.clamp(-clip, clip)
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif act == "silu":
        y = F.silu(y)
    elif act == "relu":
        y = F.relu(y)
    elif act is not None:
        raise ValueError(f"unknown activation {act!r}")
    if residual is not None:
        y = torch.add(residual.float(), y, alpha=scale)
    elif scale != 1.0:
        y = y * scale
    return y.to(out_dtype or x.dtype)
