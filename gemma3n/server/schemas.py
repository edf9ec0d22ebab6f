"""Request bodies: parsing (depth, UTF-8, JSON, Unicode) before any model sees them, the pydantic
request models, OpenAI content parts, and errors in OpenAI's `{"error": {...}}` shape."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gemma3n.errors import Gemma3nError, InputError
from gemma3n.inline import decode_base64, decode_data_uri
from gemma3n.logprobs import MAX_TOP_LOGPROBS
from gemma3n.model import MAX_N
from gemma3n.speculative import MAX_K
from gemma3n.structured import SchemaError
from gemma3n.tools import reply_form

log = logging.getLogger("gemma3n.server")

MAX_JSON_DEPTH = 64  # nested arrays/objects in a body; OpenAI requests use under 10, JSON schemas a few more

# ---------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _from_exception(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Gemma3nError):
        return APIError(400, str(exc))
    log.error("generation failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


_NOT_A_NAME = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


def _param(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', dropping pydantic's union tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)) and part not in _NOT_A_NAME:
            out += f".{part}" if out else str(part)
    return out


def _validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    errors = exc.errors()
    parts = [f"{_param(tuple(e['loc'])) or 'body'}: {e['msg']}" for e in errors[:3]]
    first = _param(tuple(errors[0]["loc"])) if errors else None
    return APIError(400, "invalid request: " + "; ".join(parts), param=first or None)


# ---------------------------------------------------------------------------- request bodies

# A JSON string, escapes included; what is left when strings are removed is the body's structure.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_depth(body: bytes) -> int:
    """How deeply a JSON text nests arrays and objects, found without parsing it, so that a
    pathological body is refused before a recursive parser (json, pydantic) ever sees it.
    Brackets inside strings do not count; an unbalanced text counts its unclosed brackets."""
    structure = np.frombuffer(_JSON_STRING.sub(b'""', body), np.uint8)
    if not structure.size:
        return 0
    return max(0, int(np.cumsum(_BRACKET_STEP[structure], dtype=np.int32).max()))


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The request's body, or a 413 as soon as it is known to be larger than `max_bytes`
    (from Content-Length, else while it streams in)."""
    too_big = APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def parse_body(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A request body -> its JSON object, or an APIError (400) that says what is wrong with it:
    nesting deeper than `max_depth`, bytes that are not UTF-8, text that is not JSON (NaN and
    Infinity included), a top level that is not an object, or a string holding a lone UTF-16
    surrogate (a `\\ud800` escape), which is not Unicode text and which no tokenizer can take."""
    depth = json_depth(body)
    if depth > max_depth:
        raise APIError(
            400,
            f"request body nests arrays/objects {depth} levels deep; the limit is {max_depth}",
            code="invalid_json",
        )
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise APIError(
            400,
            f"request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at position {exc.start}",
            code="invalid_json",
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    bad = _first_non_unicode(data)
    if bad is not None:
        where, param = bad
        raise APIError(
            400,
            f"{where} is not valid Unicode text: it holds a lone surrogate (a \\ud800-\\udfff escape "
            "that is not half of a pair)",
            param=param,
            code="invalid_unicode",
        )
    return data


def _first_non_unicode(data: Any) -> tuple[str, str | None] | None:
    """(where, param) of the first string or key in document order that holds a lone surrogate,
    else None. Iterative: the depth is bounded already, but this costs nothing."""
    todo: list[tuple[Any, str]] = [(data, "")]
    while todo:
        value, where = todo.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where, where
        elif isinstance(value, dict):
            for key in value:
                if _SURROGATE.search(key):
                    return f"a key of {where or 'the body'}", where or None
            todo.extend((v, f"{where}.{k}" if where else k) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None


# ---------------------------------------------------------------------------- request models


class _Base(BaseModel):
    # extra: OpenAI clients send fields we do not use. strict: a value of the wrong JSON type is
    # refused (a string or a boolean where a number goes), not coerced. No NaN or infinity.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Base):
    include_usage: bool = False


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Base):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    response_format: ResponseFormat | None = None
    # extensions (speculative decoding, same output): "ngram", a smaller size of the model, or
    # "none" to decode without the server's --draft; draft_k fixes the tokens drafted per check
    draft: str | None = None
    draft_k: int | None = Field(None, ge=1, le=MAX_K)

    def generation_kwargs(self) -> dict[str, Any]:
        """What the model's `stream` gets; options left at their defaults are not passed."""
        kw: dict[str, Any] = {}
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            kw["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s for s in stop):
            kw["stop"] = [s for s in stop if s]
        if self.response_format is not None and self.response_format.type != "text":
            kw["response_format"] = self.response_format.model_dump(exclude_none=True)
        if self.n > 1:
            kw["n"] = self.n
        for name in ("draft", "draft_k"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ToolCallFunction(_Base):
    name: str
    arguments: str


class ToolCall(_Base):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Parts are checked by hand (_convert_part) so that errors name the part and the fix.
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # one call or a list of them is read either way

    def generation_kwargs(self) -> dict[str, Any]:
        kw = super().generation_kwargs()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs:
            kw.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.tools:
            kw["tools"] = self.tools
        if self.tool_choice is not None:
            kw["tool_choice"] = self.tool_choice
        return kw


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # how many alternatives per token
    suffix: str | None = None

    def generation_kwargs(self) -> dict[str, Any]:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it takes echo: true", param="max_tokens")
        kw = super().generation_kwargs()
        if self.max_tokens == 0:
            kw["max_tokens"] = 0
        if self.logprobs is not None:
            kw.update(logprobs=True, top_logprobs=self.logprobs)
        if self.echo:  # the echoed prompt's text and log-probabilities both come from its scored tokens
            kw.update(prompt_logprobs=True, top_logprobs=self.logprobs or 0)
        return kw


def check_reply_form(kwargs: dict[str, Any]) -> None:
    """Schemas and tools are compiled before the request queues (cheap, cached): what cannot be
    served is a 400 naming the field, never a reply that ignores it."""
    try:
        reply_form(None, kwargs.get("response_format"), None, None)
        if kwargs.get("tools") or kwargs.get("tool_choice") is not None:
            reply_form([], None, kwargs.get("tools"), kwargs.get("tool_choice"))
    except SchemaError as exc:
        raise APIError(400, str(exc), param=exc.param, code=exc.code) from None


# ---------------------------------------------------------------------------- content parts


def _b64decode(data: str, param: str) -> bytes:
    try:
        return decode_base64(data, param)
    except InputError as e:
        raise APIError(400, str(e), param=param) from None


def _image_bytes(url: str, param: str) -> bytes:
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a bare path"
        raise APIError(
            400,
            f"{param}: only data: URIs are accepted (got {scheme}); this runtime is offline-first and "
            "never fetches URLs or reads server files; send the image inline as "
            "data:image/png;base64,...",
            param=param,
            code="unsupported_image_url",
        )
    try:
        return decode_data_uri(url, param, "image")
    except InputError as e:
        raise APIError(400, str(e), param=param) from None


def _convert_part(part: dict[str, Any], param: str, model: Any) -> dict[str, Any]:
    """One OpenAI content part -> the runtime's HF-style part (text, image bytes, audio bytes)."""
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{param}.text must be a string", param=f"{param}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        if not getattr(model, "has_vision", False):
            raise APIError(400, f"{param}: this model has no vision tower; it cannot take images", param=param)
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise APIError(400, f"{param}.image_url.url must be a string", param=f"{param}.image_url")
        return {"type": "image", "image": _image_bytes(url.strip(), f"{param}.image_url.url")}
    if kind == "input_audio":
        if not getattr(model, "has_audio", False):
            raise APIError(400, f"{param}: this model has no audio tower; it cannot take audio", param=param)
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise APIError(400, f"{param}.input_audio.data must be a base64 string", param=f"{param}.input_audio")
        fmt = spec.get("format", "wav")
        if fmt not in ("wav", "mp3"):
            raise APIError(400, f"{param}.input_audio.format must be 'wav' or 'mp3', got {fmt!r}", param=param)
        data = spec["data"]
        if data.startswith("data:"):  # tolerate a data: URI where OpenAI expects bare base64
            data = data.partition(",")[2]
        return {"type": "audio", "audio": _b64decode(data, f"{param}.input_audio.data")}
    raise APIError(
        400,
        f"{param}.type {kind!r} is not supported; use text, image_url or input_audio",
        param=f"{param}.type",
    )


def _convert_messages(messages: list[ChatMessage], model: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    calls: set[str] = set()  # ids of the calls earlier assistant turns made
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            content: Any = msg.content or ""
        else:
            content = [_convert_part(part, f"messages[{i}].content[{j}]", model) for j, part in enumerate(msg.content)]
        if role == "system" and len(out) == 1 and out[0]["role"] == "system":
            # Gemma has one system text (prepended to the first user turn): join leading ones.
            out[0]["content"] = f"{_text_of(out[0]['content'])}\n\n{_text_of(content)}"
            continue
        turn: dict[str, Any] = {"role": role, "content": content}
        if msg.tool_calls and role == "assistant":
            turn["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
            calls |= {c.id for c in msg.tool_calls}
        if role == "tool":
            if msg.tool_call_id not in calls:
                raise APIError(
                    400,
                    f"messages[{i}]: a 'tool' message answers an earlier assistant tool call; tool_call_id "
                    f"{msg.tool_call_id!r} is not the id of one",
                    param=f"messages[{i}].role",
                )
            turn["tool_call_id"] = msg.tool_call_id
        out.append(turn)
    return out


def _text_of(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


MAX_PROMPTS = 64  # prompts in one /v1/completions request (a harness's batch)


def _completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one text or token list, or a batch of either."""
    prompt = req.prompt
    batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    if len(batch) > MAX_PROMPTS:
        raise APIError(400, f"got {len(batch)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by Gemma 3n", param="suffix")
    return batch
