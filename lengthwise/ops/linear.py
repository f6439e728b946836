"""Linear layers: `F.linear`, except few-row inputs, which take a weight-streaming kernel: the Triton
GEMV for a single row on the GPU, the C++ small-row linear on the CPU (batch-1 decode's LM head)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lengthwise.ops import cpu as cpu_kernels
from lengthwise.ops import triton as triton_ops
from lengthwise.ops.cpu import packed as cpu_packed
from lengthwise.ops.dispatch import kernel_choice, use_triton

GEMV_ENV = "LENGTHWISE_GEMV"  # "0" keeps cuBLAS / MKL for few rows too (an A/B switch)
CPU_MAX_ROWS = 8  # beyond this MKL's blocked GEMM is faster than streaming the weights per row block


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, K] @ weight [N, K]^T + bias`. One row takes the Triton GEMV where Triton runs, and up to
    `CPU_MAX_ROWS` float32 rows on the CPU the C++ small-row linear: both stream the weights faster
    than cuBLAS / MKL at decode sizes. More rows take `packed` (`lengthwise.ops.cpu.packed.pack(weight)`)
    where the caller has it. Everything else is `F.linear` (docs/benchmarks.md has the numbers)."""
    if x.dim() != 2 or x.shape[0] > CPU_MAX_ROWS or os.environ.get(GEMV_ENV, "1") == "0":
        if packed is not None and x.dim() == 2 and kernel_choice() != "torch" and cpu_packed.enabled():
            return cpu_packed.linear(x, packed, bias)
        return F.linear(x, weight, bias)
    if x.shape[0] == 1 and use_triton(x):
        return triton_ops.gemv(x, weight, bias)
    if x.device.type == "cpu" and kernel_choice() != "torch" and cpu_kernels.linear_rows_supported(x, weight):
        return cpu_kernels.linear(x, weight, bias)
    return F.linear(x, weight, bias)
