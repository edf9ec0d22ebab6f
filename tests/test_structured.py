"""Structured output, log-probabilities, n and tools in the Python API and the CLI (the server's
versions are in test_server_api.py): constrained replies, schema errors that name the feature,
the tool-call prompt, parsing and streaming of calls."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel, Field

import gemma3n
from gemma3n.errors import InputError
from gemma3n.structured import SchemaError, closed_objects, grammar_for
from gemma3n.tools import INSTRUCTION, CallDelta, CallStreamer, parse_calls, render_messages

ASK = [{"role": "user", "content": "A verse, please."}]
FN = {
    "name": "lookup",
    "description": "find a word",
    "parameters": {"type": "object", "properties": {"w": {"type": "string"}}},
}


class Verse(BaseModel):
    book: str = Field(max_length=10)
    verse: int = Field(ge=1, le=99)


@pytest.fixture(scope="module")
def model():
    return gemma3n.load()


def test_a_pydantic_model_constrains_the_reply(model):
    r = model.generate(messages=ASK, response_format=Verse, temperature=0.7, seed=3, max_tokens=60)
    assert r.finish_reason == "stop"
    assert Verse.model_validate_json(r.text)


@pytest.mark.parametrize(
    "schema,feature",
    [({"type": "array", "uniqueItems": True}, "uniqueItems"), ({"if": {}, "then": {}}, "if"),
     ({"type": "string", "format": "bogus"}, "bogus"), ({"$ref": "#/nowhere"}, "nowhere")],
)  # fmt: skip
def test_what_cannot_be_enforced_is_named(schema, feature):
    with pytest.raises(SchemaError, match=feature) as err:
        grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert err.value.param == "response_format"


def test_bad_response_formats_are_input_errors(model):
    for fmt in ({"type": "xml"}, "json", {"type": "json_schema", "json_schema": {"schema": 5}}):
        with pytest.raises(InputError):
            model.generate(messages=ASK, response_format=fmt, max_tokens=1)


def test_strict_closes_objects_without_touching_constants():
    schema = {
        "type": "object",
        "properties": {"a": {"const": {"properties": 1}}, "b": {"type": "object", "properties": {}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["b"]["additionalProperties"] is False
    assert closed["properties"]["a"] == {"const": {"properties": 1}}


def test_logprobs_n_and_the_prompts_scores(model):
    results = model.generate("And God said", n=2, seed=4, max_tokens=4, temperature=1, logprobs=True, top_logprobs=2)
    assert [r.index for r in results] == [0, 1] and all(len(r.logprobs) == len(r.token_ids) for r in results)
    for r, seed in zip(results, (4, 5)):
        assert r.text == model.generate("And God said", seed=seed, max_tokens=4, temperature=1).text
        assert all(e.logprob <= 0 and len(e.top) == 2 and e.top[0].logprob >= e.top[1].logprob for e in r.logprobs)
    scored = model.generate("And God said", max_tokens=0, prompt_logprobs=True)
    ids = [e.token_id for e in scored.prompt_logprobs]
    logp = torch.log_softmax(model.logits(torch.tensor([ids]))[0], -1)
    assert scored.prompt_logprobs[0].logprob is None and scored.text == "" and scored.finish_reason == "length"
    assert [e.logprob for e in scored.prompt_logprobs[1:]] == pytest.approx(
        [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-5
    )
    with pytest.raises(InputError, match="max_tokens"):
        model.generate("x", max_tokens=0)
    with pytest.raises(InputError, match="n must be"):
        model.generate("x", n=0)


def test_tools_render_as_googles_json_convention():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Define grace."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"w": "grace"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "favour"},
        {"role": "user", "content": "Thanks."},
    ]  # fmt: skip
    turns = render_messages(history, [FN], "auto")
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Be brief.\n\n" + INSTRUCTION) and '"name": "lookup"' in turns[0]["content"]
    assert turns[2]["content"] == '{"name": "lookup", "parameters": {"w": "grace"}}'
    assert turns[3]["content"] == "```tool_output\nfavour\n```\nThanks."
    assert render_messages(history[:2], [FN], "none")[0]["content"] == "Be brief."


def test_calls_are_parsed_bare_fenced_or_listed():
    one = parse_calls('{"name": "lookup", "parameters": {"w": "x"}}', [FN])
    assert one[0]["function"] == {"name": "lookup", "arguments": '{"w": "x"}'} and one[0]["id"].startswith("call_")
    assert parse_calls('```json\n[{"name": "lookup", "parameters": {}}]\n```', [FN])[0]["function"]["name"] == "lookup"
    assert parse_calls('{"name": "other", "parameters": {}}', [FN]) is None
    assert parse_calls("plain words", [FN]) is None


def test_a_forced_call_streams_its_arguments_and_holds_the_closing_brace():
    streamer = CallStreamer([FN], forced=True)
    text = '{"name": "lookup", "parameters": {"w": "grace"}}'
    out = [d for i in range(0, len(text), 5) for d in streamer.feed(text[i : i + 5])] + list(streamer.finish())
    assert all(isinstance(d, CallDelta) for d in out) and out[0].name == "lookup" and out[0].arguments == ""
    assert "".join(d.arguments for d in out) == '{"w": "grace"}' and streamer.calls is not None


def test_tools_in_the_python_api(model):
    tool = {
        "type": "function",
        "function": {**FN, "parameters": {"type": "object", "properties": {"w": {"enum": ["a", "b"]}}}},
    }
    r = model.generate(messages=ASK, tools=[tool], tool_choice="required", temperature=0, max_tokens=64)
    assert r.finish_reason == "tool_calls" and json.loads(r.tool_calls[0]["function"]["arguments"])["w"] in "ab"
    with pytest.raises(InputError, match="needs tools"):
        model.generate(messages=ASK, tool_choice="required", max_tokens=1)


def test_cli_json_schema(tmp_path, capsys):
    from gemma3n.cli import main

    schema = tmp_path / "verse.json"
    schema.write_text(json.dumps({**Verse.model_json_schema(), "additionalProperties": False}))
    assert main(["generate", "-p", "A verse", "--json-schema", str(schema), "--temp", "0", "--max-tokens", "60"]) == 0
    assert Verse.model_validate_json(capsys.readouterr().out)
    schema.write_text('{"type": "array", "uniqueItems": true}')
    assert main(["generate", "-p", "x", "--json-schema", str(schema)]) == 2
    assert "uniqueItems" in capsys.readouterr().err
    assert main(["generate", "-p", "x", "--json", "--json-schema", str(schema)]) == 2
