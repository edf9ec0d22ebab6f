"""Checkpoint averaging: the mean of the text decoders of several `tools/train_tiny_media.py` runs.

Runs resumed from one checkpoint on the same soft cache, with their towers and embedders frozen,
differ only in their text decoders; the mean of those decoders reads held-out speech better than
either (docs/tiny-media.md, eighteenth round: runs C and D read 0.237 and 0.239 of the held-out
clips' words wrong, their mean 0.230). The towers, embedders and every other file come from the
first checkpoint and must be the same in all (the tool refuses otherwise). Writes OUT and, as a
training run does, OUT-decoder.safetensors (the decoder alone in bf16, for `--decoder-file` and
tools/checkpoints).

    python tools/average_tiny_media.py --out /work/tiny-mm/run-cd /work/tiny-mm/run-c /work/tiny-mm/run-d
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_media import decoder_path, refuse_to_clobber, save_text_decoder  # noqa: E402

DECODER = "model.language_model."


def mean_decoder(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The first state with each floating-point text-decoder tensor replaced by the mean over
    `states` (in fp32, stored in the first's dtype); every other tensor must be identical in all."""
    first, mean = states[0], dict(states[0])
    averaged = [k for k, v in first.items() if k.startswith(DECODER) and v.is_floating_point()]
    for n, state in enumerate(states[1:], 2):
        if state.keys() != first.keys():
            raise SystemExit(f"checkpoint {n} holds other tensors than the first: not runs of one model")
        for k in averaged:
            if state[k].shape != first[k].shape:
                raise SystemExit(f"checkpoint {n}: {k} is {tuple(state[k].shape)}, not {tuple(first[k].shape)}")
        for k in first.keys() - set(averaged):
            if not torch.equal(state[k], first[k]):
                raise SystemExit(f"checkpoint {n}: {k} differs from the first's; only the text decoders may")
    for k in averaged:
        mean[k] = (sum(s[k].float() for s in states) / len(states)).to(first[k].dtype)
    return mean


def average(ckpts: list[Path], out: Path) -> Path:
    """Write the averaged checkpoint to `out` (built beside it and renamed, so an interrupted run
    leaves no half checkpoint, and an `out` already there is replaced only once the new one is
    whole) and its decoder file beside it."""
    states = []
    for ckpt in ckpts:
        if not (ckpt / "model.safetensors").is_file():
            raise SystemExit(f"{ckpt}: no model.safetensors (a tools/train_tiny_media.py checkpoint directory?)")
        states.append(load_file(ckpt / "model.safetensors"))
    mean = mean_decoder(states)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(ckpts[0], tmp, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(mean, tmp / "model.safetensors", metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    save_text_decoder(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, nargs="+", help="tools/train_tiny_media.py checkpoint directories")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing --out and its decoder file")
    args = ap.parse_args()
    if len(args.checkpoints) < 2:
        raise SystemExit("give two checkpoints or more")
    if args.out.resolve() in {c.resolve() for c in args.checkpoints}:
        raise SystemExit(f"--out {args.out} is one of the checkpoints averaged")
    refuse_to_clobber([args.out, decoder_path(args.out)], args.force)
    print("wrote", average(args.checkpoints, args.out), "and", decoder_path(args.out))


if __name__ == "__main__":
    main()
