"""Keep the text model's perplexity: blend the media-tuned decoder back towards the text-only one.

`tools/train_tiny_media.py` fine-tunes the text decoder together with the towers (with KJV replay),
which can cost some text perplexity. Interpolating the decoder's weights between the two
(decoder = base + alpha * (tuned - base); towers and embedders as tuned) trades media skill for
text perplexity without training; this tool measures held-out perplexity (the whole held-out set,
as tools/eval_tiny.py, full model and E2B-like sub-model) for each alpha, and writes the
checkpoint with the largest alpha whose perplexities stay within `--max-loss` of the base's.

    python tools/blend_tiny_media.py --base /tmp/tiny --tuned /work/tiny-mm/run/ckpt --out /tmp/tiny-mm
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_tiny import held_out_windows, perplexity  # noqa: E402

import gemma3n  # noqa: E402

E2B_LIKE = "E2B-like"


def blend(base: Path, tuned: Path, alpha: float, out: Path) -> Path:
    """`tuned` with its text decoder moved back to base + alpha * (tuned - base)."""
    b = load_file(base / "model.safetensors")
    t = load_file(tuned / "model.safetensors")
    mixed = {}
    for k, v in t.items():
        if k.startswith("model.language_model."):
            ref = b.get("model." + k.removeprefix("model.language_model."), b.get(k))
            # the end points exactly: base + 1 * (tuned - base) is not `tuned` in floating point
            if alpha in (0.0, 1.0):
                mixed[k] = (v if alpha else ref).to(v.dtype)
            else:
                mixed[k] = (ref.float() + alpha * (v.float() - ref.float())).to(v.dtype)
        else:
            mixed[k] = v
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tuned, out, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(mixed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def text_ppl(path: Path, windows: torch.Tensor) -> dict[str, float]:
    model = gemma3n.load(path)
    return {"full": perplexity(model, windows, None), E2B_LIKE: perplexity(model, windows, E2B_LIKE)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the text-only model")
    ap.add_argument("--tuned", type=Path, required=True, help="tools/train_tiny_media.py's checkpoint")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--alphas", default="1,0.75,0.5,0.25,0")
    ap.add_argument("--max-loss", type=float, default=0.02, help="largest relative perplexity increase")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    windows = held_out_windows(args.base, 128)
    base = text_ppl(args.base, windows)
    print("base", base, flush=True)
    report = {"base": base, "alphas": {}}
    for alpha in (float(a) for a in args.alphas.split(",")):
        path = blend(args.base, args.tuned, alpha, args.out.with_name(args.out.name + f".a{alpha}"))
        ppl = text_ppl(path, windows)
        worst = max(ppl[k] / base[k] - 1 for k in ppl)
        report["alphas"][alpha] = ppl | {"worst_increase": worst}
        print(alpha, ppl, f"worst {100 * worst:+.2f} %", flush=True)
        if worst <= args.max_loss:
            if args.out.exists():
                shutil.rmtree(args.out)
            path.rename(args.out)
            report["chosen"] = alpha
            break
        shutil.rmtree(path)
    (args.out.parent / (args.out.name + "-blend.json")).write_text(json.dumps(report, indent=1) + "\n")
    print("chosen", report.get("chosen"), flush=True)
    if "chosen" not in report:
        raise SystemExit("no alpha keeps the text perplexity")


if __name__ == "__main__":
    main()
