"""Requests per second and time to first token of the OpenAI server under concurrent clients.

Starts the server on a loopback port with the embedded model (or --model), then for each
client count runs that many threads, each making at most --requests streaming chat requests
with the official openai client; a level also stops starting requests after --seconds.

    python bench/bench_server.py                      # 1, 4, 16 clients, embedded model
    python bench/bench_server.py --clients 1 4 --requests 2 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai

import gemma3n
from gemma3n.server import BackgroundServer, create_app

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colors.",
    "What is a matryoshka doll?",
    "Say hello in French.",
]


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "latency": total, "tokens": tokens}


def run_level(
    base_url: str, model: str, clients: int, requests: int, seconds: float, max_tokens: int
) -> dict[str, float]:
    deadline = time.perf_counter() + seconds
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
        for i in range(requests):
            if time.perf_counter() > deadline:
                break
            r = one_request(client, model, PROMPTS[(k + i) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(results) / wall, 3),
        "gen_tok_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_max_ms": round(1000 * ttfts[-1], 1),
        "latency_mean_ms": round(1000 * statistics.fmean(r["latency"] for r in results), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="path or hub id (default: the embedded model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level (bound)")
    ap.add_argument("--seconds", type=float, default=30.0, help="per-level time bound")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print one JSON object per level")
    args = ap.parse_args()

    model = gemma3n.load(args.model)
    app = create_app(model, max_queue=max(args.clients) + 1)
    with BackgroundServer(app) as srv:
        model_id = openai.OpenAI(base_url=srv.base_url, api_key="bench").models.list().data[0].id
        one_request(openai.OpenAI(base_url=srv.base_url, api_key="bench"), model_id, PROMPTS[0], 4)  # warm-up
        print(f"model {model_id} on {srv.url}, max_tokens {args.max_tokens}, one generation thread")
        if not args.json:
            print(f"{'clients':>7} {'reqs':>5} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>10} {'TTFT max':>10}")
        for clients in args.clients:
            row = run_level(srv.base_url, model_id, clients, args.requests, args.seconds, args.max_tokens)
            if args.json:
                print(json.dumps(row))
            else:
                cells = (row["clients"], row["requests"], row["req_per_s"], row["gen_tok_per_s"])
                print("{:>7} {:>5} {:>7.2f} {:>7.1f}".format(*cells), end="")
                print(f" {row['ttft_p50_ms']:>8.1f}ms {row['ttft_max_ms']:>8.1f}ms")


if __name__ == "__main__":
    main()
