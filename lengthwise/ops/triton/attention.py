"""Segment attention over the paged KV cache: a decode kernel (split-K) and a varlen prefill kernel.

Both read keys and values straight from the flat cache `[slots, kv_heads, head_dim]` through the
block tables of the two segments, and run ONE online softmax over the prompt segment then the
response segment (a key's position is its index in that concatenation, which is never built).
Scores are kept in the log2 domain (`scale * log2(e)` folded in) so the softmax uses `exp2`.

- Decode (every row-group has exactly one query): one program per (sequence, KV head, split)
  holds all the query heads of its KV head (GQA), so each K/V tile is read once per group. When
  `batch * kv_heads` cannot fill the GPU, the context is cut into partitions handled by separate
  programs (flash-decoding), whose partial outputs and log-sum-exps a second kernel combines
  (or, with `LENGTHWISE_ATTN_FUSED_REDUCE=1`, the last partition of each group to finish: one
  launch instead of two; opt-in until a GPU measures it).
- Prefill, chunked prefill, mixed batches: one program per (query head, tile of up to BLOCK_M
  query rows of one row-group), causal by position, optional sliding window. The tiles come from
  `AttentionMetadata.query_tiles` (built once per step), those with the most context first.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch
import triton
import triton.language as tl

from lengthwise.ops.attention import AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_segment(q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, start, end, block_size, kc_ss, vc_ss,
                    scale_log2, d, dmask, BLOCK_N: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                    ACT: tl.constexpr):
    """Fold keys `[start, end)` of one segment (indices within the segment) into the online softmax.

    Every key in the range is visible (the caller clipped it to the causal and window bounds).
    `k_ptr`/`v_ptr` already point at this program's KV head. A float8 cache is widened to the
    activations' dtype `ACT` as it is loaded (a no-op for a cache in that dtype).
    """
    for s in range(start, end, BLOCK_N):
        offs = s + tl.arange(0, BLOCK_N)
        nmask = offs < end
        block = tl.load(table_ptr + offs // block_size, mask=nmask, other=0).to(tl.int64)
        slot = block * block_size + offs % block_size
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slot[:, None] * kc_ss + d[None, :], mask=kvmask, other=0.0).to(ACT)
        v = tl.load(v_ptr + slot[:, None] * vc_ss + d[None, :], mask=kvmask, other=0.0).to(ACT)
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # [BLOCK_G, BLOCK_N]
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: the tile holds at least one key
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if DOT_F32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, p_table_ptr, r_table_ptr, p_len_ptr, r_len_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr, count_ptr,
                   q_st, q_sh, kc_ss, kc_sh, vc_ss, vc_sh, o_st, o_sh, p_table_st, r_table_st,
                   po_st, po_sh, po_ss, pl_st, pl_sh,
                   block_size, scale_log2, window,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                   DOT_F32: tl.constexpr, FUSED_REDUCE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_pos = tl.load(pos_ptr + b)
    p_len = tl.load(p_len_ptr + b)
    ctx = p_len + tl.load(r_len_ptr + b)
    hi = tl.minimum(ctx, q_pos + 1)  # exclusive; logical positions
    lo = hi * 0
    if USE_WINDOW:
        lo = tl.maximum(lo, q_pos - window + 1)
    if SPLIT:
        # Each sequence cuts its own visible range into the launch's partitions (whole BLOCK_N
        # tiles), so a short sequence beside a long one, or any sequence in a CUDA graph sized
        # for the longest context, still spreads its keys over several programs.
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 1), tl.num_programs(2)), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    heads = kvh * G + g
    qmask = gmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * q_st + heads[:, None] * q_sh + d[None, :], mask=qmask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_ptr = k_cache_ptr + kvh * kc_sh
    v_ptr = v_cache_ptr + kvh * vc_sh
    # One softmax state carried from the prompt segment into the response segment.
    m_i, l_i, acc = _decode_segment(q, m_i, l_i, acc, k_ptr, v_ptr, p_table_ptr + b * p_table_st,
                                    lo, tl.minimum(hi, p_len), block_size, kc_ss, vc_ss, scale_log2, d, dmask,
                                    BLOCK_N, PREC, DOT_F32, q_ptr.dtype.element_ty)
    m_i, l_i, acc = _decode_segment(q, m_i, l_i, acc, k_ptr, v_ptr, r_table_ptr + b * r_table_st,
                                    tl.maximum(lo - p_len, 0), hi - p_len, block_size, kc_ss, vc_ss, scale_log2,
                                    d, dmask, BLOCK_N, PREC, DOT_F32, q_ptr.dtype.element_ty)
    if SPLIT:
        has = l_i > 0  # an empty partition contributes weight 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + b * po_st + heads[:, None] * po_sh + split * po_ss + d[None, :], o, mask=qmask)
        tl.store(part_lse_ptr + b * pl_st + heads * pl_sh + split, lse, mask=gmask)
        if FUSED_REDUCE:
            # The last partition of this (sequence, KV head) to finish combines all of them: a ticket
            # from a per-group counter, taken after a barrier so that one thread's release publishes
            # every thread's partials (as in linear.py), then the counter goes back to zero.
            tl.debug_barrier()
            ticket = tl.atomic_add(count_ptr + b * tl.num_programs(1) + kvh, 1, sem="acq_rel")
            if ticket == tl.num_programs(2) - 1:
                _combine_partitions(part_out_ptr + b * po_st, part_lse_ptr + b * pl_st, out_ptr + b * o_st,
                                    heads, gmask, d, qmask, po_sh, po_ss, pl_sh, o_sh, tl.num_programs(2),
                                    BLOCK_G, BLOCK_D)
                tl.atomic_xchg(count_ptr + b * tl.num_programs(1) + kvh, 0)
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + b * o_st + heads[:, None] * o_sh + d[None, :], o, mask=qmask)


@triton.jit
def _combine_partitions(po_ptr, pl_ptr, o_ptr, heads, gmask, d, qmask, po_sh, po_ss, pl_sh, o_sh, num_splits,
                        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine the partitions of the heads `heads` of one sequence: weights exp2(lse - max lse),
    partitions added in order. The partials are read past L1 (`.cg`): other programs wrote them."""
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(pl_ptr + heads * pl_sh + s, mask=gmask, other=float("-inf"), cache_modifier=".cg"))
    m = tl.where(gmask, m, 0.0)  # padding heads: no -inf - -inf
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(num_splits):
        w = tl.math.exp2(tl.load(pl_ptr + heads * pl_sh + s, mask=gmask, other=float("-inf"),
                                 cache_modifier=".cg") - m)
        o = tl.load(po_ptr + heads[:, None] * po_sh + s * po_ss + d[None, :], mask=qmask, other=0.0,
                    cache_modifier=".cg")
        total += w
        acc += o * w[:, None]
    tl.store(o_ptr + heads[:, None] * o_sh + d[None, :], acc / tl.where(gmask, total, 1.0)[:, None], mask=qmask)


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, po_st, po_sh, po_ss, pl_st, pl_sh, o_st, o_sh,
                          num_splits, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < num_splits
    lse = tl.load(part_lse_ptr + b * pl_st + h * pl_sh + s, mask=smask, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))
    o = tl.load(part_out_ptr + b * po_st + h * po_sh + s[:, None] * po_ss + d[None, :],
                mask=smask[:, None] & (d < D)[None, :], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * o_st + h * o_sh + d, o, mask=d < D)


@triton.jit
def _prefill_segment(q, q_pos, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, start, end, pos_offset, block_size,
                     kc_ss, vc_ss, scale_log2, window, d, dmask,
                     BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                     ACT: tl.constexpr):
    """Fold keys `[start, end)` of one segment, masked causally (and by the window) per query row
    (a float8 cache widened to `ACT` as `_decode_segment` does)."""
    for s in range(start, end, BLOCK_N):
        offs = s + tl.arange(0, BLOCK_N)
        nmask = offs < end
        block = tl.load(table_ptr + offs // block_size, mask=nmask, other=0).to(tl.int64)
        slot = block * block_size + offs % block_size
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slot[:, None] * kc_ss + d[None, :], mask=kvmask, other=0.0).to(ACT)
        v = tl.load(v_ptr + slot[:, None] * vc_ss + d[None, :], mask=kvmask, other=0.0).to(ACT)
        k_pos = pos_offset + offs
        visible = nmask[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # [BLOCK_M, BLOCK_N]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if DOT_F32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, qs_ptr, tiles_ptr, p_table_ptr, r_table_ptr,
                    p_len_ptr, r_len_ptr, out_ptr, q_st, q_sh, kc_ss, kc_sh, vc_ss, vc_sh, o_st, o_sh, p_table_st,
                    r_table_st, block_size, scale_log2, window,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, USE_WINDOW: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    h = tl.program_id(0)  # the heads of one tile run side by side: a KV group's keys stay in L2
    tile = tl.program_id(1).to(tl.int64)
    b = tl.load(tiles_ptr + 2 * tile).to(tl.int64)
    row0 = tl.load(tiles_ptr + 2 * tile + 1)
    q_end = tl.load(qs_ptr + b + 1)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < q_end
    q_pos = tl.load(pos_ptr + rows, mask=rmask, other=0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qmask = rmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + rows[:, None] * q_st + h * q_sh + d[None, :], mask=qmask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    p_len = tl.load(p_len_ptr + b)
    ctx = p_len + tl.load(r_len_ptr + b)
    hi = tl.minimum(ctx, tl.max(tl.where(rmask, q_pos, -1), 0) + 1)  # exclusive
    lo = hi * 0
    if USE_WINDOW:
        lo = tl.maximum(lo, tl.min(tl.where(rmask, q_pos, hi), 0) - window + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kvh = h // G
    k_ptr = k_cache_ptr + kvh * kc_sh
    v_ptr = v_cache_ptr + kvh * vc_sh
    m_i, l_i, acc = _prefill_segment(q, q_pos, m_i, l_i, acc, k_ptr, v_ptr, p_table_ptr + b * p_table_st,
                                     lo, tl.minimum(hi, p_len), 0, block_size, kc_ss, vc_ss, scale_log2,
                                     window, d, dmask, BLOCK_N, USE_WINDOW, PREC, DOT_F32, q_ptr.dtype.element_ty)
    m_i, l_i, acc = _prefill_segment(q, q_pos, m_i, l_i, acc, k_ptr, v_ptr, r_table_ptr + b * r_table_st,
                                     tl.maximum(lo - p_len, 0), hi - p_len, p_len, block_size, kc_ss, vc_ss,
                                     scale_log2, window, d, dmask, BLOCK_N, USE_WINDOW, PREC, DOT_F32,
                                     q_ptr.dtype.element_ty)
    o = acc / tl.where(rmask, l_i, 1.0)[:, None]  # padding rows may see no key at all
    tl.store(out_ptr + rows[:, None] * o_st + h * o_sh + d[None, :], o, mask=qmask)


# Triton's interpreter (3.9) multiplies the raw bits of bf16/fp16 operands in `tl.dot`; there the
# operands are widened to float32 first (exactly), so tests on the CPU check everything else as is.
INTERPRETED = type(_decode_kernel).__name__ == "InterpretedFunction"


@cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a token count, so that tests see the split path chosen


FUSED_REDUCE_ENV = "LENGTHWISE_ATTN_FUSED_REDUCE"
# Zeroed ticket counters per device, one per (sequence, KV head) of a split decode launch; each
# launch leaves them at zero. Grown outside graph capture (the engine warms every bucket first,
# the largest first); a grown set replaces the last, which stays allocated: captured graphs keep
# its address.
_counters: dict[torch.device, list[torch.Tensor]] = {}


def _group_counters(device: torch.device, n: int) -> torch.Tensor:
    held = _counters.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 256), dtype=torch.int32, device=device))
    return held[-1]


def _decode_config(dtype: torch.dtype, block_d: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the decode kernel. float32 runs its dots without tensor cores
    (input_precision="ieee"); these tiles compile without register spills for sm_90 with triton
    3.6 and 3.9 (benchmarks/triton_compile_check.py)."""
    if dtype == torch.float32:
        return (32, 8) if block_d <= 64 else (16, 4)
    return (64, 4) if block_d <= 128 else (32, 4)


def _prefill_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the prefill kernel; chosen as `_decode_config`."""
    if dtype == torch.float32:
        return (32, 32, 8) if block_d <= 64 else (32, 16, 8)
    return (64, 64, 4) if block_d <= 128 else (64, 32, 4)


def choose_num_splits(num_seqs: int, kv_heads: int, max_context: int, num_sms: int,
                      min_partition: int = 256, max_splits: int = 64) -> int:
    """Partitions per sequence for split-K decode: enough programs for about two waves on `num_sms`
    multiprocessors, each partition at least `min_partition` keys; 1 when the batch alone fills the GPU."""
    programs = num_seqs * kv_heads
    if programs >= num_sms or max_context <= min_partition:
        return 1
    return max(1, min(math.ceil(2 * num_sms / programs), math.ceil(max_context / min_partition), max_splits))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
           meta: AttentionMetadata) -> None:
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q must be [T, heads, head_dim] and k_cache/v_cache [slots, kv_heads, head_dim], got "
                         f"{list(q.shape)}, {list(k_cache.shape)}, {list(v_cache.shape)}")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q {list(q.shape)} does not fit the cache {list(k_cache.shape)} "
                         "(head_dim must match, heads must be a multiple of kv_heads)")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [{q.shape[0]}], got {list(positions.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    if meta.query_start[-1] != q.shape[0]:
        raise ValueError(f"meta.query_start ends at {meta.query_start[-1]} but q has {q.shape[0]} rows")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    out: torch.Tensor | None = None, *, decode: bool | None = None, num_splits: int | None = None,
                    block_n: int | None = None, block_m: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, fused_reduce: bool | None = None) -> torch.Tensor:
    """Same semantics as `lengthwise.ops.attention.paged_attention`.

    The keyword-only knobs are for tests and benchmarks: `decode` forces the kernel (None: decode
    when every row-group has exactly one query), `num_splits` the split-K partitions (None: chosen
    from the batch, the KV heads, the longest context and the multiprocessor count), and the
    tile sizes and launch options; `fused_reduce` has the last partition of each group combine
    them in the decode kernel instead of a second launch (None: `LENGTHWISE_ATTN_FUSED_REDUCE=1`).
    """
    _check(q, k_cache, v_cache, positions, meta)
    if q.stride(-1) != 1:
        q = q.contiguous()
    t, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if out is None:
        out = torch.empty((t, heads, dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} tensor shaped {list(q.shape)}, dense in head_dim")
    if t == 0:
        return out
    kt = meta.kernel_tensors()
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(dim))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    dot_f32 = INTERPRETED and q.dtype != torch.float32
    scale_log2 = float(scale) * _LOG2E
    use_window = sliding_window is not None
    window = int(sliding_window) if use_window else 0
    common = (kt.prompt_block_tables.stride(0), kt.response_block_tables.stride(0))
    if decode is None:
        decode = kt.is_decode
    if decode:
        if not kt.is_decode:
            raise ValueError("the decode kernel needs exactly one query per row-group")
        b = meta.num_seqs
        block_g = max(16, triton.next_power_of_2(group))
        bn, warps = _decode_config(q.dtype, block_d)
        bn, warps = block_n or bn, num_warps or warps
        if num_splits is None:
            num_splits = choose_num_splits(b, kv_heads, kt.max_context, _num_sms(q.device))
        num_splits = max(1, min(num_splits, triton.cdiv(kt.max_context, bn)))  # at most one tile each
        split = num_splits > 1
        if split:
            part_out = torch.empty((b, heads, num_splits, dim), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((b, heads, num_splits), dtype=torch.float32, device=q.device)
        else:
            part_out, part_lse = out, out  # unused
        po = part_out.stride() if split else (0, 0, 0)
        pl = part_lse.stride()[:2] if split else (0, 0)
        if fused_reduce is None:
            fused_reduce = os.environ.get(FUSED_REDUCE_ENV, "0") == "1"
        fused_reduce = split and fused_reduce
        counters = _group_counters(q.device, b * kv_heads) if fused_reduce else out  # unused without
        _decode_kernel[(b, kv_heads, num_splits)](
            q, k_cache, v_cache, positions, kt.prompt_block_tables, kt.response_block_tables, kt.prompt_lens,
            kt.response_lens, out, part_out, part_lse, counters,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            out.stride(0), out.stride(1), *common, *po[:3], *pl,
            meta.block_size, scale_log2, window,
            G=group, D=dim, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=bn, USE_WINDOW=use_window, SPLIT=split,
            PREC=prec, DOT_F32=dot_f32, FUSED_REDUCE=fused_reduce, num_warps=warps, num_stages=num_stages or 2)
        if split and not fused_reduce:
            _decode_reduce_kernel[(b, heads)](
                part_out, part_lse, out, *po[:3], *pl, out.stride(0), out.stride(1), num_splits,
                D=dim, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=1 if dim <= 64 else 2)
        return out
    bm, bn, warps = _prefill_config(q.dtype, block_d)
    bm, bn, warps = block_m or bm, block_n or bn, num_warps or warps
    tiles = meta.query_tiles(bm)
    _prefill_kernel[(heads, tiles.shape[0])](
        q, k_cache, v_cache, positions, kt.query_start, tiles, kt.prompt_block_tables, kt.response_block_tables,
        kt.prompt_lens, kt.response_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), *common, meta.block_size, scale_log2, window,
        G=group, D=dim, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, USE_WINDOW=use_window, PREC=prec, DOT_F32=dot_f32,
        num_warps=warps, num_stages=num_stages or 2)
    return out
