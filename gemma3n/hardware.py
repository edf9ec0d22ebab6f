"""What the machine can do, and the compute policy chosen from it.

The policy answers three questions for every module (text decoder, audio and vision towers):
- the activations' dtype (`choose_compute_dtype`): fp32 on a CPU for half-precision weights,
  so norms, residual streams and softmax never round to 8 mantissa bits;
- the dtype of a large matmul over half-precision weights (`gemm_dtype`): bf16 where the CPU
  has bf16 dot-product units (AVX512-BF16, AMX), since there bf16 GEMM runs 2.5-10x faster
  than fp32 (the inputs are rounded to bf16 and products accumulate in fp32); fp32 elsewhere,
  where a bf16 GEMM is emulated and 5-20x slower than fp32 (the weight is then widened into a
  scratch buffer, layers.converted);
- the decode path (kernels/): weight-streaming native kernels when they built, else PyTorch's.

CPU features come from /proc/cpuinfo (Linux); where that says nothing (another OS, another
architecture) the GEMM choice falls back to a short measured probe. `probe()` also measures
the read bandwidth that bounds decode. Its results are cached per machine (CPU model, core
count, torch version) under ~/.cache/gemma3n. GEMMA3N_GEMM_DTYPE=fp32|bf16 overrides the choice.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import kernels
from .errors import InputError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# ISA extensions worth naming in a report, in the spelling of /proc/cpuinfo
NOTABLE = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "avx512_fp16",
    "asimd",
    "sve",
)
BF16_UNITS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    flags: frozenset[str]  # empty when the OS does not tell
    torch_capability: str  # what PyTorch's own kernels dispatch to (e.g. AVX512, AVX2, DEFAULT)

    @property
    def known(self) -> bool:
        return bool(self.flags)

    @property
    def bf16_units(self) -> bool:
        return any(f in self.flags for f in BF16_UNITS)

    def notable(self) -> list[str]:
        return [f for f in NOTABLE if f in self.flags]


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CpuInfo(model=model, cores=os.cpu_count() or 1, flags=flags, torch_capability=capability)


# --- measured probe ------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    read_gb_s: float  # streaming read bandwidth (sum over 512 MiB), all threads
    fp32_gflops: float  # [512, 2048] x [2048, 2048] fp32 GEMM
    bf16_gflops: float  # the same in bf16
    threads: int


def _cache_file() -> Path:
    info = cpu_info()
    key = hashlib.sha256(f"{info.model}|{info.cores}|{torch.__version__}|{torch.get_num_threads()}".encode())
    root = os.environ.get("GEMMA3N_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma3n"
    )
    return Path(root) / f"hardware-{key.hexdigest()[:12]}.json"


def _best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure() -> Probe:
    """About a second: read bandwidth and the two GEMM rates on this machine, now."""
    big = torch.ones(2**27, dtype=torch.float32)  # 512 MiB: far beyond any cache
    read = big.numel() * 4 / _best_of(big.sum, 3)
    del big
    a, b = torch.randn(512, 2048), torch.randn(2048, 2048)
    flops = 2 * 512 * 2048 * 2048
    fp32 = flops / _best_of(lambda: a @ b, 3)
    ab, bb = a.bfloat16(), b.bfloat16()
    bf16 = flops / _best_of(lambda: ab @ bb, 2)
    return Probe(read / 1e9, fp32 / 1e9, bf16 / 1e9, torch.get_num_threads())


def probe(refresh: bool = False) -> Probe:
    """The measured probe, from the per-machine cache when there is one."""
    file = _cache_file()
    if not refresh:
        try:
            return Probe(**json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            pass
    result = measure()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(asdict(result)), encoding="utf-8")
    except OSError:
        pass  # a read-only home: measure again next time
    return result


# --- the policy ----------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def choose_compute_dtype(device: torch.device, weight_dtype: torch.dtype, requested=None) -> torch.dtype:
    """The activations' dtype: fp32 on a CPU for half-precision weights (large matmuls still
    run in `gemm_dtype`); GPUs, and an explicit request (e.g. to reproduce the reference's bf16
    roundings), use the given dtype."""
    if requested not in (None, "auto"):
        return resolve_dtype(requested)
    if device.type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight_dtype


def tower_compute_dtype(device: torch.device, weight_dtype: torch.dtype, requested=None) -> torch.dtype:
    """The activations' dtype of the vision tower: on a CPU with half-precision weights, the GEMM
    dtype, so that bf16 activations feed the bf16 GEMMs and convolutions with no cast between
    them (bf16 where the CPU has bf16 units, fp32 elsewhere); fp32 weights stay fp32; GPUs and
    explicit requests as `choose_compute_dtype`. (The audio encoder keeps fp32 activations and
    writes only its matmuls' inputs in `gemm_dtype`, so that its chunked attention, with logits
    up to the cap of 50, and its cumulative group norm keep fp32 precision.)"""
    if requested in (None, "auto") and device.type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16):
        return cpu_half_gemm_dtype()
    return choose_compute_dtype(device, weight_dtype, requested)


@lru_cache(maxsize=1)
def cpu_half_gemm_dtype() -> torch.dtype:
    """The dtype a CPU matmul of fp32 activations with bf16 weights runs in (see module doc)."""
    forced = os.environ.get("GEMMA3N_GEMM_DTYPE")
    if forced:
        dtype = resolve_dtype(forced)
        if dtype not in (torch.float32, torch.bfloat16):
            raise InputError(f"GEMMA3N_GEMM_DTYPE must be fp32 or bf16, got {forced!r}")
        return dtype
    info = cpu_info()
    if info.known and platform.machine().lower() in ("x86_64", "amd64"):
        return torch.bfloat16 if info.bf16_units else torch.float32
    p = probe()  # flags say nothing here: measure once
    return torch.bfloat16 if p.bf16_gflops > 1.2 * p.fp32_gflops else torch.float32


def gemm_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a many-row matmul of fp32 activations with `weight_dtype` weights."""
    if device.type == "cpu" and weight_dtype == torch.bfloat16:
        return cpu_half_gemm_dtype()
    return torch.float32 if weight_dtype == torch.float16 and device.type == "cpu" else weight_dtype


def report(decode_bytes: int | None = None) -> list[str]:
    """`gemma3n info --hardware`: features, measurements, choices and (given the bytes a decoded
    token reads) the decode bound."""
    info, p = cpu_info(), probe()
    lines = [
        f"cpu: {info.model}, {info.cores} cores, torch kernels {info.torch_capability}, "
        f"{torch.get_num_threads()} threads",
        "features: " + (", ".join(info.notable()) or "(not reported by this OS)"),
        f"measured: read {p.read_gb_s:.1f} GB/s, GEMM fp32 {p.fp32_gflops:.0f} GFLOP/s, "
        f"bf16 {p.bf16_gflops:.0f} GFLOP/s ({p.threads} threads; cached in {_cache_file()})",
        f"prefill / tower matmuls over bf16 weights: {str(cpu_half_gemm_dtype()).removeprefix('torch.')}"
        + (" (bf16 units)" if info.bf16_units else " (no bf16 units)" if info.known else " (measured)"),
        f"decode matrix-vector products: {kernels.status()}",
    ]
    if decode_bytes:
        bound = p.read_gb_s * 1e9 / decode_bytes
        lines.append(f"decode bound for this model: {bound:.1f} tok/s ({decode_bytes / 1e9:.2f} GB read per token)")
    return lines
