"""Real-time factor of the USM audio encoder on CPU: ours vs transformers in fp32 and in bf16.

Real E2B/E4B audio shapes (hidden 1536, 12 conformer layers, 681M parameters), random weights
rounded to bf16 as a checkpoint stores them. Ours is `AudioEncoder` built from those bf16 tensors
with the compute policy of this CPU (what `gemma3n.load` of a bf16 checkpoint gives: fp32
activations, matmuls in `hardware.gemm_dtype`); transformers' `Gemma3nAudioEncoder` runs the
same values in fp32 and in bf16. The encoder alone is timed (mel features made beforehand;
their cost is reported apart). Calls alternate between the engines so that all see the same
load on a shared machine; best and median of `--repeats`. RTF = seconds of audio / seconds of
encoder time. GFLOP/s uses torch's flop counter (matmuls, convolutions); "of GEMM" compares it
with this CPU's measured GEMM rate in the dtype the engine multiplies in.

    python bench/bench_audio.py --threads 2                 # 10 s and 30 s clips
    python bench/bench_audio.py --layers 2 --repeats 1      # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_info, peak_rss_gb, print_table, write_json  # noqa: E402
from bench.profile_towers import block_flops  # noqa: E402
from bench.towers import hf_audio, hf_in, load_note, ours_audio, rel_err, speechlike, timed  # noqa: E402
from gemma3n import kernels  # noqa: E402
from gemma3n.audio import AudioFeatureExtractor  # noqa: E402
from gemma3n.hardware import cpu_info, measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", default="10,30", help="clip lengths (s), comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per engine and clip (after 1 warm-up)")
    ap.add_argument("--layers", type=int, default=12, help="conformer layers (12 = real; fewer for a smoke run)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--engines", default="ours,hf-bf16,hf-fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    kernels.get(build=False)  # the fused epilogues, as `gemma3n.load` would have them
    info, probe = cpu_info(), measure()
    print(
        f"{info.model} ({', '.join(info.notable())}); GEMM fp32 {probe.fp32_gflops:.0f}, "
        f"bf16 {probe.bf16_gflops:.0f} GFLOP/s; {args.threads} threads; {load_note()}"
    )

    from transformers import Gemma3nAudioFeatureExtractor

    hf, cfg = hf_audio(args.layers)
    t0 = time.perf_counter()
    ours = ours_audio(hf, cfg)
    build_s = time.perf_counter() - t0
    hf32, hf16 = hf_in(hf, torch.float32), hf_in(hf, torch.bfloat16)
    del hf
    rate = {torch.float32: probe.fp32_gflops, torch.bfloat16: probe.bf16_gflops}
    gemm_of = {"ours": rate[ours.gemm_dtype], "hf-fp32": rate[torch.float32], "hf-bf16": rate[torch.bfloat16]}
    our_fe, hf_fe = AudioFeatureExtractor(), Gemma3nAudioFeatureExtractor()

    def one_clip(seconds: float) -> list[dict]:
        wave = speechlike(seconds)
        fe_best, _, _, _ = timed(
            {"ours": lambda: our_fe([wave]), "hf": lambda: hf_fe([wave], return_tensors="pt")}, args.repeats
        )
        feats, mask = our_fe([wave])
        ref_in = hf_fe([wave], return_tensors="pt")
        mel, padded = ref_in["input_features"], ~ref_in["input_features_mask"]
        fns = {}
        if "ours" in engines:
            fns["ours"] = lambda: ours(feats, mask)[0]
        if "hf-bf16" in engines:
            fns["hf-bf16"] = lambda: hf16(mel.bfloat16(), padded).last_hidden_state
        if "hf-fp32" in engines:
            fns["hf-fp32"] = lambda: hf32(mel, padded).last_hidden_state
        gflop = block_flops(lambda: ours(feats, mask), {"all": ours}, ours)["all"] / 1e9
        load = os.getloadavg()[0]
        best, median, peaks, outs = timed(fns, args.repeats)
        ref = outs["hf-fp32"] if "hf-fp32" in outs else hf32(mel, padded).last_hidden_state
        fastest_hf = min((best[k] for k in best if k.startswith("hf")), default=None)
        print(
            f"{seconds:g} s ({gflop:.0f} GFLOP): "
            + ", ".join(f"{k} {best[k]:.2f} s" for k in fns)
            + f" ({load_note()})",
            flush=True,
        )
        return [{
            "engine": k, "audio_s": seconds, "best_s": best[k], "median_s": median[k],
            "rtf": seconds / best[k], "rtf_median": seconds / median[k], "gflops": gflop / best[k],
            "of_gemm": gflop / best[k] / gemm_of[k], "vs_fastest_hf": fastest_hf / best[k] if fastest_hf else None,
            "features_ms": 1e3 * fe_best["ours" if k == "ours" else "hf"],
            "rel_err_vs_hf_fp32": rel_err(outs[k], ref), "act_peak_gb": peaks[k], "load": load,
        } for k in fns]  # fmt: skip

    with torch.inference_mode():
        rows = [row for seconds in args.seconds.split(",") for row in one_clip(float(seconds))]

    print()
    print_table(
        rows,
        [("engine", "engine"), ("audio_s", "audio s"), ("best_s", "best s"), ("median_s", "median s"),
         ("rtf", "x real time"), ("gflops", "GFLOP/s"), ("of_gemm", "of GEMM rate"),
         ("vs_fastest_hf", "vs fastest HF"), ("features_ms", "features ms"),
         ("rel_err_vs_hf_fp32", "max rel err vs HF fp32"), ("act_peak_gb", "activation peak GB"), ("load", "load")],
    )  # fmt: skip
    path = write_json(
        "bench_audio",
        {
            "machine": machine_info(), "cpu": info.model, "cpu_flags": info.notable(), "threads": args.threads,
            "probe": vars(probe), "layers": args.layers, "ours_compute": str(ours.compute_dtype),
            "ours_gemm": str(ours.gemm_dtype), "native_kernels": kernels.status(), "build_s": build_s,
            "repeats": args.repeats, "peak_rss_gb": peak_rss_gb(), "loadavg_end": os.getloadavg(), "rows": rows,
        },
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
