"""Where the towers' time goes: per block, its FLOPs, its time and the GFLOP/s it achieves.

USM conformer (SSCP convolutions, input projection, and per layer the two half-step FFNs, the
chunked local attention, the light convolution module) at each clip length, and MobileNet-V5 (stem,
edge-residual / inverted-residual / multi-query-attention blocks by stage, the MSFA adapter) at each
image size. Our towers are built from bf16 weights, as a checkpoint stores them, and compute in
the dtype hardware.py picks for this CPU. FLOPs are torch.utils.flop_counter's (matmuls,
convolutions, attention: 2 per multiply-add); elementwise work is not counted, so a block made of
norms and activations shows a low rate. The reference rate is the CPU's GEMM rate in the same
dtype, measured at the start ([512, 2048] x [2048, 2048]).

    python bench/profile_towers.py --threads 2                 # both towers, all sizes
    python bench/profile_towers.py --towers vision --sizes 256 --ops 8   # + top 8 aten ops per kind
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_info, print_table, write_json  # noqa: E402
from bench.towers import hf_audio, hf_vision, ours_audio, ours_vision, speechlike  # noqa: E402
from gemma3n.audio import AudioFeatureExtractor  # noqa: E402
from gemma3n.hardware import cpu_info, measure  # noqa: E402


@dataclass
class Timer:
    """Forward hooks on the chosen blocks: the best time of each over the runs."""

    blocks: dict[str, nn.Module]
    best: dict[str, float] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> Timer:
        self._handles = []
        for name, mod in self.blocks.items():
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: self._begin(n)))
            self._handles.append(mod.register_forward_hook(lambda m, a, o, n=name: self._end(n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _begin(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        dt = time.perf_counter() - self._start[name]
        # a block called several times in one forward (none here) would keep its best call
        self.best[name] = min(self.best.get(name, float("inf")), dt)


def _count_cpu_attention() -> None:
    """torch's flop counter knows the GPU attention kernels only; the CPU one has the same maths."""
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op)(
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
        )


def block_flops(run: Callable[[], object], blocks: dict[str, nn.Module], root: nn.Module) -> dict[str, float]:
    """FLOPs of one forward per block (FlopCounterMode names modules by the root's class + path,
    and the whole run "Global")."""
    names = {mod: f"{type(root).__name__}.{name}" if name else "Global" for name, mod in root.named_modules()}
    _count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        run()
    counts = counter.get_flop_counts()
    return {b: float(sum(counts.get(names[m], {}).values())) for b, m in blocks.items()}


def profile(
    run: Callable[[], object], blocks: dict[str, nn.Module], kind_of: Callable[[str], str], root: nn.Module, reps: int
) -> tuple[list[dict], float]:
    """Per-block rows (name, kind, GFLOP, ms, GFLOP/s) and the best whole-forward time."""
    flops = block_flops(run, blocks, root)
    run()  # warm-up (allocator, oneDNN primitive caches)
    total = float("inf")
    with Timer(blocks) as timer:
        for _ in range(reps):
            t = time.perf_counter()
            run()
            total = min(total, time.perf_counter() - t)
    rows = []
    for name in blocks:
        s = timer.best[name]
        rows.append(
            {
                "block": name,
                "kind": kind_of(name),
                "gflop": flops[name] / 1e9,
                "ms": s * 1e3,
                "gflops": flops[name] / s / 1e9,
            }
        )
    return rows, total


def by_kind(rows: Iterable[dict]) -> list[dict]:
    groups: dict[str, dict] = defaultdict(lambda: {"n": 0, "gflop": 0.0, "ms": 0.0})
    for r in rows:
        g = groups[r["kind"]]
        g["n"] += 1
        g["gflop"] += r["gflop"]
        g["ms"] += r["ms"]
    out = [{"kind": k, **g, "gflops": g["gflop"] / g["ms"] * 1e3 if g["ms"] else 0.0} for k, g in groups.items()]
    total_ms = sum(g["ms"] for g in out)
    for g in out:
        g["share"] = 100 * g["ms"] / total_ms
    return out


def top_ops(run: Callable[[], object], n: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


# --- the towers' blocks ---------------------------------------------------------------------------------


def vision_blocks(tower: nn.Module) -> tuple[dict[str, nn.Module], Callable[[str], str]]:
    blocks = {"stem": tower.stem}
    stage_of = {}
    i = 0
    for si, n in enumerate(tower.stage_ends):
        for blk in tower.blocks[i : i + n]:
            blocks[f"blocks.{i}"] = blk
            stage_of[f"blocks.{i}"] = si
            i += 1
    blocks["msfa"] = tower.msfa

    def kind(name: str) -> str:
        if name in ("stem", "msfa"):
            return name
        blk = blocks[name]
        label = type(blk).__name__.strip("_").replace("EdgeResidual", "ER").replace("MobileMQA", "MQA")
        if label == "UIR":
            label += " ffn" if blk.dw_start is None and blk.dw_mid is None else " dw"
        return f"stage {stage_of[name]} {label}"

    return blocks, kind


# each conformer layer's final norm runs fused (fused.norm_act), outside any module call
AUDIO_PARTS = ("ffw_layer_start", "attention", "lconv1d", "ffw_layer_end")


def audio_blocks(enc: nn.Module) -> tuple[dict[str, nn.Module], Callable[[str], str]]:
    sscp = enc.subsample_conv_projection
    blocks = {"sscp.conv_0": sscp.conv_0, "sscp.conv_1": sscp.conv_1, "sscp.input_proj": sscp.input_proj_linear}
    for i, layer in enumerate(enc.conformer):
        for part in AUDIO_PARTS:
            blocks[f"conformer.{i}.{part}"] = getattr(layer, part)
    return blocks, lambda name: name.rsplit(".", 1)[-1] if name.startswith("conformer") else name


# --- main -----------------------------------------------------------------------------------------------

KIND_COLUMNS = [
    ("kind", "block kind"),
    ("n", "n"),
    ("gflop", "GFLOP"),
    ("ms", "ms"),
    ("share", "% time"),
    ("gflops", "GFLOP/s"),
]


def report(title: str, rows: list[dict], total_s: float, gemm: float, ops: str | None) -> dict:
    gflop = sum(r["gflop"] for r in rows)
    print(
        f"\n### {title}: {total_s * 1e3:.0f} ms, {gflop:.1f} GFLOP, {gflop / total_s:.0f} GFLOP/s "
        f"= {100 * gflop / total_s / gemm:.0f} % of the GEMM rate ({gemm:.0f})"
    )
    kinds = by_kind(rows)
    print_table(kinds, KIND_COLUMNS)
    if ops:
        print(ops)
    return {"what": title, "total_s": total_s, "gflop": gflop, "kinds": kinds, "blocks": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--towers", default="audio,vision")
    ap.add_argument("--sizes", default="256,512,768", help="image sizes (px)")
    ap.add_argument("--seconds", default="10,30", help="clip lengths (s)")
    ap.add_argument("--layers", type=int, default=12, help="conformer layers (12 = real)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3, help="timed forwards after a warm-up (best kept per block)")
    ap.add_argument("--ops", type=int, default=0, help="also print the top N aten ops of one forward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = cpu_info()
    probe = measure()
    print(
        f"{info.model} ({', '.join(info.notable())}), {args.threads} threads; GEMM fp32 {probe.fp32_gflops:.0f}, "
        f"bf16 {probe.bf16_gflops:.0f} GFLOP/s; load {os.getloadavg()[0]:.2f}"
    )
    results = []
    towers = args.towers.split(",")
    with torch.inference_mode():
        if "vision" in towers:
            hf, cfg = hf_vision()
            tower = ours_vision(hf, cfg)
            del hf
            blocks, kind = vision_blocks(tower)
            gemm = probe.bf16_gflops if tower.gemm_dtype == torch.bfloat16 else probe.fp32_gflops
            for size in (int(s) for s in args.sizes.split(",")):
                x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
                rows, total = profile(lambda x=x: tower(x), blocks, kind, tower, args.reps)
                ops = top_ops(lambda x=x: tower(x), args.ops) if args.ops else None
                results.append(report(f"vision {size} px ({tower.gemm_dtype})", rows, total, gemm, ops))
        if "audio" in towers:
            hf, cfg = hf_audio(args.layers)
            enc = ours_audio(hf, cfg)
            del hf
            blocks, kind = audio_blocks(enc)
            fe = AudioFeatureExtractor()
            gemm = probe.bf16_gflops if enc.gemm_dtype == torch.bfloat16 else probe.fp32_gflops
            for seconds in (float(s) for s in args.seconds.split(",")):
                feats, mask = fe([speechlike(seconds)])
                rows, total = profile(lambda f=feats, m=mask: enc(f, m), blocks, kind, enc, args.reps)
                ops = top_ops(lambda f=feats, m=mask: enc(f, m), args.ops) if args.ops else None
                results.append(report(f"audio {seconds:g} s ({enc.gemm_dtype})", rows, total, gemm, ops))
    path = write_json(
        "profile_towers",
        {
            "machine": machine_info(),
            "cpu_flags": info.notable(),
            "threads": args.threads,
            "probe": vars(probe),
            "loadavg": os.getloadavg(),
            "results": results,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
