"""How long one engine step takes, as a function of what the step computes: the simulator's clock.

    seconds = base_s + per_row_s * rows + per_prefill_token_s * prefill_tokens
              + per_context_token_s * context_tokens

`rows` are the sequences the step samples a token for (decode rows, and prompts whose prefill
ends in this step), `prefill_tokens` the prompt (and recomputed) tokens it feeds, `context_tokens`
the cached tokens the decode rows attend over. A constant per-step time (only `base_s`) is the
multi-bin paper's model; `lengthwise simulate calibrate` fits all four from the real engine's
steps and saves them as JSON. Pure Python + numpy: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("rows", "prefill_tokens", "context_tokens")


@dataclass(frozen=True)
class StepFeatures:
    """What one step computes (see the module docstring)."""

    rows: int
    prefill_tokens: int
    context_tokens: int


def step_features(chunks: Iterable[Any]) -> StepFeatures:
    """The features of a step from the `ScheduledChunk`s the scheduler planned for it."""
    rows = prefill = context = 0
    for c in chunks:
        if c.seq is None:
            prefill += c.num_tokens
            if c.sample:
                rows += len(c.request.active_seqs)
        else:
            if c.num_tokens > 1:  # a recomputed response: fed like a prompt
                prefill += c.num_tokens - 1
            if c.sample:
                rows += 1
                context += c.request.prompt_len + c.end
    return StepFeatures(rows, prefill, context)


@dataclass
class StepModel:
    """Seconds per engine step, linear in `StepFeatures` (the module docstring has the formula)."""

    base_s: float
    per_row_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_context_token_s: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)  # how it was made (calibration run, fit error)

    def __post_init__(self) -> None:
        for name in ("base_s", "per_row_s", "per_prefill_token_s", "per_context_token_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"step model {name} must be a number >= 0, got {value!r}")
        if self.base_s == self.per_row_s == self.per_prefill_token_s == self.per_context_token_s == 0:
            raise ValueError("a step model needs at least one positive coefficient")

    def __call__(self, f: StepFeatures) -> float:
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
        known = {"base_s", "per_row_s", "per_prefill_token_s", "per_context_token_s", "source"}
        if not isinstance(raw, dict) or "base_s" not in raw or set(raw) - known:
            raise ValueError(f"step model {str(path)!r} must be a JSON object with base_s and only {sorted(known)}")
        return cls(**raw)

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
            source: dict[str, Any] | None = None) -> StepModel:
        """Least squares with every coefficient kept >= 0 (a feature whose coefficient comes out
        negative is dropped and the rest refitted). Plain least squares on purpose: throughput is
        total time, so slow steps (a GC pause, the host's other work) belong in the fit as they
        belong in the engine's runs. Records the fit's mean absolute error."""
        if len(features) != len(seconds) or len(features) < 4:
            raise ValueError(f"need at least 4 measured steps to fit a step model, got {len(features)}")
        x = np.array([[1.0, f.rows, f.prefill_tokens, f.context_tokens] for f in features])
        y = np.asarray(seconds, dtype=float)
        full = _nonnegative_lstsq(x, y)
        pred = x @ full
        info = dict(source or {}, steps=len(y), mean_abs_error_s=float(np.mean(np.abs(pred - y))),
                    mean_step_s=float(y.mean()), total_error=float(pred.sum() / y.sum() - 1))
        return cls(*map(float, full), source=info)


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of `x @ c = y` with c >= 0: the most negative one is dropped
    (held at 0) and the rest refitted until none is negative."""
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        negative = [a for a, c in zip(active, coef, strict=True) if c < 0 and a != 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda a: coef[active.index(a)]))
    full = np.zeros(x.shape[1])
    full[active] = coef
    full[0] = max(full[0], 0.0)
    return full
