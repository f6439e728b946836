"""Tool calls in chat completions: the hermes parser on its own, then end to end through the
`openai` client against a server in this process whose sampler is forced to write a tool call
(stories260k cannot write one by itself)."""

from __future__ import annotations

import json

import pytest
from conftest import forced_answer_server, stories_with_template

from lengthwise.server.tools import HermesToolParser, ToolCallStream, check_tools

openai = pytest.importorskip("openai")

TEMPLATE = ("{{ bos_token }}{% if tools %}{{ tools | tojson }}{% endif %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather", "parameters": CITY}}]
ANSWER = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# -- the parser ------------------------------------------------------------------------------------

def test_hermes_parses_content_and_calls():
    p = HermesToolParser()
    content, calls = p.parse(ANSWER + '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>')
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("f", {})]
    assert calls[0].id != calls[1].id and calls[0].to_openai(0)["index"] == 0
    assert p.parse("no calls here") == ("no calls here", [])
    assert p.parse('<tool_call>{"name": "f", "arguments": {}}')[1][0].name == "f"  # unterminated at the end
    assert p.parse('<tool_call>{"name": "f"')[1] == []  # cut mid-call: the text stays content
    assert p.parse('hi <tool_call>["not", "a call"]</tool_call>') == ('hi <tool_call>["not", "a call"]</tool_call>', [])
    assert p.parse('\n<tool_call>{"name": "f", "arguments": {}}</tool_call>')[0] == "\n"  # as it is (vLLM's)
    assert p.parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>')[0] is None
    assert p.parse('<tool_call>{"name": "f", "arguments": null}</tool_call>')[1][0].arguments == "{}"
    assert p.parse('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')[1] == []  # not an object
    two = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert [c.name for c in HermesToolParser(single=True).parse(two)[1]] == ["f"]  # parallel_tool_calls: false


def _stream(parser, text: str, step: int):
    """`text` fed to a `ToolCallStream` `step` characters at a time: (content sent, the tool-call
    deltas with the piece count at which each went out, the stream)."""
    stream, sent, deltas = ToolCallStream(parser), "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for k, piece in enumerate(pieces):
        out, new = stream.feed(piece, k == len(pieces) - 1)
        sent += out
        deltas += [(k, d) for d in new]
    return sent, deltas, stream


def _merged(deltas) -> list[tuple[int, str, str]]:
    """OpenAI clients' way: the deltas of each index merged into (index, name, arguments)."""
    calls: dict[int, list[str]] = {}
    for _, d in deltas:
        fn = d.get("function", {})
        name, args = calls.setdefault(d["index"], ["", ""])
        calls[d["index"]] = [name + (fn.get("name") or ""), args + (fn.get("arguments") or "")]
    return [(i, name, args) for i, (name, args) in sorted(calls.items())]


def test_hermes_stream_holds_back_a_tag_in_the_making():
    p = HermesToolParser()
    assert p.content_end("Let me <tool") == len("Let me ")
    assert p.content_end("a < b") == len("a < b")
    for step in (1, 3, 7, 200):  # any split of the answer into deltas sends the same
        sent, deltas, stream = _stream(p, ANSWER, step)
        assert sent == "Let me check." and stream.has_calls
        assert _merged(deltas) == [(0, "get_weather", '{"city": "Paris"}')]
        head = deltas[0][1]
        assert head["id"].startswith("chatcmpl-tool-") and head["type"] == "function"
    stream = ToolCallStream(p)
    assert stream.feed("x <tool_c", False)[0] == "x " and stream.feed("", True) == ("<tool_c", [])


def test_hermes_stream_sends_each_call_as_it_is_written():
    """The name as soon as `"arguments": {` is written, then the arguments in fragments (braces and
    quotes inside strings do not end them), the second call after the first; the merged deltas
    are the calls the whole response reports."""
    args = '{"q": "a } b \\" {", "n": [1, {"x": 2}]}'
    text = (f'Sure.<tool_call>\n{{"name": "search", "arguments": {args}}}\n</tool_call>\n'
            '<tool_call>{"name": "f", "parameters": {}}</tool_call> trailing text')
    sent, deltas, stream = _stream(HermesToolParser(), text, 1)
    assert sent == "Sure." and stream.has_calls
    assert _merged(deltas) == [(0, "search", args), (1, "f", "{}")]
    assert json.loads(_merged(deltas)[0][2]) == json.loads(HermesToolParser().parse(text)[1][0].arguments)
    head_at = text.index('"arguments": ') + len('"arguments": ')  # the head goes out with the `{`
    assert deltas[0][0] == head_at and deltas[0][1]["function"] == {"name": "search", "arguments": ""}
    assert sum(d["index"] == 0 and "arguments" in d["function"] for _, d in deltas[1:]) > 10  # fragments
    last_of_first = max(k for k, d in deltas if d["index"] == 0)
    assert last_of_first < text.index("</tool_call>") and min(k for k, d in deltas if d["index"] == 1) > last_of_first
    # parallel_tool_calls: false streams the first call only
    assert [i for i, _, _ in _merged(_stream(HermesToolParser(single=True), text, 5)[1])] == [0]


def test_hermes_stream_sends_other_shapes_whole_and_cut_calls_as_content():
    p = HermesToolParser()
    odd = '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call><tool_call>{"name": "g", "arguments": {}}'
    sent, deltas, stream = _stream(p, odd, 2)
    assert stream.has_calls and {k for k, _ in deltas} == {len(range(0, len(odd), 2)) - 1}  # both at the end, whole
    assert _merged(deltas) == [(0, "f", '{"a": 1}'), (1, "g", "{}")]
    cut = 'Hi<tool_call>{"name": "f", "arguments": {"a": "unfinish'
    sent, deltas, stream = _stream(p, cut, 3)
    assert not stream.has_calls and sent == cut  # as the non-streamed response: all of it content
    assert _merged(deltas) == [(0, "f", '{"a": "unfinish')]  # what streamed before the cut stays sent


def test_an_assistant_turns_call_arguments_reach_the_template_as_a_dict():
    """OpenAI sends a call's arguments as a JSON string; templates render them as a dict."""
    from lengthwise.engine.llm import chat_messages

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    broken = {"function": {"arguments": "{"}}
    turn = chat_messages([{"role": "assistant", "content": None, "tool_calls": [call, broken]},
                          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])[0]
    assert turn["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert turn["tool_calls"][1]["function"]["arguments"] == "{"  # not JSON: left as it came
    assert call["function"]["arguments"] == '{"city": "Paris"}'  # the caller's message is not changed


def test_required_calls_keep_each_tools_own_definitions():
    """tool_choice "required" lists every tool in one schema: each tool's $defs (pydantic's nested
    models) still resolve, and two tools' definitions of one name do not clash."""
    from lengthwise.server.tools import ForcedToolCalls
    from lengthwise.structured.grammar import json_schema_grammar

    def tool(name: str, inner: dict) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": {
            "$defs": {"P": inner}, "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]}}}

    g = json_schema_grammar(ForcedToolCalls([tool("f", {"type": "integer"}), tool("g", {"type": "string"})],
                                            None).schema())

    def ok(text: str) -> bool:
        state = g.advance_bytes(g.initial(), text.encode())
        return state is not None and g.accepts(state)

    assert ok('[{"name": "f", "parameters": {"p": 1}}, {"name": "g", "parameters": {"p": "s"}}]')
    assert not ok('[{"name": "g", "parameters": {"p": 1}}]') and not ok("[]")


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "must be a list"), ([{"type": "code"}], "tools.0 must be"),
    ([{"type": "function", "function": {"name": ""}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "get weather"}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters must be"),
])
def test_bad_tools_name_their_place(tools, message):
    with pytest.raises(ValueError, match=message):
        check_tools(tools)


# -- end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """A server with --tool-call-parser hermes on a stories260k copy whose template shows the tools;
    its sampler writes ANSWER (then the end token) for every chat whose prompt mentions a tool."""
    d = stories_with_template(tmp_path_factory, TEMPLATE)

    def answer(tok):  # noqa: ANN001, ANN202
        # (an <unk> before the call: a special token, kept in the text of a tools request as vLLM
        # keeps them, so a tokenizer that marks <tool_call> special still shows the parser its tags)
        return (tok.encode("Let me check.", add_special_tokens=False) + [tok.token_to_id("<unk>")]
                + tok.encode(ANSWER[len("Let me check."):], add_special_tokens=False))

    with forced_answer_server(d, ["--tool-call-parser", "hermes"], answer, "get_weather") as client:
        yield client


def test_tool_calls_come_back_as_openai_tool_calls(tool_server):
    """The template sees the tools; the answer's call comes back in message.tool_calls (arguments a
    JSON string), the text before it as content, finish_reason "tool_calls"; a stream sends the
    same content and calls. tool_choice "none" reads no calls."""
    kw = dict(model="stories", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=80,
              temperature=0)
    plain = tool_server.chat.completions.create(**kw)
    r = tool_server.chat.completions.create(**kw, tools=TOOLS)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools were rendered into the prompt
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content.strip() == "Let me check.<unk>"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("chatcmpl-tool-")
    chunks = [c.choices[0] for c in tool_server.chat.completions.create(**kw, tools=TOOLS, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == choice.message.content
    streamed = [tc for c in chunks for tc in (c.delta.tool_calls or [])]
    assert len(streamed) > 2 and streamed[0].id.startswith("chatcmpl-tool-")  # the head, then fragments
    assert streamed[0].function.name == "get_weather" and all(tc.index == 0 for tc in streamed)
    assert json.loads("".join(tc.function.arguments or "" for tc in streamed)) == {"city": "Paris"}
    assert chunks[-1].finish_reason == "tool_calls"
    none = tool_server.chat.completions.create(**kw, tools=TOOLS, tool_choice="none").choices[0]
    assert none.finish_reason == "stop" and "<tool_call>" in none.message.content and not none.message.tool_calls
    with pytest.raises(openai.BadRequestError, match="tool_choice must be"):
        tool_server.chat.completions.create(**kw, tools=TOOLS, tool_choice="always")
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        tool_server.chat.completions.create(**kw, tool_choice="auto")
    with pytest.raises(openai.BadRequestError, match="tools.0"):
        tool_server.chat.completions.create(**kw, tools=[{"type": "function", "function": {}}])


# A Qwen2.5-style template (its tool parts): tools listed as JSON, calls and tool results rendered.
QWEN_STYLE = """{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}
{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}
{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}{{- tool_call.arguments | tojson }}
{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def test_a_qwen_style_template_renders_tools_calls_and_results(tmp_path_factory):
    """The conversation of a tool round trip, as the server hands it to the template: the tools
    as JSON, the assistant's call with its arguments as an object, the tool's answer."""
    from lengthwise.engine.llm import chat_messages
    from lengthwise.tokenizer import Tokenizer

    tok = Tokenizer(stories_with_template(tmp_path_factory, QWEN_STYLE))
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = chat_messages([{"role": "user", "content": "Weather in Paris?"},
                              {"role": "assistant", "content": None, "tool_calls": [call]},
                              {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    text = tok.apply_chat_template(messages, tools=TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.endswith("<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_a_tool_use_template_renders_requests_with_tools(tmp_path_factory):
    """Hermes checkpoints ship named templates; with tools, "tool_use" renders (transformers' choice)."""
    from lengthwise.tokenizer import Tokenizer

    d = stories_with_template(tmp_path_factory, "")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tool_use = "{{ tools[0].function.name }}: {{ messages[0]['content'] }}"
    cfg["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] }}"},
                            {"name": "tool_use", "template": tool_use}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(d)
    hi = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(hi) == "hi" and tok.apply_chat_template(hi, tools=TOOLS) == "get_weather: hi"


# Tools the forcing sampler does not know (their names never trigger ANSWER): answers are the model's
# own, held to the calls by structured outputs.
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def test_forced_tool_choice_holds_the_answer_to_calls(tool_server):
    """A named function: its arguments object, finish_reason "stop" (OpenAI's for a forced call);
    "required": one call or more among the tools, finish_reason "tool_calls"; streamed the same."""
    kw = dict(model="stories", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=80,
              temperature=1.0, seed=2)
    named = {"type": "function", "function": {"name": "lookup"}}
    choice = tool_server.chat.completions.create(**kw, tools=[LOOKUP, ADD], tool_choice=named).choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "stop" and choice.message.content is None and call.function.name == "lookup"
    assert set(json.loads(call.function.arguments)) == {"q"} and len(json.loads(call.function.arguments)["q"]) <= 8
    chunks = [c.choices[0] for c in tool_server.chat.completions.create(**kw, tools=[LOOKUP, ADD], tool_choice=named,
                                                                        stream=True) if c.choices]
    streamed = [tc for c in chunks for tc in (c.delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [("lookup", call.function.arguments)]
    assert not "".join(c.delta.content or "" for c in chunks)

    for single in (False, True):
        r = tool_server.chat.completions.create(**dict(kw, max_tokens=120), tools=[LOOKUP, ADD], tool_choice="required",
                                                parallel_tool_calls=not single, n=3)
        done = [c for c in r.choices if c.finish_reason == "tool_calls"]
        # (this model may list calls until max_tokens cuts the list: then the text is the content)
        assert all(c.finish_reason == "length" and c.message.content.lstrip().startswith("[") for c in r.choices
                   if c not in done) and (done or not single)
        for c in done:
            assert c.message.tool_calls and (len(c.message.tool_calls) == 1 or not single)
            for tc in c.message.tool_calls:
                want = {"lookup": {"q"}, "add": {"a", "b"}}[tc.function.name]
                assert set(json.loads(tc.function.arguments)) == want

    with pytest.raises(openai.BadRequestError, match="'search', which is not among tools"):
        tool_server.chat.completions.create(**kw, tools=[LOOKUP], tool_choice={"type": "function",
                                                                               "function": {"name": "search"}})
    with pytest.raises(openai.BadRequestError, match="both constrain"):
        tool_server.chat.completions.create(**kw, tools=[LOOKUP], tool_choice="required",
                                            response_format={"type": "json_object"})
