"""Held-out perplexity of the embedded default model at every MatFormer size it declares, each run
as an elastic view of the one loaded model (no slicing, no copy), plotted against effective
parameters: the tiny analogue of Google's Mix-n-Match curve (issue #7).

Optionally the same sizes sliced out of a contrast model trained *without* MatFormer
(`tools/train_tiny.py --no-matformer`), whose sub-models were never trained to work on their own.

    python tools/eval_tiny.py [--model DIR] [--contrast DIR] [--out docs/tiny-matformer]

Writes OUT.json (every figure), OUT.png (the plot; needs matplotlib: `pip install -e .[tools]`) and
prints a Markdown table. Sizes come from the model's matformer_sizes.json (`gemma3n slice --list`).

With --quantize, the quality of weight-only quantization instead (issue #9): held-out perplexity
and greedy top-1 agreement with the model as stored, for each scheme given to `gemma3n.load`,
written to OUT.json.

    python tools/eval_tiny.py --quantize int8,int4:32,int4:64,int4:128 --out bench/out/tiny-quantize
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kjv_corpus import kjv_chapters, split, token_stream  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import gemma3n  # noqa: E402
from gemma3n.matformer import effective_params, resolve_size, sliced_text_config  # noqa: E402
from gemma3n.model import default_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def held_out_windows(model_dir: Path, seq: int) -> torch.Tensor:
    """Every held-out chapter, tokenized by the model's own tokenizer, cut into [N, seq+1] windows."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = token_stream(tok, split(kjv_chapters())[1])
    n = len(ids) // (seq + 1)
    return ids[: n * (seq + 1)].view(n, seq + 1)


@torch.inference_mode()
def perplexity(model: gemma3n.Model, windows: torch.Tensor, size: dict | None, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model.logits(w[:, :-1], size=size)
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


def declared_sizes(model_dir: Path) -> dict[str, dict]:
    file = model_dir / "matformer_sizes.json"
    return json.loads(file.read_text())["sizes"] if file.is_file() else {}


def evaluate(model_dir: Path, sizes: dict[str, dict | None], windows: torch.Tensor) -> list[dict]:
    model = gemma3n.load(model_dir)
    text = model.config.text
    rows = []
    for name, size in sizes.items():
        with warnings.catch_warnings():  # the nested widths of a MatFormer-trained tiny model
            warnings.simplefilter("ignore")
            spec = resolve_size(size, text)
            t = time.perf_counter()
            ppl = perplexity(model, windows, size)
        rows.append(
            {
                "size": name,
                "spec": size,
                "effective_params": effective_params(sliced_text_config(text, spec)),
                "heldout_ppl": round(ppl, 3),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(f"  {model_dir.name}: {name:>16}  ppl {ppl:8.3f}", flush=True)
    return sorted(rows, key=lambda r: -r["effective_params"])


@torch.inference_mode()
@torch.inference_mode()
def decode_perplexity(model: gemma3n.Model, windows: torch.Tensor) -> float:
    """Perplexity with every position after the first scored by a decode step (teacher-forced):
    what generation runs (the decode kernels, the fused step), not the prefill's matmuls."""
    from gemma3n.cache import Cache
    from gemma3n.generate import decode_one, prefill

    plan = model.plan()
    total, count = 0.0, 0
    for w in windows:
        cache = Cache(plan.config, plan.spec)
        logits = prefill(model.decoder, w[None, :1], cache, plan)
        for t in range(1, len(w)):
            total += F.cross_entropy(logits[None], w[t : t + 1], reduction="sum").item()
            count += 1
            if t + 1 < len(w):
                logits = decode_one(model.decoder, int(w[t]), cache, plan)
    return math.exp(total / count)


def quantization_quality(
    model_dir: Path, schemes: list[str], windows: torch.Tensor, agree_windows: int = 64, decode_windows: int = 32
) -> list:
    """Held-out perplexity (prefill over every window, and through decode steps over the first
    `decode_windows`) and top-1 agreement (every position of the first `agree_windows` windows)
    with the unquantized model, for each scheme."""
    rows, reference = [], None
    for scheme in [None, *schemes]:
        model = gemma3n.load(model_dir, quantize=scheme)
        t = time.perf_counter()
        ppl = perplexity(model, windows, None)
        decode_ppl = decode_perplexity(model, windows[:decode_windows])
        top1 = torch.cat([model.logits(w[None, :-1]).argmax(-1) for w in windows[:agree_windows]])
        reference = top1 if reference is None else reference
        row = {
            "scheme": scheme or "as stored",
            "heldout_ppl": round(ppl, 3),
            "decode_ppl": round(decode_ppl, 3),
            "decode_windows": decode_windows,
            "top1_agreement": round(float((top1 == reference).float().mean()), 4),
            "seconds": round(time.perf_counter() - t, 1),
        }
        rows.append(row)
        print(
            f"  {row['scheme']:>10}  ppl {ppl:8.3f}  decode ppl {decode_ppl:8.3f}  "
            f"top-1 agreement {row['top1_agreement']:.4f}",
            flush=True,
        )
    return rows


def plot(results: dict[str, list[dict]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[tools]): no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colors = {"MatFormer-trained (shipped)": "tab:blue", "trained without MatFormer": "tab:red"}
    for label, rows in results.items():
        # one line per depth: layer skipping and FFN narrowing are different axes of Mix-n-Match
        for depth, marker, dash in ((False, "o", "-"), (True, "^", ":")):
            fam = [r for r in rows if bool((r["spec"] or {}).get("skip")) == depth]
            xs = [r["effective_params"] / 1e6 for r in fam]
            ys = [r["heldout_ppl"] for r in fam]
            kept = "layers 5-9 skipped" if depth else "all layers"
            ax.plot(xs, ys, marker=marker, linestyle=dash, color=colors[label], label=f"{label}, {kept}")
            if label.startswith("MatFormer"):
                for r, x, y in zip(fam, xs, ys):
                    ax.annotate(r["size"], (x, y), textcoords="offset points", xytext=(3, -11), fontsize=7)
    ax.set_xlabel("effective parameters (millions)")
    ax.set_ylabel("held-out perplexity (KJV, lower is better)")
    ax.set_title("gemma3n-tiny: Mix-n-Match sizes as elastic views of one model")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--contrast", type=Path, help="the same architecture trained without MatFormer")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "tiny-matformer")
    ap.add_argument("--seq", type=int, default=128, help="tokens per held-out window (as in training)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quantize", default=None, help="comma-separated schemes: quantization quality instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quantize:
        windows = held_out_windows(args.model, args.seq)
        rows = quantization_quality(args.model, args.quantize.split(","), windows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"held_out_windows": len(windows), "rows": rows}, indent=1))
        head = f"decode ppl ({rows[0]['decode_windows']} windows)"
        print(f"\n| scheme | held-out ppl | {head} | top-1 agreement |\n| --- | ---: | ---: | ---: |")
        for r in rows:
            agree = 100 * r["top1_agreement"]
            print(f"| {r['scheme']} | {r['heldout_ppl']:.3f} | {r['decode_ppl']:.3f} | {agree:.1f} % |")
        return

    sizes: dict[str, dict | None] = {"full": None, **declared_sizes(args.model)}
    windows = held_out_windows(args.model, args.seq)
    print(f"held-out: {len(windows)} windows x {args.seq} tokens; sizes: {', '.join(sizes)}", flush=True)
    results = {"MatFormer-trained (shipped)": evaluate(args.model, sizes, windows)}
    if args.contrast:
        results["trained without MatFormer"] = evaluate(args.contrast, sizes, held_out_windows(args.contrast, args.seq))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"held_out_windows": len(windows), **results}, indent=1))
    print("\n| size | effective params | " + " | ".join(f"ppl: {k}" for k in results) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in results) + " |")
    by_size = {label: {r["size"]: r for r in rows} for label, rows in results.items()}
    for r in results["MatFormer-trained (shipped)"]:
        cells = [f"{by_size[label][r['size']]['heldout_ppl']:.2f}" for label in results]
        print(f"| {r['size']} | {r['effective_params']:,} | " + " | ".join(cells) + " |")
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
