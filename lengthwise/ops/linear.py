"""Linear layers: `F.linear`, except a single row on the GPU (the Triton GEMV) and float32 CPU
weights prepacked for oneDNN (many-row steps; few-row CPU steps take `lengthwise.ops.cpu.decode`)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lengthwise.ops import triton as triton_ops
from lengthwise.ops.cpu import packed as cpu_packed
from lengthwise.ops.dispatch import kernel_choice, use_triton

GEMV_ENV = "LENGTHWISE_GEMV"  # "0" keeps cuBLAS for single rows too (an A/B switch)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, K] @ weight [N, K]^T + bias`. One row takes the Triton GEMV where Triton runs (it streams
    the weights faster than cuBLAS at decode sizes); with `packed` (`lengthwise.ops.cpu.packed.pack(weight)`)
    oneDNN's inner product on it, which skips MKL's per-call re-packing (docs/benchmarks.md).
    Everything else is `F.linear`."""
    if x.dim() == 2 and x.shape[0] == 1 and os.environ.get(GEMV_ENV, "1") != "0" and use_triton(x):
        return triton_ops.gemv(x, weight, bias)
    if packed is not None and x.dim() == 2 and kernel_choice() != "torch" and cpu_packed.enabled():
        return cpu_packed.linear(x, packed, bias)
    return F.linear(x, weight, bias)
