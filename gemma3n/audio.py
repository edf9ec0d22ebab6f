"""Audio in: decoding, the log-mel feature extractor, token counts, and long-audio windowing.

Spec: audio-vision.md §A (feature extractor) and §B (encoder, in `gemma3n.audio_encoder`).
The extractor reproduces `Gemma3nAudioFeatureExtractor` (transformers 5.24) step for step,
vectorised over the whole batch.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from gemma3n.audio_encoder import AudioEncoder, AudioEncoderConfig
from gemma3n.errors import ConfigError, InputError

__all__ = [
    "AudioEncoder",
    "AudioEncoderConfig",
    "AudioFeatureExtractor",
    "load_audio",
    "plan_windows",
    "soft_tokens_for_duration",
    "stitch_transcripts",
]

# ---------------------------------------------------------------------------------------------
# Decoding


def _decode(data: bytes | str, name: str) -> tuple[np.ndarray, int]:
    """Encoded file (path or bytes) -> ([N, C] float32, sample rate). soundfile, then PyAV."""
    import soundfile as sf

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        wave, sr = sf.read(src, dtype="float32", always_2d=True)
        return wave, int(sr)
    except Exception as sf_error:  # libsndfile raises several types for unknown/corrupt input
        try:
            import av  # optional: formats libsndfile lacks (m4a, aac, opus in mp4, ...)
        except ImportError:
            raise InputError(
                f"cannot decode audio {name}: {sf_error} "
                "(WAV/FLAC/OGG/MP3 are supported; install PyAV for other formats)"
            ) from None
        try:
            return _decode_av(av, io.BytesIO(data) if isinstance(data, bytes) else data)
        except Exception as av_error:
            raise InputError(f"cannot decode audio {name}: {sf_error}; PyAV: {av_error}") from None


def _decode_av(av, src) -> tuple[np.ndarray, int]:
    with av.open(src) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in resampler.resample(frame)]
        sr = stream.rate
    if not chunks:
        return np.zeros((0, 1), np.float32), sr
    return np.concatenate(chunks, axis=1).T.astype(np.float32), sr  # planar [C, N] -> [N, C]


def _to_mono(wave: np.ndarray, name: str, channel_axis: int | None) -> np.ndarray:
    if wave.ndim == 1:
        return wave
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


# ---------------------------------------------------------------------------------------------
# Feature extractor (§A)


def htk_mel_filterbank(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sampling_rate: int, fft_length: int
) -> np.ndarray:
    """[n_freqs, n_mels] unnormalised HTK triangles; float64 like the reference (§A.2.6)."""
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
            path = directory / name
            if not path.is_file():
                continue
            try:
                d = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {path}: {e}") from None
            d = d.get(section) if section else d
            if isinstance(d, dict):
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
        `pad_to_multiple_of`; frame i is valid iff its first sample is real audio (§A.3).
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
    """Encoder outputs for one unpadded clip (§A.4): 1 s -> 7, 10 s -> 63, >= 30 s -> 188."""
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
    """RMS of consecutive `frame`-sample frames (the tail frame may be short)."""
    n = len(wave)
    padded = np.zeros(-(-n // frame) * frame, dtype=np.float64)
    padded[:n] = wave
    return np.sqrt((padded.reshape(-1, frame) ** 2).mean(axis=1))


def plan_windows(
    wave: np.ndarray,
    sr: int,
    max_seconds: float = 30.0,
    overlap_seconds: float = 1.0,
    *,
    min_tail_seconds: float = 1.0,
) -> list[tuple[int, int]]:
    """Cut a clip into [start, end) sample windows of at most `max_seconds`.

    Each cut is placed at the quietest 20 ms frame (energy smoothed over 200 ms) in the second
    half of the window. A cut in silence (40 dB below the clip's loud frames) needs no overlap, so
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
        # quietest frame; among equals the latest, to keep windows long
        cut_frame = hi - int(np.argmin(smooth[lo : hi + 1][::-1]))
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
