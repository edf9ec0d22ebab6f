"""Responses: server-sent events framed as OpenAI does, and what the pieces say about usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from .engine import _END, _Job
from .schemas import _from_exception


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
