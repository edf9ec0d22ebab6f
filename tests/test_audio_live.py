"""Transcription of audio as it arrives (gemma3n.live, `gemma3n transcribe -`): the windows
planned while a recording arrives are the whole file's, in any chunking, so the transcript is the
file path's; provisional text comes before the recording ends. Real speech (tests/data/speech.ogg,
espeak-ng) for the detector; the random multimodal test checkpoint for the model (its words are
noise: sameness is what is tested)."""

from __future__ import annotations

import io
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("silero_vad")
sf = pytest.importorskip("soundfile")

import gemma3n  # noqa: E402
from gemma3n.cli import main  # noqa: E402
from gemma3n.errors import InputError  # noqa: E402
from gemma3n.live import LiveTranscriber, StreamingWindows, transcribe_stdin  # noqa: E402
from gemma3n.speech import SR, speech_windows, transcribe_segments  # noqa: E402
from gemma3n.vad import SpeechTracker, speech_spans  # noqa: E402

SPEECH, _ = sf.read(Path(__file__).parent / "data" / "speech.ogg", dtype="float32")


def _gap(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def _recording(name: str) -> np.ndarray:
    s = SPEECH
    if name == "pauses":  # short and long pauses: stretches grouped, windows closed by the limit
        parts = [_gap(1.0), s, _gap(0.6), s[: 4 * SR], _gap(2.5), s, _gap(0.2), s[SR:], _gap(0.4)]
    elif name == "long":  # pauses too short to split: stretches longer than a 3 s window, cut inside
        parts = [s, _gap(0.1), s, _gap(0.15), s[: 5 * SR]]
    elif name == "talk":  # two windows of 30 s
        parts = [_recording("pauses"), _gap(3.0), s]
    elif name == "edges":  # speech from the first sample to the last, pauses near the detector's limits
        parts = [s[3000:], _gap(0.31), s, _gap(0.45), s[: 3 * SR]]
    else:
        raise ValueError(name)
    return np.concatenate(parts)


def _stream(wave: np.ndarray, sizes: list[int], max_seconds: float) -> tuple[list, list[int]]:
    """The windows a StreamingWindows returns for `wave` fed in pieces of `sizes` (cycled), and
    how many samples had come when each was returned."""
    planner, windows, when, at, k = StreamingWindows(max_seconds), [], [], 0, 0
    while at < len(wave):
        new = planner.feed(wave[at : at + sizes[k % len(sizes)]])
        at, k = at + sizes[k % len(sizes)], k + 1
        windows += new
        when += [at] * len(new)
    windows += planner.finish()
    return windows, when + [len(wave)] * (len(windows) - len(when))


@pytest.mark.parametrize(
    "name,max_seconds,chunk",
    [
        ("pauses", 10, 16),  # 1 ms pieces split every frame of the detector
        ("pauses", 10, 592),  # 37 ms
        ("pauses", 3, SR),
        ("long", 3, 592),
        ("long", 3, SR),
        ("edges", 10, 16),
        ("edges", 3, 592),
    ],
)
def test_windows_as_the_audio_arrives_are_the_whole_files(name, max_seconds, chunk):
    wave = _recording(name)
    windows, when = _stream(wave, [chunk], max_seconds)
    assert windows == speech_windows(wave, max_seconds)
    if name == "long":
        assert any(w.overlaps_previous for w in windows)  # the cut inside a stretch is exercised
    # a window is returned once it is final, most of them well before the end
    assert sum(t < len(wave) for t in when) >= len(windows) - 2
    assert all(t >= w.end for t, w in zip(when, windows))


def test_windows_are_the_whole_files_for_random_recordings_and_pieces():
    rng = np.random.default_rng(1)
    for trial in range(4):
        parts = []
        for _ in range(rng.integers(3, 7)):
            a = int(rng.integers(0, len(SPEECH) // 2))
            b = int(rng.integers(a + SR // 4, len(SPEECH)))
            parts += [_gap(rng.uniform(0.02, 1.6)), SPEECH[a:b] * np.float32(rng.uniform(0.3, 1.5))]
        wave = np.concatenate(parts)
        sizes = [int(n) for n in rng.choice([1, 37, 511, 513, 4000, SR, 40_000], 50)]
        max_seconds = [3.0, 10.0][trial % 2]
        assert _stream(wave, sizes, max_seconds)[0] == speech_windows(wave, max_seconds), trial


def test_the_detector_keeps_its_work_bounded_and_finds_the_whole_files_spans():
    wave = np.concatenate([_recording("pauses")] * 3)
    tracker, spans = SpeechTracker(), []
    for at in range(0, len(wave), 4000):
        spans += tracker.feed(wave[at : at + 4000])
        assert len(tracker._probs) < 40 * SR // 512  # the scores before a long pause are let go
    assert spans + tracker.finish() == speech_spans(wave)
    assert tracker._base > 0


@pytest.fixture(scope="module")
def model(mm_checkpoint):
    return gemma3n.load(mm_checkpoint[2])


def _chunks(wave: np.ndarray, size: int = 4000) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    for at in range(0, len(wave), size):
        q.put(wave[at : at + size])
    q.put(None)
    return q


def test_live_segments_are_the_files_including_windows_cut_inside_speech(model):
    wave = _recording("long")
    options = dict(max_seconds=3.0, max_tokens_per_window=6)
    expected = list(transcribe_segments(model, wave, **options))
    got = list(LiveTranscriber(model, **options).run(_chunks(wave)))
    assert got == expected and any(s.seek for s in got)


def test_provisional_text_comes_before_the_recording_ends(model):
    """The recording is fed slowly: after its first stretch of speech the feeder waits for
    provisional text (no time limit in the assertion: the order of events is what counts)."""
    wave, events, seen = _recording("pauses"), [], threading.Event()
    q: queue.Queue = queue.Queue()

    def on_partial(p):
        events.append(("partial", p.start, p.end))
        seen.set()

    def feed():
        for at in range(0, len(wave), 1600):
            q.put(wave[at : at + 1600])
            if at == 4 * SR:  # speech started at 1 s
                seen.wait(120)
        events.append(("end",))
        q.put(None)

    threading.Thread(target=feed, daemon=True).start()
    live = LiveTranscriber(model, on_partial=on_partial, max_tokens_per_window=6)
    segments = list(live.run(q))
    assert events[0][0] == "partial" and events.index(("end",)) > 0
    assert 0.8 < events[0][1] < 1.2 and events[0][2] <= 4.2  # the open speech, up to what had come
    assert segments == list(transcribe_segments(model, wave, max_tokens_per_window=6))


def test_stop_ends_the_recording_where_it_has_come_to(model):
    """Ctrl-C in `transcribe -`: what has come is transcribed as a whole recording."""
    wave, stop = _recording("pauses"), threading.Event()
    q: queue.Queue = queue.Queue()
    for at in range(0, 9 * SR, 4000):  # and no end of the stream
        q.put(wave[at : at + 4000])
    stop.set()
    live = LiveTranscriber(model, max_tokens_per_window=6)
    segments = list(live.run(q, stop))
    assert live.seconds == 9.0 and segments
    assert segments == list(transcribe_segments(model, wave[: 9 * SR], max_tokens_per_window=6))


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def _cli(monkeypatch, capsys, argv: list[str], data: bytes | None = None) -> tuple[int, str, str]:
    if data is not None:
        monkeypatch.setattr(sys, "stdin", _Stdin(data))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _wav_bytes(wave: np.ndarray, sr: int = SR, subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, wave, sr, format="WAV", subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "json"])
def test_cli_stdin_prints_what_the_file_path_prints(mm_checkpoint, tmp_path, monkeypatch, capsys, fmt):
    wav = _wav_bytes(_recording("talk"))
    path = tmp_path / "talk.wav"
    path.write_bytes(wav)
    args = ["transcribe", "-m", str(mm_checkpoint[2]), "--max-tokens", "6", "--format", fmt, "-q"]
    code, from_file, _ = _cli(monkeypatch, capsys, [*args, str(path)])
    pcm = sf.read(io.BytesIO(wav), dtype="int16")[0].astype("<i2").tobytes()
    code_in, from_stdin, err = _cli(monkeypatch, capsys, [*args, "-"], pcm)
    assert code == code_in == 0 and from_stdin == from_file and from_file.strip()
    assert "segment" in err
    if fmt == "txt":  # a line per segment
        assert len(from_file.splitlines()) >= 2


def test_cli_stdin_takes_a_piped_wav_of_another_rate(mm_checkpoint, tmp_path, monkeypatch, capsys):
    wave = _recording("edges")
    wav = _wav_bytes(np.stack([wave, 0.5 * wave], 1), 22_050, "FLOAT")  # stereo float, resampled
    path = tmp_path / "talk.wav"
    path.write_bytes(wav)
    args = ["transcribe", "-m", str(mm_checkpoint[2]), "--max-tokens", "6", "-q"]
    from_file = _cli(monkeypatch, capsys, [*args, str(path)])[1]
    assert _cli(monkeypatch, capsys, [*args, "-"], wav)[1] == from_file


@pytest.mark.parametrize(
    "data,extra,match",
    [
        (b"", [], "no audio on stdin"),
        (b"\x00\x01" * 8000 + b"\x02", [], "1 byte left over"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt \x10\x00", [], "WAV header that ends before its audio"),
        (b"", ["--sample-rate", "-1"], "--sample-rate must be more than 0"),
    ],
    ids=["empty", "odd-byte", "cut-wav", "rate"],
)
def test_cli_stdin_errors_are_one_line(mm_checkpoint, monkeypatch, capsys, data, extra, match):
    code, out, err = _cli(monkeypatch, capsys, ["transcribe", "-m", str(mm_checkpoint[2]), "-", *extra], data)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("gemma3n: error:") and match in err


def test_cli_stdin_options_are_refused_for_a_file(mm_checkpoint, tmp_path, monkeypatch, capsys):
    path = tmp_path / "a.wav"
    path.write_bytes(_wav_bytes(SPEECH))
    code, _, err = _cli(monkeypatch, capsys, ["transcribe", "-m", str(mm_checkpoint[2]), str(path), "--partial"])
    assert code == 2 and "for audio on stdin" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stdin_on_a_terminal_is_refused_before_the_model_loads():
    class Keyboard(io.BytesIO):
        def isatty(self) -> bool:
            return True

    with pytest.raises(InputError, match="terminal"):
        transcribe_stdin(lambda: pytest.fail("loaded"), stdin=Keyboard(), stdout=io.StringIO(), stderr=io.StringIO())


def _slow_pipe(data: bytes, piece: int, seen: threading.Event) -> io.BufferedReader:
    """A pipe written in pieces; after the first 4 s it waits for provisional text to show."""
    import os

    r, w = os.pipe()

    def write():
        with os.fdopen(w, "wb") as out:
            for at in range(0, len(data), piece):
                out.write(data[at : at + piece])
                out.flush()
                if at == 4 * 2 * SR:
                    seen.wait(120)

    threading.Thread(target=write, daemon=True).start()
    return os.fdopen(r, "rb")


class _Watched(io.StringIO):
    def __init__(self, seen: threading.Event, tty: bool = False) -> None:
        super().__init__()
        self.seen, self.tty = seen, tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        if "partial" in text or "\r" in text:
            self.seen.set()
        return super().write(text)


@pytest.mark.parametrize("tty", [False, True], ids=["--partial", "terminal"])
def test_stdin_shows_provisional_text_on_stderr_and_commits_lines(model, tty):
    pcm = (_recording("talk") * 32767).astype("<i2").tobytes()
    seen = threading.Event()
    out, err = io.StringIO(), _Watched(seen, tty)
    n = transcribe_stdin(
        lambda: model, stdin=_slow_pipe(pcm, 3200, seen), stdout=out, stderr=err, partial=not tty,
        max_tokens_per_window=6,
    )  # fmt: skip
    assert seen.is_set() and n >= 2 and out.getvalue().strip()
    shown = err.getvalue()
    if tty:  # one line rewritten in place; committed text echoed there, as stdout is not the terminal
        assert "\r\x1b[K" in shown and out.getvalue().splitlines()[0] in shown and "partial" not in shown
    else:
        assert shown.startswith("partial 0.9") and "\r" not in shown
