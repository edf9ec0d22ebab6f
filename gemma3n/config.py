"""Configuration of a Gemma 3n checkpoint (`config.json`), parsed into plain dataclasses.

Field names are the Hugging Face ones, so a dataclass round-trips to the JSON a checkpoint
ships. Both the multimodal `gemma3n` form (`text_config` / `audio_config` / `vision_config`)
and the text-only `gemma3n_text` form are accepted, with the 4.x (`rope_theta`,
`rope_local_base_freq`) and 5.x (`rope_parameters`) RoPE spellings.
Fields and their official values: docs/text-decoder.md#config-fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, Gemma3nError

LAYER_TYPES = ("sliding_attention", "full_attention")

# Multimodal token ids of the official checkpoints (docs/audio-vision.md#special-tokens); config.json wins.
_MULTIMODAL_DEFAULTS = {
    "boi_token_id": 255_999,
    "eoi_token_id": 262_144,
    "image_token_id": 262_145,
    "boa_token_id": 256_000,
    "eoa_token_id": 262_272,
    "audio_token_id": 262_273,
    "vision_soft_tokens_per_image": 256,
    "audio_soft_tokens_per_image": 188,
}


@dataclass
class TextConfig:
    """The language model's config (`text_config`). Lists are per layer after parsing."""

    num_hidden_layers: int
    intermediate_size: list[int]
    layer_types: list[str]
    activation_sparsity_pattern: list[float]
    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size: int = 2048
    hidden_size_per_layer_input: int = 256
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    rope_theta: float = 1_000_000.0  # full_attention layers
    rope_local_base_freq: float = 10_000.0  # sliding_attention layers
    final_logit_softcapping: float | None = 30.0
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    num_kv_shared_layers: int = 15
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    tie_word_embeddings: bool = True
    attention_bias: bool = False

    # --- derived facts the decoder and the cache ask for -------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int | None:
        """The layer whose K/V `layer` borrows (docs/text-decoder.md#kv-sharing), or None if it computes its own.

        A shared layer reuses the last non-shared layer of the same attention type.
        """
        first = self.first_kv_shared_layer
        if layer < first:
            return None
        kind = self.layer_types[layer]
        for src in range(first - 1, -1, -1):
            if self.layer_types[src] == kind:
                return src
        raise ConfigError(f"layer {layer} ({kind}) is KV-shared but no earlier layer of that type owns K/V")

    def kv_sources(self) -> list[int | None]:
        return [self.kv_source(i) for i in range(self.num_hidden_layers)]

    def rope_base(self, layer_type: str) -> float:
        return self.rope_theta if layer_type == "full_attention" else self.rope_local_base_freq

    # --- parsing ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        d = dict(d)
        if "num_hidden_layers" not in d:
            raise ConfigError("text config is missing the field 'num_hidden_layers'")
        n = _int_field(d, "num_hidden_layers", minimum=1)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in known and v is not None}
        for name, value in kwargs.items():
            if name in _SCALAR_RULES:
                kwargs[name] = _check_scalar(name, value)

        inter = d.get("intermediate_size", 16_384)
        for name, value in (("intermediate_size", inter), ("layer_types", d.get("layer_types"))):
            if isinstance(value, (list, tuple)) and len(value) != n:  # before any per-layer list is built
                raise ConfigError(f"'{name}' has {len(value)} entries but num_hidden_layers is {n}")
        check_memory(_min_load_bytes(cls, kwargs, n, inter), n)
        kwargs["intermediate_size"] = _per_layer(inter, n, "intermediate_size", int)
        types = d.get("layer_types") or [
            "full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)
        ]
        kwargs["layer_types"] = _per_layer(types, n, "layer_types", str)
        sparsity = d.get("activation_sparsity_pattern")
        if sparsity is None:  # transformers 5.x meaning of "absent": first 10 layers sparse
            n_sparse = 10 if n > 10 else 0
            sparsity = [0.95] * n_sparse + [0.0] * (n - n_sparse)
        kwargs["activation_sparsity_pattern"] = _per_layer(sparsity, n, "activation_sparsity_pattern", float)

        rope = d.get("rope_parameters") or {}
        if rope:
            if not isinstance(rope, dict):
                raise ConfigError(f"config field 'rope_parameters' must be an object, got {rope!r}")
            full = rope.get("full_attention") or {}
            local = rope.get("sliding_attention") or {}
            for name, part in (("full_attention", full), ("sliding_attention", local)):
                if not isinstance(part, dict):
                    raise ConfigError(f"config field 'rope_parameters.{name}' must be an object, got {part!r}")
            for name, part in (("full_attention", full), ("sliding_attention", local)):
                if part.get("rope_type", "default") != "default":
                    raise ConfigError(
                        f"rope_parameters.{name}.rope_type={part['rope_type']!r} is not supported "
                        "(Gemma 3n uses plain RoPE)"
                    )
            if "rope_theta" in full:
                kwargs["rope_theta"] = _check_scalar(
                    "rope_theta", full["rope_theta"], "rope_parameters.full_attention."
                )
            if "rope_theta" in local:
                kwargs["rope_local_base_freq"] = _check_scalar(
                    "rope_local_base_freq", local["rope_theta"], "rope_parameters.sliding_attention."
                )
        kwargs["eos_token_id"] = token_ids(d.get("eos_token_id", [1]), "eos_token_id")
        kwargs["num_hidden_layers"] = n
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The `text_config` JSON (5.x RoPE form, as transformers 5.24 writes it)."""
        d = dataclasses.asdict(self)
        d["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": d.pop("rope_theta")},
            "sliding_attention": {"rope_type": "default", "rope_theta": d.pop("rope_local_base_freq")},
        }
        d["model_type"] = "gemma3n_text"
        return d

    def validate(self) -> None:
        n = self.num_hidden_layers
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] is {t!r}; expected one of {', '.join(LAYER_TYPES)}")
        for i, w in enumerate(self.intermediate_size):
            if w <= 0:
                raise ConfigError(f"intermediate_size[{i}] must be positive, got {w}")
        for i, s in enumerate(self.activation_sparsity_pattern):
            if not 0.0 <= s < 1.0:
                raise ConfigError(f"activation_sparsity_pattern[{i}] must be in [0, 1), got {s}")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ConfigError(
                f"num_kv_shared_layers ({self.num_kv_shared_layers}) must be >= 0 and smaller than "
                f"num_hidden_layers ({n})"
            )
        if self.vocab_size_per_layer_input > self.vocab_size:
            raise ConfigError(
                f"vocab_size_per_layer_input ({self.vocab_size_per_layer_input}) exceeds vocab_size ({self.vocab_size})"
            )
        if not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ConfigError(f"altup_active_idx {self.altup_active_idx} out of range")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported")
        self.kv_sources()  # raises when a shared layer type has no source


@dataclass
class ModelConfig:
    """A whole checkpoint's config: the text decoder plus optional audio/vision towers.

    The towers' configs are kept as raw dicts; gemma3n.audio / gemma3n.vision parse them.
    """

    text: TextConfig
    model_type: str = "gemma3n"
    audio: dict[str, Any] | None = None
    vision: dict[str, Any] | None = None
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    boi_token_id: int = _MULTIMODAL_DEFAULTS["boi_token_id"]
    eoi_token_id: int = _MULTIMODAL_DEFAULTS["eoi_token_id"]
    image_token_id: int = _MULTIMODAL_DEFAULTS["image_token_id"]
    boa_token_id: int = _MULTIMODAL_DEFAULTS["boa_token_id"]
    eoa_token_id: int = _MULTIMODAL_DEFAULTS["eoa_token_id"]
    audio_token_id: int = _MULTIMODAL_DEFAULTS["audio_token_id"]
    vision_soft_tokens_per_image: int = _MULTIMODAL_DEFAULTS["vision_soft_tokens_per_image"]
    audio_soft_tokens_per_image: int = _MULTIMODAL_DEFAULTS["audio_soft_tokens_per_image"]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def is_text_only(self) -> bool:
        return self.model_type == "gemma3n_text"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type", "gemma3n")
        if model_type == "gemma3n_text":
            text = TextConfig.from_dict(d)
            return cls(text=text, model_type=model_type, eos_token_ids=list(text.eos_token_id), raw=d)
        if model_type != "gemma3n":
            raise ConfigError(f"model_type {model_type!r} is not a Gemma 3n model (expected 'gemma3n')")
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError("config field 'text_config' is missing or not an object")
        text = TextConfig.from_dict(d["text_config"])
        eos = token_ids(d.get("eos_token_id", text.eos_token_id), "eos_token_id")
        extras = {
            k: _check_int(k, d[k], 1 if k.endswith("_per_image") else 0)
            for k in _MULTIMODAL_DEFAULTS
            if d.get(k) is not None
        }
        for k in ("audio_config", "vision_config"):
            if d.get(k) is not None and not isinstance(d[k], dict):
                raise ConfigError(f"config field '{k}' must be an object, got {d[k]!r}")
        return cls(
            text=text,
            model_type=model_type,
            audio=d.get("audio_config"),
            vision=d.get("vision_config"),
            eos_token_ids=eos,
            raw=d,
            **extras,
        )


def read_json_file(
    path: Path, *, required: bool = False, error: type[Gemma3nError] = ConfigError, shape: str = "a JSON object"
) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict: {} where an optional file is absent; an absent required
    file, an unreadable one, one that is not JSON or not an object raise `error` naming the file
    (a broken file is never taken as absent: the model would silently run with other settings)."""
    if not path.is_file():
        if required:
            raise error(f"{path} not found: a Gemma 3n checkpoint directory needs a {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold {shape}")
    return data


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    raw = read_json_file(path, required=True)
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed field: {e}") from None


def _int_field(d: dict[str, Any], name: str, minimum: int = 0) -> int:
    return _check_int(name, d[name], minimum)


def _check_int(name: str, value: Any, minimum: int) -> int:
    """A JSON integer (not a bool, a float or a string) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config field '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value: Any, low: float, low_open: bool, high: float = math.inf) -> float:
    """A finite JSON number (int or float, not a bool) in [low, high) (or (low, high))."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > low if low_open else value >= low) and value < high:
        return float(value)
    span = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else f"in [{low:g}, {high:g})"
    raise ConfigError(f"config field '{name}' must be a finite number {span}, got {value!r}")


# Scalar fields of TextConfig: (kind, minimum). Sizes are >= 1; ids and indices >= 0; floats > 0.
_SCALAR_RULES: dict[str, tuple[str, int]] = {
    **{
        k: ("int", 1)
        for k in (
            "num_hidden_layers",
            "vocab_size",
            "vocab_size_per_layer_input",
            "hidden_size",
            "hidden_size_per_layer_input",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "sliding_window",
            "altup_num_inputs",
            "laurel_rank",
        )
    },
    **{k: ("int", 0) for k in ("altup_active_idx", "num_kv_shared_layers", "pad_token_id", "bos_token_id")},
    **{k: ("float", 0) for k in ("rms_norm_eps", "rope_theta", "rope_local_base_freq")},
    **{k: ("float?", 0) for k in ("final_logit_softcapping", "altup_coef_clip")},
    **{k: ("bool", 0) for k in ("altup_correct_scale", "tie_word_embeddings", "attention_bias")},
    "hidden_activation": ("str", 0),
}


def _check_scalar(name: str, value: Any, where: str = "") -> Any:
    """One scalar field by its rule, or a ConfigError naming it (`where`: a nesting prefix)."""
    kind, minimum = _SCALAR_RULES[name]
    label = where + ("rope_theta" if where else name)
    if kind == "int":
        return _check_int(label, value, minimum)
    if kind == "float" or (kind == "float?" and value is not None):
        return _check_float(label, value, minimum, low_open=True)
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"config field '{label}' must be true or false, got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise ConfigError(f"config field '{label}' must be a string, got {value!r}")
    return value


def token_ids(value: Any, name: str) -> list[int]:
    """A token id or a list of them (eos_token_id's two JSON forms) -> a list of ints >= 0."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_check_int(f"{name}[{i}]" if items is value else name, v, 0) for i, v in enumerate(items)]


def _per_layer(value: Any, n: int, name: str, kind: type) -> list:
    """An int/float broadcast to every layer, or a list that must have one entry per layer.
    Entries are checked strictly (a string, a bool or a fraction where an int goes is an error,
    not converted): 0 < int sizes, finite floats, strings."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"'{name}' has {len(value)} entries but num_hidden_layers is {n}")
        return [_layer_value(v, f"{name}[{i}]", kind) for i, v in enumerate(value)]
    if kind is str:
        raise ConfigError(f"'{name}' must be a list of {n} strings, got {value!r}")
    return [_layer_value(value, name, kind)] * n


def _layer_value(value: Any, label: str, kind: type) -> Any:
    if kind is int:
        return _check_int(label, value, 1)
    if kind is float:
        return _check_float(label, value, 0.0, low_open=False, high=1.0)
    if not isinstance(value, str):
        raise ConfigError(f"config field '{label}' must be a string, got {value!r}")
    return value


# --- memory, before anything is built -------------------------------------------------------
# Python objects of one decoder layer built on the meta device (its modules, parameters and
# per-layer list entries): measured ~67 KB with tracemalloc; the estimate uses a lower bound.
LAYER_BUILD_BYTES = 48 << 10
# The least a weight takes in any supported storage (int4 codes); the estimate is a lower bound.
MIN_BYTES_PER_WEIGHT = 0.5


def _min_load_bytes(cls: type, kw: dict[str, Any], n: int, inter: Any) -> int:
    """A lower bound of the host memory loading this config takes: the core weights (everything
    but the memory-mapped PLE table, read in full for every token) at the smallest storage, plus
    the Python objects of n layers. Computed from scalar fields, before per-layer lists exist."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}

    def get(k: str) -> int:
        return int(kw.get(k, defaults[k]))

    d, hd, p, r = get("hidden_size"), get("head_dim"), get("hidden_size_per_layer_input"), get("laurel_rank")
    heads, kv = get("num_attention_heads"), get("num_key_value_heads")
    if isinstance(inter, (list, tuple)):
        ffn = sum(_check_int(f"intermediate_size[{i}]", w, 1) for i, w in enumerate(inter))
    else:
        ffn = _check_int("intermediate_size", inter, 1) * n
    per_layer = d * hd * 2 * (heads + kv) + 2 * d * p + 2 * d * r  # attention, per-layer input, LAuReL
    weights = n * per_layer + 3 * d * ffn + get("vocab_size") * d + n * p * d
    return int(weights * MIN_BYTES_PER_WEIGHT) + n * LAYER_BUILD_BYTES


def machine_memory() -> tuple[int, str] | None:
    """(bytes, what): the memory available now (/proc/meminfo), else the physical memory, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "installed"
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def check_memory(need: int, layers: int) -> None:
    """Refuse a config whose lower-bound memory exceeds what the machine has (before building)."""
    have = machine_memory()
    if have is not None and need > have[0]:
        raise ConfigError(
            f"this config ({layers:,} layers) needs at least {need / 2**30:,.1f} GiB of memory to load but the "
            f"machine has {have[0] / 2**30:,.1f} GiB {have[1]}; check num_hidden_layers and the size fields"
        )
