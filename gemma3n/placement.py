"""Where each tensor lives. Core weights go to the compute device (on a CPU: copied once from
the file mapping into a huge-page buffer, `make_resident`); the per-layer embedding table
(2.0-2.35 B params) stays memory-mapped on the host and is gathered per token
(docs/text-decoder.md#per-layer-embeddings). Towers are loaded only when a request needs them (multimodal.py).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import torch

from . import kernels, memory
from . import quantize as q
from .checkpoint import Checkpoint, check_coverage
from .config import machine_memory
from .errors import CheckpointError, InputError
from .hardware import choose_compute_dtype, resolve_dtype
from .quantize import QEmbedding, QLinear, QRows, QTensor
from .text import TextDecoder

__all__ = ["resolve_dtype", "resolve_device", "load_text_decoder", "placement_report"]

PLE_TABLE = "embed_tokens_per_layer.weight"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    name = str(device or "auto")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available (torch sees none)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps was requested but Metal (MPS) is not available")
    return dev


def load_text_decoder(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None, compute_dtype=None, quantize=None
) -> TextDecoder:
    """Build the decoder on the meta device, check coverage strictly, then assign mapped tensors.
    Quantization (a stored scheme, or `quantize` at load) swaps modules first (quantize.py)."""
    cfg, prefix = ckpt.config.text, ckpt.text_prefix
    qc, stored = q.resolve(ckpt, quantize, device)
    quantized_ple = q.ple_table(ckpt, prefix, qc) if stored else None
    ple = quantized_ple
    if ple is None and prefix + PLE_TABLE in ckpt:
        ple = ckpt.tensor(prefix + PLE_TABLE)  # host, mapped (its absence is reported below)
    norm = prefix + "norm.weight"  # norms are never quantized: the stored dtype
    weight_dtype = dtype or (ckpt.dtype(norm) if norm in ckpt else torch.float32)
    with torch.device("meta"):
        decoder = TextDecoder(cfg, ple, choose_compute_dtype(device, weight_dtype, compute_dtype))
    covered = q.install(decoder, ckpt, qc, stored, prefix) if qc is not None else set()
    expected = {n: tuple(t.shape) for n, t in decoder.state_dict().items()}
    expected[PLE_TABLE] = (
        cfg.vocab_size_per_layer_input,
        cfg.num_hidden_layers * cfg.hidden_size_per_layer_input,
    )
    found = {n[len(prefix) :]: ckpt.shape(n) for n in ckpt.names() if n.startswith(prefix)}
    # K/V weights of shared layers are stored but never used (docs/text-decoder.md#kv-sharing): skip them.
    unused = {
        f"layers.{i}.self_attn.{w}.weight"
        for i in range(cfg.num_hidden_layers)
        if cfg.kv_source(i) is not None
        for w in ("k_proj", "v_proj", "k_norm")
    }
    unused |= covered | (set(q.stored_names(ckpt, prefix)) if stored else set())
    if quantized_ple is not None:
        del expected[PLE_TABLE]
    check_coverage(expected, found, where=str(ckpt.path), ignore_unexpected=unused)
    if "lm_head.weight" in ckpt and not cfg.tie_word_embeddings:
        raise CheckpointError(f"{ckpt.path}: untied LM heads are not part of Gemma 3n")

    _check_fits(ckpt, expected, device, dtype)
    state = {}
    for name in expected:
        if name == PLE_TABLE:
            continue
        t = ckpt.tensor(prefix + name)
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    decoder.load_state_dict(state, strict=True, assign=True)
    decoder.requires_grad_(False)
    if device.type == "cpu":
        kernels.get(build=True, notify=_notice)  # decode products and the fused step (built once per machine)
        make_resident(decoder)
    if qc is not None:
        for problem in q.self_check(decoder):
            warnings.warn(problem, stacklevel=2)
    return decoder


def make_resident(decoder: TextDecoder) -> bool:
    """Copy the core weights (every parameter and quantized weight, not the per-layer table)
    into one huge-page buffer, releasing their mapped pages (memory.py says why: decode reads
    them ~1.5x faster there). Skipped, weights left mapped, where they would not fit in the
    memory available or GEMMA3N_MAPPED_WEIGHTS=1."""
    if os.environ.get("GEMMA3N_MAPPED_WEIGHTS") == "1":
        return False
    params = [p for p in decoder.parameters() if p.device.type == "cpu"]
    quantized = [m for m in decoder.modules() if isinstance(m, (QLinear, QEmbedding))]
    sources = [p.data for p in params] + [t for m in quantized for t in (m.weight.q, m.weight.scales)]
    need = sum(memory.nbytes(t) for t in sources)
    available = machine_memory()
    if available is not None and need > 0.8 * available[0]:
        _notice(
            f"keeping the weights memory-mapped: {need / 2**30:.1f} GiB would not fit in the "
            f"{available[0] / 2**30:.1f} GiB {available[1]} (decode reads them more slowly from the mapping)"
        )
        return False
    copies = iter(memory.resident_copies(sources))
    for p in params:
        p.data = next(copies)
    for m in quantized:
        w = m.weight
        m.weight = QTensor(w.bits, w.group, next(copies), next(copies))
        if isinstance(m, QEmbedding):
            m.rows = QRows(m.weight.q, m.weight.scales, w.bits, m.rows.dtype)
    return True


def _notice(message: str) -> None:
    print(f"gemma3n: {message}", file=sys.stderr, flush=True)


def _check_fits(ckpt: Checkpoint, expected: dict, device: torch.device, dtype: torch.dtype | None) -> None:
    """Refuse, before copying anything, a model whose core weights exceed the device's free memory."""
    if device.type != "cuda":
        return
    prefix = ckpt.text_prefix
    need = sum(
        torch.Size(shape).numel() * (dtype or ckpt.dtype(prefix + name)).itemsize
        for name, shape in expected.items()
        if name != PLE_TABLE
    )
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise InputError(
            f"the model's core weights need {need / 2**30:.2f} GiB on {device} but only {free / 2**30:.2f} GiB "
            "is free; use a smaller size (--size), a lower-precision dtype, or --device cpu"
        )


@dataclass
class PlacementReport:
    device: str
    device_params: int
    device_bytes: int
    host_params: int
    host_bytes: int

    def lines(self) -> list[str]:
        return [
            f"compute device {self.device}: {self.device_params:,} params, {self.device_bytes / 2**20:,.1f} MiB",
            f"host, memory-mapped (per-layer embeddings): {self.host_params:,} params, "
            f"{self.host_bytes / 2**20:,.1f} MiB",
        ]


def placement_report(decoder: TextDecoder) -> PlacementReport:
    params = list(decoder.parameters())
    # quantized modules hold a QTensor (not a parameter): the weights it stands for, its packed bytes
    qweights = [w for m in decoder.modules() if isinstance(w := getattr(m, "weight", None), QTensor)]
    table = decoder.embed_tokens_per_layer
    return PlacementReport(
        device=str(decoder.device),
        device_params=sum(p.numel() for p in params) + sum(w.numel() for w in qweights),
        device_bytes=sum(p.numel() * p.element_size() for p in params) + sum(w.nbytes() for w in qweights),
        host_params=table.numel() if table is not None else 0,
        host_bytes=table.numel() * table.element_size() if table is not None else 0,
    )
