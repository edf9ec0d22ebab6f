"""Requests per second and time to first token of the OpenAI server under concurrent clients.

Starts `gemma3n serve` (its own process) on a loopback port with the embedded model (or
--model), then for each client count runs that many threads, each making at most --requests
streaming chat requests with the official openai client; a level also stops starting requests
after --seconds. A first row, "direct", calls `model.stream` in-process: the floor the server
adds to.

    python bench/bench_server.py                      # 1, 4, 16 clients, embedded model
    python bench/bench_server.py --clients 1 4 --requests 2 --max-tokens 16

With --turns T, the first --clients value is instead a number of T-turn conversations, each
re-sending its history as chat clients do, their turns interleaved, once per --prompt-cache-slots
value: how much of each follow-up prompt the server takes from its prompt cache, and its TTFT.

    python bench/bench_server.py --clients 4 --turns 6 --slots 0 1 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import torch

import gemma3n
from gemma3n.server import BackgroundServer, create_app

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colors.",
    "What is a matryoshka doll?",
    "Say hello in French.",
]


def timed(pieces: Iterator[str], tokens_of: Callable[[Any], int | None]) -> dict[str, float]:
    """Time a stream of text pieces (or chunks): first non-empty text, end, completion tokens."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    for text, item in pieces:
        if ttft is None and text:
            ttft = time.perf_counter() - t0
        tokens = tokens_of(item) or tokens
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "latency": total, "tokens": tokens}


def via_server(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    def chunks() -> Iterator[tuple[str, Any]]:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for c in stream:
            yield (c.choices[0].delta.content or "") if c.choices else "", c

    return timed(chunks(), lambda c: c.usage.completion_tokens if c.usage else None)


def conversation_turn(client: openai.OpenAI, model: str, history: list[dict], max_tokens: int) -> dict[str, float]:
    """One streamed turn of a conversation; appends the reply and returns timing + cached tokens."""
    usage: dict[str, int] = {}

    def chunks() -> Iterator[tuple[str, Any]]:
        stream = client.chat.completions.create(
            model=model,
            messages=history,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for c in stream:
            if c.usage:
                usage["prompt"], usage["cached"] = c.usage.prompt_tokens, c.usage.prompt_tokens_details.cached_tokens
            text = (c.choices[0].delta.content or "") if c.choices else ""
            reply.append(text)
            yield text, c

    reply: list[str] = []
    row = timed(chunks(), lambda c: c.usage.completion_tokens if c.usage else None)
    history.append({"role": "assistant", "content": "".join(reply)})
    return {**row, "prompt_tokens": usage.get("prompt", 0), "cached_tokens": usage.get("cached", 0)}


def run_conversations(base_url: str, conversations: int, turns: int, max_tokens: int) -> dict:
    """`conversations` chats of `turns` turns, taken round-robin one request at a time (turns
    interleave as with several chat clients, but nothing queues, so TTFT is prefill + one token)."""
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    model_id = client.models.list().data[0].id
    histories = [[{"role": "system", "content": "Answer briefly."}] for _ in range(conversations)]
    results: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for t in range(turns):
        for k, history in enumerate(histories):
            history.append({"role": "user", "content": PROMPTS[(k + t) % len(PROMPTS)]})
            results.append({**conversation_turn(client, model_id, history, max_tokens), "turn": t})
    wall = time.perf_counter() - t0
    follow = [r for r in results if r["turn"] > 0]
    ttfts = sorted(r["ttft"] for r in follow)
    prompt_tokens = sum(r["prompt_tokens"] for r in follow)
    return {
        "requests": len(results),
        "wall_s": round(wall, 3),
        "follow_up_prompt_tokens": prompt_tokens,
        "follow_up_cached_pct": round(100 * sum(r["cached_tokens"] for r in follow) / max(1, prompt_tokens), 1),
        "follow_up_ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "follow_up_ttft_max_ms": round(1000 * ttfts[-1], 1),
    }


def direct(model: Any, prompt: str, max_tokens: int) -> dict[str, float]:
    """The same request through `model.stream` in this thread: the floor the server adds to."""
    pieces = model.stream(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
    return timed(((str(p), p) for p in pieces), lambda p: p.generated_tokens)


def run_level(ask: Callable[[int, int], dict[str, float]], clients: int, requests: int, seconds: float) -> dict:
    """`clients` threads, each making at most `requests` calls of `ask(client, i)` until `seconds` pass."""
    deadline = time.perf_counter() + seconds
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        for i in range(requests):
            if time.perf_counter() > deadline:
                break
            r = ask(k, i)
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


def report(name: str, row: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"level": name, **row}))
        return
    cells = (name, row["requests"], row["req_per_s"], row["gen_tok_per_s"], row["ttft_p50_ms"], row["ttft_max_ms"])
    print("{:>10} {:>5} {:>7.2f} {:>7.1f} {:>8.1f}ms {:>8.1f}ms".format(*cells))


@contextmanager
def server_process(
    model: str | None, max_queue: int, threads: int | None = None, slots: int | None = None
) -> Iterator[str]:
    """`gemma3n serve` in its own process (clients in this one must not share its GIL); yields /v1 URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "gemma3n.cli", "serve", "--port", str(port), "--max-queue", str(max_queue)]
    log = tempfile.TemporaryFile()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    args = cmd + (["--model", model] if model else [])
    args += ["--prompt-cache-slots", str(slots)] if slots is not None else []
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"the server did not start: {' '.join(cmd)}\n{tail}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="path or hub id (default: the embedded model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level (bound)")
    ap.add_argument("--seconds", type=float, default=30.0, help="per-level time bound")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both processes (default: torch's)")
    ap.add_argument("--in-process", action="store_true", help="run the server in this process (shares the GIL)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per level")
    ap.add_argument("--turns", type=int, default=0, help="multi-turn conversations instead (see above)")
    ap.add_argument("--slots", type=int, nargs="+", default=[0, 1, 4], help="--prompt-cache-slots values (--turns)")
    args = ap.parse_args()
    if args.turns:
        conversations(args)
        return

    def prompt(k: int, i: int) -> str:
        return PROMPTS[(k + i) % len(PROMPTS)]

    if args.threads:
        torch.set_num_threads(args.threads)
    model = gemma3n.load(args.model)
    for p in PROMPTS:
        direct(model, p, 4)  # warm-up
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {load}")
    if not args.json:
        print(f"{'level':>10} {'reqs':>5} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>10} {'TTFT max':>10}")
    row = run_level(lambda k, i: direct(model, prompt(k, i), args.max_tokens), 1, args.requests, args.seconds)
    report("direct", row, args.json)

    max_queue = max(args.clients) + 1
    if args.in_process:
        server: Any = BackgroundServer(create_app(model, max_queue=max_queue))
        base_url = server.__enter__().base_url
    else:
        server = server_process(args.model, max_queue, args.threads)
        base_url = server.__enter__()
    try:
        clients = [openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) for _ in range(16)]
        model_id = clients[0].models.list().data[0].id
        for p in PROMPTS:
            via_server(clients[0], model_id, p, 4)  # warm-up
        for n in args.clients:
            ask = lambda k, i: via_server(clients[k % 16], model_id, prompt(k, i), args.max_tokens)  # noqa: E731
            report(f"{n} client" + "s" * (n > 1), run_level(ask, n, args.requests, args.seconds), args.json)
    finally:
        server.__exit__(None, None, None)


def conversations(args: argparse.Namespace) -> None:
    clients = args.clients[0]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{clients} conversations x {args.turns} turns, max_tokens {args.max_tokens}, load {load}")
    if not args.json:
        head = ("slots", "reqs", "follow-up prompt tok", "cached", "TTFT p50", "TTFT max", "wall")
        print("{:>5} {:>5} {:>20} {:>7} {:>10} {:>10} {:>7}".format(*head))
    for slots in args.slots:
        with server_process(args.model, clients + 1, args.threads, slots) as base_url:
            row = {"slots": slots, **run_conversations(base_url, clients, args.turns, args.max_tokens)}
        if args.json:
            print(json.dumps(row))
            continue
        cells = (
            slots,
            row["requests"],
            row["follow_up_prompt_tokens"],
            row["follow_up_cached_pct"],
            row["follow_up_ttft_p50_ms"],
            row["follow_up_ttft_max_ms"],
            row["wall_s"],
        )
        print("{:>5} {:>5} {:>20} {:>6.1f}% {:>8.1f}ms {:>8.1f}ms {:>6.1f}s".format(*cells))


if __name__ == "__main__":
    main()
