"""The vision tower: MobileNet-V5 (docs/audio-vision.md), channels-last.

Numerical authority: transformers 5.24 `Gemma3nModel.get_image_features` + timm `MobileNetV5Encoder`.
The tower architecture is never written down here: timm decodes `vision_config["architecture"]` and
`model_args` on the meta device, and `VisionTower` converts that module tree into a channels-last
implementation that reads the checkpoint's `timm_model.*` tensors (folding norm weights, layer scales
and the sqrt(hidden) soft-token scale into neighbouring weights). Images reach it through image.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused, kernels
from .checkpoint import check_coverage
from .errors import ConfigError, InputError
from .hardware import tower_compute_dtype

# ---------------------------------------------------------------------------------------------------
# MobileNet-V5 tower (docs/audio-vision.md#vision-tower), channels-last: activations are
# [B, H, W, C] so every 1x1 conv is a plain GEMM over the last dim and every RMSNorm2d is a
# last-dim norm.
# ---------------------------------------------------------------------------------------------------


def _act_name(mod: nn.Module, where: str) -> str | None:
    """The block's activation as a `fused.ACTS` name ("gelu" for the exact GELU, which has no
    fused form)."""
    if isinstance(mod, nn.Identity):
        return None
    if isinstance(mod, nn.GELU):  # timm >= 1.0.17: tanh approximation everywhere (docs/audio-vision.md#building-blocks)
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    if isinstance(mod, nn.ReLU):
        return "relu"
    raise ConfigError(f"vision tower: unsupported activation {type(mod).__name__} at {where}")


def _rms(
    x: Tensor, weight: Tensor | None, eps: float, act: str | None = None, residual: Tensor | None = None
) -> Tensor:
    """timm RmsNorm2d over the channel (last) dim, x * rsqrt(mean_c(x^2) + eps) * w, then the
    activation, then + residual: one pass over the rows (`fused.norm_act`), statistics in fp32."""
    if act == "gelu":
        y = F.gelu(fused.norm_act(x, weight, eps).float()).to(x.dtype)
        return y if residual is None else y.add_(residual)
    return fused.norm_act(x, weight, eps, act=act, residual=residual)


class _Conv(nn.Module):
    """A KxK (full or depthwise) conv on NHWC activations; 'same' stride-2 convs get TF-style
    asymmetric padding (⌊p/2⌋ before, the rest after), exactly as timm's Conv2dSame
    (docs/audio-vision.md#building-blocks)."""

    def __init__(self, conv: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.tf_same = type(conv).__name__ == "Conv2dSame"
        pad = conv.padding
        if isinstance(pad, str):
            raise ConfigError(f"vision tower: unsupported string padding {pad!r}")
        self.padding = (0, 0) if self.tf_same else tuple(pad)

    def forward(self, x: Tensor) -> Tensor:  # x [B, H, W, C]
        if self.tf_same:
            pads = []
            for size, k, s, d in zip(x.shape[1:3], self.weight.shape[2:], self.stride, self.dilation):
                p = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                pads.append((p // 2, p - p // 2))
            (pt, pb), (pl, pr) = pads
            if pt or pb or pl or pr:
                x = F.pad(x, (0, 0, pl, pr, pt, pb))
        y = F.conv2d(
            x.permute(0, 3, 1, 2),
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        return y.permute(0, 2, 3, 1).contiguous()  # channels-last conv -> already NHWC-contiguous


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


class _Loader:
    """Hands out checkpoint tensors by timm name (fp32 for folding, then cast) and records use."""

    def __init__(self, sd: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.sd, self.device, self.dtype = sd, device, dtype

    def get(self, name: str) -> Tensor:
        return self.sd["timm_model." + name].to(device=self.device, dtype=torch.float32)

    def opt(self, name: str) -> Tensor | None:
        return self.get(name) if ("timm_model." + name) in self.sd else None

    def out(self, t: Tensor) -> Tensor:
        return t.to(self.dtype)


def _norm_weight(ld: _Loader, name: str, norm: nn.Module) -> Tensor | None:
    return ld.get(name + ".weight") if getattr(norm, "weight", None) is not None else None


def _conv_norm(ld: _Loader, name: str, cna: nn.Module) -> tuple[Tensor, Tensor | None, nn.Module]:
    """A timm ConvNormAct -> (conv weight, norm weight, norm module)."""
    return ld.get(name + ".conv.weight"), _norm_weight(ld, name + ".bn", cna.bn), cna.bn


def _check_plain(block: nn.Module, name: str, attrs: Sequence[str]) -> None:
    for a in attrs:
        m = getattr(block, a, None)
        if m is not None and not isinstance(m, (nn.Identity, nn.Dropout)):
            raise ConfigError(f"vision tower: block {name} has a {a} ({type(m).__name__}), which is not supported")


def _layer_scale(ld: _Loader, name: str, block: nn.Module) -> Tensor | None:
    return ld.get(name + ".layer_scale.gamma") if hasattr(block.layer_scale, "gamma") else None


def _mul(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a * b


class _ConvNormAct(nn.Module):
    """Stem: conv (TF 'same', bias) -> RMSNorm -> act."""

    def __init__(self, ld: _Loader, name: str, cna: nn.Module) -> None:
        super().__init__()
        bias = ld.opt(name + ".conv.bias")
        self.conv = _Conv(cna.conv, ld.out(ld.get(name + ".conv.weight")), None if bias is None else ld.out(bias))
        w = _norm_weight(ld, name + ".bn", cna.bn)
        self.norm_w = None if w is None else _param(ld.out(w))
        self.eps = cna.bn.eps
        self.act = _act_name(getattr(cna.bn, "act", nn.Identity()), name)

    def forward(self, x: Tensor) -> Tensor:
        return _rms(self.conv(x), self.norm_w, self.eps, self.act)


class _EdgeResidual(nn.Module):
    """ER / FusedMBConv: KxK conv_exp -> norm+act -> 1x1 conv_pwl -> norm (+x)."""

    def __init__(self, ld: _Loader, name: str, blk: nn.Module) -> None:
        super().__init__()
        _check_plain(blk, name, ("se", "aa"))
        if blk.conv_pwl.kernel_size != (1, 1):
            raise ConfigError(f"vision tower: block {name}: only 1x1 conv_pwl is supported")
        self.conv_exp = _Conv(blk.conv_exp, ld.out(ld.get(name + ".conv_exp.weight")), None)
        self.n1 = _param(ld.out(ld.get(name + ".bn1.weight")))
        self.act = _act_name(blk.bn1.act, name)
        self.pwl = _param(ld.out(ld.get(name + ".conv_pwl.weight").flatten(1)))
        self.n2 = _param(ld.out(ld.get(name + ".bn2.weight")))
        self.eps1, self.eps2 = blk.bn1.eps, blk.bn2.eps
        self.has_skip = blk.has_skip

    def forward(self, x: Tensor) -> Tensor:
        y = _rms(self.conv_exp(x), self.n1, self.eps1, self.act)
        return _rms(F.linear(y, self.pwl), self.n2, self.eps2, residual=x if self.has_skip else None)


class _UIR(nn.Module):
    """Universal Inverted Residual: [dw_start+norm] -> pw_exp+norm+act -> [dw_mid+norm+act] ->
    pw_proj+norm -> layer scale (+x). dw_start's norm weight is folded into pw_exp's columns and
    the layer scale into pw_proj's norm weight (both are plain per-channel scales)."""

    def __init__(self, ld: _Loader, name: str, blk: nn.Module) -> None:
        super().__init__()
        _check_plain(blk, name, ("se", "dw_end"))
        self.dw_start = None
        w_exp, n_exp, bn = _conv_norm(ld, name + ".pw_exp", blk.pw_exp)
        w_exp = w_exp.flatten(1)
        if not isinstance(blk.dw_start, nn.Identity):
            w_dw, n_dw, bn_dw = _conv_norm(ld, name + ".dw_start", blk.dw_start)
            if _act_name(getattr(bn_dw, "act", nn.Identity()), name) is not None:
                raise ConfigError(f"vision tower: block {name}: dw_start with an activation is not supported")
            self.dw_start = _Conv(blk.dw_start.conv, ld.out(w_dw), None)
            self.eps_start = bn_dw.eps
            if n_dw is not None:
                w_exp = w_exp * n_dw[None, :]
        self.pw_exp = _param(ld.out(w_exp))
        self.n_exp = None if n_exp is None else _param(ld.out(n_exp))
        self.eps_exp = bn.eps
        self.act = _act_name(getattr(bn, "act", nn.Identity()), name)
        self.dw_mid = None
        if not isinstance(blk.dw_mid, nn.Identity):
            w_mid, n_mid, bn_mid = _conv_norm(ld, name + ".dw_mid", blk.dw_mid)
            self.dw_mid = _Conv(blk.dw_mid.conv, ld.out(w_mid), None)
            self.n_mid = None if n_mid is None else _param(ld.out(n_mid))
            self.eps_mid = bn_mid.eps
            self.act_mid = _act_name(getattr(bn_mid, "act", nn.Identity()), name)
        w_proj, n_proj, bn_proj = _conv_norm(ld, name + ".pw_proj", blk.pw_proj)
        self.pw_proj = _param(ld.out(w_proj.flatten(1)))
        n = _mul(n_proj, _layer_scale(ld, name, blk))
        self.n_proj = None if n is None else _param(ld.out(n))
        self.eps_proj = bn_proj.eps
        self.has_skip = blk.has_skip

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.dw_start is not None:
            y = _rms(self.dw_start(y), None, self.eps_start)
        y = _rms(F.linear(y, self.pw_exp), self.n_exp, self.eps_exp, self.act)
        if self.dw_mid is not None:
            y = _rms(self.dw_mid(y), self.n_mid, self.eps_mid, self.act_mid)
        return _rms(F.linear(y, self.pw_proj), self.n_proj, self.eps_proj, residual=x if self.has_skip else None)


class _MobileMQA(nn.Module):
    """MobileAttention with multi-query attention (docs/audio-vision.md#building-blocks): x + γ·MQA(RMSNorm(x)).

    The pre-norm weight is folded into the query projection and into the K/V depthwise
    down-convs (both per-channel linear); the K/V norm weights into the K/V projections; γ into the
    output projection's rows. With kv_stride 1, Q, K and V are one GEMM. Heads share the single
    K/V head, so the queries are laid out as [B, H*W*heads, d] rows of one attention."""

    def __init__(self, ld: _Loader, name: str, blk: nn.Module) -> None:
        super().__init__()
        attn = blk.attn
        if getattr(blk, "conv_cpe_dw", None) is not None or type(attn).__name__ != "MultiQueryAttention2d":
            raise ConfigError(f"vision tower: block {name}: only multi-query attention without CPE is supported")
        if attn.has_query_strides:
            raise ConfigError(f"vision tower: block {name}: query strides are not supported")
        a = name + ".attn"
        self.heads, self.key_dim, self.value_dim = attn.num_heads, attn.key_dim, attn.value_dim
        self.eps = blk.norm.eps
        n = _norm_weight(ld, name + ".norm", blk.norm)
        col = (lambda w: w) if n is None else (lambda w: w * n[None, :])
        wq = col(ld.get(a + ".query.proj.weight").flatten(1))
        self.kv_stride = attn.kv_stride
        projs = {}
        for kv in ("key", "value"):
            w = ld.get(f"{a}.{kv}.proj.weight").flatten(1)
            seq = getattr(attn, kv)
            if hasattr(seq, "down_conv"):
                dw = ld.get(f"{a}.{kv}.down_conv.weight")
                if n is not None:
                    dw = dw * n[:, None, None, None]
                setattr(self, f"{kv}_down", _Conv(seq.down_conv, ld.out(dw), None))
                kn = _norm_weight(ld, f"{a}.{kv}.norm", seq.norm)
                setattr(self, f"{kv}_eps", seq.norm.eps)
                if kn is not None:
                    w = w * kn[None, :]
            else:
                w = col(w)
            projs[kv] = w
        self.has_down = hasattr(self, "key_down")
        if self.has_down:
            self.wq = _param(ld.out(wq))
            self.wk = _param(ld.out(projs["key"]))
            self.wv = _param(ld.out(projs["value"]))
        else:
            self.wqkv = _param(ld.out(torch.cat([wq, projs["key"], projs["value"]])))
        wo = ld.get(a + ".output.proj.weight").flatten(1)
        g = _layer_scale(ld, name, blk)
        self.wo = _param(ld.out(wo if g is None else wo * g[:, None]))
        self.has_skip = blk.has_skip

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        xn = _rms(x, None, self.eps)
        if self.has_down:
            q = F.linear(xn, self.wq)
            k = F.linear(_rms(self.key_down(xn), None, self.key_eps), self.wk)
            v = F.linear(_rms(self.value_down(xn), None, self.value_eps), self.wv)
        else:
            q, k, v = F.linear(xn, self.wqkv).split([self.heads * self.key_dim, self.key_dim, self.value_dim], -1)
        # channel c of the query projection is head c // d, dim c % d (timm's reshape)
        q = q.reshape(B, 1, H * W * self.heads, self.key_dim)
        k = k.reshape(B, 1, -1, self.key_dim)
        v = v.reshape(B, 1, -1, self.value_dim)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W*heads, dv], scale 1/sqrt(d)
        y = F.linear(o.reshape(B, H, W, self.heads * self.value_dim), self.wo)
        return y.add_(x) if self.has_skip else y


class _MSFA(nn.Module):
    """Multi-Scale Fusion Adapter (docs/audio-vision.md#msfa): nearest-upsample the coarser maps, concat, 1x1 FFN,
    pool / bilinear to output_resolution, RMSNorm.

    A 1x1 conv commutes with nearest upsampling, so each input's slice of pw_exp runs at that
    input's own resolution and the results are summed (broadcast-added for integer factors):
    same maths, ~4x fewer MACs for the stage-3 part."""

    def __init__(self, ld: _Loader, msfa: nn.Module, in_chs: Sequence[int], out_scale: float) -> None:
        super().__init__()
        if msfa.interpolation_mode != "nearest":
            raise ConfigError(f"vision tower: MSFA interpolation {msfa.interpolation_mode!r} is not supported")
        ffn = msfa.ffn
        _check_plain(ffn, "msfa.ffn", ("se", "dw_end"))
        if not isinstance(ffn.dw_start, nn.Identity) or not isinstance(ffn.dw_mid, nn.Identity) or ffn.has_skip:
            raise ConfigError("vision tower: MSFA FFN with depthwise convs or a skip is not supported")
        w_exp, n_exp, bn = _conv_norm(ld, "msfa.ffn.pw_exp", ffn.pw_exp)
        chunks = w_exp.flatten(1).split(list(in_chs), dim=1)
        self.pw_exp = nn.ParameterList([_param(ld.out(c)) for c in chunks])
        self.n_exp = None if n_exp is None else _param(ld.out(n_exp))
        self.eps_exp = bn.eps
        self.act = _act_name(getattr(bn, "act", nn.Identity()), "msfa.ffn")
        w_proj, n_proj, bn_proj = _conv_norm(ld, "msfa.ffn.pw_proj", ffn.pw_proj)
        self.pw_proj = _param(ld.out(w_proj.flatten(1)))
        n = _mul(n_proj, _layer_scale(ld, "msfa.ffn", ffn))
        self.n_proj = None if n is None else _param(ld.out(n))
        self.eps_proj = bn_proj.eps
        self.out_res = tuple(msfa.output_resolution)
        # the soft-token scale sqrt(hidden) (HF get_image_features) is folded into the final norm weight
        nw = _norm_weight(ld, "msfa.norm", msfa.norm)
        nw = torch.full((msfa.out_channels,), out_scale, device=ld.device) if nw is None else nw * out_scale
        self.norm_w = _param(ld.out(nw))
        self.eps = msfa.norm.eps

    def forward(self, feats: list[Tensor]) -> Tensor:
        B, H, W, _ = feats[0].shape  # timm: the first input sets the fused resolution
        y: Tensor | None = None
        for f, w in zip(feats, self.pw_exp):
            z = F.linear(f, w)
            h, wd = z.shape[1:3]
            if h < H or wd < W:
                if H % h == 0 and W % wd == 0 and y is not None:
                    # nearest upsample by an integer factor == broadcast over the repeated block
                    y.view(B, h, H // h, wd, W // wd, -1).add_(z.view(B, h, 1, wd, 1, -1))
                    continue
                z = F.interpolate(z.permute(0, 3, 1, 2), size=(H, W), mode="nearest").permute(0, 2, 3, 1)
            y = z if y is None else y + z
        assert y is not None
        y = _rms(y, self.n_exp, self.eps_exp, self.act)
        y = _rms(F.linear(y, self.pw_proj), self.n_proj, self.eps_proj)
        R0, R1 = self.out_res
        if (H, W) != (R0, R1):
            if H % R0 or W % R1:
                y = F.interpolate(y.permute(0, 3, 1, 2), size=(R0, R1), mode="bilinear", align_corners=False)
                y = y.permute(0, 2, 3, 1)
            else:  # avg_pool2d(kernel = stride = H / R)
                y = y.reshape(B, R0, H // R0, R1, W // R1, -1).mean(dim=(2, 4))
        return _rms(y, self.norm_w, self.eps)


def _build_timm_skeleton(vision_config: Mapping[str, Any]) -> nn.Module:
    """The timm module tree for the checkpoint's architecture, on the meta device (no memory)."""
    try:
        import timm
    except ImportError as e:
        raise ConfigError("the vision tower needs timm >= 1.0.17: pip install 'gemma3n[vision]'") from e
    arch = vision_config.get("architecture", "mobilenetv5_300m_enc")
    model_args = copy.deepcopy(dict(vision_config.get("model_args") or {}))  # timm pops from block_args
    model_args.pop("features_only", None)
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(
                f"vision_config.architecture {arch!r} is unknown to timm {timm.__version__} "
                "(MobileNet-V5 needs timm >= 1.0.17)"
            ) from e
        raise ConfigError(f"vision_config: timm cannot build {arch!r} with model_args {model_args}: {e}") from e
    except TypeError as e:
        raise ConfigError(f"vision_config.model_args {model_args} rejected by timm: {e}") from e


def _check_coverage(sd: Mapping[str, Tensor], skeleton: nn.Module) -> None:
    """The checkpoint's tower tensors against the module tree `vision_config` describes (strict)."""
    prefix = "model.vision_tower."
    expected = {f"{prefix}timm_model.{k}": tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {prefix + k: tuple(v.shape) for k, v in sd.items()}
    check_coverage(expected, found, where="vision tower (model.vision_tower.*, as vision_config describes it)")


class VisionTower(nn.Module):
    """MobileNet-V5 + MSFA -> soft tokens [N, R*R, hidden], already multiplied by sqrt(hidden).

    The output is exactly what transformers' `get_image_features` passes to
    `embed_vision(inputs_embeds=...)`: `timm forward_features` [N, C, R, R] -> reshape [N, C, R*R] ->
    permute [N, R*R, C] (token k = row k // R, column k % R) -> `*= vision_config.hidden_size ** 0.5`.
    Computes in `hardware.tower_compute_dtype`: for half-precision weights on a CPU, bf16 where the
    CPU has bf16 units (AVX512-BF16, AMX: there the convolutions and 1x1 GEMMs run several times
    faster than in fp32; the norms take their statistics in fp32, as timm does), fp32 elsewhere;
    the output is cast to `dtype`. Each norm, its activation and the block's residual add are one
    pass over the activations (`fused.norm_act`)."""

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        vision_config: Mapping[str, Any],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | str | None = None,
    ) -> VisionTower:
        """`sd`: the checkpoint's `model.vision_tower.*` tensors with that prefix stripped;
        `compute_dtype` overrides the policy (e.g. fp32 to reproduce the reference's fp32 path)."""
        skeleton = _build_timm_skeleton(vision_config)
        _check_coverage(sd, skeleton)
        device = torch.device(device)
        if device.type == "cpu":
            kernels.get(build=False)  # the fused norm epilogues, if this machine has built the kernels
        compute = tower_compute_dtype(device, dtype, compute_dtype)
        ld = _Loader(sd, device, compute)
        hidden = int(vision_config.get("hidden_size", 2048))
        if skeleton.msfa is None or skeleton.msfa.out_channels != hidden:
            out = None if skeleton.msfa is None else skeleton.msfa.out_channels
            raise ConfigError(f"vision_config.hidden_size {hidden} != the tower's MSFA output channels {out}")

        self = cls()
        self.dtype, self.compute_dtype, self.hidden_size = dtype, compute, hidden
        self.gemm_dtype = compute  # every conv and 1x1 conv runs in the activations' dtype
        self.stem = _ConvNormAct(ld, "conv_stem", skeleton.conv_stem)
        blocks: list[nn.Module] = []
        for si, stage in enumerate(skeleton.blocks):
            for bi, blk in enumerate(stage):
                name, kind = f"blocks.{si}.{bi}", type(blk).__name__
                if kind == "EdgeResidual":
                    blocks.append(_EdgeResidual(ld, name, blk))
                elif kind == "UniversalInvertedResidual":
                    blocks.append(_UIR(ld, name, blk))
                elif kind == "MobileAttention":
                    blocks.append(_MobileMQA(ld, name, blk))
                else:
                    raise ConfigError(f"vision tower: block {name} of type {kind} is not supported")
        self.blocks = nn.ModuleList(blocks)
        # feature index 0 is the stem, index i the output of the i-th stage (timm's msfa_indices)
        self.stage_ends = [len(st) for st in skeleton.blocks]
        self.msfa_indices = list(skeleton.msfa_indices)
        in_chs = [skeleton.feature_info[i]["num_chs"] for i in self.msfa_indices]
        self.msfa = _MSFA(ld, skeleton.msfa, in_chs, hidden**0.5)
        r = skeleton.msfa.output_resolution
        self.soft_tokens = int(r[0] * r[1])
        return self.eval()

    @torch.inference_mode()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] (any H, W; 256/512/768 give 256 tokens for the official tower)
        -> [N, soft_tokens, hidden]."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InputError(f"pixel_values must be [N, 3, H, W], got {tuple(pixel_values.shape)}")
        dev = self.msfa.pw_proj.device
        x = pixel_values.to(device=dev, dtype=self.compute_dtype).permute(0, 2, 3, 1).contiguous()
        feats: list[Tensor] = []
        x = self.stem(x)
        if 0 in self.msfa_indices:
            feats.append(x)
        i = 0
        for si, n in enumerate(self.stage_ends):
            for blk in self.blocks[i : i + n]:
                x = blk(x)
            i += n
            if si + 1 in self.msfa_indices:
                feats.append(x)
        y = self.msfa(feats)  # [N, R, R, C]
        return y.reshape(y.shape[0], -1, y.shape[-1]).to(self.dtype)
