"""Sizes a checkpoint declares for itself in matformer_sizes.json (MatFormer Mix-n-Match).

The checkpoint is a copy of the embedded tiny model plus a sizes file computed from its own
config.json, so these tests hold whatever shapes the embedded model has.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import gemma3n
from gemma3n import matformer as mf
from gemma3n.checkpoint import open_checkpoint
from gemma3n.cli import main
from gemma3n.config import load_config
from gemma3n.errors import CheckpointError, InputError
from gemma3n.info import describe, format_preset_table
from gemma3n.server.routes import _model_ids

IDS = torch.tensor([[2, 5, 6, 7, 8, 9]])


def half_size(text) -> dict:
    """A valid sub-model of any config: skip the first half of the KV-shared layers (never KV
    sources), and halve the FFN of every kept layer."""
    n = text.num_hidden_layers
    first_shared = n - text.num_kv_shared_layers
    skip = list(range(first_shared, n))[: max(1, text.num_kv_shared_layers // 2)] if text.num_kv_shared_layers else []
    kept = [i for i in range(n) if i not in skip]
    return {"ffn": [max(1, text.intermediate_size[i] // 2) for i in kept], "skip": skip}


def write_sizes(path: Path, sizes) -> None:
    (path / mf.SIZES_FILE).write_text(json.dumps(sizes))


@pytest.fixture(scope="module")
def ckpt_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the embedded model that declares `half` (and `E2B`: a declared name wins over a preset)."""
    path = tmp_path_factory.mktemp("declared") / "tiny"
    shutil.copytree(tiny_model_dir, path, ignore=shutil.ignore_patterns(mf.SIZES_FILE))
    text = load_config(path).text
    write_sizes(path, {"sizes": {"half": half_size(text), "E2B": {"ffn": list(text.intermediate_size)}}})
    return path


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return gemma3n.load(ckpt_dir)


@pytest.fixture
def bare_dir(tiny_model_dir, tmp_path) -> Path:
    """A copy of the embedded model's config only (what the sizes file is read and checked against)."""
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    return tmp_path


def test_plan_by_declared_name_equals_plan_by_dict(model):
    text = model.config.text
    size = half_size(text)
    assert model.declared_sizes["half"] == size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a halved width may never be a trained granularity
        by_dict = model.logits(IDS, size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint vouches for its declared sizes: no warning
        by_name = model.logits(IDS, size="half")
        assert torch.equal(model.logits(IDS, size=" HALF "), by_name)  # case and spaces ignored
    assert torch.equal(by_name, by_dict)
    plan = model.plan("half")
    assert plan.layers == tuple(i for i in range(text.num_hidden_layers) if i not in size["skip"])
    assert list(plan.config.intermediate_size) == size["ffn"]


def test_widths_the_checkpoint_declares_count_as_trained(model):
    """A custom size at a width the declared sizes use gets no "never trained" warning; other
    widths still do (the embedded model nests 2x hidden in 4x, not Gemma 3n's 4x in 8x)."""
    text = model.config.text
    declared_width = half_size(text)["ffn"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mf.resolve_size({"ffn": [declared_width] * text.num_hidden_layers}, text, model.declared_sizes)
    if declared_width not in mf._trained_widths(text):  # not one of Gemma 3n's own multiples
        with pytest.warns(UserWarning, match="never a trained granularity"):
            mf.resolve_size({"ffn": [declared_width] * text.num_hidden_layers}, text)  # no declared sizes
    with pytest.warns(UserWarning, match="never a trained granularity"):
        mf.resolve_size({"ffn": [declared_width - 8] * text.num_hidden_layers}, text, model.declared_sizes)


def test_declared_name_takes_precedence_over_a_preset(model):
    text = model.config.text
    with pytest.raises(InputError):  # the official E2B does not fit a small model
        mf.resolve_size("E2B", text)
    assert mf.resolve_size("e2b", text, model.declared_sizes) is None  # declared: the full widths
    spec = mf.resolve_size("half", text, model.declared_sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert spec.name == "half" and spec == mf.resolve_size(half_size(text), text)


def test_sizes_lists_declared_names_first(model):
    sizes = model.sizes()
    assert sizes[:2] == ["half", "E2B"] and sizes.count("E2B") == 1
    ids = _model_ids(model, None, None)  # what the server lists: every size is a model id
    assert ids["gemma3n-half"] == "half" and ids["gemma3n-E2B"] == "E2B"


def test_unknown_name_lists_the_declared_sizes(model):
    with pytest.raises(InputError, match=r"unknown size 'nope': this checkpoint's sizes .* are half, E2B"):
        model.plan("nope")


def test_slice_list_shows_declared_sizes(ckpt_dir, capsys):
    n = load_config(ckpt_dir).text.num_hidden_layers
    assert main(["slice", "--list", "--model", str(ckpt_dir)]) == 0
    out = capsys.readouterr().out
    assert mf.SIZES_FILE in out and f"This model: {n} layers" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("half ", "E2B "))}
    kept = n - len(half_size(load_config(ckpt_dir).text)["skip"])
    assert rows["half"][1] == str(kept) and rows["half"][3] == "M"  # a small model's params in millions
    assert rows["E2B"][4:6] == ["-", "full"]
    assert f"this model has {n} layers" in out and "E2.49B-block" not in out  # no official preset fits


def test_slice_list_defaults_to_the_embedded_model(tiny_model_dir, capsys):
    n = load_config(tiny_model_dir).text.num_hidden_layers
    assert main(["slice", "--list"]) == 0
    assert f"This model: {n} layers" in capsys.readouterr().out


def test_export_by_declared_name(ckpt_dir, model, tmp_path, capsys):
    out = tmp_path / "half"
    assert main(["slice", "--model", str(ckpt_dir), "--preset", "half", "--out", str(out), "--no-progress"]) == 0
    assert "Slice: half" in capsys.readouterr().out
    assert not (out / mf.SIZES_FILE).exists()  # the parent's sizes do not fit the slice
    size = half_size(model.config.text)
    assert load_config(out).text.intermediate_size == size["ffn"]
    sliced = gemma3n.load(out)
    assert sliced.sizes() == []
    torch.testing.assert_close(sliced.logits(IDS), model.logits(IDS, size="half"), rtol=1e-4, atol=1e-4)


def test_info_size_by_declared_name(ckpt_dir, model):
    lines = list(describe(open_checkpoint(ckpt_dir), size="half"))
    kept = len(model.plan("half").layers)
    assert any(line.startswith("size half:") and line.endswith(f"{kept} layers") for line in lines)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"half": {"skip": [1]}}), "must hold one object"),
        (json.dumps({"sizes": {"half": [1, 2]}}), "size 'half' must be an object"),
        (json.dumps({"sizes": {"half": {"widths": [1]}}}), r"size 'half' has unknown key\(s\) \['widths'\]"),
        (json.dumps({"sizes": {"half": {"ffn": [1, 2]}}}), "size 'half' does not fit this model: .*FFN list has 2"),
        (json.dumps({"sizes": {"a b": {"skip": []}, "AB": {"skip": []}}}), "'a b' and 'AB' are the same"),
    ],
)
def test_bad_sizes_file_is_a_clear_error(bare_dir, content, match):
    (bare_dir / mf.SIZES_FILE).write_text(content)
    text = load_config(bare_dir).text
    with pytest.raises(CheckpointError, match=match) as err:
        mf.read_declared_sizes(bare_dir, text)
    assert str(bare_dir / mf.SIZES_FILE) in str(err.value)


def test_bad_sizes_file_through_the_cli(bare_dir, capsys):
    text = load_config(bare_dir).text
    too_wide = [2 * w for w in text.intermediate_size]
    write_sizes(bare_dir, {"sizes": {"wide": {"ffn": too_wide}}})
    assert main(["slice", "--list", "--model", str(bare_dir)]) == 2
    err = capsys.readouterr().err
    assert mf.SIZES_FILE in err and "size 'wide'" in err and "exceeds the parent's width" in err


def test_no_sizes_file_declares_nothing(bare_dir):
    text = load_config(bare_dir).text
    assert mf.read_declared_sizes(bare_dir, text) == {}
    table = format_preset_table(text)
    assert mf.SIZES_FILE not in table and "none fit" in table
