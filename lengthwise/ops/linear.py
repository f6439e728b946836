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
# From how many rows a packed CPU weight is unpacked for MKL's GEMM instead of the panel kernel,
# by panel dtype. The panel kernel streams every row once per 32-column panel, which costs it at
# prefill sizes (0.7x MKL at 2048 rows); one copy of the weight (a few % of such a product) buys
# MKL's blocking (docs/benchmarks.md, "Embeddings"). bfloat16 and int8 panels convert as they
# unpack, so they switch later; 4-bit and input-reordered panels never do.
DENSE_FROM_ROWS = {torch.float32: 768, torch.bfloat16: 1536, torch.int8: 1536}
DENSE_ROWS_ENV = "LENGTHWISE_DENSE_ROWS"  # a row count for those dtypes, or "0": always the panels (A/B)


def gemv_enabled() -> bool:
    """Whether single rows may take Triton GEMVs (`LENGTHWISE_GEMV` is not "0")."""
    return os.environ.get(GEMV_ENV, "1") != "0"


def _dense_is_faster(x: torch.Tensor, weight: PackedWeight) -> bool:
    """Whether `x`'s rows are enough for MKL on the unpacked `weight` to beat the panels (`DENSE_FROM_ROWS`)."""
    threshold = DENSE_FROM_ROWS.get(weight.dtype)
    if threshold is None or weight.perm is not None:
        return False
    env = os.environ.get(DENSE_ROWS_ENV)
    if env is not None:
        if not env.strip().isdigit():
            raise ValueError(f"{DENSE_ROWS_ENV} must be a row count (0: always the panels), got {env!r}")
        threshold = int(env)
    return threshold > 0 and x.numel() >= threshold * x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight | PackedInt4,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, K] @ weight [N, K]^T + bias`. One row takes the Triton GEMV where Triton runs (it streams
    the weights faster than cuBLAS at decode sizes: docs/benchmarks.md); everything else is `F.linear`.
    A CPU model's packed weights (`lengthwise.ops.cpu.PackedWeight`) run on the panel GEMM, which
    beats MKL at decode sizes (docs/benchmarks.md); from `DENSE_FROM_ROWS` rows (long prefill
    steps) they are unpacked for MKL, which blocks large products better. Elsewhere (the
    torch reference, Triton under the interpreter) they are unpacked at every call: correct, slow,
    and meant for tests and A/B runs only. A 4-bit weight takes the W4A16 kernel wherever Triton runs
    (any number of rows); the torch reference dequantizes it at every call, likewise."""
    if isinstance(weight, PackedInt4):
        if use_triton(x):
            return triton_ops.int4_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.n)
        weight = weight.dequantize(x.dtype)
    if isinstance(weight, PackedWeight):
        if use_panels(x) and not _dense_is_faster(x, weight):
            return packed_linear(x, weight, bias)
        weight = weight.unpack().to(x.device, x.dtype)
    if x.dim() == 2 and x.shape[0] == 1 and gemv_enabled() and use_triton(x):
        return triton_ops.gemv(x, weight, bias)
    return F.linear(x, weight, bias)
