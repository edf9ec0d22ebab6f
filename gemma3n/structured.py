"""Structured output: replies constrained to JSON, or to a JSON Schema, while they are decoded.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", ...}) or a pydantic
model class becomes an llguidance grammar; at each step the grammar's token mask removes every
token that cannot continue a valid reply, before sampling. llguidance was chosen over xgrammar and
outlines-core (bench/README.md, "Structured output"): its masks cost microseconds at Gemma's
262k vocabulary, it has no dependencies, and it refuses the JSON Schema keywords it cannot
enforce by name ("Unimplemented keys: ...") where xgrammar silently ignores some of them
(uniqueItems, contains, not, if/then/else) - a reply that looks constrained but is not.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import InputError

Sampler = Callable[[torch.Tensor, list[int]], int]

# Compact JSON, one fixed spelling: ", " and ": " between items, no other whitespace. A small
# model given free whitespace can loop on newlines forever; nothing a client parses needs it.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaError(InputError):
    """A response_format or schema that cannot be enforced; `param` names the request field."""

    def __init__(self, message: str, param: str = "response_format", code: str = "invalid_schema") -> None:
        super().__init__(message)
        self.param, self.code = param, code


def json_schema_of(response_format: Any) -> dict[str, Any] | None:
    """The JSON Schema a reply must match: None for plain text, {"type": "object"} for
    json_object (OpenAI's JSON mode: any object). Takes OpenAI's response_format dict or a
    pydantic model class (what `client.chat.completions.parse` sends as json_schema)."""
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return closed_objects(response_format.model_json_schema())  # strict, as the openai client sends it
    if not isinstance(response_format, dict):
        raise SchemaError(
            f"response_format must be a dict or a pydantic model class, got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise SchemaError("response_format.json_schema must be an object with a 'schema' object")
        # strict or not, the reply is held to the schema: decoding cannot emit anything else.
        # strict (OpenAI: objects list all their keys) also keeps undeclared keys out.
        schema = spec.get("schema") or {}
        return closed_objects(schema) if spec.get("strict") is True else schema
    raise SchemaError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def closed_objects(schema: Any) -> Any:
    """A copy where every object schema that lists `properties` but says nothing of others
    allows no others: narrower, never wider, so a reply still matches the original."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=64)
def _grammar(schema_json: str) -> str:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=JSON_STYLE)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise SchemaError(
            f"response_format: the JSON schema cannot be enforced: {messages[0]} "
            "(constrained decoding covers types, enum/const, anyOf/oneOf/allOf, $ref/$defs, properties, "
            "required, additionalProperties, patternProperties, items/prefixItems, min/max items, lengths "
            "and values, multipleOf, pattern and format; not uniqueItems, contains, not, if/then/else, "
            "propertyNames or dependentRequired)",
            code="unsupported_schema_feature",
        )
    return grammar


def compile_schema(schema: dict[str, Any]) -> str:
    """A JSON Schema -> an llguidance grammar (cached); SchemaError naming what it cannot enforce."""
    try:
        text = json.dumps(schema, allow_nan=False)  # key order kept: properties are written in it
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"response_format: the JSON schema is not JSON: {exc}") from None
    return _grammar(text)


def grammar_for(response_format: Any) -> str | None:
    """response_format (see json_schema_of) -> a grammar, or None for unconstrained text."""
    schema = json_schema_of(response_format)
    return None if schema is None else compile_schema(schema)


@functools.lru_cache(maxsize=4)
def byte_tokenizer(tokenizer_json: str, n_vocab: int, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a tokenizer: every id's bytes, for masks and for log-probability
    token texts. Built once per model (~2 s at a 262k vocabulary). `n_vocab` is the model's
    (logits) width; ids past the tokenizer's own are never allowed."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(eos_ids))


class GrammarConstraint:
    """One reply's grammar state: `mask` removes the tokens the grammar forbids next, `accept`
    advances it by the sampled token. Stop ids are allowed exactly when the reply is complete."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self._matcher.is_error():
            raise SchemaError(f"response_format: {self._matcher.get_error()}")
        self.vocab = tokenizer.vocab_size
        self._bits = torch.zeros((self.vocab + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of float logits [V] with every forbidden token at -inf."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        if self._matcher.is_error():  # a parser or lexer limit: the grammar outgrew what a step may cost
            raise SchemaError(f"response_format: the schema is too complex to enforce: {self._matcher.get_error()}")
        allowed = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")[: logits.shape[-1]]
        forbidden = torch.from_numpy(allowed == 0)
        if len(allowed) < logits.shape[-1]:  # logits wider than the grammar's vocabulary
            forbidden = torch.cat((forbidden, torch.ones(logits.shape[-1] - len(allowed), dtype=torch.bool)))
        return logits.masked_fill(forbidden.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):  # only a token the mask allowed reaches here: a bug
            raise RuntimeError(f"constrained decoding lost its grammar: {self._matcher.get_error()}")


def constrained(sampler: Sampler, constraint: GrammarConstraint) -> Sampler:
    """The sampler, choosing only among the tokens the grammar allows."""

    def sample(logits: torch.Tensor, history: list[int]) -> int:
        token = sampler(constraint.mask(logits.float()), history)
        constraint.accept(token)
        return token

    return sample
