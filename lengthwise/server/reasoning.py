"""Reasoning in chat answers (vLLM's `--reasoning-parser`): the part of a thinking model's answer
between `<think>` and `</think>` comes back as `message.reasoning` (and its older name
`reasoning_content`), the rest as `message.content`, where tool calls are then looked for.

Where the answer starts matters. Qwen3's template leaves `<think>` to the model; DeepSeek-R1's
(and Qwen3.5's) writes `<think>\\n` into the generation prompt, so only `</think>` is generated;
with `enable_thinking: false` Qwen3's template closes an empty `<think>\\n\\n</think>` in the
prompt. So a split starts in reasoning when the prompt ends inside an open `<think>`, in content
when it ends right after `</think>`, and otherwise as its parser says: `deepseek_r1` (also QwQ)
reads untagged output as reasoning, `qwen3` too unless the request turned thinking off. An answer
cut before `</think>` is all reasoning. A `<think>` at the very start of the answer is dropped.

The split works on text, so it also serves a stream: text that may be the start of a tag is held
back until the next delta tells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    """One `--reasoning-parser`. Untagged output is reasoning unless the prompt says otherwise or
    the request turns thinking off with the parser's `thinking_switch` template variable."""

    name: str
    thinking_switch: str | None = None  # the chat_template_kwargs key that turns thinking off

    def for_request(self, prompt_tail: str, template_kwargs: dict[str, Any] | None = None,
                    include: bool = True) -> ReasoningRequest:
        """How to split the answers to a prompt ending in `prompt_tail` (its last few tokens' text);
        `include`: the request's `include_reasoning` (false: the reasoning is not sent)."""
        tail = prompt_tail.rstrip()
        if tail.rfind(START) > tail.rfind(END):
            thinking = True  # the template (or a prefilled answer) opened the reasoning
        elif tail.endswith(END):
            thinking = False  # the template closed it: the model answers directly
        else:
            switch = (template_kwargs or {}).get(self.thinking_switch) if self.thinking_switch else None
            thinking = True if switch is None else bool(switch)
        return ReasoningRequest(thinking, include)


@dataclass(frozen=True)
class ReasoningRequest:
    """One request's reasoning split: where its answers start, and whether reasoning is sent."""

    thinking: bool
    include: bool = True

    def splitter(self) -> ReasoningSplit:
        """A splitter for one of the request's answers (one per choice)."""
        return ReasoningSplit(self.thinking)


PARSERS = {p.name: p for p in (ReasoningParser("deepseek_r1"),
                               ReasoningParser("qwen3", thinking_switch="enable_thinking"))}


def make_reasoning_parser(name: str | None) -> ReasoningParser | None:
    """The parser called `name` (None: answers are not split); unknown names are a `ValueError`."""
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"--reasoning-parser {name!r} is not known (known: {', '.join(PARSERS)})")
    return PARSERS[name]


class ReasoningSplit:
    """One answer's text, fed as it comes, split into (reasoning, content) to send now."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking  # where untagged text goes
        self.phase = "start"  # start (a leading <think> may come), reasoning, content
        self.held = ""
        self.reasoned = False  # whether any of the answer was reasoning (its tags count)

    def feed(self, new: str, finished: bool) -> tuple[str, str]:
        """The (reasoning, content) text `new` adds that may be sent now; everything once `finished`."""
        self.held += new
        reasoning = ""
        if self.phase == "start":
            head = self.held.lstrip()
            if head.startswith(START):
                self.held, self.phase, self.reasoned = head[len(START):], "reasoning", True
            elif (not head or START.startswith(head)) and not finished:
                return "", ""  # may still become <think>
            else:
                self.phase = "reasoning" if self.thinking else "content"
                self.reasoned = self.reasoned or self.thinking
        if self.phase == "reasoning":
            at = self.held.find(END)
            if at == -1:
                keep = 0 if finished else partial_tag(self.held, END)
                reasoning, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return reasoning, ""
            reasoning, self.held, self.phase = self.held[:at], self.held[at + len(END):], "content"
        content, self.held = self.held, ""
        return reasoning, content

    def whole(self, text: str) -> tuple[str | None, str | None]:
        """A whole answer's (reasoning, content), as vLLM reports them: reasoning None when the
        answer had none, content None when reasoning took all of it."""
        reasoning, content = self.feed(text, True)
        if not self.reasoned:
            return None, content
        return reasoning, content or None


def partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
