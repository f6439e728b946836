"""Segment attention against a dense float64 reference, with scattered blocks and GQA."""

from __future__ import annotations

import pytest
import torch

from lengthwise.ops import AttentionMetadata, paged_attention


def _dense(q, k, v, q_pos, window):
    # q [n, H, D], k/v [L, Hkv, D] in position order
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) / q.shape[-1] ** 0.5
    kp = torch.arange(k.shape[0])[None, :]
    mask = kp <= q_pos[:, None]
    if window is not None:
        mask &= kp > q_pos[:, None] - window
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_prompt_and_response_segments_one_softmax(heads, kv_heads, window):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    bs, D, num_blocks = 4, 8, 40
    k_cache = torch.randn(num_blocks * bs, kv_heads, D, generator=g)
    v_cache = torch.randn(num_blocks * bs, kv_heads, D, generator=g)
    free = torch.randperm(num_blocks, generator=g).tolist()  # scattered, out-of-order blocks
    # (prompt_len, response_len, new query tokens): decode, chunked prefill, a prompt-only prefill
    seqs = [(7, 5, 1), (3, 0, 3), (9, 1, 1), (13, 6, 4)]
    p_tables, r_tables, qs, ctx_slots, q_pos = [], [], [0], [], []
    for p, r, n in seqs:
        pb = [free.pop() for _ in range(-(-p // bs))]
        rb = [free.pop() for _ in range(-(-r // bs))]
        p_tables.append(pb + [0] * (4 - len(pb)))
        r_tables.append(rb + [0] * (4 - len(rb)))
        slots = [pb[i // bs] * bs + i % bs for i in range(p)] + [rb[i // bs] * bs + i % bs for i in range(r)]
        ctx_slots.append(slots)
        q_pos.append(torch.arange(p + r - n, p + r))
        qs.append(qs[-1] + n)
    q = torch.randn(qs[-1], heads, D, generator=g)
    positions = torch.cat(q_pos)
    meta = AttentionMetadata(qs, torch.zeros(0, dtype=torch.long), bs, torch.tensor(p_tables),
                             [s[0] for s in seqs], torch.tensor(r_tables), [s[1] for s in seqs])
    out = paged_attention(q, k_cache, v_cache, positions, meta, D ** -0.5, window)
    for b, slots in enumerate(ctx_slots):
        ref = _dense(q[qs[b]:qs[b + 1]], k_cache[slots], v_cache[slots], q_pos[b], window)
        torch.testing.assert_close(out[qs[b]:qs[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)
