"""Tool calls in chat completions: the request's `tools` go to the chat template, and a parser
reads the calls back out of the generated text (vLLM's `--tool-call-parser`).

`hermes` is the format of Qwen2.5/Qwen3 (and Hermes) chat templates: each call is a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`, after any plain text
the model writes first. The parser works on text, so it also serves a stream: the text before
the first `<tool_call>` streams as content, a tail that may be the start of the tag is held back,
and the calls go out once the choice ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lengthwise.server.reasoning import partial_tag


@dataclass
class ToolCall:
    """One call, as OpenAI's `message.tool_calls[i]` shows it (`arguments` is a JSON string)."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"chatcmpl-tool-{uuid.uuid4().hex}"

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:  # a stream's delta names the call's place
            out["index"] = index
        return out


class HermesToolParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them (at most one
    with `single`: the request's `parallel_tool_calls: false`)."""

    name = "hermes"
    start = "<tool_call>"
    calls_finish = "tool_calls"  # the finish_reason of a choice with calls
    _call = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def __init__(self, single: bool = False) -> None:
        self.single = single

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole response. Content is the text before the first call, as it
        is (None if empty); text after the calls is dropped, as vLLM does. If any block is not a
        JSON object with a string `name` and object `arguments` (a call cut by max_tokens, say),
        no call is read and the whole text is the content."""
        head, sep, _ = text.partition(self.start)
        if not sep:
            return text, []
        calls = []
        for block in self._call.findall(text[len(head):]):
            try:
                obj = json.loads(block)
            except json.JSONDecodeError:
                return text, []
            args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
            if isinstance(args, str):  # already a JSON string: it must hold an object too
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return text, []
            args = {} if args is None else args
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
                return text, []
            calls.append(ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)))
        return head or None, calls[:1] if self.single else calls

    def content_end(self, text: str) -> int:
        """How much of a partial response may stream as content now: up to the first call's tag,
        less a tail that could be the start of one."""
        at = text.find(self.start)
        return at if at != -1 else len(text) - partial_tag(text, self.start)


class ForcedToolCalls:
    """`tool_choice` "required" or a named function: structured outputs hold the answer to calls,
    so no parser flag is needed (vLLM's way). A named function's answer is its arguments object
    (finish_reason "stop", as OpenAI reports a forced call); "required" is a JSON list of
    `{"name": ..., "parameters": {...}}`, one item with `single` (finish_reason "tool_calls")."""

    start = ""  # no content streams: the calls go out whole at the end

    def __init__(self, tools: list[dict[str, Any]], name: str | None, single: bool = False) -> None:
        functions = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
        if name is not None and name not in functions:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among tools "
                             f"({', '.join(functions)})")
        self.name, self.functions, self.single = name, functions, single
        self.calls_finish = "stop" if name is not None else "tool_calls"

    def schema(self) -> dict[str, Any]:
        """The JSON Schema the answer is held to."""
        if self.name is not None:
            return self.functions[self.name]
        # Each tool's parameters move under $defs/toolN, their own $refs with them, so that
        # references inside them (pydantic's "#/$defs/Model") still resolve, and never clash.
        defs = {f"tool{i}": _rehome(p, f"tool{i}") for i, p in enumerate(self.functions.values())}
        items = [{"type": "object", "properties": {"name": {"const": n}, "parameters": {"$ref": f"#/$defs/tool{i}"}},
                  "required": ["name", "parameters"]} for i, n in enumerate(self.functions)]
        return {"$defs": defs, "type": "array", "items": {"anyOf": items}, "minItems": 1,
                **({"maxItems": 1} if self.single else {})}

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(None, calls); an answer cut before its JSON ended is left as content, with no calls."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if self.name is not None:
            return None, [ToolCall(self.name, json.dumps(value, ensure_ascii=False))]
        return None, [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]

    def content_end(self, text: str) -> int:
        return 0


def _rehome(schema: Any, name: str) -> Any:
    """`schema` with every local `$ref` ("#...") pointing into `#/$defs/<name>`, where it will live."""
    if isinstance(schema, dict):
        return {k: (f"#/$defs/{name}{v[1:]}" if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else _rehome(v, name)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rehome(v, name) for v in schema]
    return schema


PARSERS = {HermesToolParser.name: HermesToolParser}
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def make_parser(name: str | None) -> HermesToolParser | None:
    """The parser called `name` (None: tool calls are not enabled); unknown names are a `ValueError`."""
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is not known (known: {', '.join(PARSERS)})")
    return PARSERS[name]()


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools`: a list of `{"type": "function", "function": {"name", "description"?,
    "parameters"?}}`; a bad one is a `ValueError` naming its place."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools.{i} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
            raise ValueError(f"tools.{i}.function.name must be 1 to 64 letters, digits, '_' or '-' (OpenAI's rule)")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ValueError(f"tools.{i}.function.parameters must be a JSON Schema object")
    return tools


class ToolCallStream:
    """One streamed choice: its text so far, split into content to send now and, once the choice
    ends, its tool calls (sent whole, in one delta)."""

    def __init__(self, parser: HermesToolParser | ForcedToolCalls) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0

    def feed(self, new: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """The content to send for `new` text, and the calls when `finished`."""
        self.text += new
        calls: list[ToolCall] = []
        if finished:
            _, calls = self.parser.parse(self.text)
            end = self.text.find(self.parser.start) if calls else len(self.text)
        else:
            end = self.parser.content_end(self.text)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out, calls
