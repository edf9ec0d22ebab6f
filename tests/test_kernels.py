"""The native decode kernels (gemma3n/kernels/decode.cpp): every body this CPU can run (portable
C++, AVX2, AVX-512) against the dequantized fp32 reference, on the shapes, strides, row lists
and misalignments the decoder hands them; batch rows never change a row's result."""

from __future__ import annotations

import pytest
import torch

from gemma3n import kernels
from gemma3n import quantize as qz

GEN = torch.Generator().manual_seed(0)


def test_kernels_build_where_a_compiler_exists():
    """A machine with a C++ compiler gets the native kernels (a broken build must not hide
    behind the fallback)."""
    if kernels.why_unavailable() is not None:
        pytest.skip(kernels.why_unavailable())
    assert kernels.get() is not None, kernels.status()
    assert kernels.status().startswith("native")


def _isas(native) -> list[int]:
    """Every body this CPU can run: generic always, then each SIMD level up to the best."""
    best = kernels.ISA[native.isa_name(0)]
    levels = ("avx2", "avx512", "avx512bf16")
    return [kernels.ISA["generic"]] + [kernels.ISA[n] for n in levels if kernels.ISA[n] <= best]


def _as_seen(x: torch.Tensor, native, kind: str, isa: int) -> torch.Tensor:
    """x as the body at `isa` multiplies it (decode.cpp's header): as given, rounded to bf16,
    or quantized to int16 with one scale per row. Products of that x are then exact in fp32,
    so a body must match the reference to summation order."""
    form = native.activation_form(kind, isa)
    if form == "bf16":
        return x.bfloat16().float()
    if form == "int16":
        scale = x.abs().amax(1, keepdim=True) / 32767
        return torch.round(x * (1 / scale)).clamp(-32767, 32767) * scale  # decode.cpp's exact steps
    return x


def _offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """`t` copied to `offset` bytes past a 64-byte boundary (a mapped tensor starts anywhere)."""
    nbytes = t.numel() * t.element_size()
    buf = torch.zeros(nbytes + offset + 64, dtype=torch.uint8)
    start = (-buf.data_ptr()) % 64 + offset
    return buf[start : start + nbytes].view(t.dtype).view(t.shape).copy_(t)


SHAPES = [(1, 16), (7, 33), (48, 100), (64, 130), (33, 2048), (5, 7)]


def _close(got: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """Equal up to fp32 summation order: rounding grows with the k terms of each sum (~1e-4 at
    k = 2048 with unit-scale values); a wrong element or lane is off by O(1)."""
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, k / 256))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 11])
def test_bf16_and_int8_any_shape(native, n, k, m):
    w = torch.randn(n, k, generator=GEN)
    x = torch.randn(m, k, generator=GEN)
    wb = _offset_copy(w.bfloat16(), 2)
    q, s = qz.quantize_int8(w)
    q = _offset_copy(q, 8)
    for isa in _isas(native):
        ref_b = _as_seen(x, native, "bf16", isa) @ wb.float().t()
        ref_8 = _as_seen(x, native, "int8", isa) @ qz.dequantize_int8(q, s).t()
        _close(native.linear_bf16(x, wb, None, isa), ref_b, k)
        _close(native.linear_int8(x, q, s, None, isa), ref_8, k)


@pytest.mark.parametrize("group", qz.GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 3, 8, 9])
def test_int4_groups(native, group, m):
    k = 2 * max(qz.GROUP_SIZES)
    w = torch.randn(40, k, generator=GEN) + 0.1
    q, sz = qz.quantize_int4(w, group)
    x = torch.randn(m, k, generator=GEN)
    deq = qz.dequantize_int4(q, sz)
    for isa in _isas(native):
        _close(native.linear_int4(x, q, sz, group, None, isa), _as_seen(x, native, "int4", isa) @ deq.t(), k)


def test_views_and_row_lists(native):
    """Column prefixes (a MatFormer down_proj width) are strided views; a row list (the sparse
    decode's fired units) selects outputs; both read the weight in place."""
    w = torch.randn(64, 256, generator=GEN)
    rows = torch.tensor([0, 5, 63, 5])
    x = torch.randn(2, 128, generator=GEN)
    wb = w.bfloat16()
    q8, s8 = qz.quantize_int8(w)
    q4, s4 = qz.quantize_int4(w, 32)
    deq4 = qz.dequantize_int4(q4, s4)
    for isa in _isas(native):
        y = native.linear_bf16(x, wb[:, :128], rows, isa)
        _close(y, _as_seen(x, native, "bf16", isa) @ wb.float()[rows, :128].t(), 128)
        y = native.linear_int8(x, q8[:, :128], s8, rows, isa)
        _close(y, _as_seen(x, native, "int8", isa) @ qz.dequantize_int8(q8, s8)[rows, :128].t(), 128)
        y = native.linear_int4(x, q4[:, :64], s4[:, :4], 32, rows, isa)
        _close(y, _as_seen(x, native, "int4", isa) @ deq4[rows, :128].t(), 128)


def test_batch_rows_do_not_change_a_rows_result(native):
    """A sequence's output is bit-identical whether it is decoded alone or with 7 others."""
    w = torch.randn(96, 2048, generator=GEN).bfloat16()
    q, s = qz.quantize_int4(w.float(), 64)
    x = torch.randn(8, 2048, generator=GEN)
    assert torch.equal(native.linear_bf16(x, w, None, 0)[3], native.linear_bf16(x[3:4], w, None, 0)[0])
    assert torch.equal(native.linear_int4(x, q, s, 64, None, 0)[5], native.linear_int4(x[5:6], q, s, 64, None, 0)[0])


def test_bad_arguments_are_errors_not_reads(native):
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="row index out of range"):
        native.linear_bf16(torch.randn(1, 32), w, torch.tensor([8]), 0)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 32\]"):
        native.linear_bf16(torch.randn(1, 31), w, None, 0)
    with pytest.raises(RuntimeError, match="must be a 2-D CPU tensor"):
        native.linear_int8(torch.randn(1, 32), w, torch.ones(8).bfloat16(), None, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_for_prefill(native, dtype):
    """A prefill's weight blocks: int8 codes as numbers, int4 (q - 8)·scale + zero, in place."""
    w = torch.randn(48, 256, generator=GEN)
    q8, _ = qz.quantize_int8(w)
    q4, sz = qz.quantize_int4(w, 64)
    out = torch.empty(48, 256, dtype=dtype)
    native.dequantize_int8(q8, out)
    assert torch.equal(out.float(), q8.float())  # exact in bf16 too: |q| <= 127
    native.dequantize_int4(q4, sz, 64, out)
    torch.testing.assert_close(out.float(), qz.dequantize_int4(q4, sz).to(dtype).float(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="out must be"):
        native.dequantize_int8(q8, torch.empty(48, 255))
