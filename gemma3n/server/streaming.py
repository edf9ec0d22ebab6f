"""Responses: each choice's pieces become OpenAI chunks (server-sent events, framed as OpenAI
does) or, folded together, one response; log-probabilities, tool-call deltas and usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from gemma3n.generate import TextPiece
from gemma3n.tools import CallDelta, CallStreamer

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


# ---------------------------------------------------------------------------- log-probabilities


def _entry(e: Any) -> dict[str, Any]:
    return {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes)}


def chat_logprobs(entries: list[Any]) -> dict[str, Any]:
    return {"content": [{**_entry(e), "top_logprobs": [_entry(t) for t in e.top]} for e in entries]}


def completion_logprobs(entries: list[Any], offset: int) -> dict[str, Any]:
    """The legacy completions form; `offset`: the text's position before the first token."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------------- choices


class Choice:
    """One choice's state: what has been said, its tokens, calls and finish reason. `add`
    turns a piece into chunk choices; `result` is the whole choice of a plain response."""

    def __init__(self, index: int, kind: str, functions: list[dict] | None, forced_call: bool, logprobs: bool):
        self.index, self.kind, self.want_logprobs = index, kind, logprobs
        self.calls = CallStreamer(functions, forced_call) if functions else None
        self.text, self.offset = "", 0
        self.entries: list[Any] = []
        self._pending: list[Any] = []  # log-probabilities of tokens whose text is held back
        self.tool_deltas: list[CallDelta] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.started = False

    def add(self, piece: TextPiece) -> list[dict[str, Any]]:
        out = []
        prompt = piece.prompt_logprobs
        if prompt is not None:  # echo: the prompt first, as its own text
            text = b"".join(e.bytes for e in prompt).decode("utf-8", "replace")
            out.append(self._text_chunk(text, prompt))
        self.completion_tokens = piece.generated_tokens or self.completion_tokens
        self._pending += piece.logprobs or []
        parts = list(self.calls.feed(piece.text)) if self.calls else [piece.text]
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason
            if self.calls:
                parts += list(self.calls.finish())
                if self.calls.calls:
                    self.finish_reason = "tool_calls"
        for part in parts:
            out.append(self._call_chunk(part) if isinstance(part, CallDelta) else self._text_chunk(part, None))
        if self._pending and self.want_logprobs and self.finish_reason is not None:
            out.append(self._text_chunk("", None))  # the last tokens' log-probabilities
        return [c for c in out if c is not None]

    def _text_chunk(self, text: str, entries: list[Any] | None) -> dict[str, Any] | None:
        if entries is None:
            entries, self._pending = self._pending, []
        if not text and not entries:
            return None
        self.entries += entries
        logprobs = self._logprobs(entries) if self.want_logprobs else None
        self.offset += len(text)
        self.text += text
        if self.kind == "text":
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": None}
        return {"index": self.index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}

    def _logprobs(self, entries: list[Any]) -> dict[str, Any]:
        return chat_logprobs(entries) if self.kind == "chat" else completion_logprobs(entries, self.offset)

    def _call_chunk(self, delta: CallDelta) -> dict[str, Any]:
        self.tool_deltas.append(delta)
        call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
        if delta.id is not None:
            call.update(id=delta.id, type="function")
            call["function"]["name"] = delta.name
        logprobs = self._logprobs(self._pending) if self.want_logprobs and self._pending else None
        self.entries += self._pending
        self._pending = []
        return {"index": self.index, "delta": {"tool_calls": [call]}, "logprobs": logprobs, "finish_reason": None}

    def opening(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def closing(self) -> dict[str, Any]:
        end = {"index": self.index, "logprobs": None, "finish_reason": self.finish_reason or "stop"}
        return {**end, "text": ""} if self.kind == "text" else {**end, "delta": {}}

    def result(self) -> dict[str, Any]:
        """The whole choice, as a non-streaming response has it."""
        finish = self.finish_reason or "stop"
        logprobs = None
        if self.want_logprobs:
            logprobs = chat_logprobs(self.entries) if self.kind == "chat" else completion_logprobs(self.entries, 0)
        if self.kind == "text":
            return {"index": self.index, "text": self.text, "logprobs": logprobs, "finish_reason": finish}
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        calls = self.calls.calls if self.calls else None
        if calls:
            message.update(content=None, tool_calls=calls)
        elif self.text == "":
            message["content"] = ""
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": finish}


class Tally:
    """Usage over a request's prompts and choices, counted as OpenAI does: each prompt once,
    every choice's completion tokens."""

    def __init__(self) -> None:
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}

    def add(self, prompt_no: int, piece: TextPiece) -> None:
        self.prompt_tokens[prompt_no] = piece.prompt_tokens or self.prompt_tokens.get(prompt_no, 0)
        if piece.stats:
            self.cached_tokens[prompt_no] = piece.stats.get("cached_prompt_tokens", 0)

    def usage(self, choices: dict[int, Choice]) -> dict[str, Any]:
        completion = sum(c.completion_tokens for c in choices.values())
        return _usage(sum(self.prompt_tokens.values()), completion, sum(self.cached_tokens.values()))


class ChoiceSet:
    """A request's choices, created as their first pieces arrive (index = prompt * n + i)."""

    def __init__(self, kind: str, functions: list[dict] | None, forced_call: bool, logprobs: bool) -> None:
        self.kind, self.functions, self.forced_call, self.logprobs = kind, functions, forced_call, logprobs
        self.choices: dict[int, Choice] = {}
        self.tally = Tally()

    def add(self, event: tuple[int, int, Any]) -> list[dict[str, Any]]:
        """An event (index, prompt number, piece) -> its chunk choices (an opening one first)."""
        index, prompt_no, piece = event
        self.tally.add(prompt_no, piece)
        out = []
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = Choice(index, self.kind, self.functions, self.forced_call, self.logprobs)
            if self.kind == "chat":
                out.append(choice.opening())
        out += choice.add(piece)
        if choice.finish_reason is not None:
            out.append(choice.closing())
        return out

    def response(self) -> list[dict[str, Any]]:
        return [self.choices[i].result() for i in sorted(self.choices)]

    def usage(self) -> dict[str, Any]:
        return self.tally.usage(self.choices)


async def sse_stream(
    job: _Job, first: Any, choices: ChoiceSet, head: dict[str, Any], include_usage: bool
) -> AsyncIterator[str]:
    """SSE framed as OpenAI does: per choice (chat: a role chunk) content chunks and a
    finish_reason chunk, an optional usage chunk with no choices, then `data: [DONE]`."""

    def chunk(items: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        out = {**head, "choices": items}
        if include_usage:
            out["usage"] = usage
        return _sse(out)

    try:
        event = first
        while event is not _END:
            if isinstance(event, BaseException):
                raise event
            for item in choices.add(event):
                yield chunk([item])
            event = await job.events.get()  # a disconnect cancels this task (and _JobStream the job)
        if include_usage:
            yield chunk([], choices.usage())
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        yield _sse(_from_exception(exc).body())
    yield "data: [DONE]\n\n"
