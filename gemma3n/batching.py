"""Several sequences decoded together: one forward per step for all of them.

Decoding one token reads every weight once; decoding B tokens of B sequences in one forward
reads them once too (the decode kernels take up to 8 activation rows a pass), so on a machine
bound by memory bandwidth B sequences cost little more than one. A `Batch` holds sequences of
one plan (MatFormer size: sizes never share a forward or a cache), each with its own KV cache,
position, sampler, stop conditions and text stream. `step()` samples the next token of every
sequence, emits its text, drops the ones that finished and runs one batched forward for the
rest (the fused native step where it applies, else one Python forward per sequence). Sequences
join after their prefill and leave when done: continuous batching, used by `Model.generate`
over a list of prompts and by the server's engine.

A sequence's tokens are the same as decoding it alone: the decode kernels compute every row
with the same arithmetic whatever the batch, and attention runs per sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import Cache
from .decode_step import decode_batch, fused_step
from .generate import (
    EmbedFn,
    GenerationResult,
    Prompt,
    Sampler,
    StepStats,
    TextPiece,
    TextStream,
    check_logits,
    check_max_tokens,
    check_stops,
    decode_one,
    make_sampler,
    prefill,
    sampling_params,
)
from .layers import DECODE_ROWS
from .text import LayerPlan, TextDecoder

MAX_BATCH = DECODE_ROWS  # rows the decode kernels take in one pass over the weights
PREFILL_SLICE = 256  # prompt tokens prefilled between two steps of a running batch


@dataclass
class Sequence:
    """One continuation being decoded: its cache after the prompt, the logits of its next token,
    how to choose that token, and the text stream its tokens go to."""

    cache: Cache
    logits: torch.Tensor
    sampler: Sampler
    history: list[int]
    text: TextStream
    stats: StepStats
    limit: int  # tokens it may still generate (max_tokens, capped by the context)
    tag: Any = None  # the caller's handle (a request, an index)
    generated: int = 0
    finished: bool = False
    on_token: Callable[[torch.Tensor, int], None] | None = None  # sees (logits, token): log-probabilities
    release: Callable[[], None] | None = None  # when it ends: give its cache back to a prompt cache
    t0: float = field(default_factory=time.perf_counter)


class Batch:
    """Sequences of one plan, decoded together (module doc)."""

    def __init__(self, decoder: TextDecoder, plan: LayerPlan, embed: EmbedFn | None = None, max_batch: int = MAX_BATCH):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.decoder, self.plan, self.embed, self.max_batch = decoder, plan, embed, max_batch
        self.active: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.active)

    @property
    def full(self) -> bool:
        return len(self.active) >= self.max_batch

    def add(self, seq: Sequence) -> None:
        if self.full:
            raise RuntimeError("the batch is full")
        self.active.append(seq)

    def remove(self, tag: Any) -> None:
        """Drop a sequence (its client went away): it frees its place at once."""
        self.active = [s for s in self.active if s.tag is not tag]

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, TextPiece]]:
        """One token for every active sequence: (sequence, piece) for the text they emit (a
        finished sequence's last piece carries finish_reason), then one forward for those that go on."""
        out: list[tuple[Sequence, TextPiece]] = []
        going: list[tuple[Sequence, int]] = []
        for seq in self.active:
            token = self._choose(seq)
            piece = seq.text.push(token)
            if piece is not None:
                out.append((seq, piece))
            if seq.text.done or seq.generated >= seq.limit:
                seq.finished = True
                out.append((seq, seq.text.close()))
            else:
                going.append((seq, token))
        self.active = [s for s, _ in going]
        if going:
            self._forward(going)
        return out

    def _choose(self, seq: Sequence) -> int:
        check_logits(seq.logits, seq.generated)
        token = seq.sampler(seq.logits, seq.history)
        if seq.on_token is not None:
            seq.on_token(seq.logits, token)
        seq.generated += 1
        seq.history.append(token)
        now = time.perf_counter()
        if seq.generated == 1:
            seq.stats.prompt_seconds = now - (seq.stats.start or seq.t0)
            seq.t0 = now
        else:
            seq.stats.generation_seconds = now - seq.t0
        seq.stats.generated_tokens = seq.generated
        return token

    def _forward(self, going: list[tuple[Sequence, int]]) -> None:
        """The next logits of every sequence that goes on: one batched native call, else (no
        fused step here, or a cache without buffers) one Python forward each."""
        step = fused_step(self.decoder, self.plan) if len(going) > 1 else None
        if step is not None:
            tokens = [t for _, t in going]
            embeds = [self.embed(torch.tensor([[t]])) if self.embed else None for t in tokens]
            logits = decode_batch(step, self.decoder, self.plan, tokens, [s.cache for s, _ in going], embeds)
            if logits is not None:
                for (seq, _), row in zip(going, logits):
                    seq.logits = row
                return
        for seq, token in going:
            seq.logits = decode_one(self.decoder, token, seq.cache, self.plan, self.embed)


# --- offline batches: Model.generate over a list of prompts ------------------------------
@dataclass
class BatchRequest:
    """A prompt checked and prepared for a batch; `start` prefills it into a Sequence."""

    model: Any
    prompt: Any  # generate.Prompt
    plan: LayerPlan
    params: Any  # generate.SamplingParams
    stops: list[str]
    max_tokens: int

    @classmethod
    def make(
        cls,
        model: Any,
        prompt: Any = None,
        messages: Any = None,
        *,
        max_tokens: int = 256,
        stop: Any = None,
        size: Any = None,
        image_size: int | None = None,
        prefill_skip: bool = True,
        prefill_chunk: int = 512,
        **sampling: Any,
    ) -> BatchRequest:
        params = sampling_params(model.generation_config, **sampling)
        inputs, embeds = model.prepare(prompt, messages, image_size)
        plan = model.plan(size)
        request = Prompt(inputs.ids, embeds, prefill_chunk, prefill_skip)
        request.room(plan.config)  # a prompt longer than the context fails here, before any decoding
        return cls(model, request, plan, params, check_stops(stop), check_max_tokens(max_tokens))

    def admit(
        self, tag: Any = None, prompt_cache: Any = None, slice_tokens: int = PREFILL_SLICE
    ) -> Iterator[Sequence | None]:
        """Prefill the prompt `slice_tokens` at a time, yielding None after each slice but the
        last (a server steps its running batch in between, so a long prompt does not freeze the
        others' streams), then the Sequence. With a `prompt_cache` (a text prompt), it continues
        from the longest cached prefix, and the sequence gives its cache back (`release`) when
        it ends."""
        prompt, plan, decoder = self.prompt, self.plan, self.model.decoder
        stats = StepStats(start=time.perf_counter())
        reuse = prompt_cache is not None and prompt.inputs_embeds is None
        if reuse:
            cache, done = prompt_cache.take(plan.config, plan.spec, prompt.ids)
        else:
            cache, done = Cache(plan.config, plan.spec), 0
        ids = torch.tensor([prompt.ids], device=decoder.device)
        logits = None
        for a in range(done, len(prompt.ids), slice_tokens):
            b = min(a + slice_tokens, len(prompt.ids))
            embeds = prompt.inputs_embeds[:, a:b] if prompt.inputs_embeds is not None else None
            logits = prefill(
                decoder,
                ids[:, a:b],
                cache,
                plan,
                inputs_embeds=embeds,
                chunk_size=prompt.chunk,
                skip_shared=prompt.skip_shared,
            )
            if b < len(prompt.ids):
                yield None
        stats.prompt_tokens, stats.cached_prompt_tokens = len(prompt.ids), done
        text = TextStream(
            self.model.tokenizer,
            stop_ids=self.model.stop_ids(),
            stop=self.stops,
            max_tokens=self.max_tokens,
            stats=stats,
        )
        limit = min(self.max_tokens, prompt.room(plan.config))
        history = list(prompt.ids)
        seq = Sequence(cache, logits, make_sampler(self.params), history, text, stats, limit, tag)
        if reuse:
            seq.release = lambda: prompt_cache.keep(cache, history)
        yield seq

    def start(self, tag: Any = None) -> Sequence:
        """`admit` in one go."""
        for seq in self.admit(tag):
            if seq is not None:
                return seq
        raise AssertionError("admit ends with the sequence")


# What a batched request supports; anything else runs each prompt through Model.generate in turn.
SEQUENTIAL_ONLY = ("response_format", "tools", "tool_choice", "logprobs", "top_logprobs", "prompt_logprobs", "draft")


def is_batch(prompt: Any, messages: Any) -> bool:
    """A list of prompts (texts or token-id lists) or a list of conversations (lists of messages)."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
        return True
    conversations = isinstance(messages, (list, tuple)) and bool(messages)
    return conversations and all(isinstance(m, (list, tuple)) for m in messages)


def generate_batch(
    model: Any,
    prompts: list | None = None,
    messages: list | None = None,
    *,
    max_batch: int = MAX_BATCH,
    progress: bool | None = None,
    **kwargs: Any,
) -> list:
    """One GenerationResult per prompt (or conversation), in order, decoded `max_batch` at a time:
    a finished one leaves the batch and the next prompt is prefilled and joins. `progress`: a
    progress bar on stderr (default: for more than `max_batch` prompts)."""
    from tqdm.auto import tqdm

    items = [{"prompt": p} for p in prompts] if prompts is not None else [{"messages": m} for m in messages]
    if any(kwargs.get(k) not in (None, False, 0) for k in SEQUENTIAL_ONLY) or kwargs.get("n", 1) != 1:
        return [model.generate(**item, **kwargs) for item in tqdm(items, disable=not progress, desc="generate")]
    requests = [BatchRequest.make(model, **item, **kwargs) for item in items]  # all checked before decoding
    batch = Batch(model.decoder, requests[0].plan, model.embed_ids, max_batch)
    results = [GenerationResult("", [], "", 0, index=i) for i in range(len(items))]
    pending = list(range(len(items)))
    show = progress if progress is not None else len(items) > max_batch
    with tqdm(total=len(items), desc="generate", unit="prompt", disable=not show) as bar:
        while pending or len(batch):
            while pending and not batch.full:
                i = pending.pop(0)
                batch.add(requests[i].start(tag=i))
            for seq, piece in batch.step():
                result = results[seq.tag]
                result.text += str(piece)
                result.token_ids.extend(piece.token_ids)
                if piece.finish_reason is not None:
                    result.finish_reason, result.prompt_tokens = piece.finish_reason, piece.prompt_tokens
                    result.stats = piece.stats or {}
                    bar.update(1)
    return results
