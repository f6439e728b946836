"""Linear layers: `F.linear`, except single-row inputs on the Triton path (batch-1 decode) and
4-bit weights (`lengthwise.ops.int4.PackedInt4`), which the Triton W4A16 kernel reads as they are.

(CPU decode steps do not come here: `lengthwise.ops.cpu.decode` runs their matmuls in C++.)"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lengthwise.ops import triton as triton_ops
from lengthwise.ops.cpu import PackedWeight, packed_linear, use_panels
from lengthwise.ops.dispatch import use_triton
from lengthwise.ops.int4 import PackedInt4

GEMV_ENV = "LENGTHWISE_GEMV"  # "0" keeps cuBLAS for single rows too (an A/B switch)


def gemv_enabled() -> bool:
    """Whether single rows may take Triton GEMVs (`LENGTHWISE_GEMV` is not "0")."""
    return os.environ.get(GEMV_ENV, "1") != "0"


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight | PackedInt4,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, K] @ weight [N, K]^T + bias`. One row takes the Triton GEMV where Triton runs (it streams
    the weights faster than cuBLAS at decode sizes: docs/benchmarks.md); everything else is `F.linear`.
    A CPU model's packed weights (`lengthwise.ops.cpu.PackedWeight`) run on the panel GEMM, which
    matches MKL at prefill sizes and beats it at decode sizes (docs/benchmarks.md). Elsewhere (the
    torch reference, Triton under the interpreter) they are unpacked at every call: correct, slow,
    and meant for tests and A/B runs only. A 4-bit weight takes the W4A16 kernel wherever Triton runs
    (any number of rows); the torch reference dequantizes it at every call, likewise."""
    if isinstance(weight, PackedInt4):
        if use_triton(x):
            return triton_ops.int4_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.n)
        weight = weight.dequantize(x.dtype)
    if isinstance(weight, PackedWeight):
        if use_panels(x):
            return packed_linear(x, weight, bias)
        weight = weight.unpack().to(x.device, x.dtype)
    if x.dim() == 2 and x.shape[0] == 1 and gemv_enabled() and use_triton(x):
        return triton_ops.gemv(x, weight, bias)
    return F.linear(x, weight, bias)
