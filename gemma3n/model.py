"""The public object: `load`, `logits`, `generate`, `stream`, sizes. Wiring only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .cache import PromptCache
from .checkpoint import open_checkpoint
from .errors import InputError
from .generate import (
    GenerationResult,
    StepStats,
    TextPiece,
    check_logits,
    check_max_tokens,
    check_stops,
    generate_step,
    make_sampler,
    sampling_params,
    stream_generate,
)
from .matformer import read_declared_sizes
from .multimodal import Towers, merge_embeddings
from .placement import load_text_decoder, placement_report, resolve_device, resolve_dtype
from .processing import Processor, PromptInputs
from .text import LayerPlan
from .tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "data" / "tiny"


def default_model_path() -> Path:
    return DEFAULT_MODEL


def load(
    path_or_hub_id: str | Path | None = None,
    device: str = "cpu",
    dtype: Any = None,
    compute_dtype: Any = "auto",
    quantize: Any = None,
) -> Model:
    """Load a checkpoint (directory or hub id; None = the embedded default model).

    dtype: the weights' dtype (None = as stored). compute_dtype: the activations' dtype
    ("auto": fp32 on a CPU for half-precision weights, else the weights' dtype). quantize:
    None, "int8", "int4" or "int4:GROUP" to quantize weights at load (a checkpoint written by
    `gemma3n quantize` is detected from its config.json)."""
    ckpt = open_checkpoint(path_or_hub_id if path_or_hub_id is not None else DEFAULT_MODEL)
    dev = resolve_device(device)
    decoder = load_text_decoder(ckpt, dev, resolve_dtype(dtype), compute_dtype, quantize=quantize)
    return Model(ckpt, decoder)


class Model:
    def __init__(self, ckpt, decoder):
        self.checkpoint = ckpt
        self.path: Path = ckpt.path
        self.config = ckpt.config
        self.decoder = decoder
        self.tokenizer = Tokenizer(ckpt.path)
        self.processor = Processor(self.tokenizer, self.config, ckpt.path)
        self.towers = Towers(ckpt, decoder.device, decoder.dtype, self.config.text.hidden_size)
        self.generation_config = _read_generation_config(ckpt.path)
        self._plans: dict[str, LayerPlan] = {}
        # the sizes the checkpoint declares in matformer_sizes.json ({} if none): {name: {"ffn", "skip"}}
        self.declared_sizes: dict[str, dict] = read_declared_sizes(ckpt.path, self.config.text)

    @property
    def name(self) -> str:
        return "gemma3n-tiny" if self.path == DEFAULT_MODEL else self.path.name

    @property
    def has_audio(self) -> bool:
        return self.towers.has_audio

    @property
    def has_vision(self) -> bool:
        return self.towers.has_vision

    # --- sizes (MatFormer views) ----------------------------------------------------------
    def plan(self, size: Any = None) -> LayerPlan:
        """The layer plan of a size: None = the full model; else a MatFormer view (no copy)."""
        if size is None:
            return self._plans.setdefault("full", LayerPlan.full(self.config.text))
        from .matformer import resolve_size, sliced_text_config

        spec = resolve_size(size, self.config.text, self.declared_sizes)
        if spec is None:
            return self.plan(None)
        key = f"{spec.layers}:{spec.ffn_widths}"  # the same slice by name or by dict: one plan, one cache
        if key not in self._plans:
            cfg = sliced_text_config(self.config.text, spec)
            self._plans[key] = LayerPlan(config=cfg, layers=tuple(spec.layers), key=key)
        return self._plans[key]

    def sizes(self) -> list[str]:
        """Names of the elastic sizes this checkpoint can serve: its declared sizes
        (matformer_sizes.json), then the official presets that fit and that no declared name shadows."""
        from .matformer import find_declared, fitting_presets

        names = list(self.declared_sizes)
        names += [
            p.name for p in fitting_presets(self.config.text) if find_declared(p.name, self.declared_sizes) is None
        ]
        return names

    # --- model calls --------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, size: Any = None) -> torch.Tensor:
        """Full forward without a cache: LongTensor [B, T] -> float32 soft-capped logits [B, T, V]."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() != 2 or 0 in ids.shape:
            raise InputError(f"input_ids must be a non-empty [batch, tokens], got shape {list(ids.shape)}")
        context = self.config.text.max_position_embeddings
        if ids.shape[1] > context:
            raise InputError(f"input_ids has {ids.shape[1]} tokens but the model's context is {context} tokens")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.text.vocab_size):
            raise InputError(f"token ids must be in [0, {self.config.text.vocab_size})")
        ids = ids.to(self.decoder.device)
        plan = self.plan(size)
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.decoder(ids, positions, plan=plan)
        logits = self.decoder.lm_head(hidden).float()
        check_logits(logits)
        return logits

    def prepare(self, prompt=None, messages=None, image_size: int | None = None) -> tuple[PromptInputs, Any]:
        """Prompt -> ids and the merged input embeddings (None for plain text)."""
        if (prompt is None) == (messages is None):
            raise InputError("pass exactly one of prompt (text or token ids) or messages (a chat)")
        if prompt is not None:
            inputs = self.processor.from_text(prompt)
        else:  # a text-only checkpoint refuses media before any is decoded
            inputs = self.processor.from_messages(messages, check_media=self.towers.require)
        ids = torch.tensor([inputs.ids], device=self.decoder.device)
        pixel_values = audio_extractor = None
        if inputs.images:
            from .vision import ImageProcessor, load_image

            self.towers.vision_tower()  # a text-only checkpoint fails here, before any decoding
            images = [load_image(img) for img in inputs.images]
            pixel_values = ImageProcessor.from_pretrained(self.path)(images, size=image_size)
        if inputs.audios:  # already decoded and cut into the encoder's windows by the processor
            self.towers.audio_tower()
            audio_extractor = self.processor.audio_extractor
        embeds = merge_embeddings(
            self.decoder,
            self.towers,
            ids,
            pixel_values=pixel_values,
            audio_clips=inputs.audios,
            audio_extractor=audio_extractor,
        )
        return inputs, embeds

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor | None:
        """h0 for ids that include media-vocabulary ids (hard embeddings); None for plain text."""
        return merge_embeddings(self.decoder, self.towers, ids)

    def stop_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        eos = self.generation_config.get("eos_token_id")
        ids |= {eos} if isinstance(eos, int) else set(eos or [])
        ids |= {t for t in (self.tokenizer.token_id("eos"), self.tokenizer.token_id("end_of_turn")) if t is not None}
        return ids

    def stream(
        self,
        prompt: str | list[int] | None = None,
        *,
        messages: list[dict] | None = None,
        max_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        size: Any = None,
        image_size: int | None = None,
        prefill_skip: bool = True,
        prefill_chunk: int = 512,
        prompt_cache: PromptCache | None = None,
    ) -> Iterator[TextPiece]:
        """Yield text pieces as they are decoded; the last carries finish_reason and stats.
        Unset sampling options fall back to the checkpoint's generation_config.json.
        `prompt_cache` (a `gemma3n.PromptCache`, one per conversation) lets the next call reuse
        the K/V of the tokens its prompt shares with this one (multi-turn chat)."""
        max_tokens = check_max_tokens(max_tokens)
        params = sampling_params(
            self.generation_config,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        stops = check_stops(stop)
        sampler = make_sampler(params)
        plan = self.plan(size)
        inputs, embeds = self.prepare(prompt, messages, image_size)
        stats = StepStats()
        tokens = generate_step(
            self.decoder,
            inputs.ids,
            plan,
            sampler,
            max_tokens=max_tokens,
            inputs_embeds=embeds,
            prefill_chunk=prefill_chunk,
            skip_shared=prefill_skip,
            stats=stats,
            embed=self.embed_ids,
            prompt_cache=prompt_cache,
        )
        yield from stream_generate(
            tokens, self.tokenizer, stop_ids=self.stop_ids(), stop=stops, max_tokens=max_tokens, stats=stats
        )

    def generate(self, prompt: str | list[int] | None = None, **kwargs) -> GenerationResult:
        """Same arguments as `stream`; returns the whole text, ids and finish_reason."""
        text, ids, last = [], [], None
        for piece in self.stream(prompt, **kwargs):
            text.append(str(piece))
            ids.extend(piece.token_ids)
            last = piece
        return GenerationResult(
            text="".join(text),
            token_ids=ids,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            stats=last.stats or {},
        )

    def placement(self):
        return placement_report(self.decoder)


def _read_generation_config(path: Path) -> dict:
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
