"""Build a tiny, *random-weight* Gemma 3n text checkpoint in the real Hugging Face layout, plus a
small byte-level BPE tokenizer with the Gemma special tokens (ids 0..12, SPECIAL_TOKENS).

gemma3n/data/tiny (the default when no --model is given) is still this random model: every code
path of the real architecture (AltUp, LAuReL, PLE, KV sharing, sliding/global layers, sparsity),
with gibberish text. Its trained replacement is built by tools/train_tiny.py (issue #7), which
reuses `build_tokenizer` and `save_checkpoint` from here; this builder stays for tests.
Deterministic for a given --seed.

    python tools/make_tiny.py --out DIR [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma3n.config import TextConfig  # noqa: E402
from gemma3n.text import TextDecoder  # noqa: E402

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<start_of_audio>",
    "<end_of_audio>",
    "<audio_soft_token>",
]


def corpus() -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    zen = codecs.decode(this.s, "rot13").splitlines()
    extra = [
        "The quick brown fox jumps over the lazy dog.",
        "Gemma 3n runs on laptops, phones and small GPUs: text, images and audio.",
        "user model assistant system question answer hello world please thank you",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 é à ü ß 日本語 — “quotes” … 🙂",
    ]
    return zen + extra


def build_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None) -> Tokenizer:
    """Byte-level BPE (every byte representable; multi-byte characters span tokens), trained on
    `texts` (default: the small built-in `corpus()`), with SPECIAL_TOKENS at ids 0..12."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() * 4 if texts is None else texts, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok


def tiny_text_config(vocab_size: int, tok: Tokenizer) -> TextConfig:
    n = 10  # two 5-layer periods (4 sliding + 1 global); the top period shares K/V
    return TextConfig(
        num_hidden_layers=n,
        intermediate_size=[256] * n,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)],
        activation_sparsity_pattern=[0.95] * 2 + [0.0] * (n - 2),
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size=64,
        hidden_size_per_layer_input=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        sliding_window=64,
        laurel_rank=8,
        num_kv_shared_layers=5,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<bos>"),
        eos_token_id=[tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")],
    )


def random_state(cfg: TextConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of sane scale: norms near 1, matrices ~N(0, 0.02-0.2)."""
    torch.manual_seed(seed)
    decoder = TextDecoder(cfg)
    state = {}
    for name, t in decoder.state_dict().items():
        if "norm" in name or name.endswith("correct_output_scale"):
            state[name] = 1.0 + 0.1 * torch.randn(t.shape)
        elif "coefs" in name:
            state[name] = 0.1 * torch.randn(t.shape)
        else:
            state[name] = torch.randn(t.shape) * (0.2 if name.startswith("embed") else t.shape[-1] ** -0.5)
    n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    state["embed_tokens_per_layer.weight"] = 0.2 * torch.randn(cfg.vocab_size_per_layer_input, n * p)
    return state


def write_model(out: Path, *, seed: int = 0, force: bool = False) -> Path:
    """The random-weight tiny model (used by tests; tools/train_tiny.py builds the shipped one)."""
    tok = build_tokenizer()
    cfg = tiny_text_config(tok.get_vocab_size(), tok)
    readme = (
        "# gemma3n tiny default model (random weights)\n\n"
        f"Built by `tools/make_tiny.py --seed {seed}`: the Gemma 3n text architecture at toy size "
        f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}), random weights. "
        "It exercises every code path; its text is not meaningful.\n"
    )
    return save_checkpoint(out, tok, cfg, random_state(cfg, seed), readme, force=force)


def save_checkpoint(
    out: Path,
    tok: Tokenizer,
    cfg: TextConfig,
    state: dict[str, torch.Tensor],
    readme: str,
    *,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    ple_dtype: torch.dtype | None = None,
) -> Path:
    """Write a text-only checkpoint in the Hugging Face layout: config.json (`gemma3n_text`),
    model.safetensors (`model.` names, incl. `embed_tokens_per_layer.weight`), tokenizer files,
    generation_config.json and a README.md model card. `ple_dtype` stores the per-layer embedding
    table in another dtype (it is only ever gathered row by row, on the host)."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SystemExit(f"{out} is not empty; pass --force to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            f"model.{k}": v.detach()
            .to(ple_dtype if ple_dtype and k == "embed_tokens_per_layer.weight" else dtype)
            .contiguous()
            for k, v in state.items()
        },
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    dtype_name = str(dtype).removeprefix("torch.")
    config = cfg.to_dict() | {"architectures": ["Gemma3nForCausalLM"], "torch_dtype": dtype_name}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "model_max_length": cfg.max_position_embeddings,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 1.0,
                "top_k": 64,
                "top_p": 0.95,
                "eos_token_id": cfg.eos_token_id,
                "bos_token_id": cfg.bos_token_id,
                "pad_token_id": cfg.pad_token_id,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "README.md").write_text(readme)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, required=True, help="output directory (the shipped model is trained: train_tiny.py)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    print(write_model(args.out, seed=args.seed, force=args.force))


if __name__ == "__main__":
    main()
