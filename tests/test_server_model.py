"""The real server in front of a real (tiny) model, driven by the official openai client."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import gemma3n  # noqa: E402
from gemma3n.server import BackgroundServer, create_app  # noqa: E402

GREEDY = {"temperature": 0.0, "max_tokens": 4}
HALF = "gemma3n-tiny-half"  # a custom elastic size: every FFN at half width


@pytest.fixture(scope="module")
def model():
    return gemma3n.load()


@pytest.fixture(scope="module")
def server(model):
    half = {"ffn": [w // 2 for w in model.config.text.intermediate_size]}
    with BackgroundServer(create_app(model, max_queue=16, sizes={HALF: half})) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def chat(client, model_id, text, **kw):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}], **kw)


def test_chat_stream_and_non_stream_agree(client, model_id):
    r = chat(client, model_id, "Hello, who are you?", **GREEDY)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(
        chat(
            client,
            model_id,
            "Hello, who are you?",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_usage_and_stop(client, model_id):
    r = client.completions.create(model=model_id, prompt="The sea is", temperature=0.0, max_tokens=12)
    text = r.choices[0].text
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    cut = next((i for i in range(1, len(text)) if text[i].isascii() and text[i].isalnum()), None)
    if cut is None:
        pytest.skip(f"the tiny model's greedy text {text!r} is too short to place a stop string in")
    stop = text[cut]
    s = client.completions.create(model=model_id, prompt="The sea is", temperature=0.0, max_tokens=12, stop=[stop])
    assert s.choices[0].text == text[: text.index(stop)] and s.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client, model_id):
    kw = {"temperature": 1.0, "max_tokens": 6, "seed": 1234}
    a, b = (chat(client, model_id, "Tell me a story.", **kw).choices[0].message.content for _ in range(2))
    assert a == b


@pytest.mark.filterwarnings("ignore:.*never a trained granularity")
def test_every_listed_size_is_a_model(client, model, model_id):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == model_id and HALF in ids and len(ids) == 2 + len(model.sizes())
    full, half, again = (
        client.completions.create(model=mid, prompt=[5, 6, 7], temperature=0.0, max_tokens=6)
        for mid in (model_id, HALF, model_id)
    )
    assert (full.model, half.model) == (model_id, HALF)
    assert full.choices[0].text == again.choices[0].text  # a size switch leaves nothing behind
    # The served half size is the Python API's half-width view (whose logits differ from the full
    # model's: the narrow FFNs are really used). Greedy text alone cannot tell them apart on a model
    # trained as a MatFormer: its sub-models are meant to agree with the full model.
    half_size = {"ffn": [w // 2 for w in model.config.text.intermediate_size]}
    same = model.generate([5, 6, 7], size=half_size, temperature=0.0, max_tokens=6)
    assert half.choices[0].text == same.text
    ids = torch.tensor([[2, 5, 6, 7]])
    assert not torch.equal(model.logits(ids, size=half_size), model.logits(ids))


def _png() -> str:
    pil = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    pil.new("RGB", (48, 32), (200, 30, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav() -> str:
    sf = pytest.importorskip("soundfile")
    t = np.arange(8000) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def test_media_errors_are_400(client, model, model_id):
    parts = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]
    if not model.has_vision:
        parts.append({"type": "image_url", "image_url": {"url": _png()}})
    if not model.has_audio:
        parts.append({"type": "input_audio", "input_audio": {"data": _wav(), "format": "wav"}})
    for part in parts:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": [part]}])


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        chat(client, "gemma3n-E99B", "Hi")


def test_disconnect_mid_stream_then_next_request_succeeds(server, client, model_id):
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "stream": True,
    }
    body.update(temperature=1.0, max_tokens=2000)  # long enough that it is still generating when we leave
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health", timeout=10).json()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health", timeout=10).json()["queued"] == 0, "the abandoned stream kept its slot"
    assert chat(client, model_id, "Hi", **GREEDY).choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_are_not_mixed_up(client, model_id):
    prompts = [f"Question number {i}: what comes next?" for i in range(3)]
    alone = [chat(client, model_id, p, **GREEDY).choices[0].message.content for p in prompts]

    def ask(i: int) -> str:
        if i % 2:
            return chat(client, model_id, prompts[i], **GREEDY).choices[0].message.content
        stream = chat(client, model_id, prompts[i], stream=True, **GREEDY)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts))))
    assert together == alone


def test_follow_up_turns_reuse_their_conversations_cache(client, model, model_id):
    """Clients re-send their conversations, turns interleaved; the server prefills only each new
    turn (usage.prompt_tokens_details.cached_tokens) and answers exactly as a fresh prefill would."""
    talks = [[{"role": "user", "content": "Who was Moses?"}], [{"role": "user", "content": "Where is Zion?"}]]
    firsts = []
    for history in talks:
        first = client.chat.completions.create(model=model_id, messages=history, temperature=0.0, max_tokens=8)
        history += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And then?"},
        ]
        firsts.append(first)
    for history, first in zip(talks, firsts):
        follow = client.chat.completions.create(model=model_id, messages=history, temperature=0.0, max_tokens=8)
        assert follow.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        fresh = model.generate(messages=history, temperature=0.0, max_tokens=8)  # no cache
        assert follow.choices[0].message.content == fresh.text


@pytest.mark.parametrize("limit", [{"prompt_cache_slots": 0}, {"prompt_cache_bytes": 0}])
def test_a_prompt_cache_of_zero_keeps_nothing(model, limit):
    with BackgroundServer(create_app(model, **limit)) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)
        mid = c.models.list().data[0].id
        for _ in range(2):
            r = chat(c, mid, "Who was Moses?", **GREEDY)
            assert r.usage.prompt_tokens_details.cached_tokens == 0
    name = next(iter(limit))
    with pytest.raises(ValueError, match=name):
        create_app(model, **{name: -1})
