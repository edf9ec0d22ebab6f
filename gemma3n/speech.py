"""Speech recognition and speech translation of any length, segment by segment.

The model hears at most 30 s at a time (its feature extractor's `max_length`; 10 s for the
embedded model). Long audio is cut where a voice-activity detector (gemma3n.vad) finds pauses:
consecutive stretches of speech are grouped into windows of up to that length (silence around the
windows is never sent), and only a single stretch of speech longer than that
is cut inside, at its quietest points with an overlap (audio.plan_windows) whose repeated words
are removed (stitch_transcripts). Each window is one model call and one segment, with its
start and end times. Prompt format: vLLM's fixed ASR/AST prompt (docs/audio-vision.md#speech-prompts).
A window whose transcript repeats itself (a decoding loop) is decoded again at rising temperatures,
as Whisper does and as OpenAI's transcription API promises at temperature 0 (WindowTranscriber).

Formats (CLI `--format`, the server's `response_format`): text, json, verbose_json (segments),
srt (the `srt` library), vtt (`webvtt-py`).
"""

from __future__ import annotations

import io
import json
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np

from .errors import InputError

SR = 16_000
FORMATS = ("text", "json", "verbose_json", "srt", "vtt")
# openai-whisper's transcribe defaults: a window whose text zlib compresses more than 2.4 times is
# a loop ("the children of Gad, the children of Gad, ..."); it is decoded again with the
# temperature raised in steps of 0.2 up to 1.0
LOOP_COMPRESSION_RATIO = 2.4
FALLBACK_STEP = 0.2


def speech_prompt(translate_to: str | None = None, language: str | None = None) -> str:
    if translate_to:
        return f"Transcribe this audio into {translate_to}:"
    return f"Transcribe this audio ({language}):" if language else "Transcribe this audio:"


@dataclass
class Window:
    start: int  # samples
    end: int
    overlaps_previous: bool = False  # cut inside speech: its first words may repeat the previous window's
    takes_more: bool = True  # a group of whole stretches of speech (not a piece of a long one)


def speech_windows(wave: np.ndarray, max_seconds: float = 30.0) -> list[Window]:
    """Windows of at most `max_seconds` covering every stretch of speech in a 16 kHz clip."""
    from .vad import speech_spans

    return group_windows(wave, speech_spans(wave), max_seconds)


def group_windows(
    wave: np.ndarray, spans: Sequence[tuple[int, int]], max_seconds: float = 30.0, *, offset: int = 0
) -> list[Window]:
    """The windows of `spans` (stretches of speech, in order): consecutive stretches grouped up to
    `max_seconds`, a longer one cut inside. `wave` holds the recording from sample `offset` on
    (live.py keeps only the audio it still needs); spans and windows count from the recording's start."""
    from .audio import plan_windows

    limit = int(max_seconds * SR)
    windows: list[Window] = []
    for start, end in spans:
        last = windows[-1] if windows else None
        if end - start > limit:  # one long stretch of speech: cut inside it
            parts = plan_windows(wave[start - offset : end - offset], SR, max_seconds=max_seconds)
            windows += [
                Window(start + a, start + b, k > 0 and a < parts[k - 1][1], takes_more=False)
                for k, (a, b) in enumerate(parts)
            ]
        elif last is not None and last.takes_more and end - last.start <= limit:
            last.end = end  # the pause between them stays inside one window
        else:
            windows.append(Window(start, end))
    return windows


@dataclass
class Segment:
    """One window's transcript, in OpenAI's verbose_json shape. `no_speech_prob` is 0: the
    detector sent only speech."""

    id: int
    start: float  # seconds
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    seek: int = 0  # the window's first sample, in the 10 ms frames Whisper counts


@dataclass
class Transcript:
    text: str
    segments: list[Segment]
    duration: float  # seconds of audio
    language: str | None = None
    task: str = "transcribe"


def transcribe_segments(
    model: Any,
    audio: Any,
    *,
    max_seconds: float | None = None,
    wave: np.ndarray | None = None,
    **options: Any,
) -> Iterator[Segment]:
    """Segments of `audio` (path, bytes or a 16 kHz array), as each window is transcribed.

    `max_seconds` (default: the longest clip the model's encoder takes in one piece, 30 s for
    Gemma 3n) bounds a window: a longer one would reach the model as several encoder windows.
    `options`: those of WindowTranscriber (translate_to, language, prompt, temperature,
    max_tokens_per_window, temperature_fallback, sampling)."""
    calls = WindowTranscriber(model, **options)
    if max_seconds is None:
        max_seconds = model.processor.audio_window_seconds
    if wave is None:
        from .audio import load_audio

        wave = load_audio(audio, sampling_rate=SR)
    for window in speech_windows(wave, max_seconds):
        yield calls.segment(window, wave[window.start : window.end])


class WindowTranscriber:
    """One model call per window, numbered in order; a window cut inside speech keeps only the
    words the previous windows did not have. The file path (transcribe_segments) and the live
    one (live.py) make the same calls, so the same windows give the same segments.

    With `temperature_fallback` (the default) a window whose transcript loops
    (`compression_ratio` above LOOP_COMPRESSION_RATIO) is decoded again at each temperature of
    `fallback_temperatures`, until one does not loop; if every try loops, the least repetitive
    is kept. Those tries are seeded by the window's number (plus `seed`, if given), so the same
    audio always gives the same transcript."""

    def __init__(
        self,
        model: Any,
        *,
        translate_to: str | None = None,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        max_tokens_per_window: int = 256,
        temperature_fallback: bool = True,
        **sampling: Any,
    ) -> None:
        require_audio(model)
        self.model, self.temperature = model, temperature
        self.fallback = fallback_temperatures(temperature) if temperature_fallback else []
        self.instruction = speech_prompt(translate_to, language)
        self.system = prompt
        self.options = dict(max_tokens=max_tokens_per_window, temperature=temperature, logprobs=True, **sampling)
        self.texts: list[str] = []  # every window's whole transcript so far

    def _call(self, samples: np.ndarray, **overrides: Any) -> Any:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        content = [{"type": "text", "text": self.instruction}, {"type": "audio", "audio": samples}]
        messages.append({"role": "user", "content": content})
        return self.model.generate(messages=messages, **{**self.options, **overrides})

    def segment(self, window: Window, samples: np.ndarray) -> Segment:
        """The next segment: `samples` are the window's audio."""
        result, temperature = self._decode(samples, number=len(self.texts))
        text = result.text.strip()
        if window.overlaps_previous:  # keep only the words the previous window did not have
            text = _new_words(self.texts, text)
        self.texts.append(result.text.strip())
        return _segment(len(self.texts) - 1, window, text, result, temperature)

    def _decode(self, samples: np.ndarray, number: int) -> tuple[Any, float]:
        """The window's result and the temperature that gave it (the temperature fallback)."""
        best, best_temperature = self._call(samples), self.temperature
        ratio = compression_ratio(best.text.strip())
        seed = self.options.get("seed")
        for temperature in self.fallback:
            if ratio <= LOOP_COMPRESSION_RATIO:
                break
            result = self._call(samples, temperature=temperature, seed=number if seed is None else seed + number)
            if (tried := compression_ratio(result.text.strip())) < ratio:
                best, best_temperature, ratio = result, temperature, tried
        return best, best_temperature

    def provisional(self, samples: np.ndarray, **overrides: Any) -> str:
        """The text of audio whose window is still open (no segment, nothing remembered);
        `overrides`: generation options for this call."""
        return self._call(samples, **overrides).text.strip()


def fallback_temperatures(temperature: float) -> list[float]:
    """The temperatures a looping window is decoded again at: `temperature` + 0.2, + 0.4, ...
    up to 1.0 (none above 1.0: a transcript sampled hotter is rarely better than a loop)."""
    steps = math.floor(round((1.0 - temperature) / FALLBACK_STEP, 6))
    return [round(temperature + FALLBACK_STEP * k, 6) for k in range(1, steps + 1)]


def compression_ratio(text: str) -> float:
    """Bytes of `text` over bytes of its zlib compression: about 1-2 for speech, more for a loop."""
    raw = text.encode()
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _new_words(previous: list[str], text: str) -> str:
    before = stitch_transcripts(previous).split()
    return " ".join(stitch_transcripts([*previous, text]).split()[len(before) :])


def _norm_word(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def stitch_transcripts(texts: Sequence[str], max_overlap_words: int = 16) -> str:
    """Join per-window transcripts, dropping words repeated across a window boundary.

    For each boundary the longest run of words (case and punctuation ignored) that ends the
    text so far and starts the next text - allowing one or two clipped words at the very start
    of the next window - is kept once. Single-word matches count only for words of 4+ letters.
    """
    words: list[str] = []
    for text in texts:
        new = text.split()
        if not new:
            continue
        tail = [_norm_word(w) for w in words[-max_overlap_words:]]
        head = [_norm_word(w) for w in new[: max_overlap_words + 2]]
        drop = 0
        for k in range(min(len(tail), max_overlap_words), 0, -1):
            if k == 1 and len(tail[-1]) < 4:
                break
            skip = next((j for j in range(3) if head[j : j + k] == tail[-k:]), None)
            if skip is not None:
                drop = skip + k
                break
        words.extend(new[drop:])
    return " ".join(words)


def _segment(number: int, window: Window, text: str, result: Any, temperature: float) -> Segment:
    logprobs = [e.logprob for e in result.logprobs or []]
    return Segment(
        id=number,
        start=round(window.start / SR, 3),
        end=round(window.end / SR, 3),
        text=text,
        tokens=list(result.token_ids),
        temperature=temperature,
        avg_logprob=sum(logprobs) / len(logprobs) if logprobs else 0.0,
        compression_ratio=compression_ratio(text),
        seek=window.start // (SR // 100),
    )


def require_audio(model: Any) -> None:
    if not model.has_audio:
        raise InputError(f"{model.path} has no audio tower: it cannot transcribe")


def transcribe(model: Any, audio: Any, *, progress: bool = False, **options: Any) -> Transcript:
    """The whole transcript of `audio` (see transcribe_segments for the options)."""
    from tqdm import tqdm

    from .audio import load_audio

    require_audio(model)  # before the progress bar starts
    wave = load_audio(audio, sampling_rate=SR)
    segments = list(tqdm(transcribe_segments(model, audio, wave=wave, **options), disable=not progress, unit="segment"))
    task = "translate" if options.get("translate_to") else "transcribe"
    return Transcript(joined_text(segments), segments, len(wave) / SR, options.get("language"), task)


def joined_text(segments: list[Segment]) -> str:
    return " ".join(s.text for s in segments if s.text)


# ---------------------------------------------------------------------------- formats


def render(transcript: Transcript, fmt: str) -> str:
    """The transcript as text, json, verbose_json, srt or vtt; or "lines", one line per segment
    (the CLI's txt: each line can be written as its window is done)."""
    if fmt == "text":
        return transcript.text + "\n"
    if fmt == "lines":
        return "".join(f"{s.text}\n" for s in transcript.segments if s.text)
    if fmt == "json":
        return json.dumps({"text": transcript.text, "usage": duration_usage(transcript.duration)}, ensure_ascii=False)
    if fmt == "verbose_json":
        body = {
            "task": transcript.task,
            "language": transcript.language or "",
            "duration": transcript.duration,
            "text": transcript.text,
            "segments": [asdict(s) for s in transcript.segments],
            "usage": duration_usage(transcript.duration),
        }
        return json.dumps(body, ensure_ascii=False)
    if fmt == "srt":
        return _srt(transcript.segments)
    if fmt == "vtt":
        return _vtt(transcript.segments)
    raise InputError(f"the format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def duration_usage(seconds: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(seconds)}


def _srt(segments: list[Segment]) -> str:
    import srt

    subtitles = [
        srt.Subtitle(i + 1, timedelta(seconds=s.start), timedelta(seconds=s.end), s.text)
        for i, s in enumerate(s for s in segments if s.text)
    ]
    return srt.compose(subtitles)


def _vtt(segments: list[Segment]) -> str:
    import webvtt
    from webvtt.models import Timestamp

    vtt = webvtt.WebVTT()
    for s in segments:
        if s.text:
            start, end = (str(Timestamp.from_seconds(t)) for t in (s.start, s.end))
            vtt.captions.append(webvtt.Caption(start, end, s.text))
    out = io.StringIO()
    vtt.write(out)
    return out.getvalue()
