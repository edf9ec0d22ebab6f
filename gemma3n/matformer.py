"""MatFormer: Mix-n-Match slice specs, effective parameters, elastic views.

Gemma 3n E4B nests smaller models (docs/matformer.md#what-is-nested): a sub-model keeps a subset of
the layers and, in each kept layer, a prefix of the FFN (`gate_proj[:w]`, `up_proj[:w]`,
`down_proj[:, :w]`). A slice is *data*: the official Mix-n-Match table ships in
`gemma3n/data/mix-n-match-configs.csv` and is parsed at run time.

- `SliceSpec`: which original layers are kept and one FFN width per kept layer.
- `presets()`, `resolve_size()`, `parse_ffn()`, `parse_skip()`: from names / dicts / CLI text to a
  validated spec.
- `read_declared_sizes()`: the sizes a checkpoint declares for itself in `matformer_sizes.json`
  (`{"sizes": {"NAME": {"ffn": [...], "skip": [...]}}}`), for models the official table (written for
  E4B's 35 layers) does not fit, e.g. the embedded tiny model. Declared names take precedence.
- `sliced_text_config()`: the config of the sub-model (docs/matformer.md#sliced-config). The decoder
  builds its per-size layer plan from it, and the exporter writes it, so an elastic view equals an
  exported slice.
- `effective_params()`: Google's "effective parameters" (docs/matformer.md#effective-parameters).
The streamed slice export (`export_slice()`) lives in export.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .config import TextConfig, read_json_file
from .errors import CheckpointError, InputError

TABLE_FILE = "mix-n-match-configs.csv"
# A checkpoint's own Mix-n-Match sizes (optional): {"sizes": {"NAME": {"ffn": [...], "skip": [...]}}}.
SIZES_FILE = "matformer_sizes.json"
# Gemma 3n trained its FFNs at two granularities, 4x and 8x the hidden size (8192 and 16384 for
# D=2048, docs/matformer.md#what-is-nested); any other width is allowed but its quality is unknown.
TRAINED_FFN_MULTIPLES = (4, 8)


# --------------------------------------------------------------------------------------------
# Specs and presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceSpec:
    """A sub-model: the ORIGINAL indices of the kept layers (ascending) and one FFN width each.

    Equality and hashing ignore `name`, so the same slice reached by a preset name or a dict
    is the same key (e.g. for per-size KV caches).
    """

    name: str = field(compare=False)
    layers: tuple[int, ...]
    ffn_widths: tuple[int, ...]

    def skipped(self, num_layers: int) -> tuple[int, ...]:
        """Original indices of the layers this slice drops from a `num_layers`-layer parent."""
        kept = set(self.layers)
        return tuple(i for i in range(num_layers) if i not in kept)

    def describe(self, num_layers: int) -> str:
        """Compact CLI form, e.g. `ffn=8192x30 skip=20-24`."""
        skip = self.skipped(num_layers)
        text = f"ffn={format_ffn(self.ffn_widths)}"
        return text + (f" skip={format_skip(skip)}" if skip else "")


@dataclass(frozen=True)
class Preset:
    """One row of the official Mix-n-Match table (docs/matformer.md#the-official-table)."""

    name: str  # short canonical name: E4B, E2B, E1.96B-layer, E2.49B-block, ...
    table_name: str  # the row's `name` as written in the table
    aliases: tuple[str, ...]
    num_layers: int  # kept layers
    effective_params_b: float  # the table's "# Effective Params (B)"
    mmlu_pt: float  # the table's "MMLU PT accuracy", in percent
    ffn_widths: tuple[int, ...]  # one per kept layer
    skipped: tuple[int, ...]  # original indices
    parent_layers: int  # the parent the row is written for (35: E4B)

    @property
    def spec(self) -> SliceSpec:
        skip = set(self.skipped)
        layers = tuple(i for i in range(self.parent_layers) if i not in skip)
        return SliceSpec(self.name, layers, self.ffn_widths)


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "", name.strip().lower())


_ROW_NAME = re.compile(r"^Config for (E[\d.]+B) \((layer|block)-level\)$")
_FFN_ITEM = re.compile(r"^\s*([\d_]+)\s*(?:\*\s*([\d_]+))?\s*$")


def _parse_table_widths(text: str, row: str) -> tuple[int, ...]:
    """`[2_048 * 4, 2_048 * 8, ...]`: each item a product (the table's spelling) or an int."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError(f"{TABLE_FILE} row {row!r}: FFN Hidden Dims is not a [list]: {text[:40]!r}")
    widths = []
    for item in body[1:-1].split(","):
        m = _FFN_ITEM.match(item)
        if not m:
            raise ValueError(f"{TABLE_FILE} row {row!r}: cannot read FFN width {item!r}")
        widths.append(int(m.group(1)) * (int(m.group(2)) if m.group(2) else 1))
    return tuple(widths)


def _parse_table_skip(text: str) -> tuple[int, ...]:
    body = text.strip().strip("[]").strip()
    return tuple(int(x) for x in body.split(",")) if body else ()


@lru_cache(maxsize=1)
def _load_presets() -> tuple[Preset, ...]:
    text = resources.files("gemma3n").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    parsed = []
    for row in rows:
        table_name = row["name"].strip()
        widths = _parse_table_widths(row["FFN Hidden Dims"], table_name)
        skipped = _parse_table_skip(row.get("Layers Skipped") or "")
        n_layers = int(row["# Layers"])
        if len(widths) != n_layers:
            raise ValueError(f"{TABLE_FILE} row {table_name!r}: {len(widths)} widths for {n_layers} layers")
        eff = float(row["# Effective Params (B)"])
        mmlu = float(row["MMLU PT accuracy"].strip().rstrip("%"))
        aliases = [table_name]
        if table_name == "Main model":
            short = "E4B"
            aliases += ["main", "full"]
        elif "official E2B" in table_name:
            short = "E2B"
            aliases += ["official E2B"]
        else:
            m = _ROW_NAME.match(table_name)
            if not m:
                raise ValueError(f"{TABLE_FILE}: unexpected row name {table_name!r}")
            size, kind = m.groups()
            short = f"{size}-{kind}"
            aliases += [f"{size} ({kind}-level)", f"{size}-{kind}-level", f"E{eff:.2f}B-{kind}"]
        parsed.append((short, table_name, aliases, n_layers, eff, mmlu, widths, skipped))
    # A bare size ("E2.54B") is an alias only where it names one row (E2.98B has two).
    bare: dict[str, list[str]] = {}
    for short, *_ in parsed:
        bare.setdefault(short.split("-")[0], []).append(short)
    out = []
    for short, table_name, aliases, n_layers, eff, mmlu, widths, skipped in parsed:
        b = short.split("-")[0]
        if b != short and len(bare[b]) == 1:
            aliases.append(b)
        uniq = tuple(dict.fromkeys(a for a in aliases if a != short))
        out.append(Preset(short, table_name, uniq, n_layers, eff, mmlu, widths, skipped, n_layers + len(skipped)))
    return tuple(out)


def presets() -> list[Preset]:
    """The official Mix-n-Match table, parsed from the packaged CSV."""
    return list(_load_presets())


def _match_preset(name: str) -> Preset | None:
    key = _norm(name)
    for p in _load_presets():
        if key == _norm(p.name) or any(key == _norm(a) for a in p.aliases):
            return p
    return None


def find_preset(name: str, declared: Mapping[str, Any] | None = None) -> Preset:
    """A preset by its name, the table's row name or an alias (case and spaces ignored).

    `declared` (a checkpoint's own sizes) only adds their names to the "unknown size" message."""
    p = _match_preset(name)
    if p is not None:
        return p
    key = _norm(name)
    ambiguous = [p.name for p in _load_presets() if _norm(p.name).split("-")[0] == key]
    if ambiguous:
        raise InputError(f"size {name!r} is ambiguous: it could be {' or '.join(ambiguous)}")
    names = ", ".join(p.name for p in _load_presets())
    own = f"this checkpoint's sizes ({SIZES_FILE}) are {', '.join(declared)}; " if declared else ""
    raise InputError(
        f"unknown size {name!r}: {own}presets are {names} (see `gemma3n slice --list`), or give a custom "
        "spec as {'ffn': [...], 'skip': [...]}"
    )


def find_declared(name: str, declared: Mapping[str, Any] | None) -> str | None:
    """The declared size name that `name` matches (case and spaces ignored), or None."""
    key = _norm(name)
    return next((d for d in declared or {} if _norm(d) == key), None)


# --------------------------------------------------------------------------------------------
# Parsing CLI text
# --------------------------------------------------------------------------------------------


def _items(text: str) -> list[str]:
    """The items of a CLI list: comma- or space-separated, optionally in brackets."""
    return [raw for raw in re.split(r"[,\s]+", str(text).strip().strip("[]")) if raw]


def parse_ffn(text: str) -> list[int]:
    """`8192x20,16384x10` (width x count) or a plain list `8192,8192,16384` -> one width per kept layer."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("--ffn is empty: give one FFN width per kept layer, e.g. 8192x20,16384x10")
    widths: list[int] = []
    for raw in _items(text):
        m = re.fullmatch(r"([\d_]+)(?:[xX]([\d_]+))?", raw)
        if not m:
            raise InputError(f"--ffn item {raw!r} is not WIDTH or WIDTHxCOUNT (e.g. 8192 or 8192x20) in {text!r}")
        width = int(m.group(1))
        count = int(m.group(2)) if m.group(2) else 1
        if width <= 0:
            raise InputError(f"--ffn width must be positive, got {width} in {text!r}")
        if count <= 0:
            raise InputError(f"--ffn repeat count must be positive, got {raw!r} in {text!r}")
        widths += [width] * count
    if not widths:
        raise InputError(f"--ffn {text!r} holds no widths")
    return widths


def parse_skip(text: str) -> list[int]:
    """`20-24`, `20-24,30`, `20,21` -> sorted original layer indices (ranges are inclusive)."""
    if text is None or not str(text).strip():
        return []
    out: set[int] = set()
    for raw in _items(text):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", raw)
        if not m:
            raise InputError(f"--skip item {raw!r} is not a layer index or range like 20-24 (in {text!r})")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise InputError(f"--skip range {raw!r} runs backwards; write {b}-{a}")
        out.update(range(a, b + 1))
    return sorted(out)


def format_ffn(widths: Sequence[int]) -> str:
    """Run-length form: [8192]*20 + [16384]*10 -> `8192x20,16384x10`."""
    parts: list[str] = []
    i = 0
    while i < len(widths):
        j = i
        while j < len(widths) and widths[j] == widths[i]:
            j += 1
        parts.append(f"{widths[i]}x{j - i}" if j - i > 1 else str(widths[i]))
        i = j
    return ",".join(parts)


def format_skip(layers: Iterable[int]) -> str:
    """[20, 21, 22, 23, 24, 30] -> `20-24,30`."""
    xs = sorted(layers)
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(f"{xs[i]}-{xs[j]}" if j > i else str(xs[i]))
        i = j + 1
    return ",".join(parts)


# --------------------------------------------------------------------------------------------
# Validation against a parent config
# --------------------------------------------------------------------------------------------


def kv_source_layers(text_config: TextConfig) -> dict[int, list[int]]:
    """{source layer: [shared layers reading its K/V]}, by `TextConfig.kv_source` (the one rule)."""
    out: dict[int, list[int]] = {}
    for layer, source in enumerate(text_config.kv_sources()):
        if source is not None:
            out.setdefault(source, []).append(layer)
    return out


def _trained_widths(text_config: TextConfig) -> set[int]:
    return {m * text_config.hidden_size for m in TRAINED_FFN_MULTIPLES}


def _declared_widths(declared: Mapping[str, Any] | None) -> frozenset[int]:
    """FFN widths a checkpoint's declared sizes use: it vouches that they were trained (the
    embedded model nests 2x hidden inside 4x, not Gemma 3n's 4x inside 8x)."""
    widths: set[int] = set()
    for entry in (declared or {}).values():
        widths.update(_as_int_list(entry.get("ffn"), "ffn") or [])
    return frozenset(widths)


def _validate(
    text_config: TextConfig,
    name: str,
    skip: Sequence[int],
    ffn: Sequence[int] | None,
    also_trained: frozenset[int] = frozenset(),
) -> SliceSpec:
    n = text_config.num_hidden_layers
    parent_w = list(text_config.intermediate_size)
    for i in skip:
        if not 0 <= i < n:
            raise InputError(f"{name}: cannot skip layer {i}: the model has {n} layers (0-{n - 1})")
    skipped = sorted(set(skip))
    kept = [i for i in range(n) if i not in set(skipped)]
    if not kept:
        raise InputError(f"{name}: skips all {n} layers; at least one layer must be kept")
    sources = kv_source_layers(text_config)
    for i in skipped:
        if i in sources:
            readers = sources[i]
            raise InputError(
                f"{name}: layer {i} cannot be skipped: it is the KV source of the shared "
                f"{text_config.layer_types[i]} layers {format_skip(readers)} (docs/matformer.md#slicing-rules)"
            )
    first_shared = n - text_config.num_kv_shared_layers
    low = [i for i in skipped if i < first_shared]
    if low:
        warnings.warn(
            f"{name}: skipping layer(s) {format_skip(low)} below the KV-shared region (first shared layer "
            f"{first_shared}) was never tested by Google; quality is unknown",
            stacklevel=3,
        )
    if ffn is None:
        widths = [parent_w[i] for i in kept]
    else:
        widths = [int(w) for w in ffn]
        if len(widths) != len(kept):
            raise InputError(
                f"{name}: the FFN list has {len(widths)} widths but {len(kept)} layers are kept "
                f"({n} layers minus {len(skipped)} skipped); give one width per kept layer, in order"
            )
    untrained = []
    trained = _trained_widths(text_config) | also_trained
    for j, (i, w) in enumerate(zip(kept, widths)):
        if w <= 0:
            raise InputError(f"{name}: FFN width of layer {i} (kept layer #{j}) must be positive, got {w}")
        if w > parent_w[i]:
            raise InputError(
                f"{name}: FFN width {w} for layer {i} (kept layer #{j}) exceeds the parent's width "
                f"{parent_w[i]}; a slice can only narrow an FFN"
            )
        if w not in trained and w != parent_w[i]:
            untrained.append((i, w))
    if untrained:
        shown = ", ".join(f"layer {i}: {w}" for i, w in untrained[:6])
        more = f" and {len(untrained) - 6} more" if len(untrained) > 6 else ""
        warnings.warn(
            f"{name}: FFN width(s) {shown}{more} were never a trained granularity "
            f"(trained: {', '.join(str(w) for w in sorted(trained))}); quality is unknown",
            stacklevel=3,
        )
    return SliceSpec(name, tuple(kept), tuple(widths))


def _is_full(spec: SliceSpec, text_config: TextConfig) -> bool:
    n = text_config.num_hidden_layers
    return spec.layers == tuple(range(n)) and list(spec.ffn_widths) == list(text_config.intermediate_size)


def _as_int_list(value: Any, what: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_ffn(value) if what == "ffn" else parse_skip(value)
    if isinstance(value, int):
        value = [value]
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise InputError(f"size['{what}'] must be a list of integers, got {value!r}") from None
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in value):
        raise InputError(f"size['{what}'] must be a list of integers, got {value!r}")
    return out


def resolve_size(size: Any, text_config: TextConfig, declared: Mapping[str, Any] | None = None) -> SliceSpec | None:
    """A validated slice of `text_config`, or None for the full model.

    `size` is None (full model), a name the checkpoint declares in `declared` (see
    `read_declared_sizes`; these take precedence), a preset name or alias (`"E2B"`, `"E2.54B-layer"`), a dict
    `{"ffn": [...], "skip": [...]}` (either key optional: no ffn = the parent's widths of the kept
    layers, no skip = keep all; each may also be CLI text such as "8192x30" / "20-24"), the same as
    one string `"ffn=8192x30 skip=20-24"`, or a `SliceSpec`. A spec equal to the whole parent resolves to None.
    Raises InputError with the reason; warns (UserWarning) for widths never trained.
    """
    if size is None:
        return None
    n = text_config.num_hidden_layers
    if isinstance(size, SliceSpec):
        if list(size.layers) != sorted(set(size.layers)):
            raise InputError(f"{size.name}: layers must be ascending and unique, got {list(size.layers)}")
        outside = [i for i in size.layers if not 0 <= i < n]
        if outside:
            raise InputError(f"{size.name}: layer(s) {outside} do not exist (the model has {n} layers)")
        spec = _validate(text_config, size.name, size.skipped(n), size.ffn_widths, _declared_widths(declared))
    elif isinstance(size, str) and (name := find_declared(size, declared)) is not None:
        with warnings.catch_warnings():  # the checkpoint vouches for its own sizes
            warnings.simplefilter("ignore")
            return resolve_size({**declared[name], "name": name}, text_config)
    elif isinstance(size, str) and "=" in size:  # compact text: "ffn=8192x30 skip=20-24"
        parts = dict(re.findall(r"(\w+)=(\S+)", size))
        if not parts or set(parts) - {"ffn", "skip"} or re.sub(r"(\w+)=(\S+)", "", size).strip(" ;"):
            raise InputError(f"size {size!r}: write custom sizes as 'ffn=8192x30 skip=20-24'")
        return resolve_size(parts, text_config, declared)
    elif isinstance(size, str):
        p = find_preset(size, declared)
        widths = list(text_config.intermediate_size)
        if n == len(p.ffn_widths) and widths == list(p.ffn_widths) and n != p.parent_layers:
            return None  # the checkpoint already is this size (e.g. "E2B" on an E2B checkpoint)
        if p.parent_layers != n:
            raise InputError(
                f"preset {p.name!r} is defined for a {p.parent_layers}-layer parent (E4B) but this model "
                f"has {n} layers; use a custom slice instead (--ffn/--skip, or {{'ffn': [...], 'skip': [...]}})"
            )
        bad = [(i, w) for i, w in zip(p.spec.layers, p.ffn_widths) if w > widths[i]]
        if bad:
            i, w = bad[0]
            raise InputError(
                f"preset {p.name!r} needs FFN width {w} at layer {i} but this model's is {widths[i]}: "
                "the preset is defined for E4B (16384-wide FFNs)"
            )
        spec = _validate(text_config, p.name, p.skipped, p.ffn_widths)
    elif isinstance(size, dict):
        unknown = set(size) - {"ffn", "skip", "name"}
        if unknown:
            raise InputError(f"size dict has unknown key(s) {sorted(unknown)}; use 'ffn' and/or 'skip'")
        ffn = _as_int_list(size.get("ffn"), "ffn")
        skip = _as_int_list(size.get("skip"), "skip") or []
        name = size.get("name")
        if not name:
            name = "custom"
            if ffn is not None:
                name += f" ffn={format_ffn(ffn)}"
            if skip:
                name += f" skip={format_skip(skip)}"
        spec = _validate(text_config, str(name), skip, ffn, _declared_widths(declared))
    else:
        raise InputError(
            f"size must be None, a preset name, a dict {{'ffn': [...], 'skip': [...]}} or a SliceSpec; "
            f"got {type(size).__name__}"
        )
    return None if _is_full(spec, text_config) else spec


# --------------------------------------------------------------------------------------------
# Sizes a checkpoint declares for itself (matformer_sizes.json)
# --------------------------------------------------------------------------------------------

_SIZES_SHAPE = '{"sizes": {"NAME": {"ffn": [...], "skip": [...]}}}'


def read_declared_sizes(path: str | Path, text_config: TextConfig) -> dict[str, dict]:
    """The sizes checkpoint directory `path` declares in `SIZES_FILE`: {name: {"ffn": [...], "skip": [...]}}.

    An absent file declares none ({}). Each entry is what `resolve_size` accepts as a dict (ffn and/or
    skip) and must resolve against `text_config`; a malformed file or an invalid entry raises
    CheckpointError naming the file and the size.
    """
    file = Path(path) / SIZES_FILE
    raw = read_json_file(file, error=CheckpointError, shape=f"one object {_SIZES_SHAPE}")
    if not raw:
        return {}
    sizes = raw.get("sizes")
    if not isinstance(sizes, dict) or set(raw) != {"sizes"}:
        raise CheckpointError(f"{file} must hold one object {_SIZES_SHAPE}")
    out: dict[str, dict] = {}
    for name, entry in sizes.items():
        clash = find_declared(name, out)
        if clash is not None:
            raise CheckpointError(f"{file}: size names {clash!r} and {name!r} are the same (case and spaces ignored)")
        out[name] = _declared_entry(file, name, entry, text_config)
    return out


def _declared_entry(file: Path, name: str, entry: Any, text_config: TextConfig) -> dict:
    """One validated entry of a sizes file, its lists as ints."""
    where = f"{file}: size {name!r}"
    if not name.strip() or "=" in name:
        raise CheckpointError(f"{where}: a size name must be non-empty and without '='")
    if not isinstance(entry, dict) or not entry:
        raise CheckpointError(f"{where} must be an object with 'ffn' and/or 'skip', as in {_SIZES_SHAPE}")
    unknown = sorted(set(entry) - {"ffn", "skip"})
    if unknown:
        raise CheckpointError(f"{where} has unknown key(s) {unknown}; use 'ffn' and/or 'skip'")
    try:
        with warnings.catch_warnings():  # untrained-width warnings: the checkpoint vouches for its sizes
            warnings.simplefilter("ignore")
            resolve_size({**entry, "name": name}, text_config)
        return {k: _as_int_list(v, k) for k, v in entry.items()}
    except InputError as e:
        raise CheckpointError(f"{where} does not fit this model: {e}") from None


# --------------------------------------------------------------------------------------------
# Sliced config and effective parameters
# --------------------------------------------------------------------------------------------


def sliced_fields(text_config: TextConfig, spec: SliceSpec) -> dict[str, Any]:
    """The config fields a slice rewrites (docs/matformer.md#sliced-config); every per-layer list is
    filtered by the kept original indices, which also gives the sparsity rule (sparse = originally < 10)."""
    n = text_config.num_hidden_layers
    first_shared = n - text_config.num_kv_shared_layers
    layers = list(spec.layers)
    return {
        "num_hidden_layers": len(layers),
        "intermediate_size": [int(w) for w in spec.ffn_widths],
        "layer_types": [text_config.layer_types[i] for i in layers],
        "activation_sparsity_pattern": [float(text_config.activation_sparsity_pattern[i]) for i in layers],
        "num_kv_shared_layers": sum(1 for i in layers if i >= first_shared),
    }


def sliced_text_config(text_config: TextConfig, spec: SliceSpec | None) -> TextConfig:
    """The text config an exported slice has (None -> `text_config` itself)."""
    if spec is None:
        return text_config
    return dataclasses.replace(text_config, **sliced_fields(text_config, spec))


def effective_params(text_config: TextConfig) -> int:
    """Text decoder parameters minus the main embedding and the PLE table, counting the stored
    (unused) K/V weights of shared layers (docs/text-decoder.md#parameter-counts; matches the table's
    column)."""
    c = text_config
    d, p, n = c.hidden_size, c.hidden_size_per_layer_input, c.num_hidden_layers
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    a = c.altup_num_inputs
    # per_layer_model_projection + altup (un)embed projections + per_layer_projection_norm + norm
    total = n * p * d + 2 * (a - 1) * d * d + p + d
    per_layer = (
        2 * d * q  # q_proj, o_proj
        + 2 * d * kv  # k_proj, v_proj (stored even for shared layers)
        + 2 * c.head_dim  # q_norm, k_norm
        + 4 * d  # input / post_attention / pre_feedforward / post_feedforward norms
        + 2 * d * c.laurel_rank
        + d  # LAuReL
        + 2 * p * d
        + d  # per_layer_input_gate, per_layer_projection, post_per_layer_input_norm
        + d
        + a * a
        + a * a * a
        + a * d
        + d  # AltUp: output scale, correction, prediction, router, router norm
    )
    total += n * per_layer + sum(3 * d * int(w) for w in c.intermediate_size)
    return total


def format_params(n: int, digits: int = 2) -> str:
    """A parameter count for people: `1.91 B`, or `1.69 M` below 0.1 B (small models)."""
    return f"{n / 1e9:.{digits}f} B" if n >= 1e8 else f"{n / 1e6:.{digits}f} M"


def fitting_presets(text_config: TextConfig) -> list[Preset]:
    """The official presets that resolve on `text_config` (all of them on E4B, none on a small model)."""
    out = []
    for p in _load_presets():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resolve_size(p.name, text_config)
        except InputError:
            continue
        out.append(p)
    return out
