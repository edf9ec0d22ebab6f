"""Drafters for speculative decoding (speculative.py checks what they propose).

- `ModelDrafter`: a smaller model, usually a MatFormer size of the loaded weights (a view that
  copies nothing), decoding greedily or sampling with the request's parameters, with its own KV
  cache (caches are per size), kept between calls for a conversation's prompt cache;
- `NgramDrafter` (prompt lookup): the continuation of the latest earlier occurrence of the last
  few tokens in the prompt and the reply so far.
"""

from __future__ import annotations

import time
import weakref
from typing import Protocol

import torch

from .cache import Cache, PromptCache
from .generate import Dist, EmbedFn, Prompt, SamplingParams, decode_one, draw, prefill, sampling_distribution
from .text import LayerPlan, TextDecoder


class Drafter(Protocol):
    setup_s: float  # seconds of one-off work so far (prefills), not charged to drafted tokens

    def propose(self, history: list[int], k: int) -> tuple[list[int], list[Dist]]:
        """Up to k tokens to follow `history` and the distribution each was drawn from."""

    def rollback(self, kept: int) -> None:
        """Only history[:kept] stands: forget any state past it."""

    def finish(self, history: list[int]) -> None:
        """Generation ended with `history`: keep what the next call can reuse."""


class NgramDrafter:
    """Prompt lookup: the last n tokens (n = max_n down to min_n) looked up among the earlier
    tokens of the prompt and the reply; the tokens that followed the latest match are the draft.
    Deterministic (point masses). An index of every n-gram's latest continuation grows with the
    history, so a lookup costs O(1) however long the prompt."""

    setup_s = 0.0  # nothing to prepare (see ModelDrafter.setup_s)

    def __init__(self, max_n: int = 4, min_n: int = 2) -> None:
        self.sizes = range(max_n, min_n - 1, -1)
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 1  # continuation positions indexed so far (position 0 continues nothing)

    def propose(self, history: list[int], k: int) -> tuple[list[int], list[Dist]]:
        for e in range(self.indexed, len(history)):  # n-grams ending just before position e
            for n in self.sizes:
                if e >= n:
                    self.index[n][tuple(history[e - n : e])] = e
        self.indexed = max(self.indexed, len(history))
        for n in self.sizes:
            at = self.index[n].get(tuple(history[-n:])) if len(history) >= n else None
            if at is not None:
                tokens = history[at : at + k]
                return tokens, list(tokens)
        return [], []

    def rollback(self, kept: int) -> None:
        """Nothing to undo: the index only ever holds accepted tokens."""

    def finish(self, history: list[int]) -> None:
        pass


# Drafts' caches kept between calls: one PromptCache per (conversation's PromptCache, draft
# decoder), beside the target's, so that draft and target caches never evict each other.
_draft_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def draft_prompt_cache(prompt_cache: PromptCache, decoder: TextDecoder) -> PromptCache:
    per_decoder = _draft_caches.setdefault(prompt_cache, weakref.WeakKeyDictionary())
    if decoder not in per_decoder:
        per_decoder[decoder] = PromptCache(prompt_cache.slots, prompt_cache.max_bytes)
    return per_decoder[decoder]


class ModelDrafter:
    """Drafts by decoding with a model: a MatFormer plan of the target's weights or another
    loaded decoder, with its own cache. It catches up lazily: the prompt is prefilled at the
    first proposal (never, if k stays 0), and tokens it has not seen are fed before each one."""

    def __init__(
        self,
        decoder: TextDecoder,
        plan: LayerPlan,
        prompt: Prompt,
        params: SamplingParams,
        gen: torch.Generator,
        embed: EmbedFn | None,
    ) -> None:
        self.decoder, self.plan, self.prompt, self.params, self.gen, self.embed = (
            decoder,
            plan,
            prompt,
            params,
            gen,
            embed,
        )
        self.cache: Cache | None = None
        self.logits: torch.Tensor | None = None  # after the last token fed to the cache
        # seconds spent prefilling (the prompt, tokens missed during plain steps): one-off costs
        # that must not count as the price of each drafted token when choosing k
        self.setup_s = 0.0
        self.prompt_cache = draft_prompt_cache(prompt.prompt_cache, decoder) if prompt.reuses_cache else None

    def _start(self) -> None:
        """The prompt through the draft (what the prompt cache does not already hold)."""
        ids, done = self.prompt.ids, 0
        if self.prompt_cache is not None:
            self.cache, done = self.prompt_cache.take(self.plan.config, self.plan.spec, ids)
        else:
            self.cache = Cache(self.plan.config, self.plan.spec)
        embeds = self.prompt.inputs_embeds
        self.logits = prefill(
            self.decoder,
            torch.tensor([ids[done:]], device=self.decoder.device),
            self.cache,
            self.plan,
            inputs_embeds=None if embeds is None else embeds[:, done:],
            chunk_size=self.prompt.chunk,
        )

    def _catch_up(self, history: list[int]) -> None:
        start = time.perf_counter()
        if self.cache is None:
            self._start()
        new = history[self.cache.offset :]
        if len(new) > 1:  # after plain decode steps (k = 0) the draft lags by several tokens
            ids = torch.tensor([new], device=self.decoder.device)
            embeds = self.embed(ids) if self.embed else None
            self.logits = prefill(self.decoder, ids, self.cache, self.plan, inputs_embeds=embeds)
        self.setup_s += time.perf_counter() - start
        if len(new) == 1:  # the target's own token of the last round: part of every round's price
            self.logits = decode_one(self.decoder, new[0], self.cache, self.plan, self.embed)

    def propose(self, history: list[int], k: int) -> tuple[list[int], list[Dist]]:
        self._catch_up(history)
        context, tokens, dists = list(history), [], []
        for i in range(k):
            q = sampling_distribution(self.logits, context, self.params)
            token = draw(q, self.gen)
            tokens.append(token)
            dists.append(q)
            context.append(token)
            if i + 1 < k:  # the last drafted token is fed next round, if it is kept
                self.logits = decode_one(self.decoder, token, self.cache, self.plan, self.embed)
        return tokens, dists

    def rollback(self, kept: int) -> None:
        """Only the first `kept` tokens of the history are right: forget any drafted after them."""
        if self.cache is not None and self.cache.offset > kept:
            truncate(self.cache, kept)
            self.logits = None  # the next proposal feeds the target's token first

    def finish(self, history: list[int]) -> None:
        if self.prompt_cache is not None and self.cache is not None:
            self.prompt_cache.keep(self.cache, history)


def truncate(cache: Cache, n: int) -> None:
    # rollbacks are at most MAX_K tokens, well inside the ROLLBACK margin sliding layers keep
    if not cache.truncate(n):
        raise RuntimeError(f"cannot roll the KV cache back to {n} tokens")
