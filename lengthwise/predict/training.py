"""Training helpers shared by the `proxy` and `probe` predictors: splits, the optimiser schedule,
readout selection and the feature-head fit. Deterministic for a seed on one machine."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lengthwise.predict.heads import READOUTS, LengthHead, head_loss, readout_all


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `val_fraction` of the data is held out to pick the readout."""

    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    hidden: int = 256
    dropout: float = 0.1
    val_fraction: float = 0.05
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train / held-out indices; no held-out set below 40 records (readout stays `bins`)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n * val_fraction >= 40 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def warmup_cosine(steps: int, warmup: float, floor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` of the steps, then cosine decay to `floor`."""
    w = max(1, int(steps * warmup))
    return lambda s: (s + 1) / w if s < w else floor + (1 - floor) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - w) / max(1, steps - w))))


def choose_readout(points: dict[str, np.ndarray], lengths: np.ndarray) -> tuple[str, dict[str, float]]:
    """The readout with the lowest MAE on held-out data, and every readout's MAE."""
    maes = {name: float(np.abs(points[name] - lengths).mean()) for name in READOUTS}
    return min(maes, key=maes.__getitem__), maes


def run_epochs(num_items: int, cfg: TrainConfig, step: Callable[[np.ndarray], torch.Tensor],
               optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], desc: str,
               batches: Callable[[np.random.Generator], Iterator[np.ndarray]] | None = None) -> None:
    """The training loop: shuffled batches of indices, `step(idx) -> loss`, clipping, warm-up/cosine."""
    rng = np.random.default_rng(cfg.seed)
    per_epoch = math.ceil(num_items / cfg.batch_size)
    total = max(1, int(per_epoch * cfg.epochs))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, cfg.warmup))
    bar = tqdm(total=total, desc=desc, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    done, ema = 0, None
    while done < total:
        order = batches(rng) if batches else iter(np.array_split(rng.permutation(num_items), per_epoch))
        for idx in order:
            loss = step(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
            if done >= total:
                break
    bar.close()


def fit_head(features: np.ndarray, lengths: np.ndarray, edges: Sequence[float], cfg: TrainConfig,
             desc: str = "training head") -> tuple[LengthHead, str, dict[str, float]]:
    """Fit a `LengthHead` on fixed feature vectors; returns it, the chosen readout and held-out MAEs."""
    torch.manual_seed(cfg.seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(lengths, dtype=torch.float32)
    e = torch.tensor(edges, dtype=torch.float32)
    train, val = split_indices(len(y), cfg.val_fraction, cfg.seed)
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    head = FeatureHead(LengthHead(x.shape[1], len(edges) - 1, cfg.hidden, cfg.dropout), mean, std)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head.train()
    run_epochs(len(train), cfg, lambda idx: head_loss(head(x[train[idx]]), y[train[idx]], e), optimizer,
               list(head.parameters()), desc)
    head.eval()
    head.fold_normalisation()
    if len(val) == 0:
        return head.head, "bins", {}
    with torch.no_grad():
        points, _ = readout_all(head.head(x[val]), e)
    name, maes = choose_readout({k: v.numpy() for k, v in points.items()}, y[val].numpy())
    return head.head, name, maes


class FeatureHead(torch.nn.Module):
    """A head behind a fixed standardisation of its inputs (folded into the first layer after training)."""

    def __init__(self, head: LengthHead, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head((x - self.mean) / self.std)

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """W((x - m) / s) + b == (W / s) x + (b - W m / s): the saved head takes raw features."""
        first = self.head.body[0]
        w = first.weight / self.std[None, :]
        first.bias.sub_(w @ self.mean)
        first.weight.copy_(w)
        self.mean.zero_()
        self.std.fill_(1.0)
