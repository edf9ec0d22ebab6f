"""OpenAI's speech endpoints: POST /v1/audio/transcriptions and /v1/audio/translations.

A multipart form (file, model, language, prompt, temperature, response_format, stream) is read
within the upload limit (413 past it), checked (400 naming the field), and transcribed on the
generation worker by gemma3n.speech, segment by segment: a streamed response sends each
segment's text as it is done (`transcript.text.delta`, then `transcript.text.done`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemma3n.audio import header_seconds, load_audio
from gemma3n.errors import InputError
from gemma3n.speech import FORMATS, SR, Segment, Transcript, joined_text, render, transcribe_segments

from .engine import _END, Work, _ClientGone, _Engine, _Job, _next_event
from .schemas import APIError, _from_exception, read_body
from .streaming import _JobStream, _sse

DEFAULT_MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's upload limit
DEFAULT_MAX_AUDIO_SECONDS = 2 * 3600.0
_MEDIA = {"text": "text/plain; charset=utf-8", "srt": "text/plain; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}


@dataclass
class SpeechRequest:
    audio: bytes
    model: str | None
    language: str | None
    prompt: str | None
    temperature: float
    response_format: str
    stream: bool


def _field(form: FormData, name: str, limit: int = 4096) -> str | None:
    value = form.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a form field, not a file", param=name)
    if len(value) > limit:
        raise APIError(400, f"{name} is longer than {limit} characters", param=name)
    return value


def _temperature(form: FormData) -> float:
    text = _field(form, "temperature", 32)
    try:
        value = float(text) if text is not None else 0.0
    except ValueError:
        raise APIError(400, f"temperature must be a number, got {text!r}", param="temperature") from None
    if not math.isfinite(value) or not 0 <= value <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {text}", param="temperature")
    return value


async def _speech_request(form: FormData) -> SpeechRequest:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file is required: the audio, as a multipart file field", param="file")
    fmt = _field(form, "response_format", 32) or "json"
    if fmt not in FORMATS:
        raise APIError(
            400, f"response_format must be one of {', '.join(FORMATS)}, got {fmt!r}", param="response_format"
        )
    stream = (_field(form, "stream", 8) or "false").lower()
    if stream not in ("true", "false"):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    if stream == "true" and fmt not in ("json", "text"):
        raise APIError(
            400,
            f"stream sends text as each segment is done; response_format {fmt!r} is one document: use json or text",
            param="stream",
        )
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    if any(g != "segment" for g in granularities):
        raise APIError(400, "only segment timestamps exist here (no word timings)", param="timestamp_granularities")
    return SpeechRequest(
        audio=await upload.read(),
        model=_field(form, "model", 256),
        language=_field(form, "language", 32),
        prompt=_field(form, "prompt"),
        temperature=_temperature(form),
        response_format=fmt,
        stream=stream == "true",
    )


def _check_duration(seconds: float | None, limit: float) -> None:
    if seconds is not None and seconds > limit:
        raise APIError(400, f"the audio is {seconds:.0f} s long; this server takes at most {limit:.0f} s", param="file")


def _transcription(req: SpeechRequest, translate: bool, size: Any, max_seconds: float) -> Work:
    def work(model: Any, prompt_cache: Any) -> Iterator[float | Segment]:
        if not getattr(model, "has_audio", False):
            raise InputError("this model has no audio tower: it cannot transcribe")
        wave = load_audio(req.audio, sampling_rate=SR)
        _check_duration(len(wave) / SR, max_seconds)
        yield len(wave) / SR  # the duration first, then the segments as they are done
        yield from transcribe_segments(
            model,
            None,
            wave=wave,
            translate_to="English" if translate else None,
            language=req.language,
            prompt=req.prompt,
            temperature=req.temperature,
            size=size,
        )

    return work


async def _deltas(job: _Job, first: Any) -> AsyncIterator[str]:
    segments: list[Segment] = []
    try:
        event = first
        while event is not _END:
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Segment) and event.text:
                delta = (" " if joined_text(segments) else "") + event.text
                yield _sse({"type": "transcript.text.delta", "delta": delta, "logprobs": None})
            if isinstance(event, Segment):
                segments.append(event)
            event = await job.events.get()
        yield _sse({"type": "transcript.text.done", "text": joined_text(segments), "logprobs": None})
    except Exception as exc:  # headers are sent: report in-band
        yield _sse(_from_exception(exc).body())
    yield "data: [DONE]\n\n"


def add_speech_routes(
    app: FastAPI,
    engine: _Engine,
    resolve: Callable[[str | None], tuple[str, Any]],
    authorize: Callable[..., None],
    max_bytes: int = DEFAULT_MAX_AUDIO_BYTES,
    max_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
) -> None:
    async def speech(request: Request, translate: bool) -> Response:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "multipart/form-data":
            raise APIError(
                415, f"Content-Type must be multipart/form-data, got {media or 'none'}", code="unsupported_media_type"
            )
        form = await read_form(request, max_bytes)
        req = await _speech_request(form)
        _, size = resolve(req.model)
        _check_duration(header_seconds(req.audio), max_seconds)  # before decoding hours of it
        job = engine.submit(_transcription(req, translate, size, max_seconds))
        streaming = False
        try:
            event = await _next_event(job, request)  # a file that is not audio is a 400 here
            if isinstance(event, BaseException):
                raise _from_exception(event)
            if req.stream:
                streaming = True
                return _JobStream(_deltas(job, event), job)
            segments, duration = [], 0.0
            while event is not _END:
                if isinstance(event, BaseException):
                    raise _from_exception(event)
                if isinstance(event, Segment):
                    segments.append(event)
                else:
                    duration = event
                event = await _next_event(job, request)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                job.cancel()
        task = "translate" if translate else "transcribe"
        body = render(Transcript(joined_text(segments), segments, duration, req.language, task), req.response_format)
        return Response(body, media_type=_MEDIA.get(req.response_format, "application/json"))

    @app.post("/v1/audio/transcriptions", dependencies=[Depends(authorize)])
    async def transcriptions(request: Request) -> Response:
        return await speech(request, translate=False)

    @app.post("/v1/audio/translations", dependencies=[Depends(authorize)])
    async def translations(request: Request) -> Response:
        return await speech(request, translate=True)


async def read_form(request: Request, max_bytes: int) -> FormData:
    """The multipart body, read within `max_bytes` (413 past it), then parsed from memory."""
    body = await read_body(request, max_bytes)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=1, max_fields=32)
    except (StarletteHTTPException, ValueError) as exc:  # starlette's word for a malformed form
        detail = getattr(exc, "detail", None) or exc
        raise APIError(400, f"the multipart form could not be read: {detail}", code="invalid_form") from None
