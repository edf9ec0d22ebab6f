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
