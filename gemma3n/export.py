"""Checkpoint writers: the streamed MatFormer slice export and the offline quantized copy.

- `export_slice()`: writes an ordinary Gemma 3n checkpoint for a Mix-n-Match slice, streaming
  tensor by tensor in row chunks (matformer.py owns the specs it takes).
- `quantize_checkpoint()`: writes a weight-only int8 / int4 copy (quantize.py owns the scheme).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, InputError
from .matformer import (
    CHUNK_BYTES,
    MAX_SHARD_BYTES,
    Preset,
    SliceSpec,
    _match_preset,
    effective_params,
    find_declared,
    format_ffn,
    format_params,
    format_skip,
    read_declared_sizes,
    resolve_size,
    sliced_fields,
    sliced_text_config,
)
from .quantize import (
    QuantConfig,
    _chunked,
    _from_tensor,
    plan_modules,
    quantize_int4,
    quantize_int8,
    stored_config,
)

# --------------------------------------------------------------------------------------------
# Streamed export
# --------------------------------------------------------------------------------------------

_ST_DTYPE = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# Files of a checkpoint directory that the export rewrites instead of copying.
_NOT_COPIED = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.gguf|\.msgpack|\.h5)$"
    r"|^(config\.json|README\.md|matformer_sizes\.json)$"  # a slice's sizes are not its parent's
)


@dataclass
class _Job:
    """One output tensor: rows `row_ranges` of the source, and within each row the element
    ranges `col_ranges` (None = whole row). Only 2-D tensors get column ranges."""

    out_name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    src_path: Path
    src_offset: int  # absolute byte offset of the source tensor in its file
    src_row_bytes: int
    itemsize: int
    row_ranges: list[tuple[int, int]]
    col_ranges: list[tuple[int, int]] | None = None

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for s in self.shape:
            n *= s
        return n


def _ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _plan(ckpt: Any, spec: SliceSpec) -> list[_Job]:
    text = ckpt.config.text
    n = text.num_hidden_layers
    p = text.hidden_size_per_layer_input
    prefix = ckpt.text_prefix
    new_index = {old: new for new, old in enumerate(spec.layers)}
    width = dict(zip(spec.layers, spec.ffn_widths))
    layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)$")
    jobs: list[_Job] = []
    for f in ckpt.files:
        # data section start = 8-byte header length + header (safetensors format)
        with open(f.path, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
        for name, (dtype, shape, begin, _end) in f.entries.items():
            itemsize = dtype.itemsize
            st_dtype = _ST_DTYPE[str(dtype).removeprefix("torch.")]
            rows = shape[0] if shape else 1
            row_elems = 1
            for s in shape[1:]:
                row_elems *= s
            job = _Job(name, st_dtype, tuple(shape), f.path, start + begin, row_elems * itemsize, itemsize, [])
            job.row_ranges = [(0, rows)]
            m = layer_re.match(name)

            def expect(cond: bool, what: str, name: str = name, shape: tuple = shape) -> None:
                if not cond:
                    raise CheckpointError(f"{ckpt.path}: tensor '{name}' has shape {list(shape)}; {what}")

            if m:
                old = int(m.group(1))
                rest = m.group(2)
                if old >= n:
                    raise CheckpointError(f"{ckpt.path}: tensor '{name}' is for layer {old} of a {n}-layer model")
                if old not in new_index:
                    continue  # skipped layer: all its tensors go (§2.2)
                job.out_name = f"{prefix}layers.{new_index[old]}.{rest}"
                w = width[old]
                if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                    expect(len(shape) == 2 and shape[0] == text.intermediate_size[old], "expected [I, D]")
                    job.row_ranges = [(0, w)]  # prefix rows (§1 nesting)
                    job.shape = (w, shape[1])
                elif rest == "mlp.down_proj.weight":
                    expect(len(shape) == 2 and shape[1] == text.intermediate_size[old], "expected [D, I]")
                    job.col_ranges = [(0, w)]
                    job.shape = (shape[0], w)
            elif name == f"{prefix}embed_tokens_per_layer.weight":
                # [Vp, L*P] viewed as [Vp, L, P]: keep the kept layers' column groups (§2.4)
                expect(len(shape) == 2 and shape[1] == n * p, f"expected [Vp, {n}*{p}]")
                job.col_ranges = _ranges([i * p + k for i in spec.layers for k in range(p)])
                job.shape = (shape[0], len(spec.layers) * p)
            elif name == f"{prefix}per_layer_model_projection.weight":
                # [L*P, D] viewed as [L, P, D]: keep the kept layers' row groups (§2.4)
                expect(len(shape) == 2 and shape[0] == n * p, f"expected [{n}*{p}, D]")
                job.row_ranges = _ranges([i * p + k for i in spec.layers for k in range(p)])
                job.shape = (len(spec.layers) * p, shape[1])
            jobs.append(job)
    return jobs


def _stream(job: _Job, src_fd: int, out: Any, bar: Any) -> None:
    """Copy one tensor in row chunks of <= CHUNK_BYTES (no whole-tensor buffer)."""
    import numpy as np

    rows_per_chunk = max(1, CHUNK_BYTES // max(1, job.src_row_bytes))
    byte_cols = None
    if job.col_ranges is not None:
        byte_cols = [(a * job.itemsize, b * job.itemsize) for a, b in job.col_ranges]
    for a, b in job.row_ranges:
        for r0 in range(a, b, rows_per_chunk):
            r1 = min(b, r0 + rows_per_chunk)
            size = (r1 - r0) * job.src_row_bytes
            data = os.pread(src_fd, size, job.src_offset + r0 * job.src_row_bytes)
            if len(data) != size:
                raise CheckpointError(f"{job.src_path}: truncated while reading '{job.out_name}'")
            if byte_cols is not None:
                arr = np.frombuffer(data, dtype=np.uint8).reshape(r1 - r0, job.src_row_bytes)
                if len(byte_cols) == 1:
                    s, e = byte_cols[0]
                    data = np.ascontiguousarray(arr[:, s:e]).data
                else:
                    data = np.concatenate([arr[:, s:e] for s, e in byte_cols], axis=1).data
            out.write(data)
            bar.update(len(data))


def _write_shard(path: Path, jobs: list[_Job], fds: dict[Path, int], bar: Any) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.out_name] = {
            "dtype": job.dtype,
            "shape": list(job.shape),
            "data_offsets": [offset, offset + job.nbytes],
        }
        offset += job.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for job in jobs:
            before = out.tell()
            _stream(job, fds[job.src_path], out, bar)
            if out.tell() - before != job.nbytes:  # a planning bug, never a user error
                raise RuntimeError(f"wrote {out.tell() - before} bytes for {job.out_name}, expected {job.nbytes}")


def _model_card(src: Any, spec: SliceSpec, text: Any, new_text: Any, preset: Preset | None) -> str:
    n = text.num_hidden_layers
    skip = spec.skipped(n)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [gemma3n, matformer, mix-n-match]",
        "---",
        "",
        f"# Gemma 3n Mix-n-Match slice: {spec.name}",
        "",
        f"Sliced from `{src}` with `gemma3n slice` (MatFormer: kept layers with a prefix of each FFN).",
        "Use is subject to the license of the parent model (Gemma Terms of Use).",
        "",
        "| | |",
        "| --- | --- |",
        f"| Slice | {spec.name}" + (f" (table row: {preset.table_name})" if preset else "") + " |",
        f"| Layers | {len(spec.layers)} of {n}" + (f", skipped {format_skip(skip)}" if skip else "") + " |",
        f"| FFN widths | {format_ffn(spec.ffn_widths)} |",
        f"| Effective params | {format_params(effective_params(new_text))} "
        f"(parent {format_params(effective_params(text))}) |",
    ]
    if preset:
        lines.append(f"| MMLU PT (official table) | {preset.mmlu_pt:.1f} % |")
    lines += ["", "| layer | original layer | type | FFN width |", "| --- | --- | --- | --- |"]
    for j, (i, w) in enumerate(zip(spec.layers, spec.ffn_widths)):
        lines.append(f"| {j} | {i} | {text.layer_types[i]} | {w} |")
    return "\n".join(lines) + "\n"


def _dir_is_empty(path: Path) -> bool:
    return not any(path.iterdir())


def export_slice(
    src: str | Path,
    spec: SliceSpec | str | dict | None,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the slice `spec` of checkpoint `src` to `out_dir` as an ordinary Gemma 3n checkpoint.

    Streams tensor by tensor in row chunks (peak memory ~2 x CHUNK_BYTES). Everything is written
    to a hidden temp dir next to `out_dir` and renamed into place at the end, so an interrupted
    export never leaves a complete-looking checkpoint. Refuses a non-empty `out_dir` unless `force`.
    """
    from tqdm.auto import tqdm

    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    text = ckpt.config.text
    declared = read_declared_sizes(ckpt.path, text)
    resolved = resolve_size(spec, text, declared)
    preset = None
    if isinstance(spec, str) and find_declared(spec, declared) is None:
        preset = _match_preset(spec)  # the table row, for the model card
    if resolved is None:  # the full model: an identity slice (a plain copy)
        resolved = SliceSpec("full", tuple(range(text.num_hidden_layers)), tuple(text.intermediate_size))
    spec = resolved
    new_text = sliced_text_config(text, spec)

    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        if out.resolve() == Path(ckpt.path).resolve():
            raise InputError(f"--out {out} is the source checkpoint; choose another directory")
        if not force and not _dir_is_empty(out):
            raise InputError(f"--out {out} is not empty; pass --force to replace its contents")
    out.parent.mkdir(parents=True, exist_ok=True)

    jobs = _plan(ckpt, spec)
    shards: list[list[_Job]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    total = sum(j.nbytes for j in jobs)
    free = shutil.disk_usage(out.parent).free
    if free < total:
        raise InputError(
            f"--out {out}: the slice needs {total / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free there"
        )

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    fds: dict[Path, int] = {}
    try:
        for f in ckpt.files:
            fds[f.path] = os.open(f.path, os.O_RDONLY)
        weight_map: dict[str, str] = {}
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"slice {spec.name}",
            disable=not progress,
        ) as bar:
            for k, shard in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(tmp / fname, shard, fds, bar)
                weight_map.update({job.out_name: fname for job in shard})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for item in sorted(Path(ckpt.path).iterdir()):
            if item.is_file() and not _NOT_COPIED.search(item.name):
                shutil.copy2(item, tmp / item.name)  # tokenizer, processor, chat template, generation config
        (tmp / "README.md").write_text(_model_card(src, spec, text, new_text, preset))
        raw = json.loads(json.dumps(ckpt.config.raw))  # deep copy; every other field is kept
        target = raw if raw.get("model_type") == "gemma3n_text" else raw.setdefault("text_config", {})
        target.update(sliced_fields(text, spec))
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")  # written last
        for fd in fds.values():
            os.close(fd)
        fds.clear()
        if out.exists():
            if _dir_is_empty(out):
                out.rmdir()
            else:  # --force: swap, then remove the old contents
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, trash / "old")
                os.rename(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
                return out
        os.rename(tmp, out)
        return out
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# Quantized copy
# --------------------------------------------------------------------------------------------


def quantize_checkpoint(model: str | Path, out: str | Path, qc: QuantConfig, log=print) -> Path:
    """Write a quantized copy of `model` to `out`: quantized tensors (portable layout), everything
    else as stored, config.json with a `quantization` section, tokenizer and other files copied."""
    from safetensors.torch import save_file

    from .checkpoint import open_checkpoint
    from .text import TextDecoder

    ckpt = open_checkpoint(model)
    if stored_config(ckpt.path) is not None:
        raise InputError(f"{ckpt.path} is already quantized")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    prefix = ckpt.text_prefix
    with torch.device("meta"):
        decoder = TextDecoder(ckpt.config.text)
    planned = {prefix + n for n in plan_modules(decoder, qc)}
    ple = prefix + "embed_tokens_per_layer"
    if qc.per_layer_embeddings:
        planned.add(ple)
    p = ckpt.config.text.hidden_size_per_layer_input
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    shard_bytes, shard_no, files = 0, 0, []

    def flush():
        nonlocal shard, shard_bytes, shard_no
        if not shard:
            return
        shard_no += 1
        fname = f"model-{shard_no:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
        files.append(fname)
        shard, shard_bytes = {}, 0

    def add(name: str, t: torch.Tensor):
        nonlocal shard_bytes
        shard[name] = t.contiguous()
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes > 2 * 2**30:
            flush()

    done = 0
    for name in ckpt.names():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base in planned:
            w = ckpt.tensor(name)
            if base == ple:  # row-wise: int8 one scale per (row, layer) group; int4 by groups
                if qc.bits == 8:
                    q, s = quantize_int8_rows_chunked(w, group=p)
                else:
                    q, s = _chunked(w, lambda c: quantize_int4(c, qc.group_size))
            else:
                q, s = _chunked(w, lambda c: _from_tensor(c, qc))
            add(base + ".qweight", q)
            add(base + ".scales", s)
            done += 1
        else:
            add(name, ckpt.tensor(name))
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = json.loads((ckpt.path / "config.json").read_text(encoding="utf-8"))
    config["quantization"] = qc.to_json()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in ckpt.path.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy2(f, out / f.name)
    log(f"quantized {done} tensors ({qc.name}) -> {out} ({len(files)} shard(s))")
    return out


def quantize_int8_rows_chunked(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _chunked(w, lambda c: quantize_int8(c, group=group))
