"""How many drafted tokens each decode row should verify this step (adaptive speculative decoding).

A drafted token is worth verifying when the step time it adds buys more than it costs. Verifying
one more token adds `c1` seconds to the step (the step's time is modelled as `c0 + c1 * tokens`,
fit online to the engine's measured steps); if it is kept, the sequence skips one future row-step,
worth that row's share of a step, `c0 / B + c1` with `B` rows sampled. Draft token `i` of a row is
kept only if tokens `1..i` all are, probability `alpha ** i` for the row's per-token acceptance
`alpha`, so the row drafts while

    alpha ** i * (c0 / B + c1) > c1.

At batch 1 on a step bound by reading the weights (`c1` small against `c0`) that is nearly any
draft; at a batch large enough to be compute-bound it is only drafts that are almost surely kept,
and none once `alpha` falls: the cut-off that `disable_by_batch_size` fixes by hand, per row
and per step, from what this machine and this text measure (SmartSpec, Liu et al. 2024, chooses
proposal lengths on the same goodput rule).

`alpha` is estimated per sequence from its verified drafts (a geometric model: a draft of `d`
kept `k` is `k` accepted tokens and, if `k < d`, one refused), with counts that fade per step
(so a row that stopped drafting drifts back to the prior and is tried again), shrunk toward the
acceptance of all rows (`prior_weight` pseudo-observations), itself shrunk toward an optimistic
initial value; when no row has verified a draft for a while, every row drafts in full once
(`explore_after`), so neither a break-even above any estimate nor a wrong cost fit can stop
drafting for good.

Pure Python: no torch. The engine feeds `observe_step` and `observe_draft`; the scheduler asks
`max_draft`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from lengthwise.sequence import Sequence


@dataclass
class StepCostModel:
    """Step seconds ~ `base + per_token * tokens`, fit by exponentially weighted least squares.

    `decay` per observation (0.97: about the last 30 steps count). The model has no estimate
    (`per_token` None) until it has seen `min_steps` steps that differ enough in size to fit a
    slope (`min_spread` tokens of weighted standard deviation); after that, steps of one size
    keep the last fit. (A fit through the origin, steps that cost only their tokens, is what a
    tiny model's host-bound steps measure at batch 16: there no draft pays, and the planner
    drafts nothing but its exploring tokens.) A step more than `max_ratio` times what the fit (before one:
    the median of recent steps, scaled up for larger steps) expects counts as that much (a pause
    of the host, a first call building its kernels): one outlier must not swing the slope,
    while a lasting change still moves the fit step by step.
    """

    decay: float = 0.97
    min_spread: float = 0.5
    min_steps: int = 8
    max_ratio: float = 3.0
    base: float | None = None
    per_token: float | None = None
    _n: int = 0
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # weight, t, s, t^2, t*s
    _recent: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=16))

    def observe(self, tokens: int, seconds: float) -> None:
        """One step of `tokens` fed tokens took `seconds`."""
        self._n += 1
        if self._n < self.min_steps:
            self._recent.append((tokens, seconds))  # the first steps wait for a median to be clipped by
            return
        if self._n == self.min_steps:
            self._recent.append((tokens, seconds))
            for t, s in list(self._recent):
                self._add(t, min(s, self.max_ratio * self._expected(t)))
        else:
            seconds = min(seconds, self.max_ratio * self._expected(tokens))
            self._recent.append((tokens, seconds))
            self._add(tokens, seconds)
        w, t, s, tt, ts = self._sums
        mean_t, mean_s = t / w, s / w
        var = tt / w - mean_t * mean_t
        if var < self.min_spread ** 2:
            return  # keep the last fit: steps of one size say nothing of the slope
        slope = max(0.0, (ts / w - mean_t * mean_s) / var)
        self.base, self.per_token = max(0.0, mean_s - slope * mean_t), slope

    def _add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        for i, x in enumerate((1.0, tokens, seconds, tokens * tokens, tokens * seconds)):
            self._sums[i] = d * self._sums[i] + x

    def _expected(self, tokens: int) -> float:
        """What a step of `tokens` should take, for clipping outliers."""
        if self.per_token is not None and self.base is not None:
            return self.base + self.per_token * tokens
        t = statistics.median(x for x, _ in self._recent)
        return statistics.median(s for _, s in self._recent) * max(1.0, tokens / t)


@dataclass
class _Acceptance:
    """Counts of accepted and refused draft tokens that fade by `decay` per step."""

    kept: float = 0.0
    refused: float = 0.0
    step: int = 0  # the planner's step when last updated

    def faded(self, step: int, decay: float) -> tuple[float, float]:
        fade = decay ** (step - self.step)
        return fade * self.kept, fade * self.refused

    def add(self, step: int, decay: float, kept: int, refused: int) -> None:
        k, r = self.faded(step, decay)
        self.kept, self.refused, self.step = k + kept, r + refused, step


@dataclass
class DraftLengthPlanner:
    """Per-row draft lengths from a `StepCostModel` and each sequence's acceptance so far.

    Steps here are the steps drafts were planned for (`begin_step`). Rows without drafts yet
    take the acceptance of all rows, which starts from (and fades back to) an optimistic
    `initial_acceptance`. Where the break-even is above even that, nothing would ever be drafted
    again, so nothing would be learnt: after `explore_after` steps in which no row verified a
    draft, each row drafts all it may for one step, which measures the acceptance (the text may
    have become predictable) and a step with drafts, far from the plain steps' size (the cost
    fit, frozen while every step had one size, may have been wrong or may have changed).
    """

    row_decay: float = 0.9
    all_decay: float = 0.99
    prior_weight: float = 2.0
    initial_acceptance: float = 0.8
    explore_after: int = 64
    cost: StepCostModel = field(default_factory=StepCostModel)
    _rows: dict[str, _Acceptance] = field(default_factory=dict)
    _all: _Acceptance = field(default_factory=_Acceptance)
    _step: int = 0
    _last_verified: int = 0  # the last step a draft was verified in
    _threshold: float = 0.0
    _explore: bool = False

    def __post_init__(self) -> None:
        for name in ("row_decay", "all_decay", "initial_acceptance"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.prior_weight <= 0 or self.explore_after < 1:
            raise ValueError(f"prior_weight must be positive and explore_after at least 1, got "
                             f"{self.prior_weight}, {self.explore_after}")

    def begin_step(self, num_rows: int) -> None:
        """A step with `num_rows` sampled rows is being planned: fix this step's break-even."""
        self._step += 1
        self._explore = self._step - self._last_verified > self.explore_after
        c0, c1 = self.cost.base, self.cost.per_token
        if c1 is None or c0 is None or c1 <= 0:
            self._threshold = 0.0  # no measured cost (yet): every draft pays
        else:
            self._threshold = c1 / (c0 / max(1, num_rows) + c1)

    def acceptance(self, seq: Sequence) -> float:
        """The estimated probability that a drafted token of `seq` is kept, given those before it were."""
        w = self.prior_weight
        kept, refused = self._all.faded(self._step, self.all_decay)
        prior = (kept + w * self.initial_acceptance) / (kept + refused + w)
        row = self._rows.get(seq.seq_id)
        if row is None:
            return prior
        kept, refused = row.faded(self._step, self.row_decay)
        return (kept + w * prior) / (kept + refused + w)

    def max_draft(self, seq: Sequence, limit: int) -> int:
        """How many of up to `limit` drafted tokens `seq` should verify this step."""
        if limit <= 0 or self._threshold <= 0.0 or self._explore:
            return max(0, limit)
        alpha = self.acceptance(seq)
        if alpha <= self._threshold:
            return 0
        if alpha >= 1.0:
            return limit
        # The largest i with alpha ** i > threshold.
        return min(limit, math.ceil(math.log(self._threshold) / math.log(alpha)) - 1)

    def observe_draft(self, seq: Sequence, num_drafted: int, num_kept: int) -> None:
        """`seq` verified a draft of `num_drafted` tokens and kept the first `num_kept`."""
        if num_drafted <= 0:
            return
        refused = int(num_kept < num_drafted)
        self._last_verified = self._step
        self._rows.setdefault(seq.seq_id, _Acceptance(step=self._step)).add(self._step, self.row_decay,
                                                                            num_kept, refused)
        self._all.add(self._step, self.all_decay, num_kept, refused)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """The engine's decode step of `num_tokens` fed tokens (a token per row plus drafts) took
        `seconds`, from scheduling to the sampled tokens appended. (Steps with prompt chunks cost
        otherwise per token and are not fed: this is the cost of the steps drafts ride in.)"""
        self.cost.observe(num_tokens, seconds)

    def forget(self, seq: Sequence) -> None:
        """`seq` ended or lost its outputs."""
        self._rows.pop(seq.seq_id, None)
