"""`BeamSearchParams`: how to beam-search one request (vLLM's names). Validated on construction.

Beam search keeps the `beam_width` most likely partial answers (beams) at every step and returns
the `beam_width` best finished ones, ranked by their summed log-probability divided by
`length ** length_penalty`. The selection is transformers' (`generate(num_beams=...,
do_sample=False)` without logits processors), its `early_stopping` included, so the same
checkpoint gives the same beams.

Stdlib only: the scheduler reads `Request.beam` to step a request's beams together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lengthwise.sampling_params import SamplingParams, _check_int, _check_number


@dataclass(frozen=True, kw_only=True)
class BeamSearchParams:
    """Beam search parameters, vLLM's (`LLM.beam_search`) plus transformers' `early_stopping`.

    - `beam_width`: beams kept per step, and answers returned. `max_tokens`: the most tokens an
      answer has (the model's end token included).
    - `ignore_eos`: never end on the model's end token (every answer runs to `max_tokens`).
    - `length_penalty`: the score is `cumulative_logprob / generated_tokens ** length_penalty`;
      above 0 favours longer answers, below 0 shorter ones.
    - `early_stopping` (transformers'): `False` stops when no running beam can beat the worst of
      the `beam_width` finished ones (judged at its current length); `True` stops as soon as
      `beam_width` answers have finished; `"never"` stops only when no running beam could win at
      any length (the canonical beam search).
    - `temperature`: vLLM's field; only 0 (beams ranked by the model's log-probabilities) is
      supported: beam *sampling* is refused rather than silently run as search.
    - `include_stop_str_in_output`: keep the end token in the decoded `text` (an end token the
      tokenizer marks special still has no text, as when sampling with `skip_special_tokens`).

    Beams are ranked by the model's raw log-probabilities: the checkpoint's generation config
    (`repetition_penalty` and other logits processors transformers would apply) plays no part.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | Literal["never"] = False

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, minimum=1)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_number("temperature", self.temperature)
        if self.temperature != 0:
            raise ValueError(f"temperature must be 0 for beam search (beam sampling is not supported), "
                             f"got {self.temperature}")
        _check_number("length_penalty", self.length_penalty)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    def sampling_params(self) -> SamplingParams:
        """The engine-side request parameters: `beam_width` greedy sequences, whose tokens the
        beam search chooses (not the sampler), detokenized once at the end."""
        return SamplingParams(n=self.beam_width, max_tokens=self.max_tokens, temperature=0.0,
                              ignore_eos=self.ignore_eos, detokenize=False,
                              include_stop_str_in_output=self.include_stop_str_in_output)
