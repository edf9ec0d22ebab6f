"""One streamed safetensors writer for every checkpoint this package writes (MatFormer slices,
quantized copies).

Every output tensor is planned first (name, dtype, shape, and how to get its bytes: rows and
columns of a source tensor, or a function computing it), so the free space is checked before
anything is written; the tensors then stream in bounded chunks into shards named
`model-0000k-of-0000n.safetensors` with an index, and no shard is ever held in memory whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .checkpoint import ST_DTYPES
from .errors import CheckpointError
from .staging import write_file

# Row-chunk size of the streamed copies: bounds the bytes held in memory per tensor read.
CHUNK_BYTES = 64 << 20
MAX_SHARD_BYTES = 5_000_000_000
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
# The data section of a shard starts at a multiple of this (file offset, so also in memory once
# mapped): PyTorch's int8 CPU kernel crashes on a weight 8 bytes off a 16-byte boundary, and a
# tensor whose predecessors in its shard have sizes that are multiples of 64 (every Gemma 3n
# shape) starts 64-aligned for AVX-512 loads. safetensors' own writer aligns to 8 only.
DATA_ALIGN = 64


# --------------------------------------------------------------------------------------------
# One streamed safetensors writer
# --------------------------------------------------------------------------------------------


@dataclass
class Copied:
    """One output tensor copied from a source file: rows `row_ranges` of the source, and within
    each row the element ranges `col_ranges` (None = whole row). Only 2-D tensors get column ranges."""

    out_name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    src_path: Path
    src_offset: int  # absolute byte offset of the source tensor in its file
    src_row_bytes: int
    itemsize: int
    row_ranges: list[tuple[int, int]]
    col_ranges: list[tuple[int, int]] | None = None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.itemsize, self.shape)


@dataclass
class Computed:
    """One output tensor computed when its turn comes (a quantized weight or its scales)."""

    out_name: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.itemsize, self.shape)


Entry = Copied | Computed


def _nbytes(itemsize: int, shape: Sequence[int]) -> int:
    n = itemsize
    for s in shape:
        n *= s
    return n


def st_dtype(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype (the inverse of checkpoint.ST_DTYPES)."""
    return _ST_NAMES[dtype]


def data_start(path: Path) -> int:
    """Byte offset of a safetensors file's data section (8-byte header length + header)."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def source_job(f: Any, start: int, name: str) -> Copied:
    """A whole-tensor copy of `name` from the safetensors file `f` (data section at `start`)."""
    dtype, shape, begin, _end = f.entries[name]
    rows = shape[0] if shape else 1
    row_elems = _nbytes(1, shape[1:])
    return Copied(
        name,
        st_dtype(dtype),
        tuple(shape),
        f.path,
        start + begin,
        row_elems * dtype.itemsize,
        dtype.itemsize,
        [(0, rows)],
    )


def ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def shard_names(n: int) -> list[str]:
    """The one shard-naming scheme of both writers (Hugging Face's)."""
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def split_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Entries into shards of at most `max_shard_bytes` (a bigger tensor alone), each shard of one
    element size, in source order within it: every tensor then starts aligned to its dtype (the
    data section starts DATA_ALIGN-aligned), which zero-copy loading needs; safetensors' own writer gets
    the same by sorting a shard by dtype, which would make the writers hold a weight's codes
    until its scales are written."""
    groups: dict[int, list[list[Entry]]] = {}
    sizes: dict[int, int] = {}
    for e in entries:
        shards = groups.setdefault(e.itemsize, [[]])
        if shards[-1] and sizes.get(e.itemsize, 0) + e.nbytes > max_shard_bytes:
            shards.append([])
            sizes[e.itemsize] = 0
        shards[-1].append(e)
        sizes[e.itemsize] = sizes.get(e.itemsize, 0) + e.nbytes
    return [s for shards in groups.values() for s in shards]


def _header(entries: Sequence[Entry]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.out_name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-(8 + len(blob)) % DATA_ALIGN)  # padding spaces are part of the format


def _emit(e: Computed, out: BinaryIO, bar: Any) -> None:
    """Write a computed tensor's bytes in CHUNK_BYTES pieces (no second copy of it)."""
    t = e.make()
    if st_dtype(t.dtype) != e.dtype or tuple(t.shape) != e.shape:  # a planning bug, never a user error
        raise RuntimeError(f"{e.out_name}: made {t.dtype} {list(t.shape)}, planned {e.dtype} {list(e.shape)}")
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    for i in range(0, raw.size, CHUNK_BYTES):
        piece = raw[i : i + CHUNK_BYTES]
        out.write(piece.data)
        bar.update(piece.size)


def _write_entry(out: BinaryIO, e: Entry, fds: dict[Path, int], bar: Any) -> None:
    before = out.tell()
    if isinstance(e, Copied):
        _stream(e, fds[e.src_path], out, bar)
    else:
        _emit(e, out, bar)
    if out.tell() - before != e.nbytes:  # a planning bug, never a user error
        raise RuntimeError(f"wrote {out.tell() - before} bytes for {e.out_name}, expected {e.nbytes}")


def _close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def write_weights(tmp: Path, entries: Sequence[Entry], max_shard_bytes: int, bar: Any) -> None:
    """Every planned tensor, in the planned (source) order, into its shard in `tmp`, then the
    index. Shards of different element sizes are open at once (a weight's codes and scales are
    written one after the other, see split_shards); each is fsynced when complete."""
    shards = split_shards(entries, max_shard_bytes)
    names = shard_names(len(shards))
    shard_of = {id(e): k for k, shard in enumerate(shards) for e in shard}
    left = [len(s) for s in shards]
    fds: dict[Path, int] = {}
    files: dict[int, BinaryIO] = {}
    try:
        for e in entries:
            if isinstance(e, Copied) and e.src_path not in fds:
                fds[e.src_path] = os.open(e.src_path, os.O_RDONLY)
        for e in entries:
            k = shard_of[id(e)]
            if k not in files:
                files[k] = open(tmp / names[k], "wb")  # closed when complete, or in finally
                blob = _header(shards[k])
                files[k].write(len(blob).to_bytes(8, "little") + blob)
            _write_entry(files[k], e, fds, bar)
            left[k] -= 1
            if not left[k]:
                _close(files.pop(k))
    finally:
        for f in files.values():
            f.close()
        for fd in fds.values():
            os.close(fd)
    weight_map = {e.out_name: names[k] for k, shard in enumerate(shards) for e in shard}
    total = sum(e.nbytes for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_file(tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def weights_bytes(entries: Sequence[Entry], max_shard_bytes: int) -> int:
    """Bytes the shards take (data + headers): what the free-space check needs."""
    return sum(8 + len(_header(s)) + sum(e.nbytes for e in s) for s in split_shards(entries, max_shard_bytes))


def _stream(job: Copied, src_fd: int, out: Any, bar: Any) -> None:
    """Copy one tensor in row chunks of <= CHUNK_BYTES (no whole-tensor buffer)."""
    rows_per_chunk = max(1, CHUNK_BYTES // max(1, job.src_row_bytes))
    byte_cols = None
    if job.col_ranges is not None:
        byte_cols = [(a * job.itemsize, b * job.itemsize) for a, b in job.col_ranges]
    for a, b in job.row_ranges:
        for r0 in range(a, b, rows_per_chunk):
            r1 = min(b, r0 + rows_per_chunk)
            size = (r1 - r0) * job.src_row_bytes
            data = os.pread(src_fd, size, job.src_offset + r0 * job.src_row_bytes)
            if len(data) != size:
                raise CheckpointError(f"{job.src_path}: truncated while reading '{job.out_name}'")
            if byte_cols is not None:
                arr = np.frombuffer(data, dtype=np.uint8).reshape(r1 - r0, job.src_row_bytes)
                if len(byte_cols) == 1:
                    s, e = byte_cols[0]
                    data = np.ascontiguousarray(arr[:, s:e]).data
                else:
                    data = np.concatenate([arr[:, s:e] for s, e in byte_cols], axis=1).data
            out.write(data)
            bar.update(len(data))
