"""How closely two engines score the same text: for comparing a model with a changed copy of itself
(quantized weights, other kernels) on outputs of `SamplingParams(prompt_logprobs=k)`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LogprobAgreement:
    """Over every scored position after the first: how often the top-1 token is the same, and the
    absolute logprob changes of the candidates both sides list."""

    positions: int
    top1_same: int
    changes: list[float]

    @property
    def top1_agreement(self) -> float:
        return self.top1_same / self.positions

    @property
    def mean_change(self) -> float:
        return statistics.fmean(self.changes)


def prompt_logprob_agreement(a: list[Any], b: list[Any]) -> LogprobAgreement:
    """Compare two lists of `RequestOutput`s of the same prompts, both with `prompt_logprobs`."""
    changes: list[float] = []
    same = total = 0
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], strict=True):
            best = [max(d.items(), key=lambda kv: kv[1].logprob)[0] for d in (u, v)]
            same += best[0] == best[1]
            total += 1
            changes += [abs(u[t].logprob - v[t].logprob) for t in set(u) & set(v)]
    return LogprobAgreement(total, same, changes)
