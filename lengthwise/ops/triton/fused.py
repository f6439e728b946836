"""Single-row (batch-1 decode) GEMVs with their neighbouring elementwise ops fused in.

At one row a decoder layer is eleven small kernels, and on an H100 the four elementwise ones
(residual add + RMSNorm twice, RoPE + KV write, SiLU-and-mul) cost 2-3.5 us each in launch and
latency against ~40 us of weight reads per layer (docs/benchmarks.md). Here they ride along in the
GEMVs that read their outputs or produce their inputs:

- `norm_qkv_rotary_write`: `x + residual` -> RMSNorm -> QKV GEMV (+ bias) -> RoPE on q and k ->
  q to its output, k and v straight into the paged cache at the token's slot;
- `norm_gate_up_silu`: `x + residual` -> RMSNorm -> gate-up GEMV (+ bias) -> `silu(gate) * up`.

The norm costs no pass of its own: `W @ (h * g / rms(h)) = (W @ (h * g)) / rms(h)`, so every
program accumulates `h * g` against its weight rows and the sum of squares of `h` in the same
pass over K, and scales by 1 / rms at the end (program 0 alone stores the new residual `h`).
The epilogues pair rows: a QKV program owns rows `j` and `j + head_dim / 2` of one head (the
two halves RoPE mixes), a gate-up program rows `n` of the gate and of the up half. Values are
rounded to the activation dtype where the unfused path stores them (the residual sum, the GEMV
output, each RoPE product, silu), except the normalised row, which the fused kernel never
stores: in bf16 its outputs are a little more precise than the unfused ops', and agree with them
to bf16's rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lengthwise.ops.triton.rotary import _rotate_half, to_cache


@triton.jit
def _input_tile(x_ptr, r_ptr, g_ptr, sum_ptr, k, kmask, is_first, HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr):
    """Columns `k` of the GEMV's input row, as float32: `h = x + residual` (rounded to x's dtype, as
    the unfused add stores it; the first program stores it, the next residual) and `h * g`."""
    x = tl.load(x_ptr + k, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + k, mask=kmask, other=0.0).to(tl.float32)).to(x.dtype)
        # (A block mask: the interpreter rejects a block combined with a scalar condition.)
        tl.store(sum_ptr + k, x, mask=kmask & ((k * 0 + is_first) != 0))
    h = x.to(tl.float32)
    if NORM:
        return h, h * tl.load(g_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    return h, h


@triton.jit
def _two_row_sets(x_ptr, r_ptr, g_ptr, sum_ptr, w_ptr, rows_a, rows_b, rmask, K, stride_wn, eps, is_first,
                  HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """`W[rows_a] @ h'` and `W[rows_b] @ h'` in float32, with `h' = norm(x + residual) * g` (or x),
    in one pass over K: every product is summed with `h * g`, and 1/rms(h) scales both at the end."""
    ss = tl.zeros([BLOCK_K], tl.float32)
    acc_a = tl.zeros([BLOCK_R], tl.float32)
    acc_b = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        h, x = _input_tile(x_ptr, r_ptr, g_ptr, sum_ptr, k, kmask, is_first, HAS_RESIDUAL, NORM)
        ss += h * h
        m = rmask[:, None] & kmask[None, :]
        w_a = tl.load(w_ptr + rows_a[:, None].to(tl.int64) * stride_wn + k[None, :], mask=m, other=0.0)
        w_b = tl.load(w_ptr + rows_b[:, None].to(tl.int64) * stride_wn + k[None, :], mask=m, other=0.0)
        acc_a += tl.sum(w_a.to(tl.float32) * x[None, :], 1)
        acc_b += tl.sum(w_b.to(tl.float32) * x[None, :], 1)
    if NORM:  # 1 / rms is one factor of every product: applied once, after the pass over K
        rstd = tl.math.rsqrt(tl.sum(ss, 0) / K + eps)
        acc_a *= rstd
        acc_b *= rstd
    return acc_a, acc_b


@triton.jit
def _norm_qkv_rotary_kernel(x_ptr, r_ptr, g_ptr, sum_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, q_ptr,
                            k_cache_ptr, v_cache_ptr, slot_ptr, K, stride_wn, kc_ss, kc_sh, vc_ss, vc_sh, eps,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    head = tl.program_id(0)  # q heads, then k heads, then v heads
    j = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    jmask = j < HALF
    lo = head * (2 * HALF) + j  # the two rows RoPE rotates together
    hi = lo + HALF
    acc_lo, acc_hi = _two_row_sets(x_ptr, r_ptr, g_ptr, sum_ptr, w_ptr, lo, hi, jmask, K, stride_wn, eps,
                                   (head == 0) & (tl.program_id(1) == 0), HAS_RESIDUAL, NORM, BLOCK_P, BLOCK_K)
    if HAS_BIAS:
        acc_lo += tl.load(b_ptr + lo, mask=jmask, other=0.0).to(tl.float32)
        acc_hi += tl.load(b_ptr + hi, mask=jmask, other=0.0).to(tl.float32)
    dt = q_ptr.dtype.element_ty
    y1 = acc_lo.to(dt).to(tl.float32)  # the projection's output, as the unfused GEMV stores it
    y2 = acc_hi.to(dt).to(tl.float32)
    if head < HEADS + KV_HEADS:
        c1 = tl.load(cos_ptr + j, mask=jmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + j, mask=jmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + j, mask=jmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + j, mask=jmask, other=0.0).to(tl.float32)
        y1, y2 = _rotate_half(y1, y2, c1, c2, s1, s2, dt)
    slot = tl.load(slot_ptr).to(tl.int64)
    keep = jmask & ((j * 0 + slot) >= 0)  # a negative slot (padding) writes no key or value
    if head < HEADS:
        tl.store(q_ptr + lo, y1, mask=jmask)
        tl.store(q_ptr + hi, y2, mask=jmask)
    elif head < HEADS + KV_HEADS:
        dst = k_cache_ptr + slot * kc_ss + (head - HEADS) * kc_sh + j
        tl.store(dst, to_cache(y1, k_cache_ptr.dtype.element_ty, dt), mask=keep)
        tl.store(dst + HALF, to_cache(y2, k_cache_ptr.dtype.element_ty, dt), mask=keep)
    else:
        dst = v_cache_ptr + slot * vc_ss + (head - HEADS - KV_HEADS) * vc_sh + j
        tl.store(dst, to_cache(y1, v_cache_ptr.dtype.element_ty, dt), mask=keep)
        tl.store(dst + HALF, to_cache(y2, v_cache_ptr.dtype.element_ty, dt), mask=keep)


@triton.jit
def _norm_gate_up_silu_kernel(x_ptr, r_ptr, g_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, eps,
                              HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # gate rows n, up rows N + n
    nmask = n < N
    acc_g, acc_u = _two_row_sets(x_ptr, r_ptr, g_ptr, sum_ptr, w_ptr, n, N + n, nmask, K, stride_wn, eps, pid == 0,
                                 HAS_RESIDUAL, NORM, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        acc_u += tl.load(b_ptr + N + n, mask=nmask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    gate = acc_g.to(dt).to(tl.float32)
    up = acc_u.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)  # torch rounds silu before the multiply
    tl.store(out_ptr + n, act * up, mask=nmask)


INTERPRETED = type(_norm_gate_up_silu_kernel).__name__ == "InterpretedFunction"
# Rows per program are 2 * BLOCK: the plain GEMV's tile shapes (`linear.py`), less (16, 256, 4 warps),
# which spills under triton 3.6 here (benchmarks/triton_compile_check.py).
_CONFIGS = {
    "BLOCK_P": [triton.Config({"BLOCK_P": bp, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bp, bk, w, s in ((2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 8, 3), (8, 256, 4, 4),
                                     (8, 512, 4, 3), (16, 256, 8, 4), (32, 128, 4, 4))],
}
_CONFIGS["BLOCK_N"] = [triton.Config({"BLOCK_N": c.kwargs["BLOCK_P"], "BLOCK_K": c.kwargs["BLOCK_K"]},
                                     num_warps=c.num_warps, num_stages=c.num_stages) for c in _CONFIGS["BLOCK_P"]]
# Re-running a config during tuning rewrites the same values (no input is modified), so tuning is safe.
_qkv_tuned = _norm_qkv_rotary_kernel if INTERPRETED else triton.autotune(
    _CONFIGS["BLOCK_P"], key=["K", "HEADS", "KV_HEADS", "HALF", "HAS_RESIDUAL"])(_norm_qkv_rotary_kernel)
_gate_up_tuned = _norm_gate_up_silu_kernel if INTERPRETED else triton.autotune(
    _CONFIGS["BLOCK_N"], key=["N", "K", "HAS_RESIDUAL"])(_norm_gate_up_silu_kernel)
_INTERPRETER_TILE = {"BLOCK_K": 64}  # and 8 rows per program: small, so tests cover several programs


def _single_row(name: str, t: torch.Tensor, k: int) -> torch.Tensor:
    if t.shape != (1, k):
        raise ValueError(f"{name} must be [1, {k}] (one row), got {list(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _output(out: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor shaped {list(shape)}")
    return out


def _prologue(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
              weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs: (x, residual or x, the new residual's buffer)."""
    k = weight.shape[1]
    x = _single_row("x", x, k)
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be [{k}], got {list(norm_weight.shape)}")
    if residual is not None and norm_weight is None:
        raise ValueError("residual is added before the norm: pass norm_weight with it")
    if residual is None:
        return x, x, x
    if residual.dtype != x.dtype:
        raise ValueError(f"residual must be {x.dtype} like x, got {residual.dtype}")
    return x, _single_row("residual", residual, k), torch.empty_like(x)


def norm_qkv_rotary_write(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
                          eps: float, weight: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, out: torch.Tensor | None = None, *,
                          tile: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one token `x [1, hidden]`: `h = norm(x + residual) * norm_weight` (no norm when
    `norm_weight` is None), `q, k, v = h @ weight.T + bias`, RoPE on q and k with `cos`/`sin
    [1, head_dim]`, k and v stored into `k_cache`/`v_cache [slots, kv_heads, head_dim]` at
    `slot_mapping [1]`. Returns `(q [1, heads, head_dim], x + residual)`, q in `out` if given.
    `tile` (`BLOCK_P` row pairs, `BLOCK_K`) fixes the tile instead of autotuning (tests, benchmarks)."""
    if weight.dim() != 2 or weight.stride(-1) != 1:
        raise ValueError(f"weight must be a [N, hidden] matrix dense in hidden, got {list(weight.shape)}")
    x, r, total = _prologue(x, residual, norm_weight, weight)
    _, kv_heads, dim = k_cache.shape
    n = weight.shape[0]
    if dim % 2 or n % dim or n // dim <= 2 * kv_heads:
        raise ValueError(f"weight's {n} rows are not q, k and v heads of head_dim {dim} with {kv_heads} KV heads")
    heads = n // dim - 2 * kv_heads
    if v_cache.shape != k_cache.shape or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be the same shape, contiguous in head_dim")
    if cos.shape != (1, dim) or sin.shape != (1, dim):
        raise ValueError(f"cos and sin must be [1, {dim}], got {list(cos.shape)} and {list(sin.shape)}")
    if slot_mapping.shape != (1,):
        raise ValueError(f"slot_mapping must be [1], got {list(slot_mapping.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    q = _output(out, (1, heads, dim), x)
    half = dim // 2
    args = (x, r, norm_weight if norm_weight is not None else x, total, weight, bias if bias is not None else x,
            cos, sin, q, k_cache, v_cache, slot_mapping, weight.shape[1], weight.stride(0), k_cache.stride(0),
            k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), float(eps))
    flags = dict(HEADS=heads, KV_HEADS=kv_heads, HALF=half, HAS_RESIDUAL=residual is not None,
                 NORM=norm_weight is not None, HAS_BIAS=bias is not None)
    grid_heads = heads + 2 * kv_heads
    if tile is None and INTERPRETED:
        tile = {"BLOCK_P": 4, **_INTERPRETER_TILE}
    if tile is not None:
        _norm_qkv_rotary_kernel[(grid_heads, triton.cdiv(half, tile["BLOCK_P"]))](*args, **flags, **tile)
    else:
        _qkv_tuned[lambda meta: (grid_heads, triton.cdiv(half, meta["BLOCK_P"]))](*args, **flags)
    return q, total


def norm_gate_up_silu(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None, *,
                      tile: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one token `x [1, hidden]`: `h = norm(x + residual) * norm_weight` (no norm when
    `norm_weight` is None), `gate, up = h @ weight.T + bias` (gate rows first), and returns
    `(silu(gate) * up [1, intermediate], x + residual)`, the activation in `out` if given.
    `tile` (`BLOCK_N` rows of each half, `BLOCK_K`) fixes the tile instead of autotuning."""
    if weight.dim() != 2 or weight.shape[0] % 2 or weight.stride(-1) != 1:
        raise ValueError(f"weight must be [2 * intermediate, hidden], dense in hidden, got {list(weight.shape)}")
    x, r, total = _prologue(x, residual, norm_weight, weight)
    n = weight.shape[0] // 2
    if bias is not None and bias.shape != (2 * n,):
        raise ValueError(f"bias must be [{2 * n}], got {list(bias.shape)}")
    out = _output(out, (1, n), x)
    args = (x, r, norm_weight if norm_weight is not None else x, total, weight, bias if bias is not None else x,
            out, n, weight.shape[1], weight.stride(0), float(eps))
    flags = dict(HAS_RESIDUAL=residual is not None, NORM=norm_weight is not None, HAS_BIAS=bias is not None)
    if tile is None and INTERPRETED:
        tile = {"BLOCK_N": 4, **_INTERPRETER_TILE}
    if tile is not None:
        _norm_gate_up_silu_kernel[(triton.cdiv(n, tile["BLOCK_N"]),)](*args, **flags, **tile)
    else:
        _gate_up_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    return out, total
