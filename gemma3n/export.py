"""Checkpoint writers: the streamed MatFormer slice export and the offline quantized copy.

- `export_slice()`: an ordinary Gemma 3n checkpoint for a Mix-n-Match slice (matformer.py owns the
  specs it takes).
- `quantize_checkpoint()`: a weight-only int8 / int4 copy (quantize.py owns the scheme).

Both plan every output tensor first (name, dtype, shape), then stream them through one safetensors
writer into shards named `model-0000k-of-0000n.safetensors`, so the free space is checked before
anything is written and no shard is ever held in memory whole.

Nothing the user had is lost (issue #21): the output is written into a hidden sibling folder
(`.NAME.partial-*`), fsynced and renamed into place at the end; SIGINT / SIGTERM / SIGHUP during the write
remove that folder and raise `Interrupted`; `force` replaces only an empty folder or a checkpoint,
never one that is, holds or lies inside the source, nor one holding other files. Folders and files
follow the umask. OS errors (disk full, permissions, a file in the way) become one InputError line.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError, InputError
from .matformer import (
    CHUNK_BYTES,
    MAX_SHARD_BYTES,
    Preset,
    SliceSpec,
    _match_preset,
    effective_params,
    find_declared,
    format_ffn,
    format_params,
    format_skip,
    read_declared_sizes,
    resolve_size,
    sliced_fields,
    sliced_text_config,
)
from .quantize import (
    QuantConfig,
    _chunked,
    _from_tensor,
    describe_unfit,
    plan_modules,
    quantize_int4,
    quantize_int8,
    stored_config,
    unfit_modules,
)

# The data section of a shard starts at a multiple of this (file offset, so also in memory once
# mapped): PyTorch's int8 CPU kernel crashes on a weight 8 bytes off a 16-byte boundary, and a
# tensor whose predecessors in its shard have sizes that are multiples of 64 (every Gemma 3n
# shape) starts 64-aligned for AVX-512 loads. safetensors' own writer aligns to 8 only.
DATA_ALIGN = 64
_ST_DTYPE = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# Weight files of a source checkpoint: rewritten by the writers, never copied.
_WEIGHT_FILES = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.gguf|\.msgpack|\.h5)$"
)
# Files a checkpoint folder holds (what `force` may replace besides the source's own file names).
_CHECKPOINT_FILES = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json)$"
    r"|^(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
    r"|processor_config|preprocessor_config|chat_template|matformer_sizes)\.json$"
    r"|^(tokenizer\.model|chat_template\.jinja|README\.md|\.gitattributes)$"
)


# --------------------------------------------------------------------------------------------
# Where the output goes: the --out / --force rules
# --------------------------------------------------------------------------------------------


def _resolved(path: str | Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise InputError(f"--out {path}: cannot resolve the path ({e})") from None


def source_overlap(out: Path, sources: Sequence[Path]) -> str | None:
    """Why `out` (resolved) may not receive a checkpoint read from `sources` (resolved folders),
    or None: it is one of them, contains one, or lies inside one."""
    for src in sources:
        if out == src:
            return f"--out {out} is the source checkpoint"
        if out in src.parents:
            return f"--out {out} contains the source checkpoint {src}"
        if src in out.parents:
            return f"--out {out} is inside the source checkpoint {src}"
    return None


def foreign_entries(names: Sequence[str], kinds: dict[str, bool], source_names: set[str]) -> list[str]:
    """The entries of an output folder that are not files a checkpoint has (`kinds`: name -> is a
    regular file). The source's own file names count as checkpoint files: an earlier export of the
    same source holds copies of them."""
    return sorted(n for n in names if not kinds.get(n, False) or not (_CHECKPOINT_FILES.search(n) or n in source_names))


def check_out(out_dir: str | Path, ckpt: Any, force: bool) -> Path:
    """The resolved output folder, after the rules: not the source (nor containing it, nor inside
    it); absent, empty, or with `force` a checkpoint and nothing else. Raises InputError."""
    if not str(out_dir).strip():
        raise InputError("--out is empty; name the folder to write")
    out = _resolved(out_dir)
    src = Path(ckpt.path).resolve()
    sources = [src, *sorted({Path(f.path).resolve().parent for f in ckpt.files} - {src})]
    why = source_overlap(out, sources)
    if why:
        raise InputError(f"{why}; choose another folder")
    if not os.path.lexists(out):
        _check_parent(out)
        return out
    if not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    try:
        entries = list(out.iterdir())
    except OSError as e:
        raise InputError(f"--out {out}: cannot read the folder ({e.strerror})") from None
    if not entries:
        return out
    if not force:
        raise InputError(f"--out {out} is not empty; pass --force to replace the checkpoint there")
    names = [e.name for e in entries]
    kinds = {e.name: e.is_file() and not e.is_symlink() for e in entries}
    source_names = {p.name for p in src.iterdir() if p.is_file()}
    foreign = foreign_entries(names, kinds, source_names)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(
            f"--out {out} holds {shown}, which a checkpoint does not have; --force replaces only an empty "
            "folder or a checkpoint: move them away or choose another folder"
        )
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise InputError(
            f"--out {out} does not hold a checkpoint (config.json and *.safetensors); --force replaces only "
            "an empty folder or a checkpoint"
        )
    return out


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor of a new `out` must be a folder this process can write in."""
    anc = out.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"--out {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        why = "permission denied"
        if hasattr(os, "statvfs") and os.statvfs(anc).f_flag & os.ST_RDONLY:
            why = "read-only file system"
        raise InputError(f"--out {out}: cannot create it in {anc} ({why})")


# --------------------------------------------------------------------------------------------
# Writing safely: a temporary sibling, signals, fsync, rename
# --------------------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP during a write: the partial output was removed, `out` is as it was."""

    def __init__(self, signum: int, out: Path):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}: removed the partial output; {out} is as it was")


class _SignalGuard:
    """SIGINT / SIGTERM / SIGHUP (a closed terminal) raise `Interrupted` for the duration of a
    write, so the staging folder is removed (the defaults of the last two kill the process and
    left it behind); inside `deferred()` they wait until the block ends. Previous handlers are
    restored on exit; an ignored signal (nohup's SIGHUP, a background job's SIGINT) stays
    ignored; outside the main thread (where handlers cannot be set) nothing changes."""

    SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))

    def __init__(self, out: Path):
        self.out = out
        self.previous: dict[int, Any] = {}
        self.pending: int | None = None
        self.defer = False

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                prev = signal.getsignal(s)
                if prev in (signal.SIG_IGN, None):  # ignored, or set from C: left alone
                    continue
                self.previous[s] = prev
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending is not None:
            return  # already stopping: let the cleanup finish
        self.pending = signum
        if not self.defer:
            raise Interrupted(signum, self.out)

    @contextmanager
    def deferred(self, then_raise: bool) -> Iterator[None]:
        """Signals wait until the block ends; then `then_raise` raises Interrupted (the block made
        something to clean up), else the signal is re-delivered after `__exit__` (the work is done)."""
        self.defer = True
        try:
            yield
        finally:
            self.defer = False
        if then_raise and self.pending is not None:
            raise Interrupted(self.pending, self.out)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for s, prev in self.previous.items():
            signal.signal(s, prev)
        if exc_type is None and self.pending is not None:
            signal.raise_signal(self.pending)  # arrived while committing: the previous handler decides


def _umask() -> int:
    """The process umask, without changing it when /proc tells (os.umask's read is a write)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, outermost first (removed on failure)."""
    missing: list[Path] = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        d.mkdir()
        created.append(d)
    return created


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened: rename is the barrier
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(out: Path, e: OSError) -> InputError:
    """One line for an OS error met while writing `out`."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InputError(f"--out {out}: no space left on the device (the partial output was removed)")
    what = e.strerror or type(e).__name__
    where = f" ({e.filename})" if e.filename and not str(e.filename).startswith(str(out.parent / ".")) else ""
    return InputError(f"--out {out}: cannot write: {what}{where}")


def _size(n: float) -> str:
    """Bytes for a message, in the unit that shows them (a 958 kB free disk is not '0.00 GB')."""
    for unit in ("bytes", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _check_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise InputError(f"--out {out}: the output needs {_size(need)} but only {_size(free)} are free there")


def _commit(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` (already checked) is set aside
    first and removed only once the new one is in place (put back if the rename fails)."""
    _fsync_dir(tmp)
    if not os.path.lexists(out):
        os.rename(tmp, out)
    else:
        trash = Path(tempfile.mkdtemp(prefix=_hidden_prefix(out, "old"), dir=out.parent))
        os.rename(out, trash / "old")
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(trash / "old", out)
            trash.rmdir()
            raise
        shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(out.parent)


def _hidden_prefix(out: Path, kind: str) -> str:
    """`.NAME.partial-HOST-PID-` (or `.old-`): a later write can tell a folder whose writer died
    (SIGKILL, power loss: no handler ran) from one a live process is still writing."""
    return f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale(out: Path) -> list[Path]:
    """Remove the hidden partial / old folders of `out` left by dead writers on this host."""
    removed = []
    host = socket.gethostname()
    for kind in ("partial", "old"):
        for d in out.parent.glob(f".{glob.escape(out.name)}.{kind}-{glob.escape(host)}-*-*"):
            pid = d.name[len(f".{out.name}.{kind}-{host}-") :].split("-", 1)[0]
            if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    if removed:
        warnings.warn(
            f"removed {len(removed)} unfinished output folder(s) of an earlier, killed write: "
            + ", ".join(d.name for d in removed),
            stacklevel=3,
        )
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def staging(out: Path, need: int) -> Iterator[Path]:
    """A fresh hidden sibling of `out` to write into; on success it becomes `out`. On any error,
    SIGINT, SIGTERM or SIGHUP it is removed (with any parent folders made for it) and `out` is untouched."""
    with _SignalGuard(out) as guard:
        created: list[Path] = []
        tmp: Path | None = None
        try:
            with guard.deferred(then_raise=True):  # no signal between making a folder and knowing it
                created = _make_parents(out.parent)
                _check_space(out, need)
                _remove_stale(out)
                tmp = Path(tempfile.mkdtemp(prefix=_hidden_prefix(out, "partial"), dir=out.parent))
                os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            yield tmp
            with guard.deferred(then_raise=False):  # the swap is never half done
                _commit(tmp, out)
        except BaseException as e:
            with guard.deferred(then_raise=False):
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                for d in reversed(created):
                    try:
                        d.rmdir()
                    except OSError:
                        break
            if isinstance(e, OSError):
                raise _os_error(out, e) from None
            raise


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _copy_file(src: Path, dst: Path) -> None:
    """Contents only: the copy's mode follows the umask, not the source's."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, CHUNK_BYTES)
        fo.flush()
        os.fsync(fo.fileno())


def _copy_extras(src: Path, tmp: Path, skip: re.Pattern[str]) -> None:
    """Tokenizer, processor, chat template, generation config... (plain files the writer does not make)."""
    for item in sorted(src.iterdir()):
        if item.is_file() and not _WEIGHT_FILES.search(item.name) and not skip.search(item.name):
            _copy_file(item, tmp / item.name)


def _extras_bytes(src: Path, skip: re.Pattern[str]) -> int:
    return sum(
        p.stat().st_size
        for p in src.iterdir()
        if p.is_file() and not _WEIGHT_FILES.search(p.name) and not skip.search(p.name)
    )


# --------------------------------------------------------------------------------------------
# One streamed safetensors writer
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
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
class _Made:
    """One output tensor computed when its turn comes (a quantized weight or its scales)."""

    out_name: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.itemsize, self.shape)


_Entry = _Job | _Made


def _nbytes(itemsize: int, shape: Sequence[int]) -> int:
    n = itemsize
    for s in shape:
        n *= s
    return n


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPE[str(dtype).removeprefix("torch.")]


def _data_start(path: Path) -> int:
    """Byte offset of a safetensors file's data section (8-byte header length + header)."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def _source_job(f: Any, start: int, name: str) -> _Job:
    """A whole-tensor copy of `name` from the safetensors file `f` (data section at `start`)."""
    dtype, shape, begin, _end = f.entries[name]
    rows = shape[0] if shape else 1
    row_elems = _nbytes(1, shape[1:])
    return _Job(
        name,
        _st_dtype(dtype),
        tuple(shape),
        f.path,
        start + begin,
        row_elems * dtype.itemsize,
        dtype.itemsize,
        [(0, rows)],
    )


def _ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
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


def split_shards(entries: Sequence[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Entries into shards of at most `max_shard_bytes` (a bigger tensor alone), each shard of one
    element size, in source order within it: every tensor then starts aligned to its dtype (the
    data section starts DATA_ALIGN-aligned), which zero-copy loading needs; safetensors' own writer gets
    the same by sorting a shard by dtype, which would make the writers hold a weight's codes
    until its scales are written."""
    groups: dict[int, list[list[_Entry]]] = {}
    sizes: dict[int, int] = {}
    for e in entries:
        shards = groups.setdefault(e.itemsize, [[]])
        if shards[-1] and sizes.get(e.itemsize, 0) + e.nbytes > max_shard_bytes:
            shards.append([])
            sizes[e.itemsize] = 0
        shards[-1].append(e)
        sizes[e.itemsize] = sizes.get(e.itemsize, 0) + e.nbytes
    return [s for shards in groups.values() for s in shards]


def _header(entries: Sequence[_Entry]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.out_name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-(8 + len(blob)) % DATA_ALIGN)  # padding spaces are part of the format


def _emit(e: _Made, out: BinaryIO, bar: Any) -> None:
    """Write a computed tensor's bytes in CHUNK_BYTES pieces (no second copy of it)."""
    t = e.make()
    if _st_dtype(t.dtype) != e.dtype or tuple(t.shape) != e.shape:  # a planning bug, never a user error
        raise RuntimeError(f"{e.out_name}: made {t.dtype} {list(t.shape)}, planned {e.dtype} {list(e.shape)}")
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    for i in range(0, raw.size, CHUNK_BYTES):
        piece = raw[i : i + CHUNK_BYTES]
        out.write(piece.data)
        bar.update(piece.size)


def _write_entry(out: BinaryIO, e: _Entry, fds: dict[Path, int], bar: Any) -> None:
    before = out.tell()
    if isinstance(e, _Job):
        _stream(e, fds[e.src_path], out, bar)
    else:
        _emit(e, out, bar)
    if out.tell() - before != e.nbytes:  # a planning bug, never a user error
        raise RuntimeError(f"wrote {out.tell() - before} bytes for {e.out_name}, expected {e.nbytes}")


def _close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _write_weights(tmp: Path, entries: Sequence[_Entry], max_shard_bytes: int, bar: Any) -> None:
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
            if isinstance(e, _Job) and e.src_path not in fds:
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
    _write_file(tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def _weights_bytes(entries: Sequence[_Entry], max_shard_bytes: int) -> int:
    """Bytes the shards take (data + headers): what the free-space check needs."""
    return sum(8 + len(_header(s)) + sum(e.nbytes for e in s) for s in split_shards(entries, max_shard_bytes))


def _plan(ckpt: Any, spec: SliceSpec) -> list[_Job]:
    text = ckpt.config.text
    n = text.num_hidden_layers
    p = text.hidden_size_per_layer_input
    prefix = ckpt.text_prefix
    new_index = {old: new for new, old in enumerate(spec.layers)}
    width = dict(zip(spec.layers, spec.ffn_widths))
    layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)$")
    jobs: list[_Job] = []
    for f in ckpt.files:
        start = _data_start(f.path)
        for name, (_dtype, shape, _begin, _end) in f.entries.items():
            job = _source_job(f, start, name)
            m = layer_re.match(name)

            def expect(cond: bool, what: str, name: str = name, shape: tuple = shape) -> None:
                if not cond:
                    raise CheckpointError(f"{ckpt.path}: tensor '{name}' has shape {list(shape)}; {what}")

            if m:
                old = int(m.group(1))
                rest = m.group(2)
                if old >= n:
                    raise CheckpointError(f"{ckpt.path}: tensor '{name}' is for layer {old} of a {n}-layer model")
                if old not in new_index:
                    continue  # skipped layer: all its tensors go (§2.2)
                job.out_name = f"{prefix}layers.{new_index[old]}.{rest}"
                w = width[old]
                if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                    expect(len(shape) == 2 and shape[0] == text.intermediate_size[old], "expected [I, D]")
                    job.row_ranges = [(0, w)]  # prefix rows (§1 nesting)
                    job.shape = (w, shape[1])
                elif rest == "mlp.down_proj.weight":
                    expect(len(shape) == 2 and shape[1] == text.intermediate_size[old], "expected [D, I]")
                    job.col_ranges = [(0, w)]
                    job.shape = (shape[0], w)
            elif name == f"{prefix}embed_tokens_per_layer.weight":
                # [Vp, L*P] viewed as [Vp, L, P]: keep the kept layers' column groups (§2.4)
                expect(len(shape) == 2 and shape[1] == n * p, f"expected [Vp, {n}*{p}]")
                job.col_ranges = _ranges([i * p + k for i in spec.layers for k in range(p)])
                job.shape = (shape[0], len(spec.layers) * p)
            elif name == f"{prefix}per_layer_model_projection.weight":
                # [L*P, D] viewed as [L, P, D]: keep the kept layers' row groups (§2.4)
                expect(len(shape) == 2 and shape[0] == n * p, f"expected [{n}*{p}, D]")
                job.row_ranges = _ranges([i * p + k for i in spec.layers for k in range(p)])
                job.shape = (len(spec.layers) * p, shape[1])
            jobs.append(job)
    return jobs


def _stream(job: _Job, src_fd: int, out: Any, bar: Any) -> None:
    """Copy one tensor in row chunks of <= CHUNK_BYTES (no whole-tensor buffer)."""
    import numpy as np

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


def _model_card(src: Any, spec: SliceSpec, text: Any, new_text: Any, preset: Preset | None) -> str:
    n = text.num_hidden_layers
    skip = spec.skipped(n)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [gemma3n, matformer, mix-n-match]",
        "---",
        "",
        f"# Gemma 3n Mix-n-Match slice: {spec.name}",
        "",
        f"Sliced from `{src}` with `gemma3n slice` (MatFormer: kept layers with a prefix of each FFN).",
        "Use is subject to the license of the parent model (Gemma Terms of Use).",
        "",
        "| | |",
        "| --- | --- |",
        f"| Slice | {spec.name}" + (f" (table row: {preset.table_name})" if preset else "") + " |",
        f"| Layers | {len(spec.layers)} of {n}" + (f", skipped {format_skip(skip)}" if skip else "") + " |",
        f"| FFN widths | {format_ffn(spec.ffn_widths)} |",
        f"| Effective params | {format_params(effective_params(new_text))} "
        f"(parent {format_params(effective_params(text))}) |",
    ]
    if preset:
        lines.append(f"| MMLU PT (official table) | {preset.mmlu_pt:.1f} % |")
    lines += ["", "| layer | original layer | type | FFN width |", "| --- | --- | --- | --- |"]
    for j, (i, w) in enumerate(zip(spec.layers, spec.ffn_widths)):
        lines.append(f"| {j} | {i} | {text.layer_types[i]} | {w} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Slice export
# --------------------------------------------------------------------------------------------

# Files of the parent a slice rewrites (besides the weights) instead of copying.
_SLICE_REWRITES = re.compile(
    r"^(config\.json|README\.md|matformer_sizes\.json)$"
)  # a slice's sizes are not its parent's


def _progress(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)


def export_slice(
    src: str | Path,
    spec: SliceSpec | str | dict | None,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the slice `spec` of checkpoint `src` to `out_dir` as an ordinary Gemma 3n checkpoint.

    Streams tensor by tensor in row chunks (peak memory ~2 x CHUNK_BYTES) into a hidden sibling
    folder renamed into place at the end (see the module notes for `force` and interruptions).
    """
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    text = ckpt.config.text
    declared = read_declared_sizes(ckpt.path, text)
    resolved = resolve_size(spec, text, declared)
    preset = None
    if isinstance(spec, str) and find_declared(spec, declared) is None:
        preset = _match_preset(spec)  # the table row, for the model card
    if resolved is None:  # the full model: an identity slice (a plain copy)
        resolved = SliceSpec("full", tuple(range(text.num_hidden_layers)), tuple(text.intermediate_size))
    spec = resolved
    new_text = sliced_text_config(text, spec)
    out = check_out(out_dir, ckpt, force)

    jobs = _plan(ckpt, spec)
    need = _weights_bytes(jobs, max_shard_bytes) + _extras_bytes(Path(ckpt.path), _SLICE_REWRITES)
    with staging(out, need) as tmp:
        with _progress(sum(j.nbytes for j in jobs), f"slice {spec.name}", progress) as bar:
            _write_weights(tmp, jobs, max_shard_bytes, bar)
        _copy_extras(Path(ckpt.path), tmp, _SLICE_REWRITES)
        _write_file(tmp / "README.md", _model_card(src, spec, text, new_text, preset))
        raw = json.loads(json.dumps(ckpt.config.raw))  # deep copy; every other field is kept
        target = raw if raw.get("model_type") == "gemma3n_text" else raw.setdefault("text_config", {})
        target.update(sliced_fields(text, spec))
        _write_file(tmp / "config.json", json.dumps(raw, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Quantized copy
# --------------------------------------------------------------------------------------------


class _Pair:
    """The (codes, scales) of one quantized weight: computed when the first is written, dropped
    after the second, so one weight's outputs are in memory at a time."""

    def __init__(self, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        self.fn = fn
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None
        self.taken = 0

    def get(self, i: int) -> torch.Tensor:
        if self.value is None:
            self.value = self.fn()
        t = self.value[i]
        self.taken += 1
        if self.taken == 2:
            self.value = None
        return t


def _quantizer(qc: QuantConfig, is_ple: bool, p: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Rows -> (codes, scales). The PLE table is row-wise: int8 one scale per (row, layer)
    group of `p` columns; int4 by groups."""
    if is_ple and qc.bits == 8:
        return lambda c: quantize_int8(c, group=p)
    if is_ple:
        return lambda c: quantize_int4(c, qc.group_size)
    return lambda c: _from_tensor(c, qc)


def _quant_plan(ckpt: Any, qc: QuantConfig) -> tuple[list[_Entry], int]:
    """Every output tensor of the quantized copy, in the source's order, and how many weights
    are quantized. Output shapes and dtypes come from quantizing one row (the schemes are row-wise)."""
    from .text import TextDecoder

    prefix = ckpt.text_prefix
    with torch.device("meta"):
        decoder = TextDecoder(ckpt.config.text)
    planned = {prefix + n for n in plan_modules(decoder, qc)}
    ple = prefix + "embed_tokens_per_layer"
    if qc.per_layer_embeddings:
        planned.add(ple)
    p = ckpt.config.text.hidden_size_per_layer_input
    entries: list[_Entry] = []
    done = 0
    for f in ckpt.files:
        start = _data_start(f.path)
        for name in f.entries:
            base = name[: -len(".weight")] if name.endswith(".weight") else None
            if base not in planned:
                entries.append(_source_job(f, start, name))
                continue
            fn = _quantizer(qc, base == ple, p)
            w = ckpt.tensor(name)
            q1, s1 = fn(w[:1])
            pair = _Pair(lambda w=w, fn=fn: _chunked(w, fn))
            for i, (suffix, t) in enumerate(((".qweight", q1), (".scales", s1))):
                shape = (w.shape[0], *t.shape[1:])
                entries.append(
                    _Made(
                        base + suffix, _st_dtype(t.dtype), shape, t.element_size(), lambda i=i, pair=pair: pair.get(i)
                    )
                )
            done += 1
    return entries, done


def quantize_checkpoint(
    model: str | Path,
    out: str | Path,
    qc: QuantConfig,
    log: Callable[[str], Any] = print,
    *,
    force: bool = False,
    progress: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a quantized copy of `model` to `out`: quantized tensors (portable layout), everything
    else as stored, config.json with a `quantization` section, tokenizer and other files copied.
    Written aside and renamed into place (see the module notes for `force` and interruptions)."""
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(model)
    if stored_config(ckpt.path) is not None:
        raise InputError(f"{ckpt.path} is already quantized")
    target = check_out(out, ckpt, force)
    entries, done = _quant_plan(ckpt, qc)
    config = json.loads((Path(ckpt.path) / "config.json").read_text(encoding="utf-8"))
    config["quantization"] = qc.to_json()
    rewrites = re.compile(r"^config\.json$")
    need = _weights_bytes(entries, max_shard_bytes) + _extras_bytes(Path(ckpt.path), rewrites)
    with staging(target, need) as tmp:
        with _progress(sum(e.nbytes for e in entries), f"quantize {qc.name}", progress) as bar:
            _write_weights(tmp, entries, max_shard_bytes, bar)
        _copy_extras(Path(ckpt.path), tmp, rewrites)
        _write_file(tmp / "config.json", json.dumps(config, indent=2))
    shards = len(split_shards(entries, max_shard_bytes))
    log(f"quantized {done} tensors ({qc.name}) -> {target} ({shards} shard(s))")
    unfit = _unfit(ckpt, qc)
    if unfit:
        log(describe_unfit(unfit, qc))
    return target


def _unfit(ckpt: Any, qc: QuantConfig) -> dict[str, str]:
    """The weights `qc` would cover but that stay in high precision (reported to the user)."""
    from .text import TextDecoder

    with torch.device("meta"):
        decoder = TextDecoder(ckpt.config.text)
    return unfit_modules(decoder, qc)
