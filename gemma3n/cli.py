"""`gemma3n` command line: generate, chat, info (and the subcommands other rooms add).

Errors a user can cause print one clear line (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cache import PromptCache
from .checkpoint import open_checkpoint
from .config import read_json_file
from .errors import Gemma3nError, InputError
from .export import export_slice, quantize_checkpoint
from .generate import TextPiece, check_max_tokens, sampling_params
from .info import describe, hardware_lines, list_sizes
from .matformer import SIZES_FILE, parse_ffn, parse_skip
from .model import default_model_path, load
from .quantize import QuantConfig
from .speculative import NGRAM, check_draft_k
from .structured import grammar_for
from .tokenizer import check_text

MODEL_HELP = "checkpoint directory or hub id (default: the embedded tiny model)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--size", default=None, help="MatFormer size to run (a preset such as E2B); default: full")
    p.add_argument("--quantize", default=None, help="quantize weights at load: int8, int4 or int4:GROUP (CPU)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"CPU threads (default: 1 for models under {SMALL_MODEL_PARAMS // 10**6} M weights, else torch's)",
    )


# Below this many decoder weights a token's matmuls are too small to split: a second CPU thread
# only adds synchronisation: the embedded model decodes faster on 1 thread than on 2 (bench/README.md).
SMALL_MODEL_PARAMS = 100_000_000


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_draft_args(p)
    p.add_argument("--verbose", "-v", action="store_true", help="print speed and memory at the end")


def _add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft",
        default=None,
        metavar="SIZE|ngram",
        help="speculative decoding, same output: a smaller MatFormer size of the model drafts (e.g. E2B "
        "inside E4B; no copy), or 'ngram' (drafts looked up in the prompt and reply)",
    )
    p.add_argument(
        "--draft-k", type=int, default=None, help="tokens drafted per check, 1-15 (default: adapted as it runs)"
    )
    p.add_argument(
        "--draft-quantize",
        default=None,
        metavar="int8|int4[:GROUP]",
        help="draft with a copy of the model quantized at load (at --draft's size; default the full size)",
    )


def _sampling_options(a: argparse.Namespace) -> dict:
    """The sampling flags as `sampling_params` / `Model.stream` keywords."""
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    flags = (a.temp, a.top_p, a.top_k, a.min_p, a.repetition_penalty, a.seed)
    return dict(zip(names, flags))


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        max_tokens=a.max_tokens,
        **_sampling_options(a),
        stop=a.stop,
        size=a.size,
        draft=a.draft,
        draft_k=a.draft_k,
        draft_model=getattr(a, "draft_model", None),
    )


def _load(a: argparse.Namespace):
    import torch

    model = load(a.model, device=a.device, dtype=a.dtype, quantize=getattr(a, "quantize", None))
    threads = getattr(a, "threads", None)
    if threads is None and model.decoder.device.type == "cpu":
        if sum(p.numel() for p in model.decoder.parameters()) < SMALL_MODEL_PARAMS:
            threads = 1
    if threads:
        torch.set_num_threads(threads)
    if getattr(a, "draft_quantize", None):  # the draft reads the same files, quantized on the way in
        a.draft_model = load(a.model, device=a.device, dtype=a.dtype, quantize=a.draft_quantize)
    return model


def _print_stream(pieces: Iterator[TextPiece], verbose: bool) -> None:
    last = None
    for piece in pieces:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        last = piece
    sys.stdout.write("\n")
    if verbose and last is not None and last.stats:
        s = last.stats
        print(
            f"prompt: {s['prompt_tokens']} tokens, {s['prompt_tps']:.1f} tok/s | "
            f"generation: {s['generated_tokens']} tokens, {s['generation_tps']:.1f} tok/s | "
            f"peak memory {s['peak_memory_gb']:.2f} GB | finish: {last.finish_reason}",
            file=sys.stderr,
        )
        _print_draft_stats(s)


def _print_draft_stats(s: dict) -> None:
    if "draft" in s:
        print(
            f"draft {s['draft']}: {s['acceptance_rate']:.0%} of {s['draft_tokens']} drafted tokens accepted, "
            f"{s['tokens_per_verification']:.2f} tokens per verification ({s['verifications']} verifications, "
            f"{s['plain_decode_steps']} plain decode steps)",
            file=sys.stderr,
        )


def _stdin_text() -> str:
    """All of stdin as UTF-8 (a BOM is dropped); other bytes are one clear error."""
    if getattr(sys.stdin, "buffer", None) is None:  # a text stream put in its place (tests, embedding)
        text = sys.stdin.read()
        check_text(text, "stdin")
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"stdin is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason}); "
            "convert it first, e.g. with iconv"
        ) from None


def _check_args(a: argparse.Namespace) -> None:
    """Text options from argv before anything loads: bytes that are not UTF-8 arrive as lone
    surrogates (surrogateescape) and would fail deep in the tokenizer."""
    check_max_tokens(a.max_tokens)  # the sampling flags too, before the model loads
    sampling_params({}, **_sampling_options(a))
    for flag, value in (("--prompt", getattr(a, "prompt", None)), ("--system-prompt", a.system_prompt)):
        if value is not None:
            check_text(value, flag)
    for s in a.stop or []:
        check_text(s, "--stop")
    _check_draft_args(a)


def _check_draft_args(a: argparse.Namespace) -> None:
    check_draft_k(a.draft_k)
    if a.draft_k is not None and a.draft is None and a.draft_quantize is None:
        raise InputError("--draft-k sets how many tokens a draft proposes: it needs --draft")
    if a.draft_quantize is not None and (a.draft or "").strip().lower() == NGRAM:
        raise InputError("--draft ngram drafts from the text itself: it takes no --draft-quantize")


def _response_format(a: argparse.Namespace) -> dict | None:
    """--json / --json-schema FILE -> OpenAI's response_format, the schema checked before the
    model loads (a feature constrained decoding cannot enforce is named)."""
    if a.json and a.json_schema:
        raise InputError("--json and --json-schema both set the reply's form: pass one")
    if a.json:
        return {"type": "json_object"}
    if not a.json_schema:
        return None
    path = Path(a.json_schema)
    if not path.is_file():
        raise InputError(f"--json-schema {path}: no such file")
    schema = read_json_file(path, error=InputError, shape="a JSON object (a schema)")
    fmt = {"type": "json_schema", "json_schema": {"name": Path(a.json_schema).stem, "schema": schema}}
    try:
        grammar_for(fmt)
    except InputError as e:
        raise InputError(str(e).replace("response_format:", f"--json-schema {a.json_schema}:", 1)) from None
    return fmt


def cmd_generate(a: argparse.Namespace) -> None:
    _check_args(a)
    prompt = _stdin_text() if a.prompt == "-" else a.prompt
    if not prompt:
        raise InputError("the prompt is empty (pass --prompt TEXT, or --prompt - to read stdin)")
    response_format = _response_format(a)
    model = _load(a)
    if a.raw:
        if a.system_prompt or a.image or a.audio or a.video:
            raise InputError(
                "--raw sends the prompt as is: it cannot be combined with --system-prompt, --image or --audio"
            )
        pieces = model.stream(prompt, response_format=response_format, **_sampling_kwargs(a))
    else:
        content: list[dict] = [{"type": "image", "image": p} for p in a.image or []]
        if a.video:
            from .image import video_message_parts

            content += video_message_parts(a.video, fps=a.fps, max_frames=a.max_frames)
        content += [{"type": "audio", "audio": p} for p in a.audio or []]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "system", "content": a.system_prompt}] if a.system_prompt else []
        messages.append({"role": "user", "content": content})
        pieces = model.stream(
            messages=messages, image_size=a.image_size, response_format=response_format, **_sampling_kwargs(a)
        )
    _print_stream(pieces, a.verbose)


def cmd_chat(a: argparse.Namespace) -> None:
    _check_args(a)
    model = _load(a)
    history: list[dict] = [{"role": "system", "content": a.system_prompt}] if a.system_prompt else []
    conversation = PromptCache()  # each turn prefills only what the last one did not
    print(f"gemma3n chat with {model.name}: empty line or Ctrl-D to quit, /reset to forget the history.")
    while True:
        try:
            line = input(">>> ")
            check_text(line, "the line")
        except EOFError:
            print()
            return
        except (UnicodeDecodeError, InputError) as e:  # a bad line is refused; the chat goes on
            reason = e if isinstance(e, InputError) else "the line is not UTF-8 text"
            print(f"gemma3n: error: {reason}", file=sys.stderr)
            continue
        if not line.strip():
            return
        if line.strip() == "/reset":
            history = history[:1] if a.system_prompt else []
            conversation.clear()
            continue
        history.append({"role": "user", "content": line})
        reply = []
        last = None
        for piece in model.stream(messages=history, prompt_cache=conversation, **_sampling_kwargs(a)):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            reply.append(str(piece))
            last = piece
        print()
        if a.verbose and last is not None and last.stats:
            s = last.stats
            print(
                f"prompt: {s['prompt_tokens']} tokens ({s['cached_prompt_tokens']} from the previous turn), "
                f"TTFT {s['ttft_s']:.2f} s | generation: {s['generation_tps']:.1f} tok/s",
                file=sys.stderr,
            )
            _print_draft_stats(s)
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(a: argparse.Namespace) -> None:
    ckpt = open_checkpoint(a.model if a.model is not None else default_model_path())
    if a.hardware:
        for line in hardware_lines(ckpt, quantize=a.quantize, refresh=a.refresh):
            print(line)
        return
    for line in describe(ckpt, size=a.size, placement=a.placement, device=a.device, dtype=a.dtype):
        print(line)


def cmd_transcribe(a: argparse.Namespace) -> None:
    from .speech import render, transcribe

    fmt = {"txt": "lines", "json": "verbose_json"}.get(a.format, a.format)
    options = dict(translate_to=a.translate_to, language=a.language, max_tokens_per_window=a.max_tokens)
    options.update(temperature_fallback=not a.no_fallback, size=a.size)
    model = None

    def load() -> Any:
        nonlocal model
        model = _load(a)
        return model

    if a.file == "-":
        from .live import transcribe_stdin

        rate = 16000 if a.sample_rate is None else a.sample_rate
        raw = dict(input_format=a.input_format or "s16le", sample_rate=rate, partial=a.partial, quiet=a.quiet)
        n = transcribe_stdin(load, fmt=fmt, **raw, **options)
    else:
        if a.input_format or a.sample_rate is not None or a.partial:
            raise InputError("--input-format, --sample-rate and --partial are for audio on stdin (`transcribe -`)")
        result = transcribe(load(), a.file, progress=not a.quiet, **options)
        sys.stdout.write(render(result, fmt) + ("\n" if fmt == "verbose_json" else ""))
        n = len(result.segments)
    window = model.processor.audio_window_seconds
    print(f"({n} segment{'s' if n != 1 else ''} of speech, at most {window:g} s each)", file=sys.stderr)


def cmd_serve(a: argparse.Namespace) -> None:
    try:
        from .server import serve
    except ImportError as e:
        raise InputError(f"the server needs its extra: pip install 'gemma3n[server]' ({e})") from None
    if a.prompt_cache_slots < 0:
        raise InputError(f"--prompt-cache-slots must be 0 or more, not {a.prompt_cache_slots}")
    if a.prompt_cache_mb is not None and a.prompt_cache_mb < 0:
        raise InputError(f"--prompt-cache-mb must be 0 or more, not {a.prompt_cache_mb:g}")
    for flag, value in (("--max-audio-mb", a.max_audio_mb), ("--max-audio-seconds", a.max_audio_seconds)):
        if not value > 0:  # also NaN
            raise InputError(f"{flag} must be more than 0, not {value:g}")
    if not 1 <= a.max_batch <= 64:
        raise InputError(f"--max-batch must be in [1, 64], not {a.max_batch}")
    if a.max_kv_mb is not None and not a.max_kv_mb > 0:
        raise InputError(f"--max-kv-mb must be more than 0, not {a.max_kv_mb:g}")
    _check_draft_args(a)
    model = _load(a)
    serve(
        model,
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        max_queue=a.max_queue,
        prompt_cache_slots=a.prompt_cache_slots,
        prompt_cache_bytes=None if a.prompt_cache_mb is None else int(a.prompt_cache_mb * 2**20),
        model_id=a.model_id,
        max_audio_bytes=int(a.max_audio_mb * 2**20),
        max_audio_seconds=a.max_audio_seconds,
        max_batch=a.max_batch,
        max_kv_bytes=None if a.max_kv_mb is None else int(a.max_kv_mb * 2**20),
        draft=a.draft,
        draft_k=a.draft_k,
        draft_model=getattr(a, "draft_model", None),
    )


def cmd_quantize(a: argparse.Namespace) -> None:
    bits = {8: "int8", 4: "int4"}.get(a.bits)
    if bits is None:
        raise InputError(f"--bits must be 4 or 8, got {a.bits}")
    qc = QuantConfig.parse(bits, group_size=a.group_size if a.bits == 4 else None)
    quantize_checkpoint(a.model if a.model is not None else default_model_path(), a.out, qc, force=a.force)


def size_from_cli(preset: str | None = None, ffn: str | None = None, skip: str | None = None) -> Any:
    """`--preset` / `--size` NAME, or `--ffn` / `--skip` text -> a value for `resolve_size`."""
    if preset and (ffn or skip):
        raise InputError("give either a preset (--preset/--size) or a custom --ffn/--skip, not both")
    if preset:
        return preset
    if ffn or skip:
        return {"ffn": parse_ffn(ffn) if ffn else None, "skip": parse_skip(skip) if skip else []}
    return None


def _slice_parent(model: str | None) -> str | Path:
    """`--model` of `gemma3n slice`: the embedded model when omitted; `E2B`/`E4B` = the official hub checkpoint."""
    if not model:
        return default_model_path()
    if not Path(model).expanduser().exists() and model.upper() in ("E2B", "E4B"):
        return f"google/gemma-3n-{model.upper()}-it"
    return model


def cmd_slice(args: argparse.Namespace) -> None:
    """`gemma3n slice`: list the sizes, or export a slice."""
    model = _slice_parent(args.model)
    if args.list:
        print(list_sizes(model))
        return
    if not args.out:
        raise InputError("gemma3n slice needs --out (or --list)")
    size = size_from_cli(args.preset, args.ffn, args.skip)
    if size is None:
        raise InputError("choose a slice: --preset NAME, or --ffn/--skip (see `gemma3n slice --list`)")
    out = export_slice(model, size, args.out, force=args.force, progress=not args.no_progress)
    print(f"wrote {out}")
    for line in (out / "README.md").read_text().splitlines():
        if line.startswith(("| Slice", "| Layers", "| FFN", "| Effective")):
            print("  " + line.strip("| ").replace(" | ", ": "))


def _add_generate_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    g.add_argument("--prompt", "-p", required=True, help="the prompt; '-' reads it from stdin")
    g.add_argument("--system-prompt", default=None)
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--image", action="append", default=None, help="image file (repeatable)")
    g.add_argument("--image-size", type=int, default=None, choices=[256, 512, 768])
    g.add_argument("--audio", action="append", default=None, help="audio file (repeatable)")
    g.add_argument("--video", default=None, help="video file: frames sampled at --fps, with timestamps")
    g.add_argument("--fps", type=float, default=1.0, help="video frames per second to sample (default 1)")
    g.add_argument("--max-frames", type=int, default=32, help="video frame budget (default 32)")
    g.add_argument("--json", action="store_true", help="constrain the reply to a JSON object")
    g.add_argument("--json-schema", metavar="FILE", default=None, help="constrain the reply to this JSON Schema")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)


def _add_chat_parser(sub: Any) -> None:
    c = sub.add_parser("chat", help="interactive chat that keeps its history")
    _add_model_args(c)
    c.add_argument("--system-prompt", default=None)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)


def _add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `gemma3n slice` (an argparse parser or subparser)."""
    parser.add_argument("--list", action="store_true", help="show the model's sizes and the presets that fit, and exit")
    parser.add_argument(
        "--model",
        "-m",
        help="parent checkpoint: directory, hub id, or E4B (google/gemma-3n-E4B-it); default: the embedded tiny model",
    )
    parser.add_argument(
        "--preset",
        help=f"a size the model declares ({SIZES_FILE}) or a preset name or alias, e.g. E2B, E2.54B-layer",
    )
    parser.add_argument("--ffn", help="one FFN width per kept layer: 8192x20,16384x10 or 8192,16384,...")
    parser.add_argument("--skip", help="original indices of skipped layers, e.g. 20-24")
    parser.add_argument("--out", "-o", help="output directory (must be empty or absent)")
    parser.add_argument(
        "--force", action="store_true", help="replace the checkpoint in --out (never the source, never other files)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_slice_parser(sub: Any) -> None:
    sl = sub.add_parser("slice", help="export a MatFormer Mix-n-Match slice (--list shows the presets)")
    _add_slice_arguments(sl)
    sl.set_defaults(func=cmd_slice)


def _add_quantize_parser(sub: Any) -> None:
    qp = sub.add_parser("quantize", help="write a weight-only int8 / int4 quantized checkpoint")
    qp.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    qp.add_argument("--bits", type=int, required=True, choices=[4, 8])
    qp.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64 or 128 (default 64)")
    qp.add_argument("--out", required=True, help="output directory (new or empty)")
    qp.add_argument(
        "--force", action="store_true", help="replace the checkpoint in --out (never the source, never other files)"
    )
    qp.set_defaults(func=cmd_quantize)


def _add_transcribe_parser(sub: Any) -> None:
    t = sub.add_parser(
        "transcribe",
        help="speech recognition or translation of an audio file (any length), or of audio on stdin as it comes",
        description="Windows of speech (cut at pauses) transcribed one model call each. With FILE '-', audio "
        "from stdin is transcribed as it arrives, with the same text as the file: raw PCM, by default signed "
        "16-bit little-endian mono at 16 kHz (ffmpeg -i IN -f s16le -ac 1 -ar 16000 -), or a WAV stream (arecord); "
        "provisional text of the open window shows on stderr; Ctrl-C ends the recording there.",
    )
    _add_model_args(t)
    t.add_argument("file", help="audio file (WAV, FLAC, OGG, MP3), or - for audio on stdin")
    t.add_argument("--translate-to", default=None, metavar="LANG", help="translate the speech into LANG")
    t.add_argument("--language", default=None, help="the speech's language, e.g. en (a hint in the prompt)")
    t.add_argument(
        "--format",
        default="txt",
        choices=["txt", "srt", "vtt", "json"],
        help="txt (default; a line per segment), srt or vtt subtitles, or json (segments with times); "
        "from stdin txt, srt and vtt are written as each segment is done, json at the end",
    )
    t.add_argument("--max-tokens", type=int, default=256, help="per window (the encoder's: 30 s for Gemma 3n)")
    t.add_argument(
        "--no-fallback",
        action="store_true",
        help="keep a window's greedy transcript even when it loops (default: decoded again at temperatures "
        "0.2, 0.4 ... 1.0 until it does not, as Whisper does)",
    )
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar (stdin: no provisional text)")
    t.add_argument(
        "--input-format", choices=["s16le", "f32le"], default=None, help="raw samples on stdin (default s16le)"
    )
    t.add_argument("--sample-rate", type=int, default=None, help="of raw audio on stdin, in Hz (default 16000)")
    t.add_argument(
        "--partial",
        action="store_true",
        help="stdin: provisional text as a line each on stderr (default: one line rewritten on a terminal, else none)",
    )
    t.set_defaults(func=cmd_transcribe)


def _add_info_parser(sub: Any) -> None:
    i = sub.add_parser("info", help="parameter split, layer map and placement of a checkpoint")
    _add_model_args(i)
    i.add_argument("--placement", action="store_true", help="load the model and report what lives where")
    i.add_argument(
        "--hardware",
        action="store_true",
        help="CPU features, measured bandwidth and GEMM rates, the compute choices, and the model's decode bound",
    )
    i.add_argument("--refresh", action="store_true", help="with --hardware: measure again instead of the cache")
    i.set_defaults(func=cmd_info)


def _add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (every elastic size is a model id)")
    s.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    s.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default: cpu)")
    s.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    s.add_argument("--quantize", default=None, help="quantize weights at load: int8, int4 or int4:GROUP (CPU)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=os.environ.get("GEMMA3N_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $GEMMA3N_API_KEY)",
    )
    s.add_argument("--max-queue", type=int, default=32, help="requests admitted at once; more get 503")
    s.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="plain generations decoded together (continuous batching; default 8, 1: one at a time)",
    )
    s.add_argument(
        "--max-kv-mb",
        type=float,
        default=None,
        help="K/V the running batch may hold, in MiB: a request waits for room (default: no cap)",
    )
    s.add_argument(
        "--prompt-cache-slots",
        type=int,
        default=4,
        help="conversations whose K/V is kept for their next request (default 4; 0: none); each costs "
        "up to its K/V, about 100 MiB per 4k tokens for E2B/E4B with fp32 activations",
    )
    s.add_argument(
        "--prompt-cache-mb",
        type=float,
        default=None,
        help="cap on the K/V those conversations hold between requests, in MiB (default: no cap)",
    )
    s.add_argument("--model-id", default=None, help="id of the full model in /v1/models (default: its name)")
    _add_draft_args(s)  # a default for every request where it applies; a request's "draft" overrides it
    s.add_argument("--max-audio-mb", type=float, default=25, help="largest audio upload, MiB (default 25; more: 413)")
    s.add_argument(
        "--max-audio-seconds", type=float, default=7200, help="longest audio to transcribe (default 7200; more: 400)"
    )
    s.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma3n", description="Run Gemma 3n models on-device.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(sub)
    _add_chat_parser(sub)
    _add_slice_parser(sub)
    _add_quantize_parser(sub)
    _add_transcribe_parser(sub)
    _add_info_parser(sub)
    _add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # a block-buffered pipe's last write happens here, inside the handlers
    except Gemma3nError as e:
        print(f"gemma3n: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None)  # export.Interrupted: a write was stopped and cleaned up
        print(f"gemma3n: {e}" if signum else "", file=sys.stderr)
        return 128 + (signum or signal.SIGINT)
    except BrokenPipeError:  # `gemma3n info | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
