"""W4A16 linear: `y [M, N] = x [M, K] @ W^T` with W in 4 bits (`lengthwise.ops.int4.PackedInt4`).

The weights never exist in 16 bits in memory: each program loads a `[BLOCK_K, BLOCK_N]` tile of
packed words (the eight rows of one word read the same 32-bit word, from cache), shifts each
row's nibble out, looks its group's scale and zero up through `g_idx` (so act-ordered GPTQ
checkpoints need no reordering) and dequantizes in registers, in float32. Then:

- one row (batch-1 decode, `BLOCK_M == 1`): a GEMV, float32 multiply-and-sum over the tile, as
  `lengthwise.ops.triton.linear`'s dense one;
- more rows: `tl.dot` on `BLOCK_M` rows (16, 32 or 64 by M) with the tile cast to the activations'
  dtype (bfloat16/float16 tensor cores; float32 activations in full "ieee" precision).

Tiles are autotuned per (N, K, BLOCK_M) on first use, which is before any CUDA graph capture (the
engine warms each graph up eagerly). Under the interpreter one small configuration runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lengthwise.ops.int4 import PackedInt4


@triton.jit
def _int4_linear_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                        HAS_BIAS: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = rn < N
    mmask = rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        wmask = kmask[:, None] & nmask[None, :]
        words = tl.load(qw_ptr + (rk // 8).to(tl.int64)[:, None] * N + rn[None, :], mask=wmask, other=0)
        q = (words >> ((rk % 8) * 4)[:, None]) & 15  # (an arithmetic shift: the mask drops the sign)
        g = tl.load(g_ptr + rk, mask=kmask, other=0)
        gn = g.to(tl.int64)[:, None] * N + rn[None, :]
        scale = tl.load(s_ptr + gn, mask=wmask, other=0.0)
        zero = tl.load(z_ptr + gn, mask=wmask, other=0).to(tl.float32)
        w = (q.to(tl.float32) - zero) * scale  # [BLOCK_K, BLOCK_N]
        if BLOCK_M == 1:
            x = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + rk, mask=kmask, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[:, None], axis=0)[None, :]
        else:
            x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = w.to(x.dtype)  # (the tile rounded as a 16-bit model's dequantized weight would be)
            if DOT_F32:  # the interpreter: see `INTERPRETED` below
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


# Triton's interpreter (3.9) multiplies the raw bits of bf16/fp16 operands in `tl.dot`; there they
# are widened to float32 first (exactly), as in `lengthwise.ops.triton.attention`.
INTERPRETED = type(_int4_linear_kernel).__name__ == "InterpretedFunction"
_GEMV_TILES = ((16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 64, 4, 3), (64, 128, 4, 4),
               (128, 64, 4, 3), (128, 128, 8, 3))  # BLOCK_N, BLOCK_K, warps, stages
_DOT_TILES = ((32, 64, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3))
_gemv_tuned = _int4_linear_kernel if INTERPRETED else triton.autotune(
    [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in _GEMV_TILES],
    key=["N", "K"])(_int4_linear_kernel)
_dot_tuned = _int4_linear_kernel if INTERPRETED else triton.autotune(
    [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in _DOT_TILES],
    key=["N", "K", "BLOCK_M"])(_int4_linear_kernel)


def block_m(m: int) -> int:
    """The rows one program takes: 1 (the GEMV) for one row, else 16, 32 or 64 (`tl.dot` needs 16)."""
    return 1 if m == 1 else 16 if m <= 16 else 32 if m <= 32 else 64


def int4_linear(x: torch.Tensor, weight: PackedInt4, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None, *, tile: dict[str, int] | None = None) -> torch.Tensor:
    """`x [M, K] @ weight^T + bias` -> `[M, N]` in x's dtype (into `out` if given). `tile` (`BLOCK_N`,
    `BLOCK_K`) fixes the configuration instead of autotuning."""
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"int4_linear takes x [M, {weight.k}] for a [{weight.n}, {weight.k}] weight, got "
                         f"{list(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"int4_linear: x is on {x.device}, the weight on {weight.device}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n = x.shape[0], weight.n
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {x.dtype} tensor shaped [{m}, {n}], dense in its last dimension")
    y = out
    if m == 0:
        return y
    bm = block_m(m)
    if tile is None and INTERPRETED:
        tile = {"BLOCK_N": 16, "BLOCK_K": 32}
    args = (x, weight.qweight, weight.scales, weight.zeros, weight.g_idx, bias if bias is not None else y, y, m, n,
            weight.k, x.stride(0), y.stride(0))
    knobs = {"HAS_BIAS": bias is not None, "PREC": "ieee" if x.dtype == torch.float32 else "tf32",
             "DOT_F32": INTERPRETED and x.dtype != torch.float32, "BLOCK_M": bm}
    if tile is not None:
        _int4_linear_kernel[(triton.cdiv(n, tile["BLOCK_N"]), triton.cdiv(m, bm))](*args, **knobs, **tile)
    else:
        kernel = _gemv_tuned if bm == 1 else _dot_tuned
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))](*args, **knobs)
    return y
