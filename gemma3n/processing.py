"""From a request to model inputs: the chat template, placeholder expansion, media collection.

The template is the checkpoint's own Jinja, rendered the way transformers renders it
(sandboxed, trim_blocks/lstrip_blocks); a built-in Gemma template is the fallback.
Each image / audio placeholder becomes the processor's full sequence (docs/audio-vision.md#prompt-expansion);
an audio clip longer than the encoder's 30 s window becomes one such block per window, and audio
that cannot fit the context with the text is refused with how much would.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .audio import AudioFeatureExtractor, encoder_windows, header_seconds, load_audio
from .config import ModelConfig
from .errors import InputError
from .tokenizer import Tokenizer

# Gemma's turn format: no system turn (its text opens the first user turn), roles
# alternate, `assistant` is spelled `model`, media parts render as their placeholder token.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = (messages[0]['content'] if messages[0]['content'] is string
    else messages[0]['content'][0]['text']) + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
{%- if message['content'] is string -%}
{{ message['content'] | trim }}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{{ '<image_soft_token>' }}
{%- elif item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}
{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""


@dataclass
class PromptInputs:
    """Token ids plus the media they reference, in prompt order. `audios` are 16 kHz windows
    of at most the encoder's 30 s, one placeholder block each (a long clip gives several)."""

    ids: list[int]
    images: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)


def render_chat(template: str, messages: list[dict], special: dict[str, str], add_generation_prompt: bool) -> str:
    def raise_exception(message: str) -> None:
        raise InputError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **special,
        )
    except jinja2.TemplateError as e:
        raise InputError(f"the chat template failed on these messages: {e}") from None


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Check the HF chat format and return a copy; media objects are kept by reference."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "model"):
            raise InputError(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant")
        content = m["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image", "audio"):
                    raise InputError(f"messages[{i}].content[{j}] has type {kind!r}; expected text, image or audio")
        elif not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string or a list of parts")
        out.append({**m, "role": "assistant" if m["role"] == "model" else m["role"]})
    return out


class Processor:
    """Turns raw text, token ids or chat messages into `PromptInputs`."""

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, model_dir: Path):
        self.tokenizer = tokenizer
        self.config = config
        self.model_dir = model_dir
        self.template = tokenizer.chat_template(model_dir) or GEMMA_TEMPLATE
        proc = _read_processor_config(model_dir)
        self.image_seq_length = int(proc.get("image_seq_length", config.vision_soft_tokens_per_image))
        self.audio_seq_length = int(proc.get("audio_seq_length", config.audio_soft_tokens_per_image))
        tc = tokenizer.config
        self.special = {
            k: tc[k] if isinstance(tc.get(k), str) else (tc.get(k) or {}).get("content", default)
            for k, default in (
                ("bos_token", "<bos>"),
                ("eos_token", "<eos>"),
                ("pad_token", "<pad>"),
                ("unk_token", "<unk>"),
            )
        }

    def from_text(self, prompt: str | list[int]) -> PromptInputs:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            return PromptInputs(ids=self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, (bytes, bytearray)) or not _is_id_list(prompt):
            # bytes iterate as small ints: they would silently become token ids
            raise InputError(f"a prompt must be text (str) or a list of token ids (int), got {type(prompt).__name__}")
        ids = [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.config.text.vocab_size]
        if bad:
            raise InputError(f"token ids out of range [0, {self.config.text.vocab_size}): {bad[:5]}")
        return PromptInputs(ids=ids)

    def from_messages(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        check_media: Callable[[str], None] | None = None,
    ) -> PromptInputs:
        """`check_media(kind)` is called for "image" and "audio" if the messages hold any, before
        audio is decoded: a checkpoint without that tower refuses there (Towers.require)."""
        messages = normalize_messages(messages)
        images, clips = _parts(messages, "image"), _parts(messages, "audio")
        text = render_chat(self.template, messages, self.special, add_generation_prompt)
        self._check_placeholders(text, "image", len(images))
        self._check_placeholders(text, "audio", len(clips))
        for kind, items in (("image", images), ("audio", clips)):
            if items and check_media is not None:
                check_media(kind)
        text = self._expand(text, "image", [1] * len(images))
        if not clips:
            return PromptInputs(ids=self.tokenizer.encode(text), images=images)
        # the prompt with one block per clip: what the text costs, before any audio is decoded
        base = len(self.tokenizer.encode(self._expand(text, "audio", [1] * len(clips))))
        # refuse hours of audio from their headers, before decoding them (unknown: one window)
        declared = [header_seconds(c) or 0.0 for c in clips]
        needed = sum(max(1, math.ceil(d / self.audio_window_seconds)) for d in declared)
        self._check_audio_fits(base, len(clips), needed, sum(declared), exact=False)
        sr = self.audio_extractor.sampling_rate
        windows = [encoder_windows(load_audio(c, sampling_rate=sr), self.audio_extractor) for c in clips]
        seconds = sum(len(w) for ws in windows for w in ws) / sr
        self._check_audio_fits(base, len(clips), sum(len(ws) for ws in windows), seconds, exact=True)
        ids = self.tokenizer.encode(self._expand(text, "audio", [len(ws) for ws in windows]))
        return PromptInputs(ids=ids, images=images, audios=[w for ws in windows for w in ws])

    @functools.cached_property
    def audio_extractor(self) -> AudioFeatureExtractor:
        return AudioFeatureExtractor.from_pretrained(self.model_dir)

    @property
    def audio_window_seconds(self) -> float:
        """The longest clip the encoder takes in one piece (the extractor's max_length: 30 s)."""
        return self.audio_extractor.max_length / self.audio_extractor.sampling_rate

    def _block(self, kind: str) -> str:
        """The processor's expansion of one placeholder (docs/audio-vision.md#prompt-expansion)."""
        n = self.image_seq_length if kind == "image" else self.audio_seq_length
        return f"\n\n<start_of_{kind}>{f'<{kind}_soft_token>' * n}<end_of_{kind}>\n\n"

    @functools.cached_property
    def audio_window_tokens(self) -> int:
        """Tokens one more audio window adds to a prompt: its block, less any newlines that merge
        with the previous block's (Gemma's vocabulary has one token for four newlines)."""
        block = self._block("audio")
        return len(self.tokenizer.encode(block * 2)) - len(self.tokenizer.encode(block))

    def _check_audio_fits(self, base: int, clips: int, windows: int, seconds: float, *, exact: bool) -> None:
        """InputError unless `windows` audio windows fit the context with the text.

        `base` is the prompt's length with one window per clip; the other windows add
        `audio_window_tokens` each. Generation needs at least one position after the prompt.
        """
        context = self.config.text.max_position_embeddings
        per_window = self.audio_window_tokens
        total = base + (windows - clips) * per_window
        if total < context:
            return
        room = clips + (context - 1 - base) // per_window  # windows that fit with this text
        window_s = self.audio_window_seconds
        fits = (
            f"at most {_count(room, 'window')} fit with this text, i.e. at most {room * window_s:g} s of audio"
            if room > 0
            else "the text leaves no room for any audio"
        )
        raise InputError(
            f"the prompt's {seconds:.1f} s of audio{'' if exact else ' (as its header declares)'} "
            f"need{'' if exact else ' at least'} {_count(windows, 'window')} of up to {window_s:g} s at "
            f"{per_window} tokens each: {total} tokens with the text, but the model's context is {context} tokens; "
            f"{fits}"
        )

    def _check_placeholders(self, text: str, kind: str, count: int) -> None:
        token = f"<{kind}_soft_token>"
        if text.count(token) != count:
            raise InputError(
                f"the chat template produced {text.count(token)} {kind} placeholders for {count} {kind} parts"
                + (f" (does a text part contain {token} itself?)" if text.count(token) > count else "")
            )
        if count and self.tokenizer.token_id(kind) is None:
            raise InputError(f"this checkpoint's tokenizer has no {token}: it cannot take {kind} input")

    def _expand(self, text: str, kind: str, blocks: list[int]) -> str:
        """Replace the i-th placeholder of `kind` by `blocks[i]` consecutive placeholder blocks.

        A clip longer than the encoder's window becomes one block per window, each exactly the
        block the processor makes for one clip, rather than one longer block: the processor
        always inserts 188 soft tokens per clip and the encoder was trained on clips of up to 30 s,
        so a block of any other length is a layout the model never saw, while prompts with several
        clips are (few-shot clips): docs/audio-vision.md#prompt-expansion. Each window is
        encoded as its own clip; its block is what the template gives a clip of its own.
        """
        pieces = text.split(f"<{kind}_soft_token>")
        block = self._block(kind)
        return pieces[0] + "".join(block * n + piece for n, piece in zip(blocks, pieces[1:]))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _parts(messages: list[dict], kind: str) -> list[Any]:
    """The media of one kind in a normalized conversation, in prompt order."""
    return [p[kind] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == kind]


def _read_processor_config(model_dir: Path) -> dict:
    path = model_dir / "processor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _is_id_list(prompt: object) -> bool:
    """A sequence of integers (Python or NumPy/torch integer scalars, not floats or bools)."""
    import numbers

    try:
        items = list(prompt)  # type: ignore[call-overload]
    except TypeError:
        return False
    return all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items) or all(
        getattr(t, "dtype", None) is not None and not getattr(t.dtype, "is_floating_point", True) for t in items
    )
