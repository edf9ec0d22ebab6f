"""MatFormer benchmark: streamed slice export, and elastic sizes on one loaded model.

    python bench/bench_matformer.py                       # /work/ckpt/e4b-text, made if missing
    python bench/bench_matformer.py --checkpoint DIR --sizes E2B,E2.98B-block --prompt 64 --decode 8
    python bench/bench_matformer.py --skip-export         # elastic part only

1. Export (a fresh subprocess, so its peak RSS is the export's alone): `export_slice(ckpt, "E2B")`,
   wall time, throughput, peak RSS (VmHWM) vs the size of the checkpoint. The output is deleted.
   The checkpoint is real-shape E4B with random weights, written by tools/make_random_checkpoint.py
   (`--shape E4B --text-only`) when missing; without that tool the export part is skipped.
2. Elastic (another subprocess): `gemma3n.load(ckpt)` once, then per size
   - switch latency: the first `model.plan(size)` (resolve + build the view) and a repeated one,
   - whether the view shares storage with the full model (FFN `data_ptr`s) and RSS after switching,
   - prefill tok/s and greedy decode tok/s (`model.generate(ids, size=...)`, best of `--repeat`).
A markdown table goes to stdout and everything to bench/out/bench_matformer-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

MAKER = os.path.join(ROOT, "tools", "make_random_checkpoint.py")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# --- workers (run in their own subprocess) ------------------------------------------------------------


def export_worker(ckpt: str, size: str, out: str) -> dict[str, Any]:
    from gemma3n.export import export_slice

    t0 = time.perf_counter()
    export_slice(ckpt, size, out, force=True, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    written = _dir_bytes(out)
    return {
        "size": size,
        "seconds": seconds,
        "written_gb": written / 1e9,
        "source_gb": _dir_bytes(ckpt) / 1e9,
        "write_gbps": written / 1e9 / seconds,
        "peak_rss_gb": common.peak_rss_gb(),
    }


def elastic_worker(ckpt: str, sizes: list[Any], prompt: int, decode: int, repeat: int) -> dict[str, Any]:
    import torch

    import gemma3n

    if not os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
        # Random checkpoints ship no tokenizer; prompts are token ids, so borrow the tiny model's
        # through a directory of symlinks (the checkpoint itself is left untouched).
        import tempfile

        from gemma3n.model import default_model_path

        view = tempfile.mkdtemp(prefix="bench-matformer-")
        for name in os.listdir(ckpt):
            os.symlink(os.path.join(os.path.abspath(ckpt), name), os.path.join(view, name))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(default_model_path() / name):
                os.symlink(default_model_path() / name, os.path.join(view, name))
        ckpt = view
    t0 = time.perf_counter()
    model = gemma3n.load(ckpt, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1234)
    hi = min(200_000, model.config.text.vocab_size_per_layer_input)
    ids = torch.randint(hi // 4, hi, (prompt,), generator=gen).tolist()
    layers = model.decoder.layers

    def ffn_ptrs() -> list[int]:
        return [layer.mlp.gate_proj.weight.untyped_storage().data_ptr() for layer in layers]

    ptrs0 = ffn_ptrs()
    rows = []
    model.generate(prompt=ids[:8], max_tokens=2, temperature=0)  # warm-up (allocator, kernels)
    for size in [None, *sizes]:
        rss0 = common.rss_gb()
        t = time.perf_counter()
        plan = model.plan(size)
        cold_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        model.plan(size)
        warm_ms = (time.perf_counter() - t) * 1e3
        best: dict[str, float] = {}
        for _ in range(repeat):
            res = model.generate(prompt=ids, max_tokens=decode, temperature=0, size=size)
            st = res.stats
            best["prefill_tps"] = max(best.get("prefill_tps", 0.0), float(st.get("prompt_tps", 0.0)))
            best["decode_tps"] = max(best.get("decode_tps", 0.0), float(st.get("generation_tps", 0.0)))
        from gemma3n.matformer import effective_params

        rows.append(
            {
                "size": size if isinstance(size, str) else (plan.spec.name if plan.spec else "full"),
                "layers": len(plan.layers),
                "effective_b": effective_params(plan.config) / 1e9,
                "switch_cold_ms": cold_ms,
                "switch_warm_ms": warm_ms,
                "rss_delta_gb": common.rss_gb() - rss0,
                "weights_shared": ffn_ptrs() == ptrs0,
                **best,
            }
        )
    return {"load_s": load_s, "prompt_tokens": prompt, "decode_tokens": decode, "rows": rows}


def _run_worker(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    if proc.returncode:
        raise SystemExit(f"worker {args[0]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="/work/ckpt/e4b-text", help="an E4B checkpoint directory")
    ap.add_argument("--export-size", default="E2B", help="slice exported in part 1")
    ap.add_argument("--out", default=None, help="export dir (default: <checkpoint>-slice-<size>, deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the exported slice")
    ap.add_argument("--sizes", default="E2B", help="comma-separated sizes compared with the full model")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=8, help="greedy tokens decoded")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--skip-elastic", action="store_true")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        if kind == "export":
            result = export_worker(*rest)
        else:
            result = elastic_worker(rest[0], [s for s in rest[1].split(",") if s], *map(int, rest[2:]))
        print(json.dumps(result))
        return 0

    ckpt = args.checkpoint
    report: dict[str, Any] = {"machine": common.machine_info(), "checkpoint": ckpt}
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        if not os.path.isfile(MAKER):
            print(f"{ckpt} missing and {MAKER} absent: nothing to benchmark (skipped)")
            return 0
        print(f"writing a random real-shape E4B checkpoint to {ckpt} ...", flush=True)
        subprocess.run([sys.executable, MAKER, "--shape", "E4B", "--text-only", "--out", ckpt], check=True, cwd=ROOT)

    if not args.skip_export:
        out = args.out or f"{ckpt.rstrip('/')}-slice-{args.export_size}"
        try:
            exp = _run_worker(["--worker", "export", ckpt, args.export_size, out])
        finally:
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        report["export"] = exp
        print(f"\n## export {args.export_size} from {ckpt}\n")
        common.print_table(
            [exp],
            [
                ("size", "slice"),
                ("source_gb", "source GB"),
                ("written_gb", "written GB"),
                ("seconds", "time s"),
                ("write_gbps", "GB/s"),
                ("peak_rss_gb", "peak RSS GB"),
            ],
        )
    if not args.skip_elastic:
        el = _run_worker(
            ["--worker", "elastic", ckpt, args.sizes, str(args.prompt), str(args.decode), str(args.repeat)]
        )
        report["elastic"] = el
        print(
            f"\n## elastic sizes on one loaded model (load {el['load_s']:.1f} s, prompt {args.prompt}, "
            f"decode {args.decode})\n"
        )
        common.print_table(
            el["rows"],
            [
                ("size", "size"),
                ("layers", "layers"),
                ("effective_b", "eff. B"),
                ("switch_cold_ms", "switch ms (first)"),
                ("switch_warm_ms", "switch ms (again)"),
                ("weights_shared", "no copy"),
                ("rss_delta_gb", "RSS delta GB"),
                ("prefill_tps", "prefill tok/s"),
                ("decode_tps", "decode tok/s"),
            ],
        )
    path = common.write_json("bench_matformer", report)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
