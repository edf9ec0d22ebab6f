"""Weight-only int8 / int4 quantization of the text decoder.

Schemes (weights only; activations stay in the compute dtype):
- int8: symmetric, one bf16 scale per output channel (row): W ≈ q · s[n], q ∈ [-127, 127].
- int4: asymmetric, group-wise along the input axis (group 32/64/128), a bf16 (scale, zero)
  pair per group: W ≈ (q - 8) · s + z, q ∈ [0, 15].

Which modules: every text-decoder linear layer and the main embedding / tied LM head, and the
per-layer embedding (PLE) table, except names matching `keep` (norms, AltUp incl. its router
and stream projections; towers are never touched). A weight the scheme cannot take (int4: an
input width that is not a whole number of groups) stays in high precision, and the user is
told which. Quantization is a module swap chosen by a predicate and recorded in config.json
(`"quantization"`), in the style of mlx-lm / gpt-fast.

Checkpoint layout, which is also the runtime layout (used as read, no repacking at load; on
a CPU copied with the other core weights into resident memory, placement.make_resident):
`<name>.qweight` int8 [N, K] or uint8 [N, K/2] (low nibble = even input column),
`<name>.scales` bf16 [N] (int8) or [N, K/g, 2] (int4 scale, zero). Row-wise layouts mean a
gathered embedding row dequantizes alone, and every view the decoder takes is a strided view:
MatFormer gate/up widths are row prefixes, down_proj widths column prefixes (exact prefixes of
the dequantized weight: int8 scales are per row, int4 groups run along the input axis, so an
int4 width must be a multiple of the group), the sparse decode's fired rows an index list.

Products (`qmatmul`): up to layers.DECODE_ROWS activation rows stream the codes once through
the native kernels (kernels/decode.cpp), or without them through PyTorch's int8 / int4 CPU
kernels within their preconditions (see `_torch_decode`); a prefill dequantizes blocks of rows
into scratch and multiplies in the machine's GEMM dtype (hardware.py).
"""

from __future__ import annotations

import ctypes
import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import read_json_file
from .errors import CheckpointError, ConfigError, InputError
from .hardware import gemm_dtype
from .layers import DECODE_ROWS, Linear, as_dtype, converted, scratch
from .memory import drop_pages

DEFAULT_KEEP = (
    "*norm*",
    "*altup*",
    "*correct_output_scale*",
    "audio_tower*",
    "vision_tower*",
    "embed_audio*",
    "embed_vision*",
)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 64
FORMAT_VERSION = 1


# --- scheme ------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int | None = None  # int4 only (int8 is per output channel)
    embeddings: bool = True  # main embedding and the tied LM head
    per_layer_embeddings: bool = True  # the PLE table (offline quantization only)
    keep: tuple[str, ...] = DEFAULT_KEEP

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise InputError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise InputError(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.bits == 8 and self.group_size is not None:
            raise InputError("int8 is per output channel: pass no group size")

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    @classmethod
    def parse(cls, spec, group_size: int | None = None) -> QuantConfig:
        """'int8', 'int4', 'int4-64' / 'int4:64', 4, 8, a dict (config.json form) or a QuantConfig."""
        if isinstance(spec, QuantConfig):
            return spec
        if isinstance(spec, dict):
            return cls.from_json(spec, where="quantize=")
        text = str(spec).lower().strip()
        for sep in (":", "-g", "-", "g"):
            if text.startswith("int4") and sep in text[4:]:
                text, g = text[:4], text[4:].split(sep, 1)[1]
                try:
                    group_size = int(g)
                except ValueError:
                    raise InputError(f"bad int4 group size in {spec!r}") from None
                break
        bits = {"int8": 8, "8": 8, "int4": 4, "4": 4}.get(text)
        if bits is None:
            raise InputError(f"unknown quantization {spec!r}; use int8, int4 or int4:GROUP (32, 64, 128)")
        if bits == 4:
            group_size = group_size or DEFAULT_GROUP
        return cls(bits=bits, group_size=group_size if bits == 4 else None)

    def to_json(self) -> dict:
        return {
            "quant_method": "gemma3n-weight-only",
            "format_version": FORMAT_VERSION,
            "bits": self.bits,
            "group_size": self.group_size,
            "scheme": "symmetric per-output-channel" if self.bits == 8 else "asymmetric group-wise (input axis)",
            "quantized": ["text decoder linear layers"]
            + (["embed_tokens (tied lm_head)"] if self.embeddings else [])
            + (["embed_tokens_per_layer (row-wise)"] if self.per_layer_embeddings else []),
            "keep_high_precision": list(self.keep),
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> QuantConfig:
        try:
            if d.get("quant_method", "gemma3n-weight-only") != "gemma3n-weight-only":
                raise ConfigError(f"{where}: quantization.quant_method {d['quant_method']!r} is not supported")
            if int(d.get("format_version", 1)) > FORMAT_VERSION:
                raise ConfigError(
                    f"{where}: quantization.format_version {d['format_version']} is newer than this runtime"
                )
            return cls(
                bits=int(d["bits"]),
                group_size=d.get("group_size"),
                embeddings="embed_tokens (tied lm_head)" in d.get("quantized", ["embed_tokens (tied lm_head)"]),
                per_layer_embeddings=any("per_layer" in s for s in d.get("quantized", ["per_layer"])),
                keep=tuple(d.get("keep_high_precision", DEFAULT_KEEP)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed 'quantization' section ({e})") from None
        except InputError as e:
            raise ConfigError(f"{where}: {e}") from None

    def keeps(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pat) for pat in self.keep)


def stored_config(path: Path) -> QuantConfig | None:
    """The scheme recorded in a checkpoint's config.json, or None for a high-precision one."""
    file = Path(path) / "config.json"
    q = read_json_file(file).get("quantization")  # ConfigError, as load_config for the same file
    return QuantConfig.from_json(q, where=str(file)) if isinstance(q, dict) else None


# --- quantize / dequantize (reference maths, also used offline) --------------------------
def quantize_int8(w: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one bf16 scale per row (or per `group` columns of a row): q [N, K], s [N] / [N, K/g]."""
    n, k = w.shape
    wf = w.float().view(n, k // group, group) if group else w.float()
    amax = wf.abs().amax(-1)
    scale = (amax / 127.0).clamp(min=1e-12).to(torch.bfloat16)  # q uses the rounded scale
    s = scale.float().unsqueeze(-1)
    q = torch.round(wf / s).clamp(-127, 127).to(torch.int8)
    return q.view(n, k), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = 1 if scale.dim() == 1 else scale.shape[-1]
    return (q.float().view(n, groups, k // groups) * scale.float().view(n, groups, 1)).view(n, k)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 by groups of `group` input columns: packed uint8 [N, K/2] (low nibble =
    even column) and bf16 (scale, zero) [N, K/g, 2], W ≈ (q - 8)·scale + zero."""
    n, k = w.shape
    if k % group:
        raise InputError(f"int4: {k} input columns are not a multiple of the group size {group}")
    wf = w.float().view(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(torch.bfloat16).float()
    zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
    q = torch.round((wf - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8.0).clamp(0, 15).to(torch.uint8).view(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), torch.stack([scale, zero], -1).to(torch.bfloat16)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K]."""
    return torch.stack([packed & 15, packed >> 4], -1).view(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    n, groups = sz.shape[0], sz.shape[1]
    q = unpack_int4(packed).float().view(n, groups, -1)
    return ((q - 8.0) * sz[..., 0:1].float() + sz[..., 1:2].float()).view(n, -1)


# --- the quantized weight and its products ------------------------------------------------
@dataclass(frozen=True)
class QTensor:
    """A quantized [N, K] weight in the portable layout the checkpoint stores (used as read):
    `q` int8 [N, K] or uint8 [N, K/2], `scales` bf16 [N] or [N, K/g, 2]. `view` gives row /
    column prefixes as strided views of the same memory."""

    bits: int
    group: int | None
    q: torch.Tensor
    scales: torch.Tensor
    # PyTorch's int4 kernel's repacked copies, per view (only without the native kernels)
    repacked: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()

    def view(self, rows: int | None = None, cols: int | None = None) -> QTensor:
        q, s = self.q, self.scales
        n, k = self.shape
        if cols is not None and cols != k:
            if self.bits == 4:
                if cols % self.group:
                    raise InputError(f"an int4 width must be a multiple of its group size {self.group}, got {cols}")
                q, s = q[:, : cols // 2], s[:, : cols // self.group]
            else:
                q = q[:, :cols]
        if rows is not None and rows != n:
            q, s = q[:rows], s[:rows]
        return QTensor(self.bits, self.group, q, s)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: the reference the kernels are tested against."""
        if self.bits == 8:
            return dequantize_int8(self.q, self.scales)
        return dequantize_int4(self.q, self.scales)


Rows = int | torch.Tensor | None


def qmatmul(x: torch.Tensor, w: QTensor, rows: Rows = None, cols: int | None = None) -> torch.Tensor:
    """x @ view(w)ᵀ in x's dtype, with the views of layers.Linear (a row prefix or index tensor,
    a column prefix). Decode-sized x streams the codes once (native kernels, else PyTorch's
    under their preconditions); a prefill dequantizes row blocks into scratch and multiplies
    in the machine's GEMM dtype."""
    prefix = rows if isinstance(rows, int) else None
    wv = w.view(prefix, cols)
    idx = rows if isinstance(rows, torch.Tensor) else None
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= DECODE_ROWS:
        native = kernels.loaded()
        if native is not None:
            if wv.bits == 8:
                y = native.linear_int8(x2, wv.q, wv.scales, idx, 0)
            else:
                y = native.linear_int4(x2, wv.q, wv.scales, wv.group, idx, 0)
        else:
            y = _torch_decode(x2, wv, idx, w.repacked, (prefix, cols))
    else:
        y = _prefill(x2, wv if idx is None else _gathered(wv, idx))
    return as_dtype(y, x.dtype).view(*lead, y.shape[-1])


def _gathered(w: QTensor, idx: torch.Tensor) -> QTensor:
    return QTensor(w.bits, w.group, w.q.index_select(0, idx), w.scales.index_select(0, idx))


# Row blocks of a prefill's dequantized weight: bounded scratch (the LM head is 262k rows).
PREFILL_BLOCK_ELEMS = 1 << 24


def _prefill(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    n, k = w.shape
    dtype = gemm_dtype(x.device, torch.bfloat16)
    xg = x.to(dtype)
    step = max(1, PREFILL_BLOCK_ELEMS // max(1, k))
    parts = [_prefill_block(xg, _row_range(w, i, min(n, i + step)), dtype) for i in range(0, n, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _row_range(w: QTensor, a: int, b: int) -> QTensor:
    return QTensor(w.bits, w.group, w.q[a:b], w.scales[a:b])


def _prefill_block(x: torch.Tensor, w: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """x (in the GEMM dtype) times one row block, dequantized into a reused scratch buffer (by
    the native kernels when built: one pass, no fp32 temporaries). int8 codes convert exactly
    (|q| <= 127 fits bf16's 8 significant bits), and the per-row scale multiplies the output
    instead of every weight."""
    native = kernels.loaded()
    if native is not None:
        out = scratch(w.shape, dtype)
        if w.bits == 8:
            native.dequantize_int8(w.q, out)
        else:
            native.dequantize_int4(w.q, w.scales, w.group, out)
    else:
        out = converted(w.q if w.bits == 8 else dequantize_int4(w.q, w.scales), dtype)
    y = F.linear(x, out).float()
    return y.mul_(w.scales.float()) if w.bits == 8 else y


# --- PyTorch's kernels: the path without a compiler ---------------------------------------
# `torch._weight_int8pack_mm` reads garbage when K is not a multiple of 16 on AVX-512 and
# crashes (SIGSEGV) when the weight is not 16-byte aligned and x has 4+ rows; it also needs a
# contiguous weight. `torch._weight_int4pack_mm_for_cpu` needs the weight repacked into an
# ISA-dependent layout with N a multiple of 16. Outside these preconditions: dequantize.
INT8_KERNEL_K = 16
INT8_KERNEL_ALIGN = 64
INT4_KERNEL_N = 16


def _int8_kernel_ok(q: torch.Tensor) -> bool:
    return q.is_contiguous() and q.shape[1] % INT8_KERNEL_K == 0 and q.data_ptr() % INT8_KERNEL_ALIGN == 0


def _torch_decode(x: torch.Tensor, w: QTensor, idx: torch.Tensor | None, repacked: dict, key: tuple) -> torch.Tensor:
    if w.bits == 8:
        if idx is not None:
            w = _gathered(w, idx)  # a fresh (aligned, contiguous) copy of the fired rows
        if not _int8_kernel_ok(w.q):
            return _prefill(x, w)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), w.q, w.scales.to(torch.bfloat16)).float()
    n = w.shape[0]
    if n % INT4_KERNEL_N:
        return _prefill(x, w if idx is None else _gathered(w, idx))
    if key not in repacked:  # once per view of the weight (PyTorch's layout is ISA-specific)
        codes = unpack_int4(w.q.contiguous()).to(torch.int32)
        repacked[key] = torch._convert_weight_to_int4pack_for_cpu(codes, 1), w.scales.transpose(0, 1).contiguous()
    packed, sz = repacked[key]
    y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, w.group, sz).float()
    return y if idx is None else y.index_select(-1, idx)


# --- modules swapped in ---------------------------------------------------------------------
class QLinear(nn.Module):
    """A bias-free linear layer over a QTensor, with layers.Linear's views (`rows`, `cols`)."""

    def __init__(self, weight: QTensor):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor, rows: Rows = None, cols: int | None = None) -> torch.Tensor:
        return qmatmul(x, self.weight, rows, cols)

    def extra_repr(self) -> str:
        w = self.weight
        return f"in={self.in_features}, out={self.out_features}, bits={w.bits}, group={w.group}"


class QEmbedding(nn.Module):
    """The main embedding (rows dequantize alone) and, through `as_linear`, the tied LM head."""

    def __init__(self, weight: QTensor, dtype: torch.dtype):
        super().__init__()
        self.weight = weight
        self.rows = QRows(weight.q, weight.scales, weight.bits, dtype)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[ids]

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return qmatmul(x, self.weight)


class QRows:
    """A row-wise quantized table (portable layout) that gathers and dequantizes rows: stands in
    for the host-mapped PLE table (`table[ids]`, `.shape`, `.device`)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype):
        self.q, self.scales, self.bits, self.dtype = q, scales, bits, dtype
        self.shape = torch.Size((q.shape[0], q.shape[1] * (2 if bits == 4 else 1)))
        self.device = q.device

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        q, s = self.q.index_select(0, flat), self.scales.index_select(0, flat)
        rows = dequantize_int8(q, s) if self.bits == 8 else dequantize_int4(q, s)
        return rows.view(*ids.shape, self.shape[1])

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def element_size(self) -> float:
        return (self.q.numel() * self.q.element_size() + self.scales.numel() * 2) / self.numel()


def self_check(decoder: nn.Module) -> list[str]:
    """Run each quantized layer's decode path on its own shapes (the first rows of its weight,
    one and three activation rows) against the dequantized weight. A native kernel that
    disagrees is switched off for the process, so the PyTorch path (or dequantization) runs
    instead; the returned lines say what failed. About a millisecond per distinct shape."""
    problems: list[str] = []
    seen: set[tuple] = set()
    gen = torch.Generator().manual_seed(0)
    for name, mod in decoder.named_modules():
        if not isinstance(mod, (QLinear, QEmbedding)):
            continue
        w = mod.weight
        key = (w.bits, w.group, w.shape[1], w.q.stride(0), w.q.data_ptr() % INT8_KERNEL_ALIGN)
        if key in seen:
            continue
        seen.add(key)
        part = w.view(min(w.shape[0], 32), None)
        ref_w = part.dequantize()
        for m in (1, 3):
            x = torch.randn(m, w.shape[1], generator=gen)
            got, ref = qmatmul(x, part), x @ ref_w.t()
            if not bool(torch.isfinite(got).all()) or (got - ref).abs().max() > 1e-3 * (ref.abs().max() + 1e-6):
                problems.append(
                    f"{name}: the {'native' if kernels.loaded() else 'PyTorch'} int{w.bits} kernel "
                    f"is off by {(got - ref).abs().max():.3g} on [{m}, {w.shape[1]}]"
                )
                if kernels.loaded() is not None:
                    kernels.disable("it failed the load-time check on this CPU")
                break
    return problems


# --- the predicate ----------------------------------------------------------------------
def unfit_reason(bits: int, group: int | None, n: int, k: int) -> str | None:
    """Why a [N, K] weight cannot take the scheme (None if it can): int8 fits any shape; int4
    groups run along the input axis, so K must be a whole number of groups."""
    if bits == 4 and k % group:
        return f"{k} input columns are not a multiple of the int4 group size {group}"
    return None


def _candidates(decoder: nn.Module, qc: QuantConfig):
    for name, mod in decoder.named_modules():
        if isinstance(mod, Linear) and not qc.keeps(name):
            yield name, tuple(mod.weight.shape)
        elif name == "embed_tokens" and qc.embeddings and not qc.keeps(name):
            yield name, tuple(mod.weight.shape)


def plan_modules(decoder: nn.Module, qc: QuantConfig) -> dict[str, tuple[int, int]]:
    """Names (relative to the decoder) of the weights to quantize -> their [N, K] shape."""
    return {
        name: shape for name, shape in _candidates(decoder, qc) if unfit_reason(qc.bits, qc.group_size, *shape) is None
    }


def unfit_modules(decoder: nn.Module, qc: QuantConfig) -> dict[str, str]:
    """Weights the scheme would cover but that stay in high precision -> why (reported, not fatal)."""
    out = {}
    for name, shape in _candidates(decoder, qc):
        why = unfit_reason(qc.bits, qc.group_size, *shape)
        if why is not None:
            out[name] = why
    return out


def describe_unfit(unfit: dict[str, str], qc: QuantConfig) -> str:
    """One line for the user: which weights stay in high precision under `qc`, and why (several
    layers' same weight for the same reason grouped as `layers.*.NAME xN`)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, why in unfit.items():
        groups.setdefault((re.sub(r"^layers\.\d+\.", "layers.*.", name), why), []).append(name)
    parts = [
        f"{pattern} x{len(names)} ({why})" if len(names) > 1 else f"{names[0]} ({why})"
        for (pattern, why), names in sorted(groups.items())
    ]
    return f"{len(unfit)} weight(s) kept in high precision under {qc.name}: " + "; ".join(parts)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _from_tensor(w: torch.Tensor, qc: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if qc.bits == 8:
        return quantize_int8(w)
    return quantize_int4(w, qc.group_size)


def install(decoder: nn.Module, ckpt, qc: QuantConfig, stored: bool, prefix: str) -> set[str]:
    """Swap the planned modules of a (meta-built) decoder for quantized ones, over either the
    stored quantized tensors (`stored`: memory-mapped, used in place) or the checkpoint's
    weights quantized now. Returns the state-dict names now covered (so the loader does not
    expect them). Weights the scheme cannot take stay in high precision, with a warning."""
    covered = set()
    dtype = _hp_dtype(ckpt, prefix)
    unfit = unfit_modules(decoder, qc)
    if unfit and not stored:
        warnings.warn(describe_unfit(unfit, qc), stacklevel=2)
    for name, (n, k) in plan_modules(decoder, qc).items():
        base = prefix + name
        if stored:
            if base + ".qweight" not in ckpt:
                continue  # kept in high precision when quantized: the plain weight is there
            q, s = ckpt.tensor(base + ".qweight"), ckpt.tensor(base + ".scales")
            want_q = (n, k) if qc.bits == 8 else (n, k // 2)
            want_s = (n,) if qc.bits == 8 else (n, k // qc.group_size, 2)
            if tuple(q.shape) != want_q or tuple(s.shape) != want_s:
                raise CheckpointError(
                    f"{ckpt.path}: {base}.qweight / .scales have shapes {list(q.shape)} / {list(s.shape)}, "
                    f"expected {list(want_q)} / {list(want_s)}"
                )
            if q.dtype != (torch.int8 if qc.bits == 8 else torch.uint8) or s.dtype != torch.bfloat16:
                raise CheckpointError(f"{ckpt.path}: {base}.qweight / .scales have dtypes {q.dtype} / {s.dtype}")
        else:
            src = ckpt.tensor(base + ".weight")
            q, s = _chunked(src, lambda c: _from_tensor(c, qc))
            drop_pages(src)
        weight = QTensor(qc.bits, qc.group_size, q, s)
        _set_module(decoder, name, QEmbedding(weight, dtype) if name == "embed_tokens" else QLinear(weight))
        covered.add(name + ".weight")
    _trim_heap()
    return covered


def _trim_heap() -> None:
    """Return the quantization temporaries' freed heap to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve(ckpt, quantize, device: torch.device) -> tuple[QuantConfig | None, bool]:
    """(scheme, stored): the checkpoint's recorded scheme, else the one asked for at load."""
    stored = stored_config(ckpt.path)
    asked = QuantConfig.parse(quantize) if quantize not in (None, "", "none") else None
    if stored is not None and asked is not None and asked.name != stored.name:
        raise InputError(f"{ckpt.path} is already quantized ({stored.name}); cannot load it as {asked.name}")
    qc = stored or asked
    if qc is not None and device.type != "cpu":
        raise InputError(f"quantized weights ({qc.name}) run on the CPU only; use --device cpu")
    return qc, stored is not None


def _hp_dtype(ckpt, prefix: str) -> torch.dtype:
    for name in (prefix + "norm.weight", prefix + "layers.0.input_layernorm.weight"):
        if name in ckpt:
            return ckpt.dtype(name)
    return torch.bfloat16


def ple_table(ckpt, prefix: str, qc: QuantConfig | None):
    """The host-side PLE table of a quantized checkpoint (QRows over the mapped tensors), or None."""
    base = prefix + "embed_tokens_per_layer"
    if qc is None or base + ".qweight" not in ckpt:
        return None
    return QRows(ckpt.tensor(base + ".qweight"), ckpt.tensor(base + ".scales"), qc.bits, _hp_dtype(ckpt, prefix))


def stored_names(ckpt, prefix: str) -> dict[str, tuple[int, ...]]:
    """The quantized tensors' names (relative to prefix), which the strict coverage check ignores."""
    return {
        n[len(prefix) :]: ckpt.shape(n)
        for n in ckpt.names()
        if n.startswith(prefix) and n.endswith((".qweight", ".scales"))
    }


def _chunked(w: torch.Tensor, fn, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a big row-wise tensor in row chunks written into preallocated outputs (bounded
    fp32 scratch, no concatenation copy: the LM head alone is 0.5-1 GB quantized)."""
    if w.shape[0] <= rows:
        return fn(w)
    q0, s0 = fn(w[:rows])
    q = torch.empty((w.shape[0], *q0.shape[1:]), dtype=q0.dtype)
    s = torch.empty((w.shape[0], *s0.shape[1:]), dtype=s0.dtype)
    q[:rows], s[:rows] = q0, s0
    for i in range(rows, w.shape[0], rows):
        q[i : i + rows], s[i : i + rows] = fn(w[i : i + rows])
    return q, s
