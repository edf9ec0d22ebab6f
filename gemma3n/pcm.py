"""Audio from a pipe, read as it arrives (`gemma3n transcribe -`).

What may come: raw PCM (by default signed 16-bit little-endian mono at 16 kHz; or 32-bit float,
or another sample rate, as the caller says), or a WAV stream, whose header says the same (what
`arecord` writes unless told `-t raw`, or `ffmpeg -f wav -`). Both are decoded chunk by chunk, as
they arrive, into 16 kHz float32 mono: integers scaled to [-1, 1) as libsndfile scales them,
channels averaged and other rates resampled by soxr (its streaming resampler gives the same
samples as its whole-clip one), so the samples are the ones `audio.load_audio` makes of the same
audio in a file. Other files piped in (FLAC, Ogg, MP3, WAV with other sample types) are read to
the end and decoded whole, as a file would be.

The reading runs in a thread of its own: a slow model never holds up the producer.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError

SR = 16_000
RAW_FORMATS = {"s16le": "<i2", "f32le": "<f4"}  # --input-format: numpy types of raw samples
RAW_HINT = "ffmpeg -i IN -f s16le -ac 1 -ar 16000 - | gemma3n transcribe -"
# Files decoded whole once they end: their first bytes, and what they are
CONTAINERS = {b"OggS": "Ogg", b"fLaC": "FLAC", b"ID3": "MP3", b"FORM": "AIFF", b"caff": "CAF", b".snd": "AU"}
_UNKNOWN_SIZE = 0x7FFF0000  # a WAV size from here up (or 0) means "until the stream ends"
_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 1, 3, 0xFFFE


class _Decoder:
    """Bytes of interleaved samples -> 16 kHz float32 mono, chunk by chunk."""

    def __init__(self, dtype: str, channels: int = 1, rate: int = SR) -> None:
        self.dtype, self.channels, self.rate = np.dtype(dtype), channels, rate
        self.frame = self.dtype.itemsize * channels
        self.rest = b""
        self.resampler = None
        if rate != SR:
            import soxr

            self.resampler = soxr.ResampleStream(rate, SR, 1, dtype="float32", quality="HQ")

    def __call__(self, data: bytes, last: bool = False) -> np.ndarray:
        data = self.rest + data
        whole = len(data) // self.frame * self.frame
        self.rest = data[whole:]
        wave = np.frombuffer(data[:whole], self.dtype)
        if self.dtype.kind == "i":
            wave = wave.astype(np.float32) / np.float32(np.iinfo(self.dtype).max + 1)
        elif not np.isfinite(wave).all():
            raise InputError("stdin holds NaN or infinite samples: is it really float PCM? (--input-format)")
        wave = wave.astype(np.float32, copy=False).reshape(-1, self.channels)
        wave = wave.reshape(-1) if self.channels == 1 else wave.mean(axis=1)
        if self.resampler is not None:
            wave = self.resampler.resample_chunk(wave, last=last)
        return np.ascontiguousarray(wave, dtype=np.float32)


class PcmReader:
    """Reads `stream` (binary) in a thread: 16 kHz float32 mono chunks on `chunks` as they
    arrive, then None at the end; an InputError in the stream's place if it cannot be read.
    `notice` receives one-line remarks (a file decoded whole, a WAV shorter than its header)."""

    def __init__(
        self,
        stream: Any,
        *,
        sample_format: str = "s16le",
        sample_rate: int = SR,
        notice: Callable[[str], None] | None = None,
        read_size: int = 8192,
    ) -> None:
        if sample_format not in RAW_FORMATS:
            raise InputError(f"--input-format must be one of {', '.join(RAW_FORMATS)}, not {sample_format!r}")
        if not sample_rate > 0:
            raise InputError(f"--sample-rate must be more than 0, not {sample_rate}")
        self.stream, self.format, self.rate = stream, sample_format, int(sample_rate)
        self.notice = notice or (lambda message: None)
        self.read = getattr(stream, "read1", None) or stream.read
        self.size = read_size
        self.chunks: queue.Queue = queue.Queue()
        self.description = f"raw {sample_format} PCM at {self.rate} Hz"
        self._thread = threading.Thread(target=self._run, name="gemma3n-audio-in", daemon=True)

    def start(self) -> PcmReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._read()
        except InputError as e:
            self.chunks.put(e)
        except (OSError, ValueError) as e:  # a closed or unreadable stream
            self.chunks.put(InputError(f"cannot read audio from stdin: {e}"))
        else:
            self.chunks.put(None)

    def _more(self) -> bytes:
        return self.read(self.size)

    def _head(self, n: int, data: bytes = b"") -> bytes:
        """At least `n` bytes (fewer only at the end of the stream)."""
        while len(data) < n and (more := self._more()):
            data += more
        return data

    def _read(self) -> None:
        head = self._head(12)
        if not head:
            raise InputError(f"no audio on stdin (it ended before any byte came); pipe audio into it, e.g. {RAW_HINT}")
        if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
            self._wav(head)
            return
        kind = next((name for magic, name in CONTAINERS.items() if head.startswith(magic)), None)
        kind = "RIFF" if head[:4] in (b"RIFF", b"RF64") else kind
        if kind is not None:
            self._whole(head, f"stdin holds a {kind} file, not raw PCM")
            return
        decode = _Decoder(RAW_FORMATS[self.format], 1, self.rate)
        self._stream(decode, head, None)

    def _stream(self, decode: _Decoder, data: bytes, size: int | None) -> None:
        """Decoded chunks until the end of the stream, or `size` bytes of samples."""
        got = 0
        while data:
            if size is not None:
                data = data[: size - got]
            got += len(data)
            wave = decode(data)
            if len(wave):
                self.chunks.put(wave)
            data = self._more() if size is None or got < size else b""
        if decode.rest and size is None:
            n, width = len(decode.rest), decode.frame
            raise InputError(
                f"stdin ended inside a sample: {n} byte{'s' if n != 1 else ''} left over, but {self.description} "
                f"comes in whole {width}-byte samples; is it really {self.description}? (--input-format, --sample-rate)"
            )
        if decode.resampler is not None:
            self.chunks.put(decode(b"", last=True))
        if size is not None and got < size:
            self.notice(f"the WAV stream ended after {got} of the {size} bytes of audio its header declares")

    def _whole(self, data: bytes, why: str) -> None:
        """Everything to the end of the stream, decoded as a file."""
        from .audio import load_audio

        self.notice(f"{why}: it is decoded once it ends (for text as it comes, pipe raw PCM: {RAW_HINT})")
        parts = [data]
        while more := self._more():
            parts.append(more)
        self.chunks.put(load_audio(b"".join(parts), sampling_rate=SR))

    def _wav(self, data: bytes) -> None:
        """A WAV header, then its samples as they come (or the whole file, for sample types
        other than 16/32-bit integers and 32-bit floats)."""
        at, fmt = 12, None
        while True:
            data = self._head(at + 8, data)
            if len(data) < at + 8:
                raise InputError("stdin holds a WAV header that ends before its audio")
            tag, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
            if tag == b"data":
                break
            data = self._head(at + 8 + size + (size & 1), data)
            if tag == b"fmt ":
                fmt = data[at + 8 : at + 8 + size]
            at += 8 + size + (size & 1)
        sample = _wav_sample_type(fmt)
        if sample is None:
            self._whole(data, "stdin holds a WAV stream whose samples are not 16/32-bit integers or 32-bit floats")
            return
        dtype, channels, rate = sample
        self.description = f"WAV ({np.dtype(dtype).name}, {channels} channel{'s' if channels > 1 else ''}, {rate} Hz)"
        known = 0 < size < _UNKNOWN_SIZE
        self._stream(_Decoder(dtype, channels, rate), data[at + 8 :], size if known else None)


def _wav_sample_type(fmt: bytes | None) -> tuple[str, int, int] | None:
    """(numpy type, channels, rate) of a WAV `fmt ` chunk, if streamed here."""
    if fmt is None or len(fmt) < 16:
        raise InputError("stdin holds a WAV stream without a format chunk before its audio")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _WAVE_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the plain tag
    types = {(_WAVE_PCM, 16): "<i2", (_WAVE_PCM, 32): "<i4", (_WAVE_FLOAT, 32): "<f4"}
    if (tag, bits) not in types or not channels or not rate:
        return None
    return types[tag, bits], channels, rate
