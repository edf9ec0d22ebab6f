"""Checkpoint exports: the MatFormer slice and the offline quantized copy.

- `export_slice()`: an ordinary Gemma 3n checkpoint for a Mix-n-Match slice (matformer.py owns the
  specs it takes).
- `quantize_checkpoint()`: a weight-only int8 / int4 copy (quantize.py owns the scheme).

Both plan their tensors for the one streamed writer (shards.py) and write through staging.py, so
nothing the user had is lost when a write fails or is interrupted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import open_checkpoint
from .errors import CheckpointError, InputError
from .matformer import (
    Preset,
    SliceSpec,
    _match_preset,
    effective_params,
    find_declared,
    format_ffn,
    format_params,
    format_skip,
    read_declared_sizes,
    resolve_size,
    sliced_fields,
    sliced_text_config,
)
from .quantize import (
    QuantConfig,
    _chunked,
    _from_tensor,
    describe_unfit,
    plan_modules,
    quantize_int4,
    quantize_int8,
    stored_config,
    unfit_modules,
)
from .shards import (
    MAX_SHARD_BYTES,
    Computed,
    Copied,
    Entry,
    data_start,
    ranges,
    source_job,
    split_shards,
    st_dtype,
    weights_bytes,
    write_weights,
)
from .staging import check_out, copy_extras, extras_bytes, staging, write_file
from .text import TextDecoder


def _plan(ckpt: Any, spec: SliceSpec) -> list[Copied]:
    text = ckpt.config.text
    n = text.num_hidden_layers
    p = text.hidden_size_per_layer_input
    prefix = ckpt.text_prefix
    new_index = {old: new for new, old in enumerate(spec.layers)}
    width = dict(zip(spec.layers, spec.ffn_widths))
    layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)$")
    jobs: list[Copied] = []
    for f in ckpt.files:
        start = data_start(f.path)
        for name, (_dtype, shape, _begin, _end) in f.entries.items():
            job = source_job(f, start, name)
            m = layer_re.match(name)

            def expect(cond: bool, what: str, name: str = name, shape: tuple = shape) -> None:
                if not cond:
                    raise CheckpointError(f"{ckpt.path}: tensor '{name}' has shape {list(shape)}; {what}")

            if m:
                old = int(m.group(1))
                rest = m.group(2)
                if old >= n:
                    raise CheckpointError(f"{ckpt.path}: tensor '{name}' is for layer {old} of a {n}-layer model")
                if old not in new_index:
                    continue  # skipped layer: all its tensors go (docs/matformer.md#slicing-rules)
                job.out_name = f"{prefix}layers.{new_index[old]}.{rest}"
                w = width[old]
                if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                    expect(len(shape) == 2 and shape[0] == text.intermediate_size[old], "expected [I, D]")
                    job.row_ranges = [(0, w)]  # prefix rows (docs/matformer.md#what-is-nested)
                    job.shape = (w, shape[1])
                elif rest == "mlp.down_proj.weight":
                    expect(len(shape) == 2 and shape[1] == text.intermediate_size[old], "expected [D, I]")
                    job.col_ranges = [(0, w)]
                    job.shape = (shape[0], w)
            elif name == f"{prefix}embed_tokens_per_layer.weight":
                # [Vp, L*P] viewed as [Vp, L, P]: keep the kept layers' column groups (docs/matformer.md#slicing-rules)
                expect(len(shape) == 2 and shape[1] == n * p, f"expected [Vp, {n}*{p}]")
                job.col_ranges = ranges([i * p + k for i in spec.layers for k in range(p)])
                job.shape = (shape[0], len(spec.layers) * p)
            elif name == f"{prefix}per_layer_model_projection.weight":
                # [L*P, D] viewed as [L, P, D]: keep the kept layers' row groups (docs/matformer.md#slicing-rules)
                expect(len(shape) == 2 and shape[0] == n * p, f"expected [{n}*{p}, D]")
                job.row_ranges = ranges([i * p + k for i in spec.layers for k in range(p)])
                job.shape = (len(spec.layers) * p, shape[1])
            jobs.append(job)
    return jobs


def _model_card(src: Any, spec: SliceSpec, text: Any, new_text: Any, preset: Preset | None) -> str:
    n = text.num_hidden_layers
    skip = spec.skipped(n)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [gemma3n, matformer, mix-n-match]",
        "---",
        "",
        f"# Gemma 3n Mix-n-Match slice: {spec.name}",
        "",
        f"Sliced from `{src}` with `gemma3n slice` (MatFormer: kept layers with a prefix of each FFN).",
        "Use is subject to the license of the parent model (Gemma Terms of Use).",
        "",
        "| | |",
        "| --- | --- |",
        f"| Slice | {spec.name}" + (f" (table row: {preset.table_name})" if preset else "") + " |",
        f"| Layers | {len(spec.layers)} of {n}" + (f", skipped {format_skip(skip)}" if skip else "") + " |",
        f"| FFN widths | {format_ffn(spec.ffn_widths)} |",
        f"| Effective params | {format_params(effective_params(new_text))} "
        f"(parent {format_params(effective_params(text))}) |",
    ]
    if preset:
        lines.append(f"| MMLU PT (official table) | {preset.mmlu_pt:.1f} % |")
    lines += ["", "| layer | original layer | type | FFN width |", "| --- | --- | --- | --- |"]
    for j, (i, w) in enumerate(zip(spec.layers, spec.ffn_widths)):
        lines.append(f"| {j} | {i} | {text.layer_types[i]} | {w} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Slice export
# --------------------------------------------------------------------------------------------

# Files of the parent a slice rewrites (besides the weights) instead of copying.
_SLICE_REWRITES = re.compile(
    r"^(config\.json|README\.md|matformer_sizes\.json)$"
)  # a slice's sizes are not its parent's


def _progress(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)


def export_slice(
    src: str | Path,
    spec: SliceSpec | str | dict | None,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the slice `spec` of checkpoint `src` to `out_dir` as an ordinary Gemma 3n checkpoint.

    Streams tensor by tensor in row chunks (peak memory ~2 x CHUNK_BYTES) into a hidden sibling
    folder renamed into place at the end (see the module notes for `force` and interruptions).
    """
    ckpt = open_checkpoint(src)
    text = ckpt.config.text
    declared = read_declared_sizes(ckpt.path, text)
    resolved = resolve_size(spec, text, declared)
    preset = None
    if isinstance(spec, str) and find_declared(spec, declared) is None:
        preset = _match_preset(spec)  # the table row, for the model card
    if resolved is None:  # the full model: an identity slice (a plain copy)
        resolved = SliceSpec("full", tuple(range(text.num_hidden_layers)), tuple(text.intermediate_size))
    spec = resolved
    new_text = sliced_text_config(text, spec)
    out = check_out(out_dir, ckpt, force)

    jobs = _plan(ckpt, spec)
    need = weights_bytes(jobs, max_shard_bytes) + extras_bytes(Path(ckpt.path), _SLICE_REWRITES)
    with staging(out, need) as tmp:
        with _progress(sum(j.nbytes for j in jobs), f"slice {spec.name}", progress) as bar:
            write_weights(tmp, jobs, max_shard_bytes, bar)
        copy_extras(Path(ckpt.path), tmp, _SLICE_REWRITES)
        write_file(tmp / "README.md", _model_card(src, spec, text, new_text, preset))
        raw = json.loads(json.dumps(ckpt.config.raw))  # deep copy; every other field is kept
        target = raw if raw.get("model_type") == "gemma3n_text" else raw.setdefault("text_config", {})
        target.update(sliced_fields(text, spec))
        write_file(tmp / "config.json", json.dumps(raw, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Quantized copy
# --------------------------------------------------------------------------------------------


class _Pair:
    """The (codes, scales) of one quantized weight: computed when the first is written, dropped
    after the second, so one weight's outputs are in memory at a time."""

    def __init__(self, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        self.fn = fn
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None
        self.taken = 0

    def get(self, i: int) -> torch.Tensor:
        if self.value is None:
            self.value = self.fn()
        t = self.value[i]
        self.taken += 1
        if self.taken == 2:
            self.value = None
        return t


def _quantizer(qc: QuantConfig, is_ple: bool, p: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Rows -> (codes, scales). The PLE table is row-wise: int8 one scale per (row, layer)
    group of `p` columns; int4 by groups."""
    if is_ple and qc.bits == 8:
        return lambda c: quantize_int8(c, group=p)
    if is_ple:
        return lambda c: quantize_int4(c, qc.group_size)
    return lambda c: _from_tensor(c, qc)


def _quant_plan(ckpt: Any, qc: QuantConfig) -> tuple[list[Entry], int]:
    """Every output tensor of the quantized copy, in the source's order, and how many weights
    are quantized. Output shapes and dtypes come from quantizing one row (the schemes are row-wise)."""
    prefix = ckpt.text_prefix
    with torch.device("meta"):
        decoder = TextDecoder(ckpt.config.text)
    planned = {prefix + n for n in plan_modules(decoder, qc)}
    ple = prefix + "embed_tokens_per_layer"
    if qc.per_layer_embeddings:
        planned.add(ple)
    p = ckpt.config.text.hidden_size_per_layer_input
    entries: list[Entry] = []
    done = 0
    for f in ckpt.files:
        start = data_start(f.path)
        for name in f.entries:
            base = name[: -len(".weight")] if name.endswith(".weight") else None
            if base not in planned:
                entries.append(source_job(f, start, name))
                continue
            fn = _quantizer(qc, base == ple, p)
            w = ckpt.tensor(name)
            q1, s1 = fn(w[:1])
            pair = _Pair(lambda w=w, fn=fn: _chunked(w, fn))
            for i, (suffix, t) in enumerate(((".qweight", q1), (".scales", s1))):
                shape = (w.shape[0], *t.shape[1:])
                entries.append(
                    Computed(
                        base + suffix, st_dtype(t.dtype), shape, t.element_size(), lambda i=i, pair=pair: pair.get(i)
                    )
                )
            done += 1
    return entries, done


def quantize_checkpoint(
    model: str | Path,
    out: str | Path,
    qc: QuantConfig,
    log: Callable[[str], Any] = print,
    *,
    force: bool = False,
    progress: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a quantized copy of `model` to `out`: quantized tensors (portable layout), everything
    else as stored, config.json with a `quantization` section, tokenizer and other files copied.
    Written aside and renamed into place (see the module notes for `force` and interruptions)."""
    ckpt = open_checkpoint(model)
    if stored_config(ckpt.path) is not None:
        raise InputError(f"{ckpt.path} is already quantized")
    target = check_out(out, ckpt, force)
    entries, done = _quant_plan(ckpt, qc)
    config = json.loads((Path(ckpt.path) / "config.json").read_text(encoding="utf-8"))
    config["quantization"] = qc.to_json()
    rewrites = re.compile(r"^config\.json$")
    need = weights_bytes(entries, max_shard_bytes) + extras_bytes(Path(ckpt.path), rewrites)
    with staging(target, need) as tmp:
        with _progress(sum(e.nbytes for e in entries), f"quantize {qc.name}", progress) as bar:
            write_weights(tmp, entries, max_shard_bytes, bar)
        copy_extras(Path(ckpt.path), tmp, rewrites)
        write_file(tmp / "config.json", json.dumps(config, indent=2))
    shards = len(split_shards(entries, max_shard_bytes))
    log(f"quantized {done} tensors ({qc.name}) -> {target} ({shards} shard(s))")
    unfit = _unfit(ckpt, qc)
    if unfit:
        log(describe_unfit(unfit, qc))
    return target


def _unfit(ckpt: Any, qc: QuantConfig) -> dict[str, str]:
    """The weights `qc` would cover but that stay in high precision (reported to the user)."""
    with torch.device("meta"):
        decoder = TextDecoder(ckpt.config.text)
    return unfit_modules(decoder, qc)
