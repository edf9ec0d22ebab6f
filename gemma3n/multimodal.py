"""Soft tokens into the text embedding: the multimodal embedders, towers loaded on demand,
and the merge at placeholder positions (docs/audio-vision.md#embedders-and-merge).

Ids in the vision range [262144, 262272) and audio range [262272, 262400) take the
embedders' *hard* embeddings; each placeholder run then receives a tower's soft tokens.
Towers and embedders are read from disk only the first time a request needs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, check_coverage
from .errors import InputError
from .layers import RMSNorm
from .text import TextDecoder

if TYPE_CHECKING:
    from .audio import AudioFeatureExtractor


class MultimodalEmbedder(nn.Module):
    """Tower features or hard ids -> text space: norm, project, weightless norm."""

    def __init__(self, hidden: int, text_hidden: int, vocab_offset: int, vocab_size: int, eps: float):
        super().__init__()
        self.vocab_offset = vocab_offset
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.hard_embedding_norm = RMSNorm(hidden, eps)
        self.soft_embedding_norm = RMSNorm(hidden, eps)
        self.embedding_projection = nn.Linear(hidden, text_hidden, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_hidden, eps, with_scale=False)

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        mm_config: dict[str, Any],
        text_hidden: int,
        *,
        where: str,
        device,
        dtype,
    ) -> MultimodalEmbedder:
        with torch.device("meta"):
            module = cls(
                int(mm_config["hidden_size"]),
                text_hidden,
                int(mm_config["vocab_offset"]),
                int(mm_config["vocab_size"]),
                float(mm_config.get("rms_norm_eps", 1e-6)),
            )
        expected = {n: tuple(t.shape) for n, t in module.state_dict().items()}
        check_coverage(expected, {n: tuple(t.shape) for n, t in sd.items()}, where=where)
        module.load_state_dict({n: t.to(device=device, dtype=dtype or t.dtype) for n, t in sd.items()}, assign=True)
        return module.requires_grad_(False)

    def embed_hard(self, ids: torch.Tensor) -> torch.Tensor:
        return self._project(self.hard_embedding_norm(self.embedding(ids - self.vocab_offset)))

    def embed_soft(self, features: torch.Tensor) -> torch.Tensor:
        return self._project(self.soft_embedding_norm(features.to(self.embedding.weight.dtype)))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(x))


class Towers:
    """Lazily loaded audio/vision encoders and embedders of one checkpoint."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None, text_hidden: int):
        self.ckpt, self.device, self.dtype, self.text_hidden = ckpt, device, dtype, text_hidden
        self._loaded: dict[str, Any] = {}

    @property
    def has_vision(self) -> bool:
        return self.ckpt.config.vision is not None and self.ckpt.has_prefix("model.vision_tower.")

    @property
    def has_audio(self) -> bool:
        return self.ckpt.config.audio is not None and self.ckpt.has_prefix("model.audio_tower.")

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def _get(self, name: str, build):
        if name not in self._loaded:
            self._loaded[name] = build()
        return self._loaded[name]

    def embedder(self, kind: str) -> MultimodalEmbedder:
        cfg = self.ckpt.config.vision if kind == "vision" else self.ckpt.config.audio
        if cfg is None:
            raise InputError(f"this checkpoint has no {kind} configuration, so it cannot take {kind} input")
        prefix = f"model.embed_{kind}."
        return self._get(
            prefix,
            lambda: MultimodalEmbedder.from_state_dict(
                self.ckpt.subset(prefix),
                cfg,
                self.text_hidden,
                where=f"{self.ckpt.path} ({prefix}*)",
                device=self.device,
                dtype=self.dtype,
            ),
        )

    def require(self, kind: str) -> None:
        """Load the tower a prompt's "image" or "audio" parts need; InputError if the checkpoint
        has none, so a text-only checkpoint refuses media before any of it is decoded."""
        self.vision_tower() if kind == "image" else self.audio_tower()

    def vision_tower(self):
        from .vision import VisionTower

        return self._tower("vision", VisionTower, "images")

    def audio_tower(self):
        from .audio_encoder import AudioEncoder

        return self._tower("audio", AudioEncoder, "audio")

    def _tower(self, kind: str, cls, what: str):
        """The `kind` tower, read from the checkpoint the first time a request needs it."""
        if not (self.has_vision if kind == "vision" else self.has_audio):
            if not (self.has_vision or self.has_audio):
                raise InputError(f"{self.ckpt.path} is a text-only checkpoint: it has no {kind} tower for {what}")
            raise InputError(f"{self.ckpt.path} has no {kind} tower: it cannot take {what}")
        cfg = self.ckpt.config.vision if kind == "vision" else self.ckpt.config.audio
        prefix = f"model.{kind}_tower."
        return self._get(
            f"{kind}_tower",
            lambda: cls.from_state_dict(self.ckpt.subset(prefix), cfg, device=self.device, dtype=self.dtype),
        )


# Pixels (images x height x width) through the vision tower in one call: at 256 px several frames
# together make its small late-stage GEMMs more efficient, while at 768 px one image's early
# feature maps already take about a hundred MB and a batch ran slower per image (bench/README.md).
VISION_BATCH_PIXELS = 8 * 256 * 256


def vision_batch(height: int, width: int) -> int:
    """Images per vision-tower call at this resolution (8 at 256 px, 2 at 512, 1 at 768)."""
    return max(1, VISION_BATCH_PIXELS // (height * width))


# Audio windows encoded at once: bounds the encoder's activations however long the prompt's
# audio (a 30 s window is 750 conformer steps of 1536 features, 6144 in the feed-forward).
AUDIO_BATCH = 8


@torch.inference_mode()
def encode_audio(
    towers: Towers, clips: Sequence[np.ndarray], extractor: AudioFeatureExtractor, soft_tokens: int
) -> torch.Tensor:
    """16 kHz clips of at most the encoder's window -> their soft tokens [N, soft_tokens, text D].

    Padded frames and the tail up to the fixed soft-token count take the padding embedding, the
    hard embedding of the audio vocabulary's last id (docs/audio-vision.md#audio-soft-tokens). Up
    to AUDIO_BATCH clips are padded into one batch, as the reference processor batches a prompt's clips.
    """
    tower, embedder = towers.audio_tower(), towers.embedder("audio")
    pad_id = torch.tensor([embedder.vocab_offset + embedder.vocab_size - 1], device=towers.device)
    pad = embedder.embed_hard(pad_id)[0]
    out = []
    for i in range(0, len(clips), AUDIO_BATCH):
        feats, feat_mask = extractor(clips[i : i + AUDIO_BATCH])
        encoded, padded = tower(feats.to(towers.device), feat_mask.to(towers.device))
        soft = torch.where(padded[..., None], pad, embedder.embed_soft(encoded))
        extra = soft_tokens - soft.shape[1]
        if extra > 0:
            soft = torch.cat([soft, pad.expand(soft.shape[0], extra, -1)], dim=1)
        out.append(soft[:, :soft_tokens])
    return torch.cat(out)


@torch.inference_mode()
def merge_embeddings(
    decoder: TextDecoder,
    towers: Towers,
    ids: torch.Tensor,
    *,
    pixel_values: torch.Tensor | None = None,
    audio_clips: Sequence[np.ndarray] | None = None,
    audio_extractor: AudioFeatureExtractor | None = None,
) -> torch.Tensor | None:
    """h0 for a multimodal prompt [1, T, D], or None when plain text embedding suffices.

    `audio_clips` (with the `audio_extractor` that makes their features) fill the audio
    placeholder blocks in order, one clip per block."""
    cfg = towers.ckpt.config
    ranges = []
    for kind, mm in (("vision", cfg.vision), ("audio", cfg.audio)):
        if mm is not None:
            lo = int(mm["vocab_offset"])
            ranges.append((kind, lo, lo + int(mm["vocab_size"])))
    hard = [(k, lo, hi) for k, lo, hi in ranges if bool(((ids >= lo) & (ids < hi)).any())]
    if not hard and pixel_values is None and not audio_clips:
        return None
    h0 = decoder.embed(ids)
    for kind, lo, hi in hard:
        mask = (ids >= lo) & (ids < hi)
        h0[mask] = towers.embedder(kind).embed_hard(ids[mask]).to(h0.dtype)
    if pixel_values is not None:
        tower, n = towers.vision_tower(), vision_batch(*pixel_values.shape[-2:])
        features = torch.cat([
            tower(pixel_values[i : i + n].to(towers.device)) for i in range(0, pixel_values.shape[0], n)
        ])  # fmt: skip
        soft = towers.embedder("vision").embed_soft(features)
        h0 = _scatter(h0, ids == cfg.image_token_id, soft, "image")
    if audio_clips:
        if audio_extractor is None:
            raise ValueError("audio_clips need the audio_extractor that makes their features")
        soft = encode_audio(towers, audio_clips, audio_extractor, cfg.audio_soft_tokens_per_image)
        h0 = _scatter(h0, ids == cfg.audio_token_id, soft, "audio")
    return h0


def _scatter(h0: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor, kind: str) -> torch.Tensor:
    n = int(mask.sum())
    if n != soft.shape[0] * soft.shape[1]:
        raise InputError(
            f"the prompt has {n} {kind} placeholder tokens but the {kind} inputs give "
            f"{soft.shape[0]} x {soft.shape[1]} soft tokens"
        )
    h0[mask] = soft.reshape(-1, soft.shape[-1]).to(h0.dtype)
    return h0
