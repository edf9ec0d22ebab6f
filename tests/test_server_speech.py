"""OpenAI's speech endpoints and `gemma3n transcribe --format` on the random multimodal test
checkpoint (random weights: the words are noise, the framing, segments and times are what is
tested), with real speech (tests/data/speech.ogg, 6.7 s of espeak-ng) so the detector finds some."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
srt = pytest.importorskip("srt")
pytest.importorskip("silero_vad")
sf = pytest.importorskip("soundfile")
httpx = pytest.importorskip("httpx")

import gemma3n  # noqa: E402
from gemma3n.server import BackgroundServer, create_app  # noqa: E402
from gemma3n.speech import SR, speech_windows  # noqa: E402

SPEECH = Path(__file__).parent / "data" / "speech.ogg"


def _speech() -> np.ndarray:
    wave, sr = sf.read(SPEECH, dtype="float32")
    assert sr == SR
    return wave


def _wav(wave: np.ndarray, fmt: str = "WAV") -> bytes:
    out = io.BytesIO()
    sf.write(out, wave, SR, format=fmt, subtype="PCM_16")
    return out.getvalue()


def _talk(gaps_s: list[float]) -> np.ndarray:
    """The speech clip after each gap of silence: [gap, speech, gap, speech, ...]."""
    speech = _speech()
    return np.concatenate([p for g in gaps_s for p in (np.zeros(int(g * SR), np.float32), speech)])


@pytest.fixture(scope="module")
def served(mm_checkpoint):
    model = gemma3n.load(mm_checkpoint[2])
    app = create_app(model, max_audio_bytes=2 * 1024 * 1024, max_audio_seconds=90)
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=300)
        yield srv, client, client.models.list().data[0].id


def test_windows_cover_the_speech_and_skip_the_silence():
    wave = _talk([2.0, 12.0, 3.0])  # speech at 2-8.7 s, 20.7-27.3 s, 30.3-37 s
    windows = speech_windows(wave)
    assert all((w.end - w.start) / SR <= 30 for w in windows)
    assert windows[0].start / SR > 1.5  # the leading silence is not sent
    covered = np.zeros(len(wave), bool)
    for w in windows:
        covered[w.start : w.end] = True
    speech_starts = [2.0, 20.67, 30.33]
    assert all(covered[int((s + 1) * SR)] for s in speech_starts)
    assert not any(w.overlaps_previous for w in windows)


def test_one_long_stretch_of_speech_is_cut_inside_with_overlap(monkeypatch):
    import gemma3n.vad

    wave = np.random.default_rng(0).standard_normal(70 * SR).astype(np.float32) * 0.1
    monkeypatch.setattr(gemma3n.vad, "speech_spans", lambda w: [(SR, 66 * SR)])
    windows = speech_windows(wave)
    assert len(windows) == 3 and all((w.end - w.start) / SR <= 30 for w in windows)
    assert windows[0].start == SR and windows[-1].end == 66 * SR
    assert [w.overlaps_previous for w in windows] == [False, True, True]  # noise everywhere: no silent cut


def test_srt_from_the_openai_client(served):
    _, client, mid = served
    wave = _talk([1.0, 4.0])
    text = client.audio.transcriptions.create(model=mid, file=("talk.wav", _wav(wave)), response_format="srt")
    subtitles = list(srt.parse(text))
    assert subtitles and [s.index for s in subtitles] == list(range(1, len(subtitles) + 1))
    assert all(0 <= s.start.total_seconds() < s.end.total_seconds() <= len(wave) / SR for s in subtitles)
    assert subtitles[0].start.total_seconds() > 0.5  # the first second is silence


def test_json_verbose_vtt_and_text_agree(served):
    srv, client, mid = served
    audio = ("talk.wav", _wav(_talk([1.0])))
    plain = client.audio.transcriptions.create(model=mid, file=audio, response_format="json")
    verbose = client.audio.transcriptions.create(model=mid, file=audio, response_format="verbose_json")
    assert verbose.text == plain.text and verbose.duration == pytest.approx(7.67, abs=0.05)
    assert verbose.segments and verbose.segments[0].start > 0.5 and verbose.segments[-1].end <= 7.7
    assert " ".join(s.text for s in verbose.segments if s.text) == plain.text
    vtt = client.audio.transcriptions.create(model=mid, file=audio, response_format="vtt")
    assert vtt.startswith("WEBVTT") and "-->" in vtt
    text = client.audio.transcriptions.create(model=mid, file=audio, response_format="text")
    assert text.strip() == plain.text
    translated = client.audio.translations.create(model=mid, file=audio)
    assert isinstance(translated.text, str)


def test_transcription_streams_segment_by_segment(served):
    _, client, mid = served
    audio = ("talk.wav", _wav(_talk([1.0, 6.0])))
    whole = client.audio.transcriptions.create(model=mid, file=audio)
    events = list(client.audio.transcriptions.create(model=mid, file=audio, stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == whole.text
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert "".join(deltas) == whole.text


def _post(srv, files=None, data=None, **kw):
    return httpx.post(f"{srv.base_url}/audio/transcriptions", files=files, data=data, timeout=120, **kw)


@pytest.mark.parametrize(
    "files,data,status,param",
    [
        ({"file": ("big.wav", b"\0" * (2 * 1024 * 1024 + 1))}, {}, 413, None),
        ({"file": ("x.txt", b"this is not audio at all")}, {}, 400, None),
        ({}, {"model": "whisper-1"}, 400, "file"),
        ({"file": ("a.wav", b"RIFF")}, {"response_format": "srt", "stream": "true"}, 400, "stream"),
        ({"file": ("a.wav", b"RIFF")}, {"response_format": "docx"}, 400, "response_format"),
        ({"file": ("a.wav", b"RIFF")}, {"temperature": "warm"}, 400, "temperature"),
        ({"file": ("a.wav", b"RIFF")}, {"timestamp_granularities[]": "word"}, 400, "timestamp_granularities"),
    ],
    ids=["too-large", "not-audio", "no-file", "stream-srt", "format", "temperature", "word-timestamps"],
)
def test_bad_uploads_are_4xx(served, files, data, status, param):
    srv = served[0]
    r = _post(srv, files=files or {"unused": ("u", b"")}, data=data)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"] and (param is None or err["param"] == param)


def test_audio_longer_than_the_limit_is_400(served):
    srv = served[0]
    r = _post(srv, files={"file": ("long.flac", _wav(np.zeros(91 * SR, np.float32), "FLAC"))})  # small: silence
    assert r.status_code == 400 and "at most 90 s" in r.json()["error"]["message"]


def test_json_body_is_415(served):
    srv = served[0]
    r = httpx.post(f"{srv.base_url}/audio/transcriptions", json={"file": "x"}, timeout=20)
    assert r.status_code == 415


def test_a_text_only_model_cannot_transcribe(tiny_text_dir):
    from fastapi.testclient import TestClient

    with TestClient(create_app(gemma3n.load(tiny_text_dir))) as c:
        r = c.post("/v1/audio/transcriptions", files={"file": ("a.wav", _wav(_speech()))})
    assert r.status_code == 400 and "audio tower" in r.json()["error"]["message"]


def test_cli_transcribe_formats(mm_checkpoint, tmp_path, capsys):
    from gemma3n.cli import main

    path = tmp_path / "talk.wav"
    path.write_bytes(_wav(_talk([1.0])))
    assert (
        main(["transcribe", "-m", str(mm_checkpoint[2]), str(path), "--format", "srt", "-q", "--max-tokens", "8"]) == 0
    )
    assert list(srt.parse(capsys.readouterr().out))
    assert (
        main(["transcribe", "-m", str(mm_checkpoint[2]), str(path), "--format", "json", "-q", "--max-tokens", "8"]) == 0
    )
    body = json.loads(capsys.readouterr().out)
    assert body["segments"] and body["duration"] == pytest.approx(7.67, abs=0.05)
