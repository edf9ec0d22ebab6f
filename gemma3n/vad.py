"""Voice activity: where a recording has speech, by Silero VAD (the `silero-vad` wheel ships its
model; its only dependency is torch, which we have).

Chosen over webrtcvad: a neural detector that tells speech from noise and music far better than
WebRTC's Gaussian-mixture frames, and far faster than real time on one CPU thread (bench/README.md,
"Speech endpoint"); the original webrtcvad has had no release since 2017 (webrtcvad-wheels repackages it).
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)
def _detector() -> tuple[Any, Any]:
    try:
        with _one_thread():
            from silero_vad import get_speech_timestamps, load_silero_vad

            return load_silero_vad(), get_speech_timestamps
    except ImportError as exc:
        raise InputError(f"transcription needs the audio extra: pip install 'gemma3n[audio]' ({exc})") from None


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
