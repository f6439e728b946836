"""How long one engine step takes, as a function of what the step computes: the simulator's clock.

    seconds = base_s + per_row_s * rows + per_prefill_token_s * prefill_tokens
              + per_context_token_s * context_tokens

`rows` are the sequences the step samples a token for (decode rows, and prompts whose prefill
ends in this step), `prefill_tokens` the prompt (and recomputed) tokens it feeds, `context_tokens`
the cached tokens the decode rows attend over. A constant per-step time (only `base_s`) is the
multi-bin paper's model; `lengthwise simulate calibrate` fits all four from the real engine's
steps and saves them as JSON.

The engine does not run every step on one code path: on the CPU a step whose sequences each feed
at most 16 tokens (and that feeds at most 256 in all) runs the fused decode forward, and a step
carrying a longer prefill chunk runs op by op, where each of its decode rows costs more. One
linear model averages the two and is wrong for both (18-20% on llama-100m), so a calibrated model
may carry a second set of coefficients, `long`, for the steps past `long_query_tokens` /
`long_step_tokens`. Pure Python + numpy: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

FEATURES = ("rows", "prefill_tokens", "context_tokens")
FEATURE_COEFFICIENTS = ("base_s", "per_row_s", "per_prefill_token_s", "per_context_token_s")


@dataclass(frozen=True)
class StepFeatures:
    """What one step computes (see the module docstring)."""

    rows: int
    prefill_tokens: int
    context_tokens: int
    max_query_tokens: int = 1  # the most tokens one chunk (one sequence, or a shared prompt) feeds
    tokens: int = 0            # every token the step feeds


def step_features(chunks: Iterable[Any], padding_rows: int = 0) -> StepFeatures:
    """The features of a step from the `ScheduledChunk`s the scheduler planned for it, and the
    padding rows it computes (copies of its decode rows: `ModelRunner`)."""
    rows = prefill = context = longest = tokens = 0
    decode_contexts = []
    for c in chunks:
        longest = max(longest, c.num_tokens)
        tokens += c.num_tokens
        if c.seq is None:
            prefill += c.num_tokens
            if c.sample:
                rows += len(c.request.active_seqs)
        else:
            if c.num_tokens > 1:  # a recomputed response, or a decode row and its draft: fed like a prompt
                prefill += c.num_tokens - 1
            if c.sample:
                rows += 1
                context += c.request.prompt_len + c.end
                if c.num_tokens == 1:
                    decode_contexts.append(c.request.prompt_len + c.end)
    if decode_contexts:
        rows += padding_rows
        tokens += padding_rows
        context += sum(decode_contexts[k % len(decode_contexts)] for k in range(padding_rows))
    return StepFeatures(rows, prefill, context, longest, tokens)


@dataclass
class StepModel:
    """Seconds per engine step, linear in `StepFeatures` (the module docstring has the formula)."""

    base_s: float
    per_row_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_context_token_s: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)  # how it was made (calibration run, fit error)
    # Steps in which a chunk feeds more than `long_query_tokens` tokens, or that feed more than
    # `long_step_tokens` in all, take the `long` coefficients (the module docstring says why).
    long: StepModel | None = None
    long_query_tokens: int | None = None
    long_step_tokens: int | None = None

    MIN_STEPS_PER_KIND: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if isinstance(self.long, dict):  # read back from JSON
            self.long = StepModel(**self.long)
        if self.long is not None and (self.long.long is not None or self.long_query_tokens is None
                                      or self.long_step_tokens is None):
            raise ValueError("a step model's `long` part needs long_query_tokens and long_step_tokens, "
                             "and no `long` part of its own")
        for name in FEATURE_COEFFICIENTS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"step model {name} must be a number >= 0, got {value!r}")
        if self.base_s == self.per_row_s == self.per_prefill_token_s == self.per_context_token_s == 0:
            raise ValueError("a step model needs at least one positive coefficient")

    def is_long(self, f: StepFeatures) -> bool:
        """Whether step `f` takes the `long` coefficients."""
        return self.long is not None and (f.max_query_tokens > self.long_query_tokens
                                          or f.tokens > self.long_step_tokens)

    def __call__(self, f: StepFeatures) -> float:
        if self.is_long(f):
            return self.long(f)
        return (self.base_s + self.per_row_s * f.rows + self.per_prefill_token_s * f.prefill_tokens
                + self.per_context_token_s * f.context_tokens)

    @classmethod
    def constant(cls, seconds: float) -> StepModel:
        """Every step takes `seconds`, whatever it computes: the multi-bin paper's model."""
        return cls(base_s=seconds, source={"kind": "constant"})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StepModel:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"step model {str(path)!r} cannot be read as JSON ({e})") from e
        known = {"base_s", "per_row_s", "per_prefill_token_s", "per_context_token_s", "source", "long",
                 "long_query_tokens", "long_step_tokens"}
        if not isinstance(raw, dict) or "base_s" not in raw or set(raw) - known:
            raise ValueError(f"step model {str(path)!r} must be a JSON object with base_s and only {sorted(known)}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ValueError(f"step model {str(path)!r}: {e}") from e

    @classmethod
    def parse(cls, spec: str) -> StepModel:
        """`constant:SECONDS` or the path of a JSON file written by `save` (`simulate calibrate`)."""
        if spec.startswith("constant:"):
            try:
                return cls.constant(float(spec.split(":", 1)[1]))
            except ValueError as e:
                raise ValueError(f"--step-model {spec!r}: {e}") from e
        return cls.load(spec)

    @classmethod
    def fit(cls, features: Sequence[StepFeatures], seconds: Sequence[float],
            source: dict[str, Any] | None = None, split: tuple[int, int] | None = None) -> StepModel:
        """Least squares with every coefficient kept >= 0 (a feature whose coefficient comes out
        negative is dropped and the rest refitted). Plain least squares on purpose: throughput is
        total time, so slow steps (a GC pause, the host's other work) belong in the fit as they
        belong in the engine's runs. `split` = (long_query_tokens, long_step_tokens): the steps past
        either limit get their own coefficients (`long`: a base, one cost per fed token and one per
        context token), when there are enough of both kinds.
        Records the fit's mean absolute error."""
        if len(features) != len(seconds) or len(features) < 4:
            raise ValueError(f"need at least 4 measured steps to fit a step model, got {len(features)}")
        x = np.array([[1.0, f.rows, f.prefill_tokens, f.context_tokens] for f in features])
        y = np.asarray(seconds, dtype=float)
        is_long = np.zeros(len(y), dtype=bool)
        if split is not None:
            is_long = np.array([f.max_query_tokens > split[0] or f.tokens > split[1] for f in features])
            if min(is_long.sum(), (~is_long).sum()) < cls.MIN_STEPS_PER_KIND:
                is_long[:], split = False, None
        full = _nonnegative_lstsq(x[~is_long], y[~is_long])
        pred = x @ full
        long = None
        if split is not None:
            # Few steps of this kind (the prefills), so fewer coefficients: one per fed token,
            # decode row or prompt token alike (op by op, both go through the same matmuls).
            xl = np.stack([x[is_long, 0], x[is_long, 1] + x[is_long, 2], x[is_long, 3]], axis=1)
            c0, c1, c2 = _nonnegative_lstsq(xl, y[is_long])
            pred[is_long] = xl @ np.array([c0, c1, c2])
            long = cls(float(c0), float(c1), float(c1), float(c2), source={"steps": int(is_long.sum())})
        info = dict(source or {}, steps=len(y), mean_abs_error_s=float(np.mean(np.abs(pred - y))),
                    mean_step_s=float(y.mean()), total_error=float(pred.sum() / y.sum() - 1))
        return cls(*map(float, full), source=info, long=long, long_query_tokens=split[0] if split else None,
                   long_step_tokens=split[1] if split else None)

    def coefficients(self) -> dict[str, Any]:
        """The model without its `source` notes (for result records)."""
        out = {k: v for k, v in asdict(self).items() if k != "source"}
        if out["long"] is not None:
            out["long"] = {k: v for k, v in out["long"].items() if k in FEATURE_COEFFICIENTS}
        return out

    def describe(self) -> str:
        """One line per kind of step: the coefficients in ms and us."""
        def one(m: StepModel) -> str:
            return (f"{m.base_s * 1e3:.2f} ms + {m.per_row_s * 1e3:.3f} ms/row + {m.per_prefill_token_s * 1e3:.4f} "
                    f"ms/prefill token + {m.per_context_token_s * 1e6:.3f} us/context token")
        if self.long is None:
            return one(self)
        return (f"short steps {one(self)}; steps with a chunk over {self.long_query_tokens} tokens or over "
                f"{self.long_step_tokens} in all ({self.long.source.get('steps', '?')} measured) {one(self.long)}")


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of `x @ c = y` with c >= 0: the most negative one is dropped
    (held at 0) and the rest refitted until none is negative."""
    active = list(range(x.shape[1]))
    while True:  # the intercept too: clamping a negative one to 0 afterwards would bias every step up
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        negative = [a for a, c in zip(active, coef, strict=True) if c < 0]
        if not negative or len(active) == 1:
            break
        active.remove(min(negative, key=lambda a: coef[active.index(a)]))
    full = np.zeros(x.shape[1])
    full[active] = np.maximum(coef, 0.0)
    return full
