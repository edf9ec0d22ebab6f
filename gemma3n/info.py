"""What the CLI prints about a checkpoint: `gemma3n info` (the parameter split, the layer map,
optionally the placement and the machine) and the tables of MatFormer sizes (`slice --list`,
`info --size`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import hardware
from .checkpoint import Checkpoint
from .config import load_config
from .matformer import (
    SIZES_FILE,
    Preset,
    effective_params,
    fitting_presets,
    format_ffn,
    format_params,
    format_skip,
    presets,
    read_declared_sizes,
    resolve_size,
    sliced_text_config,
)
from .placement import load_text_decoder, placement_report, resolve_device, resolve_dtype
from .quantize import stored_config

EMBED = "embed_tokens.weight"
PLE = "embed_tokens_per_layer.weight"


def parameter_split(ckpt: Checkpoint) -> dict[str, int]:
    """Main embedding, per-layer embedding table, and 'effective' = the rest of the decoder
    (as stored, shared-layer K/V included: docs/text-decoder.md#parameter-counts). A quantized checkpoint counts
    the weights its tensors stand for, not its packed bytes or scales."""
    prefix = ckpt.text_prefix
    text = dict(_logical_counts(ckpt, prefix))
    text = {
        n: c
        for n, c in text.items()
        if not n.startswith(("audio_tower.", "vision_tower.", "embed_audio.", "embed_vision."))
    }
    split = {"embedding": text.get(EMBED, 0), "per_layer_embedding": text.get(PLE, 0)}
    split["effective"] = sum(text.values()) - split["embedding"] - split["per_layer_embedding"]
    for tower in ("audio_tower", "vision_tower"):
        split[tower] = sum(math.prod(ckpt.shape(n)) for n in ckpt.names() if n.startswith(f"model.{tower}."))
    return split


def _logical_counts(ckpt: Checkpoint, prefix: str) -> Iterator[tuple[str, int]]:
    """(name relative to `prefix`, parameters) of the text tensors; a quantized `X.qweight`
    (int4: two weights a byte) counts as the `X.weight` it replaces, its `X.scales` as nothing."""
    qc = stored_config(ckpt.path)
    per_byte = 2 if qc is not None and qc.bits == 4 else 1
    for n in ckpt.names():
        if not n.startswith(prefix) or (qc is not None and n.endswith(".scales")):
            continue
        count = math.prod(ckpt.shape(n))
        if qc is not None and n.endswith(".qweight"):
            n, count = n[: -len(".qweight")] + ".weight", count * per_byte
        yield n[len(prefix) :], count


def layer_map(ckpt: Checkpoint) -> list[str]:
    cfg = ckpt.config.text
    lines = []
    for i, (kind, src) in enumerate(zip(cfg.layer_types, cfg.kv_sources())):
        kv = "owns K/V" if src is None else f"borrows K/V of layer {src}"
        sparse = f", sparsity {cfg.activation_sparsity_pattern[i]:g}" if cfg.activation_sparsity_pattern[i] else ""
        lines.append(f"  layer {i:2d}  {kind:17s}  ffn {cfg.intermediate_size[i]:6d}  {kv}{sparse}")
    return lines


def describe(ckpt: Checkpoint, *, size=None, placement: bool = False, device: str = "cpu", dtype=None) -> Iterator[str]:
    cfg = ckpt.config.text
    split = parameter_split(ckpt)
    yield f"model: {ckpt.path}"
    yield (
        f"type: {ckpt.config.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}"
    )
    yield "parameters:"
    yield f"  main embedding (tied LM head): {format_params(split['embedding'], 3)}"
    yield f"  per-layer embedding table:     {format_params(split['per_layer_embedding'], 3)}"
    yield f"  effective (everything else):   {format_params(split['effective'], 3)}"
    unstored = unstored_shared_kv(cfg)
    if unstored and split["effective"] + unstored == effective_params(cfg):
        # slice --list and Google's table count them: say why the two figures differ
        table = format_params(split["effective"] + unstored, 3)
        yield f"  as MatFormer tables count it:  {table} (+ unused shared-layer K/V, not stored)"
    for tower in ("audio_tower", "vision_tower"):
        if split[tower]:
            yield f"  {tower.replace('_', ' ') + ':':31s}{format_params(split[tower], 3)}"
    yield "layers:"
    yield from layer_map(ckpt)
    if size is not None:
        spec = resolve_size(size, cfg, read_declared_sizes(ckpt.path, cfg))
        sliced = sliced_text_config(cfg, spec) if spec is not None else cfg
        yield f"size {size}: {format_params(effective_params(sliced), 3)} effective, {sliced.num_hidden_layers} layers"
    if placement:
        decoder = load_text_decoder(ckpt, resolve_device(device), resolve_dtype(dtype))
        report = placement_report(decoder)
        yield "placement:"
        for line in report.lines():
            yield f"  {line}"
        unused = split["effective"] + split["embedding"] - report.device_params
        yield (
            f"  device = effective {format_params(split['effective'], 3)}"
            f" + main embedding {format_params(split['embedding'], 3)}"
            + (
                f" - {format_params(unused, 3)} of shared layers' K/V weights, stored but never used or loaded"
                if unused
                else ""
            )
        )


def hardware_lines(ckpt: Checkpoint, quantize=None, refresh: bool = False) -> list[str]:
    """`info --hardware`: the machine, the compute policy, and the bytes one decoded token of
    this model reads (its core weights as loaded: the per-layer table is gathered, not read)."""
    if refresh:
        hardware.probe(refresh=True)
    decoder = load_text_decoder(ckpt, resolve_device("cpu"), None, quantize=quantize)
    return [f"model: {ckpt.path}", *hardware.report(decode_bytes=placement_report(decoder).device_bytes)]


def unstored_shared_kv(cfg) -> int:
    """k_proj, v_proj and k_norm of the KV-shared layers: Google's checkpoints store them (never
    used); transformers 5 and our tools do not."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_kv_shared_layers * (2 * cfg.hidden_size * kv + cfg.head_dim)


# --------------------------------------------------------------------------------------------
# MatFormer sizes
# --------------------------------------------------------------------------------------------


_CUSTOM_HINT = (
    "Custom: --ffn 8192x20,16384x10 (one width per kept layer) --skip 20-24 (original indices), "
    "or --size 'ffn=8192x30 skip=20-24'."
)


def _custom_hint(text_config: Any) -> str:
    """The custom-size hint in this model's own widths and layer count (E4B's numbers otherwise)."""
    n, widths = text_config.num_hidden_layers, list(text_config.intermediate_size)
    if n < 2 or len(set(widths)) != 1 or widths[0] % 2:
        return _CUSTOM_HINT
    w, half = widths[0], n // 2
    return (
        f"Custom: --ffn {w // 2}x{half},{w}x{n - half} (one width per kept layer) --skip {n - 1} "
        f"(original indices), or --size 'ffn={w // 2}x{n - 1} skip={n - 1}'."
    )


def _aligned(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell (the last column is not padded), a dash rule under the head."""
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(head[-1]))
    return lines


def _official_lines(rows: Iterable[Preset]) -> list[str]:
    head = ("name", "layers", "eff. params", "MMLU PT", "skip", "FFN widths", "aliases")
    cells = [
        (
            p.name,
            str(p.num_layers),
            f"{p.effective_params_b:.2f} B",
            f"{p.mmlu_pt:.1f} %",
            format_skip(p.skipped) or "-",
            format_ffn(p.ffn_widths),
            ", ".join(a for a in p.aliases if a != p.table_name and "level" not in a),
        )
        for p in rows
    ]
    return _aligned(head, cells)


def _declared_lines(text_config: Any, declared: Mapping[str, Any]) -> list[str]:
    n = text_config.num_hidden_layers
    cells = []
    for name in declared:
        spec = resolve_size(name, text_config, declared)
        if spec is None:
            cells.append((name, str(n), format_params(effective_params(text_config)), "-", "full model"))
            continue
        eff = effective_params(sliced_text_config(text_config, spec))
        skip = format_skip(spec.skipped(n)) or "-"
        cells.append((name, str(len(spec.layers)), format_params(eff), skip, format_ffn(spec.ffn_widths)))
    return _aligned(("name", "layers", "eff. params", "skip", "FFN widths"), cells)


def format_preset_table(text_config: Any = None, declared: Mapping[str, Any] | None = None) -> str:
    """`gemma3n slice --list`: the sizes with layers, effective params (and MMLU for the official rows).

    Without `text_config`: the whole official table. With it: the checkpoint's `declared` sizes
    first, then the official presets that fit this config (or one line saying none do)."""
    if text_config is None:
        lines = _official_lines(presets())
        return "\n".join([*lines, "", "Presets are defined for E4B (35 layers). " + _CUSTOM_HINT])
    n = text_config.num_hidden_layers
    lines = [f"This model: {n} layers, {format_params(effective_params(text_config))} effective params."]
    if declared:
        lines += ["", f"Sizes declared by this checkpoint ({SIZES_FILE}):", *_declared_lines(text_config, declared)]
    fitting = fitting_presets(text_config)
    if fitting:
        lines += ["", "Official Mix-n-Match presets:", *_official_lines(fitting)]
    else:
        lines += [
            "",
            f"The official Mix-n-Match presets are defined for E4B (35 layers); this model has {n} layers, "
            "so none fit (`gemma3n slice --list --model E4B` shows them).",
        ]
    return "\n".join([*lines, "", _custom_hint(text_config)])


def describe_size(text_config: Any, size: Any, declared: Mapping[str, Any] | None = None) -> list[str]:
    """Lines for `gemma3n info --size S`: the slice and its effective parameters."""
    spec = resolve_size(size, text_config, declared)
    n = text_config.num_hidden_layers
    full = format_params(effective_params(text_config))
    if spec is None:
        return [f"size: full model, {n} layers, effective params {full}"]
    sub = sliced_text_config(text_config, spec)
    skip = spec.skipped(n)
    return [
        f"size: {spec.name}",
        f"  layers: {len(spec.layers)} of {n}" + (f" (skipped {format_skip(skip)})" if skip else ""),
        f"  FFN widths: {format_ffn(spec.ffn_widths)}",
        f"  effective params: {format_params(effective_params(sub))} (full model {full})",
    ]


def list_sizes(model: str | Path) -> str:
    """`gemma3n slice --list`: a local checkpoint's own sizes and the presets that fit it (config.json
    and matformer_sizes.json only, no weights); for a hub id, the official table (nothing is downloaded)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return format_preset_table()
    text = load_config(path).text
    return format_preset_table(text, read_declared_sizes(path, text))
