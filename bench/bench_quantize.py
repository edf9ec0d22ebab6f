"""Weight-only quantization at real shapes: decode tok/s, peak RSS and top-1 agreement with the
stored-precision model, for bf16 (as stored) / int8 / int4, each in its own process (clean RSS).

  python bench/bench_quantize.py --checkpoint /work/ckpt/e2b --schemes bf16,int8,int4:64 --decode 8

Decode tok/s is timed over the decoded tokens after the first; the bound is bytes read per token
(bench.common.decode_weight_params at the scheme's bytes per weight) / measured read bandwidth.
Top-1 agreement: greedy next-token argmax of a fixed random prompt at every position, vs bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402


def worker(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from gemma3n.model import load

    t0 = time.perf_counter()
    scheme = None if a.worker == "bf16" else a.worker
    model = load(a.checkpoint, quantize=scheme)
    load_s = time.perf_counter() - t0
    rss_loaded = common.rss_gb()
    vocab = model.config.text.vocab_size
    ids = torch.randint(0, min(vocab, 256000), (1, a.prompt), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    logits = model.logits(ids)
    prefill_s = time.perf_counter() - t0
    top1 = logits[0].argmax(-1).tolist()
    del logits
    times, cpu, counts = [], [], []
    t_last, c_last = time.perf_counter(), time.process_time()
    for piece in model.stream(ids[0].tolist(), max_tokens=a.decode, temperature=0.0):
        now, c_now = time.perf_counter(), time.process_time()
        times.append(now - t_last)
        cpu.append(c_now - c_last)
        counts.append(max(1, len(piece.token_ids)))
        t_last, c_last = now, c_now
    # the first piece carries the prefill: timed from the second on
    n = sum(counts[1:]) or 1
    steady, steady_cpu = sum(times[1:]) or sum(times), sum(cpu[1:]) or sum(cpu)
    return {
        "scheme": a.worker,
        "threads": a.threads,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_tps": n / steady,
        # CPU seconds per token / threads: robust to neighbours on a shared machine
        "decode_cpu_tps": n / (steady_cpu / a.threads),
        "rss_loaded_gb": rss_loaded,
        "peak_rss_gb": common.peak_rss_gb(),
        "top1": top1,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--schemes", default="bf16,int8,int4:64")
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bandwidth", type=float, default=None, help="read GB/s for the bound (default: measure)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a)))
        return 0

    bw = a.bandwidth or common.measure_bandwidth(a.threads, size_gb=0.5, repeats=5)["read_gbps"]
    cfg = json.loads((Path(a.checkpoint) / "config.json").read_text())
    params = common.decode_weight_params(common.text_config_of(cfg))["total"]
    rows, ref = [], None
    for scheme in a.schemes.split(","):
        out = Path(f"/tmp/bench_quantize_{os.getpid()}_{scheme.replace(':', '_')}.json")
        cmd = [sys.executable, __file__, "--checkpoint", a.checkpoint, "--worker", scheme, "--result", str(out)]
        cmd += ["--decode", str(a.decode), "--prompt", str(a.prompt), "--threads", str(a.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        subprocess.run(cmd, check=True, env=env)
        r = json.loads(out.read_text())
        out.unlink()
        per = {"bf16": 2.0, "int8": 1.0}.get(scheme)
        if per is None:
            g = int(scheme.split(":")[1]) if ":" in scheme else 64
            per = 0.5 + 4.0 / g
        r["bound_tps"] = bw * 1e9 / (params * per)
        if ref is None:
            ref = r["top1"]
        r["top1_agree"] = sum(x == y for x, y in zip(r.pop("top1"), ref)) / len(ref)
        rows.append(r)
    cols = [
        ("scheme", "scheme"),
        ("decode_tps", "decode tok/s"),
        ("decode_cpu_tps", "by CPU time"),
        ("bound_tps", "bound tok/s"),
        ("peak_rss_gb", "peak RSS GB"),
        ("rss_loaded_gb", "RSS loaded GB"),
        ("load_s", "load s"),
        ("prefill_s", f"prefill {a.prompt} s"),
        ("top1_agree", "top-1 vs first"),
    ]
    print(f"read bandwidth {bw:.1f} GB/s ({a.threads} threads); {params / 1e9:.2f} B weights read per token")
    common.print_table(rows, cols)
    common.write_json("quantize", {"checkpoint": a.checkpoint, "bandwidth_gbps": bw, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
