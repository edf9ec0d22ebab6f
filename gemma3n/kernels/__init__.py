"""Native decode kernels (decode.cpp), compiled once per machine and cached, with a fallback.

Decode multiplies a few activation rows by every weight of the model, so it runs at the speed
weights stream from memory. PyTorch's own CPU paths for this shape read bf16 well below the
bandwidth (bench/README.md, "Decode products"), and its int8 / int4 kernels are compute bound
or wrong on some CPUs (an int8 weight that is not 16-byte aligned crashes `_weight_int8pack_mm`
on AVX-512, K not a multiple of 16 gives garbage). decode.cpp widens bf16 / int8 / int4 codes in
registers and accumulates in fp32, with AVX-512 and AVX2 bodies chosen at run time.

Built with `torch.utils.cpp_extension` (a C++ compiler and ninja) the first time it is needed,
into a cache keyed by the source, torch and Python versions: `scripts/setup.sh` builds it at
install (`python -m gemma3n.kernels`). Without a compiler, or with GEMMA3N_NATIVE=0, `get()`
returns None and callers use PyTorch's kernels (correct everywhere, slower).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent
# the weight products (bf16/fp32, int8/int4) and their Python entry points; the fused decode step;
# the towers' fused norm epilogues (torch.ops.gemma3n_towers)
SOURCES = (HERE / "decode.cpp", HERE / "decode_quant.cpp", HERE / "ops.cpp", HERE / "step.cpp", HERE / "towers.cpp")
HEADERS = (HERE / "kernels.h", HERE / "decode.h")
ISA = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3, "avx512bf16": 4}

_state: dict[str, object] = {}  # "module": ModuleType | None, "why": str


def cache_dir() -> Path:
    root = os.environ.get("GEMMA3N_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma3n"
    )
    return Path(root) / "kernels"


def _build_key() -> str:
    import torch

    h = hashlib.sha256()
    for f in (*SOURCES, *HEADERS):
        h.update(f.read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{sysconfig.get_platform()}".encode())
    return h.hexdigest()[:16]


def why_unavailable() -> str | None:
    """Why the kernels cannot be built here (None if they can be)."""
    if os.environ.get("GEMMA3N_NATIVE", "1") == "0":
        return "disabled by GEMMA3N_NATIVE=0"
    missing = [f.name for f in (*SOURCES, *HEADERS) if not f.exists()]
    if missing:
        return f"kernel sources missing: {', '.join(missing)}"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler on PATH"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if not shutil.which("ninja"):
            return "ninja is not installed (pip install ninja)"
    return None


def get(build: bool = True, notify=None) -> ModuleType | None:
    """The compiled kernels, or None (see `status()`). Builds them the first time if `build`;
    `notify(message)` is told before a build starts (it takes ~20-60 s)."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    why = why_unavailable()
    module = None
    if why is None:
        module, why = _load(build, notify)
    if module is None and not build and why == "not built yet":
        return None  # not cached as final: a later call may build
    _state["module"], _state["why"] = module, why
    return module


def loaded() -> ModuleType | None:
    """The kernels if an earlier `get()` made them ready, else None: no lookup, no build (the
    per-call check in layers.matmul and quantize)."""
    return _state.get("module")  # type: ignore[return-value]


def disable(why: str) -> None:
    """Use PyTorch's kernels from now on in this process (a failed self-check, for example)."""
    _state["module"], _state["why"] = None, why


def status() -> str:
    """One line for `gemma3n info --hardware`."""
    module = get(build=False)
    if module is not None:
        return f"native ({module.isa_name(0)})"
    return f"PyTorch fallback ({_state.get('why') or why_unavailable() or 'not built yet'})"


def _load(build: bool, notify) -> tuple[ModuleType | None, str | None]:
    key = _build_key()
    where = cache_dir() / key
    name = f"gemma3n_decode_{key}"
    built = (where / f"{name}.so").exists()
    if not built and not build:
        return None, "not built yet"
    if not built and notify is not None:
        notify(f"building the native decode kernels once for this machine (about a minute) in {where}")
    try:
        where.mkdir(parents=True, exist_ok=True)
        module = _compile(name, where)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"build failed: {first[:200]}"
    return module, None


def _compile(name: str, where: Path) -> ModuleType:
    # the CUDA-less build is expected: keep cpp_extension's CUDA_HOME notice off the user's screen
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.cpp_extension as ext

    return ext.load(
        name=name,
        sources=[str(f) for f in SOURCES],
        extra_include_paths=[str(HERE)],
        extra_cflags=["-O3", "-fopenmp", "-DNDEBUG"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(where),
        verbose=False,
    )


def main() -> int:
    """`python -m gemma3n.kernels`: build (or find) the kernels and say which body runs."""
    t = time.perf_counter()
    module = get(build=True, notify=lambda m: print(f"gemma3n: {m}", file=sys.stderr))
    if module is None:
        print(f"gemma3n: native decode kernels unavailable ({_state.get('why')}); PyTorch's kernels will be used")
        return 0
    print(f"gemma3n: native decode kernels ready ({module.isa_name(0)}, {time.perf_counter() - t:.1f} s)")
    return 0
