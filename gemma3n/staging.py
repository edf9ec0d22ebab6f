"""Writing a checkpoint folder without losing anything the user had.

The output is written into a hidden sibling folder (`.NAME.partial-HOST-PID-*`), fsynced and renamed
into place at the end; SIGINT / SIGTERM / SIGHUP during the write remove that folder and raise
`Interrupted` (a folder left by a killed writer is removed by the next write to the same place);
`force` replaces only an empty folder or a checkpoint, never one that is, holds or lies inside the
source, nor one holding other files. Folders and files follow the umask. OS errors (disk full,
permissions, a file in the way) become one InputError line.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError

COPY_CHUNK_BYTES = 64 << 20  # bounded memory when copying the other files
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


def write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _copy_file(src: Path, dst: Path) -> None:
    """Contents only: the copy's mode follows the umask, not the source's."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, COPY_CHUNK_BYTES)
        fo.flush()
        os.fsync(fo.fileno())


def copy_extras(src: Path, tmp: Path, skip: re.Pattern[str]) -> None:
    """Tokenizer, processor, chat template, generation config... (plain files the writer does not make)."""
    for item in sorted(src.iterdir()):
        if item.is_file() and not _WEIGHT_FILES.search(item.name) and not skip.search(item.name):
            _copy_file(item, tmp / item.name)


def extras_bytes(src: Path, skip: re.Pattern[str]) -> int:
    return sum(
        p.stat().st_size
        for p in src.iterdir()
        if p.is_file() and not _WEIGHT_FILES.search(p.name) and not skip.search(p.name)
    )
