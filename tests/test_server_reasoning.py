"""Reasoning in chat answers (`--reasoning-parser`): the splitter on its own, then end to end
through the `openai` client against a server in this process whose sampler is forced to think
first (stories260k cannot write `<think>` by itself)."""

from __future__ import annotations

import json

import pytest
from conftest import forced_answer_server, stories_with_template

from lengthwise.server.reasoning import PARSERS, ReasoningSplit, make_reasoning_parser

THOUGHT = "\nThe user wants the weather; a tool </ knows it.\n"
AFTER = '\n\nLet me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = f"<think>{THOUGHT}</think>{AFTER}"


# -- the splitter ----------------------------------------------------------------------------------

def test_a_whole_answer_splits_at_think():
    assert ReasoningSplit(True).whole(ANSWER) == (THOUGHT, AFTER)
    assert ReasoningSplit(False).whole(ANSWER) == (THOUGHT, AFTER)  # a leading <think> opens it either way
    assert ReasoningSplit(True).whole("  <think>a</think>") == ("a", None)  # nothing after it: null content
    assert ReasoningSplit(True).whole("a</think>b") == ("a", "b")  # the template opened it (DeepSeek-R1)
    assert ReasoningSplit(True).whole("cut off mid-thought") == ("cut off mid-thought", None)
    assert ReasoningSplit(False).whole("Hello </think> there") == (None, "Hello </think> there")
    assert ReasoningSplit(True).whole("<think></think>Hi") == ("", "Hi")


@pytest.mark.parametrize("thinking", [True, False])
def test_any_split_of_a_stream_sends_what_the_whole_answer_gives(thinking):
    for text in (ANSWER, ANSWER[len("<think>"):], "plain answer <th", "<thin"):
        whole = ReasoningSplit(thinking).whole(text)
        for step in (1, 2, 3, 5, 8, 1000):
            split, thought, content = ReasoningSplit(thinking), "", ""
            pieces = [text[i:i + step] for i in range(0, len(text), step)]
            for k, piece in enumerate(pieces):
                r, c = split.feed(piece, k == len(pieces) - 1)
                thought, content = thought + r, content + c
                assert "<think>" not in thought + content and "</think>" not in thought
            assert (thought or None, content or None) == (whole[0] or None, whole[1] or None), (text, step)


def test_a_tag_in_the_making_is_held_back():
    split = ReasoningSplit(True)
    assert split.feed("<th", False) == ("", "")  # may be <think>
    assert split.feed("ink>I wonder </th", False) == ("I wonder ", "")
    assert split.feed("ink>An", False) == ("", "An")
    assert split.feed("swer", True) == ("", "swer")
    assert ReasoningSplit(True).feed("I wonder </th", True) == ("I wonder </th", "")  # the end flushes


@pytest.mark.parametrize("parser, tail, kwargs, thinking", [
    ("qwen3", "<|im_start|>assistant\n", None, True),  # Qwen3 thinks by default
    ("qwen3", "<|im_start|>assistant\n", {"enable_thinking": False}, False),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", None, False),  # the template closed it
    ("qwen3", "<|im_start|>assistant\n<think>\n", {"enable_thinking": False}, True),  # the prompt decides
    ("deepseek_r1", "<｜Assistant｜><think>\n", None, True),
    ("deepseek_r1", "<｜Assistant｜>", {"enable_thinking": False}, True),  # not its switch
    ("qwen3", "<think>a</think>b<|im_end|><|im_start|>assistant\n", None, True),  # an earlier turn's tags
])
def test_where_an_answer_starts(parser, tail, kwargs, thinking):
    assert PARSERS[parser].for_request(tail, kwargs).thinking is thinking


def test_an_unknown_parser_is_named():
    assert make_reasoning_parser(None) is None
    with pytest.raises(ValueError, match="'r1' is not known"):
        make_reasoning_parser("r1")


# -- end to end --------------------------------------------------------------------------------------

openai = pytest.importorskip("openai")
TEMPLATE = ("{{ bos_token }}{% if tools %}{{ tools | tojson }}{% endif %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """--reasoning-parser qwen3 and --tool-call-parser hermes; every chat about the weather is
    answered with ANSWER."""
    d = stories_with_template(tmp_path_factory, TEMPLATE)
    with forced_answer_server(d, ["--reasoning-parser", "qwen3", "--tool-call-parser", "hermes"],
                              lambda tok: tok.encode(ANSWER, add_special_tokens=False), "Weather") as client:
        yield client


def test_reasoning_comes_back_beside_the_content(thinking_server):
    """message.reasoning (and reasoning_content) holds the thought, content the rest, where the
    tool call is read; a stream sends the same in delta.reasoning / delta.content."""
    kw = dict(model="stories", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=120,
              temperature=0)
    message = thinking_server.chat.completions.create(**kw).choices[0].message
    assert message.reasoning == message.reasoning_content == THOUGHT
    assert message.content == AFTER and not message.tool_calls  # no tools asked: the call is content

    choice = thinking_server.chat.completions.create(**kw, tools=TOOLS).choices[0]
    assert choice.message.reasoning == THOUGHT and choice.message.content == "\n\nLet me check."
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = [c.choices[0] for c in thinking_server.chat.completions.create(**kw, tools=TOOLS, stream=True)
              if c.choices]
    streamed = "".join(getattr(c.delta, "reasoning", None) or "" for c in chunks)
    assert streamed == "".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks) == THOUGHT
    assert "".join(c.delta.content or "" for c in chunks) == "\n\nLet me check."
    streamed_calls = [tc for c in chunks for tc in (c.delta.tool_calls or [])]  # a head, then fragments
    assert [tc.function.name for tc in streamed_calls if tc.function.name] == ["get_weather"]
    assert json.loads("".join(tc.function.arguments or "" for tc in streamed_calls)) == {"city": "Paris"}

    hidden = thinking_server.chat.completions.create(**kw, extra_body={"include_reasoning": False})
    assert hidden.choices[0].message.reasoning is None and hidden.choices[0].message.content == AFTER
    # Streamed, the left-out reasoning sends nothing: the role chunk, then the answer's chunks only.
    chunks = [c.choices[0] for c in thinking_server.chat.completions.create(
        **kw, stream=True, extra_body={"include_reasoning": False}) if c.choices]
    assert chunks[0].delta.role == "assistant" and "".join(c.delta.content or "" for c in chunks) == AFTER
    assert all(c.delta.content or c.finish_reason for c in chunks[1:]), [c.delta for c in chunks]
    assert not any(getattr(c.delta, "reasoning", None) for c in chunks)
    cut = thinking_server.chat.completions.create(**dict(kw, max_tokens=12)).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None
    assert cut.message.reasoning and THOUGHT.startswith(cut.message.reasoning)


def test_an_output_format_holds_after_the_reasoning(thinking_server):
    """As vLLM: with a reasoning parser, the format constrains the answer after </think>; where
    the template closed the reasoning (enable_thinking false), from the start."""
    schema = {"type": "object", "properties": {"happy": {"type": "boolean"}}, "required": ["happy"]}
    kw = dict(model="stories", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=60,
              temperature=1.0, seed=1, n=3,
              response_format={"type": "json_schema", "json_schema": {"name": "mood", "schema": schema}})
    free = thinking_server.chat.completions.create(**kw).choices
    # stories260k never writes </think>: its whole answer is reasoning, free of the format
    assert all(c.message.content is None and c.message.reasoning for c in free)
    assert not all(c.message.reasoning.lstrip().startswith("{") for c in free)
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    held = thinking_server.chat.completions.create(**kw, extra_body=off)
    assert all(c.message.reasoning is None and c.finish_reason == "stop" for c in held.choices)
    assert all(set(json.loads(c.message.content)) == {"happy"} for c in held.choices)
