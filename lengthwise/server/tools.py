"""Tool calls in chat completions: the request's `tools` go to the chat template, and a parser
reads the calls back out of the generated text (vLLM's `--tool-call-parser`).

`hermes` is the format of Qwen2.5/Qwen3 (and Hermes) chat templates: each call is a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`, after any plain text
the model writes first. The parser works on text, so it also serves a stream: the text before
the first `<tool_call>` streams as content, a tail that may be the start of the tag is held back,
and each call streams as its name and then its arguments' fragments (`ToolCallStream`).
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
    """One streamed choice: its text so far, split into content to send now and tool-call deltas.

    With the hermes parser a call streams as OpenAI streams one: a first delta with its `id`,
    `type` and `function.name` (and empty `arguments`) once `{"name": ..., "arguments": ` has been
    written, then the arguments object's text in fragments as it is written (the model's own
    spelling of the JSON, which parses to the same object the whole response reports). A block in
    another shape (arguments before the name, arguments as a JSON string) waits and goes out whole
    when the choice ends, as do the calls of `ForcedToolCalls`. The calls count only if the whole
    text parses at the end (`has_calls`); a call cut by max_tokens leaves the fragments already
    sent, and the rest of the text follows as content, as the non-streamed response reports it."""

    def __init__(self, parser: HermesToolParser | ForcedToolCalls) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0
        self.has_calls = False
        self._calls: list[_StreamedCall] = []  # calls whose head went out, in order
        self._whole = False  # a block that does not stream: it and the ones after go out at the end

    def feed(self, new: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """The content to send for `new` text, and the tool-call deltas (OpenAI's `delta.tool_calls`)."""
        self.text += new
        deltas = self._stream_calls() if isinstance(self.parser, HermesToolParser) else []
        if finished:
            _, calls = self.parser.parse(self.text)
            self.has_calls = bool(calls)
            end = self.text.find(self.parser.start) if calls else len(self.text)
            for i, call in enumerate(calls[len(self._calls):], start=len(self._calls)):
                deltas.append(call.to_openai(i))  # the calls that did not stream, whole
        else:
            end = self.parser.content_end(self.text)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out, deltas

    def _stream_calls(self) -> list[dict[str, Any]]:
        at = self.text.find(HermesToolParser.start)
        if at == -1 or self._whole:
            return []
        deltas = []
        blocks = list(HermesToolParser._call.finditer(self.text, at))
        if self.parser.single:
            blocks = blocks[:1]
        for k, block in enumerate(blocks):
            if k == len(self._calls):  # its head not sent yet
                if k and not self._calls[-1].closed:
                    break
                head = _HEAD.match(block.group(1))
                if head is None:  # not yet, or (once the block has closed) not at all
                    self._whole = block.group(0).endswith("</tool_call>")
                    break
                call = _StreamedCall(ToolCall(json.loads(head.group(1)), ""), block.start(1) + head.end())
                self._calls.append(call)
                deltas.append(call.call.to_openai(k))
            fragment = self._calls[k].advance(self.text, block.end(1))
            if fragment:
                deltas.append({"index": k, "function": {"arguments": fragment}})
        return deltas


# The start of a hermes call that can stream: its name, then its arguments (or "parameters") as an object.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


@dataclass
class _StreamedCall:
    """A call whose head went out: where its arguments object starts in the text, how far it has
    been read (with the JSON state needed to find its end: depth, inside a string, after a `\\`)."""

    call: ToolCall
    start: int
    read: int = 0
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    closed: bool = False

    def advance(self, text: str, stop: int) -> str:
        """The arguments' text from where the last call left off to `stop` (or the object's end)."""
        i = begin = self.start + self.read
        while i < stop and not self.closed:
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch == "{" or ch == "[":
                self.depth += 1
            elif ch == "}" or ch == "]":
                self.depth -= 1
                self.closed = self.depth == 0
            i += 1
        self.read = i - self.start
        return text[begin:i]
