"""Pre-train the embedded model's audio or vision tower on its own, before the joint stage
(tools/train_tiny_media.py --init-audio / --init-vision) teaches the decoder to read it.

A tower trained only through the decoder's answer loss learns nothing in a CPU budget: the gradient
that reaches it through a frozen or barely tuned decoder is mostly noise (docs/tiny-media.md). Here
each tower learns with a cheap loss of its own, no decoder in the step:

- audio: CTC over characters (a-z, apostrophe, space) read off the 6.25 Hz soft tokens the decoder
  will see (the encoder keeps every 4th conformer frame): a training-only head maps each soft token
  to 8 CTC frames (50 Hz), so each soft token must carry the letters of its 160 ms, which is what
  the decoder needs from it. At 25 Hz, fast speech (17 letters a second, a blank needed between
  doubled letters) leaves CTC little room;
- audio `--units tokens`: CTC over the decoder's own tokens, one frame a soft token, each scored by
  the cosine between the soft token and the token's input embedding, so a soft token that wins for a
  token stands where the decoder sees that token (docs/tiny-media.md, third round);
- vision: colour, shape and count read linearly off the 16 soft tokens (training-only head), on
  scenes rendered at 256 px mostly and at 512 / 768 px so the tower holds up at every size.

Both write `model.audio_tower.*` + `model.embed_audio.*` (or the vision pair) to one safetensors
file, with a CSV of the evaluations (held-out voice greedy CTC WER and CER; held-out scenes'
attribute accuracy per resolution).

    python tools/pretrain_tiny_towers.py audio --speech /work/tiny-mm/speech --out /work/tiny-mm/audio.safetensors
    python tools/pretrain_tiny_towers.py vision --out /work/tiny-mm/vision.safetensors
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_media_data import (  # noqa: E402
    BARE_EDGES_HELP,
    COLOURS,
    COUNTS,
    SHAPES,
    Clips,
    augment,
    normalize_words,
    render_scene,
    spoken_transcripts,
)
from train_tiny_media import (  # noqa: E402  (importing it makes the SSCP block differentiable)
    AUDIO_CONFIG,
    IMAGE_TOKENS,
    PREPROCESSOR,
    TOWER_SHAPE,
    attr_loss,
    draw_scenes,
    init_audio_tower,
    init_embedder,
    init_vision_tower,
    refuse_to_clobber,
    res_weights,
    token_keys,
    token_logits,
    tower_shape,
    vision_soft,
    whitening,
    write_csv,
)

from gemma3n.audio import AudioFeatureExtractor  # noqa: E402
from gemma3n.image import ImageProcessor  # noqa: E402

TEXT_HIDDEN = 128  # the embedded decoder's width: the embedders project into it
LETTERS = " 'abcdefghijklmnopqrstuvwxyz"  # CTC labels 1..27; 0 is the blank
UPSAMPLE = 8  # CTC frames per soft token


def letters(text: str) -> list[int]:
    return [LETTERS.index(c) + 1 for c in normalize_words(text) if c in LETTERS]


def greedy_text(labels: list[int]) -> str:
    out = [x for j, x in enumerate(labels) if x and (j == 0 or x != labels[j - 1])]
    return " ".join("".join(LETTERS[x - 1] for x in out).split())


class FrameHead(nn.Module):
    """Training only: each soft token -> CTC logits of UPSAMPLE frames of its 160 ms."""

    def __init__(self, width: int, labels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, UPSAMPLE * labels)
        self.labels = labels

    def forward(self, soft: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S * UPSAMPLE, labels]
        return self.proj(soft).reshape(soft.shape[0], -1, self.labels)


class TokenHead(nn.Module):
    """Training only: CTC over the decoder's own tokens, one frame per soft token, scored by the
    cosine between the soft token and each token's input embedding (plus a learnt blank vector).
    The soft tokens learn to stand where the decoder's text embeddings are, which is what a decoder
    that has learnt to copy from its context can read (docs/tiny-media.md, third round)."""

    def __init__(self, table: torch.Tensor, metric: str = "cosine") -> None:
        super().__init__()
        # label k + 1; not saved: it is the --decoder's, rebuilt at every start (a resumed run may
        # aim the tower at another decoder)
        self.register_buffer("table", F.normalize(table.float(), dim=-1), persistent=False)  # [V, D]
        self.blank = nn.Parameter(torch.randn(table.shape[1]))  # label 0
        self.scale = nn.Parameter(torch.tensor(10.0))
        # --metric whitened: the cosine measured after `whitening` of the table, saved with the
        # head (the joint stage aligns its cached clips with it); rebuilt, not resumed
        self.register_buffer("metric", whitening(table) if metric == "whitened" else None)

    def forward(self, soft: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, V + 1]
        return token_logits(soft, token_keys(self.table, self.blank), self.scale, self.metric)


def decoder_table(base: Path) -> torch.Tensor:
    """The input embeddings the decoder of `base` gives each token id (scaled as it sees them)."""
    from train_tiny_media import load_decoder

    dec = load_decoder(base)[0]
    with torch.no_grad():
        return dec.embed(torch.arange(dec.config.vocab_size)[None])[0]


def ctc_loss(logp: torch.Tensor, labels: list[list[int]], lengths: torch.Tensor) -> torch.Tensor:
    """Mean over clips of CTC per target letter (blank 0), one call per clip: torch's batched CPU
    CTC gradient came out as 1e24 for one clip of a batch that, alone, has gradients below 1."""
    losses = [
        F.ctc_loss(
            logp[b, : lengths[b]], torch.tensor(y), lengths[b : b + 1], torch.tensor([len(y)]), zero_infinity=True
        )
        for b, y in enumerate(labels)
    ]
    return torch.stack(losses).mean()


def spec_augment(feats: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Two frequency masks of up to 12 mel bins and time masks of up to 8 frames per second of
    audio, filled with the clip's mean log-mel value. Not with 0: a clip whose first frames are
    all 0 makes the subsampler's first step exactly 0 (its cumulative group norm has nothing to
    normalise), that step stays 0 through every conformer block (it sees no earlier step), and each
    RMSNorm multiplies its gradient by 1/sqrt(eps): it overflowed to NaN in about 4 % of the steps."""
    feats = feats.clone()
    for b in range(feats.shape[0]):
        fill = feats[b].mean().item()
        for _ in range(2):
            f = rng.randint(0, 12)
            f0 = rng.randint(0, feats.shape[2] - f)
            feats[b, :, f0 : f0 + f] = fill
        for _ in range(feats.shape[1] // 100):
            t = rng.randint(0, 8)
            t0 = rng.randint(0, max(0, feats.shape[1] - t))
            feats[b, t0 : t0 + t] = fill
    return feats


def step_if_finite(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
    """Clip to norm 1 and step, unless a gradient is not finite (a guard: the NaN of 1-4 % of the
    audio tower's steps came from spec_augment's zero masks, now filled with the clip's mean)."""
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    if not torch.isfinite(norm):
        return False
    opt.step()
    return True


def resume(path: Path | None, prefixes: dict[str, nn.Module]) -> None:
    """Continue from an earlier run's file (a new schedule). A file without the head, or with
    another kind of head (letters -> tokens), keeps a fresh one (train it first: --head-steps)."""
    if path is None:
        return
    from safetensors.torch import load_file

    state = load_file(path)
    for prefix, module in prefixes.items():
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if prefix != "head.":
            module.load_state_dict(sub)
            continue
        # never resumed: the table (files of earlier runs hold it) and the metric, both the --decoder's
        saved, metric = sub.get("metric"), getattr(module, "metric", None)
        if saved is not None and metric is not None and not torch.allclose(saved, metric.float()):
            # the file's tower was aimed at another decoder's embeddings (the package's decoder
            # changes as rounds ship): its words are scored against new targets from here on
            print(f"note: {path.name} was trained against another --decoder's embeddings; retargeted", flush=True)
        sub = {k: v for k, v in sub.items() if k not in ("table", "metric")}
        if set(sub) == set(module.state_dict()) - {"metric"}:
            module.load_state_dict(sub, strict=False)


def grow_block(audio: nn.Module) -> None:
    """Append a conformer block that starts as (almost) the identity, so a resumed tower keeps what
    it knows and gains depth: its residual branches start at 0 (each branch's output norm, or the
    light conv's last projection, zeroed) and its closing RMSNorm's scale is the RMS the last block
    outputs at (that block's norm scale, over unit-RMS activations)."""
    last = audio.conformer[-1]
    block = type(last)(audio.config)
    block.load_state_dict(last.state_dict())  # weights a trained block has, then the branches cut
    with torch.no_grad():
        for norm in (
            block.ffw_layer_start.post_layer_norm,
            block.attention.post_norm,
            block.ffw_layer_end.post_layer_norm,
        ):
            norm.weight.zero_()
        block.lconv1d.linear_end.weight.zero_()
        block.norm.weight.fill_(last.norm.weight.pow(2).mean().sqrt().item())
    audio.conformer.append(block)
    audio.config.conf_num_hidden_layers += 1


def cosine(step_s: float, budget_s: float, peak: float, step: int, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, step_s / budget_s))))


def record(args: argparse.Namespace, rows: list[dict], row: dict, prefixes: dict[str, nn.Module]) -> None:
    """An evaluation: printed, added to the CSV, and the tower, embedder and head saved."""
    rows.append(row)
    print(row, flush=True)
    write_csv(args.log, rows)
    save(args.out, prefixes)


def save(out: Path, prefixes: dict[str, nn.Module]) -> None:
    tensors = {p + k: v.detach().float().contiguous() for p, m in prefixes.items() for k, v in m.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    # an audio tower's look-ahead and depth, from its own config; read back by train_tiny_media.tower_shape
    tower = prefixes.get("model.audio_tower.")
    shape = {k: str(getattr(tower.config, k)) for k in TOWER_SHAPE} if tower is not None else {}
    save_file(tensors, tmp, metadata={"format": "pt", **shape})
    tmp.rename(out)


def train_audio(args: argparse.Namespace) -> None:
    import jiwer

    rng, nrng = random.Random(args.seed), np.random.default_rng(args.seed)
    if args.init is not None:
        AUDIO_CONFIG.update(tower_shape(args.init))
    if args.context_right is not None:
        AUDIO_CONFIG["conf_attention_context_right"] = args.context_right
    audio = init_audio_tower(args.seed)
    emb = init_embedder(AUDIO_CONFIG["hidden_size"], TEXT_HIDDEN, AUDIO_CONFIG["vocab_offset"], args.seed + 1)
    clips, held = Clips.load(args.speech / "train"), Clips.load(args.speech / "heldout")
    if args.units == "tokens":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.decoder / "tokenizer.json"))
        head, frames = TokenHead(decoder_table(args.decoder), args.metric), 1
        texts = spoken_transcripts(clips.texts) if args.labels == "spoken" else clips.texts
        labels = [[i + 1 for i in e.ids] for e in tok.encode_batch(texts, add_special_tokens=False)]

        def transcript(best: list[int]) -> str:
            out = [x - 1 for j, x in enumerate(best) if x and (j == 0 or x != best[j - 1])]
            return normalize_words(tok.decode(out))
    else:
        head, frames, transcript = FrameHead(TEXT_HIDDEN, len(LETTERS) + 1), UPSAMPLE, greedy_text
        labels = [letters(t) for t in clips.texts]
    resume(args.init, {"model.audio_tower.": audio, "model.embed_audio.": emb, "head.": head})
    for _ in range(args.grow_blocks):
        grow_block(audio)
    print(f"audio tower: {len(audio.conformer)} blocks, look-ahead {audio.config.conf_attention_context_right}")
    params = [p for m in (audio, emb, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    fe = AudioFeatureExtractor.from_dict(PREPROCESSOR)
    eval_ids = list(range(min(args.eval_clips, len(held))))
    eval_feats = fe([held.wave(i) for i in eval_ids])
    refs = [normalize_words(held.texts[i]) for i in eval_ids]

    def logits_of(feats: torch.Tensor, mask: torch.Tensor, tower: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            with torch.set_grad_enabled(tower and torch.is_grad_enabled()):
                soft, padding = audio(feats, mask)
            out = head(emb.embed_soft(soft)).float()
        return out, (~padding).sum(1) * frames

    @torch.no_grad()
    def evaluate() -> dict:
        audio.eval()
        out, lengths = logits_of(*eval_feats)
        audio.train()
        best = out.argmax(-1)
        hyps = [transcript(best[b, : lengths[b]].tolist()) or "-" for b in range(len(eval_ids))]
        return {"wer": round(jiwer.wer(refs, hyps), 4), "cer": round(jiwer.cer(refs, hyps), 4), "example": hyps[0]}

    rows: list[dict] = []
    t0, step, last_eval, skipped = time.time(), 0, -1e9, 0
    ema = None
    while True:
        elapsed = time.time() - t0
        if elapsed - last_eval >= args.eval_minutes * 60 or elapsed >= args.minutes * 60:
            last_eval = elapsed
            row = {"step": step, "minutes": round(elapsed / 60, 2), "train_ctc": round(ema or 0, 4), "skipped": skipped}
            row.update(evaluate())
            record(args, rows, row, {"model.audio_tower.": audio, "model.embed_audio.": emb, "head.": head})
            if elapsed >= args.minutes * 60:
                break
        for g in opt.param_groups:
            g["lr"] = cosine(elapsed, args.minutes * 60, args.lr, step, args.warmup)
        idx = [rng.randrange(len(clips)) for _ in range(args.batch)]
        feats, mask = fe([augment(clips.wave(i), nrng, bare=args.bare_edges) for i in idx])
        if args.spec_augment:
            feats = spec_augment(feats, rng)
        out, lengths = logits_of(feats, mask, tower=step >= args.head_steps)
        loss = ctc_loss(F.log_softmax(out, -1), [labels[i] for i in idx], lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not step_if_finite(opt, params):
            skipped += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            print(f"step {step} {elapsed:.0f}s ctc {loss.item():.3f} ema {ema:.3f} skipped {skipped}", flush=True)
        step += 1


def train_vision(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    vision = init_vision_tower(args.seed)
    emb = init_embedder(2048, TEXT_HIDDEN, 4096, args.seed + 2)
    head = nn.Linear(IMAGE_TOKENS * TEXT_HIDDEN, len(COLOURS) + len(SHAPES) + len(COUNTS))
    resume(args.init, {"model.vision_tower.timm_model.": vision, "model.embed_vision.": emb, "head.": head})
    params = [p for m in (vision, emb, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    improc = ImageProcessor.from_dict(PREPROCESSOR)
    nc, ns = len(COLOURS), len(SHAPES)
    eval_scenes = [render_scene(random.Random(20_000 + i), random.Random(i).choice((256, 384, 768))) for i in range(96)]

    def attribute_logits(scenes: list, res: int) -> torch.Tensor:
        pixels = improc([im for im, _ in scenes], size=res)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            return head(vision_soft(vision, emb, pixels).flatten(1)).float()

    def truth(scenes: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.tensor([list(COLOURS).index(sc.colour) for _, sc in scenes]),
            torch.tensor([SHAPES.index(sc.shape) for _, sc in scenes]),
            torch.tensor([sc.count - 1 for _, sc in scenes]),
        )

    @torch.no_grad()
    def evaluate() -> dict:
        vision.eval()
        row = {}
        for res in (256, 512, 768):
            out = torch.cat([attribute_logits(eval_scenes[k : k + 16], res) for k in range(0, len(eval_scenes), 16)])
            colour, shape, count = truth(eval_scenes)
            row[f"colour@{res}"] = round((out[:, :nc].argmax(-1) == colour).float().mean().item(), 3)
            row[f"shape@{res}"] = round((out[:, nc : nc + ns].argmax(-1) == shape).float().mean().item(), 3)
            row[f"count@{res}"] = round((out[:, nc + ns :].argmax(-1) == count).float().mean().item(), 3)
        vision.train()
        return row

    rows: list[dict] = []
    t0, step, last_eval = time.time(), 0, -1e9
    ema = None
    sizes = res_weights(args.res_weights)
    per_batch = {256: args.batch, 512: max(2, args.batch // 4), 768: max(1, args.batch // 8)}
    while True:
        elapsed = time.time() - t0
        if elapsed - last_eval >= args.eval_minutes * 60 or elapsed >= args.minutes * 60:
            last_eval = elapsed
            row = {"step": step, "minutes": round(elapsed / 60, 2), "train_attr": round(ema or 0, 4), **evaluate()}
            record(
                args, rows, row, {"model.vision_tower.timm_model.": vision, "model.embed_vision.": emb, "head.": head}
            )
            if elapsed >= args.minutes * 60:
                break
        for g in opt.param_groups:
            g["lr"] = cosine(elapsed, args.minutes * 60, args.lr, step, args.warmup)
        res, scenes = draw_scenes(rng, sizes, per_batch)
        out = attribute_logits(scenes, res)
        loss = attr_loss(out, [sc for _, sc in scenes])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_if_finite(opt, params)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            print(f"step {step} {elapsed:.0f}s res {res} attr {loss.item():.3f} ema {ema:.3f}", flush=True)
        step += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tower", choices=["audio", "vision"])
    ap.add_argument("--out", type=Path, required=True, help="safetensors file of the tower and its embedder")
    ap.add_argument("--speech", type=Path, help="tools/tiny_media_data.py's output (audio)")
    ap.add_argument("--log", type=Path, default=None, help="CSV of the evaluations (default: next to --out)")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget; the cosine spans it")
    ap.add_argument("--eval-minutes", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-clips", type=int, default=48)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPUs with bf16 units)")
    ap.add_argument(
        "--no-spec-augment",
        dest="spec_augment",
        action="store_false",
        help="audio: no frequency and time masks (the waveform's noise, gain and silence stay)",
    )
    ap.add_argument(
        "--bare-edges",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="audio: " + BARE_EDGES_HELP,
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--res-weights", default="256:0.7,512:0.2,768:0.1", help="vision: share of the steps at each image size"
    )
    ap.add_argument(
        "--head-steps",
        type=int,
        default=0,
        help="audio: first steps train the embedder and CTC head alone (resumed: a new head disturbed the tower)",
    )
    ap.add_argument(
        "--units",
        choices=["letters", "tokens"],
        default="letters",
        help="audio CTC labels: letters (8 frames a soft token) or the decoder's tokens (one a soft token, "
        "scored against its input embeddings: --decoder)",
    )
    ap.add_argument(
        "--metric",
        choices=["cosine", "whitened"],
        default="cosine",
        help="--units tokens: score soft tokens by the plain cosine to each token's embedding, or by the "
        "cosine after whitening the decoder's embeddings (tell apart tokens the plain cosine cannot)",
    )
    ap.add_argument(
        "--labels",
        choices=["text", "spoken"],
        default="text",
        help="--units tokens: the tokens of the verse as written, or of `spoken_text` (no punctuation, one "
        "spelling a word, every word after a space: nothing the tower cannot hear)",
    )
    ap.add_argument(
        "--context-right",
        type=int,
        default=None,
        help="audio: conformer attention look-ahead in 40 ms steps (config conf_attention_context_right; "
        "default: the --init file's, else AUDIO_CONFIG's)",
    )
    ap.add_argument(
        "--grow-blocks",
        type=int,
        default=0,
        help="audio: append this many conformer blocks to the --init tower, each starting as the identity",
    )
    ap.add_argument("--decoder", type=Path, default=ROOT / "gemma3n" / "data" / "tiny", help="--units tokens: whose")
    ap.add_argument("--init", type=Path, default=None, help="continue from this earlier --out (a new schedule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out and --log")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.log = args.log or args.out.with_suffix(".csv")
    refuse_to_clobber([args.out, args.log], args.force)
    if args.tower == "audio":
        if args.speech is None:
            ap.error("audio needs --speech")
        train_audio(args)
    else:
        train_vision(args)


if __name__ == "__main__":
    main()
