"""Running the app: `serve` (the `gemma3n serve` command) and `BackgroundServer` (tests, notebooks)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI

from gemma3n.model import load

from .routes import create_app

log = logging.getLogger("gemma3n.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(
    model: Any = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Serve until interrupted. `model` is a loaded model, or a path / hub id (None: embedded).
    `options`: `create_app`'s (limits, model ids, speculative decoding, continuous batching).
    A loopback server answers only loopback Host names (DNS rebinding); any other warns when it
    has no API key."""
    import uvicorn

    if model is None or isinstance(model, str):
        model = load(model)
    loopback = host in LOOPBACK_HOSTS
    if not loopback and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this host can use it", host)
    app = create_app(model, api_key=api_key, allowed_hosts=LOOPBACK_HOSTS if loopback else None, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """Runs an app with uvicorn on a free loopback port in a daemon thread (tests, benches, notebooks).

    with BackgroundServer(create_app(model)) as srv:
        openai.OpenAI(base_url=srv.base_url, api_key="-")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.base_url = f"{self.url}/v1"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="gemma3n-server"
        )

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
