"""The towers the tower benchmarks share: transformers' audio and vision towers with random weights
at the real shapes, and ours built from the same tensors stored in bf16, as the Hub's checkpoints
store them (the path users take: `gemma3n.load` of a bf16 checkpoint)."""

from __future__ import annotations

import copy
import ctypes
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gemma3n.audio_encoder import AudioEncoder
from gemma3n.vision import VisionTower


def hf_vision(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """transformers' MobileNet-V5-300M (timm) with its own random init, norm weights and layer scales
    drawn from U(0.5, 1.5) so that every block contributes to the output (the init's 1e-5 layer
    scales would make the deep blocks numerically invisible). Returns (model, vision config dict)."""
    from transformers import AutoModel, Gemma3nVisionConfig

    torch.manual_seed(seed)
    cfg = Gemma3nVisionConfig()
    model = AutoModel.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model, cfg.to_dict()


def hf_audio(layers: int = 12, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """transformers' Gemma3nAudioEncoder (real E2B/E4B shapes, `layers` conformer blocks), random init."""
    from transformers import Gemma3nAudioConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

    torch.manual_seed(seed)
    cfg = Gemma3nAudioConfig(conf_num_hidden_layers=layers)
    return Gemma3nAudioEncoder(cfg).eval(), cfg.to_dict()


def bf16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.bfloat16() for k, v in model.state_dict().items()}


def ours_vision(hf: torch.nn.Module, cfg: dict, **kw) -> VisionTower:
    """Our tower from `hf`'s weights rounded to bf16 (as checkpoints store them)."""
    return VisionTower.from_state_dict(bf16_state(hf), cfg, device="cpu", dtype=torch.bfloat16, **kw)


def ours_audio(hf: torch.nn.Module, cfg: dict, **kw) -> AudioEncoder:
    return AudioEncoder.from_state_dict(bf16_state(hf), cfg, dtype=torch.bfloat16, **kw)


def hf_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' tower with its weights rounded to bf16 (the same values ours holds), in `dtype`."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(p.bfloat16())
    return other.to(dtype)


def speechlike(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated harmonics plus noise: stands in for speech (values do not affect timing)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.1 * envelope * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def call_peak_gb(fn: Callable[[], object]) -> float | None:
    """Peak resident memory one call adds above what is resident before it (its activations and
    scratch), in GB: freed heap pages are handed back to the OS (glibc's malloc_trim) and the
    peak (VmHWM) is reset through /proc/self/clear_refs first. None where the OS offers neither."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):  # not Linux, or not glibc
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) * 1024 / 1e9


def timed(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> tuple[dict, dict, dict, dict]:
    """Each fn once as a warm-up (its activation peak measured there), then `repeats` rounds that
    call them in turn, so that all see the same load on a shared machine. Returns the best and
    the median wall time of each, its peak memory (`call_peak_gb`) and its last output."""
    outs, peaks = {}, {}
    for k, fn in fns.items():
        peaks[k] = call_peak_gb(lambda k=k, fn=fn: outs.__setitem__(k, fn()))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    return best, median, peaks, outs


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    ref = ref.float()
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def load_note() -> str:
    """The 1-minute load average and the core count, for the record of a shared machine."""
    return f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
