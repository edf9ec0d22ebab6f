"""The API real clients use, through the unmodified `openai` client against the embedded model:
structured output (parse, streamed), tool calls (a whole round trip, streamed deltas),
log-probabilities equal to `Model.logits`, n continuations, echo with max_tokens 0."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
from pydantic import BaseModel, Field  # noqa: E402

import gemma3n  # noqa: E402
from gemma3n.server import BackgroundServer, create_app  # noqa: E402

ASK = [{"role": "user", "content": "Name a book of the law and a chapter of it."}]


class Citation(BaseModel):
    book: Literal["Genesis", "Exodus", "Leviticus"]
    chapter: int = Field(ge=1, le=50)
    holy: bool
    note: str = Field(max_length=16)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Jerusalem", "Babylon", "Nineveh"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def model():
    return gemma3n.load()


@pytest.fixture(scope="module")
def client(model):
    with BackgroundServer(create_app(model)) as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)


def _logprobs_of(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model.logits(torch.tensor([ids]))[0], dim=-1)


# --- structured output -------------------------------------------------------------------------------


def test_parse_returns_the_pydantic_object(client):
    r = client.chat.completions.parse(
        model="gemma3n-tiny", messages=ASK, response_format=Citation, temperature=0, max_tokens=64
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Citation) and r.choices[0].finish_reason == "stop"
    assert Citation.model_validate_json(r.choices[0].message.content) == parsed


def test_parse_streamed(client):
    plain = client.chat.completions.parse(
        model="gemma3n-tiny", messages=ASK, response_format=Citation, temperature=0, max_tokens=64
    )
    with client.chat.completions.stream(
        model="gemma3n-tiny", messages=ASK, response_format=Citation, temperature=0, max_tokens=64
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 3  # it streamed, piece by piece
    assert final.choices[0].message.parsed == plain.choices[0].message.parsed


def test_every_seeded_json_reply_validates_against_its_schema(client):
    schema = Citation.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "citation", "schema": schema, "strict": True}}
    replies = []
    for seed in (1, 2, 3):  # 3 x n=4: twelve samples at temperature 1
        r = client.chat.completions.create(
            model="gemma3n-tiny", messages=ASK, response_format=fmt, temperature=1, seed=seed, n=4, max_tokens=64
        )
        replies += r.choices
    assert len(replies) == 12 and len({c.message.content for c in replies}) > 3
    for choice in replies:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_mode_is_json_or_cut_by_length(client):
    r = client.chat.completions.create(
        model="gemma3n-tiny",
        messages=ASK,
        response_format={"type": "json_object"},
        temperature=1,
        seed=5,
        n=4,
        max_tokens=12,
    )
    for choice in r.choices:
        text = choice.message.content
        assert text.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # the partial text, said to be cut
            assert choice.finish_reason == "length"


def test_completions_take_response_format_too(client):
    r = client.completions.create(
        model="gemma3n-tiny",
        prompt="The answer as JSON: ",
        max_tokens=40,
        temperature=0,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
        },
    )
    assert r.choices[0].text in ("true", "false") and r.choices[0].finish_reason == "stop"


def test_unsupported_schema_feature_is_a_400_naming_it(client):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="gemma3n-tiny",
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
        )
    assert "uniqueItems" in err.value.message and err.value.code == "unsupported_schema_feature"


# --- tools ---------------------------------------------------------------------------------------------


def test_tool_call_round_trip(client):
    history = [{"role": "user", "content": "What is the weather in Babylon?"}]
    r = client.chat.completions.create(
        model="gemma3n-tiny", messages=history, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Jerusalem", "Babylon", "Nineveh")
    history += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear", "wind": "east"})},
    ]
    final = client.chat.completions.create(
        model="gemma3n-tiny", messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=8
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    alone = client.chat.completions.create(model="gemma3n-tiny", messages=history[:1], max_tokens=1)
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result were in the prompt


def test_tool_call_streams_as_deltas(client):
    kw = dict(
        model="gemma3n-tiny",
        messages=[{"role": "user", "content": "Weather in Nineveh?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=64,
    )
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2  # the arguments arrive in pieces
    assert "".join(d.function.arguments or "" for d in deltas) == plain.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# --- log-probabilities, n, echo --------------------------------------------------------------------------


def test_chat_logprobs_equal_model_logits_streamed_or_not(client, model):
    kw = dict(model="gemma3n-tiny", messages=ASK, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    prompt = model.prepare(messages=ASK)[0].ids
    direct = model.generate(messages=ASK, temperature=0, max_tokens=6)
    assert [c.token for c in content] == [model.token_table.entry(t, 0).token for t in direct.token_ids]
    expected = _logprobs_of(model, prompt + direct.token_ids)
    for k, c in enumerate(content):
        row = expected[len(prompt) - 1 + k]
        assert c.logprob == pytest.approx(float(row.max()), abs=1e-3)  # greedy: the top token
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-3)
    streamed = [lp for ch in client.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for lp in ch.choices[0].logprobs.content]  # fmt: skip
    assert [(c.token, round(c.logprob, 4)) for c in streamed] == [(c.token, round(c.logprob, 4)) for c in content]


def test_n_continuations_are_the_seeds_seed_plus_i(client, model):
    r = client.chat.completions.create(model="gemma3n-tiny", messages=ASK, n=3, seed=11, temperature=1, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, choice in enumerate(r.choices):
        alone = model.generate(messages=ASK, seed=11 + i, temperature=1, max_tokens=5)
        assert choice.message.content == alone.text and choice.finish_reason == alone.finish_reason
    assert r.usage.completion_tokens == 15 and r.usage.prompt_tokens == alone.prompt_tokens


def test_echo_with_max_tokens_0_scores_the_prompt(client, model):
    ids = model.tokenizer.encode("In the beginning God created the heaven", add_special_tokens=True)
    r = client.completions.create(model="gemma3n-tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = _logprobs_of(model, ids)
    want = [float(expected[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text.endswith("God created the heaven")
