"""`gemma3n info`: the parameter split, the layer map and (optionally) the placement."""

from __future__ import annotations

import math
from collections.abc import Iterator

from .checkpoint import Checkpoint
from .matformer import effective_params, read_declared_sizes, resolve_size, sliced_text_config

EMBED = "embed_tokens.weight"
PLE = "embed_tokens_per_layer.weight"


def parameter_split(ckpt: Checkpoint) -> dict[str, int]:
    """Main embedding, per-layer embedding table, and 'effective' = the rest of the decoder
    (as stored, shared-layer K/V included: text-decoder.md §6.2). A quantized checkpoint counts
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
    from .quantize import stored_config

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
    yield f"  main embedding (tied LM head): {_count(split['embedding'])}"
    yield f"  per-layer embedding table:     {_count(split['per_layer_embedding'])}"
    yield f"  effective (everything else):   {_count(split['effective'])}"
    unstored = unstored_shared_kv(cfg)
    if unstored and split["effective"] + unstored == effective_params(cfg):
        # slice --list and Google's table count them: say why the two figures differ
        table = _count(split["effective"] + unstored)
        yield f"  as MatFormer tables count it:  {table} (+ unused shared-layer K/V, not stored)"
    for tower in ("audio_tower", "vision_tower"):
        if split[tower]:
            yield f"  {tower.replace('_', ' ') + ':':31s}{_count(split[tower])}"
    yield "layers:"
    yield from layer_map(ckpt)
    if size is not None:
        spec = resolve_size(size, cfg, read_declared_sizes(ckpt.path, cfg))
        sliced = sliced_text_config(cfg, spec) if spec is not None else cfg
        yield f"size {size}: {_count(effective_params(sliced))} effective, {sliced.num_hidden_layers} layers"
    if placement:
        from .placement import load_text_decoder, placement_report, resolve_device, resolve_dtype

        decoder = load_text_decoder(ckpt, resolve_device(device), resolve_dtype(dtype))
        report = placement_report(decoder)
        yield "placement:"
        for line in report.lines():
            yield f"  {line}"
        unused = split["effective"] + split["embedding"] - report.device_params
        yield (
            f"  device = effective {_count(split['effective'])} + main embedding {_count(split['embedding'])}"
            + (f" - {_count(unused)} of shared layers' K/V weights, stored but never used or loaded" if unused else "")
        )


def hardware_lines(ckpt: Checkpoint, quantize=None, refresh: bool = False) -> list[str]:
    """`info --hardware`: the machine, the compute policy, and the bytes one decoded token of
    this model reads (its core weights as loaded: the per-layer table is gathered, not read)."""
    from . import hardware
    from .placement import load_text_decoder, placement_report, resolve_device

    if refresh:
        hardware.probe(refresh=True)
    decoder = load_text_decoder(ckpt, resolve_device("cpu"), None, quantize=quantize)
    return [f"model: {ckpt.path}", *hardware.report(decode_bytes=placement_report(decoder).device_bytes)]


def unstored_shared_kv(cfg) -> int:
    """k_proj, v_proj and k_norm of the KV-shared layers: Google's checkpoints store them (never
    used); transformers 5 and our tools do not."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_kv_shared_layers * (2 * cfg.hidden_size * kv + cfg.head_dim)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"
