"""Bad input is refused before anything is allocated, with one clear line (issue #21): config
fields of the wrong type or range, configs too big for the machine, sampling parameters that are
not finite or out of range, text that is not valid Unicode, and non-finite logits."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import gemma3n
from gemma3n import config as cfgmod
from gemma3n.cli import main
from gemma3n.config import TextConfig
from gemma3n.errors import CheckpointError, ConfigError, InputError
from gemma3n.model import default_model_path

ROOT = Path(__file__).resolve().parents[1]


def _refused(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("gemma3n: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _cli(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemma3n.cli", *args], cwd=ROOT, input=stdin, capture_output=True, timeout=300
    )


def _one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    err = res.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    assert res.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("gemma3n: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model():
    return gemma3n.load()


@pytest.fixture
def ckpt(tiny_text_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_text_dir, tmp_path / "ckpt"))


def _text_config() -> dict:
    """The embedded model's text_config."""
    config = json.loads((default_model_path() / "config.json").read_text())
    return config.get("text_config", config)


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _scalar_layers(c: dict, n: int) -> None:
    """n layers, every per-layer field a scalar (or absent): the config stays a few bytes."""
    c.update(num_hidden_layers=n, intermediate_size=c["intermediate_size"][0])
    c.pop("layer_types")
    c.pop("activation_sparsity_pattern")


# --- config fields --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.update(hidden_size="128"), "'hidden_size' must be an integer"),
        (lambda c: c.update(hidden_size=True), "'hidden_size' must be an integer"),
        (lambda c: c.update(hidden_size=128.0), "'hidden_size' must be an integer"),
        (lambda c: c.update(num_attention_heads=0), "'num_attention_heads' must be an integer >= 1"),
        (lambda c: c.update(head_dim=-32), "'head_dim' must be an integer >= 1"),
        (lambda c: c.update(num_hidden_layers="15"), "'num_hidden_layers' must be an integer"),
        (lambda c: c.update(num_hidden_layers=False), "'num_hidden_layers' must be an integer"),
        (lambda c: c.update(sliding_window=0), "'sliding_window' must be an integer >= 1"),
        (lambda c: c.update(num_kv_shared_layers=-1), "'num_kv_shared_layers' must be an integer >= 0"),
        (lambda c: c.update(rms_norm_eps=float("nan")), "'rms_norm_eps' must be a finite number > 0"),
        (lambda c: c.update(final_logit_softcapping=float("inf")), "'final_logit_softcapping' must be a finite"),
        (lambda c: c.update(altup_coef_clip="big"), "'altup_coef_clip' must be a finite number"),
        (lambda c: c.update(tie_word_embeddings=1), "'tie_word_embeddings' must be true or false"),
        (lambda c: c.update(hidden_activation=7), "'hidden_activation' must be a string"),
        (lambda c: c.update(eos_token_id="1"), "'eos_token_id' must be an integer >= 0"),
        (lambda c: c.update(eos_token_id=[1, -6]), "'eos_token_id[1]' must be an integer >= 0"),
        (lambda c: c["intermediate_size"].__setitem__(2, 5.5), "'intermediate_size[2]' must be an integer"),
        (lambda c: c["intermediate_size"].__setitem__(0, 0), "'intermediate_size[0]' must be an integer >= 1"),
        (lambda c: c.update(intermediate_size="512"), "'intermediate_size' must be an integer"),
        (lambda c: c.update(intermediate_size=[512] * 3), "'intermediate_size' has 3 entries"),
        (lambda c: c["layer_types"].__setitem__(0, 3), "'layer_types[0]' must be a string"),
        (lambda c: c.update(layer_types="sliding_attention"), "'layer_types' must be a list"),
        (lambda c: c["activation_sparsity_pattern"].__setitem__(1, None), "'activation_sparsity_pattern[1]'"),
        (lambda c: c["activation_sparsity_pattern"].__setitem__(1, float("nan")), "'activation_sparsity_pattern[1]'"),
        (lambda c: c.update(rope_parameters="x"), "'rope_parameters' must be an object"),
        (
            lambda c: c.update(rope_parameters={"full_attention": {"rope_theta": "1e6"}}),
            "'rope_parameters.full_attention.rope_theta' must be a finite number > 0",
        ),
    ],
)
def test_config_field_errors_name_the_field(ckpt, capsys, edit, field):
    _edit_config(ckpt, edit)
    with pytest.raises(ConfigError, match="config.json") as info:
        gemma3n.load(ckpt)
    assert field in str(info.value)
    _refused(capsys, ["info", "--model", str(ckpt)], field)


def test_multimodal_config_fields(ckpt, capsys):
    text = json.loads((ckpt / "config.json").read_text())
    for extra, field in (
        ({"audio_soft_tokens_per_image": 0}, "'audio_soft_tokens_per_image' must be an integer >= 1"),
        ({"image_token_id": "x"}, "'image_token_id' must be an integer >= 0"),
        ({"vision_config": [1, 2]}, "'vision_config' must be an object"),
        ({"text_config": "none"}, "'text_config' is missing or not an object"),
    ):
        top = {"model_type": "gemma3n", "text_config": text, **extra}
        (ckpt / "config.json").write_text(json.dumps(top))
        _refused(capsys, ["info", "--model", str(ckpt)], field)


# --- memory before allocation -----------------------------------------------------------------
def test_huge_layer_count_is_refused_at_once_with_bounded_memory():
    """10**12 layers with scalar per-layer fields: refused while parsing, before a single
    per-layer list exists (peak traced memory below what even 100 built layers would take)."""
    base = _text_config()
    for n in (10**6, 10**9, 10**12):
        c = dict(base)
        _scalar_layers(c, n)
        tracemalloc.start()
        try:
            with pytest.raises(ConfigError, match=f"this config \\({n:,} layers\\) needs at least"):
                TextConfig.from_dict(c)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 100 * cfgmod.LAYER_BUILD_BYTES, peak


def test_memory_check_compares_the_lower_bound_with_the_machine(monkeypatch):
    base = _text_config()
    n = base["num_hidden_layers"]
    fields = {k: v for k, v in base.items() if k in cfgmod._SCALAR_RULES}
    need = cfgmod._min_load_bytes(TextConfig, fields, n, base["intermediate_size"])
    assert need >= n * cfgmod.LAYER_BUILD_BYTES + base["vocab_size"] * base["hidden_size"] * cfgmod.MIN_BYTES_PER_WEIGHT
    monkeypatch.setattr(cfgmod, "machine_memory", lambda: (need - 1, "available"))
    with pytest.raises(ConfigError, match=f"this config \\({n} layers\\) needs at least .* GiB available"):
        TextConfig.from_dict(base)
    monkeypatch.setattr(cfgmod, "machine_memory", lambda: (need, "installed"))
    TextConfig.from_dict(base)  # exactly what the machine has: accepted
    monkeypatch.setattr(cfgmod, "machine_memory", lambda: None)  # unknown (no /proc, no sysconf): no check
    cfgmod.check_memory(10**30, n)


def test_machine_memory_is_read_without_psutil():
    have = cfgmod.machine_memory()
    if have is None:
        pytest.skip("no /proc/meminfo and no sysconf here")
    size, what = have
    assert what in ("available", "installed") and size > 0
    if hasattr(os, "sysconf"):
        assert size <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _wait_rusage(args: list[str]) -> tuple[int, float, int, str]:
    """(rc, seconds, peak RSS in KiB, stderr) of one CLI run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gemma3n.cli", *args], cwd=ROOT, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss, err


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="needs os.wait4 for the child's peak RSS")
def test_huge_config_refused_by_the_cli_as_fast_and_small_as_a_normal_info(ckpt):
    """`info` on a normal checkpoint is the yardstick (same imports): the refusal of a 10**9-layer
    config costs no more time or memory than that, where it used to grow until killed."""
    rc, t_ok, rss_ok, _ = _wait_rusage(["info", "--model", str(ckpt)])
    assert rc == 0
    _edit_config(ckpt, lambda c: _scalar_layers(c, 10**9))
    rc, t_bad, rss_bad, err = _wait_rusage(["info", "--model", str(ckpt)])
    assert rc == 2 and err.count("\n") == 1 and "needs at least" in err, err
    assert rss_bad <= rss_ok * 1.1, (rss_bad, rss_ok)
    assert t_bad <= t_ok * 2 + 1, (t_bad, t_ok)


# --- sampling parameters ------------------------------------------------------------------------
BAD_SAMPLING = [
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature="hot"), "temperature must be"),
    (dict(top_p=math.nan), r"top_p must be a number in (0, 1]"),
    (dict(top_p=1.5), r"top_p must be a number in (0, 1]"),
    (dict(top_p=0.0), r"top_p must be a number in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(top_k=True), "top_k must be an integer >= 0"),
    (dict(min_p=math.nan), "min_p must be a number in [0, 1)"),
    (dict(min_p=1.0), "min_p must be a number in [0, 1)"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number > 0"),
    (dict(seed=2**64), "seed must be an integer in [-2**63, 2**64)"),
    (dict(seed="42"), "seed must be an integer"),
    (dict(seed=1.0), "seed must be an integer"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=2.0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=None), "max_tokens must be an integer >= 1"),
    (dict(stop=[7]), "stop strings must be str"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_SAMPLING)
def test_bad_sampling_parameters_in_the_api(model, kwargs, message):
    with pytest.raises(InputError) as info:
        model.generate("In the beginning", **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temp", "nan"], "temperature must be a finite number >= 0"),
        (["--temp=-inf"], "temperature must be a finite number >= 0"),
        (["--top-p", "inf"], "top_p must be a number in (0, 1]"),
        (["--top-k=-3"], "top_k must be an integer >= 0"),
        (["--min-p", "nan"], "min_p must be a number in [0, 1)"),
        (["--repetition-penalty=-1"], "repetition_penalty must be a finite number > 0"),
        (["--seed", str(2**64)], "seed must be an integer"),
        (["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    ],
)
def test_bad_sampling_flags_on_the_cli(capsys, monkeypatch, flags, message):
    loads = []
    monkeypatch.setattr("gemma3n.model.load", lambda *a, **k: loads.append(a))
    _refused(capsys, ["generate", "--prompt", "hi", *flags], message)
    assert loads == []  # refused before the model loads


def test_bad_generation_config_names_the_file(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": "warm"}))
    m = gemma3n.load(ckpt)
    with pytest.raises(ConfigError, match=r"generation_config.json: temperature must be a finite number"):
        m.generate("In the beginning", max_tokens=2)
    assert m.generate("In the beginning", max_tokens=2, temperature=0).token_ids  # the caller's value wins


# --- Unicode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        (dict(prompt="In the \ud800 beginning"), "the prompt is not valid Unicode: a lone surrogate U+D800"),
        (dict(prompt="abc\udcff"), "the byte 0xff that is not UTF-8"),
        (dict(messages=[{"role": "user", "content": "hi \udc80"}]), "the prompt is not valid Unicode"),
        (
            dict(messages=[{"role": "system", "content": "\udfff"}, {"role": "user", "content": "hi"}]),
            "U+DFFF",
        ),
        (dict(prompt="hi", stop=["ok", "\ud83d"]), "stop string 2 is not valid Unicode"),
    ],
)
def test_text_that_is_not_unicode_in_the_api(model, kwargs, where):
    with pytest.raises(InputError) as info:
        model.generate(max_tokens=2, **kwargs)
    assert where in str(info.value)


def test_text_that_is_not_unicode_on_the_cli(capsys, monkeypatch):
    monkeypatch.setattr("gemma3n.model.load", lambda *a, **k: pytest.fail("loaded the model"))
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    _refused(capsys, ["generate", "--prompt", "caf\udce9"], "--prompt is not valid Unicode", "0xe9")
    _refused(capsys, ["generate", "--prompt", "hi", "--system-prompt", "\udcff"], "--system-prompt")
    _refused(capsys, ["generate", "--prompt", "hi", "--stop", "\udc80"], "--stop")
    _refused(capsys, ["chat", "--system-prompt", "\udcfe"], "--system-prompt")


@pytest.mark.skipif(os.name != "posix", reason="argv bytes are a POSIX notion")
def test_real_argv_and_stdin_bytes(tmp_path):
    """The real process: argv and stdin in Latin-1, not UTF-8; a UTF-8 BOM on stdin is fine."""
    _one_line(_cli(b"generate", b"--prompt", b"caf\xe9", b"--max-tokens", b"2"), "--prompt", "0xe9")
    _one_line(_cli("generate", "--prompt", "-", stdin=b"caf\xe9 au lait"), "stdin is not UTF-8", "0xe9", "offset 3")
    ok = _cli("generate", "--prompt", "-", "--max-tokens", "2", "--temp", "0", stdin=b"\xef\xbb\xbfIn the beginning")
    assert ok.returncode == 0, ok.stderr


def test_chat_refuses_a_bad_line_and_goes_on(capsys, monkeypatch):
    import io

    lines = iter(["caf\udce9", "In the beginning", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--max-tokens", "2", "--temp", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gemma3n: error: the line is not valid Unicode: a lone surrogate U+DCE9 (the byte 0xe9 "
        "that is not UTF-8) at character 3"
    ]


# --- non-finite weights -> non-finite logits -------------------------------------------------------
@pytest.fixture
def nan_ckpt(ckpt) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    name = "model.norm.weight"  # the final norm: every logit depends on it
    state[name] = torch.full_like(state[name], math.nan)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_weights_are_a_clear_error(ckpt, capsys, value, temperature):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    table = "model.embed_tokens.weight"  # every row: the prompt's first token picks one
    state[table] = torch.full_like(state[table], value)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    m = gemma3n.load(ckpt)
    with pytest.raises(CheckpointError, match="non-finite logits"):
        m.generate("In the beginning", max_tokens=3, temperature=temperature)
    _refused(
        capsys,
        ["generate", "--model", str(ckpt), "--prompt", "hi", "--temp", str(temperature), "--max-tokens", "3"],
        "non-finite logits",
        "NaN/inf",
    )


def test_nan_in_a_norm_is_caught_too(nan_ckpt, capsys):
    out = _refused(capsys, ["generate", "--model", str(nan_ckpt), "--prompt", "hi", "--temp", "0"], "non-finite")
    assert "generated token 1" in out


def test_logits_of_non_finite_weights_are_a_clear_error(nan_ckpt):
    """Model.logits (what an evaluation harness scores with) says so too, instead of NaNs."""
    m = gemma3n.load(nan_ckpt)
    with pytest.raises(CheckpointError, match="non-finite logits .* for the given input ids"):
        m.logits(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("prompt", [b"hello", bytearray(b"hi"), [1.5, 2.0], [True, False], 3])
def test_prompt_that_is_neither_text_nor_ids_is_refused(prompt):
    """bytes iterate as small ints: they must not silently become token ids."""
    m = gemma3n.load()
    with pytest.raises(InputError, match="a prompt must be text"):
        m.generate(prompt=prompt, max_tokens=1, temperature=0)
