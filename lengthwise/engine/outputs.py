"""What generation returns: vLLM-shaped `RequestOutput`s, one per request, `n` completions each
(and `BeamSearchOutput`s, `LLM.beam_search`'s; `EmbeddingRequestOutput`s, `LLM.embed`'s)."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.engine.detokenizer import TokenPieces
from lengthwise.engine.sampler import TokenLogprobs
from lengthwise.lora.request import LoRARequest
from lengthwise.sequence import Request
from lengthwise.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    """One sample, with vLLM's fields: its text (the stop string, or the stop token's text,
    removed unless `include_stop_str_in_output`), token ids, why it ended (`finish_reason`:
    "stop", "length" or "abort"; `stop_reason`: the stop string or stop token id that ended it,
    None for the model's end token or a length), and, if requested, per-token logprobs with
    their sum, `cumulative_logprob`."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None  # one per generated token; each also a dict id -> Logprob
    stop_reason: str | int | None = None
    score: float | None = None  # a beam search answer's: cumulative_logprob / len(token_ids) ** length_penalty

    @property
    def cumulative_logprob(self) -> float | None:
        """The sampled tokens' summed log-probability (None without `logprobs`)."""
        return None if self.logprobs is None else float(sum(lp.logprob for lp in self.logprobs))

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
    # With `SamplingParams.prompt_logprobs`, vLLM's shape: one entry per prompt token, None for the
    # first, then each token's `TokenLogprobs` (also a dict id -> Logprob) under the tokens before it.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    lora_request: LoRARequest | None = None  # the adapter it ran with (None: the base model)

    @classmethod
    def from_request(cls, request: Request, tokenizer: Tokenizer | None = None) -> RequestOutput:
        """The request's output; with `tokenizer`, logprobs of detokenized requests get each
        token's text (`Logprob.decoded_token`), as vLLM fills it."""
        ids = request.prompt_ids
        if tokenizer is not None and request.params.detokenize:
            for s in request.seqs:
                _decode_logprobs(tokenizer, ids[-1], s.output_ids, s.state.get("logprobs"))
            if request.prompt_logprobs is not None:
                _decode_logprobs(tokenizer, ids[0], ids[1:], request.prompt_logprobs[1:])
        outputs = [CompletionOutput(s.index, s.state.get("text", ""), list(s.output_ids), s.finish_reason,
                                    s.state.get("logprobs"), s.state.get("stop_reason"), s.state.get("beam_score"))
                   for s in request.seqs]
        metrics = RequestMetrics(request.arrival_time, request.first_token_time, request.finish_time,
                                 request.num_preemptions)
        return cls(request.request_id, request.prompt, list(ids), outputs, request.finished,
                   metrics, request.predicted_length, request.num_cached_tokens,
                   None if request.prompt_logprobs is None else list(request.prompt_logprobs),
                   request.lora_request)


@dataclass
class BeamSearchSequence:
    """One answer of a beam search, vLLM's shape: `tokens` is the prompt's then the answer's,
    `logprobs` one entry per answer token (its log-probability and rank, also a dict id ->
    Logprob), `cum_logprob` their sum, `score` what the answers are ranked by (`cum_logprob /
    answer_tokens ** length_penalty`), `text` the answer's (without the end token's unless
    `include_stop_str_in_output`)."""

    tokens: list[int]
    logprobs: list[TokenLogprobs]
    cum_logprob: float
    score: float
    text: str | None
    finish_reason: str | None  # "stop" (the end token) or "length"
    stop_reason: int | None = None
    lora_request: LoRARequest | None = None


@dataclass
class BeamSearchOutput:
    """`LLM.beam_search`'s result for one prompt: its `beam_width` answers, best first."""

    sequences: list[BeamSearchSequence]

    @classmethod
    def from_request_output(cls, out: RequestOutput) -> BeamSearchOutput:
        return cls([BeamSearchSequence(out.prompt_token_ids + c.token_ids, c.logprobs or [],
                                       c.cumulative_logprob or 0.0, c.score, c.text, c.finish_reason,
                                       c.stop_reason, out.lora_request) for c in out.outputs])


@dataclass
class EmbeddingOutput:
    """One prompt's embedding (vLLM's shape): `embedding` as floats, `hidden_size` its length."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """`LLM.embed`'s result for one prompt (vLLM's fields, with the prompt's text and timings)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool
    prompt: str | None = None
    metrics: RequestMetrics | None = None
    lora_request: LoRARequest | None = None

    @classmethod
    def from_request(cls, request: Request) -> EmbeddingRequestOutput:
        vector = request.seqs[0].state.get("embedding")
        metrics = RequestMetrics(request.arrival_time, request.first_token_time, request.finish_time,
                                 request.num_preemptions)
        return cls(request.request_id, EmbeddingOutput([] if vector is None else vector.tolist()),
                   list(request.prompt_ids), request.finished, request.prompt, metrics, request.lora_request)


def _decode_logprobs(tokenizer: Tokenizer, prev: int, token_ids: list[int],
                     logprobs: list[TokenLogprobs | None] | None) -> None:
    """Give each entry the text of its own and its top tokens, each read after the tokens before
    it (`prev`: the token before `token_ids[0]`). An entry may be None (a prompt token not scored
    because the request ended first)."""
    if not logprobs:
        return
    pieces = TokenPieces(tokenizer, prev)
    for token, lp in zip(token_ids, logprobs, strict=False):
        if lp is None:
            pieces.take(token)
            continue
        texts = {t: pieces.piece(t)[0] for t, _ in lp.top}
        texts[token] = pieces.take(token)[0]
        lp.texts = texts
