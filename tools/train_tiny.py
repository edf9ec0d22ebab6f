"""Train the embedded default model: a tiny Gemma 3n (every architectural feature on) trained as a
MatFormer on public-domain English text, written in the Hugging Face checkpoint layout.

Corpus (installed offline through the system package manager; nothing is downloaded here):
- The King James Version of the Bible (1611), Debian package `bible-kjv-text` (data file
  /usr/lib/bible.data), read through the `bible` program of the package `bible-kjv` (Chip Chapin's
  Bible Retrieval System). Licence: the KJV text is in the public domain (Debian's copyright file:
  "The copyright for the King James Version text of the Bible is expired"); the retrieval program
  is free to copy/modify/distribute (its legend) and GPL-2+ for the Debian changes. The program is
  only run to decode the text; nothing of it is shipped.
  Prerequisite:  apt-get install bible-kjv bible-kjv-text

Model: `gemma3n.text.TextDecoder` built from a `gemma3n.config.TextConfig` (the runtime's own
classes, in training mode: no cache), shaped like E4B in miniature: 15 layers in 3 periods of
4 sliding + 1 global, the top two periods (layers 5-14) KV-shared, FFN 512 (4x hidden) that nests
256 (2x hidden), activation sparsity in the first 4 layers, AltUp 4 streams, LAuReL, PLE.
MatFormer (docs/matformer.md#training-a-matformer): every step sums the next-token loss of the full model,
of the E2B-like sub-model that skips the first shared period (layers 5-9) and halves every FFN, and
of one random Mix-n-Match size between them. The checkpoint declares six sizes (matformer_sizes.json).

    python tools/train_tiny.py --out /tmp/tiny-trained   # the shipped run: seed 0, 420 steps, 41 min
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kjv_corpus import HELD_OUT_EVERY, kjv_chapters, split, token_stream  # noqa: E402
from make_tiny import build_tokenizer, save_checkpoint  # noqa: E402

from gemma3n.config import TextConfig  # noqa: E402
from gemma3n.matformer import effective_params, resolve_size, sliced_text_config  # noqa: E402
from gemma3n.text import AltUp, LayerPlan, TextDecoder  # noqa: E402


def _scale_output_for_autograd(self: AltUp, active: torch.Tensor) -> torch.Tensor:
    """`DecoderLayer.post_attention` adds the PLE output into `corrected[1:]` in place after reading
    `corrected[0]` through this scale; the copy keeps autograd's saved input intact (same values)."""
    return active.clone() * self.correct_output_scale.to(active.dtype)


AltUp.scale_output = _scale_output_for_autograd  # training only: this script never serves

NUM_LAYERS = 15
SUB_SIZE = {"name": "E2B-like", "ffn": [256] * 10, "skip": [5, 6, 7, 8, 9]}
FIRST_SHARED_PERIOD = [5, 6, 7, 8, 9]
# The sizes the checkpoint declares (matformer_sizes.json; `gemma3n slice --list`), from the largest
# to the E2B-like sub-model: all of them are points the random Mix-n-Match loss trains.
DECLARED_SIZES = {
    "half-ffn-5-9": {"ffn": [512] * 5 + [256] * 5 + [512] * 5},
    "half-ffn-5-14": {"ffn": [512] * 5 + [256] * 10},
    "skip-5-9": {"skip": FIRST_SHARED_PERIOD},
    "half-ffn": {"ffn": [256] * 15},
    "skip-5-9-half-ffn-10-14": {"ffn": [512] * 5 + [256] * 5, "skip": FIRST_SHARED_PERIOD},
    "E2B-like": {"ffn": [256] * 10, "skip": FIRST_SHARED_PERIOD},
}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def trained_config(tok) -> TextConfig:
    n = NUM_LAYERS
    return TextConfig(
        num_hidden_layers=n,
        intermediate_size=[512] * n,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)],
        activation_sparsity_pattern=[0.95] * 4 + [0.0] * (n - 4),
        vocab_size=tok.get_vocab_size(),
        vocab_size_per_layer_input=tok.get_vocab_size(),
        hidden_size=128,
        hidden_size_per_layer_input=32,  # 15 x 32 = 480 PLE columns: int4 groups of 32 fit
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        sliding_window=64,
        laurel_rank=16,
        num_kv_shared_layers=10,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<bos>"),
        eos_token_id=[tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")],
    )


def init_decoder(cfg: TextConfig, seed: int) -> TextDecoder:
    """N(0, 0.02) matrices and embeddings, unit norms; the PLE table becomes a trainable Parameter
    attached where the runtime keeps its host table (`TextDecoder.ple_rows` reads it)."""
    torch.manual_seed(seed)
    dec = TextDecoder(cfg)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "norm" in name or name.endswith("correct_output_scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    ple = torch.randn(cfg.vocab_size_per_layer_input, cfg.num_hidden_layers * cfg.hidden_size_per_layer_input)
    dec.embed_tokens_per_layer = nn.Parameter(0.02 * ple)
    return dec


def plan_of(cfg: TextConfig, size: dict | None) -> LayerPlan:
    """The plan of one size, built as `gemma3n.model.Model.plan` builds elastic views."""
    with warnings.catch_warnings():  # 256 = 2x hidden: a width this model *is* trained at
        warnings.simplefilter("ignore")
        spec = resolve_size(size, cfg)
    if spec is None:
        return LayerPlan.full(cfg)
    return LayerPlan(config=sliced_text_config(cfg, spec), layers=tuple(spec.layers), spec=spec)


def plans(cfg: TextConfig) -> dict[str, LayerPlan]:
    """The full plan and the E2B-like sub-model's."""
    return {"full": LayerPlan.full(cfg), "sub": plan_of(cfg, SUB_SIZE)}


def random_mix(cfg: TextConfig, rng: random.Random) -> LayerPlan:
    """A random Mix-n-Match size between the two trained ends: the first shared period kept or
    skipped, each kept layer's FFN at the full or the nested width (docs/matformer.md#training-a-matformer, "sample one
    granularity per batch", added on top of the summed full + E2B-like losses)."""
    skip = SUB_SIZE["skip"] if rng.random() < 0.5 else []
    kept = cfg.num_hidden_layers - len(skip)
    ffn = [rng.choice((SUB_SIZE["ffn"][0], cfg.intermediate_size[0])) for _ in range(kept)]
    return plan_of(cfg, {"ffn": ffn, "skip": skip})


def loss_of(dec: TextDecoder, batch: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    ids, targets = batch[:, :-1], batch[:, 1:]
    hidden = dec(ids, torch.arange(ids.shape[1]), plan=plan)
    logits = dec.lm_head(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def held_out_loss(dec: TextDecoder, windows: torch.Tensor, plan: LayerPlan, batch: int) -> float:
    dec.eval()
    total = sum(
        loss_of(dec, windows[i : i + batch], plan).item() * len(windows[i : i + batch])
        for i in range(0, len(windows), batch)
    )
    dec.train()
    return total / len(windows)


def state_of(dec: TextDecoder) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in dec.state_dict().items() if k != "embed_tokens_per_layer"}
    state["embed_tokens_per_layer.weight"] = dec.embed_tokens_per_layer.detach()
    return state


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="new checkpoint directory")
    ap.add_argument("--log", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "tiny-training.csv")
    ap.add_argument("--steps", type=int, default=420)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=60)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-matformer", action="store_true", help="train the full model only (the contrast run)")
    ap.add_argument("--no-mix", action="store_true", help="no random Mix-n-Match size per step (full + E2B-like only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    chapters = kjv_chapters()
    train_texts, held_texts = split(chapters)
    tok = build_tokenizer(args.vocab, train_texts)
    cfg = trained_config(tok)
    train_ids, held_ids = token_stream(tok, train_texts), token_stream(tok, held_texts)
    w = args.seq + 1
    n_held = min(args.eval_windows, len(held_ids) // w)
    held = held_ids[: n_held * w].view(n_held, w)
    print(f"corpus: {len(chapters)} chapters, {len(train_ids)} train / {len(held_ids)} held-out tokens", flush=True)

    dec = init_decoder(cfg, args.seed)
    dec.train()
    pl = plans(cfg)
    n_params = sum(p.numel() for p in dec.parameters())
    print(
        f"params {n_params}, effective full {effective_params(cfg)}, sub {effective_params(pl['sub'].config)}",
        flush=True,
    )
    decay = [p for n, p in dec.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in dec.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    ema: dict[str, float | None] = {"full": None, "sub": None, "mix": None}
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            ev = {k: held_out_loss(dec, held, p, args.batch) for k, p in pl.items()}
            row = {
                "step": step,
                "tokens": step * args.batch * args.seq,
                "minutes": round((time.time() - t0) / 60, 2),
                "train_loss_full": None if ema["full"] is None else round(ema["full"], 4),
                "train_loss_sub": None if ema["sub"] is None else round(ema["sub"], 4),
                "heldout_ppl_full": round(math.exp(ev["full"]), 2),
                "heldout_ppl_sub": round(math.exp(ev["sub"]), 2),
            }
            rows.append(row)
            print(row, flush=True)
            with args.log.open("w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(row))
                wr.writeheader()
                wr.writerows(rows)
        if step == args.steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - w, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + w] for s in starts])
        losses = {"full": loss_of(dec, batch, pl["full"])}
        if not args.no_matformer:
            losses["sub"] = loss_of(dec, batch, pl["sub"])
            if not args.no_mix:
                losses["mix"] = loss_of(dec, batch, random_mix(cfg, rng))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        for k, v in losses.items():
            ema[k] = v.item() if ema[k] is None else 0.9 * ema[k] + 0.1 * v.item()
        if step % 10 == 0:
            print(
                f"step {step} lr {lr_at(step):.2e} "
                + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                + f" {time.time() - t0:.0f}s",
                flush=True,
            )

    minutes = (time.time() - t0) / 60
    last = rows[-1]
    recipe = (
        "full model only (no MatFormer)"
        if args.no_matformer
        else "MatFormer: each step sums the loss of the full model, of the E2B-like sub-model "
        "(skip layers 5-9, FFN 256)" + ("" if args.no_mix else " and of one random Mix-n-Match size in between")
    )
    readme = f"""# gemma3n-tiny: a tiny Gemma 3n trained as a MatFormer on the King James Bible

The default model of the `gemma3n` package (used when `--model` is omitted). A real Gemma 3n text
decoder (the architecture and checkpoint layout of google/gemma-3n-E4B) at toy size:

- {cfg.num_hidden_layers} layers in periods of 4 sliding (window {cfg.sliding_window}) + 1 global attention;
  the top {cfg.num_kv_shared_layers} layers KV-shared; activation sparsity 0.95 in layers 0-3
- hidden {cfg.hidden_size}, FFN {cfg.intermediate_size[0]} nesting {SUB_SIZE["ffn"][0]}, AltUp \
{cfg.altup_num_inputs} streams, LAuReL rank {cfg.laurel_rank},
  per-layer embeddings {cfg.hidden_size_per_layer_input} per layer (stored in bf16), soft-capped logits
- byte-level BPE vocabulary of {cfg.vocab_size} with the Gemma special tokens
- {n_params:,} parameters; effective: full {effective_params(cfg):,}, E2B-like sub-model \
{effective_params(pl["sub"].config):,}
- MatFormer sizes in `matformer_sizes.json` (`gemma3n slice --list`), served as elastic views

**Corpus:** the King James Version of the Bible (1611; public domain), from Debian's
`bible-kjv-text` package; every {HELD_OUT_EVERY}th chapter held out.

**Training:** `tools/train_tiny.py --seed {args.seed} --steps {args.steps}` ({minutes:.0f} min on one CPU
thread): AdamW, cosine LR peak {args.lr}, batch {args.batch} x {args.seq} tokens; {recipe}.

**Held-out perplexity** (64 windows, at the end of training): full {last["heldout_ppl_full"]}, E2B-like
sub-model {last["heldout_ppl_sub"]}. Every size on the whole held-out set: `tools/eval_tiny.py`.

**Licence:** trained only on public-domain text; the same terms as this package.

It writes KJV-flavoured English and knows nothing else: it is for trying the runtime, not for answers.
"""
    # The 2M-parameter PLE table in bf16 (it is gathered row by row on the host): 22 MB in all, not 26.
    save_checkpoint(args.out, tok, cfg, state_of(dec), readme, force=args.force, ple_dtype=torch.bfloat16)
    sizes = ",\n".join(f"  {json.dumps(name)}: {json.dumps(size)}" for name, size in DECLARED_SIZES.items())
    (args.out / "matformer_sizes.json").write_text('{"sizes": {\n' + sizes + "\n}}\n")
    print(f"wrote {args.out} ({minutes:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
