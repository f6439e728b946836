"""SiLU-and-multiply over the fused gate-up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lengthwise.ops import triton as triton_ops
from lengthwise.ops.dispatch import use_triton


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, where `gate_up` is `[..., 2 * intermediate]` with gate first."""
    if use_triton(gate_up):
        return triton_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
