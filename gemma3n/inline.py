"""Media sent inline: base64 text and `data:` URIs, decoded by one set of rules wherever they
arrive (the Python API's image inputs, the server's image and audio parts)."""

from __future__ import annotations

import base64
import binascii

from .errors import InputError


def decode_base64(data: str, what: str) -> bytes:
    """Strict base64 (whitespace and line breaks allowed) to bytes; empty or invalid is an error."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{what} is not valid base64: {e}") from None
    if not raw:
        raise InputError(f"{what} is empty")
    return raw


def decode_data_uri(uri: str, what: str, media: str | None = None) -> bytes:
    """The bytes of a `data:[<type>][;base64],<payload>` URI; only base64 payloads are taken, and
    with `media` (e.g. "image") the declared type, if any, must be of that kind."""
    if not uri.startswith("data:"):
        raise InputError(f"{what} is not a data: URI")
    header, sep, payload = uri[5:].partition(",")
    if not sep or ";base64" not in header:
        raise InputError(f"{what}: the data: URI must be base64 (data:image/png;base64,...)")
    declared = header.split(";")[0]
    if media is not None and declared and not declared.startswith(media + "/"):
        raise InputError(f"{what}: media type {declared!r} is not an {media}")
    return decode_base64(payload, what)
