"""What lives where: towers are never read for text-only requests, the per-layer embedding
table stays host-mapped, and bad device requests are refused clearly."""

from __future__ import annotations

import pytest
import torch

import gemma3n
from gemma3n.checkpoint import Checkpoint
from tests.conftest import text_only_copy
from tests.test_vision_e2e import _image, _messages

pytest.importorskip("timm")


@pytest.fixture()
def touched(monkeypatch):
    """Names of every tensor the runtime maps from disk."""
    names: list[str] = []
    original = Checkpoint.tensor

    def spy(self, name):
        names.append(name)
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", spy)
    return names


def test_text_only_request_never_reads_a_tower(mm_checkpoint, touched):
    _, _, path = mm_checkpoint
    model = gemma3n.load(path)
    model.generate(messages=[{"role": "user", "content": "hello"}], max_tokens=3, temperature=0)
    assert model.towers.loaded() == []
    assert touched and not [n for n in touched if n.startswith(("model.vision_tower", "model.audio_tower"))]
    assert not [n for n in touched if n.startswith(("model.embed_vision", "model.embed_audio"))]


def test_image_request_loads_the_vision_tower_only(mm_checkpoint, touched):
    _, _, path = mm_checkpoint
    model = gemma3n.load(path)
    model.generate(messages=_messages(_image(0, (64, 48))), max_tokens=2, temperature=0)
    assert model.towers.loaded() == ["model.embed_vision.", "vision_tower"]
    assert not [n for n in touched if n.startswith(("model.audio_tower", "model.embed_audio"))]


def test_per_layer_table_is_host_mapped_not_a_parameter(tiny_model_dir):
    model = gemma3n.load(tiny_model_dir)
    table = model.decoder.embed_tokens_per_layer
    assert table is not None and table.device.type == "cpu"
    assert all(p is not table for p in model.decoder.parameters())
    report = model.placement()
    cfg = model.config.text
    assert (
        report.host_params == cfg.vocab_size_per_layer_input * cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
    )
    assert report.device_params == sum(p.numel() for p in model.decoder.parameters())


def test_unavailable_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(gemma3n.InputError, match="no CUDA GPU is available"):
        gemma3n.load(device="cuda")
    with pytest.raises(gemma3n.InputError, match="unknown device 'tpu9'"):
        gemma3n.load(device="tpu9")


def test_checkpoint_without_per_layer_table(tiny_model_dir, tmp_path):

    from safetensors.torch import load_file, save_file

    dst = text_only_copy(tiny_model_dir, tmp_path / "m")
    state = load_file(dst / "model.safetensors")
    del state["model.embed_tokens_per_layer.weight"]
    save_file(state, dst / "model.safetensors")
    with pytest.raises(gemma3n.CheckpointError, match="missing.*embed_tokens_per_layer.weight"):
        gemma3n.load(dst)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_core_weights_resident_on_one_buffer_ple_table_mapped(tiny_model_dir, monkeypatch, quantize):
    """On a CPU the core weights are copied once into one (huge-page) buffer, where decode reads
    them faster than through the file mapping; the per-layer table stays mapped; the copy
    changes no value (GEMMA3N_MAPPED_WEIGHTS=1 keeps the mapping)."""
    from gemma3n.quantize import QLinear

    model = gemma3n.load(tiny_model_dir, quantize=quantize)
    storages = {p.untyped_storage().data_ptr() for p in model.decoder.parameters()}
    qweights = [m.weight for m in model.decoder.modules() if isinstance(m, QLinear)]
    storages |= {t.untyped_storage().data_ptr() for w in qweights for t in (w.q, w.scales)}
    assert len(storages) == 1, "every core weight in the one resident buffer"
    table = model.decoder.embed_tokens_per_layer
    table = getattr(table, "q", table)
    assert table.untyped_storage().data_ptr() not in storages  # still the file mapping
    monkeypatch.setenv("GEMMA3N_MAPPED_WEIGHTS", "1")
    mapped = gemma3n.load(tiny_model_dir, quantize=quantize)
    # kept mapped: the weights are views of the file mapping the table comes from (one shard)
    file_map = getattr(mapped.decoder.embed_tokens_per_layer, "q", mapped.decoder.embed_tokens_per_layer)
    assert mapped.decoder.norm.weight.untyped_storage().data_ptr() == file_map.untyped_storage().data_ptr()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model.logits(ids), mapped.logits(ids))
    prompt = "And God said"
    assert model.generate(prompt=prompt, max_tokens=8, temperature=0).token_ids == (
        mapped.generate(prompt=prompt, max_tokens=8, temperature=0).token_ids
    )
