"""Configuration of a Gemma 3n checkpoint (`config.json`), parsed into plain dataclasses.

Field names are the Hugging Face ones, so a dataclass round-trips to the JSON a checkpoint
ships. Both the multimodal `gemma3n` form (`text_config` / `audio_config` / `vision_config`)
and the text-only `gemma3n_text` form are accepted, with the 4.x (`rope_theta`,
`rope_local_base_freq`) and 5.x (`rope_parameters`) RoPE spellings.
Spec: shared/reference/text-decoder.md §1.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

LAYER_TYPES = ("sliding_attention", "full_attention")

# Multimodal token ids of the official checkpoints (audio-vision.md §D.1); config.json wins.
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
        """The layer whose K/V `layer` borrows (§5.1), or None if it computes its own.

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

        inter = d.get("intermediate_size", 16_384)
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
            full = rope.get("full_attention") or {}
            local = rope.get("sliding_attention") or {}
            for name, part in (("full_attention", full), ("sliding_attention", local)):
                if part.get("rope_type", "default") != "default":
                    raise ConfigError(
                        f"rope_parameters.{name}.rope_type={part['rope_type']!r} is not supported "
                        "(Gemma 3n uses plain RoPE)"
                    )
            if "rope_theta" in full:
                kwargs["rope_theta"] = float(full["rope_theta"])
            if "rope_theta" in local:
                kwargs["rope_local_base_freq"] = float(local["rope_theta"])
        eos = d.get("eos_token_id", [1])
        kwargs["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos or [])
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
        eos = d.get("eos_token_id", text.eos_token_id)
        extras = {k: int(d[k]) for k in _MULTIMODAL_DEFAULTS if d.get(k) is not None}
        return cls(
            text=text,
            model_type=model_type,
            audio=d.get("audio_config"),
            vision=d.get("vision_config"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos),
            raw=d,
            **extras,
        )


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a Gemma 3n checkpoint directory needs a config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed field: {e}") from None


def _int_field(d: dict[str, Any], name: str, minimum: int = 0) -> int:
    value = d[name]
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config field '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def _per_layer(value: Any, n: int, name: str, kind: type) -> list:
    """An int/float broadcast to every layer, or a list that must have one entry per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"'{name}' has {len(value)} entries but num_hidden_layers is {n}")
        try:
            return [kind(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"'{name}' must hold {kind.__name__} values, got {value!r}") from None
    if kind is str:
        raise ConfigError(f"'{name}' must be a list of {n} strings, got {value!r}")
    try:
        return [kind(value)] * n
    except (TypeError, ValueError):
        raise ConfigError(f"'{name}' must be a {kind.__name__} or a list, got {value!r}") from None
