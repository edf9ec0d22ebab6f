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
    # a reply that begins with a word: one that begins with a newline (as the embedded model's
    # answers to questions do) is trimmed by the chat template, so only the prompt could be reused
    history = [{"role": "user", "content": "Tell me of Moses and Aaron"}]
    reply = model.generate(messages=history, prompt_cache=pc, stop=["."], **GREEDY)  # stops early
    history += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And Aaron?"}]
    again = model.generate(messages=history, prompt_cache=pc, **GREEDY)
    assert again.stats["cached_prompt_tokens"] > reply.prompt_tokens
    assert again.text == model.generate(messages=history, **GREEDY).text


def test_slots_keep_interleaved_conversations_and_a_shared_prefix_is_copied(model):
    """Two conversations that share a system prompt, turns interleaved, as a server sees them:
    with two slots each follow-up continues from its own cache; a branch gets a copy of the
    shared part and leaves the other conversation's cache whole. Outputs equal fresh prefills."""
    pc = gemma3n.PromptCache(slots=2)
    system = _prompt(12, 9)
    a1, b1 = system + _prompt(10, 10), system + _prompt(7, 11)
    ra1 = model.generate(a1, prompt_cache=pc, **GREEDY)
    rb1 = model.generate(b1, prompt_cache=pc, **GREEDY)
    assert rb1.stats["cached_prompt_tokens"] == len(system)  # a copy of A's system-prompt part
    assert rb1.token_ids == model.generate(b1, **GREEDY).token_ids
    assert len(pc) == 2
    a2 = a1 + ra1.token_ids + _prompt(5, 12)
    b2 = b1 + rb1.token_ids + _prompt(6, 13)
    ra2 = model.generate(a2, prompt_cache=pc, **GREEDY)
    rb2 = model.generate(b2, prompt_cache=pc, **GREEDY)
    assert ra2.stats["cached_prompt_tokens"] == len(a1) + len(ra1.token_ids) - 1  # A's cache was whole
    assert rb2.stats["cached_prompt_tokens"] == len(b1) + len(rb1.token_ids) - 1
    assert ra2.token_ids == model.generate(a2, **GREEDY).token_ids
    assert rb2.token_ids == model.generate(b2, **GREEDY).token_ids
    # a third conversation evicts the least recently used (A); B still continues
    model.generate(_prompt(9, 14), prompt_cache=pc, **GREEDY)
    assert len(pc) == 2
    b3 = b2 + rb2.token_ids + _prompt(3, 15)
    assert model.generate(b3, prompt_cache=pc, **GREEDY).stats["cached_prompt_tokens"] == len(b2) + 9
    a3 = a2 + ra2.token_ids + _prompt(3, 16)
    ra3 = model.generate(a3, prompt_cache=pc, **GREEDY)
    assert ra3.stats["cached_prompt_tokens"] == len(system)  # A is gone: only B's system part is there
    assert ra3.token_ids == model.generate(a3, **GREEDY).token_ids
    # a branch adds its copy as the most recent; the least recently used goes
    d1 = system + _prompt(4, 23)
    rd1 = model.generate(d1, prompt_cache=pc, **GREEDY)
    assert rd1.stats["cached_prompt_tokens"] == len(system) and len(pc) == 2
    d2 = d1 + rd1.token_ids + _prompt(2, 24)
    assert model.generate(d2, prompt_cache=pc, **GREEDY).stats["cached_prompt_tokens"] == len(d1) + 9


def test_one_slot_thrashes_between_conversations(model):
    """The default (one conversation): the other conversation's turn takes the cache over."""
    pc = gemma3n.PromptCache()
    a1, b1 = _prompt(20, 17), _prompt(20, 18)
    ra1 = model.generate(a1, prompt_cache=pc, **GREEDY)
    model.generate(b1, prompt_cache=pc, **GREEDY)
    a2 = a1 + ra1.token_ids + _prompt(4, 19)
    assert model.generate(a2, prompt_cache=pc, **GREEDY).stats["cached_prompt_tokens"] == 0
    assert len(pc) == 1
    with pytest.raises(ValueError, match="at least one slot"):
        gemma3n.PromptCache(slots=0)


def test_release_drops_only_the_conversations_a_prompt_continues(model):
    """A multimodal turn can't reuse ids-keyed caches: the one it continues is dropped, not others."""
    pc = gemma3n.PromptCache(slots=3)
    a1, b1 = _prompt(15, 20), _prompt(15, 21)
    ra1 = model.generate(a1, prompt_cache=pc, **GREEDY)
    model.generate(b1, prompt_cache=pc, **GREEDY)
    pc.release(a1 + ra1.token_ids + _prompt(3, 22))
    assert len(pc) == 1
    assert model.generate(b1 + [7], prompt_cache=pc, **GREEDY).stats["cached_prompt_tokens"] > 0


def test_a_byte_cap_drops_the_least_recently_used(model):
    sizes = []
    probe = gemma3n.PromptCache(slots=4)
    for seed in (30, 31, 32):
        model.generate(_prompt(20, seed), prompt_cache=probe, **GREEDY)
        sizes.append(probe.nbytes() - sum(sizes))
    assert len(probe) == 3 and min(sizes) > 0
    capped = gemma3n.PromptCache(slots=4, max_bytes=sizes[1] + sizes[2])  # room for the two newest
    for seed in (30, 31, 32):
        model.generate(_prompt(20, seed), prompt_cache=capped, **GREEDY)
    assert len(capped) == 2 and capped.nbytes() <= capped.max_bytes
    again = model.generate(_prompt(20, 30), prompt_cache=capped, **GREEDY)
    assert again.stats["cached_prompt_tokens"] == 0  # the oldest went
    none = gemma3n.PromptCache(max_bytes=0)
    model.generate(_prompt(20, 33), prompt_cache=none, **GREEDY)
    assert len(none) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        gemma3n.PromptCache(max_bytes=-1)
