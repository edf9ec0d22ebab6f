"""Shared helpers for the benchmarks: memory bandwidth, peak RSS, weight bytes, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


# --- memory ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (VmHWM, else ru_maxrss)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024 / 1e9


def rss_gb() -> float:
    """Current resident set size, in GB."""
    kb = _status_kb("VmRSS")
    return (kb or 0) * 1024 / 1e9


def cuda_peak_gb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return None


def measure_bandwidth(threads: int, size_gb: float = 1.0, repeats: int = 10) -> dict[str, float]:
    """Best-of-`repeats` memory bandwidth in GB/s with `threads` torch threads.

    - ``read``: ``x.sum()`` over an fp32 buffer of `size_gb` (bytes read / time). This is what a
      weight-streaming decoder step is bound by, so the decode bound uses it.
    - ``copy``: ``dst.copy_(src)`` counting read + write bytes (2 x size / time).
    - ``gemv``: ``F.linear`` of one fp32 row against the same buffer viewed as a [n/2048, 2048] weight:
      a weight-streaming matvec, often faster than ``sum`` here. ``read_gbps`` is the best of ``sum`` and
      ``gemv`` (the decode bound's bandwidth).
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = int(size_gb * 1e9) // 4
        src = torch.ones(n, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in
        weight = src[: n - n % 2048].view(-1, 2048)
        x = torch.ones(1, 2048)
        best_sum = best_copy = best_gemv = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            src.sum()
            best_sum = max(best_sum, n * 4 / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            dst.copy_(src)
            best_copy = max(best_copy, 2 * n * 4 / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            best_gemv = max(best_gemv, weight.numel() * 4 / (time.perf_counter() - t) / 1e9)
        return {
            "read_gbps": max(best_sum, best_gemv),
            "sum_gbps": best_sum,
            "gemv_gbps": best_gemv,
            "copy_gbps": best_copy,
            "size_gb": size_gb,
            "threads": threads,
        }
    finally:
        torch.set_num_threads(prev)


# --- model arithmetic (docs/text-decoder.md#parameter-counts) -----------------------------------------------------


def text_config_of(cfg: dict) -> dict:
    """The text config from a checkpoint's config.json (top-level `gemma3n` or bare `gemma3n_text`)."""
    return cfg.get("text_config", cfg)


def decode_weight_params(tc: dict) -> dict[str, int]:
    """Parameters read per decoded token, by group (docs/text-decoder.md#checkpoint-tensors).

    Counted: every layer weight except the shared layers' k_proj / v_proj / k_norm (never used:
    docs/text-decoder.md#kv-sharing),
    the 6 AltUp matrices, ``per_layer_model_projection``, the final norm, and the LM head = the full tied
    ``embed_tokens`` table (a [V, D] matvec). Not counted: the main embedding row and the per-layer-embedding
    rows (one gathered row each, negligible), the KV cache (small at short context).
    """
    d = tc["hidden_size"]
    p = tc["hidden_size_per_layer_input"]
    n = tc["num_hidden_layers"]
    hq, hkv, hd = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    r = tc["laurel_rank"]
    na = tc["altup_num_inputs"]
    inter = tc["intermediate_size"]
    inter = inter if isinstance(inter, list) else [inter] * n
    first_shared = n - tc.get("num_kv_shared_layers", 0)
    layers = 0
    for i in range(n):
        attn = 2 * hq * hd * d + hd  # q, o, q_norm
        if i < first_shared:
            attn += 2 * hkv * hd * d + hd  # k, v, k_norm
        mlp = 3 * d * inter[i]
        laurel = 2 * r * d + d
        ple = 2 * p * d + d
        altup = d + na * na + na * na * na + na * d + d
        norms = 4 * d
        layers += attn + mlp + laurel + ple + altup + norms
    glob = n * p * d + p + 2 * (na - 1) * d * d + d
    head = tc["vocab_size"] * d
    return {"layers": layers, "global": glob, "lm_head": head, "total": layers + glob + head}


# --- output -----------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], file=None) -> str:
    """Print `rows` (dicts) as a GitHub-markdown table with `columns` = [(key, header)]; return the text."""
    cells = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def write_json(name: str, data: dict, out_dir: str | None = None) -> str:
    out_dir = out_dir or OUT_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = int(f.readline().split()[1]) * 1024 / 1e9
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(OUT_DIR),
        ).stdout.strip()
    except OSError:
        pass
    return info
