"""`StructuredOutputsParams`: what a response must look like (vLLM's name and fields)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lengthwise.structured.grammar import json_schema_grammar
from lengthwise.structured.regex import compile_regex


@dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
    """Constrain a response to a grammar; set exactly one of:

    - `json`: a JSON Schema (a dict, or its JSON text): the response is a JSON value matching it
      (the subset `lengthwise.structured.grammar` lists; what it cannot enforce is refused);
    - `json_object=True`: the response is any JSON object (OpenAI's `json_object` mode);
    - `choice`: the response is exactly one of these strings;
    - `regex`: the response matches this regular expression as a whole (the syntax
      `lengthwise.structured.regex` reads; lookaround and backreferences are refused).

    `start_after`: the constraint holds only after the first occurrence of this text, which is
    free before it (a thinking model's `</think>`: the server sets it when its reasoning parser
    says an answer starts in reasoning, as vLLM applies the grammar after the reasoning ends).

    Each sampling step masks the tokens that would leave the grammar, and the end token is allowed
    only where the response is complete, so an answer that ends on its own is valid; one cut by
    `max_tokens` is not (as in vLLM).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    choice: tuple[str, ...] | list[str] | None = None
    regex: str | None = None
    start_after: str | None = None

    def __post_init__(self) -> None:
        given = [name for name, on in (("json", self.json is not None), ("json_object", self.json_object),
                                       ("choice", self.choice is not None), ("regex", self.regex is not None))
                 if on]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, json_object, choice and regex, got "
                             f"{given or 'none'}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None:
            if not isinstance(self.json, dict):
                raise ValueError(f"structured_outputs.json must be a JSON Schema object, got "
                                 f"{type(self.json).__name__}")
            try:
                json_schema_grammar(self.json)  # what it cannot enforce is refused now, not mid-run
            except ValueError as e:
                raise ValueError(f"structured_outputs.json: {e}") from None
        if self.regex is not None:
            try:
                compile_regex(self.regex)
            except ValueError as e:
                raise ValueError(f"structured_outputs.regex: {e}") from None
        if self.start_after is not None and (not isinstance(self.start_after, str) or not self.start_after):
            raise ValueError(f"structured_outputs.start_after must be a non-empty string, got {self.start_after!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must hold non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def key(self) -> str:
        """A canonical text of the constraint: equal constraints share one compiled grammar."""
        # (not sort_keys: properties are emitted in the schema's order, so order tells schemas apart)
        return json.dumps({"json": self.json, "json_object": self.json_object, "choice": self.choice,
                           "regex": self.regex})
