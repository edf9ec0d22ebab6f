"""Transcription of a recording as it arrives (`gemma3n transcribe -`): the same windows, the same
model calls and so the same text as the whole file, each window transcribed as soon as no later
audio can change it, with provisional text of the speech still open in the meantime.

A window is final once the detector has closed its last stretch of speech and no later stretch
can join it: the next one has started a window of its own, or could only end past the window's
limit. Until then its text is provisional: each stretch of speech in it is transcribed on its own
(the open one again whenever a little more of it has come and the model is idle), so a call
costs what the latest stretch costs, not the whole window. Reading goes on in another thread
(pcm.py) while the model works, so a slow model never holds up the recorder.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

import numpy as np

from .errors import InputError
from .pcm import RAW_HINT, PcmReader
from .speech import SR, Segment, Transcript, Window, WindowTranscriber, group_windows, joined_text, render
from .vad import FRAME, SpeechTracker


class _Samples:
    """A recording's samples as they arrive, from sample `offset` on (the ones before are dropped)."""

    def __init__(self) -> None:
        self.data = np.zeros(SR, np.float32)
        self.offset = 0  # the first sample held
        self.end = 0  # samples received

    def append(self, samples: np.ndarray) -> None:
        held = self.end - self.offset
        if held + len(samples) > len(self.data):  # grow by doubling: appends stay cheap
            grown = np.zeros(max(2 * len(self.data), held + len(samples)), np.float32)
            grown[:held] = self.data[:held]
            self.data = grown
        self.data[held : held + len(samples)] = samples
        self.end += len(samples)

    def view(self) -> np.ndarray:
        return self.data[: self.end - self.offset]

    def get(self, start: int, end: int) -> np.ndarray:
        if start < self.offset:
            raise ValueError(f"samples before {self.offset} were dropped (asked from {start})")
        return self.data[start - self.offset : end - self.offset].copy()

    def drop_before(self, sample: int) -> None:
        cut = min(sample, self.end) - self.offset
        if cut > len(self.data) // 2:  # only when it frees at least half: a copy now and then
            held = self.end - self.offset - cut
            kept = np.zeros(max(SR, 2 * held), np.float32)
            kept[:held] = self.data[cut : cut + held]
            self.data, self.offset = kept, self.offset + cut


class StreamingWindows:
    """The windows `speech.speech_windows` plans for a whole recording, planned while it arrives.

    `feed` takes the next samples (16 kHz float32) and returns the windows that became final, in
    order; `finish` returns the rest. Together they are exactly `speech_windows` of the whole
    recording. A returned window's samples stay readable (`samples`) until the next `feed`."""

    def __init__(self, max_seconds: float = 30.0) -> None:
        self.max_seconds = max_seconds
        self.limit = int(max_seconds * SR)
        self.detector = SpeechTracker()
        self.audio = _Samples()
        self._spans: list[tuple[int, int]] = []  # final spans of a window that may still grow
        self._keep = 0  # samples before this are no longer needed

    @property
    def received(self) -> int:
        return self.audio.end

    def samples(self, start: int, end: int) -> np.ndarray:
        return self.audio.get(start, end)

    def feed(self, samples: np.ndarray) -> list[Window]:
        samples = np.asarray(samples, np.float32).reshape(-1)
        self.audio.drop_before(self._keep)
        self.audio.append(samples)
        self._spans += self.detector.feed(samples)
        return self._take()

    def finish(self) -> list[Window]:
        self._spans += self.detector.finish()
        return self._take()

    def _take(self) -> list[Window]:
        windows = group_windows(self.audio.view(), self._spans, self.max_seconds, offset=self.audio.offset)
        last = windows[-1] if windows else None
        if last is not None and last.takes_more and self.detector.horizon <= last.start + self.limit:
            windows.pop()  # a stretch of speech not yet final may still join it
        if windows:
            self._spans = [s for s in self._spans if s[0] >= windows[-1].end]
        # later windows start at a span still held, the open speech, or recent audio
        starts = [s[0] for s in self._spans[:1]]
        if self.detector.open_start is not None:
            starts.append(self.detector.open_start)
        self._keep = min([*starts, self.detector.frames * FRAME - 2 * SR])
        return windows

    def stretches(self) -> list[tuple[int, int, bool]]:
        """The stretches of speech not yet in a returned window: [start, end) and whether the
        stretch is still open (then it ends, for now, at the end of the audio)."""
        held = [(start, end, False) for start, end in self._spans]
        if self.detector.open_start is not None:
            held.append((self.detector.open_start, self.received, True))
        return held


@dataclass
class Partial:
    """Provisional text of speech whose window is still open; a later Partial or the window's
    Segment replaces it."""

    start: float  # seconds
    end: float
    text: str


class LiveTranscriber:
    """Segments of a recording that arrives in chunks on a queue (16 kHz float32 arrays, then
    None; an exception put on it is raised here), each as soon as its window is final.

    `on_partial` (optional) receives provisional text of the speech whose window is still open:
    each stretch of it is transcribed on its own (the open one whenever at least
    `partial_step_s` more of it has come and no window is waiting; its last `max_seconds`), and
    the Partial joins their latest texts. `options`: those of speech.WindowTranscriber."""

    def __init__(
        self,
        model: Any,
        *,
        max_seconds: float | None = None,
        on_partial: Callable[[Partial], None] | None = None,
        partial_step_s: float = 0.25,
        **options: Any,
    ) -> None:
        self.calls = WindowTranscriber(model, **options)
        self.planner = StreamingWindows(max_seconds or model.processor.audio_window_seconds)
        self.on_partial = on_partial
        self.step = int(partial_step_s * SR)
        self._texts: dict[int, tuple[int, str]] = {}  # stretch start -> (end transcribed, text)

    @property
    def seconds(self) -> float:
        return self.planner.received / SR

    def warm_up(self) -> None:
        """One short call on silence: the audio tower loads (on first use) before speech waits on it."""
        self.calls.provisional(np.zeros(SR, np.float32), max_tokens=1)

    def run(self, chunks: queue.Queue, stop: threading.Event | None = None) -> Iterator[Segment]:
        """The segments, in order. Setting `stop` ends the recording where it has come to."""
        ready: deque[tuple[Window, np.ndarray]] = deque()
        stop, ended = stop or threading.Event(), False
        while True:
            if not ended:
                ended = self._take(chunks, ready, not ready and self._due() is None, stop)
            if (stretch := self._due()) is not None and not (ready and stretch[0] in self._texts):
                self._provisional(*stretch)  # new speech's first text goes before a waiting window
            elif ready:
                yield self.calls.segment(*ready.popleft())
            elif ended:
                return

    def _take(self, chunks: queue.Queue, ready: deque, wait: bool, stop: threading.Event) -> bool:
        """Everything queued (waiting for one item when `wait`) into the planner, the windows that
        became final onto `ready` with their samples; True at the end of the recording."""
        items = []
        while wait and not items and not stop.is_set():
            try:
                items.append(chunks.get(timeout=0.1))
            except queue.Empty:
                pass
        while True:
            try:
                items.append(chunks.get_nowait())
            except queue.Empty:
                break
        audio = [item for item in items if isinstance(item, np.ndarray)]
        windows = self.planner.feed(np.concatenate(audio)) if audio else []
        for item in items:
            if isinstance(item, BaseException) and not stop.is_set():  # stopped: how the stream ends is moot
                raise item
        ended = stop.is_set() or any(item is None for item in items)
        if ended:
            windows += self.planner.finish()
        ready.extend((w, self.planner.samples(w.start, w.end)) for w in windows)
        return ended

    def _due(self) -> tuple[int, int] | None:
        """[start, end) of the stretch whose provisional text is due: the open one once
        `partial_step_s` more of it has come, else a closed one not transcribed yet."""
        if self.on_partial is None:
            return None
        stretches = self.planner.stretches()
        if stretches and stretches[-1][2]:
            start, end, _ = stretches[-1]
            done = self._texts.get(start, (start, ""))[0]
            if end - start >= SR // 10 and (start not in self._texts or end - done >= self.step):
                return start, end
        return next(((start, end) for start, end, _ in stretches if start not in self._texts), None)

    def _provisional(self, start: int, end: int) -> None:
        samples = self.planner.samples(max(start, end - self.planner.limit), end)
        self._texts[start] = end, self.calls.provisional(samples)
        stretches = self.planner.stretches()
        self._texts = {s: self._texts[s] for s, _, _ in stretches if s in self._texts}  # committed ones go
        text = " ".join(t for _, t in self._texts.values() if t)
        covered = max(e for e, _ in self._texts.values())
        self.on_partial(Partial(round(stretches[0][0] / SR, 3), round(covered / SR, 3), text))


# ---------------------------------------------------------------------------- `gemma3n transcribe -`

STREAMED = ("lines", "srt", "vtt")  # formats written as each segment comes; the others at the end


class _Console:
    """Provisional text on stderr: `line` rewrites one line in place (a terminal), `lines` prints
    one line each (--partial), None shows none. `echo`: committed text too (stdout is elsewhere)."""

    def __init__(self, err: TextIO, mode: str | None, echo: bool) -> None:
        self.err, self.mode, self.echo = err, mode, echo

    def partial(self, p: Partial) -> None:
        text = " ".join(p.text.split())
        if self.mode == "line":
            width = max(20, _columns(self.err) - 1)
            text = text if len(text) <= width else "..." + text[-(width - 3) :]  # the latest words
            self.err.write(f"\r\033[K{text}")
        elif self.mode == "lines":
            self.err.write(f"partial {p.start:.2f}-{p.end:.2f} s: {text}\n")
        self.err.flush()

    def committed(self, segment: Segment | None) -> None:
        """A segment is done (None: the end) and replaces the provisional line."""
        if self.mode == "line":
            self.err.write("\r\033[K" + (f"{segment.text}\n" if self.echo and segment and segment.text else ""))
            self.err.flush()


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no descriptor, or not a terminal
        return shutil.get_terminal_size().columns


class _Output:
    """The transcript on stdout in `fmt`, written as far as it goes after each segment: what is
    written in the end is what the file path writes at once."""

    def __init__(self, out: TextIO, fmt: str) -> None:
        self.out, self.fmt, self.written = out, fmt, 0

    def update(self, transcript: Transcript, final: bool = False) -> None:
        if not (final or self.fmt in STREAMED):
            return
        text = render(transcript, self.fmt) + ("\n" if final and self.fmt == "verbose_json" else "")
        self.out.write(text[self.written :])
        self.out.flush()
        self.written = len(text)


@contextmanager
def _first_interrupt_stops(stop: threading.Event, err: TextIO) -> Iterator[None]:
    """Ctrl-C once: the recording ends there and what was heard is transcribed; twice: abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err.write("\ngemma3n: stopping: transcribing what was heard (Ctrl-C again to abort)\n")

    before = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _raw_stdin() -> BinaryIO:
    """stdin's descriptor without Python's buffer: the reading thread, blocked in a read when the
    recording is stopped, then holds no lock that the interpreter's exit would wait for."""
    try:
        return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    except (AttributeError, OSError, ValueError):  # stdin replaced by an object without a descriptor
        return sys.stdin.buffer


def transcribe_stdin(
    load_model: Callable[[], Any],
    *,
    fmt: str = "lines",
    input_format: str = "s16le",
    sample_rate: int = SR,
    partial: bool = False,
    quiet: bool = False,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    **options: Any,
) -> int:
    """`gemma3n transcribe -`: audio from stdin (see pcm.py) transcribed as it arrives, the
    transcript on stdout in `fmt` (speech.render's formats, "lines" for txt), provisional text on
    stderr. The reading starts before the model loads, so no audio waits on it. Returns the
    number of segments."""
    stdin = stdin or _raw_stdin()
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if stdin.isatty():
        raise InputError(f"stdin is a terminal: pipe audio into it, e.g. {RAW_HINT}")
    reader = PcmReader(
        stdin, sample_format=input_format, sample_rate=sample_rate, notice=lambda m: print(f"gemma3n: {m}", file=stderr)
    ).start()
    model = load_model()
    mode = "lines" if partial else ("line" if stderr.isatty() and not quiet else None)
    console = _Console(stderr, mode, echo=not stdout.isatty())
    live = LiveTranscriber(model, on_partial=console.partial if mode else None, **options)
    if mode:
        live.warm_up()
    output, segments, stop = _Output(stdout, fmt), [], threading.Event()
    task = "translate" if options.get("translate_to") else "transcribe"
    with _first_interrupt_stops(stop, stderr):
        for segment in live.run(reader.chunks, stop):
            segments.append(segment)
            console.committed(segment)
            output.update(Transcript(joined_text(segments), segments, live.seconds, options.get("language"), task))
    console.committed(None)
    output.update(Transcript(joined_text(segments), segments, live.seconds, options.get("language"), task), True)
    return len(segments)
