"""Weight-only int8 / int4 quantization of the text decoder (issue #9).

Schemes (weights only; activations stay in the compute dtype):
- int8: symmetric, one bf16 scale per output channel (row): W ≈ q · s[n], q ∈ [-127, 127].
- int4: asymmetric, group-wise along the input axis (group 32/64/128), a bf16 (scale, zero)
  pair per group: W ≈ (q - 8) · s + z, q ∈ [0, 15] (the convention of PyTorch's int4 CPU kernel).

Which modules: every text-decoder linear layer and the main embedding / tied LM head, and the
per-layer embedding (PLE) table, except names matching `keep` (norms, AltUp incl. its router
and stream projections; towers are never touched). Tensors too small for the kernels' layout
stay in high precision. Quantization is a module swap chosen by a predicate and recorded in
config.json (`"quantization"`), in the style of mlx-lm / gpt-fast.

Kernels (measured on the 2-core AVX2 development machine, [1,2048] x [8192,2048], 1 thread):
fp32 F.linear 4.0 ms, bf16 4.4 ms, `torch._weight_int8pack_mm` (bf16 activations) 1.9 ms,
`torch._weight_int4pack_mm_for_cpu` 3.5 ms (its AVX2 path is compute bound); both kernels are
10-20x slower with fp32 / fp16 activations, so the quantized path casts activations to bf16.
2 threads are slower than 1 on the shared box. torchao (not installed) wraps the same kernels.

E2B shapes (30 layers, 2.42 B weights read per token, bench/bench_quantize.py, 1 thread, shared
machine; wall / CPU-time tok/s, peak RSS incl. ~0.5 GB interpreter): bf16 1.30 / 1.96 tok/s,
6.0 GB; int8 checkpoint 3.26 / 3.33, 3.36 GB (mapped, zero copy); int4-g64 checkpoint
2.51 / 2.54, 2.53 GB. The AVX2 kernels, not bandwidth, bound int8 / int4 decode here.

Checkpoint layout (portable; the int4 kernel's own packing depends on the CPU's ISA, so it is
built at load time): `<name>.qweight` int8 [N, K] or uint8 [N, K/2] (low nibble = even input
column), `<name>.scales` bf16 [N] (int8) or [N, K/g, 2] (int4 scale, zero). Row-wise layouts
mean a gathered embedding row dequantizes alone.

MatFormer widths: gate/up slices are row (output) prefixes, valid for both schemes. down_proj
[D, I] is sliced on its *input* axis; a column prefix of an int8 per-row weight is an exact
prefix of its dequantized weight (same scales), and int4 groups run along the input axis, so
any width that is a multiple of the group is a prefix too. The kernels need contiguous weights,
so down_proj is kept as column blocks of DOWN_BLOCK (2048: every Mix-n-Match width is a multiple)
and a width runs the blocks it covers; a width inside a block falls back to slicing it (int8) or
is refused (int4).
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, InputError

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
DOWN_BLOCK = 2048
# int8: up to this many rows use the int8 kernel; a larger batch (prefill) converts the int8
# weight to fp32 in a scratch buffer and scales the output per channel (prefill is FLOP bound).
KERNEL_ROWS = 16
FORMAT_VERSION = 1
_KDTYPE = torch.bfloat16  # the kernels' activation / scale dtype


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
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    q = d.get("quantization") if isinstance(d, dict) else None
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


# --- the int4 kernel's (ISA-dependent) packing ------------------------------------------
_PACK_ROWS: list[int] = []


def pack_rows() -> int:
    """Rows per independent block of `_convert_weight_to_int4pack_for_cpu` on this CPU (a row
    slice or gather of the packed weight must be whole blocks). Probed once."""
    if not _PACK_ROWS:
        codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        full = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        for b in (16, 32, 64, 128):
            if all(
                torch.equal(
                    full[i : i + b], torch._convert_weight_to_int4pack_for_cpu(codes[i : i + b].contiguous(), 1)
                )
                for i in range(0, 128, b)
            ):
                _PACK_ROWS.append(b)
                break
        else:
            _PACK_ROWS.append(128)
    return _PACK_ROWS[0]


def kernel_pack(packed: torch.Tensor, chunk_rows: int = 8192, drop_source: bool = False) -> torch.Tensor:
    """Portable nibbles [N, K/2] -> the CPU kernel's layout, in row chunks (bounded scratch).
    `drop_source`: release each chunk's mapped file pages once packed (peak RSS at load)."""
    n = packed.shape[0]
    out = torch.empty_like(packed)
    step = max(pack_rows(), chunk_rows - chunk_rows % pack_rows())
    for i in range(0, n, step):
        src = packed[i : i + step]
        out[i : i + step] = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(src).to(torch.int32), 1)
        if drop_source and src.is_contiguous():
            _drop_pages(src)
    return out


# --- the quantized weight: what text.linear multiplies ----------------------------------
@dataclass
class _Block:
    k0: int
    k1: int
    data: torch.Tensor  # int8 [N, kb] or kernel-packed uint8 [N, kb/2]
    sz: torch.Tensor | None = None  # int4: bf16 [kb/g, N, 2] (the kernel's layout)


@dataclass
class QWeight:
    """A quantized [N, K] weight standing in for a tensor in `text.linear(x, w)`. Row slices
    (`w[:width]`, `w[a:b]`), column prefixes (`w[:, :width]`) and row gathers
    (`w.index_select(0, rows)`) give views (or small copies) the kernels can run."""

    bits: int
    group_size: int | None
    shape: tuple[int, int]
    blocks: list[_Block]
    scale: torch.Tensor | None = None  # int8: bf16 [N]
    # The dtype it reports. `text.linear(x, w)` calls `F.linear(x, w)` when w.dtype == x.dtype,
    # which `__torch_function__` routes to `matmul`: loading sets it to the compute dtype (the
    # embedding's full weight reports the stored dtype instead: it defines `decoder.dtype`).
    dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32  # what its slices report
    _sz_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) >= 2 and not isinstance(args[1], torch.Tensor) and args[2:] in ((), (None,)):
            return args[1].matmul(args[0])
        raise TypeError(f"{func} is not supported on a quantized weight (only F.linear / text.linear)")

    @property
    def device(self) -> torch.device:
        return self.blocks[0].data.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        extra = self.scale.numel() * 2 if self.scale is not None else 0
        return extra + sum(b.data.numel() + (b.sz.numel() * 2 if b.sz is not None else 0) for b in self.blocks)

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def size(self, i: int | None = None):
        return self.shape if i is None else self.shape[i]

    # slicing ---------------------------------------------------------------------------
    def __getitem__(self, idx) -> QWeight:
        if isinstance(idx, tuple):
            rows, cols = (idx + (slice(None),))[:2]
            out = self._rows(rows)
            return out._cols(cols)
        return self._rows(idx)

    def _rows(self, s: slice) -> QWeight:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("QWeight supports contiguous row slices only")
        a, b, _ = s.indices(self.shape[0])
        if (a, b) == (0, self.shape[0]):
            return self
        if self.bits == 4 and (a % pack_rows() or (b % pack_rows() and b != self.shape[0])):
            raise InputError(f"int4 weight rows {a}:{b} are not whole blocks of {pack_rows()} rows")
        key = ("rows", a, b)
        if key not in self._sz_cache:  # int4 scale slices must be contiguous: cache one per slice
            blocks = [
                _Block(x.k0, x.k1, x.data[a:b], None if x.sz is None else x.sz[:, a:b].contiguous())
                for x in self.blocks
            ]
            scale = None if self.scale is None else self.scale[a:b]
            self._sz_cache[key] = self._like((b - a, self.shape[1]), blocks, scale)
        return self._sz_cache[key]

    def _cols(self, s: slice) -> QWeight:
        if not isinstance(s, slice) or s.start not in (None, 0) or s.step not in (None, 1):
            raise TypeError("QWeight supports column prefixes only")
        width = min(s.stop if s.stop is not None else self.shape[1], self.shape[1])
        if width == self.shape[1]:
            return self
        blocks = []
        for x in self.blocks:
            if x.k1 <= width:
                blocks.append(x)
            elif x.k0 < width:  # the width cuts this block
                if self.bits == 4:
                    raise InputError(
                        f"an int4 FFN width must be a multiple of {x.k1 - x.k0} here (got {width}); "
                        "use an int8 model or a Mix-n-Match width (multiples of 2048)"
                    )
                blocks.append(_Block(x.k0, width, x.data[:, : width - x.k0].contiguous()))
        return self._like((self.shape[0], width), blocks, self.scale)

    def index_select(self, dim: int, rows: torch.Tensor) -> QWeight | _Gathered:
        """Row gather (the sparse decode's fired `up_proj` units). int4 rows live in packed
        blocks, so the blocks holding them are gathered and the wanted outputs picked after."""
        assert dim == 0
        if self.bits == 8:
            blocks = [_Block(x.k0, x.k1, x.data.index_select(0, rows)) for x in self.blocks]
            return self._like((rows.numel(), self.shape[1]), blocks, self.scale.index_select(0, rows))
        b = pack_rows()
        if self.shape[0] % b:
            return _Gathered(self, rows, torch.arange(self.shape[0]))
        which = torch.unique(rows // b)
        full_rows = (which[:, None] * b + torch.arange(b)).reshape(-1)
        blocks = []
        for x in self.blocks:
            data = x.data.view(-1, b, x.data.shape[1]).index_select(0, which).view(-1, x.data.shape[1])
            blocks.append(_Block(x.k0, x.k1, data, x.sz.index_select(1, full_rows)))
        sub = self._like((full_rows.numel(), self.shape[1]), blocks, None)
        return _Gathered(sub, rows, full_rows)

    def _like(self, shape, blocks, scale) -> QWeight:
        c = self.compute_dtype
        return QWeight(self.bits, self.group_size, shape, blocks, scale, dtype=c, compute_dtype=c)

    # maths -----------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ in x's dtype. x [..., K]."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        out = None
        for blk in self.blocks:
            xs = x2[:, blk.k0 : blk.k1] if (blk.k0, blk.k1) != (0, k) else x2
            if self.bits == 8:
                if m <= KERNEL_ROWS:
                    y = torch._weight_int8pack_mm(xs.to(_KDTYPE).contiguous(), blk.data, self.scale)
                else:
                    y = F.linear(xs.float(), _as_float(blk.data))
            else:
                y = torch._weight_int4pack_mm_for_cpu(xs.to(_KDTYPE).contiguous(), blk.data, self.group_size, blk.sz)
            y = y.float()
            out = y if out is None else out.add_(y)
        if self.bits == 8 and m > KERNEL_ROWS:
            out.mul_(self.scale.float())
        return out.to(x.dtype).view(*lead, self.shape[0])

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] (reference / tests; for int4 via the kernel on an identity, exact in fp32 sums)."""
        cols = []
        for blk in self.blocks:
            if self.bits == 8:
                cols.append(blk.data.float() * self.scale.float()[:, None])
            else:
                eye = torch.eye(blk.k1 - blk.k0, dtype=_KDTYPE)
                cols.append(torch._weight_int4pack_mm_for_cpu(eye, blk.data, self.group_size, blk.sz).float().t())
        return torch.cat(cols, 1)


_scratch: list[torch.Tensor] = []


def _as_float(q: torch.Tensor) -> torch.Tensor:
    """int8 codes as fp32 in a reused scratch buffer (a fresh allocation per call page-faults)."""
    if not _scratch or _scratch[0].numel() < q.numel():
        _scratch[:] = [torch.empty(q.numel(), dtype=torch.float32)]
    return _scratch[0][: q.numel()].view(q.shape).copy_(q)


@dataclass
class _Gathered:
    """int4 row gather: a block-aligned QWeight plus which of its rows were asked for."""

    sub: QWeight
    rows: torch.Tensor
    full_rows: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.sub.dtype

    __torch_function__ = QWeight.__torch_function__

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sub.matmul(x)
        pos = torch.searchsorted(self.full_rows, self.rows)
        return y.index_select(-1, pos)


def make_qweight(
    bits: int,
    group: int | None,
    q: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype,
    col_block: int | None = None,
    mapped: bool = False,
) -> QWeight:
    """Runtime weight from the portable layout (int8 tensors used as is, zero copy when one block)."""
    n = q.shape[0]
    k = q.shape[1] * (2 if bits == 4 else 1)
    bounds = [(0, k)]
    if col_block and k > col_block and k % col_block == 0:
        bounds = [(a, a + col_block) for a in range(0, k, col_block)]
    blocks = []
    for a, b in bounds:
        if bits == 8:
            data = q if (a, b) == (0, k) else q[:, a:b].contiguous()
            blocks.append(_Block(a, b, data))
        else:
            data = kernel_pack(q[:, a // 2 : b // 2] if (a, b) != (0, k) else q, drop_source=mapped)
            sz = scales[:, a // group : b // group].transpose(0, 1).contiguous().to(_KDTYPE)
            blocks.append(_Block(a, b, data, sz))
    scale = scales.to(_KDTYPE).contiguous() if bits == 8 else None
    return QWeight(bits, group, (n, k), blocks, scale, dtype=dtype, compute_dtype=dtype)


# --- modules swapped in ------------------------------------------------------------------
class QLinear(nn.Module):
    """A bias-free linear layer whose weight is a QWeight (text.linear dispatches on it)."""

    def __init__(self, weight: QWeight):
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.matmul(x)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.weight.bits}, group={self.weight.group_size}"
        )


class QEmbedding(nn.Module):
    """The main embedding (and, through `weight`, the tied LM head): rows dequantize alone."""

    def __init__(self, weight: QWeight, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.rows = QRows(q, scales, weight.bits, weight.dtype)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[ids]


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


# --- the predicate ----------------------------------------------------------------------
def _fits(bits: int, group: int | None, n: int, k: int) -> bool:
    if bits == 8:
        return True
    return k % group == 0 and n % 16 == 0 and k % 2 == 0


def plan_modules(decoder: nn.Module, qc: QuantConfig) -> dict[str, tuple[int, int]]:
    """Names (relative to the decoder) of the weights to quantize -> their [N, K] shape."""
    from .text import Linear

    out = {}
    for name, mod in decoder.named_modules():
        if isinstance(mod, Linear) and not qc.keeps(name):
            n, k = mod.weight.shape
            if _fits(qc.bits, qc.group_size, n, k):
                out[name] = (n, k)
        elif name == "embed_tokens" and qc.embeddings and not qc.keeps(name):
            n, k = mod.weight.shape
            if _fits(qc.bits, qc.group_size, n, k):
                out[name] = (n, k)
    return out


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _drop_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the (copy-on-write, unmodified) file pages of a mapped source tensor
    once a repacked copy exists, so they do not stay in the resident set."""
    try:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = 4096
        start = t.data_ptr() // page * page
        end = t.data_ptr() + t.numel() * t.element_size()
        libc.madvise(start, (end - start) // page * page, 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def _from_tensor(w: torch.Tensor, qc: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if qc.bits == 8:
        return quantize_int8(w)
    return quantize_int4(w, qc.group_size)


def install(decoder: nn.Module, ckpt, qc: QuantConfig, stored: bool, prefix: str) -> set[str]:
    """Swap the planned modules of a (meta-built) decoder for quantized ones, reading either the
    stored quantized tensors (`stored`) or the checkpoint's weights quantized now. Returns the
    state-dict names now covered (so the loader does not expect them)."""
    covered = set()
    dtype = _hp_dtype(ckpt, prefix)
    for name, (n, k) in plan_modules(decoder, qc).items():
        base = prefix + name
        if stored:
            if base + ".qweight" not in ckpt:
                continue  # kept in high precision when quantized: the plain weight is there
            q, s = ckpt.tensor(base + ".qweight"), ckpt.tensor(base + ".scales")
            want_q = (n, k) if qc.bits == 8 else (n, k // 2)
            if tuple(q.shape) != want_q:
                raise CheckpointError(f"{ckpt.path}: {base}.qweight has shape {list(q.shape)}, expected {list(want_q)}")
        else:
            src = ckpt.tensor(base + ".weight")
            q, s = _chunked(src, lambda c: _from_tensor(c, qc))
            _drop_pages(src)
        col_block = DOWN_BLOCK if name.endswith("mlp.down_proj") else None
        weight = make_qweight(qc.bits, qc.group_size, q, s, dtype, col_block, mapped=stored)
        if stored and (qc.bits == 4 or col_block):  # repacked / copied: the mapped source is not used
            _drop_pages(q)
            if qc.bits == 4:
                _drop_pages(s)
        if name == "embed_tokens":
            _set_module(decoder, name, QEmbedding(weight, q, s))
        else:
            _set_module(decoder, name, QLinear(weight))
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
        raise InputError(f"quantized weights ({qc.name}) run on the CPU only (PyTorch's CPU kernels); use --device cpu")
    return qc, stored is not None


def finish(decoder: nn.Module, compute_dtype: torch.dtype) -> None:
    """After the compute dtype is chosen: quantized weights report it, so `text.linear` hands
    them to F.linear (and so to their kernels) instead of converting them."""
    for mod in decoder.modules():
        if isinstance(mod, (QLinear, QEmbedding)):
            mod.weight.compute_dtype = compute_dtype
            mod.weight._sz_cache.clear()
            if isinstance(mod, QLinear):
                mod.weight.dtype = compute_dtype


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


def quant_bytes(decoder: nn.Module) -> int:
    """Bytes of the quantized weights (for reports)."""
    return sum(m.weight.nbytes() for m in decoder.modules() if isinstance(m, (QLinear, QEmbedding)))


def bandwidth_bytes_per_token(n_params: int, bits: int, group: int | None) -> float:
    per = 1.0 if bits == 8 else 0.5 + 4.0 / group
    return math.ceil(n_params * per)
