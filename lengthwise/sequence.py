"""Request and sequence state, shared by the scheduler (pure Python) and the engine.

A *request* is one prompt with its `SamplingParams`; it owns the prompt segment of the KV cache.
Each of its `n` samples is a *sequence* with its own generated tokens and response segment.
Progress is counted in tokens whose keys and values are in the cache ("computed"), vLLM v1's
vocabulary: a prefill chunk, a decode step and the recomputation of a preempted sequence are
all "feed the tokens not computed yet", which is what lets one step loop serve every policy.

Stdlib only: the scheduler and its policies import this and must stay free of torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from lengthwise.lora.request import LoRARequest
from lengthwise.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # queued in the policy, holding no KV blocks
    RUNNING = "running"      # admitted: holds blocks, takes part in steps
    FINISHED = "finished"    # every sequence ended (stop, length or abort)


@dataclass(eq=False)
class Sequence:
    """One sample of a request: the tokens it generated and how many of them are in the KV cache.

    The newest generated token is never in the cache before the next step: it is that step's
    input. After a preemption `num_computed` drops to 0 and the generated tokens are fed again
    (recomputed) rather than re-sampled, so the output is unchanged by the preemption.
    """

    seq_id: str
    index: int
    request: Request
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    finish_reason: str | None = None  # "stop", "length" or "abort"
    # Engine-side state the scheduler never looks at: RNG, detokenizer, logprobs, text.
    state: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_pending(self) -> int:
        """Generated tokens not in the cache yet (1 in steady decoding, more after a preemption)."""
        return len(self.output_ids) - self.num_computed


@dataclass(eq=False)
class Request:
    """A prompt, its sampling parameters and its `n` sequences."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    max_tokens: int                      # params.max_tokens clipped to the model's context
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None  # the conversation, when a chat template rendered the prompt
    lora_request: LoRARequest | None = None  # the LoRA adapter it runs with (None: the base model)
    priority: int = 0                    # lower runs first under a policy that orders by priority (vLLM's)
    # Beam search (a BeamSearchParams): its `n` sequences are the beams, stepped together, and the
    # engine, not the sampler, picks their tokens. None: sampling.
    beam: Any = None
    # An embedding request (a `lengthwise.pooling.PoolingTask`): it ends when its prompt is
    # computed, with the pooled hidden states instead of a token. None: generation.
    pooling: Any = None
    predicted_length: float | None = None  # filled by a length predictor, read by policies
    prediction: Any = None               # the full LengthPrediction (distribution, quantiles), if any
    status: RequestStatus = RequestStatus.WAITING
    num_prompt_computed: int = 0
    num_cached_tokens: int = 0           # prompt tokens found in the prefix cache at the last admission
    num_preemptions: int = 0
    num_collected: int = 0               # times it reached a batch's cap unfinished (FCR failures)
    suspended: bool = False              # collected with fcr="continue": waiting, its KV blocks kept
    eos_after: int | None = None         # benchmarks: each sample ends after this many tokens (engine only)
    # With `params.prompt_logprobs`: one entry per prompt token (None for the first, which nothing
    # predicts), filled by the engine as the prompt's chunks are computed.
    prompt_logprobs: list[Any] | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    seqs: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(f"{self.request_id}-{i}", i, self) for i in range(self.params.n)]

    @property
    def lora_id(self) -> int:
        """Its adapter's `lora_int_id`; 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def reads_every_prompt_position(self) -> bool:
        """Prompt logprobs score, and mean or CLS pooling read, prompt positions that a cached
        prefix would skip: such a request computes its whole prompt."""
        return self.params.prompt_logprobs is not None or (self.pooling is not None
                                                           and self.pooling.reads_every_position)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def token_limit(self) -> int:
        """The most tokens a sample can generate: `max_tokens`, or `eos_after` where that is lower."""
        return min(self.max_tokens, self.eos_after or self.max_tokens)

    @property
    def prompt_done(self) -> bool:
        return self.num_prompt_computed == len(self.prompt_ids)

    @property
    def active_seqs(self) -> list[Sequence]:
        """The samples still generating, in index order (a new list)."""
        if len(self.seqs) == 1:  # the common case, several times per row and step: no comprehension
            seq = self.seqs[0]
            return [] if seq.finish_reason is not None else [seq]
        return [s for s in self.seqs if s.finish_reason is None]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def num_generated(self) -> int:
        return sum(len(s.output_ids) for s in self.seqs)
