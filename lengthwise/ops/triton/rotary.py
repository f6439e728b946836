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
def _fp8_bits(x, MAN: tl.constexpr, BIAS: tl.constexpr, MAX_BITS: tl.constexpr, MAGIC: tl.constexpr):
    """float32 `x` as float8 bytes (int32, 0-255): `narrow_fp8` of ops/cpu/attention.h, integer
    arithmetic rounding to nearest even and saturating at the format's largest finite value (its
    float32 bits `MAX_BITS`); below the smallest normal, adding `MAGIC` (2^(1 - BIAS - MAN + 23),
    whose last bit is the subnormal step) rounds to a multiple of the step. Written out rather than
    `.to(float8)`: Triton 3.9's interpreter drops the carry when rounding up to the next power of two
    (124.5 became 64), and torch's bytes are the reference on every backend."""
    SHIFT: tl.constexpr = 23 - MAN
    u = x.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    mag = u & 0x7FFFFFFF
    a = tl.minimum(mag, MAX_BITS)
    normal = (a + ((1 << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1) - ((127 - BIAS) << 23)) >> SHIFT
    subnormal = (a.to(tl.float32, bitcast=True) + MAGIC).to(tl.int32, bitcast=True) - tl.full(
        x.shape, MAGIC, tl.float32).to(tl.int32, bitcast=True)
    code = tl.where(a < ((128 - BIAS) << 23), subnormal, normal)
    return tl.where(mag > 0x7F800000, 0x7F, code) | sign


@triton.jit
def to_cache(x, CACHE: tl.constexpr, ACT: tl.constexpr):
    """float32 `x` as the cache stores it: rounded to the activations' dtype `ACT` (what the torch
    path writes), then, for a float8 cache, saturated and rounded to nearest even: the bytes of
    `lengthwise.ops.attention.to_fp8`."""
    x = x.to(ACT)
    if CACHE == tl.float8e4nv:  # largest 448, smallest normal 2^-6
        x = _fp8_bits(x.to(tl.float32), 3, 7, 0x43E00000, 16384.0).to(tl.uint8).to(CACHE, bitcast=True)
    elif CACHE == tl.float8e5:  # largest 57344, smallest normal 2^-14
        x = _fp8_bits(x.to(tl.float32), 2, 15, 0x47600000, 128.0).to(tl.uint8).to(CACHE, bitcast=True)
    return x


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
    # (dtypes are passed where used: the compiler takes no dtype held in a local variable)
    o1, o2 = _rotate_half(tl.load(src, mask=mk).to(tl.float32), tl.load(src + HALF, mask=mk).to(tl.float32),
                          c1, c2, s1, s2, k_ptr.dtype.element_ty)
    dst = k_cache_ptr + slot * kc_ss + hk[:, None] * kc_sh + d[None, :]
    tl.store(dst, to_cache(o1, k_cache_ptr.dtype.element_ty, k_ptr.dtype.element_ty), mask=mk)
    tl.store(dst + HALF, to_cache(o2, k_cache_ptr.dtype.element_ty, k_ptr.dtype.element_ty), mask=mk)
    src = v_ptr + t * v_st + hk[:, None] * v_sh + d[None, :]
    dst = v_cache_ptr + slot * vc_ss + hk[:, None] * vc_sh + d[None, :]
    tl.store(dst, to_cache(tl.load(src, mask=mk).to(tl.float32), v_cache_ptr.dtype.element_ty,
                           v_ptr.dtype.element_ty), mask=mk)
    tl.store(dst + HALF, to_cache(tl.load(src + HALF, mask=mk).to(tl.float32), v_cache_ptr.dtype.element_ty,
                                  v_ptr.dtype.element_ty), mask=mk)


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
