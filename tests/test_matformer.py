"""MatFormer phase 1: the table, spec parsing/validation, effective params, streamed export.

No weights are downloaded: effective params use the real E4B shapes (docs/text-decoder.md#config-fields) and the
export runs on a tiny random checkpoint written by transformers 5.24.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from gemma3n import cli, info, shards
from gemma3n import export as ex
from gemma3n import matformer as mf
from gemma3n.config import TextConfig
from gemma3n.errors import InputError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box they only wait."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]


def e4b_config() -> TextConfig:
    # docs/text-decoder.md#config-fields: E4B. Every other field defaults to the E4B value.
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
    table = info.format_preset_table()
    assert "E2.49B-block" in table and "54.5 %" in table and "1.91 B" in table


def test_effective_params_match_every_table_row():
    cfg = e4b_config()
    assert mf.effective_params(cfg) == 3_980_491_248  # docs/text-decoder.md#parameter-counts
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
    with pytest.raises(InputError, match=r"layer 18 cannot be skipped: it is the KV source .*20-23,25-28,30-33"):
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


def _write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the tiny vocab (t4 ... t383), enough for the runtime to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, TINY["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.manual_seed(0)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("tiny") / "parent"
    model.save_pretrained(path)
    _write_tokenizer(path / "tokenizer.json")
    (path / "README.md").write_text("parent card")
    return path


def _hf_by_hand(sd: dict[str, torch.Tensor], parent_cfg: TextConfig, spec: mf.SliceSpec):
    """transformers model of the slice, with the weights cut by hand from the parent's state dict."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    cfg = dict(TINY, **mf.sliced_fields(parent_cfg, spec))
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
    out = ex.export_slice(src, {"ffn": "128x10", "skip": "5-9"}, tmp_path / "out", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"] == {"x": 1} and cfg["image_token_id"] == 7
    assert cfg["text_config"]["num_hidden_layers"] == 10 and cfg["text_config"]["num_kv_shared_layers"] == 5
    assert cfg["text_config"]["sliding_window"] == TINY["sliding_window"]
    assert (out / "processor_config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index["model.vision_tower.stem.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor("model.vision_tower.stem.weight"), tensors["model.vision_tower.stem.weight"])
    with safe_open(str(out / index["model.language_model.layers.5.mlp.down_proj.weight"]), "pt") as f:
        got = f.get_tensor("model.language_model.layers.5.mlp.down_proj.weight")
    assert torch.equal(got, tensors["model.language_model.layers.10.mlp.down_proj.weight"][:, :128])
    assert "model.language_model.layers.10.mlp.up_proj.weight" not in index


def test_export_refuses_non_empty_dir_unless_force(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=r"is not empty; pass --force"):
        ex.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False)
    assert (out / "keep.txt").is_file()
    with pytest.raises(InputError, match="is the source checkpoint"):
        ex.export_slice(tiny_ckpt, {"skip": "5-9"}, tiny_ckpt, progress=False, force=True)
    with pytest.raises(InputError, match=r"holds keep.txt, which a checkpoint does not have"):
        ex.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False, force=True)  # not a checkpoint
    assert (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    ex.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False)
    ex.export_slice(tiny_ckpt, {"ffn": "128x15"}, out, progress=False, force=True)  # a checkpoint: replaced
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 15
    empty = tmp_path / "empty"
    empty.mkdir()
    ex.export_slice(tiny_ckpt, {"skip": "5-9"}, empty, progress=False)  # an empty dir is fine
    assert (empty / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_export_invalid_spec_writes_nothing(tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match="layer 3 cannot be skipped"):
        ex.export_slice(tiny_ckpt, {"skip": [3]}, tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="defined for a 35-layer parent"):
        ex.export_slice(tiny_ckpt, "E2B", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_no_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shards._stream

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # what Ctrl-C mid-export raises
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "_stream", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ex.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial temp dir is removed too
    # with --force over an old export, an interruption keeps the old export intact
    monkeypatch.setattr(shards, "_stream", real)
    ex.export_slice(tiny_ckpt, {"skip": "5-9"}, out, progress=False)
    before = (out / "config.json").read_text()
    calls["n"] = 0
    monkeypatch.setattr(shards, "_stream", flaky)
    with pytest.raises(KeyboardInterrupt):
        ex.export_slice(tiny_ckpt, {"ffn": "128x15"}, out, progress=False, force=True)
    assert (out / "config.json").read_text() == before


# ---------------------------------------------------------------------------------------------
# phase 2: elastic views in our runtime (one loaded model, any size per call)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours_parent(tiny_ckpt):
    from gemma3n.model import load

    return load(tiny_ckpt, dtype=torch.float32)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(ids).logits[0, -1].argmax())
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def hf_parent_state(tiny_ckpt) -> dict[str, torch.Tensor]:
    from transformers import Gemma3nForCausalLM

    return Gemma3nForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("label", list(SPECS))
def test_export_and_elastic_view_match_transformers(tiny_ckpt, hf_parent_state, ours_parent, tmp_path, label):
    """The export loads in transformers with no missing/unexpected keys and equals a hand-made slice
    bit for bit; then (a) the elastic view on the loaded parent, (b) our runtime on the export and
    (c) transformers on the export give the same fp32 logits (<= 1e-4 relative) and greedy tokens."""
    from transformers import Gemma3nForCausalLM

    from gemma3n.model import load

    size = SPECS[label]
    parent_cfg = TextConfig.from_dict(json.loads((tiny_ckpt / "config.json").read_text()))
    spec = mf.resolve_size(size, parent_cfg)
    out = ex.export_slice(tiny_ckpt, spec, tmp_path / "slice", progress=False, max_shard_bytes=200_000)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded
    card = (out / "README.md").read_text()
    assert "parent card" not in card and spec.name in card
    cfg = json.loads((out / "config.json").read_text())
    for k, v in mf.sliced_fields(parent_cfg, spec).items():
        assert cfg[k] == v, k
    assert cfg["sliding_window"] == TINY["sliding_window"] and cfg["architectures"] == ["Gemma3nForCausalLM"]

    hf, info = Gemma3nForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    n_kept = len(spec.layers)
    assert len(hf.model.layers) == n_kept
    assert hf.model.embed_tokens_per_layer.weight.shape == (256, n_kept * 8)
    for j, w in enumerate(spec.ffn_widths):
        assert hf.model.layers[j].mlp.gate_proj.weight.shape == (w, 32)
    ids = torch.randint(4, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c = hf(ids).logits
        torch.testing.assert_close(_hf_by_hand(hf_parent_state, parent_cfg, spec)(ids).logits, c, rtol=0, atol=0)

    ours_slice = load(out, dtype=torch.float32)
    a = ours_parent.logits(ids, size=size)
    b = ours_slice.logits(ids)
    assert _rel(ours_parent.logits(ids), c) > 1e-2, "the size was ignored: the view gives the full model"
    rel_ab, rel_ac, rel_bc = _rel(a, b), _rel(a, c), _rel(b, c)
    print(f"{label}: view vs export {rel_ab:.1e}, view vs HF {rel_ac:.1e}, export vs HF {rel_bc:.1e}")
    assert max(rel_ab, rel_ac, rel_bc) <= 1e-4
    prompt = ids[0].tolist()
    ta = ours_parent.generate(prompt=prompt, max_tokens=6, temperature=0, size=size).token_ids
    tb = ours_slice.generate(prompt=prompt, max_tokens=6, temperature=0).token_ids
    tc = _hf_greedy(hf, prompt, 6)
    assert ta == tb
    assert ta == tc[: len(ta)] and (len(ta) == 6 or tc[len(ta) - 1] in ours_parent.stop_ids())


class _WeightSizedAllocations:
    """Records every op output that is as large as a FFN weight slice and does not share storage
    with a parameter: a copy of a weight made anywhere in the forward shows up here."""

    def __init__(self, limit: int, param_ptrs: set[int]):
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outs = out if isinstance(out, (tuple, list)) else [out]
                fresh = str(func).split(".")[1] in ("empty", "new_empty", "zeros", "new_zeros")
                for t in outs:  # (fresh buffers, e.g. a KV cache, hold no weight)
                    if isinstance(t, torch.Tensor) and t.numel() >= watch.limit and not fresh:
                        if t.untyped_storage().data_ptr() not in watch.param_ptrs:
                            watch.found.append((str(func), tuple(t.shape)))
                return out

        self.limit, self.param_ptrs, self.found, self.mode = limit, param_ptrs, [], Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_switching_sizes_copies_no_weight(ours_parent):
    m = ours_parent
    dec = m.decoder
    ptrs = {n: p.untyped_storage().data_ptr() for n, p in dec.named_parameters()}
    ple_ptr = dec.embed_tokens_per_layer.untyped_storage().data_ptr()
    sizes = [None, SPECS["skip-period"], SPECS["mixed"], None, SPECS["skip-period"]]
    ids = torch.randint(4, TINY["vocab_size"], (1, 3), generator=torch.Generator().manual_seed(3))
    smallest_slice = 128 * TINY["hidden_size"]  # the narrowest FFN weight a spec above uses
    with _WeightSizedAllocations(smallest_slice, set(ptrs.values()) | {ple_ptr}) as watch:
        for size in sizes:
            m.logits(ids, size=size)
            list(m.stream(prompt=ids[0].tolist(), max_tokens=2, temperature=0, size=size))
    assert watch.found == []
    assert {n: p.untyped_storage().data_ptr() for n, p in dec.named_parameters()} == ptrs
    assert dec.embed_tokens_per_layer.untyped_storage().data_ptr() == ple_ptr
    # a plan is a config and a tuple of layer indices: it holds no tensor
    for size in sizes:
        plan = m.plan(size)
        assert not any(isinstance(v, torch.Tensor) for v in vars(plan).values())
        assert not any(isinstance(v, torch.Tensor) for v in vars(plan.config).values())


def test_switching_sizes_does_not_grow_memory(tiny_ckpt, tmp_path):
    """FFNs 16384 wide (15 x 6 MB): a per-size copy of the kept prefixes would add ~50 MB of RSS."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gemma3n.model import load

    wide, d = 16384, TINY["hidden_size"]
    path = tmp_path / "wide"
    path.mkdir()
    gen = torch.Generator().manual_seed(5)
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for i in range(TINY["num_hidden_layers"]):
        for name, shape in (("gate_proj", (wide, d)), ("up_proj", (wide, d)), ("down_proj", (d, wide))):
            tensors[f"model.layers.{i}.mlp.{name}.weight"] = torch.randn(shape, generator=gen) * 0.02
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["intermediate_size"] = [wide] * TINY["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    _write_tokenizer(path / "tokenizer.json")
    m = load(path, dtype=torch.float32)
    ids = torch.randint(4, TINY["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(4))

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8192 / 12288 are not 4x / 8x of hidden 32
        m.logits(ids)  # pages every weight in
        m.logits(ids, size={"ffn": "8192x15"})  # warm the allocator at the narrow width too
        before = rss_mb()
        for _ in range(2):
            for size in ({"ffn": "8192x15"}, {"ffn": "8192x10", "skip": "5-9"}, {"ffn": "12288x15"}, None):
                m.logits(ids, size=size)
    grown = rss_mb() - before
    ffn_mb = 15 * 3 * d * wide * 4 / 2**20
    assert grown < 0.1 * ffn_mb, f"RSS grew {grown:.1f} MB switching sizes (FFNs hold {ffn_mb:.0f} MB)"


def test_kv_caches_are_per_size(ours_parent):
    """Interleaved streams of two sizes decode exactly what each decodes alone."""
    m = ours_parent
    prompt = list(range(10, 22))
    size_a, size_b = SPECS["skip-period"], SPECS["narrow-only"]
    alone_a = m.generate(prompt=prompt, max_tokens=6, temperature=0, size=size_a).token_ids
    alone_b = m.generate(prompt=prompt, max_tokens=6, temperature=0, size=size_b).token_ids
    alone_full = m.generate(prompt=prompt, max_tokens=6, temperature=0).token_ids
    assert alone_a != alone_full or alone_b != alone_full
    streams = {
        "a": m.stream(prompt=prompt, max_tokens=6, temperature=0, size=size_a),
        "b": m.stream(prompt=prompt, max_tokens=6, temperature=0, size=size_b),
        "full": m.stream(prompt=prompt, max_tokens=6, temperature=0),
    }
    got: dict[str, list[int]] = {k: [] for k in streams}
    live = dict(streams)
    while live:
        for k in list(live):
            piece = next(live[k], None)
            if piece is None:
                del live[k]
            else:
                got[k] += piece.token_ids
    assert got == {"a": alone_a, "b": alone_b, "full": alone_full}
    pa, pb = m.plan(size_a), m.plan(size_b)
    assert pa.spec != pb.spec != m.plan(None).spec


def test_cli_helpers(tiny_ckpt, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    cli._add_slice_arguments(parser)
    assert cli.cmd_slice(parser.parse_args(["--list", "--model", "E4B"])) is None  # a hub id: the whole table
    assert "E2.49B-block" in capsys.readouterr().out
    args = parser.parse_args(["-m", str(tiny_ckpt), "--ffn", "128x10", "--skip", "5-9", "-o", str(tmp_path / "s")])
    args.no_progress = True
    assert cli.cmd_slice(args) is None
    printed = capsys.readouterr().out
    assert "Layers: 10 of 15, skipped 5-9" in printed and (tmp_path / "s" / "config.json").is_file()
    with pytest.raises(InputError, match="not empty; pass --force"):
        cli.cmd_slice(args)
    with pytest.raises(InputError, match="either a preset"):
        cli.size_from_cli("E2B", "8192x30", None)
    with pytest.raises(InputError, match="choose a slice"):
        cli.cmd_slice(parser.parse_args(["-m", str(tiny_ckpt), "-o", str(tmp_path / "t")]))
    assert cli.size_from_cli(None, None, "20-24") == {"ffn": None, "skip": [20, 21, 22, 23, 24]}
    lines = info.describe_size(e4b_config(), "E2B")
    assert lines[0] == "size: E2B" and "1.91 B (full model 3.98 B)" in lines[-1]
    assert info.describe_size(e4b_config(), None) == ["size: full model, 35 layers, effective params 3.98 B"]


def test_compact_text_size():
    cfg = e4b_config()
    assert mf.resolve_size("ffn=8192x30 skip=20-24", cfg) == mf.resolve_size("E2B", cfg)
    assert mf.resolve_size("skip=20-24", cfg).ffn_widths == (16384,) * 30
    with pytest.raises(InputError, match="write custom sizes as"):
        mf.resolve_size("ffn=8192x35 layers=3", cfg)
