"""Speculative decoding (issue #18): decode speed with a draft against none, and what bounds it.

Part `tiny`: the embedded model (trained, so acceptance means something), held-out KJV chapters as
prompts, greedy: decode tok/s with each declared size as draft and with prompt lookup, tokens
identical to no draft, acceptance and tokens per verification. Each run twice: with the target's
fused one-token step (the default on a CPU) and without it (the Python forward per token, what a
GPU or bf16 activations run, where checking 8 rows costs about as much as one token).

Part `ngram`: prompt lookup on prompts that ask to repeat or lightly edit a long passage, and on a
reply that repeats itself.

Part `e2b`: real E2B shapes (random weights: acceptance means nothing there): the cost of verifying
k = 0..8 drafted tokens (k + 1 rows) relative to one decoded token, a MatFormer draft step's cost,
and the speed-up those costs give at acceptance rates 0.6 / 0.7 / 0.8.

    python bench/bench_speculative.py --parts tiny,ngram --threads 1
    python bench/bench_speculative.py --parts e2b --checkpoint /work/ckpt/e2b --threads 1

A markdown table per part goes to stdout, everything to bench/out/bench_speculative-*.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gemma3n  # noqa: E402
from bench import common  # noqa: E402
from gemma3n import generate as gen_mod  # noqa: E402
from gemma3n.cache import Cache  # noqa: E402
from gemma3n.generate import decode_one, prefill  # noqa: E402
from gemma3n.hardware import cpu_info  # noqa: E402
from gemma3n.speculative import MAX_K, verify_logits  # noqa: E402

ACCEPTANCE = (0.6, 0.7, 0.8)
# E2B's decode reads / E4B's (bench.common.decode_weight_params at their shapes: 2.42 / 4.49 B
# parameters, the 537 M-parameter tied head read in full by both): the E2B inside E4B as draft
E2B_IN_E4B = 0.54


# ------------------------------------------------------------------------------------------ tiny


@contextmanager
def target_without_fused_step(enabled: bool) -> Iterator[None]:
    """The full model's one-token steps through the Python forward (drafts keep the fused step)."""
    if not enabled:
        yield
        return
    original = gen_mod.fused_step
    gen_mod.fused_step = lambda decoder, plan: None if plan.spec is None else original(decoder, plan)
    try:
        yield
    finally:
        gen_mod.fused_step = original


def held_out_prompts(model: gemma3n.Model, count: int, length: int) -> list[list[int]]:
    from tools.kjv_corpus import kjv_chapters, split

    chapters = split(kjv_chapters())[1]
    return [model.tokenizer.encode(c)[:length] for c in chapters[:count]]


def run_config(model: gemma3n.Model, prompts: list[list[int]], decode: int, **kw: Any) -> dict[str, Any]:
    """Greedy decoding of every prompt; speed from the decode phase only (after the first token)."""
    tokens, seconds, drafted, accepted, checks, plain, outputs = 0, 0.0, 0, 0, 0, 0, []
    for ids in prompts:
        r = model.generate(ids, max_tokens=decode, temperature=0, **kw)
        s = r.stats
        tokens += s["generated_tokens"] - 1
        seconds += (s["generated_tokens"] - 1) / s["generation_tps"] if s["generation_tps"] else 0.0
        drafted += s.get("draft_tokens", 0)
        accepted += s.get("accepted_tokens", 0)
        checks += s.get("verifications", 0)
        plain += s.get("plain_decode_steps", 0)
        outputs.append(r.token_ids)
    return {
        "decode_tps": tokens / seconds if seconds else 0.0,
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_verification": (accepted + checks) / checks if checks else None,
        "verifications": checks,
        "plain_steps": plain,
        "outputs": outputs,
    }


def part_tiny(args: argparse.Namespace) -> dict[str, Any]:
    model = gemma3n.load()
    prompts = held_out_prompts(model, args.prompts, args.prompt_tokens)
    drafts: list[tuple[str, Any, int | None]] = [("none", None, None)]
    for size in model.sizes():
        drafts.append((size, size, None))
    drafts += [(f"E2B-like k={k}", "E2B-like", k) for k in args.fixed_k]
    drafts.append(("ngram", "ngram", None))
    rows = []
    for python_target in (False, True):
        with target_without_fused_step(python_target):
            model.generate(prompts[0], max_tokens=8, temperature=0, draft="E2B-like", draft_k=3)  # warm up
            base = None
            for label, draft, k in drafts:
                r = run_config(model, prompts, args.decode, draft=draft, draft_k=k)
                base = base or r
                rows.append(
                    {
                        "target_step": "python" if python_target else "fused",
                        "draft": label,
                        "decode_tps": r["decode_tps"],
                        "speedup": r["decode_tps"] / base["decode_tps"],
                        "acceptance": r["acceptance"],
                        "tokens_per_verification": r["tokens_per_verification"],
                        "verifications": r["verifications"],
                        "plain_steps": r["plain_steps"],
                        "identical": r["outputs"] == base["outputs"],
                    }
                )
                print(_line(rows[-1]), flush=True)
    print(
        f"\n## tiny model, {len(prompts)} held-out chapters x {args.prompt_tokens}-token prompts, "
        f"{args.decode} greedy tokens, {torch.get_num_threads()} thread(s)\n"
    )
    common.print_table(rows, TABLE)
    per_size = acceptance_per_size(model, prompts, args)
    return {
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "decode": args.decode,
        "rows": rows,
        "acceptance_per_size": per_size,
    }


def acceptance_per_size(model: gemma3n.Model, prompts: list[list[int]], args: argparse.Namespace) -> list[dict]:
    """Each declared size's acceptance at one fixed k: comparable across sizes (adaptive k is not)."""
    from gemma3n.matformer import effective_params

    full = effective_params(model.plan(None).config)
    rows = []
    for size in model.sizes():
        r = run_config(model, prompts, args.decode, draft=size, draft_k=args.compare_k)
        rows.append(
            {
                "size": size,
                "params": effective_params(model.plan(size).config) / full,
                "acceptance": r["acceptance"],
                "tokens_per_verification": r["tokens_per_verification"],
            }
        )
    print(f"\nacceptance per declared size at k = {args.compare_k}:\n")
    common.print_table(
        rows,
        [
            ("size", "draft size"),
            ("params", "effective params vs full"),
            ("acceptance", "acceptance"),
            ("tokens_per_verification", "tokens/verification"),
        ],
    )
    return rows


TABLE = [
    ("target_step", "target step"),
    ("draft", "draft"),
    ("decode_tps", "decode tok/s"),
    ("speedup", "vs none"),
    ("acceptance", "acceptance"),
    ("tokens_per_verification", "tokens/verification"),
    ("plain_steps", "plain steps"),
    ("identical", "tokens = no draft"),
]


def _line(row: dict[str, Any]) -> str:
    return "  ".join(f"{k}={common.fmt(v)}" for k, v in row.items())


# ------------------------------------------------------------------------------------------ ngram


def part_ngram(args: argparse.Namespace) -> dict[str, Any]:
    from tools.kjv_corpus import kjv_chapters, split

    model = gemma3n.load()
    passage = split(kjv_chapters())[1][1]
    passage = model.tokenizer.decode(model.tokenizer.encode(passage)[: args.passage_tokens])
    cases = {
        "repeat the passage (chat)": {"messages": [{"role": "user", "content": f"Repeat exactly:\n\n{passage}"}]},
        "replace LORD with God (chat)": {
            "messages": [{"role": "user", "content": f"Rewrite, with God for LORD:\n\n{passage}"}]
        },
        "passage, then its start again (raw)": {"prompt": passage + "\n\n" + passage[: len(passage) // 4]},
        "a reply that repeats itself (raw)": {"prompt": "Blessed are the"},
    }
    rows = []
    for python_target in (False, True):
        with target_without_fused_step(python_target):
            for label, prompt in cases.items():
                runs = {}
                for draft in (None, "ngram"):
                    r = model.generate(**prompt, max_tokens=args.decode, temperature=0, draft=draft)
                    runs[draft] = r
                s, b = runs["ngram"].stats, runs[None].stats
                rows.append(
                    {
                        "target_step": "python" if python_target else "fused",
                        "prompt": label,
                        "none_tps": b["generation_tps"],
                        "ngram_tps": s["generation_tps"],
                        "speedup": s["generation_tps"] / b["generation_tps"],
                        "acceptance": s["acceptance_rate"],
                        "tokens_per_verification": s["tokens_per_verification"],
                        "identical": runs["ngram"].token_ids == runs[None].token_ids,
                    }
                )
                print(_line(rows[-1]), flush=True)
    print(f"\n## prompt lookup (draft='ngram', adaptive k), {args.decode} greedy tokens\n")
    common.print_table(
        rows,
        [
            ("target_step", "target step"),
            ("prompt", "prompt"),
            ("none_tps", "no draft tok/s"),
            ("ngram_tps", "ngram tok/s"),
            ("speedup", "speed-up"),
            ("acceptance", "acceptance"),
            ("tokens_per_verification", "tokens/verification"),
            ("identical", "tokens = no draft"),
        ],
    )
    return {"rows": rows, "passage_tokens": args.passage_tokens}


# ------------------------------------------------------------------------------------------ e2b


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def part_e2b(args: argparse.Namespace) -> dict[str, Any]:
    model = gemma3n.load(args.checkpoint)
    decoder, plan = model.decoder, model.plan(None)
    draft_size = {"ffn": [w // 2 for w in model.config.text.intermediate_size]}
    draft_plan = model.plan(draft_size)
    prompt = torch.arange(100, 100 + args.prompt_tokens).view(1, -1)

    def prefilled(p):
        cache = Cache(p.config, p.spec)
        prefill(decoder, prompt, cache, p)
        return cache

    def one_step(p, cache):
        def step():
            decode_one(decoder, 7, cache, p)
            cache.truncate(cache.offset - 1)

        return step

    cache = prefilled(plan)
    one_step(plan, cache)()  # builds the fused step
    plain = _median_s(one_step(plan, cache), args.repeats)
    draft_cache = prefilled(draft_plan)
    one_step(draft_plan, draft_cache)()
    draft = _median_s(one_step(draft_plan, draft_cache), args.repeats)
    rows = []
    for k in args.ks:

        def verify(k=k):
            verify_logits(decoder, cache, plan, [7] * (k + 1), None)
            cache.truncate(cache.offset - k - 1)

        verify()
        seconds = _median_s(verify, args.repeats)
        rows.append({"k": k, "rows": k + 1, "verify_s": seconds, "vs_one_token": seconds / plain})
        print(_line(rows[-1]), flush=True)
    verify_s = {r["rows"]: r["verify_s"] for r in rows}
    expected = [
        {
            "acceptance": a,
            **_best(a, plain, verify_s, 0.0, "ngram"),
            **_best(a, plain, verify_s, draft, "matformer"),
            **_best(a, plain, verify_s, E2B_IN_E4B * plain, "e2b_in_e4b"),
        }
        for a in ACCEPTANCE
    ]
    print(
        f"\n## E2B shapes ({model.config.text.num_hidden_layers} layers, random bf16 weights), one decoded token "
        f"(fused step) {plain * 1e3:.0f} ms, half-FFN MatFormer draft step {draft * 1e3:.0f} ms "
        f"({draft / plain:.2f}x), {torch.get_num_threads()} thread(s)\n"
    )
    common.print_table(
        rows, [("k", "k drafted"), ("rows", "rows checked"), ("verify_s", "verify s"), ("vs_one_token", "x one token")]
    )
    print("\nexpected speed-up (best k) at acceptance a, from these costs:\n")
    common.print_table(
        expected,
        [
            ("acceptance", "a"),
            ("ngram_speedup", "ngram (free draft)"),
            ("ngram_k", "k"),
            ("matformer_speedup", "half-FFN MatFormer draft"),
            ("matformer_k", "k"),
            ("e2b_in_e4b_speedup", f"E2B in E4B (draft {E2B_IN_E4B:.2f}x, estimate)"),
            ("e2b_in_e4b_k", "k"),
        ],
    )
    return {
        "checkpoint": args.checkpoint,
        "plain_step_s": plain,
        "draft_step_s": draft,
        "draft_size": "half FFN widths",
        "verify": rows,
        "expected": expected,
    }


def _best(a: float, plain: float, verify_s: dict[int, float], draft_s: float, name: str) -> dict[str, Any]:
    """max over the measured k <= MAX_K of (1 + a + ... + a^k) tokens per (k draft steps + one check of
    k + 1 rows), against one token per plain step."""
    ks = [rows - 1 for rows in verify_s if 1 < rows <= MAX_K + 1]  # what the runtime may choose
    gains = {k: (1 - a ** (k + 1)) / (1 - a) * plain / (k * draft_s + verify_s[k + 1]) for k in ks}
    k = max(gains, key=gains.__getitem__)
    return {f"{name}_speedup": gains[k], f"{name}_k": k}


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="tiny,ngram,e2b")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="tiny: held-out chapters used as prompts")
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--decode", type=int, default=128, help="greedy tokens per prompt")
    ap.add_argument("--fixed-k", default="3,7", help="tiny: fixed k values tried with E2B-like")
    ap.add_argument("--compare-k", type=int, default=4, help="tiny: the k at which sizes' acceptance is compared")
    ap.add_argument("--passage-tokens", type=int, default=160, help="ngram: the passage's length")
    ap.add_argument("--checkpoint", default="/work/ckpt/e2b", help="e2b: an E2B-shape checkpoint")
    ap.add_argument("--repeats", type=int, default=3, help="e2b: timings per figure (median)")
    ap.add_argument("--ks", default="0,1,2,3,4,5,6,7,8,11,15", help="e2b: drafted tokens whose check is timed")
    args = ap.parse_args(argv)
    args.fixed_k = [int(k) for k in args.fixed_k.split(",") if k]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": common.machine_info(),
        "cpu": cpu_info().model,
        "threads": args.threads,
        "load_before": os.getloadavg(),
    }
    parts = {"tiny": part_tiny, "ngram": part_ngram, "e2b": part_e2b}
    for name in args.parts.split(","):
        if name == "e2b" and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            print(f"{args.checkpoint} missing: make it with tools/make_random_checkpoint.py --shape E2B --text-only")
            continue
        report[name] = parts[name](args)
    report["load_after"] = os.getloadavg()
    print(f"\nCPU: {report['cpu']}; load average {report['load_before'][0]:.1f} -> {report['load_after'][0]:.1f}")
    print("wrote", common.write_json("bench_speculative", report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
