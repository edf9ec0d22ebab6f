"""Host memory for weights: resident copies on huge pages, and releasing pages no longer used.

Decode streams every core weight once per token, so how the weights sit in memory sets its
speed. Read through the file mapping (the page cache's 4 KiB pages) they stream at about two
thirds of the rate they do from anonymous memory on 2 MiB transparent huge pages: the hardware
prefetchers stop at every page boundary and each 4 KiB page costs a TLB walk (bench/README.md,
"Where the weights live"). So on a CPU the core weights are copied once, at load, into one
huge-page buffer; the per-layer embedding table, of which a token reads one row, stays mapped.
Each source's mapped pages are released as soon as it is copied, so resident memory never holds
both. Linux only (madvise); elsewhere the copy is plain anonymous memory.
"""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor's start: whole cache lines, 64-byte vector loads
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14


def _madvise(start: int, length: int, advice: int) -> bool:
    if not sys.platform.startswith("linux") or length <= 0:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(start, length, advice) == 0
    except (OSError, AttributeError):
        return False


def drop_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the pages wholly inside `t` from the resident set: for a (private,
    unmodified) file mapping they are re-read from the file if touched again; anonymous pages
    read back as zeros, so call it only on a tensor nothing will read again."""
    page = 4096
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    _madvise(start, end - start, _MADV_DONTNEED)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def resident_copies(tensors: list[torch.Tensor], release_sources: bool = True) -> list[torch.Tensor]:
    """Contiguous copies of CPU `tensors` in one buffer on transparent huge pages (where the OS
    has them), each 64-byte aligned; the sources' pages are released as each is copied when
    `release_sources` (they must not be read again)."""
    offsets, total = [], 0
    for t in tensors:
        total = -(-total // ALIGN) * ALIGN
        offsets.append(total)
        total += nbytes(t)
    buf = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    base = (-buf.data_ptr()) % HUGE_PAGE  # 2 MiB aligned, so the kernel can back it with huge pages
    _madvise(buf.data_ptr() + base, -(-total // HUGE_PAGE) * HUGE_PAGE, _MADV_HUGEPAGE)
    out = []
    for t, off in zip(tensors, offsets):
        dst = buf[base + off : base + off + nbytes(t)].view(t.dtype).view(t.shape)
        dst.copy_(t)
        if release_sources:
            drop_pages(t)
        out.append(dst)
    return out
