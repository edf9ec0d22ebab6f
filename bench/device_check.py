"""The accelerator check, in one run: what a session with a lent GPU executes first.

For the embedded model, and for --checkpoint if given (e.g. random E2B weights from
tools/make_random_checkpoint.py), on --device (default cuda):

- placement: the core weights are on the device, the per-layer embedding table stays in host
  memory, and the device memory taken by loading is what `placement_report` says the core is;
- correctness: last-token logits on the device vs the same model in fp32 on the CPU, and the
  greedy continuation of both;
- speed: prefill and decode tok/s and peak device memory through `Model.generate`.

Prints a table and writes JSON to bench/out/. It runs on a CPU too (`--device cpu`, a dry run of
the script itself). Speed against transformers on the device: bench_text.py --device cuda.

    python bench/device_check.py                                  # embedded model on cuda
    python bench/device_check.py --checkpoint /tmp/e2b --dtype bfloat16 --decode 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemma3n  # noqa: E402
from bench import common  # noqa: E402
from gemma3n.cache import common_prefix  # noqa: E402
from gemma3n.placement import placement_report  # noqa: E402

PROMPT = "And God said, Let there be light: and there was light. And God saw the light, that it was good:"


def device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return 0  # no allocator statistics for host memory: the placement row says so


def check(path: str | None, device: str, dtype: str | None, decode: int) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = device_bytes(dev)
    t0 = time.perf_counter()
    model = gemma3n.load(path, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    loaded = device_bytes(dev) - before
    report = placement_report(model.decoder)
    table = model.decoder.embed_tokens_per_layer
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    ids = [i % model.config.text.vocab_size for i in ids]  # a random-weight checkpoint's placeholder vocab

    reference = gemma3n.load(path, device="cpu", dtype="float32")
    with torch.inference_mode():
        ours = model.logits(torch.tensor([ids], device=model.decoder.device))[0, -1].float().cpu()
        ref = reference.logits(torch.tensor([ids]))[0, -1].float()
    greedy = {"temperature": 0.0, "max_tokens": decode}
    ref_tokens = reference.generate(ids, **greedy).token_ids
    del reference
    model.generate(ids, temperature=0.0, max_tokens=4)  # warm-up (kernels, caches)
    result = model.generate(ids, **greedy)
    agree = common_prefix(result.token_ids, ref_tokens)
    return {
        "model": model.name,
        "device": str(model.decoder.device),
        "weights": str(model.decoder.dtype).removeprefix("torch."),
        "compute": str(model.decoder.activation_dtype).removeprefix("torch."),
        "load_s": round(load_s, 2),
        "core_on_device": str(next(model.decoder.parameters()).device),
        "ple_table_on": str(table.device),
        "core_gb_report": round(report.device_bytes / 1e9, 3),
        "device_gb_after_load": round(loaded / 1e9, 3) if dev.type == "cuda" else None,
        "logits_max_rel_diff": f"{float((ours - ref).abs().max() / ref.abs().max()):.1e}",
        "top1_equal": bool(ours.argmax() == ref.argmax()),
        "greedy_tokens_equal": f"{agree}/{len(ref_tokens)}",
        "prefill_tok_s": round(result.stats["prompt_tps"], 1),
        "decode_tok_s": round(result.stats["generation_tps"], 1),
        "peak_device_gb": common.cuda_peak_gb() if dev.type == "cuda" else None,
        "peak_rss_gb": round(common.peak_rss_gb(), 2),
    }


COLUMNS = [
    ("model", "model"),
    ("device", "device"),
    ("weights", "weights"),
    ("compute", "compute"),
    ("core_on_device", "core on"),
    ("ple_table_on", "PLE table on"),
    ("core_gb_report", "core GB (report)"),
    ("device_gb_after_load", "device GB after load"),
    ("logits_max_rel_diff", "max rel diff vs CPU fp32"),
    ("top1_equal", "top-1 equal"),
    ("greedy_tokens_equal", "greedy = CPU fp32"),
    ("prefill_tok_s", "prefill tok/s"),
    ("decode_tok_s", "decode tok/s"),
    ("peak_device_gb", "peak device GB"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpoint", default=None, help="a second checkpoint to check after the embedded model")
    ap.add_argument("--dtype", default=None, help="weights' dtype for --checkpoint (default: as stored)")
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu for a dry run")
    rows = [check(None, args.device, None, args.decode)]
    if args.checkpoint:
        rows.append(check(args.checkpoint, args.device, args.dtype, args.decode))
    common.print_table(rows, COLUMNS)
    path = common.write_json("device_check", {"machine": common.machine_info(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
