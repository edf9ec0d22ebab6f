"""The Gemma 3n text decoder: AltUp streams, LAuReL, per-layer embeddings (PLE), KV sharing,
Gaussian top-k activation sparsity, sliding/global attention. Spec: docs/text-decoder.md.

Module and parameter names are the checkpoint's (`layers.3.self_attn.q_proj.weight`, ...), so
loading is a dict walk. The decoder runs a `LayerPlan`: the full model, or a MatFormer view
(kept layers, per-layer FFN widths) that borrows the loaded tensors without copying them.
The per-layer embedding table is *not* a parameter: it stays memory-mapped on the host and
only the rows of the tokens being processed are gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Cache
from .config import TextConfig
from .layers import Embedding, Linear, RMSNorm, as_dtype, gelu_tanh
from .matformer import SliceSpec

# Φ⁻¹(0.95) as transformers computes it in fp32 (docs/text-decoder.md#activation-sparsity); cast per dtype below.
_ICDF_CACHE: dict[float, float] = {}


def _std_multiplier(target: float) -> float:
    if target not in _ICDF_CACHE:
        normal = torch.distributions.normal.Normal(0, 1)
        _ICDF_CACHE[target] = float(normal.icdf(torch.tensor(target, dtype=torch.float32)))
    return _ICDF_CACHE[target]


def rope_cos_sin(
    positions: torch.Tensor, base: float, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-layout RoPE tables [T, 1, head_dim] (broadcast over heads), built in fp32 and cast
    (docs/text-decoder.md#rope)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return as_dtype(emb.cos(), dtype), as_dtype(emb.sin(), dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d], cos/sin [T, 1, d]; rotate-half pairs (x[t], x[t + d/2])."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk]: causal, and on sliding layers only the last `window` keys (j > i - W)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


@dataclass(frozen=True)
class LayerPlan:
    """What the decoder runs. `config` is the config of the model being run (for a MatFormer
    view: the config its exported slice would have); its layer j is parent layer `layers[j]`."""

    config: TextConfig
    layers: tuple[int, ...]
    spec: SliceSpec | None = None  # the size it runs, its identity (caches, batches); None: the full model

    @classmethod
    def full(cls, config: TextConfig) -> LayerPlan:
        return cls(config=config, layers=tuple(range(config.num_hidden_layers)))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, owns_kv: bool):
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = d
        self.q_proj = Linear(cfg.hidden_size, hq * d, bias=False)
        self.o_proj = Linear(hq * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.owns_kv = owns_kv
        # KV-shared layers borrow K/V: their own k/v weights are never built (docs/text-decoder.md#kv-sharing)
        if owns_kv:
            self.k_proj = Linear(cfg.hidden_size, hkv * d, bias=False)
            self.v_proj = Linear(cfg.hidden_size, hkv * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Post-norm, post-RoPE K and the normed V, both [B, Hkv, T, d]."""
        b, t, _ = x.shape
        k = apply_rope(self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(b, t, -1, self.head_dim))
        return k.transpose(1, 2), v.transpose(1, 2)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-norm, post-RoPE queries [B, Hq, T, d]."""
        b, t, _ = x.shape
        return apply_rope(self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)), cos, sin).transpose(1, 2)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """Heads [B, Hq, T, d] merged and projected back to the hidden size."""
        b, _, t, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(b, t, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention with scale 1.0 (q_norm/k_norm replace the usual 1/sqrt(d): docs/text-decoder.md#attention) and GQA.
    q [B, Hq, Tq, d], k/v [B, Hkv, Tk, d].

    fp32 uses the fused kernel. In half precision the reference's order of roundings is
    reproduced (scores in the activation dtype, softmax in fp32, cast back),
    because the fused kernel's fp32 accumulation drifts from it at bf16 resolution.
    """
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


class MLP(nn.Module):
    """Gated GELU FFN. A MatFormer width w uses the first w units: gate/up rows, down columns."""

    def __init__(self, cfg: TextConfig, width: int):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = Linear(width, cfg.hidden_size, bias=False)
        # decode reads only the `up_proj` rows of the units that fire in a sparse layer
        self.gather_fired = True

    def forward(self, x: torch.Tensor, width: int, sparsity: float) -> torch.Tensor:
        gate = self.gate_proj(x, rows=width)
        if sparsity > 0.0:
            gate = gaussian_topk(gate, sparsity)
            if x.shape[:-1].numel() == 1 and self.gather_fired:
                return self._sparse_decode(x, gate, width)
        up = self.up_proj(x, rows=width)
        return self.down_proj(gelu_tanh(gate) * up, cols=width)

    def _sparse_decode(self, x: torch.Tensor, gate: torch.Tensor, width: int) -> torch.Tensor:
        """One token through a sparse layer: after the Gaussian top-k ~95% of the gate is exactly
        0, and gelu(0)·up = 0, so only the `up_proj` rows of the units that fire are read (a row
        gather); the result is the same sum without its zero terms. `down_proj` is read whole:
        its columns are strided, so gathering them would touch nearly every cache line anyway."""
        fired = gate.reshape(-1).nonzero().squeeze(1)
        up = self.up_proj(x, rows=fired)
        hidden = torch.zeros_like(gate)
        hidden[..., fired] = gelu_tanh(gate[..., fired]) * up
        return self.down_proj(hidden, cols=width)


def gaussian_topk(gate: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Statistical top-k: keep what exceeds mean + z·std (population std), shifted down
    (docs/text-decoder.md#activation-sparsity)."""
    z = torch.tensor(_std_multiplier(sparsity), dtype=gate.dtype)
    mean = gate.mean(-1, keepdim=True)
    std = gate.std(-1, keepdim=True, unbiased=False)
    return F.relu(gate - (mean + std * z))


class Laurel(nn.Module):
    """LAuReL, learned augmented residual of rank r (docs/text-decoder.md#laurel): x + norm(R(L(x)))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.linear_left = Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """Alternating updates over N streams (docs/text-decoder.md#altup): predict before a layer, correct after it."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        n = cfg.altup_num_inputs
        self.n = n
        self.active = cfg.altup_active_idx
        self.hidden = cfg.hidden_size
        self.correct_output_scale = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.correction_coefs = Linear(n, n, bias=False)
        self.prediction_coefs = Linear(n, n * n, bias=False)
        self.modality_router = Linear(cfg.hidden_size, n, bias=False)
        self.router_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def router(self, x: torch.Tensor) -> torch.Tensor:
        """tanh(norm(x)/D @ W_rᵀ), tanh in fp32 (docs/text-decoder.md#altup-router). [B, T, N]."""
        routed = self.modality_router(self.router_norm(x) * (1.0 / self.hidden))
        return as_dtype(torch.tanh(as_dtype(routed, torch.float32)), x.dtype)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """pred_i = S_i + Σ_j c_ij S_j with c = router(S_active) @ W_pᵀ read row-major
        (docs/text-decoder.md#altup-predict)."""
        coefs = self.prediction_coefs(self.router(streams[self.active]))
        coefs = coefs.view(*coefs.shape[:-1], self.n, self.n)  # [B, T, i, j]
        # [B, T, D, j] @ [B, T, j, i]: the reference's layout (one batched matmul, no einsum parse)
        mixed = torch.matmul(streams.permute(1, 2, 3, 0), coefs.transpose(-1, -2)).permute(3, 0, 1, 2)
        return as_dtype(mixed + streams, streams.dtype)

    def correct(self, pred: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """corr_i = pred_i + γ_i (act - pred_active), γ = router(act) @ W_cᵀ + 1
        (docs/text-decoder.md#altup-correct)."""
        gamma = self.correction_coefs(self.router(activated)) + 1.0  # [B, T, N]
        innovation = activated - pred[self.active]
        return as_dtype(innovation[None] * gamma.permute(2, 0, 1)[..., None] + pred, activated.dtype)

    def scale_output(self, active: torch.Tensor) -> torch.Tensor:
        return active * as_dtype(self.correct_output_scale, active.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        eps, d = cfg.rms_norm_eps, cfg.hidden_size
        self.index = index
        self.correct_scale = cfg.altup_correct_scale
        self.self_attn = Attention(cfg, owns_kv=cfg.kv_source(index) is None)
        self.mlp = MLP(cfg, cfg.intermediate_size[index])
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)
        self.altup = AltUp(cfg)
        self.laurel = Laurel(cfg)
        self.per_layer_input_gate = Linear(d, cfg.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = Linear(cfg.hidden_size_per_layer_input, d, bias=False)
        self.post_per_layer_input_norm = RMSNorm(d, eps)

    def forward(
        self,
        streams: torch.Tensor,
        per_layer_input: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_fn,
        *,
        width: int,
        sparsity: float,
    ) -> torch.Tensor:
        """One layer in the order of docs/text-decoder.md#decoder-layer. streams [N, B, T, D] -> [N, B, T, D].

        `kv_fn(layer, xn)` returns (k, v, mask) for this layer: computed (and cached) for KV
        owners, borrowed from the source layer for shared ones. The two halves around it are
        pure tensor functions of their inputs and the layer's weights (no cache, no Python
        state), so a compiler can take them whole (bench/README.md, "embedded tiny model").
        """
        pred, xn, lau, q = self.pre_attention(streams, *rope)
        k, v, mask = kv_fn(self, xn)
        return self.post_attention(pred, lau, attend(q, k, v, mask), per_layer_input, width, sparsity)

    def pre_attention(self, streams: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """AltUp predict, input norm, LAuReL and the queries (steps 1-4 of the layer)."""
        pred = self.altup.predict(streams)
        xn = self.input_layernorm(pred[self.altup.active])
        return pred, xn, self.laurel(xn), self.self_attn.query(xn, cos, sin)

    def post_attention(
        self,
        pred: torch.Tensor,
        lau: torch.Tensor,
        attended: torch.Tensor,
        per_layer_input: torch.Tensor,
        width: int,
        sparsity: float,
    ) -> torch.Tensor:
        """Output projection, residual + LAuReL, FFN, AltUp correct, PLE injection (steps 4-10)."""
        attn = self.self_attn.output(attended)
        h = (pred[self.altup.active] + self.post_attention_layernorm(attn) + lau) / math.sqrt(2)
        ffn = self.mlp(self.pre_feedforward_layernorm(h), width, sparsity)
        corrected = self.altup.correct(pred, h + self.post_feedforward_layernorm(ffn))
        # PLE injection: gated by the scaled active stream, added to streams 1..N-1
        # (docs/text-decoder.md#ple-injection).
        first = corrected[self.altup.active]
        if self.correct_scale:
            first = self.altup.scale_output(first)
        gated = gelu_tanh(self.per_layer_input_gate(first)) * per_layer_input
        corrected[1:] += self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return corrected


class TextDecoder(nn.Module):
    """Embeddings -> AltUp expand -> layers of the plan -> AltUp collapse -> norm -> logits."""

    def __init__(
        self, cfg: TextConfig, ple_table: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
    ) -> None:
        """`ple_table`: the per-layer embeddings [Vp, L*P], kept on the host (memory-mapped by the
        loader; None only while training or testing pieces); `compute_dtype`: the activations'
        dtype (None: the weights'), chosen by the loader's policy (hardware.py)."""
        super().__init__()
        self.config = cfg
        d, p, n_layers = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
        self.embed_tokens = Embedding(cfg.vocab_size, d)
        self.per_layer_model_projection = Linear(d, n_layers * p, bias=False)
        self.per_layer_projection_norm = RMSNorm(p, cfg.rms_norm_eps)
        self.altup_projections = nn.ModuleList(Linear(d, d, bias=False) for _ in range(cfg.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(
            Linear(d, d, bias=False) for _ in range(cfg.altup_num_inputs - 1)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(n_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.embed_tokens_per_layer = ple_table  # a plain attribute: never a parameter, never moved
        self.compute_dtype = compute_dtype  # weights stay as stored

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # the stored dtype (norms are never quantized)

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # --- embeddings (docs/text-decoder.md#embeddings, #per-layer-embeddings) --------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """h0 = E[x] · sqrt(D), the scale cast to the activation dtype first (docs/text-decoder.md#embeddings)."""
        dtype = self.activation_dtype
        return self.embed_tokens(ids).to(dtype) * torch.tensor(self.config.hidden_size**0.5, dtype=dtype)

    def per_layer_inputs(self, ids: torch.Tensor, h0: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        """(RMSNorm(h0 W_plmᵀ / sqrt(D)) + E_ple[x]·sqrt(P)) / sqrt(2), kept layers only: [B,T,L',P]."""
        cfg, dtype = self.config, h0.dtype
        n, p = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        proj = self.per_layer_model_projection(h0) * torch.tensor(cfg.hidden_size**-0.5, dtype=dtype)
        proj = self.per_layer_projection_norm(proj.view(*h0.shape[:-1], n, p))
        tok = self.ple_rows(ids).view(*ids.shape, n, p)
        out = (proj + tok) * torch.tensor(2.0**-0.5, dtype=dtype)
        if plan.layers != tuple(range(n)):
            out = out[:, :, list(plan.layers)]
        return out

    def ple_row(self, token: int) -> torch.Tensor:
        """One token's PLE row as stored (unscaled, [L*P]); ids outside the table use row 0."""
        table = self.embed_tokens_per_layer
        assert table is not None, "the per-layer embedding table was not attached"
        row = token if 0 <= token < table.shape[0] else 0
        return table[torch.tensor([row])][0]

    def ple_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Gather the PLE rows of `ids` from the host table; ids outside it use row 0
        (docs/text-decoder.md#per-layer-embeddings)."""
        table = self.embed_tokens_per_layer
        assert table is not None, "the per-layer embedding table was not attached"
        host_ids = ids.to(table.device)
        host_ids = torch.where((host_ids >= 0) & (host_ids < table.shape[0]), host_ids, 0)
        dtype = self.activation_dtype
        rows = table[host_ids].to(device=ids.device, dtype=dtype)
        return rows * torch.tensor(self.config.hidden_size_per_layer_input**0.5, dtype=dtype)

    # --- AltUp expand / collapse (docs/text-decoder.md#altup-expand, #altup-collapse) ------
    @staticmethod
    def _match_magnitude(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return x * target / torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))

    def altup_expand(self, h0: torch.Tensor) -> torch.Tensor:
        target = torch.mean(h0**2, dim=-1, keepdim=True) ** 0.5
        streams = [h0] + [self._match_magnitude(proj(h0), target) for proj in self.altup_projections]
        return torch.stack(streams, dim=0)

    def altup_collapse(self, streams: torch.Tensor) -> torch.Tensor:
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        rest = [self._match_magnitude(u(s), target) for u, s in zip(self.altup_unembed_projections, streams[1:])]
        return torch.stack([streams[0], *rest]).mean(dim=0)

    # --- the forward pass -----------------------------------------------------------------
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        plan: LayerPlan,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Hidden states after the final norm, [B, T_out, D] (None when `out_rows` is empty).

        ids [B, T] and positions [T] (absolute). `inputs_embeds` replaces h0 (multimodal merge).
        `out_rows` (indices into T) are the only rows whose output is wanted: the KV-shared
        layers write no cache, so they run on those rows only (the prefill skip, docs/text-decoder.md#prefill-skip).
        """
        cfg = plan.config
        h0 = self.embed(ids) if inputs_embeds is None else inputs_embeds.to(self.activation_dtype)
        pli = self.per_layer_inputs(ids, h0, plan)
        streams = self.altup_expand(h0)
        first_shared = cfg.first_kv_shared_layer if cfg.num_kv_shared_layers else cfg.num_hidden_layers
        sources = cfg.kv_sources()
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        masks: dict[tuple[int, int, int | None], tuple[torch.Tensor, ...]] = {}  # borrowers reuse their source's
        q_pos = positions
        ropes = self._ropes(cfg, q_pos, h0.dtype)

        for j, parent_idx in enumerate(plan.layers):
            if j == first_shared and out_rows is not None:
                if out_rows.numel() == 0:  # no output wanted: the rest writes no cache
                    return None
                streams, pli, q_pos = streams[:, :, out_rows], pli[:, out_rows], positions[out_rows]
                ropes = self._ropes(cfg, q_pos, h0.dtype)
                out_rows = None
            layer_type = cfg.layer_types[j]
            window = cfg.sliding_window if layer_type == "sliding_attention" else None

            kv_fn = partial(
                self._layer_kv,
                j=j,
                source=sources[j],
                q_pos=q_pos,
                rope=ropes[layer_type],
                window=window,
                cache=cache,
                shared_kv=shared_kv,
                masks=masks,
            )
            streams = self.layers[parent_idx](
                streams,
                pli[:, :, j],
                ropes[layer_type],
                kv_fn,
                width=cfg.intermediate_size[j],
                sparsity=cfg.activation_sparsity_pattern[j],
            )
        if out_rows is not None:
            if out_rows.numel() == 0:
                return None
            streams = streams[:, :, out_rows]
        return self.norm(self.altup_collapse(streams))

    @staticmethod
    def _layer_kv(layer, xn, *, j, source, q_pos, rope, window, cache, shared_kv, masks):
        """(k, v, mask) for plan layer j: borrowed from its source's post-norm, post-RoPE K/V
        (docs/text-decoder.md#kv-sharing), or computed here, appended to the cache, and kept for
        the borrowers. Masks are built once per (queries, keys, window) in a forward pass."""
        if source is not None:
            k, v, k_pos = shared_kv[source]
        else:
            k, v = layer.self_attn.project_kv(xn, *rope)
            k_pos = q_pos
            if cache is not None:
                k, v, k_pos = cache.update(j, k, v, q_pos)
            shared_kv[j] = (k, v, k_pos)
        key = (id(q_pos), id(k_pos), window)
        if key not in masks:  # the entry keeps q_pos/k_pos alive, so their ids stay theirs
            masks[key] = (attention_mask(q_pos, k_pos, window), q_pos, k_pos)
        return k, v, masks[key][0]

    def _ropes(self, cfg: TextConfig, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        return {t: rope_cos_sin(positions, cfg.rope_base(t), cfg.head_dim, dtype) for t in set(cfg.layer_types)}

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied head and the final soft-cap: cap · tanh(logits / cap) (docs/text-decoder.md#logits)."""
        logits = self.embed_tokens.as_linear(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
