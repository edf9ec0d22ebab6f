"""The HTTP layer against a fake model: OpenAI framing, failure paths, queueing, disconnects.

The fake has the public model's `stream` contract (str pieces carrying finish_reason and token
counts), echoes its input, and records every call, so tests can see what reached the model.
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gemma3n.errors import InputError  # noqa: E402
from gemma3n.generate import TextPiece  # noqa: E402
from gemma3n.server import BackgroundServer, create_app  # noqa: E402

KEY = "sk-test-key"


class FakeModel:
    """Echoes the prompt (or last user turn) word by word; 'slow' in it adds 50 ms per piece."""

    name = "gemma3n-fake"
    has_audio = True
    has_vision = True

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.active = 0
        self.overlapped = False
        self.closed_early = 0

    def sizes(self) -> list[str]:
        return ["E2B", "E1.5B-block"]

    def stream(self, prompt=None, *, messages=None, max_tokens=256, stop=None, seed=None, size=None, **sampling):
        self.calls.append(dict(prompt=prompt, messages=messages, max_tokens=max_tokens, stop=stop, size=size))
        self.calls[-1].update(sampling, seed=seed)
        return self._pieces(prompt, messages, max_tokens, stop or [])

    def _pieces(self, prompt, messages, max_tokens, stop):
        self.active += 1
        self.overlapped |= self.active > 1
        finished = False
        try:
            if messages is not None:
                content = messages[-1]["content"]
                parts = [content] if isinstance(content, str) else [self._describe(p) for p in content]
                text = " ".join(parts)
            else:
                text = prompt if isinstance(prompt, str) else " ".join(f"t{i}" for i in prompt)
            if "raise-input-error" in text:
                raise InputError("prompt contains raise-input-error")
            words = text.split() or ["(empty)"]
            out, reason = "", "length"
            for i in range(max_tokens):
                piece = (" " if i else "") + words[i % len(words)]
                cut = [s for s in stop if s in out + piece]
                if cut:
                    piece = (out + piece).split(cut[0])[0][len(out) :]
                    reason = "stop"
                if "slow" in text:
                    time.sleep(0.05)
                if "fail-midway" in text and i == 1:
                    raise RuntimeError("the fake broke down")
                p = TextPiece(piece)
                p.prompt_tokens, p.generated_tokens = len(words), i + 1
                if reason == "stop" or i == max_tokens - 1:
                    p.finish_reason = reason
                    finished = True
                yield p
                out += piece
                if reason == "stop":
                    return
        finally:
            self.active -= 1
            self.closed_early += not finished

    @staticmethod
    def _describe(part: dict) -> str:
        if part["type"] == "text":
            return part["text"]
        return f"<{part['type']}:{len(part[part['type']])}>"


@pytest.fixture(scope="module")
def fake() -> FakeModel:
    return FakeModel()


@pytest.fixture(scope="module")
def server(fake):
    with BackgroundServer(create_app(fake, max_queue=8, max_body_bytes=64 * 1024)) as srv:
        yield srv


@pytest.fixture(scope="module")
def locked():
    """A second server with its own fake: API key, a queue of one."""
    app = create_app(FakeModel(), api_key=KEY, max_queue=1, allowed_hosts=["127.0.0.1", "localhost"])
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=20)


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE body, checking the framing: 'data: ...' then a blank line."""
    text = response.text
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_list_every_size(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["gemma3n-fake", "gemma3n-E2B", "gemma3n-E1.5B-block"]
    assert client.models.retrieve("gemma3n-E2B").id == "gemma3n-E2B"


def test_chat_non_streaming(client, fake):
    r = client.chat.completions.create(
        model="gemma3n-fake",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        extra_body={"top_k": 40, "min_p": 0.05},
    )
    assert r.object == "chat.completion" and r.model == "gemma3n-fake"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "hello there hello"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 3, 5)
    call = fake.calls[-1]
    assert call["messages"][0] == {"role": "system", "content": "be brief"}
    client.chat.completions.create(
        model="gemma3n-fake",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "be kind"}]},
            {"role": "user", "content": "hi"},
        ],
    )
    assert fake.calls[-1]["messages"][0] == {"role": "system", "content": "be brief\n\nbe kind"}
    sampling = [call[k] for k in ("temperature", "top_p", "top_k", "min_p", "seed")]
    assert sampling == [0.5, 0.9, 40, 0.05, 7]
    assert call["size"] is None


def test_chat_streaming_framing(server):
    body = {
        "model": "gemma3n-fake",
        "messages": [{"role": "user", "content": "a b"}],
        "max_completion_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client(timeout=20) as http:
        r = http.post(f"{server.base_url}/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["a", " b", " a"]
    assert chunks[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:5])


def test_chat_streaming_with_openai_client(client):
    stream = client.chat.completions.create(
        model="gemma3n-fake", messages=[{"role": "user", "content": "one two"}], max_tokens=4, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two one two"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_completions_and_stop(client):
    r = client.completions.create(model="gemma3n-fake", prompt="x y z", max_tokens=10, stop=["z"])
    assert r.object == "text_completion"
    assert r.choices[0].text == "x y " and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model="gemma3n-fake", prompt="x y", max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x y x"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []


def test_model_selects_size(client, fake):
    r = client.chat.completions.create(model="gemma3n-E1.5B-block", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "gemma3n-E1.5B-block" and fake.calls[-1]["size"] == "E1.5B-block"
    client.completions.create(model="E2B", prompt=[1, 2], max_tokens=1)
    assert fake.calls[-1]["size"] == "E2B" and fake.calls[-1]["prompt"] == [1, 2]


def test_image_and_audio_parts(client, fake):
    png, wav = b"\x89PNG fake image", b"RIFF fake wav"
    content = [
        {"type": "text", "text": "describe"},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
        },
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
    ]
    r = client.chat.completions.create(model="gemma3n-fake", messages=[{"role": "user", "content": content}])
    assert r.choices[0].message.content.startswith(f"describe <image:{len(png)}> <audio:{len(wav)}>")
    parts = fake.calls[-1]["messages"][0]["content"]
    assert parts[1] == {"type": "image", "image": png} and parts[2] == {"type": "audio", "audio": wav}


def test_remote_image_url_refused(client):
    part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gemma3n-fake", messages=[{"role": "user", "content": [part]}])
    assert "data:" in err.value.message and err.value.param == "messages[0].content[0].image_url.url"


@pytest.mark.parametrize(
    "body, param",
    [
        (b'{"messages": [', None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 17}', "n"),
        (b'{"messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}', "seed"),
        (b'{"messages": [{"role": "user", "content": [{"type": "video"}]}]}', "messages[0].content[0].type"),
        (b'{"messages": [{"role": "user", "content": "raise-input-error"}]}', None),
        (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', "tools[0]"),
    ],
)
def test_bad_requests_get_openai_400(server, body, param):
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{server.base_url}/chat/completions", content=body, headers=headers, timeout=20)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_only_json_bodies(server):
    body = b'{"messages": [{"role": "user", "content": "x"}]}'
    r = httpx.post(f"{server.base_url}/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_unknown_model_and_route(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    r = httpx.get(f"{server.url}/v1/nothing", timeout=20)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(f"{server.base_url}/chat/completions", timeout=20)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_failure_after_headers_is_reported_in_band(server, client):
    body = {"prompt": "fail-midway now", "max_tokens": 5, "stream": True}
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=20)
    events = sse_events(r)
    assert events[0]["choices"][0]["text"] == "fail-midway"
    assert events[-2]["error"]["type"] == "server_error" and "Traceback" not in r.text
    assert events[-1] == "[DONE]"
    with pytest.raises(openai.InternalServerError) as err:  # the same failure without streaming: a 500 object
        client.completions.create(model="gemma3n-fake", prompt="fail-midway", max_tokens=5)
    assert "the fake broke down" in err.value.message
    assert client.completions.create(model="gemma3n-fake", prompt="fine", max_tokens=1).choices[0].text == "fine"


def test_oversized_body_gets_413(server):
    body = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=20)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_api_key(locked):
    assert httpx.get(f"{locked.url}/health", timeout=20).status_code == 200
    anonymous = openai.OpenAI(base_url=locked.base_url, api_key="wrong", max_retries=0, timeout=20)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    r = httpx.post(f"{locked.base_url}/completions", json={"prompt": "x"}, timeout=20)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    keyed = openai.OpenAI(base_url=locked.base_url, api_key=KEY, max_retries=0, timeout=20)
    assert keyed.completions.create(model="gemma3n-fake", prompt="ok", max_tokens=1).choices[0].text == "ok"


def test_foreign_host_header_is_refused(locked):
    ok = httpx.get(f"{locked.url}/health", headers={"host": f"localhost:{locked.port}"}, timeout=20)
    assert ok.status_code == 200
    r = httpx.get(f"{locked.url}/health", headers={"host": "rebound.example:8000"}, timeout=20)
    assert r.status_code == 400 and "rebound.example" in r.json()["error"]["message"]


def test_full_queue_answers_503(locked):
    keyed = openai.OpenAI(base_url=locked.base_url, api_key=KEY, max_retries=0, timeout=20)
    stream = keyed.completions.create(model="gemma3n-fake", prompt="slow", max_tokens=40, stream=True)
    next(iter(stream))  # the one slot is now busy
    with pytest.raises(openai.InternalServerError) as err:
        keyed.completions.create(model="gemma3n-fake", prompt="x", max_tokens=1)
    assert err.value.status_code == 503
    stream.close()  # hanging up frees the slot
    deadline = time.monotonic() + 10
    while httpx.get(f"{locked.url}/health", timeout=20).json()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keyed.completions.create(model="gemma3n-fake", prompt="free", max_tokens=1).choices[0].text == "free"


def test_disconnect_mid_stream_stops_generation(server, fake, client):
    before = fake.closed_early
    body = {"prompt": "slow words", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=20) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk read, then hang up
    deadline = time.monotonic() + 10
    while fake.closed_early == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.closed_early == before + 1, "generation kept running after the client left"
    assert len(fake.calls) and fake.active == 0
    r = client.completions.create(model="gemma3n-fake", prompt="after", max_tokens=1)
    assert r.choices[0].text == "after"


def test_client_that_leaves_the_queue_is_never_generated(server, fake, client):
    stream = client.completions.create(model="gemma3n-fake", prompt="slow first", max_tokens=20, stream=True)
    next(iter(stream))  # the worker is busy with this one
    with pytest.raises(httpx.TimeoutException):  # a queued request whose client gives up
        httpx.post(f"{server.base_url}/completions", json={"prompt": "abandoned"}, timeout=0.3)
    assert "".join(c.choices[0].text for c in stream).endswith("first")
    r = client.completions.create(model="gemma3n-fake", prompt="next", max_tokens=1)
    assert r.choices[0].text == "next"
    assert "abandoned" not in [c["prompt"] for c in fake.calls]


def test_concurrent_requests_are_serialized_and_not_mixed(client, fake):
    fake.overlapped = False

    def ask(i: int) -> tuple[int, str]:
        if i % 2:
            r = client.chat.completions.create(
                model="gemma3n-fake", messages=[{"role": "user", "content": f"req{i} slow"}], max_tokens=2
            )
            return i, r.choices[0].message.content
        stream = client.completions.create(model="gemma3n-fake", prompt=f"req{i} slow", max_tokens=2, stream=True)
        return i, "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert all(text == f"req{i} slow" for i, text in results)
    assert not fake.overlapped


def test_health_counts_queue(server):
    r = httpx.get(f"{server.url}/health", timeout=20).json()
    assert r["status"] == "ok" and r["model"] == "gemma3n-fake" and r["queued"] == 0


def test_cli_serve_binds_loopback_by_default(monkeypatch):
    from gemma3n.cli import build_parser

    monkeypatch.delenv("GEMMA3N_API_KEY", raising=False)
    a = build_parser().parse_args(["serve"])
    assert (a.host, a.port, a.api_key, a.model) == ("127.0.0.1", 8000, None, None)
    a = build_parser().parse_args(["serve", "-m", "ckpt", "--api-key", "k", "--port", "9000"])
    assert (a.model, a.api_key, a.port) == ("ckpt", "k", 9000)


CALL = '{"name": "lookup", "parameters": {"word": "x"}}'
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_auto_tool_choice_reads_a_reply_in_call_form(client, stream):
    """With tool_choice auto the model decides; a reply spelled as a call becomes tool_calls,
    anything else stays content (the fake echoes the user's text)."""
    for text, is_call in ((CALL, True), ("no call here", False)):
        kw = dict(model="gemma3n-fake", messages=[{"role": "user", "content": text}], tools=[LOOKUP])
        kw["max_tokens"] = len(text.split())
        if stream:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
            args = "".join(d.function.arguments or "" for d in deltas)
        else:
            message = client.chat.completions.create(**kw).choices[0]
            finish, content = message.finish_reason, message.message.content
            deltas = message.message.tool_calls or []
            args = deltas[0].function.arguments if deltas else ""
        if is_call:
            assert finish == "tool_calls" and not content and deltas[0].function.name == "lookup"
            assert json.loads(args) == {"word": "x"}
        else:
            assert content == text and not deltas and finish == "length"
