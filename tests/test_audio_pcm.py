"""Audio from a pipe (gemma3n.pcm): raw PCM and WAV streams decoded as they arrive into the same
16 kHz samples `load_audio` makes of the same audio in a file, whatever the pieces the pipe
delivers; files of other kinds decoded whole at the end; one clear error for a stream that
cannot be audio."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from gemma3n.audio import load_audio
from gemma3n.errors import InputError
from gemma3n.pcm import PcmReader

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

SR = 16_000


def _wave(seconds: float = 1.5, sr: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([mono * (1 - 0.3 * c) for c in range(channels)], 1).astype(np.float32).squeeze()


def _file(wave: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, wave, sr, format=fmt, subtype=subtype)
    return out.getvalue()


class _Pipe(io.RawIOBase):
    """A stream that hands out at most `piece` bytes a read, as a pipe may."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.at, self.piece = data, 0, piece

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out = self.data[self.at : self.at + min(n if n >= 0 else len(self.data), self.piece)]
        self.at += len(out)
        return out


def _read(data: bytes, piece: int = 8192, **kw) -> tuple[np.ndarray, list[str]]:
    """All the samples a reader makes of `data`, and its notices."""
    notices: list[str] = []
    reader = PcmReader(_Pipe(data, piece), notice=notices.append, **kw).start()
    chunks = []
    while (item := reader.chunks.get(timeout=60)) is not None:
        if isinstance(item, BaseException):
            raise item
        chunks.append(item)
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), notices


@pytest.mark.parametrize("piece", [1, 3, 37, 8192])
def test_raw_s16le_in_any_pieces_is_the_wav_files_samples(piece):
    data = _file(_wave())
    pcm = sf.read(io.BytesIO(data), dtype="int16")[0].astype("<i2").tobytes()
    got, notices = _read(pcm, piece)
    assert np.array_equal(got, load_audio(data)) and not notices


@pytest.mark.parametrize("piece", [5, 4096])
def test_raw_f32le_at_another_rate_is_resampled_as_a_file_is(piece):
    wave = _wave(sr=44_100)
    got, _ = _read(wave.astype("<f4").tobytes(), piece, sample_format="f32le", sample_rate=44_100)
    assert np.array_equal(got, load_audio(_file(wave, 44_100, subtype="FLOAT")))


@pytest.mark.parametrize(
    "sr,channels,subtype", [(SR, 1, "PCM_16"), (44_100, 2, "PCM_16"), (48_000, 2, "FLOAT"), (22_050, 3, "PCM_32")]
)
def test_a_piped_wav_streams_with_its_own_format(sr, channels, subtype):
    data = _file(_wave(sr=sr, channels=channels), sr, subtype=subtype)  # 3 channels: WAVE_FORMAT_EXTENSIBLE
    got, notices = _read(data, 1000)
    assert np.array_equal(got, load_audio(data)) and not notices


def _wav_stream(pcm: bytes, size: int = 0x7FFFFFFF) -> bytes:
    """A WAV header as a recorder writes to a pipe (length unknown), a LIST chunk before the data."""
    fmt = struct.pack("<HHIIHH", 1, 1, SR, 2 * SR, 2, 16)
    return (
        b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
        + b"LIST" + struct.pack("<I", 5) + b"INFOx\x00" + b"data" + struct.pack("<I", size) + pcm
    )  # fmt: skip


def test_a_recorders_wav_stream_of_unknown_length_is_read_to_the_end():
    pcm = (_wave() * 32767).astype("<i2").tobytes()
    got, notices = _read(_wav_stream(pcm), 777)
    assert np.array_equal(got, _read(pcm)[0]) and not notices


def test_a_wav_stream_ends_at_its_declared_size_and_says_when_it_is_short():
    pcm = (_wave() * 32767).astype("<i2").tobytes()
    got, notices = _read(_wav_stream(pcm, 2000) + b"LIST-and-more")  # what follows the data is not audio
    assert len(got) == 1000 and not notices
    got, notices = _read(_wav_stream(pcm, len(pcm) + 640))
    assert len(got) == len(pcm) // 2 and "ended after" in notices[0]


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("WAV", "PCM_24")])
def test_other_files_piped_in_are_decoded_whole_at_the_end(fmt, subtype):
    data = _file(_wave(), fmt=fmt, subtype=subtype)
    got, notices = _read(data, 1000)
    assert np.array_equal(got, load_audio(data))
    assert len(notices) == 1 and "decoded once it ends" in notices[0] and "s16le" in notices[0]


@pytest.mark.parametrize(
    "data,kw,match",
    [
        (b"", {}, "no audio on stdin"),
        (b"\x01\x02\x03", {}, "1 byte left over.*2-byte samples"),
        (b"\x00" * 10, {"sample_format": "f32le"}, "2 bytes left over.*4-byte samples"),
        (np.array([0.1, np.nan], "<f4").tobytes(), {"sample_format": "f32le"}, "NaN or infinite"),
        (b"RIFF\xff\xff\xff\xffWAVEfmt ", {}, "WAV header that ends before its audio"),
        (b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00", {}, "without a format chunk"),
        (b"OggS" + b"\x00" * 200, {}, "cannot decode audio"),
    ],
    ids=["empty", "odd-byte", "f32-partial", "nan", "cut-header", "no-fmt", "not-ogg"],
)
def test_streams_that_cannot_be_audio_are_one_clear_error(data, kw, match):
    with pytest.raises(InputError, match=match):
        _read(data, **kw)


def test_bad_options_are_refused_before_reading():
    with pytest.raises(InputError, match="--sample-rate"):
        PcmReader(io.BytesIO(b""), sample_rate=0)
    with pytest.raises(InputError, match="--input-format"):
        PcmReader(io.BytesIO(b""), sample_format="s24le")
