"""`SamplingParams`: how to decode one request. Validated on construction; errors name the field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lengthwise.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Decoding parameters, with vLLM's names and meanings. Keyword-only; validated on construction.

    - `n`: completions per prompt. `max_tokens`: the most tokens generated per completion (None:
      as many as the model's context leaves after the prompt).
    - `temperature` below 1e-5 means greedy (then top-k/top-p/min-p play no part). `top_k` 0 or -1
      and `top_p == 1` and `min_p == 0` switch those filters off.
    - `seed` makes a sampled output reproducible, independent of other requests in the batch.
    - Generation stops at one of the model's end tokens (unless `ignore_eos`), at any of
      `stop_token_ids`, at any `stop` string (removed from the text unless
      `include_stop_str_in_output`), or after `max_tokens`. `stop` is normalised to a tuple.
      Before `min_tokens` tokens, nothing stops it: its stop tokens cannot be drawn (vLLM's).
    - `logit_bias`: token id -> a value in [-100, 100] added to that token's logit before the
      penalties and sampling (OpenAI's; -100 bans a token, +100 forces it).
    - Penalties, as vLLM: `repetition_penalty` (> 0, 1 = off) over prompt and output tokens
      divides positive logits and multiplies negative ones; `frequency_penalty` (per occurrence)
      and `presence_penalty` (once) in [-2, 2] are subtracted for tokens already generated.
    - `logprobs`: None, or 0..20 most likely tokens returned per generated token, each with its
      log-probability under the model's raw distribution (before penalties and temperature); 0
      returns only the sampled token's own log-probability and rank.
    - `prompt_logprobs`: the same for every prompt token after the first (scoring a text, as
      evaluation harnesses do). Such a request computes its whole prompt: no prefix-cache reuse.
    - `structured_outputs`: a `StructuredOutputsParams` (a JSON Schema, any JSON object, or one
      of a list of strings) the response must follow; needs the engine's tokenizer.
    - `skip_special_tokens` and `detokenize` control the output text.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=None)
        if self.top_k < 0 and self.top_k != -1:
            raise ValueError(f"top_k must be -1, 0 (both: disabled) or positive, got {self.top_k}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= 2**63:
                raise ValueError(f"seed must be < 2**63, got {self.seed}")
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise ValueError(f"stop_token_ids must be a list of ints, got {type(self.stop_token_ids).__name__}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, minimum=0)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0)
                if value > MAX_LOGPROBS:
                    raise ValueError(f"{name} must be at most {MAX_LOGPROBS}, got {value}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def clone(self) -> SamplingParams:
        """A copy (vLLM's spelling; the params are immutable, so `dataclasses.replace` also works)."""
        return dataclasses.replace(self)

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small would overflow the softmax, and means greedy anyway.
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        """Whether any of the three penalties changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check_logit_bias(bias: object) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    out = {}
    for token, value in bias.items():
        _check_int("logit_bias", token, minimum=0)
        _check_number("logit_bias", value)
        if not -100 <= value <= 100:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
        out[token] = float(value)
    return out


def _normalise_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (tuple, list)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got an element {s!r}")
        if not s:
            raise ValueError("stop strings must not be empty")
    return tuple(stop)


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object) -> None:
    # Infinite values are rejected too: none of the float fields has a meaningful infinite setting.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
