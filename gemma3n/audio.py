"""Audio in: decoding, the log-mel feature extractor, token counts, and long-audio windowing.

Spec: docs/audio-vision.md#feature-extractor (the encoder, in `gemma3n.audio_encoder`:
docs/audio-vision.md#audio-encoder).
The extractor reproduces `Gemma3nAudioFeatureExtractor` (transformers 5.24) step for step,
vectorised over the whole batch.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from gemma3n.audio_encoder import AudioEncoderConfig
from gemma3n.config import read_json_file
from gemma3n.errors import ConfigError, InputError

__all__ = [
    "AudioFeatureExtractor",
    "encoder_windows",
    "header_seconds",
    "load_audio",
    "plan_windows",
    "soft_tokens_for_duration",
]

# ---------------------------------------------------------------------------------------------
# Decoding


# A header may claim a little more than the file holds without anything being lost (sloppy
# writers get container sizes wrong by a few bytes; MP3 decoders trim encoder delay): shortfalls
# up to this are not reported. Container decoders other than libsndfile may only estimate a
# duration, hence the relative margin for them.
_TRUNCATION_TOLERANCE_S = 0.05
_ESTIMATE_TOLERANCE = 0.02
# Chunk sizes from here up mean "length unknown" (a WAV written to a pipe), not a claim.
_UNKNOWN_SIZE = 0x7FFF0000
# libsndfile's header log flags a size that disagrees with the file: "data : 640000 (should be 64000)"
_SIZE_MISMATCH = re.compile(r":\s*(\d+)\s*\(should be (\d+)\)")


def _check_complete(name: str, declared_s: float, held_s: float, tolerance_s: float) -> None:
    if declared_s - held_s > tolerance_s:
        raise InputError(
            f"audio {name} is truncated or its header is wrong: the header declares {declared_s:.2f} s "
            f"but the file holds {held_s:.2f} s; re-encode it (e.g. ffmpeg -i IN OUT.wav) to use what it holds"
        )


# bytes per sample of the uncompressed subtypes, to turn a header's byte count into seconds
_PCM_BYTES = {
    "PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
}  # fmt: skip


def _declared_seconds_from_log(info, file_size: int) -> float | None:
    """The duration a libsndfile header claims when it claims more bytes than the file has.

    For uncompressed formats libsndfile silently caps the frame count at what the file holds and
    only notes the disagreement in its header log (`info.extra_info`), so that log is where a
    lying or truncated header shows. Bytes become seconds at the format's byte rate (PCM), else
    at the file's average rate.
    """
    excess = 0
    for claimed, held in _SIZE_MISMATCH.findall(info.extra_info or ""):
        claimed, held = int(claimed), int(held)
        if held < claimed < _UNKNOWN_SIZE:
            excess = max(excess, claimed - held)
    if not excess:
        return None
    if info.subtype in _PCM_BYTES:
        rate = info.samplerate * info.channels * _PCM_BYTES[info.subtype]
    elif info.duration > 0:
        rate = file_size / info.duration
    else:
        return None
    return info.duration + excess / rate


def _decode(data: bytes | str, name: str) -> tuple[np.ndarray, int]:
    """Encoded file (path or bytes) -> ([N, C] float32, sample rate). soundfile, then PyAV.

    A file holding less audio than its header declares (a truncated download, a lying WAV
    header) is an InputError rather than silently shorter audio.
    """
    import soundfile as sf

    def src():
        return io.BytesIO(data) if isinstance(data, bytes) else data

    try:
        info = sf.info(src())
    except Exception:  # not a format libsndfile knows: PyAV may
        info = None
    if info is not None and info.format == "OGG" and _ogg_truncated(_tail(data, _OGG_MAX_PAGE)):
        # libsndfile decodes the complete pages of a cut Ogg file and says nothing
        raise InputError(f"audio {name} is truncated: its Ogg stream ends before its end-of-stream page")
    try:
        wave, sr = sf.read(src(), dtype="float32", always_2d=True)
    except Exception as sf_error:  # libsndfile raises several types for unknown/corrupt input
        wave, sr, declared = _decode_fallback(src, name, sf_error)
        if info is not None and info.frames > 0 and info.samplerate > 0:  # libsndfile read the header
            declared = info.frames / info.samplerate
        if declared is not None and sr:
            tolerance = max(_TRUNCATION_TOLERANCE_S, _ESTIMATE_TOLERANCE * declared)
            _check_complete(name, declared, wave.shape[0] / sr, tolerance)
        return wave, sr
    if info is not None and info.samplerate > 0:
        size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
        declared = max(info.frames / info.samplerate, _declared_seconds_from_log(info, size) or 0.0)
        _check_complete(name, declared, wave.shape[0] / int(sr), _TRUNCATION_TOLERANCE_S)
    return wave, int(sr)


_OGG_MAX_PAGE = 27 + 255 + 255 * 255  # header, segment table, payload (RFC 3533 §6)


def _tail(data: bytes | str, n: int) -> bytes:
    """The last `n` bytes of encoded audio (bytes or a path), without reading the rest."""
    if isinstance(data, bytes):
        return data[-n:]
    with open(data, "rb") as f:
        f.seek(max(0, f.seek(0, io.SEEK_END) - n))
        return f.read()


def _ogg_truncated(tail: bytes) -> bool:
    """Whether an Ogg file, given its last bytes, stops mid-stream. Ogg declares no length up
    front; a complete stream ends with a whole page flagged end-of-stream (RFC 3533 §6)."""
    at = len(tail)
    while (at := tail.rfind(b"OggS", 0, at)) >= 0 and tail[at + 4 : at + 5] != b"\x00":
        pass  # "OggS" inside a payload is not a page unless stream structure version 0 follows
    if at < 0 or len(tail) < at + 27:
        return True
    flags, segments = tail[at + 5], tail[at + 26]
    table = tail[at + 27 : at + 27 + segments]
    return not flags & 0x04 or len(table) < segments or len(tail) < at + 27 + segments + sum(table)


def _decode_fallback(src, name: str, sf_error: Exception) -> tuple[np.ndarray, int, float | None]:
    # libsndfile names a file object by its repr ("Error opening <_io.BytesIO object at 0x7f..>: ...")
    why = _FILE_OBJECT.sub("it", str(sf_error))
    try:
        import av  # optional: formats libsndfile lacks (m4a, aac, opus in mp4, ...)
    except ImportError:
        raise InputError(
            f"cannot decode audio {name}: {why} (WAV/FLAC/OGG/MP3 are supported; install PyAV for other formats)"
        ) from None
    try:
        return _decode_av(av, src())
    except Exception as av_error:
        why = f"{why}; PyAV: {av_error}"
        raise InputError(f"cannot decode audio {name} (truncated, corrupt or not audio): {why}") from None


_FILE_OBJECT = re.compile(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>")


def _decode_av(av, src) -> tuple[np.ndarray, int, float | None]:
    """-> ([N, C] float32, sample rate, the duration the container declares or None)."""
    with av.open(src) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in resampler.resample(frame)]
        sr = stream.rate
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if not chunks:
        return np.zeros((0, 1), np.float32), sr, declared
    return np.concatenate(chunks, axis=1).T.astype(np.float32), sr, declared  # planar [C, N] -> [N, C]


def _to_mono(wave: np.ndarray, name: str, channel_axis: int | None) -> np.ndarray:
    if wave.ndim == 1:
        return wave
    if wave.ndim == 2 and channel_axis is not None and wave.shape[channel_axis] == 1:
        return wave.reshape(-1)  # a decoded mono file: a view, not a copy of every sample
    if wave.ndim != 2:
        raise InputError(f"audio {name}: expected a 1-D or 2-D array, got shape {wave.shape}")
    if channel_axis is None:  # a caller's array, [C, N] or [N, C]: channels are the short axis
        channel_axis = 0 if wave.shape[0] < wave.shape[1] else 1
    return wave.mean(axis=channel_axis)


def load_audio(src, *, sampling_rate: int = 16000) -> np.ndarray:
    """Any supported source -> float32 mono samples at `sampling_rate`.

    `src`: a path, encoded bytes, an array already at `sampling_rate` ([N], [C, N] or [N, C];
    integer PCM is scaled to [-1, 1]), or a tuple (array, sample_rate) to resample.
    """
    sr, channel_axis = sampling_rate, None
    if isinstance(src, (str, Path)):
        name = str(src)
        if not Path(src).is_file():
            raise InputError(f"audio file not found: {name}")
        wave, sr = _decode(str(src), name)
        channel_axis = 1
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        wave, sr = _decode(bytes(src), name)
        channel_axis = 1
    elif isinstance(src, tuple) and len(src) == 2:
        name = "<array>"
        wave, sr = np.asarray(src[0]), int(src[1])
    else:
        name = "<array>"
        if isinstance(src, torch.Tensor):  # numpy has no bfloat16
            src = src.detach().cpu().float() if src.is_floating_point() else src.detach().cpu()
        wave = np.asarray(src)
    if not (np.issubdtype(wave.dtype, np.number) and not np.iscomplexobj(wave)):
        raise InputError(f"audio {name}: expected real-valued samples, got dtype {wave.dtype}")
    if np.issubdtype(wave.dtype, np.integer):
        wave = wave / float(np.iinfo(wave.dtype).max + 1)
    if wave.size == 0:
        raise InputError(f"audio {name} is empty (0 samples)")
    wave = _to_mono(wave.astype(np.float32, copy=False), name, channel_axis)
    if sr <= 0:
        raise InputError(f"audio {name}: invalid sample rate {sr}")
    if not np.isfinite(wave).all():
        raise InputError(f"audio {name} contains NaN or infinite samples")
    if sr != sampling_rate:
        import soxr

        wave = soxr.resample(wave, sr, sampling_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


def header_seconds(src) -> float | None:
    """The duration a file's header declares, read without decoding the audio: lets a caller
    refuse hours of audio before spending memory on it. None for arrays and unknown formats."""
    if not isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        return None
    import soundfile as sf

    try:
        info = sf.info(str(src) if isinstance(src, (str, Path)) else io.BytesIO(src))
    except Exception:  # missing or not a libsndfile format: load_audio gives the clear error
        return None
    return info.duration if info.frames > 0 else None


# ---------------------------------------------------------------------------------------------
# Feature extractor (docs/audio-vision.md#feature-extractor)


def htk_mel_filterbank(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sampling_rate: int, fft_length: int
) -> np.ndarray:
    """[n_freqs, n_mels] unnormalised HTK triangles; float64 like the reference
    (docs/audio-vision.md#mel-filterbank)."""
    bin_hz = np.arange(n_freqs, dtype=np.float32) * (sampling_rate / fft_length)
    mel = np.linspace(2595.0 * math.log10(1 + f_min / 700), 2595.0 * math.log10(1 + f_max / 700), n_mels + 2)
    edges = 700.0 * (10 ** (mel / 2595.0) - 1.0)  # [n_mels + 2] Hz
    width = np.diff(edges)
    slopes = edges[None, :] - bin_hz[:, None]  # [n_freqs, n_mels + 2]
    rising = -slopes[:, :-2] / width[:-1]
    falling = slopes[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


@dataclass
class AudioFeatureExtractor:
    """Log-mel features of 16 kHz mono clips, as `Gemma3nAudioFeatureExtractor` computes them.

    Field names are the keys of the Hub `preprocessor_config.json`; `max_length` and
    `pad_to_multiple_of` are the reference `__call__` defaults (30 s, 128).
    """

    feature_size: int = 128
    sampling_rate: int = 16000
    padding_value: float = 0.0
    padding_side: str = "right"
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    per_bin_mean: Sequence[float] | None = None
    per_bin_stddev: Sequence[float] | None = None
    max_length: int = 480_000
    pad_to_multiple_of: int = 128

    def __post_init__(self) -> None:
        if self.padding_side != "right":
            raise ConfigError(f"audio padding_side={self.padding_side!r} is not supported (only 'right')")
        self.frame_length = int(round(self.sampling_rate * self.frame_length_ms / 1000.0))
        self.hop_length = int(round(self.sampling_rate * self.hop_length_ms / 1000.0))
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)
        n = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * n / self.frame_length))).astype(np.float32)  # periodic
        self.mel_filters = htk_mel_filterbank(
            self.fft_length // 2 + 1,
            self.min_frequency,
            self.max_frequency,
            self.feature_size,
            self.sampling_rate,
            self.fft_length,
        )
        # truncation length, rounded up to the padding multiple as the reference does
        m = self.pad_to_multiple_of
        self.max_samples = -(-self.max_length // m) * m

    @classmethod
    def from_dict(cls, d: Mapping) -> AudioFeatureExtractor:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> AudioFeatureExtractor:
        """preprocessor_config.json, else processor_config.json["feature_extractor"], else defaults."""
        directory = Path(directory)
        for name, section in (
            ("preprocessor_config.json", None),
            ("processor_config.json", "feature_extractor"),
        ):
            d = read_json_file(directory / name)
            d = d.get(section) if section else d
            if isinstance(d, dict) and d:  # {}: the file is absent
                return cls.from_dict(d)
        return cls()

    def num_frames(self, num_samples: int) -> int:
        """Mel frames for one unpadded clip of `num_samples` (after truncation and padding)."""
        m = self.pad_to_multiple_of
        padded = -(-min(num_samples, self.max_samples) // m) * m
        return max(0, (padded - self.frame_length - 1) // self.hop_length + 1)

    def log_mel(self, batch: np.ndarray) -> np.ndarray:
        """[B, L] float32 -> [B, F, n_mels] float32, F = (L - frame_length - 1) // hop + 1."""
        if self.dither > 0.0:
            batch = batch + self.dither * np.random.randn(*batch.shape).astype(batch.dtype)
        if self.input_scale_factor != 1.0:
            batch = batch * self.input_scale_factor
        # windows of frame_length + 1 samples; the last one only feeds the non-HTK pre-emphasis
        frames = np.lib.stride_tricks.sliding_window_view(batch, self.frame_length + 1, axis=-1)
        frames = frames[:, :: self.hop_length]  # [B, F, frame_length + 1], a view
        p = self.preemphasis
        if p > 0.0 and self.preemphasis_htk_flavor:
            # HTK: per frame, y[0] = (1 - p) x[0], y[j] = x[j] - p x[j-1]
            frames = np.concatenate([frames[..., :1] * (1.0 - p), frames[..., 1:-1] - p * frames[..., :-2]], -1)
        elif p > 0.0:
            frames = frames[..., 1:] - p * frames[..., :-1]
        else:
            frames = frames[..., :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(np.maximum(spectrum @ self.mel_filters, self.mel_floor))  # float64
        if self.per_bin_mean is not None:
            log_mel = log_mel - np.asarray(self.per_bin_mean).reshape(1, 1, -1)
        if self.per_bin_stddev is not None:
            log_mel = log_mel / np.asarray(self.per_bin_stddev).reshape(1, 1, -1)
        return log_mel.astype(np.float32)

    def __call__(self, waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """16 kHz mono clips -> (input_features [N, T, n_mels] float32, input_features_mask [N, T] bool).

        Clips are cut to `max_length`, right-padded to the longest rounded up to
        `pad_to_multiple_of`; frame i is valid iff its first sample is real audio
        (docs/audio-vision.md#padding-and-masks).
        """
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        clips = [np.asarray(w, dtype=np.float32).reshape(-1)[: self.max_samples] for w in waveforms]
        if not clips:
            raise InputError("no audio clips given to the feature extractor")
        m = self.pad_to_multiple_of
        padded = -(-max(len(c) for c in clips) // m) * m
        batch = np.full((len(clips), padded), self.padding_value, dtype=np.float32)
        sample_mask = np.zeros((len(clips), padded), dtype=bool)
        for i, clip in enumerate(clips):
            batch[i, : len(clip)] = clip
            sample_mask[i, : len(clip)] = True
        if padded <= self.frame_length:
            raise InputError(
                f"audio clip too short: {max(len(c) for c in clips)} samples; the feature extractor needs "
                f"more than {self.frame_length} ({self.frame_length_ms:g} ms at {self.sampling_rate} Hz)"
            )
        features = self.log_mel(batch)
        frame_mask = sample_mask[:, :: self.hop_length][:, : features.shape[1]]
        return torch.from_numpy(features), torch.from_numpy(np.ascontiguousarray(frame_mask))


def soft_tokens_for_duration(
    seconds: float,
    feature_extractor: AudioFeatureExtractor | None = None,
    audio_config: Mapping | AudioEncoderConfig | None = None,
) -> int:
    """Encoder outputs for one unpadded clip (docs/audio-vision.md#tokens-per-clip): 1 s -> 7, 10 s -> 63,
    >= 30 s -> 188."""
    fe = feature_extractor or AudioFeatureExtractor()
    cfg = (
        audio_config
        if isinstance(audio_config, AudioEncoderConfig)
        else AudioEncoderConfig.from_dict(audio_config or {})
    )
    t = fe.num_frames(int(round(seconds * fe.sampling_rate)))
    for (k, _), (s, _) in zip(cfg.sscp_conv_kernel_size, cfg.sscp_conv_stride_size):
        t = (t + (k - 1) - k) // s + 1 if t > 0 else 0  # time padded by k - 1 at the end
    return -(-t // cfg.conf_reduction_factor)


# ---------------------------------------------------------------------------------------------
# Audio longer than the 30 s the model was trained on: windows and stitching


def _frame_energy(wave: np.ndarray, frame: int) -> np.ndarray:
    """RMS of consecutive `frame`-sample frames (the tail frame may be short, counted as zero-padded).

    Float32 products summed per frame, with no copy of the clip: an hour of audio stays an hour's
    worth of memory."""
    full = len(wave) // frame
    body = wave[: full * frame].reshape(full, frame)
    energy = np.einsum("ij,ij->i", body, body).astype(np.float64)
    if len(wave) > full * frame:
        tail = wave[full * frame :].astype(np.float64)
        energy = np.append(energy, tail @ tail)
    return np.sqrt(energy / frame)


def plan_windows(
    wave: np.ndarray,
    sr: int,
    max_seconds: float = 30.0,
    overlap_seconds: float = 1.0,
    *,
    min_tail_seconds: float = 1.0,
) -> list[tuple[int, int]]:
    """Cut a clip into [start, end) sample windows of at most `max_seconds`.

    Each cut is placed in the second half of the window, at the latest 20 ms frame (energy
    smoothed over 200 ms) that is silent or within 6 dB of the quietest one there: a pause, as
    late as possible, so that windows stay long (a prompt pays the same tokens for a short
    window as for a full one). A cut in silence (40 dB below the clip's loud frames) needs no overlap, so
    neighbouring windows just touch; a cut inside sound gets `overlap_seconds` of overlap centred
    on it, for `stitch_transcripts` to de-duplicate. Every sample lies in at least one window.
    """
    n, max_len = len(wave), int(max_seconds * sr)
    half_overlap = int(overlap_seconds * sr) // 2
    frame = max(1, sr // 50)
    min_tail = int(min_tail_seconds * sr)
    if max_len < 4 * (half_overlap + frame) or max_len < 2 * (min_tail + frame):
        raise InputError(f"max_seconds={max_seconds} is too short for overlap_seconds={overlap_seconds}")
    if n <= max_len:
        return [(0, n)]
    energy = _frame_energy(wave, frame)
    smooth = np.convolve(energy, np.ones(10) / 10, mode="same")
    silent = smooth <= 0.01 * max(np.percentile(energy, 95), 1e-8)

    windows, start = [], 0
    while n - start > max_len:
        lo = (start + max_len // 2) // frame
        hi = (min(start + max_len - half_overlap, n - min_tail) - frame) // frame
        span = smooth[lo : hi + 1]
        quiet = (span <= 2.0 * span.min()) | silent[lo : hi + 1]  # 2x the RMS: 6 dB
        cut_frame = lo + int(np.flatnonzero(quiet)[-1])
        if silent[cut_frame]:
            cut = min(start + max_len, (cut_frame + 1) * frame)
            windows.append((start, cut))
            start = cut
        else:
            cut = cut_frame * frame + frame // 2
            windows.append((start, cut + half_overlap))
            start = cut - half_overlap
    windows.append((start, n))
    return windows


def encoder_windows(wave: np.ndarray, feature_extractor: AudioFeatureExtractor) -> list[np.ndarray]:
    """A prompt's clip as consecutive windows the encoder takes whole (`max_length`: 30 s).

    These are `plan_windows`' cuts at quiet points, without overlap: the windows touch, so every
    sample is encoded once and in order. (Transcription overlaps windows cut inside sound and
    removes the repeated words afterwards; a prompt has no such step, so an overlap would reach
    the model twice.)
    """
    fe = feature_extractor
    bounds = plan_windows(wave, fe.sampling_rate, max_seconds=fe.max_length / fe.sampling_rate, overlap_seconds=0.0)
    return [wave[start:end] for start, end in bounds]
