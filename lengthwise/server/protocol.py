"""The OpenAI API's request bodies, validated strictly, and its error body.

Types are strict (a string is not a number), unknown fields are refused rather than ignored (so
nothing a client asked for is silently lost), and OpenAI fields we do not implement are refused
when set. Ranges are checked by `SamplingParams`, whose errors name the field. Every refusal is an
`ApiError` carrying the HTTP status and the offending parameter, rendered as OpenAI's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lengthwise.beam_search import BeamSearchParams
from lengthwise.pooling import PoolingParams
from lengthwise.sampling_params import SamplingParams
from lengthwise.structured.params import StructuredOutputsParams


class ApiError(Exception):
    """An error response: HTTP `status`, OpenAI error `type`, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token ids as strings, as JSON keys must be
    # Accepted only at its neutral values: we do not implement it.
    best_of: int | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Lower is served first; needs a server started with --policy priority or continuous-sjf.
    priority: int = 0
    # vLLM's beam search: n beams, and the n best answers as the choices, best first (transformers'
    # early_stopping too).
    use_beam_search: bool = False
    length_penalty: float | None = None
    early_stopping: bool | str | None = None  # True, False or "never" (checked by BeamSearchParams)
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and older guided_*.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None  # refused: no EBNF grammars here

    def structured(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever field gives it (at most one may); a bad
        one is a 400 naming its field."""
        given: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise ApiError(400, "response_format.json_schema must be {\"name\": ..., \"schema\": {...}}",
                                   "response_format")
                given.append(("response_format", {"json": spec.get("schema", {})}))
            elif kind != "text":
                raise ApiError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                               "response_format")
        if self.structured_outputs is not None:
            extra = sorted(set(self.structured_outputs) - {"json", "json_object", "choice", "regex"})
            if extra:
                raise ApiError(400, f"structured_outputs {extra} are not supported by this server (json, "
                               f"json_object, choice and regex are)", "structured_outputs")
            # (fields sent as null are unset, as vLLM's dataclass reads them)
            given.append(("structured_outputs", {k: v for k, v in self.structured_outputs.items() if v is not None}))
        if self.guided_json is not None:
            given.append(("guided_json", {"json": self.guided_json}))
        if self.guided_choice is not None:
            given.append(("guided_choice", {"choice": self.guided_choice}))
        if self.guided_regex is not None:
            given.append(("guided_regex", {"regex": self.guided_regex}))
        if self.guided_grammar is not None:
            raise ApiError(400, "guided_grammar is not supported by this server (json schemas, json_object, "
                           "choice and regex are)", "guided_grammar")
        if len(given) > 1:
            raise ApiError(400, f"give one output constraint, not {[name for name, _ in given]}", given[1][0])
        if not given:
            return None
        name, fields = given[0]
        try:
            return StructuredOutputsParams(**fields)
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"{name}: {e}", name) from None

    def unsupported(self) -> None:
        if not self.use_beam_search:
            for name in ("length_penalty", "early_stopping"):
                if getattr(self, name) is not None:
                    raise ApiError(400, f"{name} needs use_beam_search: true", name)
        if self.best_of not in (None, 1, self.n):
            raise ApiError(400, "best_of other than n is not supported by this server", "best_of")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise ApiError(400, "suffix is not supported by this server", "suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool fields: passed to the template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # vLLM's chat extras: the template's variables (Qwen3's enable_thinking), and a prefilled answer.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Tool calls need the server's --tool-call-parser (checked by the endpoint).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # vLLM's: false leaves the reasoning out (with --reasoning-parser)

    def unsupported(self) -> None:
        super().unsupported()
        if self.tool_choice is not None and not self.tools:
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        named = isinstance(self.tool_choice, dict)
        if named and not (self.tool_choice.get("type") == "function" and isinstance(
                (self.tool_choice.get("function") or {}).get("name"), str)):
            raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}", "tool_choice")
        if not named and self.tool_choice not in (None, "none", "auto", "required"):
            raise ApiError(400, f"tool_choice must be 'none', 'auto', 'required' or a named function, got "
                           f"{self.tool_choice!r}", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        for i, m in enumerate(self.messages):  # only an assistant turn may come without content (OpenAI)
            if m.content is None and m.role != "assistant":
                raise ApiError(400, f"a {m.role} message needs content", f"messages.{i}.content")


class EmbeddingRequest(BaseModel):
    """`/v1/embeddings`: OpenAI's `input` (a string, a list of strings, token ids, or a list of
    token-id lists), `encoding_format` ("float" or "base64": little-endian float32 bytes),
    `dimensions` and `user`; vLLM's extras: chat `messages` instead of `input` (one embedding of
    the conversation rendered through the chat template), `truncate_prompt_tokens`,
    `add_special_tokens`, `normalize` and `priority`."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = False
    normalize: bool | None = None
    priority: int = 0

    def unsupported(self) -> None:
        if (self.input is None) == (self.messages is None):
            raise ApiError(400, "give exactly one of input and messages", "input")
        if self.messages is not None and not self.messages:
            raise ApiError(400, "messages must not be empty", "messages")

    def pooling_params(self) -> PoolingParams:
        """The request's `PoolingParams`; a bad value is a 400 naming its field."""
        try:
            return PoolingParams(self.dimensions, self.normalize, self.truncate_prompt_tokens)
        except ValueError as e:
            raise ApiError(400, str(e), str(e).split(" ", 1)[0]) from None


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a `prompt` (special tokens added unless `add_special_tokens` is false)
    or chat `messages` rendered through the template."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def unsupported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", "prompt")


class DetokenizeRequest(BaseModel):
    """vLLM's `/detokenize`: token ids back to text."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    tokens: list[int]

    def unsupported(self) -> None:
        pass


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's `/v1/load_lora_adapter`: serve the PEFT adapter at `lora_path` as model `lora_name`
    (`load_inplace`: replace the adapter of that name, e.g. its files changed)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False

    def unsupported(self) -> None:
        for field in ("lora_name", "lora_path"):
            if not getattr(self, field).strip():
                raise ApiError(400, f"{field} must not be empty", field)


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's `/v1/unload_lora_adapter`: stop serving adapter `lora_name` (or the one whose id is
    `lora_int_id`)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str | None = None
    lora_int_id: int | None = None

    def unsupported(self) -> None:
        if not self.lora_name and self.lora_int_id is None:
            raise ApiError(400, "give lora_name (or lora_int_id) of the adapter to unload", "lora_name")


_UNION_MEMBER = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\])")


def parse_body(cls: type[BaseModel], raw: bytes) -> Any:
    """Validate a request body; malformed JSON, a wrong type, a missing or unknown field: 400."""
    try:
        req = cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        # (a union field's error names the member it tried, e.g. ("input", "list[int]", 0): the
        # parameter at fault is the field)
        loc = ".".join(str(p) for i, p in enumerate(err["loc"])
                       if not (i and isinstance(p, str) and _UNION_MEMBER.fullmatch(p)))
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['msg']}") from None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {loc}", loc) from None
        if err["type"] == "missing":
            raise ApiError(400, f"{loc} is required", loc) from None
        raise ApiError(400, f"{loc}: {err['msg']}", loc or None) from None
    req.unsupported()
    return req


_PARAMS = {f for f in SamplingParams.__dataclass_fields__}


def sampling_params(req: _Common, max_tokens: int, logprobs: int | None, defaults: SamplingParams,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's `SamplingParams` (`defaults`: the checkpoint's generation config for what the
    request leaves out). A value out of range: 400 naming the field."""
    values: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, seed=req.seed, stop=req.stop, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(req.logit_bias),
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
        stop_token_ids=tuple(req.stop_token_ids or ()), structured_outputs=req.structured())
    for name, default in (("temperature", defaults.temperature), ("top_p", defaults.top_p),
                          ("top_k", defaults.top_k), ("min_p", defaults.min_p),
                          ("repetition_penalty", defaults.repetition_penalty)):
        value = getattr(req, name)
        values[name] = default if value is None else value
    try:
        return SamplingParams(**values)
    except ValueError as e:
        word = str(e).split(" ", 1)[0]
        param = word if word in _PARAMS else None
        if param in ("logprobs", "prompt_logprobs"):  # (echo's prompt logprobs are the request's logprobs)
            param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        raise ApiError(400, str(e), param) from None


# What a beam search request may not set (the search, not a sampler, picks its tokens), with the
# values that mean "unset".
_NOT_WITH_BEAMS = {"top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0), "seed": (None,),
                   "stop": (None, [], ""), "stop_token_ids": (None, []), "presence_penalty": (0.0,),
                   "frequency_penalty": (0.0,), "repetition_penalty": (None, 1.0), "logit_bias": (None, {}),
                   "min_tokens": (0,), "response_format": (None,), "structured_outputs": (None,),
                   "guided_json": (None,), "guided_choice": (None,), "guided_regex": (None,),
                   "guided_grammar": (None,), "logprobs": (None, False), "top_logprobs": (None,), "echo": (False,),
                   "tools": (None, []), "skip_special_tokens": (True,)}


def _unset(value: Any, unset: tuple[Any, ...]) -> bool:
    """Whether `value` is one of `unset` (a bool never stands for a number, nor 0 for False)."""
    return any(value == u and (value is None) == (u is None) and isinstance(value, bool) == isinstance(u, bool)
               for u in unset)


def beam_search_params(req: _Common, max_tokens: int) -> BeamSearchParams:
    """A `use_beam_search` request's `BeamSearchParams` (`n` beams). A sampling field set with it, a
    temperature other than 0 or a value out of range: 400 naming the field."""
    for name, unset in _NOT_WITH_BEAMS.items():
        if hasattr(req, name) and not _unset(getattr(req, name), unset):
            raise ApiError(400, f"{name} cannot be used with use_beam_search (the search picks the tokens)", name)
    values: dict[str, Any] = dict(beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                  temperature=req.temperature or 0.0,
                                  include_stop_str_in_output=req.include_stop_str_in_output)
    if req.length_penalty is not None:
        values["length_penalty"] = req.length_penalty
    if req.early_stopping is not None:
        values["early_stopping"] = req.early_stopping
    try:
        return BeamSearchParams(**values)
    except ValueError as e:
        word = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), {"beam_width": "n"}.get(word, word)) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` with integer ids; a key that is not one: 400."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return out
