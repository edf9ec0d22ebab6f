"""Continuous batching in the server (server/engine.py, gemma3n.batching): several clients at
once, each answered exactly as if it were alone; a client that leaves frees its place; the K/V
budget; and the Python API's batch over a list of prompts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import gemma3n  # noqa: E402
from gemma3n.server import BackgroundServer, create_app  # noqa: E402

PROMPTS = [
    "In the beginning God created",
    "And the LORD said unto Moses",
    "Blessed are the poor in spirit",
    "The LORD is my shepherd",
    "And Jesus answered and said",
    "For God so loved the world",
]


@pytest.fixture(scope="module")
def model():
    return gemma3n.load()


def _clients(srv, n: int) -> list:
    return [openai.OpenAI(base_url=srv.base_url, api_key="-", max_retries=0, timeout=120) for _ in range(n)]


def test_concurrent_clients_get_what_they_get_alone(model):
    """Six clients at once (batch of four: two wait and join as others finish), different prompt
    lengths, positions, max_tokens and sampling; each reply equals the Python API's alone."""
    greedy = [{"temperature": 0.0, "max_tokens": 12 + 3 * i} for i in range(len(PROMPTS))]
    sampled = [{"temperature": 0.8, "seed": i, "max_tokens": 10} for i in range(len(PROMPTS))]
    kwargs = [greedy[i] if i % 2 == 0 else sampled[i] for i in range(len(PROMPTS))]
    alone = [model.generate(prompt=p, **kw).text for p, kw in zip(PROMPTS, kwargs)]
    with BackgroundServer(create_app(model, max_batch=4)) as srv:
        clients = _clients(srv, len(PROMPTS))
        mid = clients[0].models.list().data[0].id

        def ask(i: int) -> str:
            r = clients[i].completions.create(model=mid, prompt=PROMPTS[i], **kwargs[i])
            return r.choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(ask, range(len(PROMPTS))))
    assert together == alone


def test_streams_interleave_and_a_client_that_leaves_frees_its_place(model):
    """Two streams progress together (tokens of both arrive before either ends); a client that
    disconnects mid-stream is dropped from the batch and the next request is served."""
    with BackgroundServer(create_app(model, max_batch=2, max_queue=4)) as srv:
        url = f"{srv.base_url}/completions"
        body = {"prompt": "And it came to pass", "max_tokens": 60, "temperature": 0.0, "stream": True}
        events: list[tuple[int, float]] = []

        def stream(tag: int) -> None:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append((tag, time.perf_counter()))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first_end = min(max(ts for tag, ts in events if tag == i) for i in range(2))
        assert {tag for tag, ts in events if ts < first_end} == {0, 1}  # both advanced before one ended

        with httpx.stream("POST", url, json={**body, "max_tokens": 500}, timeout=120) as r:  # leaves early
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
        deadline = time.time() + 30
        while httpx.get(f"{srv.base_url.rsplit('/v1', 1)[0]}/health").json()["queued"] and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{srv.base_url.rsplit('/v1', 1)[0]}/health").json()["queued"] == 0
        r = httpx.post(url, json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_kv_budget_refuses_what_can_never_fit(model):
    with BackgroundServer(create_app(model, max_kv_bytes=1 << 16)) as srv:
        r = httpx.post(
            f"{srv.base_url}/completions", json={"prompt": "And", "max_tokens": 900, "temperature": 0}, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_cache_limit"
        small = httpx.post(f"{srv.base_url}/completions", json={"prompt": "And", "max_tokens": 2}, timeout=60)
        assert small.status_code == 200
    with pytest.raises(ValueError, match="max_batch"):
        create_app(model, max_batch=0)


def test_python_api_batch_of_prompts_and_conversations(model):
    """`generate` over a list: one result each, in order, the same as one at a time, more prompts
    than the batch holds (continuous), conversations too."""
    alone = [model.generate(prompt=p, max_tokens=8, temperature=0) for p in PROMPTS]
    batch = model.generate(PROMPTS, max_tokens=8, temperature=0, max_batch=3, progress=False)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert all(r.finish_reason in ("stop", "length") and r.prompt_tokens > 0 for r in batch)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    assert [r.text for r in model.generate(messages=chats, max_tokens=6, temperature=0)] == [
        model.generate(messages=c, max_tokens=6, temperature=0).text for c in chats
    ]
    from gemma3n.errors import InputError

    with pytest.raises(InputError, match="max_tokens"):  # every request is checked before any decoding
        model.generate(["ok", "fine"], max_tokens=0)
