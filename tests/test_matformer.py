"""MatFormer phase 1: the table, spec parsing/validation, effective params, streamed export.

No weights are downloaded: effective params use the real E4B shapes (text-decoder.md §1) and the
export runs on a tiny random checkpoint written by transformers 5.24.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from gemma3n import matformer as mf
from gemma3n.config import TextConfig
from gemma3n.errors import InputError


def _types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]


def e4b_config() -> TextConfig:
    # text-decoder.md §1: E4B. Every other field defaults to the E4B value.
    return TextConfig(
        num_hidden_layers=35,
        intermediate_size=[16384] * 35,
        layer_types=_types(35),
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 25,
    )


def e2b_config() -> TextConfig:
    return TextConfig(
        num_hidden_layers=30,
        intermediate_size=[8192] * 30,
        layer_types=_types(30),
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20,
        num_kv_shared_layers=10,
    )


# ---------------------------------------------------------------------------------------------
# table + effective params
# ---------------------------------------------------------------------------------------------


def test_table_parsed_from_package_data():
    ps = mf.presets()
    assert len(ps) == 16
    names = [p.name for p in ps]
    assert names[:2] == ["E4B", "E2B"] and "E2.54B-layer" in names and "E2.49B-block" in names
    e2b = mf.find_preset("e2b")
    assert e2b.skipped == (20, 21, 22, 23, 24) and e2b.ffn_widths == (8192,) * 30
    assert e2b.mmlu_pt == pytest.approx(50.9) and e2b.effective_params_b == pytest.approx(1.91)
    assert mf.find_preset("Config for E2.54B (layer-level)").name == "E2.54B-layer"
    assert mf.find_preset("E2.54B").name == "E2.54B-layer"  # unique bare size
    assert mf.find_preset("E3.74B-block").name == "E3.79B-block"  # the row misnamed in the table
    with pytest.raises(InputError, match="ambiguous"):
        mf.find_preset("E2.98B")
    with pytest.raises(InputError, match="unknown size 'E9B'"):
        mf.find_preset("E9B")
    table = mf.format_preset_table()
    assert "E2.49B-block" in table and "54.5 %" in table and "1.91 B" in table


def test_effective_params_match_every_table_row():
    cfg = e4b_config()
    assert mf.effective_params(cfg) == 3_980_491_248  # text-decoder.md §6.2
    assert mf.effective_params(e2b_config()) == 1_905_495_648
    for p in mf.presets():
        spec = mf.resolve_size(p.name, cfg)
        eff = mf.effective_params(mf.sliced_text_config(cfg, spec)) / 1e9
        assert abs(eff - p.effective_params_b) <= 0.02, (p.name, eff, p.effective_params_b)


def test_e2b_preset_equals_e2b_config():
    cfg = e4b_config()
    spec = mf.resolve_size("E2B", cfg)
    assert spec.layers == tuple(range(20)) + tuple(range(25, 35))
    sub = mf.sliced_text_config(cfg, spec)
    ref = e2b_config()
    for f in ("num_hidden_layers", "intermediate_size", "layer_types", "activation_sparsity_pattern"):
        assert getattr(sub, f) == getattr(ref, f), f
    assert sub.num_kv_shared_layers == 10 and sub.kv_sources() == ref.kv_sources()
    assert mf.resolve_size("E4B", cfg) is None and mf.resolve_size(None, cfg) is None
    # the same slice by name and by dict is the same cache key
    assert mf.resolve_size({"ffn": "8192x30", "skip": "20-24"}, cfg) == spec
    assert hash(mf.resolve_size({"ffn": [8192] * 30, "skip": [20, 21, 22, 23, 24]}, cfg)) == hash(spec)


# ---------------------------------------------------------------------------------------------
# parsing + validation
# ---------------------------------------------------------------------------------------------


def test_parse_ffn_and_skip():
    assert mf.parse_ffn("8192x20,16384x10") == [8192] * 20 + [16384] * 10
    assert mf.parse_ffn("8192, 16384,8_192") == [8192, 16384, 8192]
    assert mf.parse_skip("20-24") == [20, 21, 22, 23, 24]
    assert mf.parse_skip("30,20-21") == [20, 21, 30]
    assert mf.parse_skip("") == []
    assert mf.format_ffn([8192] * 20 + [16384] * 10) == "8192x20,16384x10"
    assert mf.format_skip([20, 21, 22, 23, 24, 30]) == "20-24,30"
    for bad, msg in [("", "empty"), ("8192y3", "not WIDTH"), ("0x3", "positive"), ("8192x0", "count")]:
        with pytest.raises(InputError, match=msg):
            mf.parse_ffn(bad)
    for bad, msg in [("a", "not a layer index"), ("24-20", "backwards")]:
        with pytest.raises(InputError, match=msg):
            mf.parse_skip(bad)


def test_validation_messages():
    cfg = e4b_config()
    with pytest.raises(
        InputError, match=r"layer 18 cannot be skipped: it is the KV source .*20-23,25-28,30-33"
    ):
        mf.resolve_size({"skip": [18]}, cfg)
    with pytest.raises(InputError, match=r"layer 19 cannot be skipped.*full_attention layers 24,29,34"):
        mf.resolve_size({"skip": "19-24"}, cfg)
    with pytest.raises(InputError, match=r"3 widths but 30 layers are kept \(35 layers minus 5 skipped\)"):
        mf.resolve_size({"ffn": [8192] * 3, "skip": "20-24"}, cfg)
    with pytest.raises(InputError, match=r"width 20000 for layer 0 .* exceeds the parent's width 16384"):
        mf.resolve_size({"ffn": [20000] + [16384] * 34}, cfg)
    with pytest.raises(InputError, match=r"layer 2 \(kept layer #2\) must be positive"):
        mf.resolve_size({"ffn": [8192, 8192, 0] + [8192] * 32}, cfg)
    with pytest.raises(InputError, match=r"cannot skip layer 35: the model has 35 layers"):
        mf.resolve_size({"skip": [35]}, cfg)
    with pytest.raises(InputError, match="unknown key"):
        mf.resolve_size({"ffn": [1], "layers": [1]}, cfg)
    with pytest.raises(InputError, match="size must be None"):
        mf.resolve_size(3.5, cfg)
    with pytest.warns(UserWarning, match=r"never a trained granularity \(trained: 8192, 16384\)"):
        spec = mf.resolve_size({"ffn": [12288] * 35}, cfg)
    assert spec.ffn_widths == (12288,) * 35
    with pytest.warns(UserWarning, match="below the KV-shared region"):
        mf.resolve_size({"skip": [5]}, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained widths and shared-region skips are silent
        mf.resolve_size("E2.49B-block", cfg)
        mf.resolve_size({"skip": "20-24"}, cfg)


def test_preset_refused_on_a_parent_it_does_not_fit():
    e2b = e2b_config()
    with pytest.raises(InputError, match=r"preset 'E2.54B-layer' is defined for a 35-layer parent .* has 30"):
        mf.resolve_size("E2.54B-layer", e2b)
    assert mf.resolve_size("E2B", e2b) is None  # already that size
    narrow = e4b_config()
    narrow.intermediate_size = [8192] * 35
    with pytest.raises(InputError, match=r"needs FFN width 16384 at layer 4 but this model's is 8192"):
        mf.resolve_size("E1.96B-layer", narrow)


# ---------------------------------------------------------------------------------------------
# export on a tiny random checkpoint
# ---------------------------------------------------------------------------------------------

TINY = dict(
    vocab_size=384,
    vocab_size_per_layer_input=256,
    hidden_size=32,
    hidden_size_per_layer_input=8,
    intermediate_size=256,  # 8x hidden: 128 (4x) is the other trained width
    num_hidden_layers=15,
    num_kv_shared_layers=10,  # KV sources 3 (sliding) and 4 (full), just below the shared region
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    laurel_rank=4,
    sliding_window=8,
    activation_sparsity_pattern=[0.95] * 2 + [0.0] * 13,
)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.manual_seed(0)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("tiny") / "parent"
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"fake": true}')
    (path / "README.md").write_text("parent card")
    return path


def _hf_by_hand(parent: Path, spec: mf.SliceSpec):
    """transformers model of the slice, with the weights cut by hand from the parent's state dict."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    full = Gemma3nForCausalLM.from_pretrained(parent, dtype=torch.float32)
    sd = full.state_dict()
    raw = json.loads((parent / "config.json").read_text())
    cfg = dict(raw)
    from gemma3n.config import TextConfig as TC

    cfg.update(mf.sliced_fields(TC.from_dict(raw), spec))
    cfg.pop("architectures", None), cfg.pop("transformers_version", None), cfg.pop("model_type", None)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**cfg)).eval()
    p = TINY["hidden_size_per_layer_input"]
    new = {}
    for j, (i, w) in enumerate(zip(spec.layers, spec.ffn_widths)):
        for k, v in sd.items():
            if k.startswith(f"model.layers.{i}."):
                rest = k[len(f"model.layers.{i}.") :]
                if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                    v = v[:w]
                elif rest == "mlp.down_proj.weight":
                    v = v[:, :w]
                new[f"model.layers.{j}.{rest}"] = v
    cols = torch.tensor([i * p + k for i in spec.layers for k in range(p)])
    for k, v in sd.items():
        if not k.startswith("model.layers."):
            new[k] = v
    new["model.embed_tokens_per_layer.weight"] = sd["model.embed_tokens_per_layer.weight"][:, cols]
    new["model.per_layer_model_projection.weight"] = sd["model.per_layer_model_projection.weight"][cols]
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model


SPECS = {
    "skip-period": {"ffn": "128x10", "skip": "5-9"},  # E2B-like: one whole period of the shared region
    "narrow-only": {"ffn": "128x3,256x2,128x10"},  # no skip, FFN only
    "mixed": {"ffn": "128x4,256,128x5", "skip": "10-14"},  # a later period skipped, global layer 4 wide
}


@pytest.mark.parametrize("label", list(SPECS))
def test_export_loads_in_transformers_and_matches_hand_slice(tiny_ckpt, tmp_path, label):
    from transformers import Gemma3nForCausalLM

    parent_cfg = TextConfig.from_dict(json.loads((tiny_ckpt / "config.json").read_text()))
    spec = mf.resolve_size(SPECS[label], parent_cfg)
    out = mf.export_slice(tiny_ckpt, spec, tmp_path / "slice", progress=False, max_shard_bytes=200_000)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded
    assert "parent card" not in (out / "README.md").read_text()
    assert spec.name in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    want = mf.sliced_fields(parent_cfg, spec)
    for k, v in want.items():
        assert cfg[k] == v, k
    assert cfg["sliding_window"] == TINY["sliding_window"] and cfg["architectures"] == ["Gemma3nForCausalLM"]

    model, info = Gemma3nForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    n_kept = len(spec.layers)
    assert len(model.model.layers) == n_kept
    assert model.model.embed_tokens_per_layer.weight.shape == (256, n_kept * 8)
    for j, w in enumerate(spec.ffn_widths):
        assert model.model.layers[j].mlp.gate_proj.weight.shape == (w, 32)
    ref = _hf_by_hand(tiny_ckpt, spec)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(ids).logits
        b = ref(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the export is a pure byte copy of the slices


def test_export_multimodal_layout_rewrites_nested_config(tiny_ckpt, tmp_path):
    """`model.language_model.` names + a tower tensor + a top-level `gemma3n` config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp_path / "mm"
    src.mkdir()
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        tensors = {"model.language_model." + k[len("model.") :]: f.get_tensor(k) for k in f.keys()}
    tensors["model.vision_tower.stem.weight"] = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((tiny_ckpt / "config.json").read_text())
    raw = {"model_type": "gemma3n", "text_config": text, "vision_config": {"x": 1}, "image_token_id": 7}
    (src / "config.json").write_text(json.dumps(raw))
    (src / "processor_config.json").write_text("{}")
    out = mf.export_slice(src, {"ffn": "128x10", "skip": "5-9"}, tmp_path / "out", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"] == {"x": 1} and cfg["image_token_id"] == 7
    assert cfg["text_config"]["num_hidden_layers"] == 10 and cfg["text_config"]["num_kv_shared_layers"] == 5
    assert cfg["text_config"]["sliding_window"] == TINY["sliding_window"]
    assert (out / "processor_config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index["model.vision_tower.stem.weight"]), "pt") as f:
        assert torch.equal(
            f.get_tensor("model.vision_tower.stem.weight"), tensors["model.vision_tower.stem.weight"]
        )
    with safe_open(str(out / index["model.language_model.layers.5.mlp.down_proj.weight"]), "pt") as f:
        got = f.get_tensor("model.language_model.layers.5.mlp.down_proj.weight")
    assert torch.equal(got, tensors["model.language_model.layers.10.mlp.down_proj.weight"][:, :128])
    assert "model.language_model.layers.10.mlp.up_proj.weight" not in index


def test_export_refuses_non_empty_dir_unless_force(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=r"is not empty; pass --force"):
        mf.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False)
    assert (out / "keep.txt").is_file()
    with pytest.raises(InputError, match="is the source checkpoint"):
        mf.export_slice(tiny_ckpt, {"skip": "5-9"}, tiny_ckpt, progress=False, force=True)
    mf.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    mf.export_slice(tiny_ckpt, {"skip": "5-9"}, empty, progress=False)  # an empty dir is fine
    assert (empty / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_export_invalid_spec_writes_nothing(tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match="layer 3 cannot be skipped"):
        mf.export_slice(tiny_ckpt, {"skip": [3]}, tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="defined for a 35-layer parent"):
        mf.export_slice(tiny_ckpt, "E2B", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_no_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = mf._stream

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # what Ctrl-C mid-export raises
        return real(*args, **kwargs)

    monkeypatch.setattr(mf, "_stream", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mf.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial temp dir is removed too
    # with --force over an old export, an interruption keeps the old export intact
    monkeypatch.setattr(mf, "_stream", real)
    mf.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False)
    before = (out / "config.json").read_text()
    calls["n"] = 0
    monkeypatch.setattr(mf, "_stream", flaky)
    with pytest.raises(KeyboardInterrupt):
        mf.export_slice(tiny_ckpt, {"ffn": "128x15"}, out, progress=False, force=True)
    assert (out / "config.json").read_text() == before
