"""KV caches. Only KV-owning layers keep one (text-decoder.md §5.1): shared layers borrow
their source's K/V inside the forward pass. Sliding layers keep a bounded window.

A cache belongs to one `LayerPlan` (full model or a MatFormer view): hidden states differ per
size, so a cache written under one size is never valid for another (matformer.md §4).
"""

from __future__ import annotations

import torch

from .config import TextConfig


class LayerKV:
    """K/V [B, Hkv, S, d] and their absolute positions [S] for one layer.

    Full layers keep everything in a buffer that grows by doubling (no per-token realloc);
    sliding layers keep the last W-1 entries, enough for the next query's window.
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
        keep = self.window - 1
        self.k, self.v, self.pos = k[:, :, -keep:], v[:, :, -keep:], pos[-keep:]
        self.length = self.k.shape[2]
        return k, v, pos

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

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values())
