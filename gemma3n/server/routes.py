"""The app: routes, authentication, Host checks, model ids and sizes, and the request flow."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, closing
from functools import partial
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemma3n.batching import MAX_BATCH, BatchRequest
from gemma3n.cache import PromptCache
from gemma3n.errors import InputError
from gemma3n.model import Model
from gemma3n.speculative import drafting
from gemma3n.tools import call_schema, check_tools, reply_form

from .audio import DEFAULT_MAX_AUDIO_BYTES, DEFAULT_MAX_AUDIO_SECONDS, add_speech_routes
from .engine import _END, Work, _ClientGone, _Engine, _next_event
from .schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    _completion_prompts,
    _convert_messages,
    _from_exception,
    _Sampling,
    _validation_error,
    check_reply_form,
    parse_body,
    read_body,
)
from .streaming import ChoiceSet, _JobStream, sse_stream

log = logging.getLogger("gemma3n.server")

DEFAULT_MAX_QUEUE = 32  # requests admitted at once: the one generating plus those waiting
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # room for a few base64 images / 12 min of 16 kHz 16-bit wav
DEFAULT_PROMPT_CACHE_SLOTS = 4  # conversations whose K/V is kept between requests (memory: one K/V each)


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
    max_audio_bytes: int = DEFAULT_MAX_AUDIO_BYTES,
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
    draft: Any = None,
    draft_k: int | None = None,
    draft_model: Any = None,
    max_batch: int = MAX_BATCH,
    max_kv_bytes: int | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `model` (a `gemma3n.load()` result or any object with
    `stream`, `sizes`, `name`, `has_audio`, `has_vision`). Every elastic size is its own model id;
    `sizes` adds custom ones, e.g. {"gemma3n-half": {"ffn": [4096] * 35}}. `allowed_hosts`, if
    given, is the set of Host header names answered (a loopback server's defence against DNS
    rebinding, where a web page's own domain is pointed at 127.0.0.1). `prompt_cache_slots`
    conversations keep their K/V between requests (0: none; at most `prompt_cache_bytes` in all,
    if given), see `gemma3n.PromptCache`; clients
    can tell from `cached_tokens` or latency that a prefix was sent recently, so use 0 where they
    must not learn about each other. `draft` / `draft_k` / `draft_model`: speculative decoding for
    every request where it applies (see `Model.stream`); a request's own `draft` overrides it.
    `max_batch`: plain generations decoded together (continuous batching; 1: one at a time);
    `max_kv_bytes`: the K/V those may hold at once (a request waits for room; one that could
    never fit is refused)."""
    if prompt_cache_slots < 0:
        raise ValueError(f"prompt_cache_slots must be >= 0, not {prompt_cache_slots}")
    if prompt_cache_bytes is not None and prompt_cache_bytes < 0:
        raise ValueError(f"prompt_cache_bytes must be >= 0, not {prompt_cache_bytes}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, not {max_batch}")
    server_draft = None
    if draft is not None or draft_model is not None:
        drafting(model, model.plan(None), draft, draft_k, draft_model)  # a bad --draft fails here
        server_draft = {"draft": draft, "draft_k": draft_k, "draft_model": draft_model}
    engine = _Engine(model, max_queue, prompt_cache_slots, prompt_cache_bytes, max_batch, max_kv_bytes)
    routes = _Routes(
        model, engine, _model_ids(model, model_id, sizes), api_key, allowed_hosts, max_body_bytes, server_draft
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(
        title="gemma3n",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        dependencies=[Depends(routes.check_host)],
    )
    app.state.engine = engine
    _add_error_handlers(app)
    add_speech_routes(app, engine, routes.resolve, routes.authorize, max_audio_bytes, max_audio_seconds)
    _add_openai_routes(app, routes, max_queue)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is OpenAI's error object with the right status; never a bare 500 page."""

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


def _add_openai_routes(app: FastAPI, routes: _Routes, max_queue: int) -> None:
    """/health, /v1/models and the two generation endpoints (speech: server/audio.py)."""
    created = int(time.time())
    auth = [Depends(routes.authorize)]

    def model_card(mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": created, "owned_by": "gemma3n"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": routes.default_id, "queued": routes.engine.admitted, "max_queue": max_queue}

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(mid) for mid in routes.ids]}

    @app.get("/v1/models/{mid:path}", dependencies=auth)
    async def get_model(mid: str) -> dict[str, Any]:
        return model_card(routes.resolve(mid)[0])

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = await routes.read_json(request, ChatCompletionRequest)
        return await routes.run(request, req, [{"messages": _convert_messages(req.messages, routes.model)}], "chat")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req = await routes.read_json(request, CompletionRequest)
        return await routes.run(request, req, [{"prompt": p} for p in _completion_prompts(req)], "text")


class _Routes:
    """What every request consults: the model ids, the key, the allowed hosts, the engine."""

    def __init__(
        self,
        model: Any,
        engine: _Engine,
        ids: dict[str, Any],
        api_key: str | None,
        allowed_hosts: Sequence[str] | None,
        max_body_bytes: int,
        server_draft: dict[str, Any] | None,
    ) -> None:
        self.model, self.engine, self.ids, self.api_key = model, engine, ids, api_key
        self.allowed_hosts, self.max_body_bytes, self.server_draft = allowed_hosts, max_body_bytes, server_draft
        self.default_id = next(iter(ids))
        self.aliases = {size: mid for mid, size in ids.items() if isinstance(size, str)}  # "E2B" -> "gemma3n-E2B"
        self.batching = isinstance(model, Model)  # a stand-in object (tests) has no decoder to batch

    def check_host(self, request: Request) -> None:
        if self.allowed_hosts is None:
            return
        host = request.headers.get("host", "")
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        if name.lower() not in self.allowed_hosts:
            raise APIError(400, f"Host {host!r} is not served here (allowed: {', '.join(self.allowed_hosts)})")

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def read_json(self, request: Request, schema: type[_Sampling]) -> Any:
        # JSON only: a web page can send a cross-site "simple" POST (text/plain) to a loopback
        # server without a CORS preflight; requiring application/json rules that out.
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(
                415,
                f"Content-Type must be application/json, got {media or 'none'}",
                code="unsupported_media_type",
            )
        data = parse_body(await read_body(request, self.max_body_bytes))
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def resolve(self, name: str | None) -> tuple[str, Any]:
        if not name:
            return self.default_id, None
        if name in self.ids:
            return name, self.ids[name]
        if name in self.aliases:  # a bare size name, e.g. "E2B"
            return name, name
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server has: {', '.join(self.ids)}",
            param="model",
            code="model_not_found",
        )

    def submit(self, inputs: list[dict[str, Any]], gen_kwargs: dict[str, Any]) -> Any:
        """Into the running batch where the request allows it, else a job of its own."""
        if self.batching and _batchable(inputs, gen_kwargs, self.server_draft):
            plain = {k: v for k, v in gen_kwargs.items() if k != "draft"}  # only "none" gets here
            return self.engine.submit(prepare=partial(BatchRequest.make, **inputs[0], **plain))
        return self.engine.submit(_generation(inputs, gen_kwargs, self.server_draft))

    async def run(
        self, request: Request, req: _Sampling, inputs: list[dict[str, Any]], kind: Literal["chat", "text"]
    ) -> Response:
        """Generate for each input (a chat, or each prompt of a batch) and answer in OpenAI's form."""
        model_name, size = self.resolve(req.model)
        gen_kwargs = req.generation_kwargs()
        check_reply_form(gen_kwargs)  # what cannot be served is a 400 before the request queues
        if size is not None:
            gen_kwargs["size"] = size
        choices = _choices(kind, gen_kwargs)
        job = self.submit(inputs, gen_kwargs)
        stamp = int(time.time())
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        streaming = False
        try:
            event = await _next_event(job, request)  # errors in the prompt surface here, as a 400
            if isinstance(event, BaseException):
                raise _from_exception(event)
            if req.stream:
                streaming = True  # from here the response owns the job
                obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                chunk_head = {"id": rid, "object": obj, "created": stamp, "model": model_name}
                return _JobStream(sse_stream(job, event, choices, chunk_head, req.include_usage), job)
            while event is not _END:
                if isinstance(event, BaseException):
                    raise _from_exception(event)
                choices.add(event)
                event = await _next_event(job, request)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:  # done, failed, or this handler was cancelled: stop generating
                job.cancel()
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return JSONResponse(
            {"id": rid, "object": obj, "created": stamp, "model": model_name}
            | {"choices": choices.response(), "usage": choices.usage()}
        )


def _choices(kind: str, gen_kwargs: dict[str, Any]) -> ChoiceSet:
    """How the request's choices are told: tool calls read from chat replies unless tools are off."""
    functions = check_tools(gen_kwargs.get("tools")) if kind == "chat" else []
    if gen_kwargs.get("tool_choice") == "none":
        functions = []
    forced = bool(functions) and call_schema(functions, gen_kwargs.get("tool_choice")) is not None
    return ChoiceSet(kind, functions or None, forced, bool(gen_kwargs.get("logprobs")))


def _batchable(inputs: list[dict[str, Any]], gen_kwargs: dict[str, Any], server_draft: dict[str, Any] | None) -> bool:
    """One prompt, one continuation, no grammar, tools, log-probabilities or draft (the request's
    or the server's): decoded in the engine's running batch."""
    if len(inputs) != 1 or gen_kwargs.get("n", 1) != 1:
        return False
    if server_draft is not None and gen_kwargs.get("draft") != "none":
        return False
    special = ("response_format", "tools", "tool_choice", "logprobs", "top_logprobs", "prompt_logprobs", "draft")
    return not any(gen_kwargs.get(k) not in (None, False, 0, "none") for k in special)


def _generation(
    inputs: list[dict[str, Any]], gen_kwargs: dict[str, Any], server_draft: dict[str, Any] | None = None
) -> Work:
    """The worker's part: every input's continuations, as (choice index, input number, piece)."""
    n = gen_kwargs.get("n", 1)

    def work(model: Any, prompt_cache: PromptCache | None) -> Iterator[tuple[int, int, Any]]:
        kwargs = _with_draft(model, gen_kwargs, server_draft)
        for number, given in enumerate(inputs):
            # closed here however the consumer stops: generation ends, the cache goes back
            with closing(model.stream(**given, **kwargs, prompt_cache=prompt_cache)) as pieces:
                for piece in pieces:
                    yield number * n + piece.choice, number, piece

    return work


def _with_draft(model: Any, gen_kwargs: dict[str, Any], server_draft: dict[str, Any] | None) -> dict[str, Any]:
    """The request's own draft ("none": no draft); else the server's where it applies: a draft
    smaller than the requested size and a reply no grammar constrains. Runs on the worker thread
    (it reads the model's sizes)."""
    kw = dict(gen_kwargs)
    if kw.get("draft") == "none":
        del kw["draft"]
        return kw
    if "draft" in kw or server_draft is None:
        return kw
    if reply_form([], kw.get("response_format"), kw.get("tools"), kw.get("tool_choice"))[1] is not None:
        return kw  # a grammar constrains the reply: drafts cannot follow it
    candidate = server_draft | ({"draft_k": kw["draft_k"]} if "draft_k" in kw else {})
    try:
        drafting(model, model.plan(kw.get("size")), **candidate)
    except InputError:  # e.g. a request for the draft's own size: decode without one
        return kw
    return kw | candidate
