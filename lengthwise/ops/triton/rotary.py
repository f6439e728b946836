"""RoPE on q and k with k and v stored straight into the paged KV cache: one kernel, one program per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_half(x1, x2, c1, c2, s1, s2, DTYPE: tl.constexpr):
    # Rotate-half layout, `x * cos + cat(-x2, x1) * sin`, rounding after each op as torch does in DTYPE.
    o1 = (x1 * c1).to(DTYPE).to(tl.float32) + (-x2 * s1).to(DTYPE).to(tl.float32)
    o2 = (x2 * c2).to(DTYPE).to(tl.float32) + (x1 * s2).to(DTYPE).to(tl.float32)
    return o1, o2


@triton.jit
def _rotary_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         q_st, q_sh, k_st, k_sh, v_st, v_sh, cos_st, sin_st, qo_st, qo_sh,
                         kc_ss, kc_sh, vc_ss, vc_sh, heads, kv_heads,
                         HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr,
                         BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c1 = tl.load(cos_ptr + t * cos_st + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * cos_st + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * sin_st + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * sin_st + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    c1, c2, s1, s2 = c1[None, :], c2[None, :], s1[None, :], s2[None, :]

    h = tl.arange(0, BLOCK_H)
    m = (h < heads)[:, None] & dmask[None, :]
    src = q_ptr + t * q_st + h[:, None] * q_sh + d[None, :]
    o1, o2 = _rotate_half(tl.load(src, mask=m).to(tl.float32), tl.load(src + HALF, mask=m).to(tl.float32),
                          c1, c2, s1, s2, q_out_ptr.dtype.element_ty)
    dst = q_out_ptr + t * qo_st + h[:, None] * qo_sh + d[None, :]
    tl.store(dst, o1, mask=m)
    tl.store(dst + HALF, o2, mask=m)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    hk = tl.arange(0, BLOCK_KV)
    # A negative slot (padding) writes nothing. (The slot is broadcast before the `&`: the interpreter
    # rejects a mask made of a block and a scalar condition.)
    mk = ((hk < kv_heads) & (hk * 0 + slot >= 0))[:, None] & dmask[None, :]
    src = k_ptr + t * k_st + hk[:, None] * k_sh + d[None, :]
    o1, o2 = _rotate_half(tl.load(src, mask=mk).to(tl.float32), tl.load(src + HALF, mask=mk).to(tl.float32),
                          c1, c2, s1, s2, k_cache_ptr.dtype.element_ty)
    dst = k_cache_ptr + slot * kc_ss + hk[:, None] * kc_sh + d[None, :]
    tl.store(dst, o1, mask=mk)
    tl.store(dst + HALF, o2, mask=mk)
    src = v_ptr + t * v_st + hk[:, None] * v_sh + d[None, :]
    dst = v_cache_ptr + slot * vc_ss + hk[:, None] * vc_sh + d[None, :]
    tl.store(dst, tl.load(src, mask=mk), mask=mk)
    tl.store(dst + HALF, tl.load(src + HALF, mask=mk), mask=mk)


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    t, heads, dim = q.shape
    kv_heads = k.shape[1]
    if dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {dim}")
    if k.shape != (t, kv_heads, dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [{t}, kv_heads, {dim}], got {list(k.shape)} and {list(v.shape)}")
    if cos.shape != (t, dim) or sin.shape != (t, dim):
        raise ValueError(f"cos and sin must be [{t}, {dim}], got {list(cos.shape)} and {list(sin.shape)}")
    if k_cache.shape[1:] != (kv_heads, dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [slots, {kv_heads}, {dim}], got {list(k_cache.shape)}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must be [{t}], got {list(slot_mapping.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    q, k, v, cos, sin = (_last_dim_dense(x) for x in (q, k, v, cos, sin))
    if out is None:
        out = torch.empty((t, heads, dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} tensor shaped {list(q.shape)}, dense in head_dim")
    if t == 0:
        return out
    half = dim // 2
    bh, bk = triton.next_power_of_2(heads), triton.next_power_of_2(kv_heads)
    warps = 1 if bh * half <= 512 else 4 if bh * half <= 4096 else 8
    _rotary_write_kernel[(t,)](
        q, k, v, cos, sin, out, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        heads, kv_heads, HALF=half, BLOCK_H=bh, BLOCK_KV=bk, BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=warps)
    return out
