"""The Gemma 3n audio tower: a USM-style conformer (docs/audio-vision.md#audio-encoder).

Module and parameter names equal the checkpoint names under `model.audio_tower.`, so loading
is a dict walk. Derived constants (query scale, local causal band, sinusoid timing signal) are
rebuilt from the config at call time; the checkpoint carries none of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import fused, kernels, layers
from .checkpoint import check_coverage
from .errors import ConfigError
from .hardware import choose_compute_dtype
from .layers import Linear, RMSNorm


@dataclass
class AudioEncoderConfig:
    """`audio_config` of config.json (field names as in the checkpoint; defaults = E2B/E4B)."""

    hidden_size: int = 1536
    input_feat_size: int = 128
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, ...] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))

    @classmethod
    def from_dict(cls, d: Mapping) -> AudioEncoderConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.sscp_conv_channel_size = tuple(cfg.sscp_conv_channel_size)
        cfg.sscp_conv_kernel_size = tuple(tuple(k) for k in cfg.sscp_conv_kernel_size)
        cfg.sscp_conv_stride_size = tuple(tuple(s) for s in cfg.sscp_conv_stride_size)
        if cfg.hidden_size % cfg.conf_num_attention_heads:
            raise ConfigError(
                f"audio_config.hidden_size={cfg.hidden_size} is not divisible by "
                f"conf_num_attention_heads={cfg.conf_num_attention_heads}"
            )
        if not len(cfg.sscp_conv_channel_size) == len(cfg.sscp_conv_kernel_size) == 2:
            raise ConfigError("audio_config.sscp_conv_* must describe exactly 2 conv blocks")
        return cfg

    @property
    def time_stride(self) -> int:
        """Mel frames per SSCP output step (4 for the shipped config)."""
        return math.prod(s[0] for s in self.sscp_conv_stride_size)


def _limit(x: torch.Tensor, limit: float) -> float:
    # `gradient_clipping` (1e10) is a no-op in fp32/bf16; in fp16 HF caps it at the dtype max.
    return min(limit, torch.finfo(x.dtype).max)


def _norm(
    x: torch.Tensor,
    norm: RMSNorm,
    *,
    clip: float | None = None,
    act: str | None = None,
    residual: torch.Tensor | None = None,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """act(norm(clamp(x, ±clip))) · scale + residual in one pass over the rows (`fused.norm_act`),
    written in `out_dtype`: the dtype of the matmul it feeds, or of the residual stream."""
    limit = None if clip is None else _limit(x, clip)
    return fused.norm_act(
        x, norm.weight, norm.eps, act=act, clip=limit, residual=residual, scale=scale, out_dtype=out_dtype
    )


class CumulativeGroupNorm(nn.Module):
    """Group norm over (freq, channel) with statistics accumulated causally over time
    (docs/audio-vision.md#cumulative-group-norm).

    Input [B, T, F, C]. The variance sums each past step's squared deviation from that step's
    own running mean mu_tau, as the reference does. Per step that sum is
    S2 - 2 mu_tau S1 + n mu_tau^2 (S1, S2: the step's sum and sum of squares), so the input is
    read twice and never centred in a [B, T, F, C] temporary; the combination runs in float64.
    """

    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (step, channel) a, b with norm(x) = a * x + b, each [B, T, 1, C], float32."""
        h = x.float()
        b, t, f, c = h.shape
        s1 = h.sum((2, 3)).double()  # [B, T]
        s2 = torch.linalg.vector_norm(h, dim=(2, 3)).double().pow(2)
        count = torch.arange(1, t + 1, device=h.device, dtype=torch.float64) * (f * c)
        mu = s1.cumsum(1) / count
        var = (s2 - 2 * mu * s1 + (f * c) * mu.pow(2)).cumsum(1) / count
        rstd = torch.rsqrt(var + self.eps).float()[:, :, None, None]
        scale = rstd * self.weight.float()  # [B, T, 1, C]
        return scale, -mu.float()[:, :, None, None] * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift(x)
        return torch.addcmul(shift, x.float(), scale).to(x.dtype)


class SSCPConvBlock(nn.Module):
    """Pad (time 0/k-1, freq 1/1) -> Conv2d (no bias) -> cumulative group norm -> ReLU.

    Works channels-last, [B, T, F, C]: the norm then reduces over contiguous memory and the
    final (freq, channel) flatten needs no copy. Norm and ReLU run in place on the conv output.
    """

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int], stride: tuple[int, int], eps: float):
        super().__init__()
        self.time_pad = kernel[0] - 1  # "reverse causal": pad only the end of time
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, bias=False)
        self.norm = CumulativeGroupNorm(c_out, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 1, 1, 0, self.time_pad))  # [B, T, F, C]
        # torch keeps the channels_last layout for C > 1; a 1-channel input comes back NCHW
        x = F.conv2d(x.permute(0, 3, 1, 2), self.conv.weight.to(x.dtype), stride=self.conv.stride)
        x = x.permute(0, 2, 3, 1).contiguous()
        scale, shift = self.norm.scale_shift(x)
        return x.float().mul_(scale).add_(shift).relu_().to(x.dtype)


class SubSampleConvProjection(nn.Module):
    """Two stride-2 conv blocks then a linear projection of the flattened (freq, channel) plane."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        c0, c1 = cfg.sscp_conv_channel_size
        (k0, k1), (s0, s1) = cfg.sscp_conv_kernel_size, cfg.sscp_conv_stride_size
        eps = cfg.sscp_conv_group_norm_eps
        self.conv_0 = SSCPConvBlock(1, c0, k0, s0, eps)
        self.conv_1 = SSCPConvBlock(c0, c1, k1, s1, eps)
        f = cfg.input_feat_size
        for k, s in ((k0, s0), (k1, s1)):
            f = (f + 2 - k[1]) // s[1] + 1
        self.input_proj_linear = Linear(f * c1, cfg.hidden_size, bias=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_1(self.conv_0(mel.unsqueeze(-1)))  # [B, T2, F2, C]
        # flatten index f*C + c, as the converter reshaped the JAX kernel (docs/audio-vision.md#audio-tower-tensors)
        return self.input_proj_linear(x.reshape(*x.shape[:2], -1))


class FeedForward(nn.Module):
    """Half-step (macaron) FFN: x + residual_weight * PostNorm(W2 silu(W1 PreNorm(x)))."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.clip = cfg.gradient_clipping
        self.residual_weight = cfg.conf_residual_weight
        # the reference builds these norms with the default eps 1e-6, not rms_norm_eps
        self.pre_layer_norm = RMSNorm(d)
        self.ffw_layer_1 = Linear(d, 4 * d, bias=False)
        self.ffw_layer_2 = Linear(4 * d, d, bias=False)
        self.post_layer_norm = RMSNorm(d)

    def forward(self, x: torch.Tensor, gemm: torch.dtype) -> torch.Tensor:
        # the normed input goes to ffw_layer_1 in the matmul's dtype and its output stays in it
        # (a bf16 GEMM rounds its output to bf16 either way)
        h = _norm(x, self.pre_layer_norm, clip=self.clip, out_dtype=gemm)
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(h)))
        return _norm(h, self.post_layer_norm, clip=self.clip, residual=x, scale=self.residual_weight, out_dtype=x.dtype)


class RelativePositionEmbedding(nn.Module):
    """Holds `pos_proj`, which maps the sinusoid of each relative distance to per-head keys."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.pos_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)


def timing_signal(distances: torch.Tensor, channels: int) -> torch.Tensor:
    """[sin(d*inv), cos(d*inv)] concatenated, inv_i = 1e4^(-i/(channels/2 - 1))
    (docs/audio-vision.md#local-attention)."""
    n = channels // 2
    inv = torch.exp(torch.arange(n, dtype=torch.float32) * -(math.log(1.0e4) / max(n - 1, 1)))
    scaled = distances.float().unsqueeze(-1) * inv.to(distances.device)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1)


def relative_shift(bd: torch.Tensor, context: int) -> torch.Tensor:
    """[..., W, F] indexed by distance slot -> [..., W, C] with out[w, c] = bd[w, c - w] (else 0).

    Transformer-XL skew: pad the last dim to C + 1, flatten (W, C + 1), keep W*C, reshape.
    """
    *lead, w, f = bd.shape
    flat = F.pad(bd, (0, context + 1 - f)).reshape(*lead, w * (context + 1))
    return flat[..., : w * context].reshape(*lead, w, context)


class LocalRelPosAttention(nn.Module):
    """Chunked local self-attention with relative positions and a tanh logit cap (docs/audio-vision.md#local-attention).

    Queries are cut into blocks of W = chunk; each block attends to a context of
    C = W + past + future keys; a band mask keeps `past` steps back and `future` ahead.
    """

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.conf_num_attention_heads
        self.head_dim = d // self.num_heads
        self.logit_cap = cfg.conf_attention_logit_cap
        # the learned per-dim scale passes through softplus, which is ln 2 at init; undo that
        self.q_scale = self.head_dim**-0.5 / math.log(2.0)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.relative_position_embedding = RelativePositionEmbedding(cfg)
        self.q_proj = Linear(d, d, bias=False)
        self.k_proj = Linear(d, d, bias=False)
        self.v_proj = Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x: the normed input, in the projections' matmul dtype; the attention itself runs in
        the activations' dtype (`ctx.dtype`): logits near the cap need more than bf16's 8 bits."""
        b, t, d = x.shape
        n, hd, w, c, u = self.num_heads, self.head_dim, ctx.chunk, ctx.context, ctx.num_blocks
        dt = ctx.dtype
        q = self.q_proj(x).to(dt) * self.q_scale * F.softplus(self.per_dim_scale.to(dt)).repeat(n)
        q = F.pad(q, (0, 0, 0, u * w - t)).view(b, u, w, n, hd).permute(0, 3, 1, 2, 4)  # [B,N,U,W,D]
        k = ctx.blocks(self.k_proj(x).to(dt)).view(b, u, n, hd, c).transpose(1, 2)  # [B,N,U,D,C]
        v = ctx.blocks(self.v_proj(x).to(dt)).view(b, u, n, hd, c).permute(0, 2, 1, 4, 3)  # [B,N,U,C,D]

        pos = self.relative_position_embedding.pos_proj(ctx.timing.to(dt))  # [F, N*D]
        pos = pos.view(-1, n, hd).permute(1, 2, 0)  # [N, D, F]
        bd = torch.matmul(q.reshape(b, n, u * w, hd), pos).view(b, n, u, w, -1)
        logits = torch.matmul(q, k) + relative_shift(bd, c)  # [B,N,U,W,C]
        logits = torch.tanh(logits / self.logit_cap) * self.logit_cap
        logits = logits.masked_fill(~ctx.valid, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out = torch.matmul(probs, v)  # [B,N,U,W,D]
        return out.permute(0, 2, 3, 1, 4).reshape(b, u * w, d)[:, :t]


class ConformerAttention(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.clip = cfg.gradient_clipping
        self.pre_attn_norm = RMSNorm(d)
        self.attn = LocalRelPosAttention(cfg)
        self.post = Linear(d, d, bias=False)
        self.post_norm = RMSNorm(d)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.attn(_norm(x, self.pre_attn_norm, clip=self.clip, out_dtype=ctx.gemm_dtype), ctx)
        h = self.post(h.to(ctx.gemm_dtype))
        return _norm(h, self.post_norm, clip=self.clip, residual=x, out_dtype=x.dtype)  # residual: the unclamped x


class LightConv1d(nn.Module):
    """GLU -> causal depthwise conv (left pad k-1) -> RMSNorm -> SiLU -> linear, plus residual."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d, k = cfg.hidden_size, cfg.conf_conv_kernel_size
        self.clip = cfg.gradient_clipping
        self.pre_layer_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.linear_start = Linear(d, 2 * d, bias=False)
        self.depthwise_conv1d = nn.Conv1d(d, d, kernel_size=k, groups=d, bias=False)
        self.conv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.linear_end = Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, gemm: torch.dtype) -> torch.Tensor:
        h = self.linear_start(_norm(x, self.pre_layer_norm, out_dtype=gemm))
        h = F.glu(h.to(x.dtype), dim=-1)  # the gate and the conv in the activations' dtype
        conv = self.depthwise_conv1d
        h = F.pad(h.transpose(1, 2), (conv.kernel_size[0] - 1, 0))  # causal: left pad only
        h = F.conv1d(h, conv.weight.to(h.dtype), groups=conv.groups).transpose(1, 2)
        h = self.linear_end(_norm(h, self.conv_norm, clip=self.clip, act="silu", out_dtype=gemm))
        return x + h


class ConformerBlock(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.clip = cfg.gradient_clipping
        self.ffw_layer_start = FeedForward(cfg)
        self.attention = ConformerAttention(cfg)
        self.lconv1d = LightConv1d(cfg)
        self.ffw_layer_end = FeedForward(cfg)
        self.norm = RMSNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.attention(self.ffw_layer_start(x, ctx.gemm_dtype), ctx)
        # padded steps are zeroed before the conv (and its residual)
        x = self.lconv1d(x * ctx.step_valid, ctx.gemm_dtype)
        return _norm(self.ffw_layer_end(x, ctx.gemm_dtype), self.norm, clip=self.clip)


class AttentionContext:
    """Per-forward constants shared by all conformer layers: block windows, masks, timing signal."""

    def __init__(self, cfg: AudioEncoderConfig, padding: torch.Tensor, dtype: torch.dtype, gemm_dtype: torch.dtype):
        self.dtype, self.gemm_dtype = dtype, gemm_dtype  # the activations'; the inputs of the projections
        self.chunk = cfg.conf_attention_chunk_size
        self.past = max(0, cfg.conf_attention_context_left - 1)
        self.future = cfg.conf_attention_context_right
        self.context = self.chunk + self.past + self.future
        t = padding.shape[1]
        self.num_blocks = -(-t // self.chunk)
        device = padding.device
        # local band: query w sees context slots c with w <= c <= w + past + future
        w = torch.arange(self.chunk, device=device)[:, None]
        c = torch.arange(self.context, device=device)[None, :]
        band = (c >= w) & (c <= w + self.past + self.future)  # [W, C]
        key_valid = self.blocks(~padding)  # [B, U, C]; padding outside the clip is invalid
        self.valid = key_valid[:, None, :, None, :] & band  # [B, 1, U, W, C]
        self.step_valid = (~padding).unsqueeze(-1).to(dtype)  # [B, T, 1]
        distances = torch.arange(self.past, -self.future - 1, -1, device=device)
        self.timing = timing_signal(distances, cfg.hidden_size)  # [F, hidden] float32

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, U, ..., C]: overlapping context windows (zero/False padded)."""
        pad = [0, 0] * (x.dim() - 2) + [self.past, self.future + self.chunk - 1]
        return F.pad(x, pad).unfold(1, self.context, self.chunk)


class AudioEncoder(nn.Module):
    """`model.audio_tower`: mel features -> [N, S, hidden] encodings, S = ceil(T / 16)."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        self.compute_dtype = torch.float32  # the activations' dtype; see from_state_dict
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.conformer = nn.ModuleList(ConformerBlock(config) for _ in range(config.conf_num_hidden_layers))

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        audio_config: Mapping,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> AudioEncoder:
        """Strict load of `model.audio_tower.*` tensors (prefix already stripped).

        Tensors already on `device` in `dtype` are used without a copy. `compute_dtype` is the
        activations' dtype; by default the weights' dtype, except fp32 for bf16/fp16 weights on a
        CPU (weights stay stored as given and are upcast per matmul).
        """
        cfg = AudioEncoderConfig.from_dict(audio_config)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_coverage(expected, {k: tuple(v.shape) for k, v in sd.items()}, where="audio tower (model.audio_tower.*)")
        weights = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}
        model.load_state_dict(weights, assign=True)
        weight = next(model.parameters())
        if weight.device.type == "cpu":
            kernels.get(build=False)  # the fused norm epilogues, if this machine has built the kernels
        model.compute_dtype = choose_compute_dtype(weight.device, weight.dtype, compute_dtype)
        return model.eval().requires_grad_(False)

    @property
    def gemm_dtype(self) -> torch.dtype:
        """The dtype the linear layers multiply in (`layers.matmul`'s choice for these weights);
        the norms before them write their output in it, so that no cast runs in between."""
        if self.compute_dtype != torch.float32:
            return self.compute_dtype
        w = self.subsample_conv_projection.input_proj_linear.weight
        return layers.gemm_dtype(w.device, w.dtype)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [N, T, n_mels], mask [N, T] bool (True = valid frame, as the extractor returns).

        Returns (encodings [N, S, hidden], padding [N, S] bool with True = PADDED), exactly the
        `last_hidden_state` and `audio_mel_mask` of HF `Gemma3nAudioEncoder`. Padded rows are 0.
        """
        cfg = self.config
        x = self.subsample_conv_projection(features.to(self.compute_dtype))  # [N, T2, hidden]
        # each step takes the mask of the first mel frame of its receptive field (docs/audio-vision.md#sscp)
        idx = (torch.arange(x.shape[1], device=mask.device) * cfg.time_stride).clamp(max=mask.shape[1] - 1)
        padding = ~mask[:, idx].bool()
        ctx = AttentionContext(cfg, padding, x.dtype, self.gemm_dtype)
        for block in self.conformer:
            x = block(x, ctx)
        r = cfg.conf_reduction_factor
        x, padding = x[:, ::r], padding[:, ::r]  # decimation, not pooling (docs/audio-vision.md#output-reduction)
        return x.masked_fill(padding.unsqueeze(-1), 0.0), padding
