"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

The server knows no tensors: it turns OpenAI requests into `model.stream(...)` calls and the
text pieces back into OpenAI responses or server-sent events. The model is not thread-safe,
so every generation runs on one worker thread; requests wait their turn in a bounded queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemma3n.cache import PromptCache
from gemma3n.errors import Gemma3nError

log = logging.getLogger("gemma3n.server")

DEFAULT_MAX_QUEUE = 32  # requests admitted at once: the one generating plus those waiting
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # room for a few base64 images / 12 min of 16 kHz 16-bit wav
MAX_JSON_DEPTH = 64  # nested arrays/objects in a body; OpenAI requests use under 10, JSON schemas a few more
DEFAULT_PROMPT_CACHE_SLOTS = 4  # conversations whose K/V is kept between requests (memory: one K/V each)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_POLL_S = 0.25  # how often a waiting request checks whether its client went away


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
    n: int | None = 1
    logprobs: bool | int | None = None
    tools: list[Any] | None = None
    response_format: ResponseFormat | None = None

    def generation_kwargs(self) -> dict[str, Any]:
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(
                400,
                f"response_format {self.response_format.type!r} is not implemented yet: this server cannot "
                "constrain a reply to JSON, and will not pretend to; send response_format {'type': 'text'} or none",
                param="response_format",
                code="unsupported_response_format",
            )
        if self.n not in (None, 1):
            raise APIError(400, f"n={self.n} is not supported; this server returns one choice (n=1)", param="n")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        if self.tools:
            raise APIError(400, "tools (function calling) are not supported by this server", param="tools")
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
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant"]
    # Parts are checked by hand (_convert_part) so that errors name the part and the fix.
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


# ---------------------------------------------------------------------------- content parts


def _b64decode(data: str, param: str) -> bytes:
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"{param} is not valid base64: {exc}", param=param) from None
    if not raw:
        raise APIError(400, f"{param} is empty", param=param)
    return raw


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
    header, sep, data = url[5:].partition(",")
    mediatype = header.split(";")[0]
    if not sep or ";base64" not in header:
        raise APIError(400, f"{param}: the data: URI must be base64 (data:image/png;base64,...)", param=param)
    if mediatype and not mediatype.startswith("image/"):
        raise APIError(400, f"{param}: media type {mediatype!r} is not an image", param=param)
    return _b64decode(data, param)


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
        out.append({"role": role, "content": content})
    return out


def _text_of(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _completion_prompt(req: CompletionRequest) -> str | list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"got {len(prompt)} prompts; this server takes one per request", param="prompt")
        prompt = prompt[0]
    if req.echo or req.suffix:
        raise APIError(400, "echo and suffix are not supported", param="echo" if req.echo else "suffix")
    return prompt


# ---------------------------------------------------------------------------- generation worker


_END = object()


class _Job:
    """One generation: the worker thread emits pieces into an asyncio queue on the server loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server loop is gone (shutdown); nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class _Engine:
    """A single generation thread in front of a non-thread-safe model, with a bounded queue."""

    def __init__(self, model: Any, max_queue: int, prompt_cache_slots: int, prompt_cache_bytes: int | None) -> None:
        self.model, self.max_queue = model, max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma3n-generate")
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()
        # Recent requests' K/V, used only by the worker thread: a follow-up turn that re-sends its
        # conversation prefills just its new tokens (exact: reuse needs identical tokens).
        self._prompt_cache = PromptCache(prompt_cache_slots, prompt_cache_bytes) if prompt_cache_slots else None

    @property
    def admitted(self) -> int:
        return len(self._jobs)

    def submit(self, kwargs: dict[str, Any]) -> _Job:
        job = _Job(asyncio.get_running_loop())
        with self._lock:
            if len(self._jobs) >= self.max_queue:
                raise APIError(
                    503,
                    f"server busy: {len(self._jobs)} requests queued (max {self.max_queue}); retry later",
                    type="server_error",
                    code="server_busy",
                )
            self._jobs.add(job)
        self._executor.submit(self._run, job, kwargs)
        return job

    def _run(self, job: _Job, kwargs: dict[str, Any]) -> None:
        try:
            if job.cancelled.is_set():  # its client left while it waited
                return
            pieces = self.model.stream(**kwargs, prompt_cache=self._prompt_cache)
            try:
                for piece in pieces:
                    job.emit(piece)
                    if job.cancelled.is_set():
                        break
            finally:
                pieces.close()  # stops generation early when the client went away
        except Exception as exc:
            job.emit(exc)
        finally:
            with self._lock:  # free the slot before the client hears the end
                self._jobs.discard(job)
            job.emit(_END)

    def close(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class _ClientGone(Exception):
    pass


async def _next_event(job: _Job, request: Request) -> Any:
    """The job's next event; while waiting, notice a client that disconnected and cancel its job."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), _POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise _ClientGone from None


class _JobStream(StreamingResponse):
    """SSE response that cancels its job however the response ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[str], job: _Job) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},  # reused from an earlier request
    }


class _Tally:
    """What the pieces say about the whole generation: finish reason and token counts."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0

    def add(self, piece: str) -> None:
        self.prompt_tokens = getattr(piece, "prompt_tokens", None) or self.prompt_tokens
        self.completion_tokens = getattr(piece, "generated_tokens", None) or self.completion_tokens
        self.finish_reason = getattr(piece, "finish_reason", None) or self.finish_reason
        stats = getattr(piece, "stats", None)
        if stats:
            self.cached_tokens = stats.get("cached_prompt_tokens", 0)

    def usage(self) -> dict[str, Any]:
        return _usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


# ---------------------------------------------------------------------------- the app


def _model_ids(model: Any, model_id: str | None, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Model id -> size for `model.stream(size=...)` (None: as loaded). Preset sizes get
    'gemma3n-<size>' ids; `extra` adds ids for custom slices ({"ffn": [...], "skip": [...]})."""
    ids: dict[str, Any] = {model_id or getattr(model, "name", None) or "gemma3n": None}
    for size in model.sizes() if hasattr(model, "sizes") else []:
        ids.setdefault(size if size.lower().startswith("gemma3n") else f"gemma3n-{size}", size)
    ids.update(extra or {})
    return ids


def create_app(
    model: Any,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    prompt_cache_slots: int = DEFAULT_PROMPT_CACHE_SLOTS,
    prompt_cache_bytes: int | None = None,
    model_id: str | None = None,
    sizes: Mapping[str, Any] | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `model` (a `gemma3n.load()` result or any object with
    `stream`, `sizes`, `name`, `has_audio`, `has_vision`). Every elastic size is its own model id;
    `sizes` adds custom ones, e.g. {"gemma3n-half": {"ffn": [4096] * 35}}. `allowed_hosts`, if
    given, is the set of Host header names answered (a loopback server's defence against DNS
    rebinding, where a web page's own domain is pointed at 127.0.0.1). `prompt_cache_slots`
    conversations keep their K/V between requests (0: none; at most `prompt_cache_bytes` in all,
    if given), see `gemma3n.PromptCache`; clients
    can tell from `cached_tokens` or latency that a prefix was sent recently, so use 0 where they
    must not learn about each other."""
    ids = _model_ids(model, model_id, sizes)
    default_id = next(iter(ids))
    aliases = {size: mid for mid, size in ids.items() if isinstance(size, str)}  # "E2B" -> "gemma3n-E2B"
    created = int(time.time())
    if prompt_cache_slots < 0:
        raise ValueError(f"prompt_cache_slots must be >= 0, not {prompt_cache_slots}")
    if prompt_cache_bytes is not None and prompt_cache_bytes < 0:
        raise ValueError(f"prompt_cache_bytes must be >= 0, not {prompt_cache_bytes}")
    engine = _Engine(model, max_queue, prompt_cache_slots, prompt_cache_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    def check_host(request: Request) -> None:
        if allowed_hosts is None:
            return
        host = request.headers.get("host", "")
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        if name.lower() not in allowed_hosts:
            raise APIError(400, f"Host {host!r} is not served here (allowed: {', '.join(allowed_hosts)})")

    app = FastAPI(
        title="gemma3n",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        dependencies=[Depends(check_host)],
    )
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def read_json(request: Request, schema: type[_Sampling]) -> Any:
        too_big = APIError(413, f"request body is larger than {max_body_bytes} bytes", code="request_too_large")
        # JSON only: a web page can send a cross-site "simple" POST (text/plain) to a loopback
        # server without a CORS preflight; requiring application/json rules that out.
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(
                415,
                f"Content-Type must be application/json, got {media or 'none'}",
                code="unsupported_media_type",
            )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_big
        data = parse_body(bytes(body))
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def resolve(name: str | None) -> tuple[str, Any]:
        if not name:
            return default_id, None
        if name in ids:
            return name, ids[name]
        if name in aliases:  # a bare size name, e.g. "E2B"
            return name, name
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server has: {', '.join(ids)}",
            param="model",
            code="model_not_found",
        )

    async def run(
        request: Request, req: _Sampling, gen_kwargs: dict[str, Any], kind: Literal["chat", "text"]
    ) -> Response:
        model_name, size = resolve(req.model)
        gen_kwargs.update(req.generation_kwargs())
        if size is not None:
            gen_kwargs["size"] = size
        job = engine.submit(gen_kwargs)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        stamp = int(time.time())
        tally, text, streaming = _Tally(), [], False
        try:
            event = await _next_event(job, request)  # errors in the prompt surface here, as a 400
            if isinstance(event, BaseException):
                raise _from_exception(event)
            if req.stream:
                streaming = True  # from here the response owns the job
                return _JobStream(_stream(job, event, rid, stamp, model_name, kind, req.include_usage), job)
            while event is not _END:
                if isinstance(event, BaseException):
                    raise _from_exception(event)
                tally.add(event)
                text.append(str(event))
                event = await _next_event(job, request)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:  # done, failed, or this handler was cancelled: stop generating
                job.cancel()
        finish = tally.finish_reason or "stop"
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": "".join(text)}
            obj = "text_completion"
        choice.update(logprobs=None, finish_reason=finish)
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": stamp,
                "model": model_name,
                "choices": [choice],
                "usage": tally.usage(),
            }
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": default_id, "queued": engine.admitted, "max_queue": max_queue}

    def model_card(mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": created, "owned_by": "gemma3n"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(mid) for mid in ids]}

    @app.get("/v1/models/{mid:path}", dependencies=[Depends(authorize)])
    async def get_model(mid: str) -> dict[str, Any]:
        return model_card(resolve(mid)[0])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        req = await read_json(request, ChatCompletionRequest)
        return await run(request, req, {"messages": _convert_messages(req.messages, model)}, "chat")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        req = await read_json(request, CompletionRequest)
        return await run(request, req, {"prompt": _completion_prompt(req)}, "text")

    return app


async def _stream(
    job: _Job, first: Any, rid: str, stamp: int, model_name: str, kind: str, include_usage: bool
) -> AsyncIterator[str]:
    """SSE framed as OpenAI does: (chat: a role chunk), content chunks, a finish_reason chunk,
    an optional usage chunk with no choices, then `data: [DONE]`."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        out: dict[str, Any] = {
            "id": rid,
            "object": obj,
            "created": stamp,
            "model": model_name,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = usage
        return _sse(out)

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    tally = _Tally()
    try:
        if kind == "chat":
            yield chunk([choice("", None, role=True)])
        event = first
        while event is not _END:
            if isinstance(event, BaseException):
                raise event
            tally.add(event)
            if event:
                yield chunk([choice(str(event), None)])
            event = await job.events.get()  # a disconnect cancels this task (and _JobStream the job)
        yield chunk([choice(None, tally.finish_reason or "stop")])
        if include_usage:
            yield chunk([], tally.usage())
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        yield _sse(_from_exception(exc).body())
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------- running it


def serve(
    model: Any = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    prompt_cache_slots: int = DEFAULT_PROMPT_CACHE_SLOTS,
    prompt_cache_bytes: int | None = None,
    model_id: str | None = None,
    sizes: Mapping[str, Any] | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted. `model` is a loaded model, or a path / hub id (None: embedded)."""
    import uvicorn

    if model is None or isinstance(model, str):
        import gemma3n

        model = gemma3n.load(model)
    loopback = host in LOOPBACK_HOSTS
    if not loopback and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this host can use it", host)
    limits = {
        "max_queue": max_queue,
        "max_body_bytes": max_body_bytes,
        "prompt_cache_slots": prompt_cache_slots,
        "prompt_cache_bytes": prompt_cache_bytes,
    }
    hosts = LOOPBACK_HOSTS if loopback else None
    app = create_app(model, api_key=api_key, model_id=model_id, sizes=sizes, allowed_hosts=hosts, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """Runs an app with uvicorn on a free loopback port in a daemon thread (tests, benches, notebooks).

    with BackgroundServer(create_app(model)) as srv:
        openai.OpenAI(base_url=srv.base_url, api_key="-")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.base_url = f"{self.url}/v1"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="gemma3n-server"
        )

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
