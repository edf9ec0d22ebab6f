"""From a request to model inputs: the chat template, placeholder expansion, media collection.

The template is the checkpoint's own Jinja, rendered the way transformers renders it
(sandboxed, trim_blocks/lstrip_blocks); a built-in Gemma template is the fallback.
Each image / audio placeholder becomes the processor's full sequence (audio-vision.md §D.3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import ModelConfig
from .errors import InputError
from .tokenizer import Tokenizer

# Gemma's turn format (style.md): no system turn (its text opens the first user turn), roles
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
    """Token ids plus the media they reference, in prompt order."""

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
        ids = [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.config.text.vocab_size]
        if bad:
            raise InputError(f"token ids out of range [0, {self.config.text.vocab_size}): {bad[:5]}")
        return PromptInputs(ids=ids)

    def from_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> PromptInputs:
        messages = normalize_messages(messages)
        images = [
            p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"
        ]
        audios = [
            p["audio"] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "audio"
        ]
        text = render_chat(self.template, messages, self.special, add_generation_prompt)
        text = self._expand(text, images, audios)
        return PromptInputs(ids=self.tokenizer.encode(text), images=images, audios=audios)

    def _expand(self, text: str, images: list, audios: list) -> str:
        for kind, items, n, (start, end) in (
            ("image", images, self.image_seq_length, ("<start_of_image>", "<end_of_image>")),
            ("audio", audios, self.audio_seq_length, ("<start_of_audio>", "<end_of_audio>")),
        ):
            token = f"<{kind}_soft_token>"
            if text.count(token) != len(items):
                raise InputError(
                    f"the chat template produced {text.count(token)} {kind} placeholders for {len(items)} {kind} parts"
                )
            if items:
                if self.tokenizer.token_id(kind) is None:
                    raise InputError(f"this checkpoint's tokenizer has no {token}: it cannot take {kind} input")
                text = text.replace(token, f"\n\n{start}{token * n}{end}\n\n")
        return text


def _read_processor_config(model_dir: Path) -> dict:
    path = model_dir / "processor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
