"""Linear layers: `F.linear`, except single-row inputs on the Triton path (batch-1 decode).

(CPU decode steps do not come here: `lengthwise.ops.cpu.decode` runs their matmuls in C++.)"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lengthwise.ops import triton as triton_ops
from lengthwise.ops.dispatch import use_triton

GEMV_ENV = "LENGTHWISE_GEMV"  # "0" keeps cuBLAS for single rows too (an A/B switch)


def gemv_enabled() -> bool:
    """Whether single rows may take Triton GEMVs (`LENGTHWISE_GEMV` is not "0")."""
    return os.environ.get(GEMV_ENV, "1") != "0"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, K] @ weight [N, K]^T + bias`. One row takes the Triton GEMV where Triton runs (it streams
    the weights faster than cuBLAS at decode sizes: docs/benchmarks.md); everything else is `F.linear`."""
    if x.dim() == 2 and x.shape[0] == 1 and gemv_enabled() and use_triton(x):
        return triton_ops.gemv(x, weight, bias)
    return F.linear(x, weight, bias)
