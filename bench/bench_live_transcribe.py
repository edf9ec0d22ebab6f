"""Live transcription (`gemma3n transcribe -`) at the pace of a recorder (issue #20, "long and live
audio"): a recording is written into a pipe in 20 ms pieces, each when its time comes, and read by
the live transcriber (gemma3n.pcm.PcmReader in its thread, gemma3n.live.LiveTranscriber with
provisional text on). Measured against the wall clock of the recording: how long after each
stretch of speech starts the first provisional text covering it shows, how far behind the audio
provisional text runs, how long after a window's audio ends its committed segment comes, and
whether the committed segments are the file path's (`speech.transcribe_segments`).

Without --checkpoint it runs the small RANDOM multimodal test checkpoint (tests/conftest.py: 2
conformer layers, 10 text layers): the words are noise and the figures are the pipeline's
(reading, detector, windows, the model calls at toy size), not a real model's. The recording is
bench_speech's: tests/data/speech.ogg (6.7 s of espeak-ng) repeated with 1-3 s pauses to 60 s.

  .venv/bin/python bench/bench_live_transcribe.py [--checkpoint DIR] [--threads 1] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench.bench_speech import sixty_seconds, speech_checkpoint  # noqa: E402
from bench.common import machine_info, print_table, write_json  # noqa: E402

SR = 16_000
PIECE = SR // 50  # 20 ms, as a recorder's period


def play(pcm: bytes, fd: int, started: list[float]) -> None:
    """Write `pcm` (s16le) into the pipe at real-time pace; started[0]: when the first byte went."""
    with os.fdopen(fd, "wb", buffering=0) as out:
        started.append(time.perf_counter())
        for at in range(0, len(pcm), 2 * PIECE):
            wait = started[0] + at / 2 / SR - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            out.write(pcm[at : at + 2 * PIECE])


def live_run(model, pcm: bytes, max_tokens: int) -> tuple[list, list, list, float]:
    """(segments with the wall time each came, provisional texts with theirs, t0, seconds heard)."""
    from gemma3n.live import LiveTranscriber
    from gemma3n.pcm import PcmReader

    partials: list[tuple[float, object]] = []
    live = LiveTranscriber(
        model, max_tokens_per_window=max_tokens, on_partial=lambda p: partials.append((time.perf_counter(), p))
    )
    live.warm_up()  # as `transcribe -` does while the model is idle
    r, w = os.pipe()
    reader = PcmReader(os.fdopen(r, "rb", buffering=0)).start()
    started: list[float] = []
    writer = threading.Thread(target=play, args=(pcm, w, started), daemon=True)
    writer.start()
    segments = [(time.perf_counter(), s) for s in live.run(reader.chunks)]
    writer.join()
    return segments, partials, started[0], live.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a multimodal checkpoint (default: the random test one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16, help="per window (and per provisional text)")
    args = p.parse_args()

    import soundfile as sf
    import torch

    import gemma3n
    from gemma3n.speech import speech_windows, transcribe_segments
    from gemma3n.vad import speech_spans

    torch.set_num_threads(args.threads)
    path = speech_checkpoint(args.checkpoint)
    wav = sixty_seconds()
    wave, _ = sf.read(io.BytesIO(wav), dtype="float32")
    pcm = sf.read(io.BytesIO(wav), dtype="int16")[0].astype("<i2").tobytes()
    model = gemma3n.load(path)
    window_s = model.processor.audio_window_seconds
    t = time.perf_counter()
    reference = list(transcribe_segments(model, wave, max_tokens_per_window=args.max_tokens))
    file_s = time.perf_counter() - t
    windows = speech_windows(wave, window_s)
    spans = speech_spans(wave)

    segments, partials, t0, heard = live_run(model, pcm, args.max_tokens)
    same = [s for _, s in segments] == reference

    pad = 0.1  # the detector pads each stretch by 0.1 s: speech starts that much after the span
    rows = []
    for start, end in spans:
        speech = start / SR + pad
        first = next((when for when, q in partials if q.end > speech), None)
        rows.append({
            "what": f"speech {speech:.2f}-{end / SR - pad:.2f} s",
            "first_text_s": None if first is None else first - (t0 + speech),
        })  # fmt: skip
    for (when, segment), window in zip(segments, windows):
        rows.append({
            "what": f"segment {segment.id}: window {window.start / SR:.2f}-{window.end / SR:.2f} s",
            "committed_after_s": when - (t0 + window.end / SR),
        })  # fmt: skip
    behind = [when - (t0 + q.end) for when, q in partials]
    print_table(
        rows,
        [("what", "stretch of speech / segment"), ("first_text_s", "first provisional text, s after speech start"),
         ("committed_after_s", "committed, s after window end")],
    )  # fmt: skip
    first_texts = [r["first_text_s"] for r in rows if r.get("first_text_s") is not None]
    print(
        f"{len(partials)} provisional texts, behind the audio by median {statistics.median(behind):.2f} s "
        f"(max {max(behind):.2f} s); first text after speech start: max {max(first_texts):.2f} s; "
        f"committed = file path's: {same} ({len(segments)} segments; the file path took {file_s:.2f} s)"
    )
    out = {
        "checkpoint": str(path) if args.checkpoint else "random multimodal test checkpoint (tests/conftest.py)",
        "audio_s": len(wave) / SR,
        "heard_s": heard,
        "window_s": window_s,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "provisional_texts": len(partials),
        "provisional_behind_s": {"median": statistics.median(behind), "max": max(behind)},
        "first_text_after_speech_start_s": {"max": max(first_texts), "median": statistics.median(first_texts)},
        "committed_equals_file": same,
        "segments": len(segments),
        "file_path_s": file_s,
        "machine": machine_info(),
    }
    print("wrote", write_json("bench_live_transcribe", out))


if __name__ == "__main__":
    main()
