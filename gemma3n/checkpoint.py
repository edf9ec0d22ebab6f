"""Finding and opening a checkpoint: a local directory or a Hugging Face hub id.

Tensors are memory-mapped views of the safetensors files (copy-on-write), so nothing is read
from disk until a tensor is touched: the per-layer embedding table can stay on disk and only
the gathered rows become resident (docs/text-decoder.md#per-layer-embeddings), and towers a request does not need
are never read.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, load_config
from .errors import CheckpointError

ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The text decoder's tensors live under one of these prefixes (multimodal / text-only layout).
TEXT_PREFIXES = ("model.language_model.", "model.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.md"]


def resolve_model_path(path_or_id: str | Path) -> Path:
    """A local directory as is; a hub id through huggingface_hub (its cache, progress, HF_TOKEN)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
        return path
    name = str(path_or_id)
    if not _HUB_ID.match(name):
        raise CheckpointError(f"{name}: no such directory, and it is not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, HfHubHTTPError) as e:
        raise CheckpointError(
            f"could not download '{name}' from the Hugging Face hub ({type(e).__name__}). "
            f"On a machine with internet run `huggingface-cli download {name}` (set HF_TOKEN for gated "
            "models), then copy the Hugging Face cache (~/.cache/huggingface/hub) here or pass the "
            "downloaded directory as --model."
        ) from None


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors are zero-copy views."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = ST_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for '{name}'") from None
            numel = int(np.prod(shape)) if shape else 1
            if end - begin != numel * dtype.itemsize or self._start + end > size:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: tensor '{name}' needs bytes {begin}..{end} "
                    f"of the data section but the file has {size - self._start}"
                )
            self.entries[name] = (dtype, shape, begin, end)
        self._map: torch.Tensor | None = None

    def tensor(self, name: str) -> torch.Tensor:
        if self._map is None:  # copy-on-write map: writable for torch, never changes the file
            self._map = torch.from_numpy(np.memmap(self.path, dtype=np.uint8, mode="c"))
        dtype, shape, begin, end = self.entries[name]
        raw = self._map[self._start + begin : self._start + end]
        if (self._start + begin) % dtype.itemsize:  # misaligned (never in files we know): copy
            raw = raw.clone()
        return raw.view(dtype).view(shape)


class Checkpoint:
    """A checkpoint directory: its config and its tensors by name, all lazily mapped."""

    def __init__(self, path: Path, config: ModelConfig):
        self.path = path
        self.config = config
        self.files = _open_shards(path)
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                self._where[name] = f
        self.text_prefix = self._detect_text_prefix()

    def _detect_text_prefix(self) -> str:
        for prefix in TEXT_PREFIXES:
            if f"{prefix}embed_tokens.weight" in self._where or f"{prefix}embed_tokens.qweight" in self._where:
                return prefix  # (.qweight: a quantized checkpoint, see quantize.py)
        raise CheckpointError(
            f"{self.path}: no text embedding found (looked for "
            + " or ".join(f"'{p}embed_tokens.weight'" for p in TEXT_PREFIXES)
            + ")"
        )

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name].entries[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor '{name}' is not in the checkpoint")
        return self._where[name].tensor(name)

    def subset(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, with the prefix stripped (still lazily mapped)."""
        return {n[len(prefix) :]: self.tensor(n) for n in self._where if n.startswith(prefix)}

    def has_prefix(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self._where)


def open_checkpoint(path_or_id: str | Path) -> Checkpoint:
    path = resolve_model_path(path_or_id)
    return Checkpoint(path, load_config(path))


def check_coverage(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    where: str,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """One error listing every missing, unexpected and wrong-shape tensor (strict load)."""
    ignore = set(ignore_unexpected)
    missing = sorted(n for n in expected if n not in found)
    unexpected = sorted(n for n in found if n not in expected and n not in ignore)
    wrong = sorted(
        f"{n}: checkpoint {list(found[n])}, expected {list(s)}"
        for n, s in expected.items()
        if n in found and tuple(found[n]) != tuple(s)
    )
    if not (missing or unexpected or wrong):
        return
    lines = [f"{where} does not match the model its config describes:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    raise CheckpointError("\n".join(lines))


def _open_shards(path: Path) -> list[SafetensorsFile]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed ({e})") from None
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
    if not names:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    files = []
    for name in names:
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{index} names the shard {name}, which is missing from {path}")
        files.append(SafetensorsFile(shard))
    return files
