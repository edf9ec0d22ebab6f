"""PromptCache: a conversation's next turn prefills only what its cache does not already hold,
and generates exactly what a fresh prefill of the whole prompt would."""

from __future__ import annotations

import pytest

import gemma3n
from gemma3n import cache as cache_module

GREEDY = {"temperature": 0.0, "max_tokens": 10}


@pytest.fixture(scope="module")
def model(hf_text):
    return gemma3n.load(hf_text[1])  # sliding window 8: the turns below run far past it


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 37 + 11 * i) % 500 + 20 for i in range(n)]


def test_next_turn_reuses_everything_it_fed_and_matches_a_fresh_prefill(model):
    pc = gemma3n.PromptCache()
    p1 = _prompt(30, 1)
    r1 = model.generate(p1, prompt_cache=pc, **GREEDY)
    assert r1.stats["cached_prompt_tokens"] == 0
    p2 = p1 + r1.token_ids + _prompt(12, 2)
    r2 = model.generate(p2, prompt_cache=pc, **GREEDY)
    # the cache holds the prompt and every generated token but the last (never fed back)
    assert r2.stats["cached_prompt_tokens"] == len(p1) + len(r1.token_ids) - 1
    assert r2.token_ids == model.generate(p2, **GREEDY).token_ids
    p3 = p2 + r2.token_ids + _prompt(5, 3)
    assert model.generate(p3, prompt_cache=pc, **GREEDY).token_ids == model.generate(p3, **GREEDY).token_ids


def test_a_diverging_tail_is_rewound(model):
    pc = gemma3n.PromptCache()
    p1 = _prompt(30, 4)
    r1 = model.generate(p1, prompt_cache=pc, **GREEDY)
    p2 = p1 + r1.token_ids[:3] + _prompt(9, 5)  # the template re-rendered the reply differently
    r2 = model.generate(p2, prompt_cache=pc, **GREEDY)
    fed = p1 + r1.token_ids[:-1]
    common = next(i for i, (a, b) in enumerate(zip(fed, p2)) if a != b)
    assert common >= len(p1) + 3 and r2.stats["cached_prompt_tokens"] == common
    assert r2.token_ids == model.generate(p2, **GREEDY).token_ids
    # the same prompt again: all but its last token come from the cache
    assert model.generate(p2, prompt_cache=pc, **GREEDY).stats["cached_prompt_tokens"] == len(p2) - 1


@pytest.mark.filterwarnings("ignore:.*never a trained granularity")
def test_no_reuse_where_the_window_cannot_rewind_or_the_size_differs(model, monkeypatch):
    monkeypatch.setattr(cache_module, "ROLLBACK", 0)  # sliding caches keep exactly their window
    pc = gemma3n.PromptCache()
    p1 = _prompt(30, 6)
    r1 = model.generate(p1, prompt_cache=pc, **GREEDY)
    p2 = p1[:20] + _prompt(15, 7)  # diverges 19 tokens back: beyond a window of 8
    r2 = model.generate(p2, prompt_cache=pc, **GREEDY)
    assert r2.stats["cached_prompt_tokens"] == 0
    assert r2.token_ids == model.generate(p2, **GREEDY).token_ids
    half = {"ffn": [w // 2 for w in model.config.text.intermediate_size]}
    p3 = p2 + r2.token_ids + _prompt(4, 8)
    r3 = model.generate(p3, prompt_cache=pc, size=half, **GREEDY)  # another size: other hidden states
    assert r3.stats["cached_prompt_tokens"] == 0
    assert r3.token_ids == model.generate(p3, size=half, **GREEDY).token_ids
    assert len(r1.token_ids) == GREEDY["max_tokens"]


def test_chat_turns_on_the_default_model(tiny_model_dir):
    model = gemma3n.load()
    pc = gemma3n.PromptCache()
    history = [{"role": "user", "content": "Who was Moses?"}]
    reply = model.generate(messages=history, prompt_cache=pc, stop=["."], **GREEDY)  # stops early
    history += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And Aaron?"}]
    again = model.generate(messages=history, prompt_cache=pc, **GREEDY)
    assert again.stats["cached_prompt_tokens"] > reply.prompt_tokens
    assert again.text == model.generate(messages=history, **GREEDY).text
