"""Constrained decoding (issue #15 item 1): what a grammar costs per generated token, and what
compiling a schema costs, on a checkpoint's real decode loop.

Per token, the grammar adds the mask (llguidance computes which ids may come next, we unpack
its bitmask and set the others to -inf) and the matcher's advance. Both are timed inside a real
constrained generation and set against the time of the whole token; the overhead is
(mask + advance) / (token time - mask - advance).

  .venv/bin/python bench/bench_structured.py                         # the embedded tiny model (4096 ids)
  .venv/bin/python bench/bench_structured.py --checkpoint /tmp/e2b-l7 --vocab 262400
        # E2B shapes: make_random_checkpoint.py --shape E2B --layers 7 --text-only; its placeholder
        # tokenizer holds no JSON punctuation at all, so --vocab swaps in a synthesized 262,400-entry
        # SentencePiece-style vocabulary (bytes, ASCII, punctuation runs, numbers, CJK, pseudo-words)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine_info, print_table, write_json  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 40, "maxLength": 60},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


def synthesized_vocab(template: Path, size: int, seed: int = 0) -> str:
    """A tokenizer.json of `size` entries in Gemma's style (▁ for spaces, byte fallback), keeping
    `template`'s special tokens at their ids: realistic work for a mask at Gemma's vocabulary."""
    rnd = random.Random(seed)
    added = {t["content"]: t["id"] for t in json.loads(template.read_text())["added_tokens"]}
    pieces: dict[str, None] = {f"<0x{b:02X}>": None for b in range(256)}
    pieces.update({chr(c): None for c in range(0x20, 0x7F)})
    pieces.update({"▁" * n: None for n in range(1, 32)} | {"\n" * n: None for n in range(1, 32)})
    punct = "{}[]\",:.;!?()<>=+-*/\\'`_#@$%^&|~"
    pieces.update({a + b + c: None for a in punct for b in punct for c in ('"', "▁", ":", ",", "")})
    pieces.update({f"{p}{i}": None for i in range(1000) for p in ("", "▁")})
    pieces.update({chr(c): None for c in range(0x4E00, 0x9FFF)})
    letters = ["bcdfghjklmnprstvwxyz", "aeiou", "абвгдежзийклмнопрстуфхцчшщыэюя", "αβγδεζηθικλμνξοπρστυφχψω"]
    while len(pieces) + len(added) < size:
        cons, vow = (letters[0], letters[1]) if rnd.random() < 0.8 else (rnd.choice(letters[2:]),) * 2
        word = "".join(rnd.choice(cons) + rnd.choice(vow) for _ in range(rnd.randint(1, 4)))
        pieces["▁" * (rnd.random() < 0.6) + (word.capitalize() if rnd.random() < 0.2 else word)] = None
    for special in added:
        pieces.pop(special, None)
    free = (i for i in range(size) if i not in set(added.values()))
    vocab = {**added, **{p: next(free) for p in list(pieces)[: size - len(added)]}}
    added_tokens = [
        {
            "id": i,
            "content": t,
            "special": True,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
        }
        for t, i in added.items()
    ]
    return json.dumps(
        {
            "version": "1.0",
            "added_tokens": added_tokens,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": {
                "type": "Sequence",
                "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                ],
            },
            "model": {
                "type": "BPE",
                "vocab": vocab,
                "merges": [],
                "byte_fallback": True,
                "fuse_unk": True,
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
            },
        },
        ensure_ascii=False,
    )


def with_vocab(checkpoint: Path, size: int) -> Path:
    """The checkpoint's files linked into a temporary folder, with the synthesized tokenizer."""
    folder = Path(tempfile.mkdtemp(prefix="g3n-vocab-"))
    for item in checkpoint.iterdir():
        if item.name not in ("tokenizer.json", "tokenizer_config.json"):
            os.symlink(item.resolve(), folder / item.name)
    (folder / "tokenizer.json").write_text(synthesized_vocab(checkpoint / "tokenizer.json", size))
    return folder


class Timed:
    """Wraps GrammarConstraint.mask / accept to add up their time."""

    def __init__(self) -> None:
        from gemma3n import structured

        self.mask_s = self.accept_s = 0.0
        self.calls = 0
        self._mask, self._accept = structured.GrammarConstraint.mask, structured.GrammarConstraint.accept
        timed = self

        def mask(self, logits):
            t = time.perf_counter()
            out = timed._mask(self, logits)
            timed.mask_s += time.perf_counter() - t
            timed.calls += 1
            return out

        def accept(self, token):
            t = time.perf_counter()
            timed._accept(self, token)
            timed.accept_s += time.perf_counter() - t

        structured.GrammarConstraint.mask, structured.GrammarConstraint.accept = mask, accept


def run(args: argparse.Namespace) -> dict:
    import llguidance

    import gemma3n
    from gemma3n import structured

    torch.set_num_threads(args.threads)
    path = args.checkpoint
    if args.vocab:
        path = with_vocab(Path(args.checkpoint), args.vocab)
    model = gemma3n.load(path)
    t = time.perf_counter()
    tokenizer = model.byte_tokenizer
    tokenizer_s = time.perf_counter() - t
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    structured._grammar.cache_clear()
    t = time.perf_counter()
    grammar = structured.grammar_for(fmt)
    compile_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    structured.GrammarConstraint(tokenizer, grammar)
    matcher_ms = (time.perf_counter() - t) * 1e3
    messages = [{"role": "user", "content": "A person as JSON."}]
    model.generate(messages=messages, max_tokens=4)  # warm-up
    plain = model.generate(messages=messages, max_tokens=args.tokens, temperature=1, seed=0)
    timed = Timed()
    rows, runs = [], []
    for seed in range(args.runs):
        timed.mask_s = timed.accept_s = 0.0
        timed.calls = 0
        t = time.perf_counter()
        r = model.generate(messages=messages, response_format=fmt, max_tokens=args.tokens, temperature=1, seed=seed)
        total = time.perf_counter() - t - r.stats["ttft_s"]  # decode only: from the first token on
        steps = max(1, r.stats["generated_tokens"] - 1)
        grammar_ms = (timed.mask_s + timed.accept_s) / max(1, timed.calls) * 1e3
        token_ms = total / steps * 1e3
        runs.append(
            {
                "tokens": r.stats["generated_tokens"],
                "token_ms": token_ms,
                "grammar_ms": grammar_ms,
                "overhead_pct": 100 * grammar_ms / max(1e-9, token_ms - grammar_ms),
                "finish": r.finish_reason,
            }
        )
    best = min(runs, key=lambda r: r["overhead_pct"])
    median = statistics.median(r["overhead_pct"] for r in runs)
    rows.append(
        {
            "vocab": model.config.text.vocab_size,
            "tokenizer_s": tokenizer_s,
            "compile_ms": compile_ms,
            "matcher_ms": matcher_ms,
            "token_ms": statistics.median(r["token_ms"] for r in runs),
            "plain_token_ms": 1e3 / plain.stats["generation_tps"] if plain.stats["generation_tps"] else float("nan"),
            "grammar_ms": statistics.median(r["grammar_ms"] for r in runs),
            "overhead_pct": median,
        }
    )
    print_table(
        rows,
        [
            ("vocab", "vocab"),
            ("tokenizer_s", "LLTokenizer s"),
            ("compile_ms", "compile ms"),
            ("matcher_ms", "matcher ms"),
            ("token_ms", "constrained token ms"),
            ("plain_token_ms", "plain token ms"),
            ("grammar_ms", "grammar ms/token"),
            ("overhead_pct", "overhead %"),
        ],
    )
    return {
        "checkpoint": str(args.checkpoint),
        "llguidance": llguidance.__version__,
        "threads": args.threads,
        "rows": rows,
        "runs": runs,
        "best": best,
        "machine": machine_info(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--vocab", type=int, default=0, help="swap in a synthesized tokenizer of this many ids")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.checkpoint is None:
        from gemma3n.model import default_model_path

        args.checkpoint = str(default_model_path())
    out = run(args)
    print("wrote", write_json("bench_structured", out))


if __name__ == "__main__":
    main()
