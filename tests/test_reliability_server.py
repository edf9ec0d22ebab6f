"""The server never answers 500 for what a client sent: every malformed body is a 4xx in
OpenAI's error shape, refused before it reaches the model (deep nesting, oversized bodies,
text that is not Unicode, non-finite numbers, wrong types, schemas and tools it cannot enforce)."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from gemma3n.server import MAX_JSON_DEPTH, create_app, json_depth  # noqa: E402
from tests.test_server import FakeModel  # noqa: E402

LIMIT = 256 * 1024
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _with(**fields) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


def _raw(field: str, literal: str) -> bytes:
    """CHAT plus `"field": <literal>` spliced in as raw JSON text (NaN, escapes, huge numbers)."""
    return json.dumps(CHAT).encode()[:-1] + f', "{field}": {literal}}}'.encode()


@pytest.fixture(scope="module")
def fake() -> FakeModel:
    return FakeModel()


@pytest.fixture(scope="module")
def client(fake):
    with TestClient(create_app(fake, max_body_bytes=LIMIT), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(autouse=True)
def no_server_errors(caplog):
    """Nothing a client sends may make the server log an error (a 500's traceback)."""
    with caplog.at_level(logging.ERROR, logger="gemma3n.server"):
        yield
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _post(client, body: bytes, path: str = "/v1/chat/completions", **headers):
    return client.post(path, content=body, headers={"content-type": "application/json", **headers})


def _assert_error(r, status: int, code: str | None = None, param: str | None = None, match: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in err["message"] and "internal error" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert match.lower() in err["message"].lower(), err["message"]
    return err


def _untouched(fake: FakeModel, before: int) -> None:
    assert len(fake.calls) == before, "a refused request reached the model"


# --- bodies that are not JSON objects ------------------------------------------------------------


@pytest.mark.parametrize(
    "body,match",
    [
        (b'{"messages": [', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}],}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'"just a string"', "must be a JSON object"),
        (b"\xef\xbb\xbf[]", "must be a JSON object"),  # a BOM is tolerated, the array is not
    ],
    ids=["cut", "empty", "trailing-comma", "array", "null", "string", "bom-array"],
)
def test_not_a_json_object(client, fake, body, match):
    before = len(fake.calls)
    _assert_error(_post(client, body), 400, "invalid_json", match=match)
    _untouched(fake, before)


@pytest.mark.parametrize(
    "body,depth",
    [
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 100_001),
        (b'{"messages": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001, 5_001),
        (_raw("tools", "[" * 70 + "]" * 70), 71),
        (b'{"metadata": ' + b"[" * 200_000, 200_001),  # never closed
    ],
    ids=["arrays-100k", "objects-5k", "tools-70", "unclosed-200k"],
)
def test_deep_nesting_is_refused_before_parsing(client, fake, body, depth):
    before = len(fake.calls)
    err = _assert_error(_post(client, body), 400, "invalid_json", match=f"{depth} levels deep")
    assert str(MAX_JSON_DEPTH) in err["message"]
    _untouched(fake, before)


def test_nesting_within_the_limit_is_served(client):
    nested = "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2)  # an ignored field, 1 level below the top
    r = _post(client, _raw("metadata", nested))
    assert r.status_code == 200, r.text


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"a": "[[[[{{{{\\"[[[["}') == 1
    assert json_depth(b'{"a": ["\\\\", [{"b": "]]]]"}]]}') == 4
    assert json_depth(b"") == 0 and json_depth(b"   7 ") == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_413(client, fake, chunked):
    body = _with(messages=[{"role": "user", "content": "x" * LIMIT}])
    before = len(fake.calls)
    if chunked:  # no Content-Length: the limit holds while the body streams in
        r = client.post(
            "/v1/chat/completions",
            content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers={"content-type": "application/json"},
        )
    else:
        r = _post(client, body)
    _assert_error(r, 413, "request_too_large", match=f"larger than {LIMIT} bytes")
    _untouched(fake, before)


# --- text that is not Unicode --------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "\\ude00\\ud83d"}]}', "messages[0].content"),  # reversed pair
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udbff"}]}]}',
            "messages[0].content[0].text",
        ),
        (_raw("stop", '["ok", "\\ud800"]'), "stop[1]"),
        (_raw("model", '"\\ud800"'), "model"),
        (b'{"prompt": "x\\udc00"}', "prompt"),
        (b'{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}', "messages[0]"),  # a key
    ],
    ids=["content", "low-alone", "reversed-pair", "text-part", "stop", "model", "prompt", "key"],
)
def test_lone_surrogates_are_400(client, fake, body, param):
    path = "/v1/completions" if body.startswith(b'{"prompt"') else "/v1/chat/completions"
    before = len(fake.calls)
    _assert_error(_post(client, body, path), 400, "invalid_unicode", param=param, match="not valid Unicode")
    _untouched(fake, before)


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # a surrogate encoded in UTF-8
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # Latin-1
        b'{"messages": [{"role": "user", "content": "\xc3"}]}',  # cut mid-character
    ],
    ids=["ff-fe", "utf8-surrogate", "latin1", "cut-sequence"],
)
def test_bytes_that_are_not_utf8_are_400(client, fake, body):
    before = len(fake.calls)
    _assert_error(_post(client, body), 400, "invalid_json", match="not valid UTF-8")
    _untouched(fake, before)


def test_valid_unicode_passes(client, fake):
    text = "caf\u00e9 \U0001f600 \u0000 \ufeff"  # a real pair, NUL and a BOM inside text are fine
    r = _post(client, json.dumps({**CHAT, "messages": [{"role": "user", "content": text}]}).encode())
    assert r.status_code == 200, r.text
    assert fake.calls[-1]["messages"][-1]["content"] == text


# --- numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 400])
def test_non_finite_sampling_parameters_are_400(client, fake, field, literal):
    before = len(fake.calls)
    err = _assert_error(_post(client, _raw(field, literal)), 400)
    if literal[0].isalpha() or literal.startswith("-I"):
        assert err["code"] == "invalid_json" and f"{literal} is not a JSON value" in err["message"]
    else:  # JSON numbers beyond float range: named by the field they went to
        assert err["param"] == field
    _untouched(fake, before)


# --- wrong types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [1]}, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]},
            "messages[0].content[0].text",
        ),
        ({"messages": [{"role": "user", "content": [{"type": ["text"]}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]}, None),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 5}}]}]}, None),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": "2"}, "max_tokens"),
        ({"top_k": True}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": "usage"}, "stream_options"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop"),
        ({"n": "2"}, "n"),
        ({"model": 5}, "model"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v),
)
def test_wrong_types_are_400(client, fake, fields, param):
    before = len(fake.calls)
    err = _assert_error(_post(client, _with(**fields)), 400)
    if param is not None:
        assert err["param"] == param or err["param"].startswith(param), err
    _untouched(fake, before)


@pytest.mark.parametrize(
    "body",
    [{"prompt": 5}, {"prompt": ["a", 1]}, {"prompt": [[1], "a"]}, {"prompt": {"text": "a"}}, {"prompt": None}],
    ids=["int", "mixed", "nested-mixed", "object", "null"],
)
def test_wrong_completion_prompts_are_400(client, fake, body):
    before = len(fake.calls)
    _assert_error(_post(client, json.dumps(body).encode(), "/v1/completions"), 400, param="prompt")
    _untouched(fake, before)


# --- structured output: what cannot be enforced is refused, never ignored --------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    "fmt,match",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
            "uniqueItems",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, '"not"'),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
            "does not exist",
        ),
    ],
    ids=["uniqueItems", "not", "bad-type", "dangling-ref"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unenforceable_schemas_are_400_naming_the_feature(client, fake, fmt, match, stream, path):
    body = {**(CHAT if "chat" in path else {"prompt": "hi", "max_tokens": 2}), "response_format": fmt, "stream": stream}
    before = len(fake.calls)
    err = _assert_error(_post(client, json.dumps(body).encode(), path), 400, param="response_format", match=match)
    assert err["code"] in ("unsupported_schema_feature", "invalid_schema")
    _untouched(fake, before)


@pytest.mark.parametrize(
    "fields,param,match",
    [
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0]", "letters, digits"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
          {"x": {"type": "array", "contains": {"type": "integer"}}}}}}], "tool_choice": "required"},
         "tools", "contains"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
          "function": {"name": "g"}}}, "tool_choice", "not among the tools"),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ""),
        ({"n": 0}, "n", ""),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "call_1"}]}, "messages[0].role", "tool call"),
    ],
    ids=["tool-name", "tool-schema", "choice-without-tools", "choice-unknown", "top-without-logprobs", "top-21", "n-0",
         "orphan-tool-result"],
)  # fmt: skip
def test_bad_tools_logprobs_and_n_are_400(client, fake, fields, param, match):
    before = len(fake.calls)
    _assert_error(_post(client, _with(**fields)), 400, param=param, match=match)
    _untouched(fake, before)


@pytest.mark.parametrize(
    "body,param",
    [({"prompt": "hi", "max_tokens": 0}, "max_tokens"), ({"prompt": "hi", "suffix": "x"}, "suffix"),
     ({"prompt": ["a"] * 65}, "prompt"), ({"prompt": "hi", "logprobs": 21}, "logprobs")],
    ids=["zero-without-echo", "suffix", "too-many-prompts", "logprobs-21"],
)  # fmt: skip
def test_bad_completion_options_are_400(client, fake, body, param):
    before = len(fake.calls)
    _assert_error(_post(client, json.dumps(body).encode(), "/v1/completions"), 400, param=param)
    _untouched(fake, before)


def test_text_response_format_is_served(client):
    r = _post(client, _with(response_format={"type": "text"}))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# --- the real (tiny) model behind the server ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_client(tiny_text_dir):
    import gemma3n

    # the text decoder alone: the media parts below are refused for want of a tower
    with TestClient(create_app(gemma3n.load(tiny_text_dir)), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0},
        {"temperature": 2, "seed": 2**64 - 1},
        {"temperature": 1e-30, "seed": -(2**63)},
        {"top_k": 10**30, "temperature": 1},
        {"top_p": 1e-300, "temperature": 1},
        {"min_p": 0.999, "temperature": 1},
        {"stop": ["."] * 1000, "seed": 7},
        {"repetition_penalty": 1.1},
        {"repetition_penalty": 1e300},
        {"temperature": 1e-300, "seed": 0},
    ],
    ids=lambda v: json.dumps(v)[:40],
)
def test_extreme_but_valid_sampling_parameters_are_served(tiny_client, fields):
    r = _post(tiny_client, json.dumps({**CHAT, "max_tokens": 1, **fields}).encode())
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path,body,match",
    [
        ("/v1/completions", {"prompt": [10**30]}, "token ids out of range"),
        ("/v1/completions", {"prompt": [-1]}, "token ids out of range"),
        ("/v1/completions", {"prompt": []}, "no tokens"),
        ("/v1/completions", {"prompt": [[]]}, "no tokens"),
        ("/v1/completions", {"prompt": ""}, "empty"),
        ("/v1/completions", {"prompt": [5] * 4096}, "context is 4096 tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "alternate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 2}, "alternate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "<audio_soft_token>"}]}, "placeholder"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklGRg=="}}]}]},
            "no audio tower",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}]},
            "no vision tower",
        ),
    ],
    ids=[
        "id-huge",
        "id-negative",
        "ids-empty",
        "ids-nested-empty",
        "text-empty",
        "too-long",
        "assistant-first",
        "two-users",
        "literal-placeholder",
        "audio-to-text-model",
        "image-to-text-model",
    ],  # fmt: skip
)
def test_inputs_the_model_refuses_are_400(tiny_client, path, body, match):
    _assert_error(_post(tiny_client, json.dumps({"max_tokens": 2, **body}).encode(), path), 400, match=match)
