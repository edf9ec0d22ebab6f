"""Batched decoding: aggregate decode tok/s of B sequences decoded together against one alone,
inter-token latency, KV bytes per sequence, peak RSS (gemma3n.batching).

    python bench/bench_batch.py --checkpoint /work/ckpt/e2b-l10 --threads 2 --batch 1 2 4 8

Each sequence gets its own random prompt (`--prompt` tokens, different lengths by a few tokens so
positions differ) and is prefilled first; then `--decode` greedy steps of the whole batch are
timed (prefill excluded). Tokens are checked to be identical to decoding each sequence alone.
Prints a table, writes JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402


def run(a: argparse.Namespace) -> dict:
    import gemma3n
    from gemma3n.batching import Batch, Sequence
    from gemma3n.cache import Cache
    from gemma3n.generate import StepStats, TextStream, make_sampler, prefill, sampling_params
    from gemma3n.hardware import cpu_info

    torch.set_num_threads(a.threads)
    model = gemma3n.load(a.checkpoint)
    plan = model.plan(a.size)
    vocab = min(model.config.text.vocab_size, 256000)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (a.prompt + 3 * i,), generator=gen).tolist() for i in range(max(a.batch))]
    greedy = sampling_params({}, temperature=0.0)

    def start(ids: list[int], tag: int) -> Sequence:
        cache = Cache(plan.config, plan.spec)
        logits = prefill(model.decoder, torch.tensor([ids]), cache, plan)
        stats = StepStats()
        text = TextStream(model.tokenizer, stop_ids=set(), stop=None, max_tokens=a.decode + 1, stats=stats)
        return Sequence(cache, logits, make_sampler(greedy), list(ids), text, stats, a.decode + 1, tag)

    def decode(b: int) -> tuple[list[float], dict[int, list[int]]]:
        """Step times of a batch of the first b sequences, and each one's generated tokens."""
        batch = Batch(model.decoder, plan, max_batch=b)
        for i in range(b):
            batch.add(start(prompts[i], i))
        batch.step()  # the first token comes from the prefill's logits: not a decode step
        steps = []
        for _ in range(a.decode - 1):
            t = time.perf_counter()
            batch.step()
            steps.append(time.perf_counter() - t)
        return steps, {s.tag: s.history[len(prompts[s.tag]) :] for s in batch.active}

    alone = {}
    for i in range(max(a.batch)):  # every sequence decoded alone: the reference tokens
        one = Batch(model.decoder, plan, max_batch=1)
        one.add(start(prompts[i], i))
        for _ in range(a.decode):
            one.step()
        alone[i] = one.active[0].history[len(prompts[i]) :]
    rows = []
    for b in a.batch:
        steps, tokens = decode(b)
        step = sorted(steps)[len(steps) // 2]
        rows.append(
            {
                "batch": b,
                "decode_tok_s": b / step,
                "step_ms_p50": step * 1e3,
                "tokens_identical_to_alone": all(tokens[i] == alone[i] for i in tokens),
            }
        )
        print(f"batch {b}: {b / step:.2f} tok/s aggregate, step p50 {step * 1e3:.1f} ms", flush=True)
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["vs_one"] = r["decode_tok_s"] / base
        r["latency_vs_one"] = r["step_ms_p50"] / rows[0]["step_ms_p50"]
    cfg = model.config.text
    kv_4k = 2 * 4096 * cfg.num_key_value_heads * cfg.head_dim * 4 * (cfg.num_hidden_layers - cfg.num_kv_shared_layers)
    print(
        f"\n{cpu_info().model}, {a.threads} threads, {a.checkpoint}; KV at 4k context: {kv_4k / 2**20:.0f} MiB per "
        f"sequence (fp32, full layers; sliding layers hold their window)\n"
    )
    common.print_table(
        rows,
        [
            ("batch", "batch"),
            ("decode_tok_s", "aggregate decode tok/s"),
            ("vs_one", "vs one"),
            ("step_ms_p50", "inter-token ms p50"),
            ("latency_vs_one", "latency vs one"),
            ("tokens_identical_to_alone", "tokens = alone"),
        ],
    )
    data = {
        "machine": common.machine_info(),
        "threads": a.threads,
        "checkpoint": a.checkpoint,
        "peak_rss_gb": common.peak_rss_gb(),
        "kv_4k_mib_upper_bound": kv_4k / 2**20,
        "rows": rows,
    }
    print(f"peak RSS {data['peak_rss_gb']:.2f} GB; wrote", common.write_json("batch", data))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the embedded model")
    ap.add_argument("--size", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=24)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
