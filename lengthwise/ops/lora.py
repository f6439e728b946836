"""LoRA updates for a batch whose rows use different adapters (or none).

Each adapted projection adds `(x @ A^T) @ B^T` to its output for the rows of each adapter, the
adapter's scaling folded into `B` when it was loaded. Rows are grouped by adapter (the model
runner builds the groups once per step): one pair of small matmuls per adapter and projection,
gathered and scattered with `index_select`/`index_add_` unless the adapter serves every row. A
decoder layer's fused QKV and gate-up projections take one update each: the adapter's q/k/v (or
gate/up) `A`s stacked, and their `B`s block-diagonal, so the update is two matmuls there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The fused projections an adapter may update, by the names `DecoderLayer` uses.
PROJECTIONS = ("qkv", "o", "gate_up", "down")


@dataclass
class LoRAWeight:
    """One projection's update `out += (x @ a^T) @ b^T`: `a [rank, in]`, `b [out, rank]` (scaled)."""

    a: torch.Tensor
    b: torch.Tensor


# One adapter's updates of one decoder layer, by projection name (absent: not adapted).
LayerWeights = dict[str, LoRAWeight]


@dataclass
class LayerLoRA:
    """One decoder layer's updates in one forward pass: per group of rows, the weights of the
    adapter those rows use (`rows` a long tensor of row indices; None: every row)."""

    groups: list[tuple[LayerWeights, torch.Tensor | None]]

    def add(self, out: torch.Tensor, x: torch.Tensor, name: str, cols: slice | None = None) -> torch.Tensor:
        """Add the `name` projection's update of input `x [T, in]` to `out [T, N]` in place (`cols`:
        the output columns `out` holds, for a projection computed in parts); returns `out`."""
        for weights, rows in self.groups:
            w = weights.get(name)
            if w is None:
                continue
            b = w.b if cols is None else w.b[cols]
            if rows is None:
                out.addmm_(x @ w.a.T, b.T)
            else:
                out.index_add_(0, rows, (x.index_select(0, rows) @ w.a.T) @ b.T)
        return out


@dataclass
class LoRABatch:
    """A forward pass's adapters: per adapter in the step, its per-layer weights and the rows
    (token positions of the flat batch) that use it, None when it serves every row."""

    groups: list[tuple[list[LayerWeights], torch.Tensor | None]]

    def layer(self, index: int) -> LayerLoRA | None:
        """Layer `index`'s updates, None if no adapter of the step changes that layer."""
        groups = [(layers[index], rows) for layers, rows in self.groups if layers[index]]
        return LayerLoRA(groups) if groups else None
