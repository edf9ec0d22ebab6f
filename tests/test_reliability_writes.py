"""Checkpoint writers lose nothing (issue #21): `slice` and `quantize` write aside and rename,
clean up on SIGINT / SIGTERM / disk errors, `--force` replaces only a checkpoint or an empty
folder (never the source, a folder holding it, or other files), and outputs follow the umask.
Every refusal is one clear line on stderr, rc 2, no traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemma3n import export as ex
from gemma3n import shards, staging
from gemma3n.cli import main
from gemma3n.model import default_model_path
from gemma3n.quantize import QuantConfig
from tests.conftest import text_only_copy

ROOT = Path(__file__).resolve().parents[1]
SLICE = ["--preset", "E2B-like", "--no-progress"]  # a size the embedded model declares


# --- helpers -------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    """name -> content digest of every file below `folder` (what 'intact' means)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI in-process: rc 2 and exactly one 'gemma3n: error:' line holding `needles`."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("gemma3n: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(autouse=True)
def _signals_not_ignored():
    """These tests send a terminal's signals and expect the writer to catch them. The writer rightly
    leaves an ignored signal alone (test_an_ignored_signal_stays_ignored), and the suite may itself
    run with one ignored: under nohup SIGHUP is, in a background job without job control SIGINT is,
    and the CLI children would inherit it. Each test starts with them at Python's defaults."""
    ignored = [s for s in staging._SignalGuard.SIGNALS if signal.getsignal(s) == signal.SIG_IGN]
    for s in ignored:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    yield
    for s in ignored:
        signal.signal(s, signal.SIG_IGN)


@pytest.fixture
def src(tmp_path) -> Path:
    """A copy of the embedded model in PARENT/src (PARENT holds nothing else)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    return Path(shutil.copytree(default_model_path(), parent / "src"))


# --- where --out may be -------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["slice", "quantize"])
def test_force_never_touches_the_source(src, capsys, cmd):
    before = _snapshot(src.parent)
    extra = SLICE if cmd == "slice" else ["--bits", "8"]
    link = src.parent.parent / "link-to-src"
    link.symlink_to(src, target_is_directory=True)
    cases = [
        (src.parent, "contains the source checkpoint"),  # out = parent of src: the data loss
        (src, "is the source checkpoint"),
        (src / "inner", "is inside the source checkpoint"),
        (link, "is the source checkpoint"),  # compared as resolved paths
        (src.parent.parent, "contains the source checkpoint"),  # any ancestor
    ]
    for out, why in cases:
        _refused(capsys, [cmd, "--model", str(src), "--out", str(out), "--force", *extra], why)
    assert _snapshot(src.parent) == before
    assert not (src / "inner").exists()


@pytest.mark.parametrize("cmd", ["slice", "quantize"])
def test_force_replaces_only_a_checkpoint_or_an_empty_folder(src, tmp_path, capsys, cmd):
    extra = SLICE if cmd == "slice" else ["--bits", "8"]
    run = [cmd, "--model", str(src), *extra]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    _refused(capsys, [*run, "--out", str(out)], "is not empty; pass --force")
    _refused(capsys, [*run, "--out", str(out), "--force"], "notes.txt", "a checkpoint does not have")
    (out / "notes.txt").unlink()
    (out / "photos").mkdir()
    _refused(capsys, [*run, "--out", str(out), "--force"], "photos")
    (out / "photos").rmdir()
    _refused(capsys, [*run, "--out", str(out), "--force"], "does not hold a checkpoint")  # config.json alone
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    (out / "config.json").unlink()
    assert main([*run, "--out", str(out)]) == 0  # an empty folder is fine
    first = _snapshot(out)
    assert main([*run, "--out", str(out), "--force"]) == 0  # a checkpoint is replaced
    assert _snapshot(out) == first  # (the same bytes again: the writer is deterministic)
    assert _hidden(tmp_path) == []
    capsys.readouterr()


def test_out_paths_that_cannot_be_written(src, tmp_path, capsys):
    run = ["quantize", "--model", str(src), "--bits", "8"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _refused(capsys, [*run, "--out", str(a_file)], "exists and is not a folder")
    _refused(capsys, [*run, "--out", str(a_file / "sub" / "out")], f"{a_file} is a file, not a folder")
    _refused(capsys, ["slice", "--model", str(src), *SLICE, "--out", str(a_file)], "exists and is not a folder")
    assert a_file.read_text() == "x"
    # a missing parent is made (mkdir -p), as both commands always did
    deep = tmp_path / "new" / "deeper" / "out"
    assert main([*run, "--out", str(deep)]) == 0
    assert (deep / "config.json").is_file()
    capsys.readouterr()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent_is_one_line(src, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(capsys, ["quantize", "--model", str(src), "--bits", "8", "--out", str(locked / "out")], "permission")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    ("where", "exc"),
    [
        ("mkdtemp", PermissionError(errno.EACCES, "Permission denied", "/x")),
        ("mkdtemp", OSError(errno.EROFS, "Read-only file system", "/x")),
        ("write", OSError(errno.ENOSPC, "No space left on device")),
        ("write", OSError(errno.EDQUOT, "Disk quota exceeded")),
        ("write", OSError(errno.EIO, "Input/output error")),
    ],
)
def test_os_errors_while_writing_are_one_line_and_leave_nothing(src, tmp_path, capsys, monkeypatch, where, exc):
    """Faults injected where the OS raises them (root cannot be denied a write, a disk cannot be
    filled on demand): the partial output and the parent folders made for it go, an existing
    output stays, and the message names --out."""
    out = tmp_path / "made" / "out"
    if where == "mkdtemp":

        def fail(*args, **kwargs):
            raise exc

        monkeypatch.setattr(staging.tempfile, "mkdtemp", fail)
    else:
        real = shards._emit
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise exc
            return real(*args, **kwargs)

        monkeypatch.setattr(shards, "_emit", flaky)
    line = _refused(capsys, ["quantize", "--model", str(src), "--bits", "8", "--out", str(out)], f"--out {out}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        assert "no space left" in line
    assert not (tmp_path / "made").exists()  # the parents made for it are removed too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


def test_free_space_is_checked_before_writing(src, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    for argv in (
        ["quantize", "--model", str(src), "--bits", "4", "--group-size", "32"],
        ["slice", "--model", str(src), *SLICE],
    ):
        _refused(capsys, [*argv, "--out", str(tmp_path / "out")], "MB but only 1.00 kB are free there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


def test_a_bad_int4_group_is_refused_before_anything_is_written(src, tmp_path, capsys):
    cfg = json.loads((src / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # the multimodal layout keeps the decoder's fields there
    width = cfg["hidden_size_per_layer_input"] * cfg["num_hidden_layers"]
    group = next(g for g in (32, 64, 128) if width % g)  # a group that does not divide the PLE width
    out = tmp_path / "out"
    _refused(capsys, ["quantize", "--model", str(src), "--bits", "4", "--group-size", str(group), "--out", str(out)])
    assert not out.exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_follow_the_umask(src, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        for cmd, extra in (("slice", SLICE), ("quantize", ["--bits", "8"])):
            out = tmp_path / cmd
            assert main([cmd, "--model", str(src), *extra, "--out", str(out)]) == 0
            assert out.stat().st_mode & 0o777 == 0o777 & ~umask, cmd
            for f in out.iterdir():
                assert f.stat().st_mode & 0o777 == 0o666 & ~umask, (cmd, f.name)
    finally:
        os.umask(old)
    capsys.readouterr()


def test_shards_are_aligned_and_named_one_way(src, tmp_path):
    """Both writers: model-0000k-of-0000n shards, an index naming every tensor, and each tensor's
    bytes aligned to its dtype and to DATA_ALIGN when its shard's earlier sizes allow (zero-copy
    loads; the int8 kernel crashed on a weight 8 bytes off a 16-byte boundary)."""
    from gemma3n.checkpoint import open_checkpoint

    q = ex.quantize_checkpoint(src, tmp_path / "q", QuantConfig.parse("int8"), log=lambda s: None)
    s = ex.export_slice(src, "E2B-like", tmp_path / "s", progress=False, max_shard_bytes=2_000_000)
    for out in (q, s):
        names = sorted(p.name for p in out.glob("*.safetensors"))
        assert names == shards.shard_names(len(names))
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        ckpt = open_checkpoint(out)
        assert set(index) == set(ckpt.names())
        for f in ckpt.files:
            start = shards.data_start(f.path)
            assert start % shards.DATA_ALIGN == 0
            for name, (dtype, _shape, begin, _end) in f.entries.items():
                assert (start + begin) % dtype.itemsize == 0, name
    import gemma3n

    model = gemma3n.load(q)  # the int8 kernel runs on the mapped weights, several rows at once
    assert model.generate("In the beginning", max_tokens=4, temperature=0).token_ids


# --- interruptions ----------------------------------------------------------------------------
def _interrupt_at(sig: int, fraction: float, call) -> None:
    """Make `call`'s writer deliver `sig` to this process once `fraction` of its tensors are written."""
    entries = {"n": 0, "total": None}
    real_write = ex.write_weights

    def counting(tmp, planned, max_shard_bytes, bar):
        entries["total"] = len(planned)
        return real_write(tmp, planned, max_shard_bytes, bar)

    real_entry = shards._write_entry

    def entry(out, e, fds, bar):
        if entries["n"] == int(fraction * (entries["total"] - 1)):
            os.kill(os.getpid(), sig)
        entries["n"] += 1
        return real_entry(out, e, fds, bar)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "write_weights", counting)
        mp.setattr(shards, "_write_entry", entry)
        call()


@pytest.mark.parametrize("sig", staging._SignalGuard.SIGNALS)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_signal_in_process_cleans_up_and_restores_handlers(src, tmp_path, sig, fraction):
    out = tmp_path / "out"
    ex.quantize_checkpoint(src, out, QuantConfig.parse("int8"), log=lambda s: None)
    before = _snapshot(out)
    handlers = {s: signal.getsignal(s) for s in staging._SignalGuard.SIGNALS}
    with pytest.raises(staging.Interrupted, match=f"interrupted by {signal.Signals(sig).name}") as info:
        _interrupt_at(
            sig,
            fraction,
            lambda: ex.quantize_checkpoint(src, out, QuantConfig.parse("int4:32"), log=lambda s: None, force=True),
        )
    assert info.value.signum == sig
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "parent"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_signal_while_committing_is_delivered_after_the_rename(src, tmp_path, monkeypatch):
    """The swap of an old output for the new one is never half done: a signal arriving in it
    waits, the new output is complete, then the signal reaches the handler the caller had."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    real = staging._commit

    def commit(tmp, out):
        os.kill(os.getpid(), signal.SIGTERM)
        real(tmp, out)

    monkeypatch.setattr(staging, "_commit", commit)
    try:
        out = ex.quantize_checkpoint(src, tmp_path / "out", QuantConfig.parse("int8"), log=lambda s: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [signal.SIGTERM]
    assert (out / "config.json").is_file() and _hidden(tmp_path) == []


def test_an_ignored_signal_stays_ignored(src, tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _interrupt_at(
            signal.SIGTERM,
            0.5,
            lambda: ex.quantize_checkpoint(src, tmp_path / "out", QuantConfig.parse("int8"), log=lambda s: None),
        )
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (tmp_path / "out" / "config.json").is_file()


# A checkpoint whose write takes long enough to signal the real CLI while it runs: the embedded
# model with its two vocabulary tables grown (random rows), about 300 MB.
BIG_VOCAB = 200_000


@pytest.fixture(scope="module")
def big_src(tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    dst = text_only_copy(default_model_path(), tmp_path_factory.mktemp("big") / "src")
    state = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    for name, key in (
        ("model.embed_tokens.weight", "vocab_size"),
        ("model.embed_tokens_per_layer.weight", "vocab_size_per_layer_input"),
    ):
        old = state[name]
        new = torch.empty(BIG_VOCAB, old.shape[1], dtype=old.dtype).normal_(generator=gen)
        new[: old.shape[0]] = old
        state[name], cfg[key] = new, BIG_VOCAB
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _written(parent: Path, name: str) -> int | None:
    """Bytes in the writer's partial folder, or None while there is none."""
    found = None
    for d in parent.glob(f".{name}.partial-*"):
        found = 0
        try:
            found += sum(f.stat().st_size for f in d.iterdir())
        except FileNotFoundError:  # removed under our feet
            pass
    return found


def _run_and_signal(argv: list[str], out: Path, sig: int, at_bytes: int) -> subprocess.CompletedProcess:
    """Run the CLI; once its partial folder holds `at_bytes`, send `sig`; wait for it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemma3n.cli", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent = False
    while proc.poll() is None and not sent:
        n = _written(out.parent, out.name) if out.parent.exists() else None
        if n is not None and n >= at_bytes:
            proc.send_signal(sig)
            sent = True
        else:
            time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _expect_interrupted(res: subprocess.CompletedProcess, sig: int, out: Path) -> None:
    assert res.returncode == 128 + sig, (
        f"rc {res.returncode}: the write ended before {signal.Signals(sig).name} arrived "
        f"(the test checkpoint is too small for this machine?)\n{res.stderr}"
    )
    lines = res.stderr.strip().splitlines()
    name = signal.Signals(sig).name
    assert lines == [f"gemma3n: interrupted by {name}: removed the partial output; {out.resolve()} is as it was"]


def test_quantize_interrupted_by_signals_at_several_moments(big_src, tmp_path):
    """The issue's case: SIGINT left a loadable but incomplete --out, SIGTERM a hidden partial
    folder. Signals at the start of the write and halfway, over a fresh --out (in a parent made
    for it) and over an existing one with --force: nothing partial or hidden is left, an
    existing --out is intact."""
    work = tmp_path / "work"
    work.mkdir()
    done = work / "done"
    base = ["quantize", "--model", str(big_src), "--bits", "8"]
    full = subprocess.run(
        [sys.executable, "-m", "gemma3n.cli", *base, "--out", str(done)], cwd=ROOT, capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr
    before = {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in done.iterdir()}
    total = sum(size for _ino, size, _m in before.values())
    for sig, fraction, force in (
        (signal.SIGTERM, 0.0, True),
        (signal.SIGINT, 0.0, False),
        (signal.SIGINT, 0.5, True),
        (signal.SIGTERM, 0.5, False),
    ):
        out = done if force else work / "new" / "out"
        argv = [*base, "--out", str(out)] + (["--force"] if force else [])
        res = _run_and_signal(argv, out, sig, int(fraction * total))
        _expect_interrupted(res, sig, out)
        assert sorted(p.name for p in work.iterdir()) == ["done"], (sig, fraction)  # no .partial, no new/
        after = {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in done.iterdir()}
        assert after == before, (sig, fraction)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_slice_interrupted_leaves_no_hidden_folder(big_src, tmp_path, name):
    """The issue's case: SIGTERM during slice left a hidden `.NAME.partial-*` of hundreds of MB
    (SIGHUP: the terminal closed)."""
    if not hasattr(signal, name):
        pytest.skip(f"no {name} here")
    sig = getattr(signal, name)
    out = tmp_path / "slice"
    argv = ["slice", "--model", str(big_src), *SLICE, "--out", str(out)]
    res = _run_and_signal(argv, out, sig, 1)
    _expect_interrupted(res, sig, out)
    assert list(tmp_path.iterdir()) == []


def test_killed_write_is_cleaned_up_by_the_next_one(big_src, tmp_path):
    """SIGKILL (or a power loss) runs no handler and leaves the hidden partial folder; the next
    write to the same --out removes it (its writer is dead) and finishes normally."""
    out = tmp_path / "q8"
    argv = ["quantize", "--model", str(big_src), "--bits", "8", "--out", str(out)]
    res = _run_and_signal(argv, out, signal.SIGKILL, 1)
    assert res.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".q8.partial-*"))
    assert left, "SIGKILL should leave the partial folder behind"
    done = subprocess.run([sys.executable, "-m", "gemma3n.cli", *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "removed 1 unfinished output folder" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]


def test_a_live_writers_partial_folder_is_left_alone(tmp_path):
    """Another process still writing the same --out: its folder is not touched."""
    live = tmp_path / f".out.partial-{socket.gethostname()}-{os.getppid()}-abc"
    live.mkdir()
    assert staging._remove_stale(tmp_path / "out") == []
    assert live.exists()
