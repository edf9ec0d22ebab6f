"""Function calling (OpenAI `tools` / `tool_choice`) for a model without tool tokens.

Convention: Google's "Function calling with Gemma" prompt, JSON variant (ai.google.dev, Gemma
docs, capabilities/function-calling). The instruction and the functions' definitions (a JSON
list of {name, description, parameters}) open the conversation as system text, which Gemma's
template puts at the start of the first user turn, as the guide does; a call is the reply
`{"name": function name, "parameters": {...}}` and nothing else. Results go back as a user turn
holding a ```tool_output block (the Gemma cookbook's spelling). When a call is required or
named, the reply is constrained to that JSON by the grammar of gemma3n.structured; with
`auto` the model chooses, and a reply in that shape is read as a call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .structured import SchemaError, closed_objects, compile_schema, json_schema_of

INSTRUCTION = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
    "You SHOULD NOT include any other text in the response if you call a function\n"
)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_FENCE = re.compile(r"^```[A-Za-z_]*\s*\n?(.*?)\n?```$", re.S)


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's tool list -> the functions ({name, description, parameters}); SchemaError
    (param "tools") naming what is wrong."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise SchemaError("tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
    functions, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise SchemaError(f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}", param=where)
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SchemaError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}", param=where)
        if name in names:
            raise SchemaError(f"{where}: two tools are named {name!r}", param=where)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise SchemaError(f"{where}.function.parameters must be a JSON Schema object", param=where)
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise SchemaError(f"{where}.function.description must be a string", param=where)
        names.add(name)
        functions.append({"name": name, "description": description, "parameters": params})
    return functions


def forced_name(tool_choice: Any, functions: list[dict[str, Any]]) -> str | None:
    """The function a named tool_choice requires (None for auto / none / required)."""
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not functions:
            raise SchemaError("tool_choice 'required' needs tools", param="tool_choice")
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise SchemaError(
            "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if name not in {f["name"] for f in functions}:
        raise SchemaError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return name


def call_schema(functions: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON Schema a reply must match when a call is required (any function) or named."""
    name = forced_name(tool_choice, functions)
    if tool_choice != "required" and name is None:
        return None
    # a function takes the arguments it declares: undeclared ones are never generated
    chosen = [f for f in functions if name is None or f["name"] == name]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "parameters": closed_objects(f["parameters"])},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def reply_form(
    messages: list[dict[str, Any]] | None, response_format: Any, tools: Any, tool_choice: Any
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Messages with tools and tool turns rendered, and the grammar the reply must follow (None:
    free text). SchemaError names the request field that cannot be served."""
    functions = check_tools(tools)
    if tool_choice is not None and not functions:
        raise SchemaError("tool_choice needs tools", param="tool_choice")
    if functions and messages is None:
        raise SchemaError("tools need a chat (messages), not a raw prompt", param="tools")
    call = call_schema(functions, tool_choice) if functions else None
    schema = json_schema_of(response_format)
    if call is not None and schema is not None:
        raise SchemaError("a required tool call and response_format both decide the reply: send one of them")
    if messages is not None:
        messages = render_messages(messages, functions, tool_choice)
    if call is None:
        return messages, None if schema is None else compile_schema(schema)
    try:
        return messages, compile_schema(call)
    except SchemaError as exc:  # a function's parameters: the tools field is at fault
        raise SchemaError(str(exc).replace("response_format:", "tools:", 1), param="tools", code=exc.code) from None


def render_messages(
    messages: list[dict[str, Any]], functions: list[dict[str, Any]], tool_choice: Any
) -> list[dict[str, Any]]:
    """A chat with tools, tool calls and tool results -> the plain turns Gemma's template takes."""
    out: list[dict[str, Any]] = []
    if functions and tool_choice != "none":
        out.append({"role": "system", "content": INSTRUCTION + json.dumps(functions, indent=2, ensure_ascii=False)})
    for msg in messages:
        turn = _plain_turn(msg)
        if turn["role"] == "system" and out and out[-1]["role"] == "system":
            out[-1] = {"role": "system", "content": f"{_text(turn['content'])}\n\n{out[-1]['content']}"}
        elif out and turn["role"] == "user" and out[-1]["role"] == "user" and msg.get("role") == "tool":
            out[-1] = {"role": "user", "content": _join(out[-1]["content"], turn["content"])}
        elif out and turn["role"] == "user" and out[-1].get("_tool"):
            out[-1] = {"role": "user", "content": _join(out[-1]["content"], turn["content"])}
        else:
            out.append(turn)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def _plain_turn(msg: dict[str, Any]) -> dict[str, Any]:
    role = msg.get("role")
    if role == "tool":  # results answer the model's calls from the user's side of the chat
        body = msg.get("content")
        body = body if isinstance(body, str) else _text(body or [])
        return {"role": "user", "content": f"```tool_output\n{body}\n```", "_tool": True}
    calls = msg.get("tool_calls") if role == "assistant" else None
    if calls:
        text = _text(msg.get("content") or "")
        rendered = [_call_text(c) for c in calls]
        body = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
        return {"role": "assistant", "content": f"{text}\n{body}".strip()}
    return {"role": role, "content": msg.get("content") if msg.get("content") is not None else ""}


def _call_text(call: dict[str, Any]) -> str:
    """An assistant's earlier call, spelled as the model is asked to spell calls."""
    fn = call.get("function", {}) if isinstance(call, dict) else {}
    args = fn.get("arguments", "{}")
    try:
        params = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        params = args  # shown as sent: the model sees what it (or the client) wrote
    return json.dumps({"name": fn.get("name"), "parameters": params}, ensure_ascii=False)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def _join(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, str):
        return f"{a}\n{b}"
    as_parts = lambda c: [{"type": "text", "text": c}] if isinstance(c, str) else list(c)  # noqa: E731
    return as_parts(a) + [{"type": "text", "text": "\n"}] + as_parts(b)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str, functions: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """A reply -> OpenAI tool_calls (arguments as a JSON string), or None if it is not a call
    to one of `functions`. Takes one call or a list of them, bare or in a ``` fence."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if body[:1] not in ("{", "["):
        return None
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {f["name"] for f in functions}
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        params = item.get("parameters", item.get("arguments", {}))
        if not isinstance(params, dict):
            return None
        args = json.dumps(params, ensure_ascii=False)
        calls.append({"id": new_call_id(), "type": "function", "function": {"name": item["name"], "arguments": args}})
    return calls or None


@dataclass
class CallDelta:
    """A streamed piece of a tool call: the first of a call has id and name, then arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


_CALL_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "parameters": ')


class CallStreamer:
    """Turns a reply's text pieces into content and tool-call deltas as they arrive.

    A constrained call (required / named) has one spelling, `{"name": "f", "parameters": ARGS}`
    (gemma3n.structured.JSON_STYLE), so its arguments stream as they are decoded, the final `}`
    held back. With `auto`, a reply that may be a call (it opens with `{`, `[` or a fence) is
    held until it ends and then parsed; any other streams as content."""

    def __init__(self, functions: list[dict[str, Any]], forced: bool) -> None:
        self.functions, self.forced = functions, forced
        self.text, self.sent = "", 0
        self.call_id: str | None = None
        self.calls: list[dict[str, Any]] | None = None
        self._holding = forced

    def feed(self, piece: str) -> Iterator[str | CallDelta]:
        self.text += piece
        if self.forced:
            yield from self._forced_deltas(final=False)
            return
        if not self._holding and self.sent == 0 and self.text.strip():
            self._holding = self.text.lstrip()[:1] in ("{", "[", "`")
        if not self._holding and self.text.strip():
            yield self.text[self.sent :]
            self.sent = len(self.text)

    def finish(self) -> Iterator[str | CallDelta]:
        if self.forced:
            yield from self._forced_deltas(final=True)
            return
        if self._holding:
            self.calls = parse_calls(self.text, self.functions)
            if self.calls is None:
                yield self.text
                return
            for i, call in enumerate(self.calls):
                fn = call["function"]
                yield CallDelta(i, fn["arguments"], id=call["id"], name=fn["name"])
        elif self.sent < len(self.text):
            yield self.text[self.sent :]

    def _forced_deltas(self, final: bool) -> Iterator[CallDelta]:
        if self.call_id is None:
            head = _CALL_HEAD.match(self.text)
            if head is None:
                return
            self.call_id, name = new_call_id(), json.loads(head.group(1))
            self.sent = head.end()
            yield CallDelta(0, "", id=self.call_id, name=name)
        complete = final and self.text.endswith("}") and _is_json(self.text)
        end = len(self.text) - 1 if complete or not final else len(self.text)  # the outer } is not an argument
        if end > self.sent:
            yield CallDelta(0, self.text[self.sent : end])
            self.sent = end
        if final:
            self.calls = parse_calls(self.text, self.functions) if complete else None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
