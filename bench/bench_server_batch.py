"""Continuous batching in the server: aggregate decode tok/s and inter-token latency with 1, 4
and 8 concurrent streaming clients, and the time to first token of a request that arrives while
others stream (gemma3n serve --max-batch).

    python bench/bench_server_batch.py --model /work/ckpt/e2b-l10 --threads 2 --clients 1 4 8

Starts `gemma3n serve` in its own process on a loopback port; every client streams one
completion of --max-tokens tokens from its own prompt (token ids, lengths differing by a few).
Prints a table (and JSON to bench/out/), naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: arrival time of every token chunk."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    t0 = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", url, json=body, timeout=3600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    arrivals.append(time.perf_counter() - t0)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {
        "ttft": arrivals[0] if arrivals else None,
        "end": time.perf_counter() - t0,
        "tokens": len(arrivals),
        "gaps": gaps,
    }


def level(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    results: list[dict] = [{}] * len(prompts)

    def run(i: int) -> None:
        results[i] = stream(url, prompts[i], max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    # decode rate: tokens after each stream's first, over the span where all streams decode
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "clients": len(prompts),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "decode_tok_s": len(prompts) / statistics.median(gaps) if gaps else None,
        "inter_token_ms_p50": 1000 * statistics.median(gaps) if gaps else None,
        "ttft_ms_p50": 1000 * statistics.median(r["ttft"] for r in results),
    }


def late_arrival(url: str, prompts: list[list[int]], late: list[int], max_tokens: int) -> dict:
    """TTFT of a request that arrives while `prompts` stream, against its TTFT alone."""
    alone = stream(url, late, 2)["ttft"]
    threads = [threading.Thread(target=stream, args=(url, p, max_tokens)) for p in prompts]
    for t in threads:
        t.start()
    time.sleep(1.0)
    mid = stream(url, late, 2)
    for t in threads:
        t.join()
    return {"ttft_alone_ms": 1000 * alone, "ttft_mid_stream_ms": 1000 * mid["ttft"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()

    import torch

    from gemma3n.hardware import cpu_info

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "gemma3n.cli",
        "serve",
        "--port",
        str(port),
        "--max-batch",
        str(a.max_batch),
        "--prompt-cache-slots",
        "0",
    ] + (["--model", a.model] if a.model else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}  # torch's intra-op threads
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        url = f"{base}/v1/completions"
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 4000, (a.prompt + 3 * i,), generator=gen).tolist() for i in range(max(a.clients))]
        stream(url, prompts[0], 4)  # warm-up
        rows = [level(url, prompts[:c], a.max_tokens) for c in a.clients]
        for r in rows:
            print(
                f"{r['clients']} clients: {r['decode_tok_s']:.2f} decode tok/s aggregate, inter-token "
                f"{r['inter_token_ms_p50']:.0f} ms",
                flush=True,
            )
        late = late_arrival(url, prompts[1 : min(4, len(prompts))], prompts[0], a.max_tokens)
    finally:
        server.terminate()
        server.wait(timeout=30)
    one = rows[0]
    for r in rows:
        r["vs_one"] = r["decode_tok_s"] / one["decode_tok_s"]
        r["latency_vs_one"] = r["inter_token_ms_p50"] / one["inter_token_ms_p50"]
    print(f"\n{cpu_info().model}, {a.threads} threads, --max-batch {a.max_batch}, model {a.model or 'embedded'}\n")
    common.print_table(
        rows,
        [
            ("clients", "clients"),
            ("decode_tok_s", "aggregate decode tok/s"),
            ("vs_one", "vs one client"),
            ("inter_token_ms_p50", "inter-token ms p50"),
            ("latency_vs_one", "latency vs one"),
            ("ttft_ms_p50", "TTFT ms p50"),
        ],
    )
    print(
        f"\nTTFT of a request arriving mid-stream: {late['ttft_mid_stream_ms']:.0f} ms "
        f"(alone: {late['ttft_alone_ms']:.0f} ms)"
    )
    data = {
        "machine": common.machine_info(),
        "args": vars(a),
        "rows": rows,
        "late_arrival": late,
        "load_avg": os.getloadavg(),
    }
    print("wrote", common.write_json("server_batch", data))


if __name__ == "__main__":
    main()
