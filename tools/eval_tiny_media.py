"""Measure the embedded model's ears and eyes through the public API (what users run):

- word error rate (jiwer; lower case, punctuation dropped) of `model.generate` transcripts of
  held-out 5-10 s clips: verses of the held-out chapters, spoken with the held-out voice setting;
- word error rate of `gemma3n.speech.transcribe` on a ~2-minute recording of consecutive held-out
  verses (voice-activity windows of up to 10 s, stitched), and its real-time factor;
- image answers (colour, shape, count) on unseen scenes at 768, 512 and 256 px, and the vision
  tower's latency per resolution.

    python tools/eval_tiny_media.py --speech /work/tiny-mm/speech --out docs/tiny-media-eval.json
    python tools/eval_tiny_media.py --model CHECKPOINT --images 60   # a vision-only model: images only
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_media_data import (  # noqa: E402
    HELD_OUT_VOICE,
    QUESTIONS,
    SR,
    Clips,
    normalize_words,
    recording,
    render_scene,
    verses,
)

import gemma3n  # noqa: E402
from gemma3n.image import ImageProcessor  # noqa: E402
from gemma3n.speech import speech_prompt, transcribe  # noqa: E402

EVAL_SEED = 1_000_000  # scenes drawn from seeds the training stream never uses


def long_recording(seconds: float = 135.0) -> tuple[np.ndarray, str]:
    """Consecutive held-out verses (from the start of the held-out chapters) read with the held-out voice."""
    texts, total = [], 0.0
    for v in verses(held_out=True)[200:]:
        texts.append(v)
        total += len(v.split()) / HELD_OUT_VOICE[1] * 60 + 0.8
        if total >= seconds:
            break
    return recording(texts, HELD_OUT_VOICE, (0.4, 1.2), seed=1), " ".join(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument(
        "--speech", type=Path, default=None, help="tools/tiny_media_data.py's output (heldout.*); omit: images only"
    )
    ap.add_argument("--clips", type=int, default=100, help="held-out clips to transcribe (0: the recording alone)")
    ap.add_argument("--images", type=int, default=60, help="scenes per resolution (each asked 3 questions)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.clips < 0:
        ap.error(f"--clips must be >= 0, got {args.clips}")
    torch.set_num_threads(args.threads)
    model = gemma3n.load(args.model)
    result: dict = {}
    if args.speech is not None:
        result |= speech_figures(model, args.speech, args.clips)
    result["images"] = image_figures(model, args.images)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def speech_figures(model: gemma3n.Model, speech: Path, clips: int) -> dict:
    """WER and real-time factor on the held-out clips and on the ~2-minute recording."""
    import jiwer
    import soundfile as sf

    result: dict = {}
    # --- held-out clips
    held = Clips.load(speech / "heldout")
    n = min(clips, len(held))
    if n:
        result["clips"] = clip_figures(model, held, n)
        print(json.dumps(result["clips"], indent=1), flush=True)

    # --- a ~2-minute recording through transcribe (windows + stitching)
    wave, text = long_recording()
    path = speech / "recording-2min.flac"
    sf.write(path, wave, SR)
    t = time.perf_counter()
    tr = transcribe(model, str(path))
    spent = time.perf_counter() - t
    result["recording"] = {
        "seconds": round(len(wave) / SR, 1),
        "windows": len(tr.segments),
        "wer": round(jiwer.wer(normalize_words(text), normalize_words(tr.text) or "-"), 4),
        "real_time_factor": round(spent / (len(wave) / SR), 4),
        "hypothesis": tr.text,
    }
    print(json.dumps(result["recording"], indent=1), flush=True)
    return result


def clip_figures(model: gemma3n.Model, held: Clips, n: int) -> dict:
    """WER and real-time factor of greedy transcripts of the first `n` held-out clips."""
    import jiwer

    refs, hyps, audio_s, spent = [], [], 0.0, 0.0
    for i in range(n):
        wave = held.wave(i)
        t = time.perf_counter()
        r = model.generate(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": speech_prompt()}, {"type": "audio", "audio": wave}],
                }
            ],
            max_tokens=96,
            temperature=0,
        )
        spent += time.perf_counter() - t
        audio_s += len(wave) / SR
        refs.append(normalize_words(held.texts[i]))
        hyps.append(normalize_words(r.text) or "-")
    return {
        "n": n,
        "seconds": round(audio_s, 1),
        "wer": round(jiwer.wer(refs, hyps), 4),
        "real_time_factor": round(spent / audio_s, 4),
        "voice": " ".join(map(str, HELD_OUT_VOICE)),
        "examples": [{"ref": a, "hyp": b} for a, b in list(zip(refs, hyps))[:5]],
    }


def image_figures(model: gemma3n.Model, n: int) -> dict:
    """Exact answers (colour, shape, count) on `n` unseen scenes per resolution; tower latency."""
    tower = model.towers.vision_tower()
    images = {}
    for res in (768, 512, 256):
        ok = {task: 0 for task in ("colour", "shape", "count")}
        for i in range(n):
            img, scene = render_scene(random.Random(EVAL_SEED + i), 384)
            for task in ok:
                r = model.generate(
                    messages=[
                        {
                            "role": "user",
                            "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTIONS[task]}],
                        }
                    ],
                    image_size=res,
                    max_tokens=8,
                    temperature=0,
                )
                ok[task] += normalize_words(r.text) == scene.answer(task)
        pixels = ImageProcessor.from_pretrained(model.path)([img], size=res)
        tower(pixels)  # warm-up
        t = time.perf_counter()
        for _ in range(5):
            tower(pixels)
        ms = (time.perf_counter() - t) / 5 * 1000
        images[res] = {k: round(v / n, 3) for k, v in ok.items()} | {"tower_ms": round(ms, 1)}
        print(res, images[res], flush=True)
    return images | {"n": n}


if __name__ == "__main__":
    main()
