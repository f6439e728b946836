"""What generation returns: vLLM-shaped `RequestOutput`s, one per request, `n` completions each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lengthwise.sequence import Request


@dataclass
class CompletionOutput:
    """One sample: its text (stop string removed unless asked for), token ids, why it ended
    ("stop", "length" or "abort") and, if requested, per-token logprobs."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[Any] | None = None  # list of `TokenLogprobs`, one per generated token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps on `time.monotonic()`'s clock, in seconds."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    predicted_length: float | None = None
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache instead of computed

    @classmethod
    def from_request(cls, request: Request) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.state.get("text", ""), list(s.output_ids), s.finish_reason,
                                    s.state.get("logprobs")) for s in request.seqs]
        metrics = RequestMetrics(request.arrival_time, request.first_token_time, request.finish_time,
                                 request.num_preemptions)
        return cls(request.request_id, request.prompt, list(request.prompt_ids), outputs, request.finished,
                   metrics, request.predicted_length, request.num_cached_tokens)
