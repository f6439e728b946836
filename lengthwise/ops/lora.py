"""LoRA updates for a batch whose rows use different adapters (or none).

Each adapted projection adds `(x @ A^T) @ B^T` to its output for the rows of each adapter, the
adapter's scaling folded into `B` when it was loaded. Rows are grouped by adapter (the model
runner builds the groups once per step): one pair of small matmuls per adapter and projection,
gathered and scattered with `index_select`/`index_add_` unless the adapter serves every row. A
decoder layer's fused QKV and gate-up projections take one update each: the adapter's q/k/v (or
gate/up) `A`s stacked, and their `B`s block-diagonal, so the update is two matmuls there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# The fused projections an adapter may update, by the names `DecoderLayer` uses.
PROJECTIONS = ("qkv", "o", "gate_up", "down")


@dataclass
class LoRAWeight:
    """One projection's update `out += (x @ a^T) @ b^T`: `a [rank, in]`, `b [out, rank]` (scaled).

    `blocks`: where `b` is not zero, as `(out0, out1, rank0, rank1)` per adapted part of a fused
    projection (its block-diagonal `b`); empty: all of `b`. The loader keeps `a` and `b` transposed
    in memory (`a.T`, `b.T` contiguous), the layout the updates read."""

    a: torch.Tensor
    b: torch.Tensor
    blocks: tuple[tuple[int, int, int, int], ...] = ()

    def nonzero_blocks(self) -> tuple[tuple[int, int, int, int], ...]:
        return self.blocks or ((0, self.b.shape[0], 0, self.b.shape[1]),)


# One adapter's updates of one decoder layer, by projection name (absent: not adapted).
LayerWeights = dict[str, LoRAWeight]


@dataclass(eq=False)
class AdapterWeights:
    """One adapter's updates of every decoder layer, and what a backend derived from them once
    (`derived`, by backend: the fused CPU step's table of them, say), which lives as long as they do."""

    layers: list[LayerWeights]
    derived: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerLoRA:
    """One decoder layer's updates in one forward pass: per group of rows, the weights of the
    adapter those rows use (`rows` a long tensor of row indices; None: every row)."""

    groups: list[tuple[LayerWeights, torch.Tensor | None]]

    def add(self, out: torch.Tensor, x: torch.Tensor, name: str, cols: slice | None = None) -> torch.Tensor:
        """Add the `name` projection's update of input `x [T, in]` to `out [T, N]` in place (`cols`:
        the output columns `out` holds, for a projection computed in parts); returns `out`."""
        lo = 0 if cols is None else cols.start or 0
        hi = lo + out.shape[1]
        for weights, rows in self.groups:
            w = weights.get(name)
            if w is None:
                continue
            shrunk = (x if rows is None else x.index_select(0, rows)) @ w.a.T
            # Only b's non-zero blocks (a fused projection's parts): the zeros would double or
            # triple the expand's work.
            for out0, out1, rank0, rank1 in w.nonzero_blocks():
                c0, c1 = max(out0, lo), min(out1, hi)
                if c0 >= c1:
                    continue
                update = shrunk[:, rank0:rank1] @ w.b[c0:c1, rank0:rank1].T
                if rows is None:
                    out[:, c0 - lo:c1 - lo] += update
                else:
                    out[:, c0 - lo:c1 - lo].index_add_(0, rows, update)
        return out


@dataclass
class LoRABatch:
    """A forward pass's adapters: per adapter in the step, its weights and the rows (token
    positions of the flat batch) that use it, None when it serves every row."""

    groups: list[tuple[AdapterWeights, torch.Tensor | None]]

    def layer(self, index: int) -> LayerLoRA | None:
        """Layer `index`'s updates, None if no adapter of the step changes that layer."""
        groups = [(w.layers[index], rows) for w, rows in self.groups if w.layers[index]]
        return LayerLoRA(groups) if groups else None
