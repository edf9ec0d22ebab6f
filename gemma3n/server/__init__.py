"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

The server knows no tensors: it turns OpenAI requests into `model.stream(...)` calls and the
text pieces back into OpenAI responses or server-sent events. The model is not thread-safe,
so every generation runs on one worker thread; requests wait in a bounded queue, and plain
generations join one running batch (continuous batching, gemma3n.batching).

schemas.py: request bodies, validation and errors; engine.py: the worker, its queue and the batch;
routes.py: the app; streaming.py: responses and server-sent events; run.py: serving it.
"""

from .routes import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_PROMPT_CACHE_SLOTS, create_app
from .run import LOOPBACK_HOSTS, BackgroundServer, serve
from .schemas import MAX_JSON_DEPTH, APIError, json_depth, parse_body

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_PROMPT_CACHE_SLOTS",
    "LOOPBACK_HOSTS",
    "MAX_JSON_DEPTH",
    "APIError",
    "BackgroundServer",
    "create_app",
    "json_depth",
    "parse_body",
    "serve",
]
