"""Images per second of the MobileNet-V5-300M vision tower on CPU: ours vs transformers, and video
frames per second when frames go through in batches.

The real `mobilenetv5_300m_enc` (294M parameters), random weights rounded to bf16 as a checkpoint
stores them. Ours is `VisionTower` built from those bf16 tensors, computing in the dtype the
compute policy picks for this CPU (what `gemma3n.load` of a bf16 checkpoint gives); transformers'
tower (timm, NCHW, plus `get_image_features`' reshape / permute / x sqrt(2048)) runs the same
values in fp32 and in bf16. Calls alternate between the engines so that all see the same load on a
shared machine; the best of `--repeats` is kept. Errors are against transformers fp32.

    python bench/bench_vision.py --threads 2                      # 256, 512, 768 px; batches 1, auto, 8
    python bench/bench_vision.py --sizes 256 --repeats 1 --batches 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_info, peak_rss_gb, print_table, write_json  # noqa: E402
from bench.towers import hf_in, hf_vision, load_note, ours_vision, rel_err, timed  # noqa: E402
from gemma3n import kernels  # noqa: E402
from gemma3n.hardware import cpu_info, measure  # noqa: E402
from gemma3n.multimodal import vision_batch  # noqa: E402


def tower_gflop(tower: torch.nn.Module, size: int) -> float:
    """FLOPs of one image (torch's flop counter: convolutions, matmuls, attention)."""
    from bench.profile_towers import block_flops

    x = torch.rand(1, 3, size, size)
    return block_flops(lambda: tower(x), {"all": tower}, tower)["all"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,512,768", help="comma-separated square input sizes")
    ap.add_argument(
        "--batches", default="1,auto,8",
        help="images per call; >1 is the video path (ours only); auto: what the runtime uses at that size",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per engine and size (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--engines", default="ours,hf-bf16,hf-fp32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    kernels.get(build=False)  # the fused epilogues, as `gemma3n.load` would have them
    info, probe = cpu_info(), measure()
    print(
        f"{info.model} ({', '.join(info.notable())}); GEMM fp32 {probe.fp32_gflops:.0f}, "
        f"bf16 {probe.bf16_gflops:.0f} GFLOP/s, {torch.get_num_threads()} threads; {load_note()}"
    )
    t0 = time.perf_counter()
    hf, cfg = hf_vision()
    ours = ours_vision(hf, cfg)
    build_ours = time.perf_counter() - t0
    hf32, hf16 = hf_in(hf, torch.float32), hf_in(hf, torch.bfloat16)
    del hf
    hidden = cfg["hidden_size"]
    rate = {torch.float32: probe.fp32_gflops, torch.bfloat16: probe.bf16_gflops}
    gemm_of = {"ours": rate[ours.gemm_dtype], "hf-fp32": rate[torch.float32], "hf-bf16": rate[torch.bfloat16]}

    def run_hf(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = model(pixel_values=x.to(next(model.parameters()).dtype), do_pooling=False).last_hidden_state
        return h.reshape(h.shape[0], hidden, -1).permute(0, 2, 1) * hidden**0.5

    rows = []
    with torch.inference_mode():
        for size in [int(s) for s in args.sizes.split(",")]:
            gflop = tower_gflop(ours, size)
            batches = [vision_batch(size, size) if b == "auto" else int(b) for b in args.batches.split(",")]
            for batch in dict.fromkeys(batches):  # in order, once each
                x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
                fns = {"ours": lambda x=x: ours(x)}
                if batch == 1:  # transformers per image; the video path is ours
                    if "hf-bf16" in engines:
                        fns["hf-bf16"] = lambda x=x: run_hf(hf16, x)
                    if "hf-fp32" in engines:
                        fns["hf-fp32"] = lambda x=x: run_hf(hf32, x)
                load = os.getloadavg()[0]
                best, median, peaks, outs = timed(fns, args.repeats)
                ref = outs["hf-fp32"] if "hf-fp32" in outs else run_hf(hf32, x[:1])
                fastest_hf = min((best[k] for k in best if k.startswith("hf")), default=None)
                for k in fns:
                    rows.append({
                        "engine": k, "size": size, "batch": batch, "img_s": batch / best[k],
                        "ms_per_img": 1e3 * best[k] / batch, "median_ms_per_img": 1e3 * median[k] / batch,
                        "gflops": batch * gflop / best[k], "of_gemm": batch * gflop / best[k] / gemm_of[k],
                        "vs_fastest_hf": fastest_hf / best[k] if fastest_hf else None,
                        "rel_err_vs_hf_fp32": rel_err(outs[k][:1], ref[:1]), "act_peak_gb": peaks[k], "load": load,
                    })  # fmt: skip
                print(
                    f"{size}px x{batch}: "
                    + ", ".join(f"{k} {1e3 * best[k] / batch:.0f} ms/img" for k in fns)
                    + f" ({load_note()})",
                    flush=True,
                )

    print_table(
        rows,
        [("engine", "engine"), ("size", "px"), ("batch", "batch"), ("img_s", "img/s"), ("ms_per_img", "ms/img"),
         ("median_ms_per_img", "median ms/img"), ("gflops", "GFLOP/s"), ("of_gemm", "of GEMM rate"),
         ("vs_fastest_hf", "vs fastest HF"), ("rel_err_vs_hf_fp32", "max rel err vs HF fp32"),
         ("act_peak_gb", "activation peak GB"), ("load", "load")],
    )  # fmt: skip
    path = write_json(
        "bench_vision",
        {
            "machine": machine_info(), "cpu": info.model, "cpu_flags": info.notable(),
            "native_kernels": kernels.status(), "threads": torch.get_num_threads(),
            "probe": vars(probe), "ours_dtype": str(ours.compute_dtype), "build_s": build_ours,
            "repeats": args.repeats, "peak_rss_gb": peak_rss_gb(), "loadavg_end": os.getloadavg(), "rows": rows,
        },
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
