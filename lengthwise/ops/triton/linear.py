"""Matrix-vector product for batch-1 decode: `y [1, N] = x [1, K] @ W [N, K]^T` (+ bias).

At one row a linear layer only streams its weight matrix, and at decode sizes cuBLAS leaves
bandwidth unused on the smaller matrices (a 2048 x 2048 projection reads 8 MiB in about 7 us on an
H100, 40% of the copy rate). Here each program reduces BLOCK_N weight rows over the whole K in
BLOCK_K tiles with float32 accumulators; the tile shape is autotuned per (N, K) on first use (before
any CUDA graph capture, since the engine warms each graph up eagerly). Under the interpreter one
fixed configuration runs.

Split-K (`LENGTHWISE_GEMV_SPLITK=1` adds these configurations to the autotuned ones; off by
default until measured on a GPU): with few output rows and a long K (the down projection:
2048 x 8192) there are too few programs streaming at once, so SPLIT programs share a row block,
each over a slice of K. Each stores its float32 partial sums, then takes a ticket from a counter
per row block; the last to arrive adds the SPLIT partials in split order (deterministic, whichever
program is last), adds the bias, stores the result and resets the counter for the next launch.
One launch, no atomics on the output.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SPLITK_ENV = "LENGTHWISE_GEMV_SPLITK"


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k_lo, k_hi = 0, K
    if SPLIT > 1:  # this program's slice of K: whole BLOCK_K tiles
        chunk = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(1) * chunk
        k_hi = tl.minimum(k_lo + chunk, K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_hi
        x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    if SPLIT > 1:
        tl.store(part_ptr + tl.program_id(1) * N + n, acc, mask=nmask)
        # Every thread's partials are stored before one thread's release publishes them (CUTLASS's
        # semaphore pattern: a barrier, then the atomic; triton 3.6 inserts no barrier of its own
        # before a release atomic). The ticket is broadcast to every thread.
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if ticket == SPLIT - 1:  # every other slice of this row block is stored: add them in order
            acc = tl.zeros([BLOCK_N], tl.float32)
            for s in range(SPLIT):
                acc += tl.load(part_ptr + s * N + n, mask=nmask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + n, acc, mask=nmask)
            tl.atomic_xchg(count_ptr + pid, 0)  # ready for the next launch (or graph replay)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, acc, mask=nmask)


INTERPRETED = type(_gemv_kernel).__name__ == "InterpretedFunction"
_TILES = ((4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 4), (16, 512, 4, 3),
          (32, 256, 4, 3), (32, 256, 8, 4), (64, 128, 4, 4))  # BLOCK_N, BLOCK_K, warps, stages
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1}, num_warps=w, num_stages=s)
            for bn, bk, w, s in _TILES]
_SPLIT_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp}, num_warps=w, num_stages=s)
                  for sp in (2, 4, 8) for bn, bk, w, s in ((8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3),
                                                           (32, 256, 4, 3))]
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _CONFIGS + _SPLIT_CONFIGS)
MAX_SPLIT = max(c.kwargs["SPLIT"] for c in _SPLIT_CONFIGS)
_gemv_tuned = _gemv_kernel if INTERPRETED else triton.autotune(_CONFIGS, key=["N", "K"])(_gemv_kernel)
_gemv_split_tuned = _gemv_kernel if INTERPRETED else triton.autotune(
    _CONFIGS + _SPLIT_CONFIGS, key=["N", "K"])(_gemv_kernel)
# Per (device, N): float32 partials [MAX_SPLIT, N] and zeroed counters, one per row block. Each
# launch leaves its counters at zero, and launches on one stream run one after another, so every
# layer's GEMV of that width shares them. Made on first use, which is before any graph capture.
_workspace: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _splitk_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, n)
    if key not in _workspace:
        _workspace[key] = (torch.empty((MAX_SPLIT, n), dtype=torch.float32, device=device),
                           torch.zeros(triton.cdiv(n, MIN_BLOCK_N), dtype=torch.int32, device=device))
    return _workspace[key]


def splitk_enabled() -> bool:
    """Whether split-K configurations join the autotuned ones (`LENGTHWISE_GEMV_SPLITK=1`)."""
    return os.environ.get(SPLITK_ENV, "0") == "1"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         tile: dict[str, int] | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for `x [1, K]`; returns `[1, N]` in x's dtype. `tile`
    (`BLOCK_N`, `BLOCK_K`, optionally `SPLIT`) fixes the configuration instead of autotuning."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"gemv takes x [1, K] and weight [N, K], got {list(x.shape)} and {list(weight.shape)}")
    n, k = weight.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y  # unused without a bias
    if tile is None and INTERPRETED:  # one small configuration (split when split-K is on, to test it)
        tile = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 2 if splitk_enabled() else 1}
    if tile is not None:
        tile = {"SPLIT": 1, **tile}
        if not 1 <= tile["SPLIT"] <= MAX_SPLIT or tile["SPLIT"] > 1 and tile["BLOCK_N"] < MIN_BLOCK_N:
            raise ValueError(f"tile needs 1 <= SPLIT <= {MAX_SPLIT} and BLOCK_N >= {MIN_BLOCK_N}, got {tile}")
    split = tile is not None and tile["SPLIT"] > 1 or tile is None and splitk_enabled()
    part, count = _splitk_workspace(x.device, n) if split else (y, y)  # unused without a split
    args = (x, weight, b, y, part, count, n, k, weight.stride(0))
    if tile is not None:
        _gemv_kernel[(triton.cdiv(n, tile["BLOCK_N"]), tile["SPLIT"])](*args, HAS_BIAS=bias is not None, **tile)
    else:
        kernel = _gemv_split_tuned if split else _gemv_tuned
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])](*args, HAS_BIAS=bias is not None)
    return y
