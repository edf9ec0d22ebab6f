"""Give the embedded model ears and eyes: train a USM-shaped audio tower and a MobileNet-V5-shaped
vision tower, with their multimodal embedders, onto the KJV-trained tiny text decoder, and write
the result as a Gemma 3n checkpoint in the Hugging Face multimodal layout
(`model.language_model.*`, `model.audio_tower.*`, `model.vision_tower.timm_model.*`,
`model.embed_audio.*`, `model.embed_vision.*`; config.json with audio_config / vision_config).

The towers are Gemma 3n's own architectures at toy size, built by the runtime's classes (the audio
encoder `gemma3n.audio_encoder.AudioEncoder`) and by timm's MobileNet-V5 builder (the same
`mobilenetv5_300m_enc` architecture with small block arguments), fed by the runtime's feature
extractor (16 kHz, 128 mel bins, one soft token per 160 ms) and image processor.

Data (tools/tiny_media_data.py): espeak-ng speech of KJV verses from the training chapters, noise
and silence added on the fly; Pillow scenes with colour / shape / count questions, rendered on the
fly at 256, 512 or 768 px.

Every step sums three losses:
- speech: the transcript's next-token loss after "Transcribe this audio:" and the clip, plus a CTC
  loss on the audio tower's output tokens (a training-only head, not shipped: it teaches the tower
  which words sit where long before the decoder's loss alone would);
- images: the answer's next-token loss after the image and a question;
- text: the KJV next-token loss of the full model and of the E2B-like sub-model (replay), so the
  fine-tuned decoder keeps its text perplexity and its MatFormer sub-model.
The decoder is fine-tuned at a lower learning rate than the new towers. The learning rate follows a
cosine over a wall-clock budget (`--minutes`), so the same recipe runs longer where there is time.
Checkpoints are written at every evaluation, so the run can be stopped at any time.

The second round starts from towers pre-trained alone (tools/pretrain_tiny_towers.py: --init-audio,
--init-vision; frozen unless --audio-lr-scale / --vision-lr-scale), with --ctc-weight 0 and
--frozen-share 0 (docs/tiny-media.md has the commands).

    python tools/tiny_media_data.py --out /work/tiny-mm/speech
    python tools/train_tiny_media.py --base /tmp/tiny --speech /work/tiny-mm/speech \\
        --out /work/tiny-mm/run --minutes 60
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kjv_corpus import kjv_chapters, split, token_stream  # noqa: E402
from tiny_media_data import (  # noqa: E402
    BARE_EDGES_HELP,
    COLOURS,
    COUNTS,
    QUESTIONS,
    SHAPES,
    SR,
    Clips,
    Scene,
    augment,
    normalize_words,
    render_scene,
    spoken_transcripts,
    verses,
)
from train_tiny import held_out_loss, loss_of, plans  # noqa: E402  (importing it patches AltUp for autograd)

from gemma3n.audio import AudioFeatureExtractor  # noqa: E402
from gemma3n.audio_encoder import (  # noqa: E402
    AudioEncoder,
    AudioEncoderConfig,
    CumulativeGroupNorm,
    SSCPConvBlock,
)
from gemma3n.config import TextConfig  # noqa: E402
from gemma3n.image import ImageProcessor  # noqa: E402
from gemma3n.multimodal import MultimodalEmbedder  # noqa: E402
from gemma3n.speech import speech_prompt  # noqa: E402
from gemma3n.text import TextDecoder  # noqa: E402
from gemma3n.tokenizer import MEDIA_TOKENS  # noqa: E402


def _sscp_forward_for_autograd(self: SSCPConvBlock, x: torch.Tensor) -> torch.Tensor:
    """`SSCPConvBlock.forward` normalises the conv output in place, which autograd cannot
    differentiate; the same operations out of place (training only: this script never serves)."""
    x = F.pad(x, (0, 0, 1, 1, 0, self.time_pad))
    x = F.conv2d(x.permute(0, 3, 1, 2), self.conv.weight.to(x.dtype), stride=self.conv.stride)
    x = x.permute(0, 2, 3, 1).contiguous()
    scale, shift = self.norm.scale_shift(x)
    return torch.relu(x.float() * scale + shift).to(x.dtype)


def _scale_shift_for_autograd(self: CumulativeGroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`CumulativeGroupNorm.scale_shift` with the sum of squares as a plain sum: the runtime's
    vector norm has a NaN gradient on the all-zero rows of padded clips."""
    h = x.float()
    b, t, f, c = h.shape
    s1, s2 = h.sum((2, 3)).double(), h.pow(2).sum((2, 3)).double()
    count = torch.arange(1, t + 1, device=h.device, dtype=torch.float64) * (f * c)
    mu = s1.cumsum(1) / count
    var = (s2 - 2 * mu * s1 + (f * c) * mu.pow(2)).cumsum(1) / count
    scale = torch.rsqrt(var + self.eps).float()[:, :, None, None] * self.weight.float()
    return scale, -mu.float()[:, :, None, None] * scale


SSCPConvBlock.forward = _sscp_forward_for_autograd
CumulativeGroupNorm.scale_shift = _scale_shift_for_autograd

# --------------------------------------------------------------------------------------------
# Tower shapes: the USM conformer and MobileNet-V5 of docs/audio-vision.md, at toy size

AUDIO_WINDOW_SAMPLES = 160_000  # 10 s: the longest clip the tiny encoder takes in one piece
AUDIO_TOKENS = 63  # soft tokens of a 10 s window (docs/audio-vision.md); shorter clips are padded to it
IMAGE_TOKENS = 16  # MSFA output 4 x 4
AUDIO_CONFIG = {
    "model_type": "gemma3n_audio",
    "hidden_size": 128,
    "input_feat_size": 128,
    "conf_num_hidden_layers": 4,
    "conf_num_attention_heads": 4,
    "conf_attention_chunk_size": 12,
    "conf_attention_context_left": 13,
    "conf_attention_context_right": 0,
    "conf_attention_logit_cap": 50.0,
    "conf_conv_kernel_size": 5,
    "conf_reduction_factor": 4,
    "conf_residual_weight": 0.5,
    "gradient_clipping": 1e10,
    "rms_norm_eps": 1e-6,
    "sscp_conv_channel_size": [32, 16],
    "sscp_conv_group_norm_eps": 1e-3,
    "sscp_conv_kernel_size": [[3, 3], [3, 3]],
    "sscp_conv_stride_size": [[2, 2], [2, 2]],
    "vocab_size": 128,
    "vocab_offset": 4096 + 128,
}
# MobileNet-V5's stage pattern (ER stem stage; UIR with dw_start + dw_mid stride 2; UIR FFNs; mobile
# MQA with kv_stride 2 in stage 2 and 1 in stage 3), narrow and shallow; MSFA fuses stages 2 and 3.
VISION_ARCH = [
    ["er_r1_k3_s2_e4_c16"],
    ["uir_r1_a3_k5_s2_e4_c24", "uir_r1_a3_k0_s1_e4_c24"],
    [
        "uir_r1_a5_k5_s2_e4_c48",
        "mqa_r1_k3_h4_v2_s1_d16_c48",
        "uir_r1_a0_k0_s1_e2_c48",
        "mqa_r1_k3_h4_v2_s1_d16_c48",
        "uir_r1_a0_k0_s1_e2_c48",
    ],
    ["uir_r1_a5_k5_s2_e4_c64", "mqa_r1_k3_h4_s1_d16_c64", "uir_r1_a0_k0_s1_e2_c64"],
]
PREPROCESSOR = {
    "processor_class": "Gemma3nProcessor",
    "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
    "sampling_rate": SR,
    "feature_size": 128,
    "frame_length_ms": 32.0,
    "hop_length_ms": 10.0,
    "fft_overdrive": True,
    "preemphasis": 0.97,
    "preemphasis_htk_flavor": True,
    "min_frequency": 125.0,
    "max_frequency": 7600.0,
    "mel_floor": 1e-5,
    "dither": 0.0,
    "input_scale_factor": 1.0,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "max_length": AUDIO_WINDOW_SAMPLES,
    "image_processor_type": "SiglipImageProcessorFast",
    "size": {"height": 768, "width": 768},
    "resample": 2,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": False,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_seq_length": IMAGE_TOKENS,
    "audio_seq_length": AUDIO_TOKENS,
}
RES_WEIGHTS = "256:0.6,512:0.25,768:0.15"  # training share of each image size (768 costs 9x 256)


def res_weights(spec: str) -> dict[int, float]:
    """`--res-weights` "256:0.6,512:0.25,768:0.15" -> {256: 0.6, ...}: the share of steps at each size."""
    try:
        sizes = {int(k): float(v) for k, v in (item.split(":") for item in spec.split(","))}
    except ValueError:
        raise SystemExit(f"--res-weights {spec!r}: expected SIZE:SHARE,... such as {RES_WEIGHTS}") from None
    if not sizes or any(k not in (256, 512, 768) or v < 0 for k, v in sizes.items()) or not sum(sizes.values()):
        raise SystemExit(f"--res-weights {spec!r}: sizes are 256, 512 or 768, shares >= 0 and not all 0")
    return sizes


def refuse_to_clobber(paths: list[Path], force: bool) -> None:
    """A run rewrites its checkpoint and CSV at every evaluation: an earlier run's are overwritten
    only when asked (--force)."""
    taken = [str(p) for p in paths if p.exists()]
    if taken and not force:
        raise SystemExit(f"{', '.join(taken)}: already there (another run's?); choose another path or pass --force")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Every evaluation so far, one row each, under the union of their columns (rewritten each time)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def images_per_batch(batch: int) -> dict[int, int]:
    """Images in a step at each size for `batch` at 256 px: fewer at larger sizes (a 768-px image costs
    about 9 of a 256-px one); the ratios are the first two rounds' 8 / 4 / 2."""
    return {256: batch, 512: max(2, batch // 2), 768: max(1, batch // 4)}


def vision_config() -> dict:
    from timm.models._efficientnet_builder import decode_arch_def

    return {
        "model_type": "gemma3n_vision",
        "architecture": "mobilenetv5_300m_enc",
        "model_args": {
            "block_args": json.loads(json.dumps(decode_arch_def(VISION_ARCH))),
            "stem_size": 8,
            "msfa_output_resolution": 4,
        },
        "do_pooling": False,
        "hidden_size": 2048,  # timm's MobileNetV5Encoder fixes the MSFA width at 2048
        "rms_norm_eps": 1e-6,
        "vocab_size": 128,
        "vocab_offset": 4096,
    }


# --------------------------------------------------------------------------------------------
# Models


def load_text_decoder(dec: TextDecoder, state: dict[str, torch.Tensor]) -> None:
    """Every `model.language_model.*` weight of `state` (a joint run's checkpoint, or a decoder kept
    by save_text_decoder) into `dec`, in fp32; none missing, none left over."""
    text = {
        k.removeprefix("model.language_model."): v.float()
        for k, v in state.items()
        if k.startswith("model.language_model.")
    }
    if "embed_tokens_per_layer.weight" not in text:
        raise SystemExit("no model.language_model.* text decoder in the file given")
    with torch.no_grad():
        dec.embed_tokens_per_layer.copy_(text.pop("embed_tokens_per_layer.weight"))
    result = dec.load_state_dict(text, strict=False)
    if result.missing_keys != ["embed_tokens_per_layer"] or result.unexpected_keys:
        raise SystemExit(f"the text decoder's weights do not match the model: {result}")


def decoder_path(ckpt: Path) -> Path:
    """Where a checkpoint's text decoder is kept alone, in bf16: beside it, like its heads."""
    return ckpt.with_name(ckpt.name + "-decoder.safetensors")


def save_text_decoder(ckpt: Path) -> None:
    """The checkpoint's text decoder alone, in bf16 (half the bytes; resumed in fp32: --decoder-file),
    so that a decoder that has learnt to read the audio tower can be kept in the repository between
    machines (tools/checkpoints)."""
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    text = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items() if k.startswith("model.language_model.")}
    tmp = decoder_path(ckpt).with_suffix(".tmp")
    save_file(text, str(tmp), metadata={"format": "pt"})
    tmp.replace(decoder_path(ckpt))


def load_decoder(base: Path, sliding_window: int | None = None) -> tuple[TextDecoder, TextConfig, dict]:
    """The text decoder of `base` (text-only `model.*` or multimodal `model.language_model.*`), its
    sliding-attention window optionally widened (no weight depends on it)."""
    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config", config)
    if sliding_window is not None:
        text["sliding_window"] = sliding_window
    cfg = TextConfig.from_dict(text)
    dec = TextDecoder(cfg)
    state = {}
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        for k in f.keys():
            for prefix in ("model.language_model.", "model."):
                if k.startswith(prefix) and not k.startswith(
                    ("model.audio_tower", "model.vision_tower", "model.embed_audio", "model.embed_vision")
                ):
                    state[k[len(prefix) :]] = f.get_tensor(k).float()
                    break
    ple = state.pop("embed_tokens_per_layer.weight")
    dec.load_state_dict(state, strict=True)
    dec.embed_tokens_per_layer = nn.Parameter(ple)
    return dec, cfg, text


PREFIXES = {
    "audio": "model.audio_tower.",
    "vision": "model.vision_tower.timm_model.",
    "embed_audio": "model.embed_audio.",
    "embed_vision": "model.embed_vision.",
}


# the audio tower's config fields a tower file may change (tools/pretrain_tiny_towers.py writes them
# in its metadata) and their values in files without them: AUDIO_CONFIG's own (earlier rounds')
TOWER_SHAPE = {k: AUDIO_CONFIG[k] for k in ("conf_attention_context_right", "conf_num_hidden_layers")}


def tower_shape(path: Path) -> dict[str, int]:
    """The audio tower's shape a tower file was trained with: TOWER_SHAPE's fields."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return {k: int(meta.get(k, default)) for k, default in TOWER_SHAPE.items()}


def init_audio_tower(seed: int) -> AudioEncoder:
    torch.manual_seed(seed)
    enc = AudioEncoder(AudioEncoderConfig.from_dict(AUDIO_CONFIG))
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("per_dim_scale"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            elif p.dim() == 2:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return enc.train()


def init_vision_tower(seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    args = copy.deepcopy(vision_config()["model_args"])
    model = timm.create_model("mobilenetv5_300m_enc", pretrained=False, num_classes=0, **args)
    with torch.no_grad():  # layer scales start at 1e-5 in timm: too timid for a short run
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.1)
    return model.train()


def init_embedder(hidden: int, text_hidden: int, offset: int, seed: int) -> MultimodalEmbedder:
    torch.manual_seed(seed)
    emb = MultimodalEmbedder(hidden, text_hidden, offset, 128, 1e-6)
    with torch.no_grad():
        emb.embedding.weight.normal_(0, 0.02)
        nn.init.xavier_uniform_(emb.embedding_projection.weight)
    return emb


# --------------------------------------------------------------------------------------------
# The checkpoint


def write_checkpoint(out: Path, base: Path, text_cfg: dict, parts: dict[str, nn.Module], readme: str) -> None:
    """The multimodal checkpoint, written aside and renamed into place (a reader never sees half)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dec = parts["decoder"]
    tensors: dict[str, torch.Tensor] = {}
    for k, v in dec.state_dict().items():
        if k != "embed_tokens_per_layer":
            tensors[f"model.language_model.{k}"] = v.detach().float().contiguous()
    # the PLE table in bf16, as the text-only model stored it: it is only gathered row by row
    tensors["model.language_model.embed_tokens_per_layer.weight"] = (
        dec.embed_tokens_per_layer.detach().to(torch.bfloat16).contiguous()
    )
    for name, prefix in PREFIXES.items():
        if name in parts:  # a run --without-audio writes the vision tower alone
            for k, v in parts[name].state_dict().items():
                tensors[prefix + k] = v.detach().float().contiguous()
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    text = dict(text_cfg, model_type="gemma3n_text")
    text.pop("architectures", None)
    text.pop("torch_dtype", None)
    config = {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text,
        **({"audio_config": AUDIO_CONFIG, "audio_soft_tokens_per_image": AUDIO_TOKENS} if "audio" in parts else {}),
        "vision_config": vision_config(),
        "vision_soft_tokens_per_image": IMAGE_TOKENS,
        # the tokenizer's own ids: its media tokens sit inside the 4096-token text vocabulary
        "boi_token_id": 7,
        "eoi_token_id": 8,
        "image_token_id": 9,
        "boa_token_id": 10,
        "eoa_token_id": 11,
        "audio_token_id": 12,
        "eos_token_id": text["eos_token_id"],
        "torch_dtype": "float32",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    processor = {
        "processor_class": "Gemma3nProcessor",
        "image_seq_length": IMAGE_TOKENS,
        "audio_seq_length": AUDIO_TOKENS,
    }
    (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    for name in ("tokenizer.json", "generation_config.json", "matformer_sizes.json"):
        shutil.copy(base / name, tmp / name)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg["extra_special_tokens"] = dict(MEDIA_TOKENS)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (tmp / "README.md").write_text(readme)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def draw_scenes(
    rng: random.Random, sizes: dict[int, float], per_batch: dict[int, int]
) -> tuple[int, list[tuple[Any, Scene]]]:
    """A step's image size (drawn by `sizes`' weights) and its scenes, rendered at mixed sides."""
    res = rng.choices(list(sizes), weights=list(sizes.values()))[0]
    return res, [render_scene(rng, rng.choice((256, 384, 512, 768))) for _ in range(per_batch[res])]


def attr_loss(logits: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
    """The attribute head's loss: mean cross-entropy of colour, shape and count (logits in that order)."""
    nc, ns = len(COLOURS), len(SHAPES)
    return (
        F.cross_entropy(logits[:, :nc], torch.tensor([list(COLOURS).index(sc.colour) for sc in scenes]))
        + F.cross_entropy(logits[:, nc : nc + ns], torch.tensor([SHAPES.index(sc.shape) for sc in scenes]))
        + F.cross_entropy(logits[:, nc + ns :], torch.tensor([sc.count - 1 for sc in scenes]))
    ) / 3


def fit_attr_head(
    head: nn.Linear,
    soft_of: Callable[[list, int], torch.Tensor],
    sizes: dict[int, float],
    per_batch: dict[int, int],
    rng: random.Random,
    steps: int,
) -> None:
    """Fit a fresh attribute head on the trained tower's soft tokens (forward only) before the joint
    steps, so that its first gradients into the tower are not those of a random head."""
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for step in range(steps):
        res, scenes = draw_scenes(rng, sizes, per_batch)
        with torch.no_grad():
            soft = soft_of([im for im, _ in scenes], res)
        loss = attr_loss(head(soft.flatten(1)), [sc for _, sc in scenes])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"head step {step} res {res} attr {loss.item():.3f}", flush=True)


def heads_path(ckpt: Path) -> Path:
    """Where a checkpoint's training-only heads live: beside it, not in it (the runtime has no use for them)."""
    return ckpt.with_name(ckpt.name + "-heads.safetensors")


def save_heads(ckpt: Path, heads: dict[str, nn.Module]) -> None:
    from safetensors.torch import save_file

    state = {prefix + k: v.detach().contiguous() for prefix, m in heads.items() for k, v in m.state_dict().items()}
    tmp = heads_path(ckpt).with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(heads_path(ckpt))


def prompt_ids(
    ckpt: Path,
) -> tuple[list[int] | None, dict[str, list[int]], int, int, Callable[[str], list[int]]]:
    """The runtime's own prompts (chat template and placeholder expansion) for transcription and for
    each image question: what `gemma3n transcribe` and `generate --image` will send; and the prompt
    of a text-only user turn, as a function of its text."""
    from PIL import Image

    import gemma3n

    model = gemma3n.load(ckpt)
    proc = model.processor
    audio = (
        None
        if not model.has_audio
        else proc.from_messages(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": speech_prompt()},
                        {"type": "audio", "audio": np.zeros(SR * 5, np.float32)},
                    ],
                }
            ]
        ).ids
    )
    img = Image.new("RGB", (64, 64))
    images = {
        task: proc.from_messages(
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]
        ).ids
        for task, q in QUESTIONS.items()
    }
    cfg = model.config

    def text_prompt(text: str) -> list[int]:
        return proc.from_messages([{"role": "user", "content": text}]).ids

    return audio, images, cfg.audio_token_id, cfg.image_token_id, text_prompt


# --------------------------------------------------------------------------------------------
# Losses


def answer_loss(
    dec: TextDecoder,
    plan,
    prompts: list[list[int]],
    answers: list[list[int]],
    soft: torch.Tensor,
    token_id: int,
    history: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss of `answers` after `prompts` whose `token_id` placeholders take `soft`
    [B, n, D] (in order). `history`: what the decoder reads as the answers so far (as long as each
    answer; default the answers themselves, teacher forcing). Returns (loss, greedy predictions at
    the answer positions, targets)."""
    history = answers if history is None else history
    seqs = [p + a for p, a in zip(prompts, history)]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    tgt = torch.full((len(seqs), t), -100, dtype=torch.long)
    for b, (p, a, h) in enumerate(zip(prompts, answers, history)):
        if len(h) != len(a):
            raise ValueError(f"history of {len(h)} tokens for an answer of {len(a)}")
        ids[b, : len(p) + len(h)] = torch.tensor(p + h)
        tgt[b, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)
    h0 = dec.embed(ids).clone()
    mask = ids == token_id
    h0[mask] = soft.reshape(-1, soft.shape[-1]).to(h0.dtype)
    hidden = dec(ids, torch.arange(t), plan=plan, inputs_embeds=h0)
    sel = tgt >= 0
    logits = dec.lm_head(hidden[sel]).float()
    return F.cross_entropy(logits, tgt[sel]), logits.argmax(-1), tgt[sel]


def noisy_history(
    answers: list[list[int]], share: float, pool: list[int], eot: int, rng: random.Random
) -> list[list[int]]:
    """The answers as the decoder reads them with --history-noise: each token but the end of turn
    replaced, with probability `share`, by one drawn from `pool` (the training transcripts' tokens,
    so at their frequencies). The targets stay the true tokens, so where the history lies the next
    word can only come from the audio: a decoder trained so leans on what the tower hears rather
    than on its KJV prior, which wrote familiar words for rare ones and ended clips early
    (docs/tiny-media.md, eighteenth and nineteenth rounds)."""
    return [[rng.choice(pool) if t != eot and rng.random() < share else t for t in a] for a in answers]


def chat_turns(
    tok,
    text_prompt: Callable[[str], list[int]],
    stream: torch.Tensor,
    batch: int,
    rng: random.Random,
    eot: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """`batch` text-only chat turns (prompts, replies): a user turn of 8-48 tokens of KJV text, the
    model turn its next 48 tokens (no end of turn: the text model never learnt where to stop). With
    `eot` (--chat-ends) the model turn is the continuation up to the first verse end after 8 tokens,
    then the end of turn, so that a chat reply ends (one with no verse end within 48 tokens stays as
    before)."""
    newline = tok.encode("\n", add_special_tokens=False).ids[0]  # the corpus's verse separator
    prompts, replies = [], []
    for _ in range(batch):
        n = rng.randint(8, 48)
        s = rng.randrange(0, len(stream) - n - 48)
        prompts.append(text_prompt(tok.decode(stream[s : s + n].tolist())))
        reply = stream[s + n : s + n + 48].tolist()
        ends = [k for k in range(8, len(reply)) if reply[k] == newline]
        replies.append(reply[: ends[0]] + [eot] if eot is not None and ends else reply)
    return prompts, replies


def chat_replay_loss(dec: TextDecoder, plan, turns: tuple[list[list[int]], list[list[int]]]) -> torch.Tensor:
    """The next-token loss of chat_turns' replies. The image answers are short and end the turn;
    without these turns the decoder learns to answer every chat that way."""
    prompts, replies = turns
    empty = torch.zeros(len(prompts), 0, dec.embed_tokens.weight.shape[1])
    return answer_loss(dec, plan, prompts, replies, empty, -1)[0]


def audio_padding(emb: MultimodalEmbedder) -> torch.Tensor:
    """The soft token of a padding slot: the embedder's last hard token (as encode_audio pads)."""
    return emb.embed_hard(torch.tensor([emb.vocab_offset + emb.vocab_size - 1]))[0]


def speech_example(
    i: int,
    clips: Clips,
    enc_text: list[list[int]],
    eot: int,
    rng: random.Random,
    nrng: np.random.Generator,
    bare: float = 0.0,
) -> tuple[np.ndarray, list[int]]:
    """Training clip i augmented (`bare`: tiny_media_data.augment's), with its answer; 3 % of the
    time noise only, an empty transcript."""
    if rng.random() < 0.03:
        return augment(np.zeros(int(SR * rng.uniform(1, 9)), np.float32) + 1e-3, nrng), [eot]
    return augment(clips.wave(i), nrng, bare=bare), enc_text[i] + [eot]


def audio_soft(enc: AudioEncoder, emb: MultimodalEmbedder, waves: list[np.ndarray], fe: AudioFeatureExtractor):
    """(soft tokens [B, AUDIO_TOKENS, D] as encode_audio builds them, encodings, padding)."""
    feats, fmask = fe(waves)
    encoded, padding = enc(feats, fmask)
    pad = audio_padding(emb)
    soft = torch.where(padding[..., None], pad, emb.embed_soft(encoded))
    extra = AUDIO_TOKENS - soft.shape[1]
    if extra > 0:
        soft = torch.cat([soft, pad.expand(soft.shape[0], extra, -1)], dim=1)
    return soft[:, :AUDIO_TOKENS], encoded, padding


def vision_soft(tower: nn.Module, emb: MultimodalEmbedder, pixels: torch.Tensor) -> torch.Tensor:
    feats = tower.forward_features(pixels)  # [B, 2048, 4, 4]
    tokens = feats.reshape(feats.shape[0], feats.shape[1], -1).permute(0, 2, 1) * feats.shape[1] ** 0.5
    return emb.embed_soft(tokens)


@torch.no_grad()
def build_soft_cache(
    n: int,
    audio: AudioEncoder,
    emb_a: MultimodalEmbedder,
    vision: nn.Module,
    emb_v: MultimodalEmbedder,
    fe: AudioFeatureExtractor,
    improc: ImageProcessor,
    clips: Clips,
    enc_text: list[list[int]],
    eot: int,
    sizes: dict[int, float],
    per_batch: dict[int, int],
    rng: random.Random,
    nrng: np.random.Generator,
    bare: float = 0.0,
) -> tuple[torch.Tensor, list[list[int]], list[tuple[int, list, torch.Tensor]]]:
    """The frozen towers' soft tokens, once: n training clips (one augmented take each, 3 % of them
    noise only with an empty transcript, as the live steps) and n scenes in batches as the image
    steps draw them. Returns (speech soft tokens [n, AUDIO_TOKENS, D], their answers, image batches)."""
    audio.eval()
    vision.eval()
    t = time.time()
    order = rng.sample(range(len(clips)), min(n, len(clips)))
    # clips of like length share a batch, which the tower pads to its longest clip (the steps draw
    # cached rows at random, so the order of the cache does not matter to them)
    order.sort(key=lambda i: int(clips.offsets[i + 1] - clips.offsets[i]))
    soft, answers = [], []
    for k in range(0, len(order), 16):
        waves, batch_answers = zip(
            *(speech_example(i, clips, enc_text, eot, rng, nrng, bare) for i in order[k : k + 16])
        )
        answers += batch_answers
        soft.append(audio_soft(audio, emb_a, list(waves), fe)[0])
        if k % 1600 == 0:
            print(f"soft cache: {k + len(waves)} clips in {time.time() - t:.0f} s", flush=True)
    images: list[tuple[int, list, torch.Tensor]] = []
    drawn = 0
    while drawn < n:
        res, scenes = draw_scenes(rng, sizes, per_batch)
        soft_v = vision_soft(vision, emb_v, improc([im for im, _ in scenes], size=res))
        # the scenes without their pictures: the steps need only what to ask (12,000 rendered
        # images held here took 12 GB)
        images.append((res, [(None, sc) for _, sc in scenes], soft_v))
        drawn += len(scenes)
    print(f"soft cache: {len(answers)} clips, {drawn} scenes in {time.time() - t:.0f} s", flush=True)
    return torch.cat(soft), answers, images


def soft_cache_key(args: argparse.Namespace) -> dict[str, Any]:
    """What a soft cache depends on: the audio tower file's bytes, the --init checkpoint's (its vision
    tower reads the scenes), the clips, their count, the transcripts, the trimmed share and the
    image batches."""
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    init = Path(args.init)
    return {
        "tower_sha256": digest(Path(args.init_audio)),
        "init_sha256": [digest(f) for f in sorted(init.glob("*.safetensors"))] if init.is_dir() else digest(init),
        "speech": str(Path(args.speech).resolve()),
        "clips": args.soft_cache,
        "transcripts": args.transcripts,
        "bare_edges": args.bare_edges,
        "images": [args.res_weights, args.image_batch],
    }


def load_soft_cache(path: Path, key: dict[str, Any]) -> tuple | None:
    """The cache kept in `path` by save_soft_cache, or None when it was made from other inputs."""
    kept = torch.load(path, weights_only=False)
    if kept.get("key") != key:
        print(f"soft cache: {path} was made from other inputs ({kept.get('key')}); building a new one", flush=True)
        return None
    print(f"soft cache: {len(kept['answers'])} clips loaded from {path}", flush=True)
    return kept["speech"], kept["answers"], kept["images"]


def save_soft_cache(path: Path, key: dict[str, Any], cache: tuple) -> None:
    """Written beside and then renamed, so an interrupted save never leaves half a cache behind."""
    tmp = path.with_name(path.name + ".partial")
    torch.save({"key": key, "speech": cache[0], "answers": cache[1], "images": cache[2]}, tmp)
    tmp.replace(path)


def ctc_align(logp: np.ndarray, labels: list[int]) -> list[int] | None:
    """Viterbi CTC alignment: for each frame of `logp` [T, V + 1] (label 0 the blank, token k label
    k + 1), the index in `labels` it emits, or -1 (blank). None when the labels do not fit."""
    t_len, n = logp.shape[0], 2 * len(labels) + 1
    ext = [0] + [x for lab in labels for x in (lab + 1, 0)]  # blank, l1, blank, l2, ..., blank
    # a state may come from itself, the one before, or (a token unlike the one two back) skip a blank
    skip = np.array([k >= 2 and ext[k] != 0 and ext[k] != ext[k - 2] for k in range(n)])
    score = np.full(n, -np.inf)
    score[0] = logp[0, ext[0]]
    if n > 1:
        score[1] = logp[0, ext[1]]
    back = np.zeros((t_len, n), dtype=np.int64)
    emit = logp[:, ext]  # [T, n]
    for t in range(1, t_len):
        stay, step = score, np.concatenate([[-np.inf], score[:-1]])
        jump = np.where(skip, np.concatenate([[-np.inf, -np.inf], score[:-2]])[:n], -np.inf)
        choice = np.stack([stay, step, jump])
        back[t] = choice.argmax(0)
        score = choice.max(0) + emit[t]
    end = n - 1 if n == 1 or score[n - 1] >= score[n - 2] else n - 2
    if not np.isfinite(score[end]):
        return None
    path = [end]
    for t in range(t_len - 1, 0, -1):
        path.append(path[-1] - int(back[t, path[-1]]))
    return [(k - 1) // 2 if k % 2 else -1 for k in reversed(path)]


def token_head(tower_file: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(blank vector, cosine scale, metric or None) of the token-CTC head saved beside a --units
    tokens tower (the metric: `whitening`, when the tower was trained with --metric whitened)."""
    from safetensors.torch import load_file

    state = load_file(tower_file)
    if "head.blank" not in state:
        raise SystemExit(f"{tower_file} has no token head (head.blank): not a --units tokens tower")
    metric = state.get("head.metric")
    return state["head.blank"].float(), state["head.scale"].float(), None if metric is None else metric.float()


def whitening(table: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """[D, D] M^-1/2, M the second moment of the token embeddings `table` [V, D] (plus eps times
    its mean eigenvalue). The tiny decoder's input embeddings share a few directions (five of 128
    hold 90 % of their energy; a token's nearest other token sits at cosine 0.86 in the median, 0.99
    for a tenth of them), so a plain cosine barely tells tokens apart. Linear, so a soft token along
    a token's embedding still scores that token's cosine 1; after it the nearest other token sits at
    cosine 0.36 in the median (docs/tiny-media.md, ninth round)."""
    table = table.float()
    eig, vec = torch.linalg.eigh(table.T @ table / len(table))
    return vec @ torch.diag((eig + eps * eig.mean()).rsqrt()) @ vec.T


def token_keys(table: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
    """[V + 1, D] unit vectors a token-CTC head (tools/pretrain_tiny_towers.py TokenHead) scores soft
    tokens against: its blank vector (label 0), then each token's input embedding (label k + 1)."""
    return torch.cat([F.normalize(blank, dim=-1)[None], F.normalize(table.float(), dim=-1)])


def token_logits(
    soft: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, metric: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., V + 1]: the scaled cosine between each soft token and each of token_keys, measured
    after `metric` (a `whitening`) when given."""
    soft = soft.float()
    if metric is not None:
        soft, keys = soft @ metric, F.normalize(keys @ metric, dim=-1)
    return scale * F.normalize(soft, dim=-1) @ keys.T


@torch.no_grad()
def align_cache(
    soft: torch.Tensor,
    answers: list[list[int]],
    eot: int,
    keys: torch.Tensor,
    scale: torch.Tensor,
    pad: torch.Tensor,
    metric: torch.Tensor | None = None,
) -> list[list[int] | None]:
    """Per cached clip, where the tower's CTC head puts each transcript token: ctc_align's path over
    the heard frames (padding excluded), None when the transcript does not fit."""
    paths: list[list[int] | None] = []
    for b, answer in enumerate(answers):
        labels = [t for t in answer if t != eot]
        frames = int((~torch.isclose(soft[b], pad).all(-1)).sum())
        logp = F.log_softmax(token_logits(soft[b, :frames], keys, scale, metric), -1)
        paths.append(ctc_align(logp.numpy(), labels) if frames else None)
    return paths


def perfect_stream(path: list[int], labels: list[int], keys: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """[AUDIO_TOKENS, D]: what a perfect token tower sends for `labels` spoken along `path` (a
    ctc_align path): each aligned token's input embedding, the blank vector at the other heard
    frames, padding after; at the embedder's scale (unit RMS)."""
    rows = [keys[0] if k < 0 else keys[labels[k] + 1] for k in path]
    stream = pad.expand(AUDIO_TOKENS, -1).clone()
    stream[: len(rows)] = torch.stack(rows) * keys.shape[1] ** 0.5
    return stream


def exact_soft(
    soft: torch.Tensor,
    answers: list[list[int]],
    eot: int,
    paths: list[list[int] | None],
    keys: torch.Tensor,
    pad: torch.Tensor,
) -> torch.Tensor:
    """What a perfect token tower would send for each cached clip, along its align_cache path. A
    clip whose transcript does not fit stays as heard."""
    exact = soft.clone()
    for b, (answer, path) in enumerate(zip(answers, paths)):
        if path is not None:
            exact[b] = perfect_stream(path, [t for t in answer if t != eot], keys, pad)
    return exact


def paths_by_length(paths: list[list[int] | None]) -> dict[int, list[list[int]]]:
    """The cached clips' alignments by how many tokens they carry (noise-only clips left out)."""
    by_length: dict[int, list[list[int]]] = {}
    for path in paths:
        if path is not None and (n := max(path, default=-1) + 1):
            by_length.setdefault(n, []).append(path)
    return by_length


def copy_batch(
    transcripts: list[list[int]],
    by_length: dict[int, list[list[int]]],
    keys: torch.Tensor,
    pad: torch.Tensor,
    eot: int,
    rng: random.Random,
    batch: int,
) -> tuple[torch.Tensor, list[list[int]]]:
    """`batch` clips no one spoke: training verses (only those as long as some cached clip) as a
    perfect token tower would send them, each along the alignment of a cached clip with as many
    tokens, so the pauses and the pace are real ones. Unlimited transcripts for the decoder's
    copying, at no tower cost."""
    chosen = [rng.choice(transcripts) for _ in range(batch)]
    soft = torch.stack([perfect_stream(rng.choice(by_length[len(v)]), v, keys, pad) for v in chosen])
    return soft, [v + [eot] for v in chosen]


def blend_soft(real: torch.Tensor, exact: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per clip, (1 - alpha) real + alpha exact, each changed slot back at unit RMS."""
    mixed = torch.lerp(real, exact, alpha[:, None, None].to(real.dtype))
    changed = ~torch.isclose(real, exact).all(-1, keepdim=True)
    return torch.where(changed, F.normalize(mixed, dim=-1) * real.shape[-1] ** 0.5, real)


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the trained text-only model (tools/train_tiny.py)")
    ap.add_argument("--speech", type=Path, required=True, help="tools/tiny_media_data.py's output")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory (rewritten at each evaluation)")
    ap.add_argument("--log", type=Path, default=None, help="CSV of the evaluations (default: next to --out, OUT.csv)")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget; the LR schedule spans it")
    ap.add_argument("--eval-minutes", type=float, default=8.0)
    ap.add_argument("--audio-batch", type=int, default=8, help="speech clips a step (0: images and text only)")
    ap.add_argument(
        "--image-batch", type=int, default=8, help="images a step at 256 px (half at 512, a quarter at 768)"
    )
    ap.add_argument("--res-weights", default=RES_WEIGHTS, help="share of the steps at each image size")
    ap.add_argument("--text-batch", type=int, default=4)
    ap.add_argument(
        "--chat-batch",
        type=int,
        default=4,
        help="KJV passages a step as text-only chat turns, the reply their continuation (0: off), so that "
        "a chat without an image is still answered in KJV text, not with a one-word image answer",
    )
    ap.add_argument(
        "--chat-ends",
        action="store_true",
        help="the chat turns' replies end at the first verse end after 8 tokens, with an end of turn, so that "
        "the model's chat replies end (default: 48 tokens and no end of turn, as the runs before the nineteenth "
        "round)",
    )
    ap.add_argument("--lr", type=float, default=2e-3, help="towers, embedders, CTC head")
    ap.add_argument("--decoder-lr", type=float, default=1.5e-4)
    ap.add_argument(
        "--frozen-share",
        type=float,
        default=0.5,
        help="share of the budget during which the text decoder stays frozen (towers and embedders learn first)",
    )
    ap.add_argument("--ctc-weight", type=float, default=0.5)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument(
        "--init", type=Path, default=None, help="start the towers and embedders from this checkpoint's (a resumed run)"
    )
    ap.add_argument("--init-decoder", action="store_true", help="with --init: its text decoder too")
    ap.add_argument(
        "--decoder-file",
        type=Path,
        default=None,
        help="then the text decoder from this file (a run's OUT-decoder.safetensors, written at each "
        "evaluation; tools/checkpoints/decoder-ears.safetensors)",
    )
    ap.add_argument(
        "--fresh-vision", action="store_true", help="with --init: a new vision tower and embedder (a collapsed one)"
    )
    ap.add_argument(
        "--init-audio", type=Path, default=None, help="tools/pretrain_tiny_towers.py's audio tower + embedder"
    )
    ap.add_argument(
        "--init-vision", type=Path, default=None, help="tools/pretrain_tiny_towers.py's vision tower + embedder"
    )
    for kind in ("audio", "vision"):
        ap.add_argument(
            f"--{kind}-lr-scale",
            type=float,
            default=0.0,
            help=f"learning rate of a pre-trained {kind} tower, relative to --lr (default 0: frozen, forward only; "
            "its embedder still learns)",
        )
    ap.add_argument(
        "--freeze-audio-embedder",
        action="store_true",
        help="with --init-audio: keep its embedder as pre-trained (a token-CTC tower's soft tokens then stay "
        "where the decoder's token embeddings are, and a better tower can be swapped in later)",
    )
    ap.add_argument(
        "--without-audio",
        action="store_true",
        help="no audio tower: images and text only, and the checkpoint carries the vision tower alone",
    )
    ap.add_argument("--attr-weight", type=float, default=1.0, help="the colour/shape/count head's loss (0: off)")
    ap.add_argument(
        "--head-steps",
        type=int,
        default=0,
        help="first fit a fresh attribute head alone on the towers' soft tokens for this many steps (a resumed "
        "checkpoint without saved heads); not counted in --minutes",
    )
    ap.add_argument(
        "--soft-cache",
        type=int,
        default=0,
        help="decoder-only stage: the frozen towers' soft tokens are computed once, for this many training clips "
        "(one augmented take each) and as many scenes, and every step draws from them; the step is then the "
        "decoder's alone, several times faster (needs --init-audio with --freeze-audio-embedder; the vision "
        "tower and its embedder are frozen too)",
    )
    ap.add_argument(
        "--bare-edges",
        type=float,
        default=0.0,
        metavar="SHARE",
        help=BARE_EDGES_HELP,
    )
    ap.add_argument(
        "--cache-file",
        type=Path,
        default=None,
        help="with --soft-cache: keep the cache in this file; a later run given the same file loads it instead "
        "of building it when it was made from the same --init-audio and --init files, clips, count, "
        "--transcripts, --bare-edges and image batches (two runs on one cache, or a run restarted, skip the "
        "setup); otherwise it is built anew and the file replaced",
    )
    ap.add_argument(
        "--copy-curriculum",
        default=None,
        metavar="A,B",
        help="with --soft-cache and a token-CTC tower (tools/pretrain_tiny_towers.py --units tokens): each "
        "cached clip's soft tokens are blended with exact ones (the transcript's own input embeddings where "
        "the tower's CTC head aligns each token, its blank vector elsewhere), fully until share A of the "
        "budget, fading to the tower's own at share B; a quarter of the clips are always the tower's own. "
        "A decoder learns to copy from exact tokens in a few hundred steps and not from the tower's noisy "
        "ones (docs/tiny-media.md, third and sixth rounds)",
    )
    ap.add_argument(
        "--copy-batch",
        type=int,
        default=0,
        help="with --soft-cache and a token-CTC tower: this many more clips a step that no one spoke, training "
        "verses as a perfect token tower would send them, each along a cached clip's alignment (copy_batch): "
        "the decoder learns to copy from the whole training text, not only the cached clips' transcripts",
    )
    ap.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        help="widen the decoder's sliding-attention window (default: the base's), so that its sliding layers see "
        "a whole audio window from the transcript",
    )
    ap.add_argument(
        "--transcripts",
        choices=("text", "spoken"),
        default="text",
        help="what the decoder writes for a clip: the verse as written, or `spoken_text` (no punctuation, "
        "one spelling a word: the token tower's spoken labels, so reading it is copying)",
    )
    ap.add_argument(
        "--history-noise",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="in the speech steps, this share of the transcript tokens the decoder reads (teacher forcing) "
        "replaced by random transcript tokens, the targets kept (noisy_history): the decoder learns to take "
        "the next word from the audio rather than from its KJV prior (0: off)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out and --log")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    # never a file of the repository by default: a run would overwrite docs/tiny-media-training.csv,
    # where the recorded runs' curves are kept
    args.log = args.log or args.out.with_name(args.out.name + ".csv")
    refuse_to_clobber([args.out, args.log], args.force)
    if args.without_audio and args.init_audio is not None:
        ap.error("--without-audio trains no audio tower: drop --init-audio")
    if args.freeze_audio_embedder and args.init_audio is None:
        ap.error("--freeze-audio-embedder keeps a pre-trained embedder: it needs --init-audio")
    if args.soft_cache and not (args.freeze_audio_embedder and args.audio_lr_scale == 0 and args.init is not None):
        ap.error("--soft-cache needs frozen towers: --init, --init-audio, --freeze-audio-embedder, --audio-lr-scale 0")
    if args.cache_file and not args.soft_cache:
        ap.error("--cache-file keeps the --soft-cache: it needs --soft-cache")
    if args.copy_curriculum is not None:
        if not args.soft_cache:
            ap.error("--copy-curriculum blends the cached soft tokens: it needs --soft-cache")
        fade = tuple(float(x) for x in args.copy_curriculum.split(","))
        if len(fade) != 2 or not 0 <= fade[0] <= fade[1] <= 1:
            ap.error("--copy-curriculum A,B: two shares of the budget, 0 <= A <= B <= 1")
    if args.copy_batch and not args.soft_cache:
        ap.error("--copy-batch takes its alignments from the cached clips: it needs --soft-cache")
    if not 0 <= args.history_noise < 1:
        ap.error("--history-noise is a share of the transcript tokens: 0 <= SHARE < 1")
    perfect = args.copy_curriculum is not None or args.copy_batch > 0  # a perfect token tower is simulated
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)
    t_start = time.time()

    dec, text_cfg_obj, text_cfg = load_decoder(args.base, args.sliding_window)
    dec.train()
    pl = plans(text_cfg_obj)
    # the tower's look-ahead and depth: the pre-trained tower file's, else the resumed checkpoint's
    if args.init_audio is not None:
        AUDIO_CONFIG.update(tower_shape(args.init_audio))
    elif args.init is not None and (args.init / "config.json").exists():
        audio_cfg = json.loads((args.init / "config.json").read_text()).get("audio_config", {})
        AUDIO_CONFIG.update({k: audio_cfg.get(k, default) for k, default in TOWER_SHAPE.items()})
    audio = init_audio_tower(args.seed)
    vision = init_vision_tower(args.seed)
    d = text_cfg_obj.hidden_size
    emb_a = init_embedder(AUDIO_CONFIG["hidden_size"], d, AUDIO_CONFIG["vocab_offset"], args.seed + 1)
    emb_v = init_embedder(2048, d, 4096, args.seed + 2)
    vocab = text_cfg_obj.vocab_size
    ctc_head = nn.Linear(AUDIO_CONFIG["hidden_size"], vocab + 1)  # + blank; training only
    # training only, like the CTC head: colour, shape and count read linearly off the 16 soft tokens,
    # so the vision tower learns what the scene holds before the decoder has learnt to look at it
    attr_head = nn.Linear(IMAGE_TOKENS * d, len(COLOURS) + len(SHAPES) + len(COUNTS))
    parts = {"decoder": dec, "audio": audio, "vision": vision, "embed_audio": emb_a, "embed_vision": emb_v}
    if args.without_audio:
        args.audio_batch = 0
    if args.init is not None:
        from safetensors.torch import load_file

        state = load_file(args.init / "model.safetensors")
        if args.init_decoder:
            load_text_decoder(dec, state)
        for name, prefix in (
            ("audio", "model.audio_tower."),
            ("vision", "model.vision_tower.timm_model."),
            ("embed_audio", "model.embed_audio."),
            ("embed_vision", "model.embed_vision."),
        ):
            if args.fresh_vision and name in ("vision", "embed_vision"):
                continue
            if name in ("audio", "embed_audio") and (args.without_audio or args.init_audio is not None):
                continue  # (a vision-only checkpoint has none; --init-audio brings its own)
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            parts[name].load_state_dict(sub, strict=True)
        heads_file = heads_path(args.init)
        if heads_file.exists():  # the training-only heads, so a resumed run goes on with them
            heads = load_file(heads_file)
            for prefix, head in (("attr_head.", attr_head), ("ctc_head.", ctc_head)):
                if not (args.fresh_vision and head is attr_head):
                    head.load_state_dict({k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)})
        elif args.attr_weight and not args.fresh_vision and not args.head_steps:
            print("warning: --init has no saved heads: the attribute head starts fresh (fit it: --head-steps)")
    if args.decoder_file is not None:
        from safetensors.torch import load_file

        load_text_decoder(dec, load_file(args.decoder_file))
    pretrained = set()
    for path, names in ((args.init_audio, ("audio", "embed_audio")), (args.init_vision, ("vision", "embed_vision"))):
        if path is not None:
            from safetensors.torch import load_file

            state = load_file(path)
            for name in names:
                prefix = PREFIXES[name]
                parts[name].load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            pretrained.add(names[0])
            if getattr(args, f"{names[0]}_lr_scale") == 0:  # frozen: forward only, the step costs a fraction
                parts[names[0]].requires_grad_(False)
            if names[0] == "vision" and any(k.startswith("head.") for k in state):  # its attribute head too
                attr_head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
    if args.without_audio:
        del parts["audio"], parts["embed_audio"]
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    print("parameters", counts, flush=True)

    readme = (args.base / "README.md").read_text()
    write_checkpoint(args.out, args.base, text_cfg, parts, readme)
    audio_prompt, image_prompts, audio_id, image_id, text_prompt = prompt_ids(args.out)
    print(f"audio prompt {len(audio_prompt or [])} tokens; image prompts {[len(v) for v in image_prompts.values()]}")

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    eot = tok.token_to_id("<end_of_turn>")
    train_texts, held_texts = split(kjv_chapters())
    train_ids, held_ids = token_stream(tok, train_texts), token_stream(tok, held_texts)
    w = 129
    held_windows = held_ids[: 64 * w].view(64, w)

    clips = Clips.load(args.speech / "train")
    held_clips = Clips.load(args.speech / "heldout")
    fe = AudioFeatureExtractor.from_dict(PREPROCESSOR)
    improc = ImageProcessor.from_dict(PREPROCESSOR)
    # what the decoder is taught to write for a clip: the verse as written, or as heard
    transcripts = spoken_transcripts if args.transcripts == "spoken" else list
    enc_text = [e.ids for e in tok.encode_batch(transcripts(clips.texts), add_special_tokens=False)]
    held_text = [e.ids for e in tok.encode_batch(transcripts(held_clips.texts), add_special_tokens=False)]

    fresh = [k for k in ("audio", "vision") if k not in pretrained and k in parts]
    fresh += [f"embed_{k}" for k in fresh]
    tower_params = [p for k in fresh for p in parts[k].parameters()]
    tower_params += list(ctc_head.parameters()) + list(attr_head.parameters())
    # one group per pre-trained tower: its own learning rate (empty when frozen)
    scaled = {k: args.lr * getattr(args, f"{k}_lr_scale") for k in ("audio", "vision")}
    pretrained_params = {
        k: [p for p in parts[k].parameters() if p.requires_grad] if k in pretrained and k in parts else []
        for k in scaled
    }
    if args.freeze_audio_embedder:
        emb_a.requires_grad_(False)
    if args.soft_cache:  # the decoder alone learns: no tower, embedder or training-only head changes
        for m in (audio, emb_a, vision, emb_v, ctc_head, attr_head):
            m.requires_grad_(False)
        args.ctc_weight = args.attr_weight = 0.0
    tower_params += [p for k in pretrained for p in parts[f"embed_{k}"].parameters() if p.requires_grad]
    audio_side = [p for m in (audio, emb_a, ctc_head) for p in m.parameters()]
    vision_side = [p for m in (vision, emb_v, attr_head) for p in m.parameters()]
    opt = torch.optim.AdamW(
        [
            {"params": tower_params, "lr": args.lr, "weight_decay": 0.01, "peak": args.lr},
            {"params": list(dec.parameters()), "lr": args.decoder_lr, "weight_decay": 0.0, "peak": args.decoder_lr},
            *({"params": pretrained_params[k], "lr": scaled[k], "weight_decay": 0.01} for k in scaled),
        ],
        betas=(0.9, 0.98),
    )
    budget = args.minutes * 60
    sizes, per_batch = res_weights(args.res_weights), images_per_batch(args.image_batch)
    frozen_until = args.frozen_share * budget
    dec.requires_grad_(False)
    decoder_steps = 0

    # fixed evaluation sets
    eval_clips = list(range(min(24, len(held_clips))))
    eval_scenes = [render_scene(random.Random(10_000 + i), 384) for i in range(48)]

    @torch.no_grad()
    def evaluate() -> dict:
        dec.eval()
        audio.eval()
        vision.eval()
        row: dict = {}
        row["text_ppl_full"] = round(math.exp(held_out_loss(dec, held_windows, pl["full"], 16)), 2)
        row["text_ppl_sub"] = round(math.exp(held_out_loss(dec, held_windows, pl["sub"], 16)), 2)
        if audio_prompt is not None:
            waves = [held_clips.wave(i) for i in eval_clips]
            answers = [held_text[i] + [eot] for i in eval_clips]
            soft, encoded, padding = audio_soft(audio, emb_a, waves, fe)
            loss, pred, tgt = answer_loss(dec, pl["full"], [audio_prompt] * len(waves), answers, soft, audio_id)
            row["heldout_speech_loss"] = round(loss.item(), 4)
            row["heldout_speech_token_acc"] = round((pred == tgt).float().mean().item(), 4)
            if perfect:  # the same clips from a perfect token tower
                aligned = align_cache(soft, answers, eot, keys, head[1], pad, head[2])
                exact = exact_soft(soft, answers, eot, aligned, keys, pad)
                _, pred, tgt = answer_loss(dec, pl["full"], [audio_prompt] * len(waves), answers, exact, audio_id)
                row["heldout_exact_token_acc"] = round((pred == tgt).float().mean().item(), 4)
        # CTC greedy transcript WER: what the tower alone hears
        if args.ctc_weight and audio_prompt is not None:
            import jiwer

            best = ctc_head(encoded).argmax(-1)
            hyps = []
            for b in range(best.shape[0]):
                seq = [int(x) for x, valid in zip(best[b], ~padding[b]) if valid]
                out = [x for j, x in enumerate(seq) if x != vocab and (j == 0 or x != seq[j - 1])]
                hyps.append(normalize_words(tok.decode(out)))
            refs = [normalize_words(held_clips.texts[i]) for i in eval_clips]
            row["heldout_ctc_wer"] = round(jiwer.wer(refs, [h or "-" for h in hyps]), 4)
        for res in (256, 512, 768):
            pixels = improc([im for im, _ in eval_scenes], size=res)
            soft_v = torch.cat([vision_soft(vision, emb_v, pixels[k : k + 16]) for k in range(0, len(pixels), 16)])
            for task in ("colour", "shape", "count"):
                ans = [tok.encode(sc.answer(task), add_special_tokens=False).ids + [eot] for _, sc in eval_scenes]
                _, pred, tgt = answer_loss(dec, pl["full"], [image_prompts[task]] * len(ans), ans, soft_v, image_id)
                # exact when every answer token (and the end of turn) is the argmax
                ok, k = 0, 0
                for a in ans:
                    ok += bool((pred[k : k + len(a)] == tgt[k : k + len(a)]).all())
                    k += len(a)
                row[f"img{res}_{task}"] = round(ok / len(ans), 3)
        dec.train()
        audio.train()
        vision.train()
        return row

    # --history-noise draws its false tokens from the training transcripts, at their frequencies
    history_pool = [t for ids in enc_text for t in ids]

    def history(answers: list[list[int]]) -> list[list[int]] | None:
        if not args.history_noise:
            return None
        return noisy_history(answers, args.history_noise, history_pool, eot, rng)

    def speech_losses(losses: dict[str, torch.Tensor]) -> None:
        """The transcript's next-token loss on a batch of augmented clips (3 % noise only, empty
        transcript), and with --ctc-weight the CTC loss on the tower's tokens."""
        if args.soft_cache:
            idx = [rng.randrange(len(cache_answers)) for _ in range(args.audio_batch)]
            soft = cache_speech[idx]
            if args.copy_curriculum is not None:
                a, b = fade
                share = (time.time() - t0) / budget
                alpha = 1.0 if share <= a else max(0.0, 1.0 - (share - a) / max(b - a, 1e-9))
                mix = torch.tensor([0.0 if rng.random() < 0.25 else alpha for _ in idx])
                soft = blend_soft(soft, cache_exact[idx], mix)
            answers = [cache_answers[i] for i in idx]
            losses["speech"], _, _ = answer_loss(
                dec, pl["full"], [audio_prompt] * len(idx), answers, soft, audio_id, history(answers)
            )
            if args.copy_batch:
                soft, answers = copy_batch(copy_verses, by_length, keys, pad, eot, rng, args.copy_batch)
                losses["copy"], _, _ = answer_loss(
                    dec, pl["full"], [audio_prompt] * len(answers), answers, soft, audio_id
                )
            return
        idx = [rng.randrange(len(clips)) for _ in range(args.audio_batch)]
        waves, answers = map(
            list, zip(*(speech_example(i, clips, enc_text, eot, rng, nrng, args.bare_edges) for i in idx))
        )
        soft, encoded, padding = audio_soft(audio, emb_a, waves, fe)
        losses["speech"], _, _ = answer_loss(
            dec, pl["full"], [audio_prompt] * len(waves), answers, soft, audio_id, history(answers)
        )
        if args.ctc_weight:
            logp = F.log_softmax(ctc_head(encoded).float(), -1).transpose(0, 1)  # [S, B, V+1]
            targets = [torch.tensor(a[:-1]) for a in answers]
            lengths = torch.tensor([len(t) for t in targets])
            flat = torch.cat([t for t in targets if len(t)]) if lengths.sum() else torch.zeros(0, dtype=torch.long)
            losses["ctc"] = args.ctc_weight * F.ctc_loss(
                logp, flat, (~padding).sum(1), lengths, blank=vocab, zero_infinity=True
            )

    args.log.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    ema: dict[str, float] = {}
    step, last_eval = 0, -1e9
    if args.head_steps:
        fit_attr_head(
            attr_head,
            lambda ims, res: vision_soft(vision, emb_v, improc(ims, size=res)),
            sizes,
            per_batch,
            rng,
            args.head_steps,
        )
    if args.soft_cache:
        key = soft_cache_key(args)
        cache = load_soft_cache(args.cache_file, key) if args.cache_file and args.cache_file.exists() else None
        if cache is None:
            cache = build_soft_cache(
                args.soft_cache,
                audio,
                emb_a,
                vision,
                emb_v,
                fe,
                improc,
                clips,
                enc_text,
                eot,
                sizes,
                per_batch,
                rng,
                nrng,
                args.bare_edges,
            )
            if args.cache_file:
                save_soft_cache(args.cache_file, key, cache)
        cache_speech, cache_answers, cache_images = cache
        if perfect:
            head = token_head(args.init_audio)
            with torch.no_grad():
                pad = audio_padding(emb_a)
            with torch.no_grad():  # the input embeddings as the run starts, for training and evaluation
                keys = token_keys(dec.embed(torch.arange(vocab)[None])[0], head[0])
            paths = align_cache(cache_speech, cache_answers, eot, keys, head[1], pad, head[2])
        if args.copy_curriculum is not None:
            cache_exact = exact_soft(cache_speech, cache_answers, eot, paths, keys, pad)
        if args.copy_batch:
            by_length = paths_by_length(paths)
            lines = transcripts(verses(held_out=False))
            copy_verses = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False) if len(e.ids) in by_length]
            print(
                f"copy batches: {len(copy_verses)} of {len(lines)} training verses fit a cached alignment", flush=True
            )
    print(f"setup {time.time() - t_start:.0f} s", flush=True)
    t0 = time.time()
    while True:
        elapsed = time.time() - t0
        done = elapsed >= budget
        if done or elapsed - last_eval >= args.eval_minutes * 60:
            last_eval = elapsed
            row = {"step": step, "minutes": round(elapsed / 60, 2)}
            row.update({f"train_{k}": round(v, 4) for k, v in ema.items()})
            row.update(evaluate())
            rows.append(row)
            print(row, flush=True)
            write_csv(args.log, rows)
            write_checkpoint(args.out, args.base, text_cfg, parts, readme)
            save_heads(args.out, {"attr_head.": attr_head, "ctc_head.": ctc_head})
            save_text_decoder(args.out)
            (args.out.parent / (args.out.name + "-step.json")).write_text(json.dumps(row))
        if done:
            break
        frac = min(1.0, elapsed / budget)
        tune_decoder = elapsed >= frozen_until
        if tune_decoder and decoder_steps == 0:
            # the frozen phase's last checkpoint: text perplexity exactly the base model's
            frozen_copy = args.out.with_name(args.out.name + "-frozen")
            if frozen_copy.exists():
                shutil.rmtree(frozen_copy)
            shutil.copytree(args.out, frozen_copy)
            dec.requires_grad_(True)
        decoder_steps += tune_decoder
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        towers_g, dec_g, audio_g, vision_g = opt.param_groups
        towers_g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * decay
        audio_g["lr"] = scaled["audio"] * min(1.0, (step + 1) / args.warmup) * decay
        vision_g["lr"] = scaled["vision"] * min(1.0, (step + 1) / args.warmup) * decay
        dec_g["lr"] = args.decoder_lr * min(1.0, decoder_steps / args.warmup) * decay

        losses: dict[str, torch.Tensor] = {}
        if args.audio_batch:
            speech_losses(losses)
        # images
        if args.soft_cache:
            res, scenes, soft_v = cache_images[rng.randrange(len(cache_images))]
        else:
            res, scenes = draw_scenes(rng, sizes, per_batch)
            soft_v = vision_soft(vision, emb_v, improc([im for im, _ in scenes], size=res))
        if args.attr_weight:
            losses["attr"] = args.attr_weight * attr_loss(attr_head(soft_v.flatten(1)), [sc for _, sc in scenes])
        tasks = [rng.choice(list(QUESTIONS)) for _ in scenes]
        ans = [tok.encode(sc.answer(t), add_special_tokens=False).ids + [eot] for (_, sc), t in zip(scenes, tasks)]
        losses["image"], _, _ = answer_loss(dec, pl["full"], [image_prompts[t] for t in tasks], ans, soft_v, image_id)
        if tune_decoder:  # text replay: the decoder keeps its perplexity and its MatFormer sub-model
            starts = torch.randint(0, len(train_ids) - w, (args.text_batch,))
            batch = torch.stack([train_ids[s : s + w] for s in starts])
            losses["text_full"] = loss_of(dec, batch, pl["full"])
            losses["text_sub"] = loss_of(dec, batch, pl["sub"])
            if args.chat_batch:
                turns = chat_turns(tok, text_prompt, train_ids, args.chat_batch, rng, eot if args.chat_ends else None)
                losses["text_chat"] = chat_replay_loss(dec, pl["full"], turns)

        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(audio_side, 1.0)  # each tower its own budget: CTC spikes
        torch.nn.utils.clip_grad_norm_(vision_side, 1.0)  # must not starve the vision tower
        if tune_decoder:
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        for k, v in losses.items():
            ema[k] = v.item() if k not in ema else 0.95 * ema[k] + 0.05 * v.item()
        if step % 10 == 0:
            print(
                f"step {step} {time.time() - t0:.0f}s res {res} "
                + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items()),
                flush=True,
            )
        step += 1
    print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {args.out}", flush=True)


if __name__ == "__main__":
    main()
