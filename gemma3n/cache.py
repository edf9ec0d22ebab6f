"""KV caches. Only KV-owning layers keep one (docs/text-decoder.md#kv-sharing): shared layers borrow
their source's K/V inside the forward pass. Sliding layers keep a bounded window.

A cache belongs to one `LayerPlan` (full model or a MatFormer view): hidden states differ per
size, so a cache written under one size is never valid for another (docs/matformer.md#elastic-inference).

`PromptCache` keeps conversations' caches between calls, so the next turn prefills only the
tokens that differ from what a cache already holds.
"""

from __future__ import annotations

import copy

import torch

from .config import TextConfig
from .matformer import SliceSpec

# Entries a sliding cache keeps beyond its window, so that a follow-up prompt may rewrite up to
# this many of the last tokens (a chat template re-rendering the previous reply) and still reuse
# the cache. They cost a little memory and attention work; the mask keeps them out of the window.
ROLLBACK = 64


class LayerKV:
    """K/V [B, Hkv, capacity, d] and their absolute positions [capacity] for one layer; entries
    `start` .. `length` are live.

    Full layers keep everything, in buffers that grow by doubling (no per-token realloc); sliding
    layers keep the last W-1 entries, enough for the next query's window, plus `ROLLBACK` more so
    that `truncate` can step back, and move them to the front when their buffer fills. The
    fused decode step (kernels/step.cpp) writes into the buffers between `reserve` and `advance`.
    """

    def __init__(self, window: int | None):
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.start = 0
        self.length = 0

    @property
    def keep(self) -> int | None:
        """Entries a sliding layer keeps after a step (None: all)."""
        return None if self.window is None else self.window - 1 + ROLLBACK

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append this step's K/V; return everything the step's queries may attend to."""
        t = k.shape[2]
        self.reserve(t, like=(k, v, pos))
        end = self.length + t
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.pos[self.length : end] = pos
        out = self.k[:, :, self.start : end], self.v[:, :, self.start : end], self.pos[self.start : end]
        self.advance(t)
        return out

    def reserve(self, t: int, like: tuple[torch.Tensor, ...] | None = None) -> bool:
        """Room for `t` more entries after `length` (False: no buffers yet and nothing to shape
        them from). Views returned earlier stay valid: a move copies into new buffers."""
        if self.length + t <= self.capacity:
            return True
        if self.k is None and like is None:
            return False
        k, v, pos = (self.k, self.v, self.pos) if self.k is not None else like
        live = self.length - self.start
        if self.window is not None:  # drop what the window no longer needs, room for as much again
            capacity = max(2 * self.keep, live + t)
        else:
            capacity = max(live + t, 2 * self.capacity, 256)
        b, h, _, d = k.shape
        new_k, new_v, new_pos = k.new_empty(b, h, capacity, d), v.new_empty(b, h, capacity, d), pos.new_empty(capacity)
        if self.k is not None and live:
            new_k[:, :, :live] = self.k[:, :, self.start : self.length]
            new_v[:, :, :live] = self.v[:, :, self.start : self.length]
            new_pos[:live] = self.pos[self.start : self.length]
        self.k, self.v, self.pos = new_k, new_v, new_pos
        self.start, self.length = 0, live
        return True

    def advance(self, t: int) -> None:
        """`t` entries were written after `length`: make them live (a sliding layer then keeps
        only its last `keep`)."""
        self.length += t
        if self.window is not None:
            self.start = max(self.start, self.length - self.keep)

    def truncate(self, n: int) -> bool:
        """Forget every entry at position >= n. False if what is left cannot serve a query at
        position n (a sliding cache that already dropped keys of that query's window)."""
        if self.pos is None or self.length == self.start:
            return n == 0
        kept = int((self.pos[self.start : self.length] < n).sum())
        if self.window is not None:
            oldest = int(self.pos[self.start]) if kept else n
            if oldest > max(0, n - self.window + 1):
                return False
        self.length = self.start + kept
        return True

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return 2 * self.k[:, :, self.start : self.length].numel() * self.k.element_size()

    def copy(self, before: int) -> LayerKV:
        """An independent copy of the entries at positions < `before` (not of the spare capacity)."""
        out = LayerKV(self.window)
        if self.k is not None:
            n = int((self.pos[self.start : self.length] < before).sum())  # positions ascend: a prefix
            end = self.start + n
            out.k, out.v = self.k[:, :, self.start : end].clone(), self.v[:, :, self.start : end].clone()
            out.pos = self.pos[self.start : end].clone()
            out.length = n
        return out


class Cache:
    """The caches of one plan: one `LayerKV` per KV-owning layer (plan indices)."""

    def __init__(self, config: TextConfig, size: SliceSpec | None = None):
        self.size = size  # the MatFormer size whose layers these are (None: the full model)
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

    def fork(self, n: int) -> Cache | None:
        """A copy holding the first n tokens, this cache untouched (None where `truncate` can't)."""
        out = copy.copy(self)
        out.layers = {j: c.copy(n) for j, c in self.layers.items()}  # only what the copy keeps
        return out if out.truncate(n) else None


class PromptCache:
    """Recent conversations' caches, kept between calls (`Model.stream(..., prompt_cache=pc)`).

    Holds up to `slots` caches (least recently used dropped first), each with the tokens it was
    fed. The next prompt continues from the one sharing the longest prefix with it (at least one
    new token is always prefilled, for the logits) and prefills the rest. Another size, a
    multimodal prompt (its soft tokens depend on the media, not the ids) or a divergence further
    back than a sliding window can rewind starts afresh.

    One slot (the default) suits one conversation: a prompt that diverges takes the cache over.
    With more (the server), a prompt that shares only part of a cache, such as a system prompt
    or a conversation it branches from, gets a copy of that part, so the other conversation
    keeps its cache. Each slot holds its conversation's K/V (`Cache.nbytes`); `max_bytes` caps
    what all of them hold between calls (least recently used dropped first, the newest too if it
    alone is over). One caller at a time.
    """

    def __init__(self, slots: int = 1, max_bytes: int | None = None) -> None:
        if slots < 1:
            raise ValueError(f"a PromptCache needs at least one slot, not {slots}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.slots, self.max_bytes = slots, max_bytes
        self._entries: list[tuple[Cache, list[int]]] = []  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def take(self, config: TextConfig, size: SliceSpec | None, prompt_ids: list[int]) -> tuple[Cache, int]:
        """A cache to continue from and how many of `prompt_ids` it already holds. The cache is
        the caller's until it gives it back with `keep` (a half-written one must not be reused)."""
        best, common = None, 0
        for i, (cache, ids) in enumerate(self._entries):
            n = common_prefix(ids, prompt_ids[:-1]) if cache.size == size else 0
            if n > common:
                best, common = i, n
        if best is not None:
            cache, ids = self._entries[best]
            if self.slots > 1 and common < len(ids):  # a branch: leave the other conversation whole
                forked = cache.fork(common)
                if forked is not None:
                    return forked, common
            else:
                del self._entries[best]
                if cache.truncate(common):
                    return cache, common
        while len(self._entries) >= self.slots:  # make room now: the new cache comes back in `keep`
            del self._entries[0]
        return Cache(config, size), 0

    def release(self, prompt_ids: list[int]) -> None:
        """Drop the caches `prompt_ids` continues (a multimodal turn: they won't be reused)."""
        self._entries = [(c, ids) for c, ids in self._entries if common_prefix(ids, prompt_ids) < len(ids)]

    def keep(self, cache: Cache, ids: list[int]) -> None:
        """Remember `cache` (most recently used) and the `cache.offset` tokens it was fed (`ids`)."""
        self._entries.append((cache, list(ids[: cache.offset])))
        del self._entries[: max(0, len(self._entries) - self.slots)]
        if self.max_bytes is not None:
            while self._entries and self.nbytes() > self.max_bytes:
                del self._entries[0]

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache, _ in self._entries)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
