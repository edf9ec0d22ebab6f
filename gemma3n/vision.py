"""Vision path: image loading, the Gemma 3n image processor, MobileNet-V5 and video frames.

Spec: /work/shared/reference/audio-vision.md §C (tower, MSFA, processor) and §F.5 (parity pitfalls).
Numerical authority: transformers 5.24 `Gemma3nModel.get_image_features` + timm `MobileNetV5Encoder`.

The tower architecture is never written down here: timm decodes `vision_config["architecture"]` and
`model_args` on the meta device, and `VisionTower` converts that module tree into a channels-last
implementation that reads the checkpoint's `timm_model.*` tensors (folding norm weights, layer scales
and the sqrt(hidden) soft-token scale into neighbouring weights).
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused, kernels
from .errors import CheckpointError, ConfigError, InputError
from .hardware import tower_compute_dtype

# ---------------------------------------------------------------------------------------------------
# Image input
# ---------------------------------------------------------------------------------------------------

# Pillow's own default (~89.5 Mpx, a 1024x1024x3 bomb at 1:1000); above it an image is refused
# rather than decoded (Pillow only warns between 1x and 2x this limit, we refuse both).
MAX_IMAGE_PIXELS = 89_478_485


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the vision extra
        raise InputError("images need Pillow: pip install 'gemma3n[vision]'") from e
    return Image


def _describe(src: Any) -> str:
    if isinstance(src, (str, Path)):
        s = str(src)
        return f"image data URI ({len(s)} chars)" if s.startswith("data:") else f"image file {s}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    return f"image {type(src).__name__}"


def _open_encoded(data: bytes | str | Path, name: str) -> Any:
    """Decode an encoded image fully (first frame), turning every failure into InputError."""
    Image = _pil()
    fp: Any = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}x{img.height}")
            img.seek(0)  # GIF / APNG / multi-page: first frame
            img.load()  # decode now so that truncation is reported here
    except FileNotFoundError as e:
        raise InputError(f"{name}: no such file") from e
    except IsADirectoryError as e:
        raise InputError(f"{name}: is a directory, not an image") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(
            f"{name}: image too large ({e}); limit {MAX_IMAGE_PIXELS} pixels (decompression-bomb guard)"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise InputError(f"{name}: not a readable image (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name}: unreadable or truncated image ({e})") from e
    return img


def _array_to_pil(arr: np.ndarray, name: str) -> Any:
    """HWC (or HW) uint8 / float array -> PIL. Floats are taken as [0, 1] intensities."""
    Image = _pil()
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"{name}: unsupported array dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    mode = "L" if arr.ndim == 2 else {3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _to_rgb(img: Any) -> Any:
    """Any mode -> RGB, compositing transparency onto white exactly like transformers'
    `image_transforms.convert_to_rgb` (so our RGB image processes like HF's RGBA one)."""
    Image = _pil()
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(src: Any) -> Any:
    """Load one image as an RGB `PIL.Image.Image` with its EXIF orientation applied.

    `src`: a path (str / Path), a `data:image/...;base64,` URI, encoded bytes, a PIL image, or an
    HxW / HxWxC numpy array (uint8, or float in [0, 1]). Raises `InputError` naming the source for
    unreadable, truncated, zero-size or oversized (decompression-bomb) input.
    """
    Image = _pil()
    from PIL import ImageOps

    name = _describe(src)
    if isinstance(src, str) and src.startswith("data:"):
        header, _, payload = src.partition(",")
        if ";base64" not in header:
            raise InputError(f"{name}: only base64 data URIs are supported")
        try:
            src = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"{name}: invalid base64 payload") from e
    if isinstance(src, (bytearray, memoryview)):
        src = bytes(src)
    if isinstance(src, bytes):
        if not src:
            raise InputError(f"{name}: empty image data")
        img = _open_encoded(src, name)
    elif isinstance(src, (str, Path)):
        if isinstance(src, str) and src.split("://", 1)[0] in ("http", "https", "ftp"):
            raise InputError(f"{name}: URLs are not fetched; download the image and pass the file")
        p = Path(src).expanduser()
        if p.is_file() and p.stat().st_size == 0:
            raise InputError(f"{name}: empty file (0 bytes)")
        img = _open_encoded(p, name)
    elif isinstance(src, Image.Image):
        img = src
        try:
            img.load()  # a lazily opened file may still be truncated
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{name}: unreadable or truncated image ({e})") from e
    elif isinstance(src, np.ndarray):
        if src.size == 0:
            raise InputError(f"{name}: zero-size array {tuple(src.shape)}")
        img = _array_to_pil(src, name)
    elif isinstance(src, torch.Tensor):
        raise InputError(f"{name}: pass images as paths, bytes, PIL images or numpy arrays (HWC)")
    else:
        raise InputError(f"{name}: unsupported image input type")

    if img.width == 0 or img.height == 0:
        raise InputError(f"{name}: zero-size image ({img.width}x{img.height})")
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise InputError(f"{name}: image too large ({img.width}x{img.height} > {MAX_IMAGE_PIXELS} pixels)")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a corrupt EXIF block must not take the request down
        warnings.warn(f"{name}: ignoring unreadable EXIF orientation ({e})", stacklevel=2)
    return _to_rgb(img)


# ---------------------------------------------------------------------------------------------------
# Image processor (§C.6): resize to a square, uint8 rounding, x/255, no normalisation by default
# ---------------------------------------------------------------------------------------------------

# PIL resample ids -> torchvision InterpolationMode names, as transformers' pil_torch_interpolation_mapping.
_RESAMPLE = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class ImageProcessor:
    """Bit-for-bit the transformers 5.24 `SiglipImageProcessor` (torchvision backend) that Gemma 3n
    checkpoints name: RGB uint8 -> `torchvision.transforms.v2.functional.resize` (antialias) ->
    `* rescale_factor` (-> float32 in [0, 1]) -> optional mean/std normalisation (off for Gemma 3n)."""

    def __init__(
        self,
        size: int | tuple[int, int] = 768,
        resample: int = 2,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        image_seq_length: int = 256,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if resample not in _RESAMPLE:
            raise ConfigError(f"image processor: unsupported resample {resample!r} (expected one of 0..5)")
        self.resample = resample
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.image_seq_length = image_seq_length

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessor:
        """From a `preprocessor_config.json`-style dict (unknown keys ignored; null means default)."""
        kw: dict[str, Any] = {}
        size = d.get("size")
        if isinstance(size, Mapping):
            if "height" in size and "width" in size:
                kw["size"] = (int(size["height"]), int(size["width"]))
            elif "shortest_edge" in size:
                kw["size"] = int(size["shortest_edge"])
            else:
                raise ConfigError(f"image processor: unsupported size {dict(size)!r}")
        elif isinstance(size, int):
            kw["size"] = size
        for key in (
            "resample",
            "do_resize",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_seq_length",
        ):
            if d.get(key) is not None:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            v = d.get(key)
            if v is not None:
                kw[key] = (v,) * 3 if isinstance(v, (int, float)) else v
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessor:
        """Read `preprocessor_config.json` (shared with the audio extractor) or the `image_processor`
        section of `processor_config.json`; the reference defaults when neither exists."""
        path = Path(path)
        merged: dict[str, Any] = {}
        for fname in ("preprocessor_config.json", "processor_config.json"):
            f = path / fname
            if not f.is_file():
                continue
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{f}: not valid JSON ({e})") from e
            if fname == "processor_config.json":
                if "image_seq_length" in d and "image_seq_length" not in merged:
                    merged["image_seq_length"] = d["image_seq_length"]
                d = d.get("image_processor") or {}
            for k, v in d.items():
                merged.setdefault(k, v)
        return cls.from_dict(merged)

    def preprocess_one(self, image: Any, size: tuple[int, int]) -> Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        img = load_image(image)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W] uint8
        if self.do_resize:
            mode = getattr(InterpolationMode, _RESAMPLE[self.resample])
            x = tvF.resize(x, list(size), interpolation=mode, antialias=True)
        if self.do_rescale and self.do_normalize:
            # transformers fuses the two: normalize(x, mean / factor, std / factor)
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return tvF.normalize(x.to(torch.float32), mean.tolist(), std.tolist())
        if self.do_rescale:
            return x * self.rescale_factor  # uint8 * python float -> float32, as in transformers
        x = x.to(torch.float32)
        return tvF.normalize(x, list(self.image_mean), list(self.image_std)) if self.do_normalize else x

    def __call__(self, images: Sequence[Any], size: int | None = None) -> Tensor:
        """images -> pixel_values [N, 3, H, W] float32. `size` overrides the square side
        (256 / 512 / 768 are the resolutions MobileNet-V5 was trained for)."""
        if isinstance(images, (str, bytes, Path, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            raise InputError("no images given")
        if size is not None:
            if not isinstance(size, int) or size < 32:
                raise InputError(f"--image-size must be an integer >= 32, got {size!r}")
            hw = (size, size)
        else:
            hw = self.size
        return torch.stack([self.preprocess_one(im, hw) for im in images])


# ---------------------------------------------------------------------------------------------------
# MobileNet-V5 tower (§C.1-C.5), channels-last: activations are [B, H, W, C] so every 1x1 conv is a
# plain GEMM over the last dim and every RMSNorm2d is a last-dim norm.
# ---------------------------------------------------------------------------------------------------


def _act_name(mod: nn.Module, where: str) -> str | None:
    """The block's activation as a `fused.ACTS` name ("gelu" for the exact GELU, which has no
    fused form)."""
    if isinstance(mod, nn.Identity):
        return None
    if isinstance(mod, nn.GELU):  # timm >= 1.0.17: tanh approximation everywhere (§C.1)
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
    asymmetric padding (⌊p/2⌋ before, the rest after), exactly as timm's Conv2dSame (§C.2)."""

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
    """MobileAttention with multi-query attention (§C.2): x + γ·MQA(RMSNorm(x)).

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
    """Multi-Scale Fusion Adapter (§C.4): nearest-upsample the coarser maps, concat, 1x1 FFN,
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
    expected = {"timm_model." + k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} != expected {expected[k]}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {title}: " + ", ".join("model.vision_tower." + i for i in items))
        raise CheckpointError("vision tower weights do not match vision_config: " + "; ".join(parts))


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


# ---------------------------------------------------------------------------------------------------
# Video (optional extra: PyAV)
# ---------------------------------------------------------------------------------------------------


def sample_video_frames(path: str | Path, fps: float = 1.0, max_frames: int = 32) -> list[tuple[float, Any]]:
    """Decode `path` and keep frames at `fps` (seconds apart = 1/fps), at most `max_frames`; when the
    clip is longer than max_frames/fps the sampling interval is stretched to cover it evenly.
    Returns [(timestamp_seconds, RGB PIL image)] in order."""
    name = f"video file {path}"
    if fps <= 0 or max_frames < 1:
        raise InputError(f"{name}: --fps must be > 0 and the frame budget >= 1 (got fps={fps}, max={max_frames})")
    try:
        import av
    except ImportError as e:
        raise InputError(f"{name}: video input needs PyAV: pip install 'gemma3n[video]'") from e
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{name}: no such file")
    try:
        container = av.open(str(p))
    except Exception as e:  # av.error.* (InvalidDataError, ...) derive from OSError / ValueError
        raise InputError(f"{name}: not a readable video ({e})") from e
    with container:
        if not container.streams.video:
            raise InputError(f"{name}: the file has no video stream")
        stream = container.streams.video[0]
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # av.time_base (microseconds)
        step = 1.0 / fps
        if duration and duration > 0 and duration / step > max_frames:
            step = duration / max_frames
        frames: list[tuple[float, Any]] = []
        next_t = 0.0
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    t = len(frames) * step
                if t + 1e-6 < next_t:
                    continue
                frames.append((round(float(t), 3), frame.to_image().convert("RGB")))
                if len(frames) >= max_frames:
                    break
                while next_t <= t + 1e-6:
                    next_t += step
        except Exception as e:
            if not frames:
                raise InputError(f"{name}: cannot decode video frames ({e})") from e
    if not frames:
        raise InputError(f"{name}: no decodable video frames")
    return frames


def video_message_parts(path: str | Path, fps: float = 1.0, max_frames: int = 32) -> list[dict]:
    """A video as chat content parts: each sampled frame is an image preceded by its timestamp,
    e.g. [{"type": "text", "text": "Frame 00:01:"}, {"type": "image", "image": <PIL>}, ...]."""
    parts: list[dict] = []
    for t, frame in sample_video_frames(path, fps, max_frames):
        minutes, seconds = divmod(int(t), 60)
        parts.append({"type": "text", "text": f"Frame {minutes:02d}:{seconds:02d}:"})
        parts.append({"type": "image", "image": frame})
    return parts
