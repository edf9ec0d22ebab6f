"""Speculative decoding: a cheap draft proposes k tokens, the target model checks them all in one
forward pass of k + 1 tokens and keeps the longest prefix it agrees with, plus one token of its
own. Decoding one token reads every weight once, and the decode kernels read each weight once for
up to `DECODE_ROWS` tokens (above that the GEMM path runs), so on a model bound by its weight reads
the check costs far less than the tokens it checks; what it costs on this machine is measured as it
runs (bench/README.md, "Speculative decoding").

Drafts:
- a MatFormer size of the loaded weights (`draft="E2B"` inside E4B, a declared size, a custom
  {"ffn", "skip"}): a view that copies nothing, with its own KV cache (caches are per size);
- another loaded model with the same vocabulary (`draft_model=`, e.g. this checkpoint loaded
  again with `quantize="int4"`: a quantized draft for an unquantized target);
- `"ngram"` (prompt lookup): the continuation of the latest earlier occurrence of the last few
  tokens in the prompt and the reply so far. Transcripts, summaries and edits repeat their input.

Exactness (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023). Let p_i be the target's distribution for position i and q_i the draft's, both
from `generate.sampling_distribution`: the same repetition penalty (over the same history: the
prompt, the accepted tokens and the drafted prefix before i), temperature, top-k, min-p and top-p.
Draft token d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected
one is replaced by a sample of the residual r_i = max(0, p_i - q_i) / sum(max(0, p_i - q_i)). Then
for every token x:

    P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(q(y), p(y))) r(x)
         = min(q(x), p(x)) + (sum_y p(y) - min(q(y), p(y))) r(x)
         = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x),

since sum_y max(0, p(y) - q(y)) = 1 - sum_y min(q(y), p(y)) normalises r. So each emitted token
has exactly the target's distribution given the tokens before it; when all k are accepted, one
more is drawn from p_{k+1} (the "bonus" token, from the same forward pass). A deterministic
draft (ngram, or any draft at temperature 0) is the point mass q = delta(d): accepted with
probability p(d), else resampled from p with d removed. At temperature 0 p is the point mass on
the target's argmax, so the accepted tokens are exactly the greedy tokens. The only difference
from decoding without a draft is numerical: the target's logits come from one forward pass over
k + 1 rows instead of k + 1 single-token steps (last-bit differences; a greedy choice between two
logits that tie to ~1e-6 could go the other way). With sampling, the draws differ from decoding
without a draft (the random stream is used differently), and a seed reproduces a text only with a
fixed `draft_k`: the adaptive k follows measured timings.

The cost-aware choice of k (`KChooser`): each round costs k draft steps plus one verification
of k + 1 rows, and yields on average 1 + a + ... + a^k tokens at per-token acceptance a. Both
costs are measured while decoding, and k = 0 (a plain decode step) competes too, so a draft that
does not pay on this model and machine (a small model bound by per-call overhead, where checking
8 rows costs several single-token steps) falls back to plain decoding instead of slowing it down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .cache import Cache
from .decode_step import decode_tokens, fused_step
from .drafts import Drafter, ModelDrafter, NgramDrafter, truncate
from .errors import InputError
from .generate import (
    Dist,
    EmbedFn,
    Prompt,
    SamplingParams,
    StepStats,
    check_logits,
    decode_one,
    draw,
    sampling_distribution,
)
from .matformer import effective_params, format_params
from .text import LayerPlan, TextDecoder

Observer = Callable[[torch.Tensor, int], None]  # (target logits [V], the token emitted from them)

# Drafted tokens per check. The decode kernels take up to 8 rows per weight pass and the GEMM path
# more; on a CPU without bf16 dot products checking 9-16 rows of E2B cost less than 8 rows did
# (bench/README.md, "Speculative decoding").
# The k chooser measures each count it uses, so the limit only bounds a round's wasted work.
MAX_K = 15
NGRAM = "ngram"


# --------------------------------------------------------------------------------------------
# Acceptance (the maths is in the module docstring)
# --------------------------------------------------------------------------------------------


def prob(dist: Dist, token: int) -> float:
    if isinstance(dist, int):
        return 1.0 if token == dist else 0.0
    return float(dist[token])


def residual(p: Dist, q: Dist, gen: torch.Generator) -> int:
    """A sample of max(0, p - q), normalised: what a rejected draft token is replaced with."""
    if isinstance(p, int):
        return p
    if isinstance(q, int):
        rest = p.clone()
        rest[q] = 0
    else:
        rest = (p - q).clamp_(min=0)
    total = float(rest.sum())
    if not total > 0:  # p == q up to rounding: a rejection had probability ~0, and r's limit is p
        return draw(p, gen)
    return int(torch.multinomial(rest / total, 1, generator=gen))


def accept(
    tokens: list[int], drafts: list[Dist], target: Callable[[int], Dist], gen: torch.Generator
) -> tuple[int, int]:
    """(how many drafted `tokens` the target keeps, the token it adds). `drafts[i]` is the
    distribution tokens[i] was drawn from, `target(i)` the target's for the same position
    (target(len(tokens)) the bonus position's), computed only as far as they are needed."""
    for i, (token, q) in enumerate(zip(tokens, drafts)):
        p = target(i)
        p_x, q_x = prob(p, token), prob(q, token)
        # accept with probability min(1, p/q); p >= q accepts without drawing (greedy: no RNG at all)
        if p_x >= q_x or (p_x > 0 and float(torch.rand((), generator=gen)) * q_x < p_x):
            continue
        return i, residual(p, q, gen)
    return len(tokens), draw(target(len(tokens)), gen)


# --------------------------------------------------------------------------------------------
# Choosing k
# --------------------------------------------------------------------------------------------


class KChooser:
    """How many tokens to draft next: fixed, or the k in 0..MAX_K with the most expected tokens
    per second, (1 + a + ... + a^k) / (k * draft_s + verify_s(k + 1)), from the recent acceptance
    rate a and measured costs (k = 0: one plain decode step). A plain-decoding spell is probed
    with a draft round after PROBE_GAP plain steps, the gap doubling while plain stays the best,
    unless no draft could pay even if every drafted token were kept (then it stays plain)."""

    EMA = 0.2  # weight of the newest timing
    DECAY = 0.9  # weight of older rounds in the acceptance counts
    START_K = 4
    PROBE_GAP = 16

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self.accepted, self.rejected = 1.0, 1.0  # prior: a = 0.5
        self.draft_s: float | None = None  # per drafted token
        self.plain_s: float | None = None
        self.verify_s: dict[int, float] = {}  # rows -> seconds
        self.plain_run, self.gap = 0, self.PROBE_GAP

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def choose(self, limit: int) -> int:
        """k for the next round, at most `limit` (the tokens still allowed, less the target's own)."""
        if limit <= 0:
            return 0
        if self.fixed is not None:
            return min(self.fixed, limit)
        if not self.verify_s:  # measure a draft round first, then a plain step
            return min(self.START_K, limit)
        if self.plain_s is None:
            return 0
        rates = [self.expected(k) / self.cost(k) for k in range(min(MAX_K, limit) + 1)]
        best = max(range(len(rates)), key=rates.__getitem__)
        if best > 0:
            self.plain_run, self.gap = 0, self.PROBE_GAP
            return best
        self.plain_run += 1
        ceiling = [(k + 1) / self.cost(k) for k in range(1, len(rates))]  # every drafted token kept
        if self.plain_run < self.gap or max(ceiling, default=0.0) <= rates[0]:
            return 0
        self.plain_run, self.gap = 0, 2 * self.gap  # probe: acceptance and costs may have changed
        return max(range(1, len(rates)), key=rates.__getitem__)

    def expected(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def cost(self, k: int) -> float:
        if k == 0:
            return self.plain_s or 0.0
        return k * (self.draft_s or 0.0) + self._verify(k + 1)

    def _verify(self, rows: int) -> float:
        """Measured seconds for `rows`, else interpolated between measured neighbours (flat beyond)."""
        known = self.verify_s
        if rows in known:
            return known[rows]
        below = max((r for r in known if r < rows), default=None)
        above = min((r for r in known if r > rows), default=None)
        if below is None or above is None:
            return known[above if below is None else below]
        w = (rows - below) / (above - below)
        return (1 - w) * known[below] + w * known[above]

    def observe_round(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.accepted = self.DECAY * self.accepted + accepted
        self.rejected = self.DECAY * self.rejected + (accepted < k)
        self.draft_s = _ema(self.draft_s, draft_s / k, self.EMA)
        self.verify_s[k + 1] = _ema(self.verify_s.get(k + 1), verify_s, self.EMA)

    def observe_plain(self, seconds: float) -> None:
        self.plain_s = _ema(self.plain_s, seconds, self.EMA)


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


# --------------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------------


@dataclass
class SpeculationStats:
    draft: str
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    plain_steps: int = 0  # rounds decoded without a draft (k = 0, or nothing to propose)

    def as_dict(self) -> dict:
        v = self.verifications
        return {
            "draft": self.draft,
            "draft_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "verifications": v,
            "tokens_per_verification": (self.accepted + v) / v if v else 0.0,
            "plain_decode_steps": self.plain_steps,
            "mean_draft_k": self.drafted / v if v else 0.0,
        }


@torch.inference_mode()
def verify_logits(
    decoder: TextDecoder, cache: Cache, plan: LayerPlan, tokens: list[int], embed: EmbedFn | None
) -> torch.Tensor:
    """Float32 logits [len(tokens), V] of `tokens` fed after the cache, appended to it. Every row
    runs through every layer: unlike prefill, the KV-shared layers cannot skip rows here, because
    each row's logits are needed to check the draft token after it."""
    ids = torch.tensor([tokens], device=decoder.device)
    embeds = embed(ids) if embed else None
    step = fused_step(decoder, plan)  # one native call for the k+1 rows, each weight read once
    if step is not None:
        logits = decode_tokens(step, decoder, plan, tokens, cache, embeds)
        if logits is not None:
            return logits
    positions = torch.arange(cache.offset, cache.offset + len(tokens), device=decoder.device)
    hidden = decoder(ids, positions, plan=plan, cache=cache, inputs_embeds=embeds)
    cache.offset += len(tokens)
    return decoder.lm_head(hidden[0]).float()


class SpeculativeDecoder:
    """One continuation: the target's cache after the prompt, a drafter, the sampling flags.
    `round` emits the next tokens: one plain decode step, or a drafted and verified batch."""

    def __init__(
        self,
        target: tuple[TextDecoder, Cache, LayerPlan],
        params: SamplingParams,
        drafter: Drafter,
        chooser: KChooser,
        gen: torch.Generator,
        stats: SpeculationStats,
        embed: EmbedFn | None = None,
    ) -> None:
        self.decoder, self.cache, self.plan = target
        self.params, self.drafter, self.chooser, self.gen, self.stats, self.embed = (
            params,
            drafter,
            chooser,
            gen,
            stats,
            embed,
        )
        self.emitted = 0  # tokens emitted so far (error messages name the generated token)

    def first(self, logits: torch.Tensor, history: list[int]) -> list[tuple[int, torch.Tensor]]:
        """The first generated token, from the prompt's logits."""
        return [(self._choose(logits, history), logits)]

    @torch.inference_mode()
    def round(self, history: list[int], limit: int) -> list[tuple[int, torch.Tensor]]:
        """(token, the target logits it was chosen from) for the tokens after `history`, at most
        `limit` of them. The target's cache then holds all but the last one."""
        k = self.chooser.choose(limit - 1)
        start, setup = time.perf_counter(), self.drafter.setup_s
        tokens, drafts = self.drafter.propose(history, k) if k else ([], [])
        drafted = time.perf_counter()
        start += self.drafter.setup_s - setup  # one-off prefills are not the drafted tokens' price
        if not tokens:
            logits = decode_one(self.decoder, history[-1], self.cache, self.plan, self.embed)
            self.chooser.observe_plain(time.perf_counter() - drafted)
            self.stats.plain_steps += 1
            return [(self._choose(logits, history), logits)]
        rows = verify_logits(self.decoder, self.cache, self.plan, [history[-1], *tokens], self.embed)

        def target(i: int) -> Dist:
            check_logits(rows[i], self.emitted + i)
            return sampling_distribution(rows[i], history + tokens[:i], self.params)

        kept, extra = accept(tokens, drafts, target, self.gen)
        truncate(self.cache, self.cache.offset - len(tokens) + kept)
        self.drafter.rollback(len(history) + kept)
        self.chooser.observe_round(len(tokens), kept, drafted - start, time.perf_counter() - drafted)
        self.stats.drafted += len(tokens)
        self.stats.accepted += kept
        self.stats.verifications += 1
        self.emitted += kept + 1
        return [(t, rows[i]) for i, t in enumerate(tokens[:kept])] + [(extra, rows[kept])]

    def _choose(self, logits: torch.Tensor, history: list[int]) -> int:
        check_logits(logits, self.emitted)
        self.emitted += 1
        return draw(sampling_distribution(logits, history, self.params), self.gen)


def speculative_tokens(
    spec: SpeculativeDecoder,
    logits: torch.Tensor,
    prompt: Prompt,
    *,
    max_tokens: int,
    stats: StepStats,
    observe: Observer | None = None,
) -> Iterator[int]:
    """Like generate.decode_tokens, with drafts: token ids from `logits` (after the prompt in
    the target's cache) on; the caches go back to the prompt's PromptCache however the consumer
    stops. `observe(logits, token)` sees each token before it is yielded (log-probabilities)."""
    max_tokens = min(max_tokens, prompt.room(spec.plan.config))
    history = list(prompt.ids)
    stats.speculation = spec.stats
    t0, t1, count = stats.start or time.perf_counter(), 0.0, 0
    try:
        batch = spec.first(logits, history) if max_tokens > 0 else []
        while batch:
            history += [token for token, _ in batch]  # all first: the cache already holds some of them
            for token, row in batch:
                if observe is not None:
                    observe(row, token)
                now = time.perf_counter()
                if count == 0:
                    stats.prompt_seconds, t1 = now - t0, now
                else:
                    stats.generation_seconds = now - t1
                count += 1
                stats.generated_tokens = count
                yield token
            batch = spec.round(history, max_tokens - count) if count < max_tokens else []
    finally:  # also when the consumer stops early (a stop string, a closed stream)
        spec.drafter.finish(history)
        if prompt.reuses_cache:
            prompt.prompt_cache.keep(spec.cache, history)


# --------------------------------------------------------------------------------------------
# The request: what drafts, validated before any work
# --------------------------------------------------------------------------------------------


@dataclass
class Drafting:
    """A validated draft: `decoder`/`plan` None for prompt lookup; `k` None adapts it."""

    name: str
    k: int | None = None
    decoder: TextDecoder | None = None
    plan: LayerPlan | None = None
    embed: EmbedFn | None = None

    def tokens(
        self,
        target: tuple[TextDecoder, Cache, LayerPlan],
        logits: torch.Tensor,
        params: SamplingParams,
        prompt: Prompt,
        *,
        max_tokens: int,
        stats: StepStats,
        embed: EmbedFn | None = None,
        observe: Observer | None = None,
    ) -> Iterator[int]:
        """The continuation's token ids (see `speculative_tokens`)."""
        gen = torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
        spec = SpeculativeDecoder(
            target, params, self.drafter(prompt, params, gen), KChooser(self.k), gen, SpeculationStats(self.name), embed
        )
        return speculative_tokens(spec, logits, prompt, max_tokens=max_tokens, stats=stats, observe=observe)

    def drafter(self, prompt: Prompt, params: SamplingParams, gen: torch.Generator) -> Drafter:
        if self.decoder is None:
            return NgramDrafter()
        if prompt.inputs_embeds is not None and prompt.inputs_embeds.shape[-1] != self.decoder.config.hidden_size:
            raise InputError(
                f"the draft model's hidden size ({self.decoder.config.hidden_size}) differs from the target's "
                f"({prompt.inputs_embeds.shape[-1]}): it cannot take this multimodal prompt's embeddings"
            )
        return ModelDrafter(self.decoder, self.plan, prompt, params, gen, self.embed)


def check_draft_k(k: Any) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InputError(f"draft_k must be None (adaptive) or an integer in [1, {MAX_K}], got {k!r}")
    return k


def drafting(model: Any, plan: LayerPlan, draft: Any, draft_k: Any = None, draft_model: Any = None) -> Drafting | None:
    """The draft a request asks for, checked against the model and the size it runs (`plan`);
    None without one. `draft`: "ngram", or a size of `draft_model` (default: the model itself,
    where it must be smaller than `plan`); `draft_model`: another loaded model with the same
    vocabulary (its full size unless `draft` names one)."""
    k = check_draft_k(draft_k)
    if draft is None and draft_model is None:
        if k is not None:
            raise InputError("draft_k sets how many tokens a draft proposes: it needs draft (a size or 'ngram')")
        return None
    if isinstance(draft, str) and draft.strip().lower() == NGRAM:
        if draft_model is not None:
            raise InputError("draft='ngram' drafts from the prompt's own tokens: it takes no draft_model")
        return Drafting(NGRAM, k)
    source = model if draft_model is None else draft_model
    if source is not model:
        _check_compatible(model, source)
    draft_plan = source.plan(draft)
    if source is model:
        _check_smaller(draft, draft_plan, plan)
    name = draft if isinstance(draft, str) else (draft_plan.spec.name if draft_plan.spec else "full")
    if source is not model:
        name = f"{source.name}" + (f":{name}" if draft is not None else "")
    return Drafting(name, k, source.decoder, draft_plan, source.embed_ids)


def _check_smaller(draft: Any, draft_plan: LayerPlan, plan: LayerPlan) -> None:
    """A MatFormer draft must cost less than the size it drafts for, or it only adds work."""
    ours, theirs = effective_params(draft_plan.config), effective_params(plan.config)
    if draft_plan.spec == plan.spec or ours >= theirs:
        raise InputError(
            f"draft size {draft!r} ({format_params(ours)} effective parameters) is not smaller than the size "
            f"it drafts for ({format_params(theirs)}); pick a smaller size (model.sizes() lists them) or 'ngram'"
        )


def _check_compatible(model: Any, draft_model: Any) -> None:
    """A separate draft model must speak the same token ids."""
    ours, theirs = model.config.text.vocab_size, draft_model.config.text.vocab_size
    if ours != theirs or model.tokenizer.vocab_size != draft_model.tokenizer.vocab_size:
        raise InputError(
            f"draft_model has another vocabulary ({theirs} ids vs {ours}): a draft must use the target's tokenizer"
        )
    if draft_model.decoder.device != model.decoder.device:
        raise InputError(
            f"draft_model is on {draft_model.decoder.device} but the model on {model.decoder.device}: load both "
            "on the same device"
        )
