"""Images per second of the MobileNet-V5-300M vision tower on CPU: ours vs transformers.

The real `mobilenetv5_300m_enc` (294M parameters), random weights, fp32, one image per call, at
256 / 512 / 768 px. transformers' tower is `AutoModel.from_config(Gemma3nVisionConfig())` (timm,
NCHW) plus `get_image_features`' reshape / permute / x sqrt(2048); ours is `VisionTower` built
from that model's own state dict, so the outputs are compared too. Calls alternate between the
two so that both see the same load on a shared machine; the best time of each is reported.

    python bench/bench_vision.py                      # 256, 512, 768
    python bench/bench_vision.py --sizes 256 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_info, peak_rss_gb, print_table, write_json  # noqa: E402
from gemma3n.vision import VisionTower  # noqa: E402


def timed_pair(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Best wall time and best process CPU time of each fn over `repeats` alternating runs after
    one warm-up each. On a shared machine the CPU time is the steadier figure (it leaves out the
    time this process waited for a core); with --threads 1 it is the single-core compute time."""
    outs = {k: fn() for k, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    best_cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            outs[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
            best_cpu[k] = min(best_cpu[k], time.process_time() - c)
    return best, best_cpu, outs


def tower_gmac(size: int) -> float:
    """Multiply-adds of one image through the tower's convolutions (meta device: shapes only)."""
    import timm

    with torch.device("meta"):
        m = timm.create_model("mobilenetv5_300m_enc", pretrained=False, num_classes=0)
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        total += out.numel() * mod.weight[0].numel()

    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook)
    m(torch.empty(1, 3, size, size, device="meta"))
    return total / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,512,768", help="comma-separated square input sizes")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per tower and size (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, Gemma3nVisionConfig

    torch.manual_seed(args.seed)
    cfg = Gemma3nVisionConfig()
    t0 = time.perf_counter()
    hf = AutoModel.from_config(cfg).eval()
    with torch.no_grad():  # O(1) norm weights / layer scales so that the outputs are a real check
        for name, p in hf.named_parameters():
            if p.ndim == 1 and not name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    build_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = VisionTower.from_state_dict(hf.state_dict(), cfg.to_dict(), device="cpu", dtype=torch.float32)
    build_ours = time.perf_counter() - t0
    hidden = cfg.hidden_size

    @torch.inference_mode()
    def run_hf(x: torch.Tensor) -> torch.Tensor:
        h = hf(pixel_values=x, do_pooling=False).last_hidden_state
        return h.reshape(h.shape[0], hidden, -1).permute(0, 2, 1) * hidden**0.5

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        best, cpu, outs = timed_pair({"hf": lambda x=x: run_hf(x), "ours": lambda x=x: ours(x)}, args.repeats)
        ref, got = outs["hf"], outs["ours"]
        gmac = tower_gmac(size)
        rows.append(
            {
                "size": size,
                "tokens": got.shape[1],
                "gmac": gmac,
                "hf_s": best["hf"],
                "ours_s": best["ours"],
                "hf_img_s": 1 / best["hf"],
                "ours_img_s": 1 / best["ours"],
                "speedup": best["hf"] / best["ours"],
                "hf_cpu_s": cpu["hf"],
                "ours_cpu_s": cpu["ours"],
                "cpu_speedup": cpu["hf"] / cpu["ours"],
                "ours_gflops": 2 * gmac / best["ours"],
                "max_rel_err": ((got - ref).abs().max() / ref.abs().max()).item(),
            }
        )
        print(
            f"{size}px: wall hf {best['hf']:.2f}s ours {best['ours']:.2f}s; "
            f"cpu hf {cpu['hf']:.2f}s ours {cpu['ours']:.2f}s",
            flush=True,
        )

    print_table(
        rows,
        [
            ("size", "px"),
            ("tokens", "tokens"),
            ("gmac", "GMAC"),
            ("hf_img_s", "HF img/s"),
            ("ours_img_s", "ours img/s"),
            ("speedup", "speedup"),
            ("hf_cpu_s", "HF cpu s"),
            ("ours_cpu_s", "ours cpu s"),
            ("cpu_speedup", "cpu-time speedup"),
            ("ours_gflops", "ours GFLOP/s"),
            ("max_rel_err", "max rel err"),
        ],
    )
    path = write_json(
        "bench_vision",
        {
            "machine": machine_info(),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "repeats": args.repeats,
            "build_s": {"hf": build_hf, "ours": build_ours},
            "peak_rss_gb": peak_rss_gb(),
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
