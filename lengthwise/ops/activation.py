"""SiLU-and-multiply over the fused gate-up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, where `gate_up` is `[..., 2 * intermediate]` with gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
