"""Speech input end to end: a small random Gemma 3n (text + audio + vision) saved by transformers,
prompted with audio through `gemma3n.load(...).generate(messages=...)`, against
`Gemma3nProcessor.apply_chat_template` + `Gemma3nForConditionalGeneration` on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gemma3n
from tests.conftest import TEXT_VOCAB, last_token_logits

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("PIL")


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(mm_checkpoint):
    """(HF model, HF processor, checkpoint dir): the shared text + audio + vision checkpoint."""
    return mm_checkpoint


def _messages(*clips: np.ndarray) -> list[dict]:
    parts = [{"type": "audio", "audio": c} for c in clips]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Transcribe"}]}]


@pytest.mark.parametrize("seconds", [[1.7], [1.0, 2.3]], ids=["one-clip", "two-clips-padded"])
def test_prompt_and_first_logits_match_transformers(checkpoint, seconds):
    hf, processor, path = checkpoint
    messages = _messages(*(_clip(s, i) for i, s in enumerate(seconds)))
    ref_in = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model = gemma3n.load(path)
    inputs, embeds = model.prepare(messages=messages)
    assert inputs.ids == ref_in["input_ids"][0].tolist()
    assert embeds is not None
    with torch.no_grad():
        ref = hf(**ref_in).logits[0, -1]
    ours = last_token_logits(model, inputs.ids, embeds)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_greedy_generation_matches_transformers(checkpoint):
    hf, processor, path = checkpoint
    messages = _messages(_clip(1.7, 0))
    ref_in = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = hf.generate(**ref_in, max_new_tokens=8, do_sample=False)
    ref = out[0, ref_in["input_ids"].shape[1] :].tolist()
    model = gemma3n.load(path)
    stops = model.stop_ids()
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    result = model.generate(messages=messages, temperature=0, max_tokens=8)
    assert result.token_ids == ref[:cut]
    assert len(result.token_ids) >= 4, "test is too weak: generation stopped early"
    assert not model.towers.has_vision or "model.embed_vision." not in model.towers.loaded()  # audio only


def test_decoding_a_media_range_id_uses_its_hard_embedding(checkpoint):
    from gemma3n.cache import Cache
    from gemma3n.generate import decode_one, prefill

    hf, _, path = checkpoint
    model = gemma3n.load(path)
    prompt, media_id = [2, 5, 40, 41, 42], TEXT_VOCAB + 128 + 60  # an audio-range id
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([[*prompt, media_id]])).logits[0, -1]
    plan = model.plan()
    cache = Cache(plan.config, plan.spec)
    prefill(model.decoder, torch.tensor([prompt]), cache, plan)
    ours = decode_one(model.decoder, media_id, cache, plan, model.embed_ids)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
