"""llama.cpp as the yardstick (issue #14 item 5): the same random-weight checkpoint through llama.cpp,
transformers and our runtime, one engine per process, side by side.

    python bench/bench_llamacpp.py --layers 10 --threads 2
    python bench/bench_llamacpp.py --checkpoint /work/ckpt/e2b --only ours,transformers
    python bench/bench_llamacpp.py --layers 10 --prepare-only        # build + checkpoint + GGUF, no timing

What it does, caching every step under ``~/.cache/gemma3n/llamacpp/<version>/`` (``--cache``):

1. llama.cpp from the sources vendored in the ``llama-cpp-python`` sdist (``pip download --no-deps
   --no-binary :all:``), CMake Release, CPU only (``-DGGML_NATIVE=ON``, no CUDA/Metal/curl/OpenSSL; on a
   CPU with AMX, ggml's AMX matmul compiled out: it segfaults on these Q8_0/Q4_0 files, see NO_AMX),
   targets ``llama-bench`` and ``llama-quantize`` only. Built once; ``--skip-build`` insists on the cache.
2. A random-weight checkpoint with the real E2B widths and ``--layers`` layers
   (``tools/make_random_checkpoint.py --shape E2B --layers N --text-only``), unless ``--checkpoint``.
3. GGUF: the vendored ``convert_hf_to_gguf.py`` with its vendored ``gguf-py`` writes BF16 from a staging
   copy of the checkpoint (safetensors symlinked; a dummy sentencepiece ``tokenizer.model`` built from the
   placeholder vocabulary: the converter's Gemma 3n path reads only that), then ``llama-quantize`` writes
   Q8_0 and Q4_0. The source checkpoint is never written to.
4. The engines, one at a time, each in its own process (peak RSS is that process's alone):
   ``llama-bench -p P -n D -t T -r R -o json`` for BF16 / Q8_0 / Q4_0; ours (``gemma3n.load``, bf16 as
   stored, ``quantize="int8"`` and ``"int4:32"``); transformers ``Gemma3nForCausalLM`` in bf16 and fp32.

Measured the way llama-bench measures: prefill P tok/s = P / time of one forward over the P-token prompt
that outputs the last position's logits (ours: time to first token of ``Model.stream``, which is prefill +
head row + sampling; ``Model.logits`` would compute the head for every position, ~0.55 TFLOP extra at
P = 512); decode tok/s = D greedy tokens after a short prompt (llama-bench: D tokens from an empty context).
Best of ``--repeats`` for every engine (llama-bench's per-repetition samples). Peak RSS: the child's
``ru_maxrss`` (``os.wait4``), the same for every engine. The bound: bytes of weights read per decoded token
(GGUF: every tensor but the per-layer embedding table and the KV-shared layers' K/V; ours: the loaded
decoder's weight bytes, ``placement_report``; transformers: bench.common.decode_weight_params) / the
read bandwidth by ``gemma3n.hardware`` (``measure()``, the probe ``probe()`` caches, run before and after
the engines, best kept; ``--cached-probe`` takes the cached one, ``--bandwidth`` pins it). The table goes
to stdout, everything to ``bench/out/bench_llamacpp-*.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
TARGETS = ("llama-bench", "llama-quantize")
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_CURL=OFF",  # gone from this llama.cpp (warned as unused); kept for older trees
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
# ggml's AMX matmul (built by -march=native where the CPU has AMX) segfaults on this model's Q8_0 / Q4_0 files
# (ggml_backend_amx_mul_mat, llama.cpp issue #20824, open) and has given wrong Q4_0 results (PR #16315):
# compiled out, so llama.cpp runs its AVX-512 / AVX2 kernels and weight repacking there as everywhere else.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
GGUF_TYPES = ("bf16", "q8_0", "q4_0")  # BF16 from the converter, the others from llama-quantize
OURS = {"bf16": None, "int8": "int8", "int4:32": "int4:32"}
MATCH = {"bf16": "bf16", "int8": "q8_0", "int4:32": "q4_0"}  # ours -> llama.cpp at matching precision
HF_DTYPES = ("bf16", "fp32")


def log(msg: str) -> None:
    print(f"[bench_llamacpp] {msg}", flush=True)


# --- 1. llama.cpp -------------------------------------------------------------------------------------


def cache_root(override: str | None) -> Path:
    if override:
        return Path(override).expanduser().resolve()
    base = os.environ.get("GEMMA3N_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma3n"
    )
    return Path(base) / "llamacpp" / LLAMA_CPP_PYTHON


def fetch_sdist(cache: Path) -> Path:
    """The llama-cpp-python sdist, downloaded with pip into the cache when missing."""
    dest = cache / "sdist"
    path = dest / SDIST
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist into {dest} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, "-d", str(dest), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=False)
    if not path.is_file():
        raise SystemExit(f"pip did not leave {path}: download it by hand into {dest}")
    return path


def extract_sources(cache: Path, sdist: Path) -> Path:
    """vendor/llama.cpp of the sdist -> cache/src (only that subtree)."""
    src = cache / "src"
    if (src / ".complete").is_file():
        return src
    log(f"extracting {VENDORED} from {sdist.name} ...")
    tmp = Path(tempfile.mkdtemp(prefix="src.", dir=cache))
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(VENDORED) and len(m.name) > len(VENDORED):
                m.name = m.name[len(VENDORED) :]
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    (tmp / ".complete").write_text(sdist.name)
    if src.exists():
        shutil.rmtree(src)
    tmp.rename(src)
    return src


def cmake_args() -> list[str]:
    """CMAKE_ARGS, plus compiler flags that turn ggml's AMX path off on a CPU that has AMX."""
    args = list(CMAKE_ARGS)
    try:
        flags = set(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:
        flags = set()
    if flags & {"amx_tile", "amx_int8", "amx_bf16"}:
        args += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return args


def binaries(cache: Path) -> dict[str, Path]:
    return {t: cache / "build" / "bin" / t for t in TARGETS}


def build_llamacpp(cache: Path, jobs: int, skip: bool) -> dict[str, Path]:
    """llama-bench and llama-quantize, built once into cache/build (system cmake and compiler)."""
    bins = binaries(cache)
    stamp = cache / "build" / "build-args.json"
    wanted = {"cmake_args": cmake_args(), "targets": list(TARGETS)}
    have = all(b.is_file() and os.access(b, os.X_OK) for b in bins.values())
    if have and (skip or (stamp.is_file() and json.loads(stamp.read_text()) == wanted)):
        return bins
    if skip:
        raise SystemExit(f"--skip-build, but {cache / 'build' / 'bin'} has no llama-bench / llama-quantize")
    src = extract_sources(cache, fetch_sdist(cache))
    cmake = shutil.which("cmake") or "/usr/bin/cmake"
    build = cache / "build"
    log(f"configuring llama.cpp ({cmake}) in {build} ...")
    t0 = time.perf_counter()
    subprocess.run([cmake, "-S", str(src), "-B", str(build), *wanted["cmake_args"]], check=True)
    log(f"building {', '.join(TARGETS)} with -j{jobs} (minutes on 2 cores) ...")
    subprocess.run(
        [cmake, "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS], check=True
    )
    stamp.write_text(json.dumps(wanted))
    log(f"llama.cpp built in {time.perf_counter() - t0:.0f} s")
    return bins


# --- child processes: peak RSS of each ------------------------------------------------------------------


def run_measured(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    stdout_path: Path | None = None,
    timeout: float | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run `cmd` (stdout to `stdout_path` or inherited; stderr inherited, or with `quiet` into the same
    file); wall time and the child's peak RSS (``ru_maxrss`` from ``os.wait4``, the same for every engine)."""
    out = open(stdout_path, "wb") if stdout_path else None  # noqa: SIM115 (closed below)
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT if quiet and out else None)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = -9
                break
            time.sleep(0.05)
    finally:
        if out:
            out.close()
    proc.returncode = os.waitstatus_to_exitcode(status) if status != -9 else -9  # Popen must not wait again
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # KiB on Linux
        "timed_out": status == -9,
    }


# --- 2. checkpoint and 3. GGUF -------------------------------------------------------------------------


def make_checkpoint(cache: Path, layers: int) -> Path:
    """A random-weight E2B-width text-only checkpoint with `layers` layers (made once)."""
    out = cache / "ckpt" / f"e2b-l{layers}"
    if (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file():
        return out
    log(f"writing a random E2B-width checkpoint with {layers} layers to {out} ...")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "make_random_checkpoint.py"),
        "--shape",
        "E2B",
        "--layers",
        str(layers),
        "--text-only",
        "--out",
        str(out),
        "--force",
    ]
    subprocess.run(cmd, check=True)
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def dummy_sentencepiece(pieces: Sequence[tuple[str, int]]) -> bytes:
    """A serialized sentencepiece ModelProto (unigram, identity normalizer) with these (piece, type) at
    ids 0..n-1; types: 1 normal, 2 unknown, 3 control. Written by hand: no protobuf package needed."""
    body = bytearray()
    for i, (text, kind) in enumerate(pieces):
        score = 0.0 if kind != 1 else -float(i)
        piece = _field(1, 2, text.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(kind))
        body += _field(1, 2, piece)
    ids = {kind: i for i, (_, kind) in enumerate(pieces) if kind == 2}
    trainer = _field(3, 0, _varint(1)) + _field(4, 0, _varint(len(pieces)))  # model_type UNIGRAM, vocab_size
    trainer += _field(40, 0, _varint(ids.get(2, 0)))  # unk_id
    normalizer = _field(1, 2, b"identity") + _field(3, 0, _varint(0)) + _field(4, 0, _varint(0))
    return bytes(body + _field(2, 2, trainer) + _field(3, 2, normalizer))


def dummy_vocab(ckpt: Path, vocab_size: int) -> list[tuple[str, int]]:
    """(piece, type) for every id: the placeholder tokenizer.json's strings when there is one (its special
    tokens as control pieces, ``<unk>`` as the unknown piece), else ``<pad> <eos> <bos> <unk> t4 t5 ...``."""
    names = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"}
    special = set(names.values())
    try:
        tok = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
        if isinstance(vocab, dict):
            names.update({int(i): str(s) for s, i in vocab.items()})
        for added in tok.get("added_tokens", []):
            names[int(added["id"])] = added["content"]
            if added.get("special"):
                special.add(added["content"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    pieces, seen = [], set()
    for i in range(max(vocab_size, max(names) + 1)):
        text = names.get(i) or f"t{i}"
        if text in seen or not text.strip():
            text = f"[dup{i}]"
        seen.add(text)
        pieces.append((text, 2 if text == "<unk>" else 3 if text in special else 1))
    if not any(kind == 2 for _, kind in pieces):
        pieces[3] = ("<unk>", 2)
    return pieces


def stage_checkpoint(ckpt: Path, stage: Path) -> None:
    """A copy of `ckpt` the converter accepts: tensors and tokenizer files symlinked, config.json copied
    (``architectures`` added when missing), a dummy ``tokenizer.model`` when there is none."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" or f.name in (
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "generation_config.json",
            "special_tokens_map.json",
        ):
            (stage / f.name).symlink_to(f.resolve())
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    if not config.get("architectures"):
        kind = config.get("model_type")
        config["architectures"] = ["Gemma3nForConditionalGeneration" if kind == "gemma3n" else "Gemma3nForCausalLM"]
        log(f"config.json has no architectures: staged as {config['architectures'][0]}")
    (stage / "config.json").write_text(json.dumps(config, indent=2))
    if not (stage / "tokenizer.model").exists():
        tc = common.text_config_of(config)
        pieces = dummy_vocab(ckpt, tc.get("vocab_size_per_layer_input") or tc["vocab_size"])
        (stage / "tokenizer.model").write_bytes(dummy_sentencepiece(pieces))
        log(f"wrote a dummy sentencepiece tokenizer.model ({len(pieces)} pieces) for the converter")


def converter_env(cache: Path, src: Path) -> dict[str, str]:
    """PYTHONPATH: the vendored gguf-py first, then sentencepiece (installed into the cache when this
    Python lacks it: the converter's sentencepiece path needs it, nothing else here does)."""
    paths = [str(src / "gguf-py")]
    probe = subprocess.run([sys.executable, "-c", "import sentencepiece"], capture_output=True)
    if probe.returncode != 0:
        deps = cache / "pydeps"
        if not any(deps.glob("sentencepiece*")):
            log(f"installing sentencepiece into {deps} (for the converter only) ...")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--target",
                    str(deps),
                    "sentencepiece>=0.1.98,<0.3.0",
                ],
                check=True,
            )
        paths.append(str(deps))
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def gguf_dir(cache: Path, ckpt: Path, layers: int) -> Path:
    key = hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:8]
    name = ckpt.resolve().name
    name = name if name.endswith(f"-l{layers}") else f"{name}-l{layers}"
    return cache / "gguf" / f"{name}-{key}"


def _stamp(ckpt: Path) -> dict[str, Any]:
    st = [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in sorted(ckpt.glob("*.safetensors"))]
    return {"checkpoint": str(ckpt.resolve()), "files": st}


def make_ggufs(cache: Path, ckpt: Path, layers: int, bins: dict[str, Path], threads: int) -> dict[str, Any]:
    """BF16 / Q8_0 / Q4_0 GGUF files of `ckpt` (cached, rebuilt when its shards change); returns their
    paths and what each step cost (seconds, peak RSS, file size)."""
    out = gguf_dir(cache, ckpt, layers)
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / "convert.json"
    meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("stamp") != _stamp(ckpt):
        meta = {"stamp": _stamp(ckpt)}
        for f in out.glob("*.gguf"):
            f.unlink()
    files = {t: out / f"model-{t}.gguf" for t in GGUF_TYPES}
    src = cache / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():  # the converter and gguf-py (to read the files)
        src = extract_sources(cache, fetch_sdist(cache))
    if not files["bf16"].is_file():
        stage = out / "hf-staging"
        stage_checkpoint(ckpt, stage)
        part = files["bf16"].with_suffix(".part")
        log(f"converting {ckpt} to BF16 GGUF (vendored convert_hf_to_gguf.py) ...")
        cmd = [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(stage),
            "--outtype",
            "bf16",
            "--outfile",
            str(part),
            "--use-temp-file",  # tensor data buffered in a temp file: peak RSS 7.8 instead of 9.6 GB at 10 layers
        ]
        r = run_measured(cmd, env=converter_env(cache, src))
        if r["rc"] != 0:
            raise SystemExit(f"convert_hf_to_gguf.py failed (rc {r['rc']}); staging left in {stage}")
        part.rename(files["bf16"])
        shutil.rmtree(stage)
        meta["bf16"] = {**r, "bytes": files["bf16"].stat().st_size}
        log(
            f"BF16: {meta['bf16']['bytes'] / 1e9:.2f} GB in {r['wall_s']:.0f} s, converter peak RSS "
            f"{r['peak_rss_gb']:.2f} GB"
        )
        meta_file.write_text(json.dumps(meta, indent=2))
    for t in GGUF_TYPES[1:]:
        if files[t].is_file():
            continue
        part = files[t].with_suffix(".part")
        log(f"llama-quantize {files['bf16'].name} -> {t.upper()} ...")
        r = run_measured(
            [str(bins["llama-quantize"]), str(files["bf16"]), str(part), t.upper(), str(threads)],
            stdout_path=out / f"quantize-{t}.log",
            quiet=True,
        )
        if r["rc"] != 0:
            raise SystemExit(f"llama-quantize {t} failed (rc {r['rc']}), see {out / f'quantize-{t}.log'}")
        part.rename(files[t])
        meta[t] = {**r, "bytes": files[t].stat().st_size}
        log(f"{t.upper()}: {meta[t]['bytes'] / 1e9:.2f} GB in {r['wall_s']:.0f} s, peak RSS {r['peak_rss_gb']:.2f} GB")
        meta_file.write_text(json.dumps(meta, indent=2))
    for t in GGUF_TYPES:
        if "read" not in meta[t]:  # reading a GGUF's header takes seconds (its 262k-token list): once
            meta[t]["read"] = gguf_decode_bytes(files[t], src)
            meta_file.write_text(json.dumps(meta, indent=2))
    return {"dir": str(out), "files": {t: str(f) for t, f in files.items()}, "cost": meta}


def gguf_decode_bytes(path: Path, src: Path) -> dict[str, Any]:
    """Bytes of weights a decoded token reads from a GGUF: every tensor except the per-layer embedding
    table (one row gathered per token) and the K/V projections of KV-shared layers (never used); the
    tied token embedding counts in full (it is the LM head)."""
    sys.path.insert(0, str(src / "gguf-py"))
    try:
        from gguf import GGUFReader  # the vendored gguf-py
    finally:
        sys.path.remove(str(src / "gguf-py"))
    reader = GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}

    def scalar(suffix: str) -> int | None:
        for name, f in fields.items():
            if name.endswith(suffix) and f.data:
                return int(f.parts[f.data[0]][0])
        return None

    n_layer, shared = scalar(".block_count") or 0, scalar(".attention.shared_kv_layers") or 0
    first_shared = n_layer - shared
    total = skipped = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        nbytes = int(t.n_bytes)
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + nbytes
        parts = t.name.split(".")
        shared_kv = (
            parts[0] == "blk" and int(parts[1]) >= first_shared and parts[2] in ("attn_k", "attn_v", "attn_k_norm")
        )
        if t.name.startswith("per_layer_token_embd") or shared_kv:
            skipped += nbytes
            continue
        total += nbytes
    return {
        "decode_bytes": total,
        "skipped_bytes": skipped,
        "bytes_by_type": types,
        "n_layer": n_layer,
        "shared_kv_layers": shared,
    }


# --- 4. engines ------------------------------------------------------------------------------------------


def run_llamabench(bench: Path, gguf: Path, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """llama-bench on one GGUF: pp`prompt` and tg`decode`, best of its repetitions (samples_ts)."""
    out = out_dir / f"llama-bench-{gguf.stem}.json"
    cmd = [
        str(bench),
        "-m",
        str(gguf),
        "-p",
        str(args.prompt),
        "-n",
        str(args.decode),
        "-t",
        str(args.threads),
        "-r",
        str(args.repeats),
        "-o",
        "json",
    ]
    log(" ".join(cmd))
    r = run_measured(cmd, stdout_path=out, timeout=args.engine_timeout)
    res: dict[str, Any] = {"peak_rss_gb": r["peak_rss_gb"], "wall_s": r["wall_s"], "cmd": cmd}
    try:
        tests = json.loads(out.read_text())
    except (OSError, ValueError):
        tests = []
    finally:
        out.unlink(missing_ok=True)
    if r["rc"] != 0 or not tests:
        res["error"] = f"llama-bench failed (rc {r['rc']})"
        return res
    res["llama_bench"] = tests
    for t in tests:
        samples = t.get("samples_ts") or [t.get("avg_ts")]
        key = "prefill" if t.get("n_prompt") and not t.get("n_gen") else "decode"
        res[key] = {
            "tps": max(samples),
            "avg_tps": t.get("avg_ts"),
            "stddev_tps": t.get("stddev_ts"),
            "tokens": t.get("n_prompt") or t.get("n_gen"),
            "samples_tps": samples,
        }
    first = tests[0]
    res["build"] = {
        k: first.get(k)
        for k in (
            "build_commit",
            "build_number",
            "cpu_info",
            "backends",
            "type_k",
            "n_threads",
            "n_batch",
            "n_ubatch",
            "flash_attn",
            "model_type",
            "model_size",
            "model_n_params",
        )
    }
    return res


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh process: one engine of ours ("ours:<scheme>") or transformers ("hf:<dtype>")."""
    import bench_text  # make_prompt, load_hf: the bench_text engines, not a second copy
    import torch

    torch.set_num_threads(args.threads)
    kind, _, scheme = args.worker.partition(":")
    ckpt = args.checkpoint
    vocab = bench_text.vocab_size(ckpt)
    short, long = bench_text.make_prompt(8, seed=7, vocab=vocab), bench_text.make_prompt(args.prompt, vocab=vocab)
    res: dict[str, Any] = {"engine": args.worker, "threads": args.threads}
    t0 = time.perf_counter()
    if kind == "ours":
        import gemma3n
        from gemma3n.placement import placement_report

        model = gemma3n.load(ckpt, quantize=OURS[scheme])  # dtype as stored (bf16)
        res["load_s"] = time.perf_counter() - t0
        res["decode_bytes"] = placement_report(model.decoder).device_bytes  # weights on the decode path
        res["weight_dtype"] = scheme

        def gen(prompt: list[int], n: int) -> dict[str, Any]:
            t = time.perf_counter()
            pieces = list(model.stream(prompt, max_tokens=n, temperature=0.0))
            total = time.perf_counter() - t
            stats = pieces[-1].stats or {}
            done = stats.get("generated_tokens") or n
            return {
                "ttft_s": stats.get("ttft_s", total if n == 1 else None),
                "total_s": total,
                "tokens": done,
                "decode_tps": stats.get("generation_tps"),
                "stats": stats,
            }
    else:
        gen_hf, info = bench_text.load_hf(ckpt, f"hf-{scheme}", "cpu", args.hf_attn)
        res["load_s"] = time.perf_counter() - t0
        res.update(info)

        def gen(prompt: list[int], n: int) -> dict[str, Any]:
            r = gen_hf(prompt, n)
            steps = len(r["tokens"]) - 1
            dec = steps / (r["total_s"] - r["ttft_s"]) if steps else None
            return {"ttft_s": r["ttft_s"], "total_s": r["total_s"], "tokens": len(r["tokens"]), "decode_tps": dec}

    res["rss_after_load_gb"] = common.rss_gb()
    print(f"[{args.worker}] loaded in {res['load_s']:.1f} s, RSS {res['rss_after_load_gb']:.2f} GB", flush=True)
    gen(short, 2)  # warm-up (allocator, kernels, lazy init), as llama-bench does
    best: dict[str, Any] | None = None
    for _ in range(args.repeats):  # best of: neighbours only ever slow a run down
        r = gen(long, 1)  # prompt forward + the last position's logits + one sampled token
        if best is None or r["ttft_s"] < best["ttft_s"]:
            best = r
    res["prefill"] = {"tps": args.prompt / best["ttft_s"], "seconds": best["ttft_s"], "tokens": args.prompt}
    print(f"[{args.worker}] prefill {args.prompt}: {res['prefill']['tps']:.1f} tok/s", flush=True)
    best = None
    for _ in range(args.repeats):
        r = gen(short, args.decode + 1)  # the first token ends the prefill; `decode` steps after it
        if r["decode_tps"] and (best is None or r["decode_tps"] > best["decode_tps"]):
            best = r
    if best is not None:
        res["decode"] = {"tps": best["decode_tps"], "tokens": best["tokens"] - 1, "prompt": len(short)}
        print(f"[{args.worker}] decode {best['tokens'] - 1}: {best['decode_tps']:.2f} tok/s", flush=True)
    res["peak_rss_self_gb"] = common.peak_rss_gb()
    return res


def run_worker(engine: str, ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        engine,
        "--result",
        str(result),
        "--checkpoint",
        str(ckpt),
        "--prompt",
        str(args.prompt),
        "--decode",
        str(args.decode),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--hf-attn",
        args.hf_attn,
    ]
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    r = run_measured(cmd, env=env, timeout=args.engine_timeout)
    try:
        res = json.loads(result.read_text())
    except (OSError, ValueError):
        res = {"error": f"worker failed (rc {r['rc']}{', timed out' if r['timed_out'] else ''})"}
    finally:
        result.unlink(missing_ok=True)
    res.update(engine=engine, peak_rss_gb=r["peak_rss_gb"], wall_s=r["wall_s"])
    return res


# --- the driver -----------------------------------------------------------------------------------------


def read_bandwidth(cached: bool) -> float:
    """Read GB/s by gemma3n.hardware: the cached probe, or measured now (``measure()``: what ``probe()``
    caches; the cache is left as it is)."""
    from gemma3n import hardware

    return (hardware.probe() if cached else hardware.measure()).read_gb_s


def summarize(results: list[dict], bw: float) -> tuple[list[dict], list[str]]:
    rows = []
    for r in results:
        row: dict[str, Any] = {"engine": r["engine"], "weights": r.get("weights"), "note": r.get("error")}
        row["prefill"] = (r.get("prefill") or {}).get("tps")
        row["decode"] = (r.get("decode") or {}).get("tps")
        row["gb_token"] = r["decode_bytes"] / 1e9 if r.get("decode_bytes") else None
        row["bound"] = bw * 1e9 / r["decode_bytes"] if r.get("decode_bytes") else None
        row["of_bound"] = 100 * row["decode"] / row["bound"] if row["decode"] and row["bound"] else None
        row["peak_rss_gb"] = r.get("peak_rss_gb")
        row["loadavg"] = r.get("loadavg")
        rows.append(row)
    by = {r["engine"]: r for r in rows}
    lines = []
    for ours, theirs in MATCH.items():
        a, b = by.get(f"ours:{ours}"), by.get(f"llama.cpp:{theirs}")
        if not a or not b:
            continue
        parts = [f"{k} {a[k] / b[k]:.2f}x" for k in ("prefill", "decode") if a.get(k) and b.get(k)]
        if parts:
            a["vs_prefill"] = a["prefill"] / b["prefill"] if a.get("prefill") and b.get("prefill") else None
            a["vs_decode"] = a["decode"] / b["decode"] if a.get("decode") and b.get("decode") else None
            lines.append(f"ours {ours} / llama.cpp {theirs.upper()}: " + ", ".join(parts))
    hf = [r for r in rows if r["engine"].startswith("hf:") and r.get("prefill")]
    if hf and by.get("ours:bf16", {}).get("prefill"):
        fastest = max(hf, key=lambda r: r["prefill"])
        lines.append(
            f"ours bf16 / transformers {fastest['engine'][3:]} (its fastest prefill): prefill "
            f"{by['ours:bf16']['prefill'] / fastest['prefill']:.2f}x"
        )
    return rows, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="layers of the random E2B-width checkpoint (10)")
    ap.add_argument("--checkpoint", default=None, help="use this HF-layout checkpoint instead (never written to)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens (llama-bench -p)")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens (llama-bench -n)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (llama-bench -r)")
    ap.add_argument("--only", default="llamacpp,ours,transformers", help="engines: llamacpp,ours,transformers")
    ap.add_argument("--gguf", default=",".join(GGUF_TYPES), help="llama.cpp weights (bf16,q8_0,q4_0)")
    ap.add_argument("--ours", default=",".join(OURS), help="our schemes (bf16,int8,int4:32)")
    ap.add_argument("--hf", default=",".join(HF_DTYPES), help="transformers dtypes (bf16,fp32)")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--skip-build", action="store_true", help="use the cached llama.cpp build, never build")
    ap.add_argument("--prepare-only", action="store_true", help="build, checkpoint and GGUF files; no timing")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the one-time build")
    ap.add_argument("--cache", default=None, help="cache dir (default ~/.cache/gemma3n/llamacpp/<version>)")
    ap.add_argument("--bandwidth", type=float, default=None, help="pin the read bandwidth (GB/s) of the bound")
    ap.add_argument(
        "--cached-probe",
        action="store_true",
        help="bandwidth from gemma3n.hardware.probe()'s per-machine cache (default: measure now)",
    )
    ap.add_argument("--engine-timeout", type=float, default=3600, help="seconds per engine")
    ap.add_argument("--tag", default="", help="free text stored in the JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if only - {"llamacpp", "ours", "transformers"}:
        ap.error(f"--only takes llamacpp, ours, transformers; got {args.only!r}")
    cache = cache_root(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ggufs: dict[str, Any] | None = None
    bins = binaries(cache)
    if "llamacpp" in only:
        bins = build_llamacpp(cache, args.jobs, args.skip_build)
    ckpt = Path(args.checkpoint).resolve() if args.checkpoint else make_checkpoint(cache, args.layers or 10)
    tc = common.text_config_of(json.loads((ckpt / "config.json").read_text()))
    layers = tc["num_hidden_layers"]
    if args.checkpoint and args.layers and layers != args.layers:
        log(f"--checkpoint has {layers} layers; --layers {args.layers} ignored")
    if "llamacpp" in only:
        ggufs = make_ggufs(cache, ckpt, layers, bins, args.threads)
        for t, meta in ggufs["cost"].items():
            if t in GGUF_TYPES:
                log(
                    f"{t.upper()}: {meta['bytes'] / 1e9:.2f} GB, made in {meta['wall_s']:.0f} s at "
                    f"{meta['peak_rss_gb']:.2f} GB peak RSS"
                )
    if args.prepare_only:
        return 0

    import torch

    from gemma3n import hardware

    torch.set_num_threads(args.threads)  # the probe measures with the engines' thread count
    cpu = hardware.cpu_info()
    bw_runs = [] if args.bandwidth else [read_bandwidth(args.cached_probe)]
    bw = args.bandwidth or bw_runs[0]
    log(
        f"cpu: {cpu.model}, {cpu.cores} cores ({', '.join(cpu.notable())}); read bandwidth {bw:.1f} GB/s "
        f"({'pinned' if args.bandwidth else 'gemma3n.hardware'}); {args.threads} threads"
    )
    log(f"checkpoint {ckpt}: {layers} layers ({tc.get('num_kv_shared_layers')} KV-shared)")
    decode_params = common.decode_weight_params(tc)["total"]

    import bench_text  # mem_available_gb, _stored_params

    results: list[dict[str, Any]] = []
    out_dir = Path(common.OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ggufs is not None:
        for t in [x for x in args.gguf.split(",") if x]:
            log(f"[llama.cpp {t.upper()}] running ...")
            load = os.getloadavg()[0]
            res = run_llamabench(bins["llama-bench"], Path(ggufs["files"][t]), args, out_dir)
            res.update(engine=f"llama.cpp:{t}", weights=t.upper(), loadavg=load, **ggufs["cost"][t]["read"])
            results.append(res)
    engines = []
    if "ours" in only:
        engines += [f"ours:{s}" for s in args.ours.split(",") if s]
    if "transformers" in only:
        engines += [f"hf:{d}" for d in args.hf.split(",") if d]
    stored = bench_text._stored_params(str(ckpt))
    for e in engines:
        if e == "hf:fp32":  # fp32 weights plus the conversion transient (~1.6x)
            need, avail = stored * 4 * 1.6 / 1e9, bench_text.mem_available_gb()
            if need > avail - 1.5:
                log(f"[{e}] skipped: needs ~{need:.1f} GB, {avail:.1f} GB available")
                results.append({"engine": e, "error": f"skipped: needs ~{need:.1f} GB"})
                continue
        log(f"[{e}] running ...")
        load = os.getloadavg()[0]
        res = run_worker(e, ckpt, args)
        res["loadavg"] = load
        if e.startswith("hf:"):
            res["weights"] = e[3:]
            res["decode_bytes"] = decode_params * (4 if e == "hf:fp32" else 2)
        else:
            res["weights"] = e[5:]
        results.append(res)

    if not args.bandwidth and not args.cached_probe:  # neighbours only ever lower it: keep the best
        bw_runs.append(read_bandwidth(False))
        bw = max(bw_runs)
        log(f"read bandwidth after the engines {bw_runs[-1]:.1f} GB/s; bound from {bw:.1f} GB/s")
    rows, ratios = summarize(results, bw)
    cols = [
        ("engine", "engine"),
        ("prefill", f"prefill {args.prompt} tok/s"),
        ("decode", f"decode tok/s ({args.decode})"),
        ("gb_token", "GB read/token"),
        ("bound", "bound tok/s"),
        ("of_bound", "% of bound"),
        ("peak_rss_gb", "peak RSS GB"),
        ("vs_prefill", "prefill / llama.cpp"),
        ("vs_decode", "decode / llama.cpp"),
        ("loadavg", "load avg"),
    ]
    if any(r.get("note") for r in rows):
        cols.append(("note", "note"))
    print()
    print(
        f"{cpu.model}, {args.threads} threads, read {bw:.1f} GB/s; {ckpt.name}: {layers} layers; best of "
        f"{args.repeats}; load avg {os.getloadavg()[0]:.1f}"
    )
    table = common.print_table(rows, cols)
    for line in ratios:
        print(line)
    data = {
        "args": vars(args),
        "machine": common.machine_info(),
        "cpu": {
            "model": cpu.model,
            "cores": cpu.cores,
            "features": cpu.notable(),
            "torch_capability": cpu.torch_capability,
        },
        "bandwidth_gbps": bw,
        "bandwidth_source": "pinned" if args.bandwidth else "gemma3n.hardware",
        "bandwidth_runs_gbps": bw_runs,
        "checkpoint": str(ckpt),
        "layers": layers,
        "decode_weight_params": decode_params,
        "gguf": ggufs,
        "results": results,
        "rows": rows,
        "ratios": ratios,
        "table": table,
        "loadavg_end": os.getloadavg(),
    }
    print(f"wrote {common.write_json('bench_llamacpp', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
