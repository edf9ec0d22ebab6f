"""Write a random-weight Gemma 3n checkpoint with the real E2B / E4B shapes and Hugging Face layout.

Layout (what ``google/gemma-3n-E2B-it`` ships, docs/text-decoder.md#config-fields and #checkpoint-tensors):

- ``config.json``: top-level ``model_type: gemma3n`` with ``text_config`` (every config field, in the hub's
  4.53-era spelling: ``rope_theta`` / ``rope_local_base_freq``), plus ``vision_config`` / ``audio_config``.
- ``model-0000k-of-0000n.safetensors`` bf16 shards and ``model.safetensors.index.json``.
- Text tensors are named ``model.language_model.*``; the tied LM head is *not* stored.
- Without ``--text-only`` the vision / audio towers and the two multimodal embedders are written too; their
  names and shapes are taken from transformers' ``Gemma3nForConditionalGeneration`` built on the meta device
  (needs transformers + timm). With ``--text-only`` they are left out and the config stays loadable.

Which transformers 5.24 class loads what (checked by ``bench/README.md``'s recipe):

- ``Gemma3nForCausalLM.from_pretrained(dir)`` picks the nested ``text_config`` and maps
  ``model.language_model.`` -> ``model.`` (``PrefixChange``); the shared layers' k/v/k_norm are ignored
  on purpose. Works for both ``--text-only`` and full checkpoints (tower tensors are then unexpected keys).
- ``Gemma3nForConditionalGeneration`` needs the tower tensors (not ``--text-only``).

Also written: ``generation_config.json`` and a placeholder word-level ``tokenizer.json`` (every id is a
word ``t<id>``, Gemma's special tokens at their real ids) so that runtimes which require a tokenizer load.

The writer streams: each tensor is generated in row chunks and written straight to its shard file (a
safetensors header is computed first from the shapes), so peak RSS stays at a few hundred MB even for the
4 GB per-layer-embedding table. Weights are deterministic given ``--seed`` (each tensor has its own
generator seeded from the seed and the tensor name, so the shard size does not change the values).

Usage::

    python tools/make_random_checkpoint.py --shape E2B --text-only --out /work/ckpt/e2b
    python tools/make_random_checkpoint.py --shape E2B --layers 10 --text-only --out /work/ckpt/e2b-l10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch

# --- shapes (docs/text-decoder.md#config-fields) -------------------------------------------------------------

SHAPES: dict[str, dict] = {
    "E2B": {"num_hidden_layers": 30, "intermediate_size": 8192, "num_kv_shared_layers": 10, "sparse": 10},
    "E4B": {"num_hidden_layers": 35, "intermediate_size": 16384, "num_kv_shared_layers": 15, "sparse": 10},
}
D = 2048
P = 256
V = 262_400
VP = 262_144
HQ, HKV, HD = 8, 2, 256
R = 64
N_ALTUP = 4


def layer_types_for(n_layers: int) -> list[str]:
    # 4 sliding + 1 full, repeated: full layers at 4, 9, 14, ... (`layer_types`).
    return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n_layers)]


def text_config(shape: str, n_layers: int | None = None) -> dict:
    """The `text_config` dict (hub spelling), optionally cut to `n_layers` with the same proportions."""
    s = SHAPES[shape]
    full_l = s["num_hidden_layers"]
    n = full_l if n_layers is None else n_layers
    if n == full_l:
        shared, sparse = s["num_kv_shared_layers"], s["sparse"]
    else:
        # Keep the proportions of the real model (E2B: 1/3 shared, 1/3 sparse).
        shared = round(n * s["num_kv_shared_layers"] / full_l)
        sparse = round(n * s["sparse"] / full_l)
    if n - shared < 5:
        raise SystemExit(
            f"--layers {n}: needs at least 5 non-shared layers so both attention types own a KV cache "
            f"(would share {shared}); use --layers >= {5 + math.ceil(5 * s['num_kv_shared_layers'] / full_l)}"
        )
    return {
        "activation_sparsity_pattern": [0.95] * sparse + [0.0] * (n - sparse),
        "altup_active_idx": 0,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "altup_lr_multiplier": 1.0,
        "altup_num_inputs": N_ALTUP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": HD,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": D,
        "hidden_size_per_layer_input": P,
        "initializer_range": 0.02,
        "intermediate_size": [s["intermediate_size"]] * n,
        "laurel_rank": R,
        "layer_types": layer_types_for(n),
        "max_position_embeddings": 32768,
        "model_type": "gemma3n_text",
        "num_attention_heads": HQ,
        "num_hidden_layers": n,
        "num_key_value_heads": HKV,
        "num_kv_shared_layers": shared,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": V,
        "vocab_size_per_layer_input": VP,
    }


# Towers: the hub's vision / audio sub-configs (values of google/gemma-3n-E2B-it; identical for E4B).
VISION_CONFIG = {
    "architecture": "mobilenetv5_300m_enc",
    "do_pooling": False,
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "label_names": ["LABEL_0", "LABEL_1"],
    "model_args": None,
    "model_type": "gemma3n_vision",
    "num_classes": 2,
    "rms_norm_eps": 1e-06,
    "torch_dtype": "bfloat16",
    "vocab_offset": 262144,
    "vocab_size": 128,
}
AUDIO_CONFIG = {
    "conf_attention_chunk_size": 12,
    "conf_attention_context_left": 13,
    "conf_attention_context_right": 0,
    "conf_attention_logit_cap": 50.0,
    "conf_conv_kernel_size": 5,
    "conf_num_attention_heads": 8,
    "conf_num_hidden_layers": 12,
    "conf_reduction_factor": 4,
    "conf_residual_weight": 0.5,
    "gradient_clipping": 10000000000.0,
    "hidden_size": 1536,
    "input_feat_size": 128,
    "model_type": "gemma3n_audio",
    "rms_norm_eps": 1e-06,
    "sscp_conv_channel_size": [128, 32],
    "sscp_conv_group_norm_eps": 0.001,
    "sscp_conv_kernel_size": [[3, 3], [3, 3]],
    "sscp_conv_stride_size": [[2, 2], [2, 2]],
    "torch_dtype": "bfloat16",
    "vocab_offset": 262272,
    "vocab_size": 128,
}


def full_config(tc: dict) -> dict:
    return {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "audio_config": AUDIO_CONFIG,
        "audio_soft_tokens_per_image": 188,
        "audio_token_id": 262273,
        "boa_token_id": 256000,
        "boi_token_id": 255999,
        "eoa_token_id": 262272,
        "eoi_token_id": 262144,
        "eos_token_id": [1, 106],
        "image_token_id": 262145,
        "initializer_range": 0.02,
        "model_type": "gemma3n",
        "text_config": tc,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.0",
        "vision_config": VISION_CONFIG,
        "vision_soft_tokens_per_image": 256,
    }


# --- tokenizer (placeholder: real special-token ids, one dummy word per other id) -----------------------

SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 255999,
    "<start_of_audio>": 256000,
    "<end_of_image>": 262144,
    "<image_soft_token>": 262145,
    "<end_of_audio>": 262272,
    "<audio_soft_token>": 262273,
}


def write_tokenizer(out: str, vocab_size: int = V) -> None:
    """A word-level tokenizer.json covering every id (``t<id>`` words, Gemma special ids in place).

    Benchmarks feed token ids; this only exists so runtimes that insist on a tokenizer can load the
    checkpoint and detokenize. It is not Gemma's SentencePiece vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    by_id = {i: t for t, i in SPECIAL_IDS.items()}
    vocab = {by_id.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    tok.save(os.path.join(out, "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "model_max_length": 32768,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)


# --- tensor plan ---------------------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" (std), "ones" (1 + std*noise), "zeros", "embed" (normal + pad-row copies)
    std: float = 0.02
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def text_specs(tc: dict) -> list[Spec]:
    """Every `model.language_model.*` tensor, in hub order (globals first, then layers)."""
    n = tc["num_hidden_layers"]
    pre = "model.language_model."
    out = [
        Spec(pre + "embed_tokens.weight", (V, D), "embed", 0.02),
        Spec(pre + "embed_tokens_per_layer.weight", (VP, n * P), "normal", 0.02),
        Spec(pre + "per_layer_model_projection.weight", (n * P, D), "normal", 0.02),
        Spec(pre + "per_layer_projection_norm.weight", (P,), "ones", 0.05),
    ]
    for k in range(N_ALTUP - 1):
        out.append(Spec(f"{pre}altup_projections.{k}.weight", (D, D), "normal", 0.02))
    for k in range(N_ALTUP - 1):
        out.append(Spec(f"{pre}altup_unembed_projections.{k}.weight", (D, D), "normal", 0.02))
    out.append(Spec(pre + "norm.weight", (D,), "ones", 0.05))
    for i in range(n):
        inter = tc["intermediate_size"][i]
        lp = f"{pre}layers.{i}."
        out += [
            Spec(lp + "input_layernorm.weight", (D,), "ones", 0.05),
            Spec(lp + "post_attention_layernorm.weight", (D,), "ones", 0.05),
            Spec(lp + "pre_feedforward_layernorm.weight", (D,), "ones", 0.05),
            Spec(lp + "post_feedforward_layernorm.weight", (D,), "ones", 0.05),
            Spec(lp + "post_per_layer_input_norm.weight", (D,), "ones", 0.05),
            Spec(lp + "self_attn.q_proj.weight", (HQ * HD, D), "normal", 0.02),
            Spec(lp + "self_attn.k_proj.weight", (HKV * HD, D), "normal", 0.02),
            Spec(lp + "self_attn.v_proj.weight", (HKV * HD, D), "normal", 0.02),
            Spec(lp + "self_attn.o_proj.weight", (D, HQ * HD), "normal", 0.02),
            Spec(lp + "self_attn.q_norm.weight", (HD,), "ones", 0.05),
            Spec(lp + "self_attn.k_norm.weight", (HD,), "ones", 0.05),
            Spec(lp + "mlp.gate_proj.weight", (inter, D), "normal", 0.02),
            Spec(lp + "mlp.up_proj.weight", (inter, D), "normal", 0.02),
            Spec(lp + "mlp.down_proj.weight", (D, inter), "normal", 0.02),
            Spec(lp + "altup.correct_output_scale", (D,), "ones", 0.05),
            # AltUp coefficients small so the 4-stream mixing stays near the identity (docs/text-decoder.md#altup).
            Spec(lp + "altup.correction_coefs.weight", (N_ALTUP, N_ALTUP), "normal", 0.01),
            Spec(lp + "altup.prediction_coefs.weight", (N_ALTUP * N_ALTUP, N_ALTUP), "normal", 0.01),
            Spec(lp + "altup.modality_router.weight", (N_ALTUP, D), "normal", 0.02),
            Spec(lp + "altup.router_norm.weight", (D,), "ones", 0.05),
            Spec(lp + "laurel.linear_left.weight", (R, D), "normal", 0.02),
            Spec(lp + "laurel.linear_right.weight", (D, R), "normal", 0.02),
            Spec(lp + "laurel.post_laurel_norm.weight", (D,), "ones", 0.05),
            Spec(lp + "per_layer_input_gate.weight", (P, D), "normal", 0.02),
            Spec(lp + "per_layer_projection.weight", (D, P), "normal", 0.02),
        ]
    return out


def tower_specs(cfg: dict) -> list[Spec]:
    """Vision/audio tower + multimodal embedder tensors, names and shapes from transformers (meta device)."""
    try:
        from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration
    except ImportError as e:  # pragma: no cover - depends on the env
        raise SystemExit(f"tower weights need transformers (+timm): {e}; or pass --text-only") from e
    hf_cfg = Gemma3nConfig.from_dict(cfg)
    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(hf_cfg)
    out = []
    for name, t in model.state_dict().items():
        if name.startswith("model.language_model.") or name == "lm_head.weight":
            continue
        if not t.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "bias"):
            out.append(Spec(name, tuple(t.shape), "zeros"))
        elif leaf == "running_var" or t.dim() == 1:
            out.append(Spec(name, tuple(t.shape), "ones", 0.05))
        else:
            fan_in = math.prod(t.shape[1:]) if t.dim() > 1 else 1
            out.append(Spec(name, tuple(t.shape), "normal", min(0.02, 1.0 / math.sqrt(fan_in))))
    return out


# --- generation and streaming safetensors writer -------------------------------------------------------

CHUNK_ELEMS = 1 << 24  # 16 M values (64 MB fp32) per generation step


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF


def iter_chunks(spec: Spec, seed: int):
    """Yield the tensor as bf16 row blocks (deterministic given seed + name)."""
    g = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    rows = spec.shape[0]
    row_elems = spec.numel // rows if rows else 0
    block = max(1, CHUNK_ELEMS // max(1, row_elems))
    first_row = None
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        shape = (r1 - r0,) + spec.shape[1:]
        if spec.kind == "zeros":
            t = torch.zeros(shape, dtype=torch.bfloat16)
        elif spec.kind == "ones":
            t = (1.0 + spec.std * torch.randn(shape, generator=g)).to(torch.bfloat16)
        else:
            t = torch.randn(shape, generator=g).mul_(spec.std).to(torch.bfloat16)
        if spec.kind == "embed":
            # Rows >= 262144 of embed_tokens are copies of the pad row 0 (as the hub conversion does).
            if r0 == 0:
                first_row = t[0].clone()
            lo = max(r0, VP)
            if lo < r1:
                t[lo - r0 :] = first_row
        yield t


def plan_shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        b = s.numel * 2
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += b
    return shards


def write_shard(path: str, specs: list[Spec], seed: int) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [off, off + s.numel * 2]}
        off += s.numel * 2
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for s in specs:
            for t in iter_chunks(s, seed):
                f.write(t.contiguous().view(torch.int16).numpy().tobytes())
        assert f.tell() == 8 + len(hb) + off, path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="E2B")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, real widths")
    ap.add_argument("--text-only", action="store_true", help="leave out the vision/audio towers' weights")
    ap.add_argument("--out", default=None, help="output dir (default /work/ckpt/<shape>[-l<N>][-text])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0, help="target shard size in GB (default 2)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output dir")
    ap.add_argument("--tokenizer-only", action="store_true", help="(re)write only the tokenizer files")
    args = ap.parse_args(argv)

    tc = text_config(args.shape, args.layers)
    out = args.out or (
        f"/work/ckpt/{args.shape.lower()}"
        + (f"-l{args.layers}" if args.layers else "")
        + ("-text" if args.text_only else "")
    )
    if args.tokenizer_only:
        os.makedirs(out, exist_ok=True)
        write_tokenizer(out)
        print(f"wrote {out}/tokenizer.json")
        return 0
    if os.path.exists(out) and os.listdir(out):
        if not args.force:
            print(f"{out} exists and is not empty; pass --force to overwrite", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)

    cfg = full_config(tc)
    specs = text_specs(tc)
    if not args.text_only:
        specs += tower_specs(cfg)
    shards = plan_shards(specs, int(args.shard_gb * 1e9))
    total = sum(s.numel for s in specs)
    print(
        f"writing {args.shape} L={tc['num_hidden_layers']} shared={tc['num_kv_shared_layers']} "
        f"{len(specs)} tensors, {total / 1e9:.3f} B params, {total * 2 / 1e9:.2f} GB bf16, "
        f"{len(shards)} shards -> {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    weight_map = {}
    n = len(shards)
    for k, sh in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_shard(os.path.join(out, fname), sh, args.seed)
        for s in sh:
            weight_map[s.name] = fname
        print(
            f"  {fname}: {len(sh)} tensors, {sum(s.numel for s in sh) * 2 / 1e9:.2f} GB, "
            f"t={time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}, f, indent=2)
    write_tokenizer(out)
    dt = time.perf_counter() - t0
    print(f"done in {dt:.1f}s, peak RSS {peak_rss_gb():.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
