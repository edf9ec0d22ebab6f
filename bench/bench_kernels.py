"""Decode matrix-vector kernels at E2B shapes: GB/s of weight bytes read, against the machine's
read bandwidth, for the native kernels (gemma3n/kernels) and PyTorch's own, at 1-8 rows.

    python bench/bench_kernels.py --threads 2 [--rows 1 4 8] [--isa auto]

Each case cycles through enough distinct weights (>= 1.5 GB) that none is in a cache when it
is read again, as in a real decode step. Prints a table (and writes JSON to bench/out/) with
ms per product, GB/s and % of the read bandwidth (bench.common.measure_bandwidth, same threads).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common  # noqa: E402
from gemma3n import kernels  # noqa: E402
from gemma3n import quantize as qz  # noqa: E402
from gemma3n.hardware import cpu_info  # noqa: E402

# E2B decode shapes [N, K]: q/o, gate/up, down, k/v, and the tied LM head
SHAPES = {
    "q/o": (2048, 2048),
    "gate/up": (8192, 2048),
    "down": (2048, 8192),
    "k/v": (512, 2048),
    "head": (262144, 2048),
}
STREAM_BYTES = 1.5e9


def _time(fn, items: list, reps: int = 3) -> float:
    """Best-of-`reps` seconds per call, cycling through `items` (weights not in cache)."""
    fn(items[0])
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, (time.perf_counter() - t) / len(items))
    return best


def _weights(kind: str, n: int, k: int, count: int, group: int) -> list:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, k, generator=gen) * 0.02
    out = []
    for i in range(count):
        w = torch.roll(base, i, 0)  # distinct memory, same statistics
        if kind == "bf16":
            out.append(w.bfloat16())
        elif kind == "int8":
            out.append(qz.quantize_int8(w))
        else:
            out.append(qz.quantize_int4(w, group))
    return out


def _nbytes(kind: str, n: int, k: int, group: int) -> int:
    return {"bf16": 2 * n * k, "int8": n * k + 2 * n, "int4": n * k // 2 + 4 * n * (k // group)}[kind]


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    native = kernels.get()
    isa = kernels.ISA[a.isa]
    bw = common.measure_bandwidth(a.threads, size_gb=1.0, repeats=5)["sum_gbps"]
    rows = []
    for kind in a.kinds:
        for name, (n, k) in SHAPES.items():
            nb = _nbytes(kind, n, k, a.group)
            count = max(2, int(STREAM_BYTES // nb))
            ws = _weights(kind, n, k, count, a.group)
            for m in a.rows:
                x = torch.randn(m, k)
                cases = {}
                if native is not None:
                    if kind == "bf16":
                        cases["native"] = lambda w, x=x: native.linear_bf16(x, w, None, isa)
                    elif kind == "int8":
                        cases["native"] = lambda w, x=x: native.linear_int8(x, w[0], w[1], None, isa)
                    else:
                        cases["native"] = lambda w, x=x: native.linear_int4(x, w[0], w[1], a.group, None, isa)
                xb = x.bfloat16()
                if kind == "bf16":
                    cases["torch"] = lambda w, xb=xb: F.linear(xb, w)
                elif kind == "int8" and k % 16 == 0:
                    cases["torch"] = lambda w, xb=xb: torch._weight_int8pack_mm(xb, w[0], w[1])
                for path, fn in cases.items():
                    s = _time(fn, ws)
                    rows.append(
                        {
                            "weights": kind,
                            "shape": f"{name} {n}x{k}",
                            "rows": m,
                            "path": path,
                            "ms": s * 1e3,
                            "gbps": nb / s / 1e9,
                            "pct_bw": 100 * nb / s / 1e9 / bw,
                        }
                    )
                    print(f"{kind} {name} m={m} {path}: {s * 1e3:.3f} ms, {nb / s / 1e9:.1f} GB/s", flush=True)
            del ws
            gc.collect()
    cpu = cpu_info()
    print(
        f"\n{cpu.model}, {a.threads} threads, read bandwidth {bw:.1f} GB/s, native body "
        f"{native.isa_name(isa) if native else 'unavailable: ' + kernels.status()}\n"
    )
    cols = [
        ("weights", "weights"),
        ("shape", "shape"),
        ("rows", "rows"),
        ("path", "path"),
        ("ms", "ms"),
        ("gbps", "GB/s"),
        ("pct_bw", "% of read bw"),
    ]
    common.print_table(rows, cols)
    data = {
        "machine": common.machine_info(),
        "cpu_flags": cpu.notable(),
        "threads": a.threads,
        "read_gbps": bw,
        "rows": rows,
    }
    print("wrote", common.write_json("kernels", data))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--kinds", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--group", type=int, default=32, choices=qz.GROUP_SIZES)
    ap.add_argument("--isa", default="auto", choices=list(kernels.ISA))
    run(ap.parse_args())


if __name__ == "__main__":
    main()
