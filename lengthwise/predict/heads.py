"""The trained part of the `proxy` and `probe` predictors: an MLP over a feature vector.

One head, three readouts, trained jointly (multi-task; they share the hidden layer):
- `bins`: classification over length bins (cross-entropy); the distribution a prediction
  carries, read out at its median;
- `ordinal`: one logit per inner edge for P(length > edge) (binary cross-entropy), read out where
  the cumulative curve crosses 1/2;
- `regression`: log-length with an L1 loss, whose minimiser is the median.
The target is a maximum over samples, heavily right-skewed, so every readout aims at the median,
not the mean. Which readout (or the mean of all three) is used is chosen on a held-out split at
training time and stored with the predictor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

READOUTS = ("bins", "ordinal", "regression", "mean")
LOG_SCALE = 100.0  # regression output is log(length / 100): O(1) numbers at init


def default_edges(lengths: Sequence[float], width: float = 25.0) -> list[float]:
    """Equal-width bins of `width` tokens from 0 past the longest training length."""
    top = max(width, math.ceil((max(lengths) + 1) / width) * width)
    return [float(e) for e in np.arange(0.0, top + width / 2, width)]


class LengthHead(nn.Module):
    """features [B, dim] -> (bin logits [B, K], ordinal logits [B, K-1], log-length [B])."""

    def __init__(self, dim: int, num_bins: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_bins = num_bins
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.out = nn.Linear(hidden, 2 * num_bins)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.out(self.body(x))
        k = self.num_bins
        return y[:, :k], y[:, k:2 * k - 1], y[:, 2 * k - 1]


def head_loss(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lengths: torch.Tensor,
              edges: torch.Tensor) -> torch.Tensor:
    """The sum of the three readouts' losses for true `lengths` [B] (float tokens)."""
    logits, ordinal, reg = outputs
    k = logits.shape[1]
    cls = (torch.bucketize(lengths, edges[1:-1], right=True)).clamp_(0, k - 1)
    above = (lengths[:, None] >= edges[None, 1:-1]).float()
    return (nn.functional.cross_entropy(logits, cls)
            + nn.functional.binary_cross_entropy_with_logits(ordinal, above)
            + (reg - torch.log(lengths.clamp(min=1.0) / LOG_SCALE)).abs().mean())


def readout_all(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], edges: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Point estimates per readout ({name: [B]}) and the bin distribution [B, K]."""
    logits, ordinal, reg = (o.float() for o in outputs)
    probs = torch.softmax(logits, dim=-1)
    lo, hi = edges[:-1], edges[1:]
    bins = _median(torch.cumsum(probs, -1), probs, lo, hi)
    # Ordinal: survival S(e_i) = P(length > e_i), made monotone, 1 at the first edge, 0 at the last.
    surv = torch.sigmoid(ordinal)
    surv = torch.cummin(surv, dim=-1).values
    cdf = 1 - torch.cat([torch.ones_like(surv[:, :1]), surv, torch.zeros_like(surv[:, :1])], -1)
    ord_probs = (cdf[:, 1:] - cdf[:, :-1]).clamp(min=0)
    ordinal_median = _median(cdf[:, 1:], ord_probs, lo, hi)
    regression = torch.exp(reg) * LOG_SCALE
    points = {"bins": bins, "ordinal": ordinal_median, "regression": regression,
              "mean": (bins + ordinal_median + regression) / 3}
    return points, probs


def _median(cdf: torch.Tensor, probs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Where a piecewise-uniform distribution's CDF crosses 1/2, linear inside the bin."""
    cdf = cdf.contiguous()
    k = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], 0.5)).clamp(max=cdf.shape[1] - 1)
    before = torch.where(k > 0, torch.gather(cdf, 1, (k - 1).clamp(min=0)), torch.zeros_like(k, dtype=cdf.dtype))
    p = torch.gather(probs, 1, k).clamp(min=1e-9)
    frac = ((0.5 - before) / p).clamp(0, 1)
    return (lo[k] + frac * (hi[k] - lo[k])).squeeze(1)
