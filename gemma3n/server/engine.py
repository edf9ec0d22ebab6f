"""The generation engine: one worker thread in front of a model that is not thread-safe, a
bounded queue of jobs, and each job's events delivered to the server's event loop.

Plain generations (one prompt, one continuation, no grammar, draft or log-probabilities) are
decoded together with continuous batching (gemma3n.batching): a request is admitted as soon as
the running batch of its size has room and the KV budget allows, its prompt is prefilled a slice
at a time between steps of the batch (a long prompt does not freeze the others' streams), it
joins the batch, and it leaves the moment it finishes or its client goes away. Any other job
runs alone, between batches, as before.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from gemma3n.batching import MAX_BATCH, Batch, BatchRequest, Sequence
from gemma3n.cache import ROLLBACK, PromptCache
from gemma3n.matformer import SliceSpec

from .schemas import APIError

_POLL_S = 0.25  # how often a waiting request checks whether its client went away
Work = Callable[[Any, "PromptCache | None"], Iterator[Any]]  # (model, prompt cache) -> events
Prepare = Callable[[Any], BatchRequest]  # model -> a checked, prepared request (raises on bad input)

_END = object()


class _Job:
    """One generation: the worker thread emits pieces into an asyncio queue on the server loop.
    `work` runs alone; `prepare` makes a request for the batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Work | None, prepare: Prepare | None) -> None:
        self.loop, self.work, self.prepare = loop, work, prepare
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server loop is gone (shutdown); nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Admission:
    """A batched job between its request's preparation and its place in the batch."""

    job: _Job
    steps: Iterator[Sequence | None]  # BatchRequest.admit: None per prefilled slice, then the sequence
    size: SliceSpec | None
    kv_bytes: int


@dataclass
class _Running:
    batches: dict[str, Batch] = field(default_factory=dict)
    admitting: list[_Admission] = field(default_factory=list)
    kv_bytes: dict[_Job, int] = field(default_factory=dict)  # budgeted K/V of admitted jobs

    def __bool__(self) -> bool:
        return bool(self.admitting) or any(len(b) for b in self.batches.values())


class _Engine:
    """A single generation thread in front of a non-thread-safe model, with a bounded queue and
    continuous batching of plain generations (module doc)."""

    def __init__(
        self,
        model: Any,
        max_queue: int,
        prompt_cache_slots: int,
        prompt_cache_bytes: int | None,
        max_batch: int = MAX_BATCH,
        max_kv_bytes: int | None = None,
    ) -> None:
        self.model, self.max_queue, self.max_batch, self.max_kv_bytes = model, max_queue, max_batch, max_kv_bytes
        self._lock = threading.Condition()
        self._jobs: set[_Job] = set()
        self._queue: deque[_Job] = deque()
        self._closed = False
        # Recent requests' K/V, used only by the worker thread: a follow-up turn that re-sends its
        # conversation prefills just its new tokens (exact: reuse needs identical tokens).
        self._prompt_cache = PromptCache(prompt_cache_slots, prompt_cache_bytes) if prompt_cache_slots else None
        self._thread = threading.Thread(target=self._loop, name="gemma3n-generate", daemon=True)
        self._thread.start()

    @property
    def admitted(self) -> int:
        return len(self._jobs)

    def submit(self, work: Work | None = None, *, prepare: Prepare | None = None) -> _Job:
        """Queue `work(model, prompt_cache)` (an iterator of events, run alone on the worker
        thread) or `prepare(model)` (a request decoded in the batch; its events are pieces)."""
        job = _Job(asyncio.get_running_loop(), work, prepare)
        with self._lock:
            if len(self._jobs) >= self.max_queue:
                raise APIError(
                    503,
                    f"server busy: {len(self._jobs)} requests queued (max {self.max_queue}); retry later",
                    type="server_error",
                    code="server_busy",
                )
            self._jobs.add(job)
            self._queue.append(job)
            self._lock.notify()
        return job

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._jobs:
                job.cancel()
            self._lock.notify()

    # --- the worker thread ------------------------------------------------------------------
    def _loop(self) -> None:
        running = _Running()
        while True:
            with self._lock:
                while not self._closed and not self._queue and not running:
                    self._lock.wait()
                if self._closed:
                    return
            self._admit(running)
            if not running:  # the head of the queue runs alone (nothing batched is in flight)
                job = self._pop_alone()
                if job is not None:
                    self._run_alone(job)
                continue
            for adm in list(running.admitting):
                self._prefill_slice(running, adm)
            for batch in running.batches.values():
                self._step(running, batch)

    def _admit(self, running: _Running) -> None:
        """Take batched jobs from the head of the queue while their batch has room and the K/V
        budget allows (FIFO: a job that must run alone waits at the head until the batch drains)."""
        while True:
            with self._lock:
                job = self._queue[0] if self._queue else None
                if job is None or job.prepare is None:
                    return
                if job.cancelled.is_set():
                    self._queue.popleft()
                    self._finish(job)
                    continue
            try:
                request = job.prepare(self.model)
                need = kv_budget(self.model, request)
                if self.max_kv_bytes is not None and need > self.max_kv_bytes:
                    raise APIError(
                        400,
                        f"this request may hold {need / 2**20:.0f} MiB of K/V (its prompt plus max_tokens) but "
                        f"the server's limit is {self.max_kv_bytes / 2**20:.0f} MiB; lower max_tokens or shorten "
                        "the prompt",
                        param="max_tokens",
                        code="kv_cache_limit",
                    )
            except Exception as exc:  # a bad prompt: a clear error for this request alone
                with self._lock:
                    self._queue.popleft()
                job.emit(exc)
                self._finish(job)
                continue
            batch = running.batches.get(request.plan.spec)
            room = (len(batch) if batch else 0) + sum(a.size == request.plan.spec for a in running.admitting)
            in_use = sum(running.kv_bytes.values())
            if room >= self.max_batch or (
                self.max_kv_bytes is not None and in_use and in_use + need > self.max_kv_bytes
            ):
                return  # stays queued; admitted when a place or budget frees
            with self._lock:
                self._queue.popleft()
            running.kv_bytes[job] = need
            steps = request.admit(tag=job, prompt_cache=self._prompt_cache)
            running.admitting.append(_Admission(job, steps, request.plan.spec, need))
            running.batches.setdefault(request.plan.spec, Batch(self.model.decoder, request.plan, self.model.embed_ids))

    def _prefill_slice(self, running: _Running, adm: _Admission) -> None:
        job = adm.job
        try:
            if job.cancelled.is_set():
                adm.steps.close()
                raise _Gone
            seq = next(adm.steps)
        except _Gone:
            running.admitting.remove(adm)
            self._release(running, job)
            return
        except Exception as exc:
            running.admitting.remove(adm)
            job.emit(exc)
            self._release(running, job)
            return
        if seq is not None:
            running.admitting.remove(adm)
            running.batches[adm.size].add(seq)

    def _step(self, running: _Running, batch: Batch) -> None:
        for seq in [s for s in batch.active if s.tag.cancelled.is_set()]:  # clients that went away
            batch.remove(seq.tag)
            self._end(running, seq)
        if not len(batch):
            return
        try:
            pieces = batch.step()
        except Exception as exc:  # a model failure fails the sequences in this batch, not the server
            for seq in list(batch.active):
                batch.remove(seq.tag)
                seq.tag.emit(exc)
                self._end(running, seq)
            return
        for seq, piece in pieces:
            seq.tag.emit((0, 0, piece))
            if seq.finished and piece.finish_reason is not None:
                self._end(running, seq)

    def _end(self, running: _Running, seq: Sequence) -> None:
        if seq.release is not None:
            seq.release()
        self._release(running, seq.tag)

    def _release(self, running: _Running, job: _Job) -> None:
        running.kv_bytes.pop(job, None)
        self._finish(job)

    def _pop_alone(self) -> _Job | None:
        with self._lock:
            return self._queue.popleft() if self._queue and self._queue[0].work is not None else None

    def _run_alone(self, job: _Job) -> None:
        try:
            if job.cancelled.is_set():  # its client left while it waited
                return
            pieces = job.work(self.model, self._prompt_cache)
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
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        with self._lock:  # free the slot before the client hears the end
            self._jobs.discard(job)
        job.emit(_END)


class _Gone(Exception):
    """A job cancelled while its prompt was being prefilled."""


def kv_budget(model: Any, request: BatchRequest) -> int:
    """The most K/V a request can hold: its prompt plus max_tokens, in the activation dtype, over
    its plan's KV-owning layers (a sliding layer at most its window plus rollback)."""
    cfg = request.plan.config
    tokens = len(request.prompt.ids) + request.max_tokens
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * model.decoder.activation_dtype.itemsize
    total = 0
    for j in range(cfg.num_hidden_layers):
        if cfg.kv_source(j) is None:
            sliding = cfg.layer_types[j] == "sliding_attention"
            total += per_token * (min(tokens, cfg.sliding_window - 1 + ROLLBACK) if sliding else tokens)
    return total


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
