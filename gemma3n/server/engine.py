"""The generation engine: one worker thread in front of a model that is not thread-safe, a
bounded queue of jobs, and each job's events delivered to the server's event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request

from gemma3n.cache import PromptCache

from .schemas import APIError

_POLL_S = 0.25  # how often a waiting request checks whether its client went away
Work = Callable[[Any, "PromptCache | None"], Iterator[Any]]  # (model, prompt cache) -> events

_END = object()


class _Job:
    """One generation: the worker thread emits pieces into an asyncio queue on the server loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server loop is gone (shutdown); nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class _Engine:
    """A single generation thread in front of a non-thread-safe model, with a bounded queue."""

    def __init__(self, model: Any, max_queue: int, prompt_cache_slots: int, prompt_cache_bytes: int | None) -> None:
        self.model, self.max_queue = model, max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma3n-generate")
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()
        # Recent requests' K/V, used only by the worker thread: a follow-up turn that re-sends its
        # conversation prefills just its new tokens (exact: reuse needs identical tokens).
        self._prompt_cache = PromptCache(prompt_cache_slots, prompt_cache_bytes) if prompt_cache_slots else None

    @property
    def admitted(self) -> int:
        return len(self._jobs)

    def submit(self, work: Work) -> _Job:
        """Queue `work(model, prompt_cache)`, an iterator of events run on the worker thread."""
        job = _Job(asyncio.get_running_loop())
        with self._lock:
            if len(self._jobs) >= self.max_queue:
                raise APIError(
                    503,
                    f"server busy: {len(self._jobs)} requests queued (max {self.max_queue}); retry later",
                    type="server_error",
                    code="server_busy",
                )
            self._jobs.add(job)
        self._executor.submit(self._run, job, work)
        return job

    def _run(self, job: _Job, work: Work) -> None:
        try:
            if job.cancelled.is_set():  # its client left while it waited
                return
            pieces = work(self.model, self._prompt_cache)
            try:
                for piece in pieces:
                    job.emit(piece)
                    if job.cancelled.is_set():
                        break
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()  # stops generation early when the client went away
        except Exception as exc:
            job.emit(exc)
        finally:
            with self._lock:  # free the slot before the client hears the end
                self._jobs.discard(job)
            job.emit(_END)

    def close(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class _ClientGone(Exception):
    pass


async def _next_event(job: _Job, request: Request) -> Any:
    """The job's next event; while waiting, notice a client that disconnected and cancel its job."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), _POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise _ClientGone from None
