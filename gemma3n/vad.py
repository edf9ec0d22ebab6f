"""Voice activity: where a recording has speech, by Silero VAD (the `silero-vad` wheel ships its
model; its only dependency is torch, which we have).

Chosen over webrtcvad: a neural detector that tells speech from noise and music far better than
WebRTC's Gaussian-mixture frames, and far faster than real time on one CPU thread (bench/README.md,
"Speech endpoint"); the original webrtcvad has had no release since 2017 (webrtcvad-wheels repackages it).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from .errors import InputError

SAMPLING_RATE = 16_000  # what the detector takes (and what gemma3n.audio loads)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The detector steps 32 ms frames one at a time: a second thread only adds synchronisation
    and made it many times slower (bench/README.md, "Speech endpoint"). Importing silero_vad
    also sets torch's thread count process-wide; both are undone here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load() -> tuple[Any, Any, Any]:
    """A detector of its own (its state is per recording), get_speech_timestamps and
    get_speech_timestamps_from_probs."""
    try:
        with _one_thread(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)  # silero's own load
            warnings.filterwarnings("ignore", "path is deprecated", DeprecationWarning)  # and its importlib use
            from silero_vad import get_speech_timestamps, get_speech_timestamps_from_probs, load_silero_vad

            return load_silero_vad(), get_speech_timestamps, get_speech_timestamps_from_probs
    except ImportError as exc:
        raise InputError(f"transcription needs the audio extra: pip install 'gemma3n[audio]' ({exc})") from None


@functools.lru_cache(maxsize=1)
def _detector() -> tuple[Any, Any]:
    return _load()[:2]


def speech_spans(
    wave: np.ndarray, *, min_silence_s: float = 0.3, pad_s: float = 0.1, threshold: float = 0.5
) -> list[tuple[int, int]]:
    """[start, end) sample spans of speech in a 16 kHz mono clip, padded by `pad_s` each side;
    pauses shorter than `min_silence_s` do not split a span."""
    model, timestamps = _detector()
    with _one_thread(), torch.inference_mode():
        found = timestamps(
            torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)),
            model,
            threshold=threshold,
            sampling_rate=SAMPLING_RATE,
            min_silence_duration_ms=int(min_silence_s * 1000),
            speech_pad_ms=int(pad_s * 1000),
        )
    return [(int(s["start"]), int(s["end"])) for s in found]


FRAME = 512  # samples the detector scores at a time (32 ms)


class SpeechTracker:
    """The spans `speech_spans` finds in a whole recording, found while the recording arrives.

    The detector scores 32 ms frames in order, each from its own audio and a state carried from
    the frames before, so the scores of a prefix are the whole recording's; its rules then turn
    scores into spans (Silero's `get_speech_timestamps_from_probs`, run here over the scores so
    far). A span those rules have closed by a pause inside the prefix (padded end before the
    prefix's end) is final: later audio neither moves it nor its padding, because the pause that
    closes a span (`min_silence_s`) outlasts two paddings, so neighbours never share a gap. The
    open span, closed at the prefix's end for now, is not. `feed` returns the spans that became
    final; `finish` the rest, the last partial frame zero-padded as the whole-file detector pads it.

    `horizon`: the open span closed by silence right now, the earliest end it can still have;
    no span not yet returned ends before it. `open_start`: where the open span starts.
    """

    def __init__(self, *, min_silence_s: float = 0.3, pad_s: float = 0.1, threshold: float = 0.5) -> None:
        if min_silence_s <= 2 * pad_s:
            raise ValueError("a live detector needs min_silence_s > 2 * pad_s: spans would share their gaps")
        self._rules = dict(
            threshold=threshold,
            sampling_rate=SAMPLING_RATE,
            min_silence_duration_ms=int(min_silence_s * 1000),
            speech_pad_ms=int(pad_s * 1000),
        )
        self._negative = max(threshold - 0.15, 0.01)  # the rules' exit threshold
        # `_quiet` frames below it close any open span by their `_close`th frame; the rules are
        # then as at the start, and the next span, padded, starts after the quiet frames
        close = -(-int(min_silence_s * SAMPLING_RATE) // FRAME)
        self._close, self._quiet = close, close + 1 + -(-int(pad_s * SAMPLING_RATE) // FRAME)
        self._model, _, self._spans = _load()
        self._model.reset_states()
        self._rest = np.zeros(0, np.float32)  # samples short of a whole frame
        self._probs: list[float] = []  # scores from frame `_base` on
        self._base = 0
        self._final: list[tuple[int, int]] = []  # final spans of the rules' current run
        self.frames = 0
        self.open_start: int | None = None
        self.horizon = 0

    def feed(self, samples: np.ndarray) -> list[tuple[int, int]]:
        """Take the next samples (16 kHz float32); the spans that became final."""
        buf = np.concatenate([self._rest, np.asarray(samples, np.float32).reshape(-1)])
        whole = len(buf) // FRAME * FRAME
        self._rest = buf[whole:]
        if not whole:
            return []
        self._score(buf[:whole])
        return self._settle(self.frames * FRAME, final=False)

    def finish(self) -> list[tuple[int, int]]:
        """The end of the recording: the spans not yet returned."""
        end = self.frames * FRAME + len(self._rest)
        if len(self._rest):
            self._score(np.pad(self._rest, (0, FRAME - len(self._rest))))
            self._rest = self._rest[:0]
        found = self._settle(end, final=True)
        self.horizon, self.open_start = 2**62, None
        return found

    def _score(self, frames: np.ndarray) -> None:
        with _one_thread(), torch.inference_mode():
            for frame in torch.from_numpy(np.ascontiguousarray(frames)).split(FRAME):
                self._probs.append(self._model(frame, SAMPLING_RATE).item())
        self.frames = self._base + len(self._probs)

    def _run(self, probs: list[float], end: int) -> list[tuple[int, int]]:
        """The rules over `probs` (frames from `_base` on) for a recording that ends at `end`."""
        base = self._base * FRAME
        found = self._spans(probs, audio_length_samples=end - base, **self._rules)
        return [(int(s["start"]) + base, int(s["end"]) + base) for s in found]

    def _settle(self, end: int, *, final: bool) -> list[tuple[int, int]]:
        spans = self._run(self._probs, end)
        settled = spans if final else [s for s in spans if s[1] + FRAME <= end]
        new = settled[len(self._final) :]
        self._final = settled
        if not final:
            self.open_start = spans[len(settled)][0] if len(spans) > len(settled) else None
            closed = self._run(self._probs + [0.0] * (self._quiet + 1), end + (self._quiet + 1) * FRAME)
            self.horizon = min([end] + [e for _, e in closed[len(settled) :]])
            self._restart()
        return new

    def _restart(self) -> None:
        """Start the rules again after the last pause long enough to reset them (`_quiet`),
        dropping the scores before it: the work per feed stays bounded however long the recording."""
        quiet = np.asarray(self._probs) < self._negative
        edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
        runs = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= self._quiet]
        if not runs:
            return
        cut = int(runs[-1][0]) + self._close + 1
        self._final = [s for s in self._final if s[0] >= (self._base + cut) * FRAME]
        self._probs = self._probs[cut:]
        self._base += cut
