"""The fused decode step (gemma3n/decode_step.py, kernels/step.cpp) against the Python forward:
the same logits and the same cache for every decoded token, on every kind of weight, plan,
sliding window and shared K/V it handles; a clean fallback where it does not apply."""

from __future__ import annotations

import pytest
import torch

import gemma3n
from gemma3n import kernels
from gemma3n.cache import Cache
from gemma3n.decode_step import fused_step
from gemma3n.generate import decode_one, prefill
from tests.conftest import make_hf_text_model, save_text_checkpoint

pytestmark = pytest.mark.skipif(kernels.why_unavailable() is not None, reason="native kernels unavailable")


def _decode_both(model, prompt: list[int], steps: int, size=None, feed: list[int] | None = None):
    """Logits of `steps` tokens decoded after `prompt`, fused and Python, fed the same tokens
    (the Python path's greedy choices, or `feed`), and the two caches at the end."""
    plan = model.plan(size)
    assert fused_step(model.decoder, plan) is not None, "the fused step should apply here"
    runs = {}
    for fused in (False, True):
        cache = Cache(plan.config, plan.spec)
        logits = prefill(model.decoder, torch.tensor([prompt]), cache, plan)
        out, tokens = [], []
        for i in range(steps):
            token = feed[i] if feed is not None else int(logits.argmax()) if not fused else runs[False][2][i]
            tokens.append(token)
            logits = decode_one(model.decoder, token, cache, plan, fused=fused)
            out.append(logits)
        runs[fused] = (torch.stack(out), cache, tokens)
    return runs[False], runs[True]


# The two paths run the same products and ATen operations but normalize with their own loops,
# so they differ in the last bits; a random model amplifies that ~10-100x over its layers.
FP32 = 1e-4


def _bf16_tol() -> float:
    """Where the native bf16 body rounds x to bf16 (BF16 dot products), a last-bit difference can
    flip a rounding: bf16-close, as test_core_parity allows for decode."""
    return FP32 if kernels.get().activation_form("bf16", 0) == "fp32" else 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _same_cache(a: Cache, b: Cache, tol: float) -> None:
    assert a.offset == b.offset and a.layers.keys() == b.layers.keys()
    for j in a.layers:
        x, y = a.layers[j], b.layers[j]
        assert (x.start, x.length) == (y.start, y.length), j
        assert torch.equal(x.pos[x.start : x.length], y.pos[y.start : y.length])
        for t, u in ((x.k, y.k), (x.v, y.v)):
            assert _rel(t[:, :, x.start : x.length], u[:, :, y.start : y.length]) <= tol, j


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The parity config (every feature: AltUp, LAuReL, PLE, sparsity, KV sharing with sliding
    and global sources, window 8), fp32."""
    return gemma3n.load(save_text_checkpoint(make_hf_text_model(), tmp_path_factory.mktemp("fp32")))


def test_fp32_matches_python_forward_past_the_window(small):
    """40 decoded tokens after 12: far past the sliding window (8) and its rollback margin, so
    the sliding caches move their entries; every token's logits and the final caches agree."""
    (ref, ref_cache, _), (got, got_cache, _) = _decode_both(small, list(range(3, 15)), 40 + 64)
    assert _rel(got, ref) <= FP32
    _same_cache(got_cache, ref_cache, FP32)


def test_bf16_weights(tmp_path):
    """bf16-stored weights with fp32 activations: the same native products on both paths."""
    model = gemma3n.load(save_text_checkpoint(make_hf_text_model(seed=1).to(torch.bfloat16), tmp_path / "bf16"))
    (ref, _, _), (got, _, _) = _decode_both(model, list(range(5, 25)), 12)
    assert _rel(got, ref) <= _bf16_tol()


# Quantized weights: the two paths differ ~100x more than with fp32 ones on the embedded model
# (measured on an AVX2 CPU, this test's 10 tokens: fp32 6.7e-7, int8 8.4e-5, int4:32 1.3e-4), by
# design, not from different arithmetic: both run every int8/int4 product through the same native
# kernel on the same weight view, which rounds each activation row to int16 (x = s·xq, s =
# max|x|/32767, decode.cpp). That rounding is a step function of x: the fp32 last-bit differences
# the paths do have (their norms, the fp32 AltUp products) mostly vanish in it (the first decoded
# token's K/V agree within 2e-7 in layers 0-3, layers 0-1 bit for bit), but now and then move an
# element across a rounding boundary, a whole step s in that product (layer 4's K/V: 3e-6-8e-6),
# which the later layers carry on. The Python forward against itself with one-ulp noise on its
# norms differs as much (int8 6e-5-9e-5, int4:32 7e-5-1.2e-4), and with the portable kernel body
# (fp32 activations) on both paths the fused step differs by 9e-7 / 8e-7 with int8 / int4:32
# weights, as with fp32 ones. Hence the bound's room above both, and the greedy tokens must agree
# as well.
QUANT = 3e-4


@pytest.mark.parametrize("scheme", ["int8", "int4:32"])
def test_quantized_weights(tiny_model_dir, scheme):
    model = gemma3n.load(tiny_model_dir, quantize=scheme)
    prompt = model.tokenizer.encode("And God said, Let there be light")
    (ref, _, _), (got, _, _) = _decode_both(model, prompt, 10)
    assert _rel(got, ref) <= QUANT
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("size", ["E2B-like", "skip-5-9-half-ffn-10-14"])
def test_matformer_views_of_the_embedded_model(tiny_model_dir, size):
    """Declared sizes that skip layers and narrow FFNs: each plan gets its own step."""
    model = gemma3n.load(tiny_model_dir)
    assert size in model.sizes()
    prompt = model.tokenizer.encode("In the beginning God created")
    (ref, _, tokens), (got, _, _) = _decode_both(model, prompt, 16, size=size)
    assert _rel(got, ref) <= FP32
    assert [int(t) for t in got.argmax(-1)] == [int(t) for t in ref.argmax(-1)]


def test_generate_text_is_unchanged(tiny_model_dir, monkeypatch):
    """Greedy generation through the public API gives the same tokens with and without it."""
    model = gemma3n.load(tiny_model_dir)
    fused = model.generate(prompt="Who made the heaven and the earth?", max_tokens=24, temperature=0)
    import gemma3n.generate as gen

    original = gen.decode_one
    monkeypatch.setattr(gen, "decode_one", lambda *a, **k: original(*a, **{**k, "fused": False}))
    python = model.generate(prompt="Who made the heaven and the earth?", max_tokens=24, temperature=0)
    assert fused.token_ids == python.token_ids


def test_not_applicable_falls_back(tiny_model_dir, monkeypatch):
    """bf16 activations (a compute dtype the step does not run) and no native kernels: None,
    and decoding still works through the Python forward."""
    model = gemma3n.load(tiny_model_dir, compute_dtype="bfloat16")
    assert fused_step(model.decoder, model.plan()) is None
    assert model.generate(prompt="And", max_tokens=3, temperature=0).token_ids
    plain = gemma3n.load(tiny_model_dir)
    monkeypatch.setattr(kernels, "loaded", lambda: None)
    assert fused_step(plain.decoder, plain.plan("E2B-like")) is None


def test_several_tokens_in_one_call(small, monkeypatch):
    """A speculative check: k+1 consecutive tokens in one call equal the Python forward over the
    same tokens (all rows' logits), and the cache ends where one-token steps leave it."""
    from gemma3n.decode_step import decode_tokens
    from gemma3n.speculative import verify_logits

    plan = small.plan()
    prompt, more = list(range(3, 15)), [20, 21, 22, 23, 24]
    results = {}
    for fused in (False, True):
        cache = Cache(plan.config, plan.spec)
        prefill(small.decoder, torch.tensor([prompt]), cache, plan)
        if fused:
            logits = decode_tokens(fused_step(small.decoder, plan), small.decoder, plan, more, cache, None)
        else:
            with monkeypatch.context() as m:  # the Python forward over the rows
                m.setattr("gemma3n.speculative.fused_step", lambda *a: None)
                logits = verify_logits(small.decoder, cache, plan, more, None)
        results[fused] = (logits, cache)
    assert results[True][0].shape == (len(more), small.config.text.vocab_size)
    assert _rel(results[True][0], results[False][0]) <= FP32
    _same_cache(results[True][1], results[False][1], FP32)
