"""The shipped default model: its files agree with each other, it loads offline, it is
deterministic, and (once the model trained by tools/train_tiny.py is shipped) it has actually
learnt its corpus, the King James Bible."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

import gemma3n
from gemma3n.config import TextConfig
from gemma3n.text import TextDecoder

GEMMA_SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 5, "<end_of_turn>": 6}


def test_shipped_files_are_what_config_and_tokenizer_describe(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3n_text"
    assert not any(k in config for k in ("audio_config", "vision_config"))
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"] == config["vocab_size_per_layer_input"]
    assert {t: tok.token_to_id(t) for t in GEMMA_SPECIALS} == GEMMA_SPECIALS
    assert config["eos_token_id"] == [1, 6] and config["bos_token_id"] == 2 and config["pad_token_id"] == 0
    decoder = TextDecoder(TextConfig.from_dict(config))
    expected = {f"model.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()}
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    n, p = config["num_hidden_layers"], config["hidden_size_per_layer_input"]
    assert shapes.pop("model.embed_tokens_per_layer.weight") == (config["vocab_size_per_layer_input"], n * p)
    assert shapes == expected
    assert shapes["model.embed_tokens.weight"] == (config["vocab_size"], config["hidden_size"])
    size = sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    assert size <= 25 * 2**20


def test_shipped_model_writes_its_corpus_deterministically(tiny_model_dir):
    if "random weights" in (tiny_model_dir / "README.md").read_text():
        pytest.skip("the shipped model is still the random one from tools/make_tiny.py")
    model = gemma3n.load()
    assert model.path == tiny_model_dir
    greedy = model.generate("In the beginning", max_tokens=12, temperature=0)
    assert "LORD" in greedy.text
    a = model.generate("And the LORD said", max_tokens=12, seed=3, temperature=0.8)
    b = model.generate("And the LORD said", max_tokens=12, seed=3, temperature=0.8)
    assert a.token_ids == b.token_ids and a.text.strip()
