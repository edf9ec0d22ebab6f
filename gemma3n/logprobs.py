"""Log-probabilities of generated and prompt tokens, from the float32 logits `Model.logits`
returns (log-softmax over the whole vocabulary, before temperature, top-k/p or a grammar's mask:
what the model says, not what the sampler did with it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError

Sampler = Callable[[torch.Tensor, list[int]], int]
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # its text; a piece of a multi-byte character shows U+FFFD, `bytes` has it whole
    bytes: bytes
    logprob: float | None  # None: the prompt's first token, which nothing predicts
    top: list[TokenLogprob] = field(default_factory=list)  # the most likely tokens at this step


class TokenTable:
    """Token ids -> their bytes and text, through llguidance's byte view of the tokenizer (it
    knows how each tokenizer family spells bytes: byte-level BPE, SentencePiece byte fallback)."""

    def __init__(self, byte_tokenizer: Any) -> None:
        self._tok = byte_tokenizer

    def entry(self, token_id: int, logprob: float | None) -> TokenLogprob:
        raw = self._tok.decode_bytes([token_id])
        return TokenLogprob(token_id, raw.decode("utf-8", "replace"), raw, logprob)


def check_top_logprobs(top: Any) -> int:
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InputError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
    return top


def logprob_entries(table: TokenTable, logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For logits [T, V] and the token chosen after each row [T]: their entries with `top`
    alternatives each."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1)).view(-1).tolist()
    alternatives = torch.topk(logp, top, dim=-1) if top else None
    out = []
    for row, (token, value) in enumerate(zip(tokens.tolist(), chosen)):
        entry = table.entry(token, value)
        if alternatives is not None:
            pairs = zip(alternatives.indices[row].tolist(), alternatives.values[row].tolist())
            entry.top = [table.entry(t, v) for t, v in pairs]
        out.append(entry)
    return out


class LogprobRecorder:
    """Wraps a sampler to note each sampled token's entry, from the logits the model produced."""

    def __init__(self, table: TokenTable, top: int) -> None:
        self.table, self.top = table, top
        self.entries: list[TokenLogprob] = []

    def wrap(self, sampler: Sampler) -> Sampler:
        def sample(logits: torch.Tensor, history: list[int]) -> int:
            token = sampler(logits, history)
            self.entries.extend(logprob_entries(self.table, logits.view(1, -1), torch.tensor([token]), self.top))
            return token

        return sample


class PromptScorer:
    """Collects each prompt token's entry from prefill's logits: row p predicts token p + 1, so
    the first token's logprob is None (OpenAI's `null`) and the last row (the first generated
    token) is not the prompt's."""

    def __init__(self, table: TokenTable, prompt_ids: list[int], top: int) -> None:
        self.table, self.ids, self.top = table, torch.tensor(prompt_ids), top
        self.entries: list[TokenLogprob] = [table.entry(prompt_ids[0], None)]

    def __call__(self, logits: torch.Tensor, start: int) -> None:
        """Logits [t, V] of prompt positions start .. start + t - 1."""
        rows = min(logits.shape[0], len(self.ids) - 1 - start)
        if rows > 0:
            targets = self.ids[start + 1 : start + 1 + rows]
            self.entries += logprob_entries(self.table, logits[:rows], targets, self.top)
