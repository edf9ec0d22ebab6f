"""Bad input gets one clear message, never a traceback from deep inside torch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import gemma3n
from gemma3n import CheckpointError, ConfigError, InputError
from gemma3n.cli import main


@pytest.fixture()
def ckpt(tiny_text_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_text_dir, dst)
    return dst


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file

    state = fn(load_file(path / "model.safetensors"))
    save_file(state, path / "model.safetensors")


def test_missing_and_wrong_shape_tensors_reported_together(ckpt):
    def damage(state):
        del state["model.layers.0.mlp.up_proj.weight"]
        del state["model.norm.weight"]
        state["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(3, 3)
        state["model.layers.1.bogus.weight"] = torch.zeros(1)
        return state

    _rewrite(ckpt, damage)
    config = json.loads((ckpt / "config.json").read_text())
    q_shape = [config["num_attention_heads"] * config["head_dim"], config["hidden_size"]]
    with pytest.raises(CheckpointError) as e:
        gemma3n.load(ckpt)
    msg = str(e.value)
    assert "missing (2)" in msg and "layers.0.mlp.up_proj.weight" in msg and "norm.weight" in msg
    assert "wrong shape (1)" in msg
    assert f"layers.2.self_attn.q_proj.weight: checkpoint [3, 3], expected {q_shape}" in msg
    assert "unexpected (1)" in msg and "layers.1.bogus.weight" in msg


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        gemma3n.load(ckpt)


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        gemma3n.load(ckpt)


def test_missing_weights_and_shards(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights found"):
        gemma3n.load(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="names the shard shard-1.safetensors, which is missing"):
        gemma3n.load(ckpt)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.pop("num_hidden_layers"), "missing the field 'num_hidden_layers'"),
        (lambda c: c.update(intermediate_size=[256] * 3), "'intermediate_size' has 3 entries but num_hidden_layers"),
        (
            lambda c: c.update(num_kv_shared_layers=c["num_hidden_layers"]),
            r"num_kv_shared_layers \(\d+\) must be >= 0 and smaller",
        ),
        (lambda c: c["layer_types"].__setitem__(2, "local"), r"layer_types\[2\] is 'local'"),
        (lambda c: c.update(activation_sparsity_pattern=[0.5] * 4), "'activation_sparsity_pattern' has 4 entries"),
        (lambda c: c.update(model_type="llama"), "model_type 'llama' is not a Gemma 3n model"),
    ],
)
def test_config_errors_name_the_field(ckpt, edit, match):
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        gemma3n.load(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{ nope")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        gemma3n.load(ckpt)


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match="needs a config.json"):
        gemma3n.load(tmp_path)


def test_hub_id_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="huggingface-cli download google/gemma-3n-E2B-it"):
        gemma3n.load("google/gemma-3n-E2B-it")


def test_not_a_path_nor_hub_id():
    with pytest.raises(CheckpointError, match="no such directory, and it is not a hub id"):
        gemma3n.load("./nowhere/at/all")


def test_prompt_longer_than_context(tiny_model_dir):
    model = gemma3n.load(tiny_model_dir)
    n = model.config.text.max_position_embeddings
    with pytest.raises(InputError, match=f"the prompt has {n} tokens but the model's context is {n}"):
        model.generate([5] * n, max_tokens=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-1), "temperature must be a finite number >= 0"),
        (dict(top_p=0), r"top_p must be a number in \(0, 1\]"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(messages=[{"role": "user", "content": "a"}]), "exactly one of prompt"),
    ],
)
def test_bad_generation_options(tiny_model_dir, kwargs, match):
    model = gemma3n.load(tiny_model_dir)
    with pytest.raises(InputError, match=match):
        model.generate("hello", **kwargs)


def test_bad_messages(tiny_model_dir):
    model = gemma3n.load(tiny_model_dir)
    with pytest.raises(InputError, match="roles must alternate"):
        model.generate(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(InputError, match="has type 'video'"):
        model.generate(messages=[{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(InputError, match="token ids out of range"):
        model.generate([1, 2, 10**6])


def test_bad_logits_input(tiny_model_dir):
    model = gemma3n.load(tiny_model_dir)
    context = model.config.text.max_position_embeddings
    for ids, match in [
        (torch.zeros(1, 0, dtype=torch.long), r"non-empty \[batch, tokens\], got shape \[1, 0\]"),
        (torch.zeros(4, dtype=torch.long), r"got shape \[4\]"),
        (torch.zeros(1, context + 1, dtype=torch.long), f"has {context + 1} tokens but the model's context is"),
        (torch.tensor([[1, model.config.text.vocab_size]]), "token ids must be in"),
    ]:
        with pytest.raises(InputError, match=match):
            model.logits(ids)


def test_text_only_checkpoint_refuses_media(tiny_text_dir):
    model = gemma3n.load(tiny_text_dir)
    for part in ({"type": "image", "image": "x.png"}, {"type": "audio", "audio": "x.wav"}):
        with pytest.raises(InputError, match="text-only checkpoint"):
            model.generate(messages=[{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])


def test_checkpoint_with_one_tower_names_the_missing_one(mm_checkpoint, tmp_path):
    """A vision-only checkpoint is not "text-only": an audio part is refused for what is missing."""
    dst = tmp_path / "vision-only"
    shutil.copytree(mm_checkpoint[2], dst)
    config = json.loads((dst / "config.json").read_text())
    del config["audio_config"]
    (dst / "config.json").write_text(json.dumps(config))
    model = gemma3n.load(dst)
    assert model.has_vision and not model.has_audio
    with pytest.raises(InputError, match=r"has no audio tower: it cannot take audio$"):
        model.generate(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])


def test_cli_prints_one_line_and_exits_2(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemma3n: error: ") and "config.json" in err and "Traceback" not in err
    assert main(["generate", "--device", "cuda:0" if not torch.cuda.is_available() else "bogus", "-p", "x"]) == 2


def test_cli_output_piped_into_a_closed_reader_exits_quietly():
    """`gemma3n info | head -1`: no BrokenPipeError traceback when the reader has gone away."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gemma3n.cli import main; sys.exit(main(['info']))"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each line written as printed, as on a terminal
    )
    proc.stdout.close()  # the reader is gone before the first line (the child is still importing torch)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err
