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


def llm_agreement(base: Any, other: Any, prompts: list[Any], greedy_tokens: int) -> dict[str, Any]:
    """`other` (an `LLM`: quantized weights, a narrower KV cache, ...) against `base` on the same
    prompts: teacher-forced, the top-5 candidates' logprob changes and top-1 agreement over each
    prompt continued greedily by `base`; and how many greedy tokens each prompt's continuations
    share before they first differ."""
    from lengthwise import SamplingParams

    greedy = SamplingParams(max_tokens=greedy_tokens, temperature=0.0, detokenize=False)
    a, b = (llm.generate(prompts, greedy, use_tqdm=False) for llm in (base, other))
    same = []
    for x, y in zip(a, b, strict=True):
        ta, tb = x.outputs[0].token_ids, y.outputs[0].token_ids
        same.append(next((i for i, (u, v) in enumerate(zip(ta, tb, strict=False)) if u != v), min(len(ta), len(tb))))
    texts = [{"prompt_token_ids": list(x.prompt_token_ids) + list(x.outputs[0].token_ids)} for x in a]
    scored = SamplingParams(max_tokens=1, prompt_logprobs=5, detokenize=False)
    pa, pb = (llm.generate(texts, scored, use_tqdm=False) for llm in (base, other))
    agreement = prompt_logprob_agreement(pa, pb)
    return {"positions": agreement.positions, "top1_agreement": round(agreement.top1_agreement, 4),
            "mean_abs_logprob_change": round(agreement.mean_change, 5),
            "max_abs_logprob_change": round(max(agreement.changes), 4),
            "greedy_tokens_identical": same, "greedy_tokens": greedy_tokens}


def agreement_table(what: str, quality: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of `llm_agreement` results by model name; `what` heads the first column."""
    lines = [f"| {what} | positions | top-1 same | mean abs logprob change (top 5) | max | greedy tokens identical |",
             "|---|---|---|---|---|---|"]
    for name, q in quality.items():
        lines.append(f"| {name} | {q['positions']} | {q['top1_agreement']:.1%} | {q['mean_abs_logprob_change']} | "
                     f"{q['max_abs_logprob_change']} | {q['greedy_tokens_identical']} of {q['greedy_tokens']} |")
    return lines


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
