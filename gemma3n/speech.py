"""Speech recognition and speech translation on top of `Model.generate`, for clips of any
length: the reference silently truncates at 30 s; we cut long audio into windows at quiet
points (audio.plan_windows), transcribe each, and stitch the texts (audio.stitch_transcripts).
Prompt format: vLLM's fixed ASR/AST prompt (audio-vision.md §D.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from .errors import InputError


def speech_prompt(translate_to: str | None = None) -> str:
    return f"Transcribe this audio into {translate_to}:" if translate_to else "Transcribe this audio:"


@dataclass
class Transcript:
    text: str
    windows: list[tuple[float, float]]  # seconds
    window_texts: list[str]


def transcribe(
    model,
    audio,
    *,
    translate_to: str | None = None,
    max_seconds: float = 30.0,
    max_tokens_per_window: int = 256,
    progress: bool = True,
    **sampling,
) -> Transcript:
    """Transcribe (or translate) `audio` (path, bytes or 16 kHz array), any length."""
    if not model.has_audio:
        raise InputError(f"{model.path} has no audio tower: it cannot transcribe")
    from .audio import load_audio, plan_windows, stitch_transcripts

    sr = 16_000
    wave = load_audio(audio, sampling_rate=sr)
    windows = plan_windows(wave, sr, max_seconds=max_seconds)
    texts = []
    sampling.setdefault("temperature", 0.0)
    for start, end in tqdm(windows, desc="audio windows", unit="window", disable=not progress or len(windows) == 1):
        content = [{"type": "text", "text": speech_prompt(translate_to)}, {"type": "audio", "audio": wave[start:end]}]
        result = model.generate(
            messages=[{"role": "user", "content": content}], max_tokens=max_tokens_per_window, **sampling
        )
        texts.append(result.text.strip())
    return Transcript(
        text=stitch_transcripts(texts),
        windows=[(s / sr, e / sr) for s, e in windows],
        window_texts=texts,
    )
