"""The fused decode step: generated tokens through the whole decoder in one native call.

Decoding one token of a small model is bound by per-operation overhead (~2,000 tensor
operations a token for the embedded model, several microseconds each); kernels/step.cpp runs the
same forward for one token, op for op, without Python in between. This module builds it from a
loaded decoder and a plan (full model or MatFormer view) and feeds it the Python KV caches.

It applies where generate.decode_one runs on a CPU with fp32 activations and the native kernels
built: dense fp32 / bf16 weights or int8 / int4 quantized ones. Anything else (another dtype or
device, no compiler) returns None from `fused_step`, and the Python forward runs instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import kernels
from .cache import Cache
from .layers import Embedding
from .quantize import QEmbedding, QLinear
from .text import LayerPlan, TextDecoder, _std_multiplier

# The layer's linear modules (attribute paths) and norms the step reads, by its names.
LINEARS = {
    "q": "self_attn.q_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "laurel_l": "laurel.linear_left",
    "laurel_r": "laurel.linear_right",
    "router": "altup.modality_router",
    "pred": "altup.prediction_coefs",
    "corr": "altup.correction_coefs",
    "ple_gate": "per_layer_input_gate",
    "ple_proj": "per_layer_projection",
}
KV_LINEARS = {"k": "self_attn.k_proj", "v": "self_attn.v_proj"}
NORMS = {
    "input": "input_layernorm.weight",
    "post_attn": "post_attention_layernorm.weight",
    "pre_ffn": "pre_feedforward_layernorm.weight",
    "post_ffn": "post_feedforward_layernorm.weight",
    "q": "self_attn.q_norm.weight",
    "router": "altup.router_norm.weight",
    "laurel": "laurel.post_laurel_norm.weight",
    "ple": "post_per_layer_input_norm.weight",
    "out_scale": "altup.correct_output_scale",
}
KV_NORMS = {"k": "self_attn.k_norm.weight"}
ROPE_TYPES = ("sliding_attention", "full_attention")


class Unsupported(Exception):
    """This decoder or plan is not one the fused step handles (the Python forward runs)."""


def _weight(native, module: torch.nn.Module):
    """A StepLinear over the module's weight, in place (dense fp32/bf16 or a quantized QTensor)."""
    if isinstance(module, (QLinear, QEmbedding)):
        w = module.weight
        return native.StepLinear(f"int{w.bits}", w.q, w.scales, w.group or 0)
    w = module.weight
    kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(w.dtype)
    if kind is None or w.device.type != "cpu":
        raise Unsupported(f"{w.dtype} weights on {w.device}")
    return native.StepLinear(kind, w.detach())


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _layer(native, layer: torch.nn.Module):
    owns = layer.self_attn.owns_kv
    linears = {**LINEARS, **(KV_LINEARS if owns else {})}
    norms = {**NORMS, **(KV_NORMS if owns else {})}
    return native.StepLayer(
        {k: _weight(native, layer.get_submodule(path)) for k, path in linears.items()},
        {k: _norm(layer.get_parameter(path)) for k, path in norms.items()},
        owns,
    )


def _plan_rows(plan: LayerPlan) -> list[tuple]:
    cfg = plan.config
    rows = []
    for j, (parent, source) in enumerate(zip(plan.layers, cfg.kv_sources())):
        sparsity = cfg.activation_sparsity_pattern[j]
        sliding = cfg.layer_types[j] == "sliding_attention"
        rows.append(
            (
                parent,
                cfg.intermediate_size[j],
                _std_multiplier(sparsity) if sparsity > 0.0 else math.nan,
                -1 if source is None else source,
                cfg.sliding_window if sliding else 0,
                ROPE_TYPES.index(cfg.layer_types[j]),
            )
        )
    return rows


def _inv_freq(base: float, head_dim: int) -> torch.Tensor:
    """As text.rope_cos_sin computes it (fp32)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def build(decoder: TextDecoder, plan: LayerPlan) -> Any:
    """The native Step for this decoder and plan (raises Unsupported where it does not apply)."""
    native = kernels.loaded()
    if native is None or not hasattr(native, "Step"):
        raise Unsupported("native kernels unavailable")
    if decoder.device.type != "cpu" or decoder.activation_dtype != torch.float32:
        raise Unsupported("the fused step computes in fp32 on the CPU")
    head = decoder.embed_tokens
    if not isinstance(head, (Embedding, QEmbedding)):
        raise Unsupported("unknown embedding module")
    cfg, parent = plan.config, decoder.config
    layers = [_layer(native, layer) for layer in decoder.layers]
    globals_lin = {
        "per_layer_model_projection": _weight(native, decoder.per_layer_model_projection),
        "head": _weight(native, head),
    }
    globals_norm = {
        "per_layer_projection_norm": _norm(decoder.per_layer_projection_norm.weight),
        "norm": _norm(decoder.norm.weight),
    }
    config = {
        "hidden": parent.hidden_size,
        "streams": parent.altup_num_inputs,
        "active": parent.altup_active_idx,
        "head_dim": parent.head_dim,
        "heads": parent.num_attention_heads,
        "kv_heads": parent.num_key_value_heads,
        "ple_dim": parent.hidden_size_per_layer_input,
        "parent_layers": parent.num_hidden_layers,
        "eps": parent.rms_norm_eps,
        "softcap": parent.final_logit_softcapping or 0.0,
        "correct_scale": float(bool(parent.altup_correct_scale)),
    }
    return native.Step(
        layers,
        _plan_rows(plan),
        globals_lin,
        [_weight(native, p) for p in decoder.altup_projections],
        [_weight(native, p) for p in decoder.altup_unembed_projections],
        globals_norm,
        [_inv_freq(cfg.rope_base(t), parent.head_dim) for t in ROPE_TYPES],
        config,
    )


def fused_step(decoder: TextDecoder, plan: LayerPlan) -> Any | None:
    """The decoder's Step for `plan`, built once and kept on the decoder (None: not applicable)."""
    steps = decoder.__dict__.setdefault("_fused_steps", {})
    key = (plan.spec, plan.layers, tuple(plan.config.intermediate_size))
    if key not in steps:
        try:
            steps[key] = build(decoder, plan)
        except Unsupported:
            steps[key] = None
    return steps[key]


def decode_tokens(
    step: Any, decoder: TextDecoder, plan: LayerPlan, tokens: list[int], cache: Cache, h0: torch.Tensor | None
) -> torch.Tensor | None:
    """Logits [T, V] of `tokens` fed after the cache through `step`, their K/V appended to it
    (None: a cache layer has no buffers yet, so the Python forward runs them). `h0` [.., T, D]:
    the tokens' input embeddings when they are not the plain embedding rows (multimodal)."""
    t = len(tokens)
    if not all(kv.reserve(t) for kv in cache.layers.values()):
        return None
    slots: list[tuple | None] = [None] * len(plan.layers)
    for j, kv in cache.layers.items():
        slots[j] = (kv.k, kv.v, kv.pos, kv.start, kv.length)
    if h0 is None:
        h0 = decoder.embed(torch.tensor([tokens]))
    ple = torch.stack([decoder.ple_row(token) for token in tokens])
    logits = step.tokens(h0.reshape(t, -1), ple, cache.offset, slots)
    for kv in cache.layers.values():
        kv.advance(t)
    cache.offset += t
    return logits


def decode_token(
    step: Any, decoder: TextDecoder, plan: LayerPlan, token: int, cache: Cache, h0: torch.Tensor | None
) -> torch.Tensor | None:
    """`decode_tokens` for one token: its logits [V]."""
    logits = decode_tokens(step, decoder, plan, [token], cache, h0)
    return None if logits is None else logits[0]


def decode_batch(
    step: Any,
    decoder: TextDecoder,
    plan: LayerPlan,
    tokens: list[int],
    caches: list[Cache],
    h0s: list[torch.Tensor | None] | None = None,
) -> torch.Tensor | None:
    """Logits [B, V] of one token for each of B sequences (each after its own cache, its K/V
    appended there) in one call through `step` (None: a cache layer has no buffers yet, so the
    Python forward runs them). `h0s[b]`: that token's input embedding when it is not the plain
    embedding row."""
    if not all(kv.reserve(1) for cache in caches for kv in cache.layers.values()):
        return None
    slots = []
    for cache in caches:
        row: list[tuple | None] = [None] * len(plan.layers)
        for j, kv in cache.layers.items():
            row[j] = (kv.k, kv.v, kv.pos, kv.start, kv.length)
        slots.append(row)
    h0 = torch.cat(
        [
            (h if h is not None else decoder.embed(torch.tensor([[t]]))).reshape(1, -1)
            for t, h in zip(tokens, h0s or [None] * len(tokens))
        ]
    )
    ple = torch.stack([decoder.ple_row(t) for t in tokens])
    logits = step.batch(h0, ple, [cache.offset for cache in caches], slots)
    for cache in caches:
        for kv in cache.layers.values():
            kv.advance(1)
        cache.offset += 1
    return logits
