"""The towers' fused norm epilogue (gemma3n/fused.py, kernels/towers.cpp): every native body this
CPU can run against the PyTorch reference, for each activation, dtype combination, clip and
residual, on row lengths that are and are not multiples of a vector."""

from __future__ import annotations

import itertools

import pytest
import torch

from gemma3n import fused, kernels


def _isas(native) -> list[int]:
    best = kernels.ISA[native.isa_name(0)]
    return [level for level in (1, 2, 3) if level <= best]


def _data(rows: int, c: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, c, generator=g)).to(dtype)


@pytest.mark.parametrize("act", list(fused.ACTS))
@pytest.mark.parametrize("c", [1, 33, 640, 2049])
def test_native_matches_reference(native, act, c):
    for isa, x_dt, out_dt, residual, weighted in itertools.product(
        _isas(native), fused.NATIVE_DTYPES, fused.NATIVE_DTYPES, (False, True), (False, True)
    ):
        x = _data(7, c, x_dt, c)
        w = torch.rand(c, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
        res = _data(7, c, out_dt, 2) if residual else None
        kw = dict(act=act, clip=2.5, residual=res, scale=0.5, out_dtype=out_dt)
        with torch.inference_mode():
            got = fused.norm_act(x, w, 1e-6, isa=isa, **kw)
        ref = fused.norm_act(x, w, 1e-6, native=False, **kw)
        assert got.dtype == ref.dtype == out_dt and got.shape == ref.shape
        # fp32: summation order and the exp polynomial (~2e-7); bf16: one rounding of each, which
        # may land on neighbouring bf16 values
        tol = 1e-5 if out_dt == torch.float32 else 8e-3
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol, msg=f"isa {isa} {x_dt}->{out_dt}")


def test_large_activations_and_shapes(native):
    """Rows across threads, extreme GELU/SiLU inputs (exp clamped, no inf/NaN), leading dims kept."""
    x = torch.linspace(-200, 200, 4 * 5 * 3000).view(4, 5, 3000)
    with torch.inference_mode():
        for act in ("gelu_tanh", "silu"):
            got = fused.norm_act(x * 1e3, act=act)  # normalised first, so scale-free
            ref = fused.norm_act(x * 1e3, act=act, native=False)
            assert got.shape == x.shape and torch.isfinite(got).all()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # no normalisation dominance: a clip far below the values
        got = fused.norm_act(x, clip=1e-3, act="relu")
        torch.testing.assert_close(got, fused.norm_act(x, clip=1e-3, act="relu", native=False), rtol=1e-5, atol=1e-6)


def test_nan_propagates_and_grad_mode_uses_torch(native):
    x = torch.ones(2, 16)
    x[1, 3] = float("nan")
    with torch.inference_mode():
        out = fused.norm_act(x, out_dtype=torch.bfloat16)
    assert torch.isfinite(out[0].float()).all() and torch.isnan(out[1].float()).all()
    w = torch.ones(16, requires_grad=True)
    y = fused.norm_act(torch.randn(3, 16), w)  # autograd on: the PyTorch path, with gradients
    y.sum().backward()
    assert w.grad is not None
