"""The checkpoint's tokenizer (`tokenizer.json` through `tokenizers`) and a streaming
detokenizer that never emits half a UTF-8 character or a wrong leading space."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .config import read_json_file
from .errors import CheckpointError, InputError

# Gemma special tokens that matter to the runtime; their ids always come from the tokenizer.
SPECIAL = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
    "image": "<image_soft_token>",
    "boi": "<start_of_image>",
    "eoi": "<end_of_image>",
    "audio": "<audio_soft_token>",
    "boa": "<start_of_audio>",
    "eoa": "<end_of_audio>",
}
# The media tokens as a processor's tokenizer_config.json names them (`extra_special_tokens`).
MEDIA_TOKENS = {f"{k}_token": SPECIAL[k] for k in ("image", "boi", "eoi", "audio", "boa", "eoa")}


class Tokenizer:
    def __init__(self, path: Path):
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{path} has no tokenizer.json (needed to turn text into tokens)")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise CheckpointError(f"{file} could not be read: {e}") from None
        self.config = read_json_file(path / "tokenizer_config.json", error=CheckpointError)
        self.ids = {key: self._tok.token_to_id(text) for key, text in SPECIAL.items()}
        self.vocab_size = self._tok.get_vocab_size()

    def to_json(self) -> str:
        """The tokenizer.json text (what llguidance builds its byte view from)."""
        return self._tok.to_str()

    def token_id(self, key: str) -> int | None:
        return self.ids.get(key)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        check_text(text, "the prompt")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_template(self, path: Path) -> str | None:
        """The checkpoint's own chat template: chat_template.jinja, then tokenizer_config.json."""
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None:
            template = read_json_file(path / "processor_config.json", error=CheckpointError).get("chat_template")
        return template


def check_text(text: str, what: str) -> None:
    """Text must be valid Unicode: a lone surrogate (U+D800-U+DFFF) is what Python makes of bytes
    that are not UTF-8 in argv or a file read with surrogateescape, or what a broken str holds;
    it cannot be encoded, so it is an InputError naming where it is, not a tokenizer TypeError."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        raw = f" (the byte 0x{ord(ch) - 0xDC00:02x} that is not UTF-8)" if 0xDC80 <= ord(ch) <= 0xDCFF else ""
        raise InputError(
            f"{what} is not valid Unicode: a lone surrogate U+{ord(ch):04X}{raw} at character {e.start}"
        ) from None


class StreamingDetokenizer:
    """Incremental decoding with a prefix window (decode(prefix+new) - decode(prefix)), so
    SentencePiece spaces and multi-token UTF-8 characters come out right, in O(1) per token."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token: int) -> str:
        """Feed one token; return the text that is now final (possibly '')."""
        self.tokens.append(token)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (a dangling partial character is dropped, not garbled)."""
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix) :].rstrip("\ufffd")
