"""Latency of POST /v1/audio/transcriptions for a 60 s file (issue #15 item 5), through the real
server and the openai client, and how long the voice-activity detector takes on its own.

Without --checkpoint it runs the small RANDOM multimodal test checkpoint (tests/conftest.py:
2 conformer layers, 10 text layers): the words are noise and the figure is the pipeline's cost
(decode, VAD, windows, prompts, the encoder and decoder at toy size), not a real model's. The
audio is tests/data/speech.ogg (6.7 s of espeak-ng) repeated with pauses to 60 s.

  .venv/bin/python bench/bench_speech.py [--checkpoint DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import machine_info, print_table, write_json  # noqa: E402


def sixty_seconds() -> bytes:
    import soundfile as sf

    speech, sr = sf.read(ROOT / "tests" / "data" / "speech.ogg", dtype="float32")
    parts, total = [], 0
    while total < 60 * sr:
        gap = np.zeros(int(sr * (1.0 + len(parts) % 3)), np.float32)
        parts += [gap, speech]
        total += len(gap) + len(speech)
    out = io.BytesIO()
    sf.write(out, np.concatenate(parts)[: 60 * sr], sr, format="WAV", subtype="PCM_16")
    return out.getvalue()


def speech_checkpoint(path: str | None) -> Path | str:
    """`path`, or (None) the random multimodal test checkpoint, built in a temporary folder."""
    if path is not None:
        return path
    from tests.conftest import build_mm_checkpoint

    built = Path(tempfile.mkdtemp(prefix="g3n-mm-")) / "ckpt"
    build_mm_checkpoint(built)
    return built


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a multimodal checkpoint (default: the random test one)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import openai
    import torch

    import gemma3n
    from gemma3n.audio import load_audio
    from gemma3n.server import BackgroundServer, create_app
    from gemma3n.vad import speech_spans

    torch.set_num_threads(args.threads)
    path = speech_checkpoint(args.checkpoint)
    audio = sixty_seconds()
    wave = load_audio(audio)
    speech_spans(wave)  # the detector loaded once, as a server does on its first request
    t = time.perf_counter()
    spans = speech_spans(wave)
    vad_s = time.perf_counter() - t
    model = gemma3n.load(path)
    rows = []
    with BackgroundServer(create_app(model)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="-", max_retries=0, timeout=600)
        mid = client.models.list().data[0].id
        for fmt in ("json", "srt"):
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                result = client.audio.transcriptions.create(model=mid, file=("a.wav", audio), response_format=fmt)
                times.append(time.perf_counter() - t)
            rows.append({"format": fmt, "latency_s": statistics.median(times), "best_s": min(times)})
        verbose = client.audio.transcriptions.create(model=mid, file=("a.wav", audio), response_format="verbose_json")
    print_table(rows, [("format", "response_format"), ("latency_s", "median s"), ("best_s", "best s")])
    print(f"VAD alone: {vad_s:.2f} s for 60 s ({len(spans)} stretches of speech); {len(verbose.segments)} segments")
    out = {
        "checkpoint": str(path) if args.checkpoint else "random multimodal test checkpoint (tests/conftest.py)",
        "audio_s": 60,
        "rows": rows,
        "vad_s": vad_s,
        "speech_spans": len(spans),
        "segments": len(verbose.segments),
        "sample": str(result)[:200],
        "threads": args.threads,
        "machine": machine_info(),
    }
    print("wrote", write_json("bench_speech", out))


if __name__ == "__main__":
    main()
