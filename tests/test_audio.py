"""Audio input: decoding, feature-extractor parity with transformers, token counts, windowing."""

import io
import json

import numpy as np
import pytest
import torch

from gemma3n.audio import (
    AudioFeatureExtractor,
    load_audio,
    plan_windows,
    soft_tokens_for_duration,
)
from gemma3n.errors import InputError
from gemma3n.speech import (
    LOOP_COMPRESSION_RATIO,
    Window,
    WindowTranscriber,
    compression_ratio,
    fallback_temperatures,
    stitch_transcripts,
)

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

SR = 16000


def tone(seconds: float, freq: float = 440.0, seed: int = 0, sr: int = SR, noise: float = 0.05) -> np.ndarray:
    """A sine plus a little noise, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.size)).astype(np.float32)


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", None)])
def test_load_audio_formats_downmix_resample(tmp_path, fmt, subtype):
    left, right = tone(1.0, 440, sr=44100, noise=0), tone(1.0, 440, sr=44100, noise=0) * 0.5
    stereo = np.stack([left, right], axis=1)  # [N, 2] at 44.1 kHz
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 44100, format=fmt, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SR) < 0.1 * SR  # lossy codecs add a little delay
    if fmt in ("WAV", "FLAC"):
        ref = tone(1.0, 440, noise=0) * 0.75
        assert np.abs(wave[1000:15000] - ref[1000:15000]).max() < 0.01  # same signal after soxr
    assert np.array_equal(load_audio(path.read_bytes()), wave)


def test_load_audio_arrays():
    mono = tone(0.5)
    assert np.array_equal(load_audio(mono), mono)
    both = np.stack([mono, -mono])
    assert np.allclose(load_audio(both), 0.0) and np.allclose(load_audio(both.T), 0.0)  # [C,N] and [N,C]
    pcm = (mono * 32767).astype(np.int16)
    assert np.abs(load_audio(pcm) - mono).max() < 1e-3
    resampled = load_audio((tone(0.5, sr=48000), 48000))
    assert len(resampled) == SR // 2
    assert np.abs(load_audio(torch.from_numpy(mono).bfloat16()) - mono).max() < 1e-2


def test_load_audio_bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    buf = io.BytesIO()
    sf.write(buf, tone(0.2), SR, format="WAV")
    corrupt.write_bytes(buf.getvalue()[:12] + b"\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt.wav"):
        load_audio(corrupt)
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio at all")
    with pytest.raises(InputError, match=r"cannot decode audio .*notes\.txt"):
        load_audio(text)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    with pytest.raises(InputError, match=r"empty\.wav is empty \(0 samples\)"):
        load_audio(empty)
    with pytest.raises(InputError, match="not found: .*missing.flac"):
        load_audio(tmp_path / "missing.flac")
    with pytest.raises(InputError, match="empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(InputError, match="NaN"):
        load_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(InputError, match="cannot decode audio <bytes>"):
        load_audio(b"\x00\x01\x02 not a file")


# --- feature extractor ----------------------------------------------------------------------------


def hf_features(clips, **kwargs):
    from transformers import Gemma3nAudioFeatureExtractor

    out = Gemma3nAudioFeatureExtractor(**kwargs)(clips, return_tensors="np")
    return out["input_features"], out["input_features_mask"]


@pytest.mark.parametrize(
    "seconds",
    [[1.0], [3.7], [30.0], [1.0, 3.7, 31.0], [0.05, 2.0]],
    ids=["1s", "3.7s", "30s", "batch-1s-3.7s-31s", "batch-50ms-2s"],
)
def test_feature_extractor_matches_transformers(seconds):
    clips = [tone(s, 200 + 300 * i, seed=i) for i, s in enumerate(seconds)]
    ref_features, ref_mask = hf_features(clips)
    features, mask = AudioFeatureExtractor()(clips)
    assert features.dtype == torch.float32 and mask.dtype == torch.bool
    assert features.shape == ref_features.shape and mask.shape == ref_mask.shape
    assert np.abs(features.numpy() - ref_features).max() <= 1e-5
    assert np.array_equal(mask.numpy(), ref_mask)


def test_feature_extractor_reads_processor_files(tmp_path):
    d = {"feature_size": 64, "min_frequency": 60.0, "max_frequency": 7000.0, "preemphasis": 0.9, "unknown": 1}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    fe = AudioFeatureExtractor.from_pretrained(tmp_path)
    clips = [tone(1.3), tone(0.7, 900)]
    features, mask = fe(clips)
    d.pop("unknown")
    ref_features, ref_mask = hf_features(clips, **d)
    assert features.shape[-1] == 64
    assert np.abs(features.numpy() - ref_features).max() <= 1e-5 and np.array_equal(mask.numpy(), ref_mask)

    other = tmp_path / "proc"
    other.mkdir()
    (other / "processor_config.json").write_text(json.dumps({"feature_extractor": {"feature_size": 80}}))
    assert AudioFeatureExtractor.from_pretrained(other).feature_size == 80
    assert AudioFeatureExtractor.from_pretrained(tmp_path / "nothing").feature_size == 128


def test_feature_extractor_rejects_too_short_audio():
    with pytest.raises(InputError, match="too short: 100 samples"):
        AudioFeatureExtractor()([np.ones(100, np.float32)])


def test_soft_token_counts_match_spec():
    counts = {s: soft_tokens_for_duration(s) for s in (0.5, 1, 2, 5, 10, 20, 30, 95)}
    assert counts == {0.5: 3, 1: 7, 2: 13, 5: 32, 10: 63, 20: 125, 30: 188, 95: 188}


# --- long audio -----------------------------------------------------------------------------------


def test_windows_cut_in_silence_and_cover_every_second():
    """95 s: a 0.6 s tone at the start of every second, 0.4 s of silence after it."""
    n_seconds = 95
    wave = np.zeros(n_seconds * SR, np.float32)
    burst = int(0.6 * SR)
    for k in range(n_seconds):
        wave[k * SR : k * SR + burst] = tone(0.6, 300 + 10 * k, seed=k)
    windows = plan_windows(wave, SR, max_seconds=30.0)
    assert len(windows) == 4
    assert windows[0][0] == 0 and windows[-1][1] == len(wave)
    for (_, end), (start, _) in zip(windows, windows[1:]):
        assert start == end  # cuts in silence need no overlap
    assert all(0 < e - s <= 30 * SR for s, e in windows)
    for k in range(n_seconds):  # every second's burst lands whole in exactly one window
        owners = [i for i, (s, e) in enumerate(windows) if s <= k * SR and k * SR + burst <= e]
        touching = [i for i, (s, e) in enumerate(windows) if s < k * SR + burst and k * SR < e]
        assert owners == touching and len(owners) == 1, k


def test_windows_without_silence_overlap_and_cover():
    wave = np.random.default_rng(0).standard_normal(95 * SR).astype(np.float32)
    windows = plan_windows(wave, SR, max_seconds=30.0, overlap_seconds=1.0)
    coverage = np.zeros(len(wave), np.int8)
    for s, e in windows:
        assert 0 < e - s <= 30 * SR
        coverage[s:e] += 1
    assert coverage.min() == 1 and coverage.max() == 2
    for (_, end), (start, _) in zip(windows, windows[1:]):
        assert end - start == SR  # the overlap, centred on the cut
    assert plan_windows(wave[: 20 * SR], SR) == [(0, 20 * SR)]


def test_stitch_transcripts_removes_boundary_duplicates():
    assert (
        stitch_transcripts(["The quick brown fox jumps", "fox jumps over the lazy dog."])
        == "The quick brown fox jumps over the lazy dog."
    )
    assert stitch_transcripts(["brown fox jumps", "ox jumps over"]) == "brown fox jumps over"  # clipped word
    assert stitch_transcripts(["Hello there, friend.", "Friend, how are you", ""]) == (
        "Hello there, friend. how are you"
    )
    assert stitch_transcripts(["I saw a", "a cat"]) == "I saw a a cat"  # short words are not matched alone
    assert stitch_transcripts(["no overlap", "here"]) == "no overlap here"


class _LoopingModel:
    """A stand-in for a model with ears: greedy decoding loops; sampling at `fixed_at` or hotter
    gives the right words. Records every call's options."""

    has_audio = True
    loop = "the children of Gad, " * 12

    def __init__(self, fixed_at: float | None) -> None:
        self.fixed_at, self.calls = fixed_at, []

    def generate(self, messages, **options):
        from types import SimpleNamespace

        self.calls.append(options)
        fixed = self.fixed_at is not None and options["temperature"] >= self.fixed_at - 1e-9
        text = "and the children of Gad came" if fixed else self.loop[: 180 - 10 * len(self.calls)]
        return SimpleNamespace(text=text, token_ids=[1, 2, 3], logprobs=None, finish_reason="stop")


def test_fallback_temperatures_follow_whisper():
    assert fallback_temperatures(0.0) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert fallback_temperatures(0.3) == [0.5, 0.7, 0.9]
    assert fallback_temperatures(1.0) == fallback_temperatures(1.5) == []
    assert compression_ratio(_LoopingModel.loop) > LOOP_COMPRESSION_RATIO
    assert compression_ratio("In the beginning God created the heaven and the earth.") < LOOP_COMPRESSION_RATIO


def test_a_looping_window_is_decoded_again_hotter_and_seeded():
    window = Window(0, SR)
    model = _LoopingModel(fixed_at=0.4)
    segment = WindowTranscriber(model).segment(window, np.zeros(SR, np.float32))
    assert segment.text == "and the children of Gad came"
    assert segment.temperature == 0.4
    assert [c["temperature"] for c in model.calls] == [0.0, 0.2, 0.4]
    assert [c.get("seed") for c in model.calls] == [None, 0, 0]  # the window's number: reproducible

    calls = WindowTranscriber(model := _LoopingModel(fixed_at=0.4), seed=7)
    calls.segment(window, np.zeros(SR, np.float32))
    calls.segment(window, np.zeros(SR, np.float32))
    assert [c["seed"] for c in model.calls] == [7, 7, 7, 7, 8, 8]  # the user's seed (+ the window's number)

    # every try loops: the least repetitive is kept (here the last, the shortest loop)
    segment = WindowTranscriber(model := _LoopingModel(fixed_at=None)).segment(window, np.zeros(SR, np.float32))
    assert len(model.calls) == 6 and segment.temperature == 1.0
    assert segment.text == _LoopingModel.loop[:120].strip()

    # a transcript that does not loop is decoded once; the fallback can be turned off
    model = _LoopingModel(fixed_at=0.0)
    assert WindowTranscriber(model).segment(window, np.zeros(SR, np.float32)).temperature == 0.0
    assert len(model.calls) == 1
    model = _LoopingModel(fixed_at=0.2)
    segment = WindowTranscriber(model, temperature_fallback=False).segment(window, np.zeros(SR, np.float32))
    assert len(model.calls) == 1 and segment.text.startswith("the children of Gad, the children")
