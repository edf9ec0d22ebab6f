"""Shared fixtures: small random Gemma 3n checkpoints written by transformers itself, so our
loader reads exactly what `save_pretrained` writes, and parity tests compare on the same weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ (tokenizer builder) is not part of the package

from gemma3n import kernels  # noqa: E402
from gemma3n.tokenizer import MEDIA_TOKENS  # noqa: E402
from tools.make_tiny import build_tokenizer  # noqa: E402

torch.set_num_threads(2)

# A small config with every feature on: 10 layers (two 4-sliding + 1-global periods),
# KV sharing in the top period (sources 3 = sliding, 4 = global), per-layer FFN widths,
# sparsity in the first layers, a PLE vocabulary smaller than the main one.
SMALL_TEXT = dict(
    vocab_size=560,
    vocab_size_per_layer_input=500,
    hidden_size=64,
    hidden_size_per_layer_input=16,
    intermediate_size=[128, 96, 128, 128, 64, 128, 128, 96, 128, 128],
    num_hidden_layers=10,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    num_kv_shared_layers=5,
    laurel_rank=8,
    activation_sparsity_pattern=[0.95, 0.95, 0.95] + [0.0] * 7,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=[1, 6],
    bos_token_id=2,
)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Random weights of sane scale (HF's init makes near-zero norms/AltUp, hiding bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or name.endswith("correct_output_scale"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(scale * noise)


def write_tokenizer(path: Path) -> None:
    build_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )


def make_hf_text_model(seed: int = 0, **overrides):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    cfg = Gemma3nTextConfig(**{**SMALL_TEXT, **overrides})
    torch.manual_seed(seed)
    model = Gemma3nForCausalLM(cfg).eval()
    randomize_(model, seed)
    return model


def save_text_checkpoint(model, path: Path, layout: str = "text") -> Path:
    """`text`: Gemma3nForCausalLM's own save (model.* names, gemma3n_text config).
    `multimodal`: the same weights under model.language_model.* with a top-level gemma3n
    config (text_config nested), the layout of the official hub checkpoints."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tokenizer(path)
    if layout == "multimodal":
        from safetensors.torch import load_file, save_file

        state = load_file(path / "model.safetensors")
        state = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        text = json.loads((path / "config.json").read_text())
        top = {
            "model_type": "gemma3n",
            "architectures": ["Gemma3nForConditionalGeneration"],
            "text_config": text,
            "eos_token_id": text["eos_token_id"],
        }
        (path / "config.json").write_text(json.dumps(top))
    return path


@pytest.fixture(scope="session")
def hf_text():
    """(HF model, checkpoint dir) for the default small config, written once per session."""
    import tempfile

    model = make_hf_text_model()
    path = save_text_checkpoint(model, Path(tempfile.mkdtemp(prefix="g3n-text-")) / "ckpt")
    return model, path


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded default model's directory (shipped in the package)."""
    from gemma3n.model import default_model_path

    return default_model_path()


TOWER_PREFIXES = ("model.audio_tower.", "model.vision_tower.", "model.embed_audio.", "model.embed_vision.")


def text_only_copy(src: Path, dst: Path) -> Path:
    """The text decoder of the embedded model as a text-only checkpoint (`gemma3n_text` config,
    `model.*` names, no towers): what tests that edit text fields or tensor names, or that need a
    model without ears and eyes, start from."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    text = dict(config.get("text_config", config), architectures=["Gemma3nForCausalLM"], model_type="gemma3n_text")
    (dst / "config.json").write_text(json.dumps(text, indent=2))
    state = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("model.language_model."):
                state["model." + k.removeprefix("model.language_model.")] = f.get_tensor(k)
            elif not k.startswith(TOWER_PREFIXES):
                state[k] = f.get_tensor(k)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "matformer_sizes.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def tiny_text_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The embedded model's text decoder alone (see text_only_copy); do not modify it."""
    return text_only_copy(tiny_model_dir, tmp_path_factory.mktemp("tiny-text") / "ckpt")


# --- a small text + audio + vision checkpoint, saved by transformers with its processor ------------
TEXT_VOCAB = 512  # the test tokenizer's size; ids [512, 640) are vision, [640, 768) audio
IMAGE_TOKENS = 16  # the tiny tower's msfa_output_resolution 4 -> 4 x 4 soft tokens
IMAGE_SIDE = 128  # stage-2 map 8 x 8 -> MSFA avg-pool 2
AUDIO_TOKENS = 24  # soft tokens per clip (188 in the real model): > the 15 of a 2.3 s clip, so padding is used


@pytest.fixture(scope="session")
def mm_checkpoint(tmp_path_factory):
    """(HF Gemma3nForConditionalGeneration, HF Gemma3nProcessor, checkpoint dir)."""
    path: Path = tmp_path_factory.mktemp("g3n-mm") / "ckpt"
    return build_mm_checkpoint(path)


def build_mm_checkpoint(path: Path):
    """A small random text + audio + vision checkpoint at `path` (also bench/bench_speech.py's)."""
    import copy

    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
    )

    from gemma3n.processing import GEMMA_TEMPLATE
    from tests.test_vision import tiny_vision_config

    path.mkdir()
    write_tokenizer(path)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "extra_special_tokens": MEDIA_TOKENS}))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    ids = {f"{k}_id": tokenizer.convert_tokens_to_ids(v) for k, v in MEDIA_TOKENS.items()}

    vision = dict(tiny_vision_config(), vocab_offset=TEXT_VOCAB)
    audio = dict(
        hidden_size=32,
        conf_num_hidden_layers=2,
        conf_num_attention_heads=4,
        sscp_conv_channel_size=[8, 4],
        vocab_offset=TEXT_VOCAB + 128,
    )
    text = dict(SMALL_TEXT, vocab_size=TEXT_VOCAB + 256, vocab_size_per_layer_input=TEXT_VOCAB)
    config = Gemma3nConfig(
        text_config=text,
        audio_config=audio,
        vision_config=copy.deepcopy(vision),
        vision_soft_tokens_per_image=IMAGE_TOKENS,
        audio_soft_tokens_per_image=AUDIO_TOKENS,
        **ids,
    )
    torch.manual_seed(0)
    hf = Gemma3nForConditionalGeneration(config).eval()
    randomize_(hf, seed=0)
    with torch.no_grad():
        # as in the official checkpoints, the rows of the media vocabularies copy the <pad> row
        # (docs/audio-vision.md#special-tokens)
        table = hf.model.language_model.embed_tokens.weight
        table[TEXT_VOCAB:] = table[0]
        # randomize_ gives the tower's norms ~1 but its layer scales 0.2 * noise: make them O(1) too
        for name, p in hf.model.vision_tower.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    hf.config.vision_config.model_args = copy.deepcopy(vision["model_args"])  # timm edits it in place
    hf.save_pretrained(path)
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessor(
            size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}, resample=2, do_normalize=False
        ),
        tokenizer=tokenizer,
        chat_template=GEMMA_TEMPLATE,
        image_seq_length=IMAGE_TOKENS,
        audio_seq_length=AUDIO_TOKENS,
    )
    processor.save_pretrained(path)
    return hf, processor, path


@torch.no_grad()
def last_token_logits(model, ids: list[int], embeds: torch.Tensor | None) -> torch.Tensor:
    """Our logits at a prompt's last position, from prepared ids and merged input embeddings."""
    t = torch.tensor([ids])
    hidden = model.decoder(t, torch.arange(t.shape[1]), plan=model.plan(), inputs_embeds=embeds)
    return model.decoder.lm_head(hidden[0, -1]).float()


@pytest.fixture(scope="module")
def native():
    """The native kernels' module (tests of its bodies skip where it cannot be built)."""
    module = kernels.get()
    if module is None:
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    return module
