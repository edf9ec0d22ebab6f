"""The public object: `load`, `logits`, `generate`, `stream`, sizes. Wiring only."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .batching import generate_batch, is_batch
from .cache import PromptCache
from .checkpoint import open_checkpoint
from .config import read_json_file
from .errors import CheckpointError, InputError
from .generate import (
    GenerationResult,
    Prompt,
    StepStats,
    TextPiece,
    check_logits,
    check_max_tokens,
    check_stops,
    decode_tokens,
    make_sampler,
    prefill_prompt,
    sampling_params,
    stream_generate,
)
from .logprobs import LogprobRecorder, PromptScorer, TokenTable, check_top_logprobs
from .matformer import (
    SliceSpec,
    find_declared,
    fitting_presets,
    read_declared_sizes,
    resolve_size,
    sliced_text_config,
)
from .multimodal import Towers, merge_embeddings
from .placement import load_text_decoder, placement_report, resolve_device, resolve_dtype
from .processing import Processor, PromptInputs
from .speculative import Observer, drafting
from .structured import GrammarConstraint, byte_tokenizer, constrained
from .text import LayerPlan
from .tokenizer import Tokenizer
from .tools import check_tools, parse_calls, reply_form

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
        self._plans: dict[SliceSpec | None, LayerPlan] = {}
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
        spec = None if size is None else resolve_size(size, self.config.text, self.declared_sizes)
        if spec not in self._plans:  # the same slice by name or by dict is one spec: one plan, one cache
            full = LayerPlan.full(self.config.text)
            self._plans[spec] = (
                full if spec is None else LayerPlan(sliced_text_config(full.config, spec), spec.layers, spec)
            )
        return self._plans[spec]

    def sizes(self) -> list[str]:
        """Names of the elastic sizes this checkpoint can serve: its declared sizes
        (matformer_sizes.json), then the official presets that fit and that no declared name shadows."""
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
            from .image import ImageProcessor, load_image

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
        response_format: Any = None,
        tools: list[dict] | None = None,
        tool_choice: Any = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        prompt_logprobs: bool = False,
        n: int = 1,
        draft: Any = None,
        draft_k: int | None = None,
        draft_model: Model | None = None,
    ) -> Iterator[TextPiece]:
        """Yield text pieces as they are decoded; the last carries finish_reason and stats.
        Unset sampling options fall back to the checkpoint's generation_config.json.
        `prompt_cache` (a `gemma3n.PromptCache`, one per conversation) lets the next call reuse
        the K/V of the tokens its prompt shares with this one (multi-turn chat).

        `response_format`: OpenAI's {"type": "json_object"} / {"type": "json_schema", ...} or a
        pydantic model class: the reply is constrained to it while decoding (gemma3n.structured).
        `tools` / `tool_choice`: OpenAI's, rendered into the prompt (gemma3n.tools); a required
        or named call constrains the reply. `logprobs` / `top_logprobs`: each piece's tokens'
        log-probabilities (`piece.logprobs`); `prompt_logprobs`: the prompt tokens' (on each
        choice's first piece; `max_tokens` may then be 0). `n`: continuations of one prefill,
        seeded seed, seed + 1, ...; each piece says its `choice`, in order 0, 1, ...

        `draft`: speculative decoding (gemma3n.speculative), the same tokens at temperature 0 and
        the same distribution when sampling: a smaller size of this model (a preset such as "E2B",
        a declared size or {"ffn", "skip"}; a view of the loaded weights) or "ngram" (drafts looked
        up in the prompt). `draft_model`: a separately loaded model with the same vocabulary drafts
        instead (e.g. this checkpoint loaded with quantize="int4"), at its size `draft`.
        `draft_k`: tokens drafted per check, 1-15 (default: adapted to the acceptance rate and the
        measured costs, so a seed reproduces a sampled text only with draft_k fixed). Stats then
        include the acceptance rate and tokens per verification."""
        max_tokens = _check_max_tokens(max_tokens, prompt_logprobs)
        n = _check_n(n)
        top_logprobs = check_top_logprobs(top_logprobs)
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
        messages, grammar = reply_form(messages, response_format, tools, tool_choice)
        plan = self.plan(size)
        drafts = drafting(self, plan, draft, draft_k, draft_model)
        if drafts is not None and grammar is not None:
            raise InputError(
                "draft does not combine with response_format or a required tool call (the grammar's state "
                "cannot follow drafts yet); leave draft unset for constrained replies"
            )
        inputs, embeds = self.prepare(prompt, messages, image_size)
        scorer = PromptScorer(self.token_table, inputs.ids, top_logprobs) if prompt_logprobs else None
        request = Prompt(inputs.ids, embeds, prefill_chunk, prefill_skip, prompt_cache, scorer)
        stats = StepStats()
        cache, logits = prefill_prompt(self.decoder, request, plan, stats)
        for i in range(n):
            last = i == n - 1  # the others decode from copies; the last one's cache is kept
            branch = cache if last else cache.fork(cache.offset)
            step_stats = replace(stats) if not last else stats
            branch_params = replace(params, seed=None if seed is None else _wrap_seed(seed + i))
            branch_request = request if last else replace(request, prompt_cache=None)
            recorder = LogprobRecorder(self.token_table, top_logprobs) if logprobs else None
            tokens = self._tokens(
                (branch, plan, logits), branch_params, branch_request, drafts, grammar, recorder, max_tokens, step_stats
            )
            pieces = stream_generate(
                tokens, self.tokenizer, stop_ids=self.stop_ids(), stop=stops, max_tokens=max_tokens, stats=step_stats
            )
            yield from _annotate(pieces, i, recorder, scorer)

    def _tokens(
        self,
        state: tuple[Any, LayerPlan, torch.Tensor],
        params: Any,
        request: Prompt,
        drafts: Any,
        grammar: Any,
        recorder: LogprobRecorder | None,
        max_tokens: int,
        stats: StepStats,
    ) -> Iterator[int]:
        """One continuation's token ids from the prefilled (cache, plan, logits): speculative
        with a draft, else one sampled (grammar-constrained, recorded) token a step."""
        cache, plan, logits = state
        if drafts is not None:
            return drafts.tokens(
                (self.decoder, cache, plan),
                logits,
                params,
                request,
                max_tokens=max_tokens,
                stats=stats,
                embed=self.embed_ids,
                observe=_observer(recorder),
            )
        sampler = make_sampler(params)
        if grammar is not None:
            sampler = constrained(sampler, GrammarConstraint(self.byte_tokenizer, grammar))
        return decode_tokens(
            self.decoder,
            cache,
            logits,
            plan,
            recorder.wrap(sampler) if recorder else sampler,
            request,
            max_tokens=max_tokens,
            stats=stats,
            embed=self.embed_ids,
        )

    @functools.cached_property
    def byte_tokenizer(self) -> Any:
        """llguidance's tokenizer for this model (grammar masks, token bytes); built on first use."""
        return byte_tokenizer(self.tokenizer.to_json(), self.config.text.vocab_size, tuple(sorted(self.stop_ids())))

    @functools.cached_property
    def token_table(self) -> TokenTable:
        return TokenTable(self.byte_tokenizer)

    def generate(self, prompt: str | list[int] | None = None, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Same arguments as `stream`; returns the whole text, ids and finish_reason (a list of
        them, one per continuation, for n > 1). With tools, `tool_calls` holds a call the reply
        makes (finish_reason "tool_calls").

        A list of prompts (texts or token-id lists), or `messages` as a list of conversations,
        is an offline batch: one result each, in order, decoded together `max_batch` (default 8)
        at a time with continuous batching (gemma3n.batching); `progress` shows a bar."""
        if is_batch(prompt, kwargs.get("messages")):
            messages = kwargs.pop("messages", None)
            return generate_batch(self, prompt if messages is None else None, messages, **kwargs)
        kwargs.pop("max_batch", None)
        kwargs.pop("progress", None)
        results: dict[int, GenerationResult] = {}
        for piece in self.stream(prompt, **kwargs):
            result = results.setdefault(piece.choice, GenerationResult("", [], "", 0, index=piece.choice))
            result.text += str(piece)
            result.token_ids.extend(piece.token_ids)
            if piece.logprobs is not None:
                result.logprobs = (result.logprobs or []) + piece.logprobs
            result.prompt_logprobs = piece.prompt_logprobs or result.prompt_logprobs
            if piece.finish_reason is not None:
                result.finish_reason, result.prompt_tokens = piece.finish_reason, piece.prompt_tokens
                result.stats = piece.stats or {}
        functions = check_tools(kwargs.get("tools"))
        for result in results.values():
            calls = parse_calls(result.text, functions) if functions and kwargs.get("tool_choice") != "none" else None
            if calls:
                result.tool_calls, result.finish_reason = calls, "tool_calls"
        ordered = [results[i] for i in sorted(results)]
        return ordered if kwargs.get("n", 1) > 1 else ordered[0]

    def placement(self):
        return placement_report(self.decoder)


def _check_max_tokens(max_tokens: Any, prompt_logprobs: bool) -> int:
    """max_tokens >= 1, or 0 when only the prompt is scored (an evaluation harness's request)."""
    if prompt_logprobs and max_tokens == 0 and not isinstance(max_tokens, bool):
        return 0
    return check_max_tokens(max_tokens)


MAX_N = 16  # continuations of one prompt: each costs a decode and, while it runs, a copy of the K/V


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise InputError(f"n must be an integer in [1, {MAX_N}], got {n!r}")
    return n


def _wrap_seed(seed: int) -> int:
    """seed + i stays in what torch.Generator takes, [-2**63, 2**64)."""
    return seed if seed < 2**64 else seed - 2**64


def _annotate(
    pieces: Iterator[TextPiece], index: int, recorder: LogprobRecorder | None, scorer: PromptScorer | None
) -> Iterator[TextPiece]:
    """Pieces of one continuation with its index, their tokens' log-probabilities and, on the
    first, the prompt's."""
    done = 0
    for k, piece in enumerate(pieces):
        piece.choice = index
        if recorder is not None:
            piece.logprobs = recorder.entries[done : done + len(piece.token_ids)]
            done += len(piece.token_ids)
        if scorer is not None and k == 0:
            piece.prompt_logprobs = scorer.entries
        yield piece


def _observer(recorder: LogprobRecorder | None) -> Observer | None:
    """A speculative decode's log-probability hook: the recorder notes each emitted token from
    the target logits it was chosen from (the wrapped "sampler" only returns that token)."""
    if recorder is None:
        return None
    record = recorder.wrap(lambda logits, chosen: chosen[0])

    def observe(logits: torch.Tensor, token: int) -> None:
        record(logits, [token])

    return observe


def _read_generation_config(path: Path) -> dict:
    return read_json_file(path / "generation_config.json", error=CheckpointError)
