"""Generation in three layers, as mlx-lm does it: `generate_step` yields token ids (chunked prefill
with the shared-layer skip, then decode), `stream_generate` turns them into text pieces
(detokenizing, stop strings, finish_reason, timings), and the model's `generate` joins them.
"""

from __future__ import annotations

import math
import numbers
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import Cache, PromptCache
from .decode_step import decode_token, fused_step
from .errors import CheckpointError, ConfigError, InputError
from .text import LayerPlan, TextDecoder
from .tokenizer import StreamingDetokenizer, Tokenizer, check_text

Sampler = Callable[[torch.Tensor, list[int]], int]
EmbedFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # ids -> h0, or None for plain text
ScoreFn = Callable[[torch.Tensor, int], None]  # prompt logits [t, V], their first position
SCORE_ROWS = 64  # prompt rows whose logits exist at once when scoring (E2B: 64 MiB of fp32)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Types and ranges, as InputError naming the parameter (NaN and infinities included:
        a NaN compares false with every bound, so ranges alone would let it through)."""
        for name, value in self.__dict__.items():
            check = _SAMPLING_RULES[name]
            if not check(value):
                raise InputError(f"{name} must be {_SAMPLING_HELP[name]}, got {value!r}")


def _real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# torch.Generator.manual_seed takes [-2**63, 2**64)
_SAMPLING_RULES: dict[str, Callable[[Any], bool]] = {
    "temperature": lambda x: _real(x) and x >= 0,
    "top_k": lambda x: _integer(x) and x >= 0,
    "top_p": lambda x: _real(x) and 0 < x <= 1,
    "min_p": lambda x: _real(x) and 0 <= x < 1,
    "repetition_penalty": lambda x: _real(x) and x > 0,
    "seed": lambda x: x is None or (_integer(x) and -(2**63) <= x < 2**64),
}
_SAMPLING_HELP = {
    "temperature": "a finite number >= 0 (0 = greedy)",
    "top_k": "an integer >= 0 (0 disables it)",
    "top_p": "a number in (0, 1]",
    "min_p": "a number in [0, 1)",
    "repetition_penalty": "a finite number > 0",
    "seed": "an integer in [-2**63, 2**64) or None",
}


def sampling_params(
    generation_config: dict,
    *,
    temperature: Any = None,
    top_p: Any = None,
    top_k: Any = None,
    min_p: Any = 0.0,
    repetition_penalty: Any = 1.0,
    seed: Any = None,
) -> SamplingParams:
    """The caller's values, else the checkpoint's generation_config.json, else the defaults;
    validated. A bad value the caller gave is an InputError, one from the file a ConfigError."""
    gc = generation_config
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    from_file = {
        "temperature": gc.get("temperature") if gc.get("do_sample", True) else 0.0,
        "top_p": gc.get("top_p"),
        "top_k": gc.get("top_k"),
    }
    for name, value in from_file.items():
        if given[name] is None and value is not None and not _SAMPLING_RULES[name](value):
            raise ConfigError(f"generation_config.json: {name} must be {_SAMPLING_HELP[name]}, got {value!r}")
    pick = {k: given[k] if given[k] is not None else from_file[k] for k in given}
    params = SamplingParams(
        temperature=_or(pick["temperature"], 1.0),
        top_k=_or(pick["top_k"], 0),
        top_p=_or(pick["top_p"], 1.0),
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    params.validate()
    return params


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def check_max_tokens(max_tokens: Any) -> int:
    if not _integer(max_tokens) or max_tokens < 1:
        raise InputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return int(max_tokens)


def check_stops(stop: Any) -> list[str]:
    """`stop`: None, a string or a list of strings -> the list (each valid Unicode)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise InputError(f"stop strings must be str, got {s!r}")
        check_text(s, f"stop string {i + 1}")
    return stops


def make_sampler(p: SamplingParams) -> Sampler:
    """A closure over the sampling flags: float32 logits [V] and the history -> next token."""
    p.validate()
    gen = torch.Generator()
    gen.manual_seed(p.seed if p.seed is not None else int(time.time_ns() % 2**63))

    @torch.inference_mode()
    def sample(logits: torch.Tensor, history: list[int]) -> int:
        dist = sampling_distribution(logits, history, p)
        return draw(dist, gen)

    return sample


Dist = torch.Tensor | int  # probabilities [V] summing to 1, or the one token a point mass is on


def draw(dist: Dist, gen: torch.Generator | None) -> int:
    """A token from `dist` (a point mass gives its token without using the generator)."""
    return dist if isinstance(dist, int) else int(torch.multinomial(dist, 1, generator=gen))


@torch.inference_mode()
def sampling_distribution(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor | int:
    """What the sampler draws the next token from: float32 probabilities [V] summing to 1 after
    the repetition penalty, temperature, top-k, min-p and top-p, or a token id where the choice
    is certain (temperature 0, or every candidate underflowed). Speculative decoding applies the
    same function to the draft's and the target's logits, so both distributions are transformed
    alike (speculative.py)."""
    logits = logits.float().cpu().clone()  # edited in place below: never the caller's tensor
    if p.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0:
        return int(torch.argmax(logits))
    # shifted so that the best logit is 0 before dividing: a tiny temperature gives -inf for
    # the others (exp = 0), never inf - inf = NaN
    logits = (logits - logits.max()) / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    total = probs.sum()
    if not bool(torch.isfinite(total)) or total <= 0:  # every candidate underflowed: the best one
        return int(torch.argmax(logits))
    return probs / total


@dataclass
class StepStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # taken from a PromptCache, not prefilled
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    start: float = 0.0  # perf_counter() when the prompt's prefill began
    speculation: Any = None  # speculative.SpeculationStats when a draft runs: its figures join as_dict()

    def as_dict(self) -> dict:
        out = {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_s": self.prompt_seconds,
            "prompt_tps": (self.prompt_tokens - self.cached_prompt_tokens) / self.prompt_seconds
            if self.prompt_seconds
            else 0.0,
            "generation_tps": (self.generated_tokens - 1) / self.generation_seconds
            if self.generation_seconds and self.generated_tokens > 1
            else 0.0,
            "peak_memory_gb": peak_memory_gb(),
        }
        return out if self.speculation is None else out | self.speculation.as_dict()


def peak_memory_gb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.inference_mode()
def prefill(
    decoder: TextDecoder,
    ids: torch.Tensor,
    cache: Cache,
    plan: LayerPlan,
    *,
    inputs_embeds: torch.Tensor | None = None,
    chunk_size: int = 512,
    skip_shared: bool = True,
    score: ScoreFn | None = None,
) -> torch.Tensor:
    """Run the prompt [1, T] through the model in chunks; return the last token's logits [V].

    With `skip_shared`, KV-shared layers run only on the last prompt token: they write
    no cache, so their outputs at other positions are never observed. Exact by construction
    (docs/text-decoder.md#prefill-skip).
    `score(logits [t, V], first position)` receives every prompt position's float32 logits (the
    shared layers then run on every row), a block of rows at a time to bound the memory.
    """
    total = ids.shape[1]
    hidden = None
    skip_shared = skip_shared and score is None
    for start in range(0, total, chunk_size):
        end = min(start + chunk_size, total)
        last_chunk = end == total
        positions = torch.arange(cache.offset, cache.offset + end - start, device=ids.device)
        rows = None
        if skip_shared:
            rows = torch.tensor([end - start - 1] if last_chunk else [], dtype=torch.long, device=ids.device)
        embeds = inputs_embeds[:, start:end] if inputs_embeds is not None else None
        hidden = decoder(ids[:, start:end], positions, plan=plan, cache=cache, inputs_embeds=embeds, out_rows=rows)
        cache.offset += end - start
        if score is not None:
            for row in range(0, end - start, SCORE_ROWS):
                score(decoder.lm_head(hidden[0, row : row + SCORE_ROWS]).float(), start + row)
    return decoder.lm_head(hidden[:, -1]).float()[0]


@torch.inference_mode()
def decode_one(
    decoder: TextDecoder,
    token: int,
    cache: Cache,
    plan: LayerPlan,
    embed: EmbedFn | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """One generated token through the model; `embed` gives ids of the media vocabularies their
    hard embeddings (the model's multimodal embedders), as the prompt's ids got them. `fused`:
    through the native one-call step (decode_step.py) where it applies, else the Python forward."""
    ids = torch.tensor([[token]], device=decoder.device)
    embeds = embed(ids) if embed else None
    step = fused_step(decoder, plan) if fused else None
    if step is not None:
        logits = decode_token(step, decoder, plan, token, cache, embeds)
        if logits is not None:
            return logits
    positions = torch.tensor([cache.offset], device=decoder.device)
    hidden = decoder(ids, positions, plan=plan, cache=cache, inputs_embeds=embeds)
    cache.offset += 1
    return decoder.lm_head(hidden[:, -1]).float()[0]


def generate_step(
    decoder: TextDecoder,
    prompt_ids: list[int],
    plan: LayerPlan,
    sampler: Sampler,
    *,
    max_tokens: int,
    inputs_embeds: torch.Tensor | None = None,
    prefill_chunk: int = 512,
    skip_shared: bool = True,
    stats: StepStats | None = None,
    embed: EmbedFn | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[int]:
    """Yield generated token ids, one at a time; the caller decides when to stop. With a
    `prompt_cache`, a text prompt continues from the cache of the previous call where their
    tokens agree, and leaves its own cache there for the next one."""
    stats = stats if stats is not None else StepStats()
    prompt = Prompt(prompt_ids, inputs_embeds, prefill_chunk, skip_shared, prompt_cache)
    cache, logits = prefill_prompt(decoder, prompt, plan, stats)
    yield from decode_tokens(
        decoder, cache, logits, plan, sampler, prompt, max_tokens=max_tokens, stats=stats, embed=embed
    )


@dataclass
class Prompt:
    """A prompt and how to prefill it (see `prefill`); `score` gets its tokens' logits."""

    ids: list[int]
    inputs_embeds: torch.Tensor | None = None
    chunk: int = 512
    skip_shared: bool = True
    prompt_cache: PromptCache | None = None
    score: ScoreFn | None = None

    def room(self, config: Any) -> int:
        """Tokens that fit after the prompt in the context; an InputError if none does."""
        context = config.max_position_embeddings
        if len(self.ids) >= context:
            raise InputError(
                f"the prompt has {len(self.ids)} tokens but the model's context is {context} tokens; "
                "shorten the prompt (it is never truncated silently)"
            )
        return context - len(self.ids)

    @property
    def reuses_cache(self) -> bool:
        # soft tokens depend on the media, not on the ids, and scoring needs every position's logits
        return self.prompt_cache is not None and self.inputs_embeds is None and self.score is None


def prefill_prompt(
    decoder: TextDecoder, prompt: Prompt, plan: LayerPlan, stats: StepStats
) -> tuple[Cache, torch.Tensor]:
    """The prompt through the model: its cache and the logits [V] for the first new token."""
    prompt.room(plan.config)
    done = 0
    if prompt.reuses_cache:
        cache, done = prompt.prompt_cache.take(plan.config, plan.spec, prompt.ids)
    else:
        if prompt.prompt_cache is not None:  # nothing to reuse or keep for this prompt
            prompt.prompt_cache.release(prompt.ids)
        cache = Cache(plan.config, plan.spec)
    ids = torch.tensor([prompt.ids[done:]], device=decoder.device)
    stats.start = time.perf_counter()
    logits = prefill(
        decoder,
        ids,
        cache,
        plan,
        inputs_embeds=prompt.inputs_embeds,
        chunk_size=prompt.chunk,
        skip_shared=prompt.skip_shared,
        score=prompt.score,
    )
    stats.prompt_tokens, stats.cached_prompt_tokens = len(prompt.ids), done
    return cache, logits


def decode_tokens(
    decoder: TextDecoder,
    cache: Cache,
    logits: torch.Tensor,
    plan: LayerPlan,
    sampler: Sampler,
    prompt: Prompt,
    *,
    max_tokens: int,
    stats: StepStats,
    embed: EmbedFn | None = None,
) -> Iterator[int]:
    """Sample from `logits` (after the prompt in `cache`) and decode, one token at a time; the
    cache goes back to the prompt's PromptCache at the end, however the consumer stops."""
    max_tokens = min(max_tokens, prompt.room(plan.config))
    history = list(prompt.ids)
    t0 = stats.start or time.perf_counter()
    try:
        for i in range(max_tokens):
            check_logits(logits, i)
            token = sampler(logits, history)
            if i == 0:
                stats.prompt_seconds = time.perf_counter() - t0
                t1 = time.perf_counter()
            else:
                stats.generation_seconds = time.perf_counter() - t1
            stats.generated_tokens = i + 1
            history.append(token)
            yield token
            if i + 1 < max_tokens:
                logits = decode_one(decoder, token, cache, plan, embed)
    finally:  # also when the consumer stops early (a stop string, a closed stream)
        if prompt.reuses_cache:
            prompt.prompt_cache.keep(cache, history)


def check_logits(logits: torch.Tensor, step: int | None = None) -> None:
    """Non-finite logits (NaN / infinity) cannot be sampled from: greedy would pick an arbitrary
    token (NaN is the argmax) and sampling fail inside torch. Say so instead. `step`: the
    generated token they were for (None: a forward pass over given ids, Model.logits)."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        where = f"at generated token {step + 1}" if step is not None else "for the given input ids"
        raise CheckpointError(
            f"the model produced non-finite logits ({bad} of {logits.numel()} are NaN or infinite) "
            f"{where}: the checkpoint's weights hold NaN/inf values, or the compute "
            "dtype overflows (try --dtype float32)"
        )


@dataclass
class TextPiece:
    """A piece of generated text (`str(piece)` is the text); the last piece of a continuation
    carries `finish_reason` and `stats`."""

    text: str
    token_ids: list[int] = field(default_factory=list)  # the tokens this text came from
    finish_reason: str | None = None
    logprobs: list | None = None  # TokenLogprob of each of token_ids, when asked for
    choice: int = 0  # which of n continuations it belongs to
    prompt_logprobs: list | None = None  # on a continuation's first piece, when asked for
    prompt_tokens: int = 0
    generated_tokens: int = 0
    stats: dict | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: dict = field(default_factory=dict)
    logprobs: list | None = None  # TokenLogprob per generated token (logprobs=True)
    prompt_logprobs: list | None = None  # per prompt token, the first's logprob None (prompt_logprobs=True)
    tool_calls: list[dict] | None = None  # OpenAI-shaped calls parsed from the reply (tools=...)
    index: int = 0


class TextStream:
    """Tokens in, text pieces out, for one continuation: detokenizing, holding back what could
    still grow into a stop string, stopping on EOS/<end_of_turn>, a stop string or max_tokens.
    `push` takes one token (and returns a piece when there is text safe to emit); once `done`,
    `close` gives the last piece, with finish_reason and stats."""

    def __init__(
        self, tokenizer: Tokenizer, *, stop_ids: set[int], stop: list[str] | None, max_tokens: int, stats: StepStats
    ) -> None:
        self.stop_ids, self.max_tokens, self.stats = stop_ids, max_tokens, stats
        self.stops = [s for s in (stop or []) if s]
        self.detok = StreamingDetokenizer(tokenizer)
        self.text, self.emitted, self.finish, self.count = "", 0, "length", 0
        self.ids: list[int] = []
        self.done = self.by_string = False

    def _piece(self, upto: int, **attrs) -> TextPiece:
        return TextPiece(
            self.text[self.emitted : upto],
            token_ids=list(self.ids),
            prompt_tokens=self.stats.prompt_tokens,
            generated_tokens=self.count,
            **attrs,
        )

    def push(self, token: int) -> TextPiece | None:
        self.count += 1
        if token in self.stop_ids:
            self.finish, self.done = "stop", True
            return None
        self.ids.append(token)
        self.text += self.detok.add(token)
        hit = _find_stop(self.text, self.stops, self.emitted)
        if hit is not None:
            self.text, self.finish, self.by_string, self.done = self.text[:hit], "stop", True, True
            return None
        piece = None
        safe = len(self.text) - _held_back(self.text, self.stops)
        if safe > self.emitted:
            piece = self._piece(safe)
            self.emitted, self.ids = safe, []
        self.done = self.count >= self.max_tokens
        return piece

    def close(self) -> TextPiece:
        if not self.by_string:  # the last token may complete a character or a stop string
            self.text += self.detok.flush()
            hit = _find_stop(self.text, self.stops, self.emitted)
            if hit is not None:
                self.text, self.finish = self.text[:hit], "stop"
        return self._piece(len(self.text), finish_reason=self.finish, stats=self.stats.as_dict())


def stream_generate(
    tokens: Iterator[int],
    tokenizer: Tokenizer,
    *,
    stop_ids: set[int],
    stop: list[str] | None,
    max_tokens: int,
    stats: StepStats,
) -> Iterator[TextPiece]:
    """Detokenize a token stream (a `TextStream` over it); stop on EOS/<end_of_turn>, a stop
    string or max_tokens."""
    text = TextStream(tokenizer, stop_ids=stop_ids, stop=stop, max_tokens=max_tokens, stats=stats)
    try:
        for token in tokens:
            piece = text.push(token)
            if piece is not None:
                yield piece
            if text.done:
                break
        yield text.close()
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, max(0, emitted - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
