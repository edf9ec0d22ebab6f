"""KV caches. Only KV-owning layers keep one (text-decoder.md §5.1): shared layers borrow
their source's K/V inside the forward pass. Sliding layers keep a bounded window.

A cache belongs to one `LayerPlan` (full model or a MatFormer view): hidden states differ per
size, so a cache written under one size is never valid for another (matformer.md §4).

`PromptCache` keeps a conversation's cache between calls, so the next turn prefills only the
tokens that differ from what the cache already holds.
"""

from __future__ import annotations

import torch

from .config import TextConfig

# Entries a sliding cache keeps beyond its window, so that a follow-up prompt may rewrite up to
# this many of the last tokens (a chat template re-rendering the previous reply) and still reuse
# the cache. They cost a little memory and attention work; the mask keeps them out of the window.
ROLLBACK = 64


class LayerKV:
    """K/V [B, Hkv, S, d] and their absolute positions [S] for one layer.

    Full layers keep everything in a buffer that grows by doubling (no per-token realloc);
    sliding layers keep the last W-1 entries, enough for the next query's window, plus
    `ROLLBACK` more so that `truncate` can step back.
    """

    def __init__(self, window: int | None):
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.length = 0

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append this step's K/V; return everything the step's queries may attend to."""
        if self.window is not None:
            return self._update_sliding(k, v, pos)
        need = self.length + k.shape[2]
        if self.k is None or need > self.k.shape[2]:
            self._grow(k, v, pos, max(need, 2 * (self.k.shape[2] if self.k is not None else 0), 256))
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.pos[self.length : need] = pos
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need], self.pos[:need]

    def _grow(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, capacity: int) -> None:
        b, h, _, d = k.shape
        new_k = k.new_empty(b, h, capacity, d)
        new_v = v.new_empty(b, h, capacity, d)
        new_pos = pos.new_empty(capacity)
        if self.k is not None:
            new_k[:, :, : self.length] = self.k[:, :, : self.length]
            new_v[:, :, : self.length] = self.v[:, :, : self.length]
            new_pos[: self.length] = self.pos[: self.length]
        self.k, self.v, self.pos = new_k, new_v, new_pos

    def _update_sliding(self, k, v, pos):
        if self.k is not None:
            k = torch.cat((self.k, k), dim=2)
            v = torch.cat((self.v, v), dim=2)
            pos = torch.cat((self.pos, pos))
        keep = self.window - 1 + ROLLBACK
        self.k, self.v, self.pos = k[:, :, -keep:], v[:, :, -keep:], pos[-keep:]
        self.length = self.k.shape[2]
        return k, v, pos

    def truncate(self, n: int) -> bool:
        """Forget every entry at position >= n. False if what is left cannot serve a query at
        position n (a sliding cache that already dropped keys of that query's window)."""
        if self.pos is None or self.length == 0:
            return n == 0
        kept = int((self.pos[: self.length] < n).sum())
        if self.window is not None:
            oldest = int(self.pos[0]) if kept else n
            if oldest > max(0, n - self.window + 1):
                return False
            self.k, self.v, self.pos = self.k[:, :, :kept], self.v[:, :, :kept], self.pos[:kept]
        self.length = kept
        return True

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()


class Cache:
    """The caches of one plan: one `LayerKV` per KV-owning layer (plan indices)."""

    def __init__(self, config: TextConfig, plan_key: str = "full"):
        self.plan_key = plan_key
        self.layers: dict[int, LayerKV] = {}
        for j in range(config.num_hidden_layers):
            if config.kv_source(j) is None:
                sliding = config.layer_types[j] == "sliding_attention"
                self.layers[j] = LayerKV(config.sliding_window if sliding else None)
        self.offset = 0  # tokens seen so far = the next position

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        return self.layers[layer].update(k, v, pos)

    def truncate(self, n: int) -> bool:
        """Keep the first n tokens (positions 0..n-1); False (cache unusable) if a layer can't."""
        if n > self.offset or not all(c.truncate(n) for c in self.layers.values()):
            return False
        self.offset = n
        return True

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values())


class PromptCache:
    """The cache of one conversation, kept between calls (`Model.stream(..., prompt_cache=pc)`).

    Holds the tokens the cache was fed. The next prompt reuses the longest common prefix with
    them (at least one new token is always prefilled, for the logits) and prefills the rest;
    another size, a multimodal prompt (its soft tokens depend on the media, not the ids) or a
    divergence further back than a sliding window can rewind starts afresh. One conversation,
    one caller at a time.
    """

    def __init__(self) -> None:
        self.cache: Cache | None = None
        self.ids: list[int] = []

    def clear(self) -> None:
        self.cache, self.ids = None, []

    def take(self, config: TextConfig, plan_key: str, prompt_ids: list[int]) -> tuple[Cache, int]:
        """A cache to continue from and how many of `prompt_ids` it already holds."""
        cache, ids = self.cache, self.ids
        self.clear()  # until `keep` is called, a half-written cache must not be reused
        if cache is not None and cache.plan_key == plan_key:
            common = 0
            for a, b in zip(ids, prompt_ids[:-1]):
                if a != b:
                    break
                common += 1
            if common and cache.truncate(common):
                return cache, common
        return Cache(config, plan_key), 0

    def keep(self, cache: Cache, ids: list[int]) -> None:
        """Remember `cache` and the `cache.offset` tokens it was fed (`ids`)."""
        self.cache, self.ids = cache, list(ids[: cache.offset])
