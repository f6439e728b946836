"""Segment attention against a dense float64 reference, with scattered blocks and GQA."""

from __future__ import annotations

import pytest
import torch

from lengthwise.ops import AttentionMetadata, paged_attention
from lengthwise.ops.cpu import ATTENTION_ORDER_ENV, KV_DTYPES, attention_order, segment_attention_kernel, supports


@pytest.fixture(params=["torch", "cpu-kernel"])
def backend(request, monkeypatch):
    """Run each case through the torch reference and through the C++ CPU kernel."""
    if request.param == "torch":
        monkeypatch.setenv("LENGTHWISE_KERNELS", "torch")
    elif segment_attention_kernel() is None:
        pytest.skip("the CPU attention kernel could not be built here (no C++ compiler?)")
    return request.param


def _dense(q, k, v, q_pos, window):
    # q [n, H, D], k/v [L, Hkv, D] in position order
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) / q.shape[-1] ** 0.5
    kp = torch.arange(k.shape[0])[None, :]
    mask = kp <= q_pos[:, None]
    if window is not None:
        mask &= kp > q_pos[:, None] - window
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_prompt_and_response_segments_one_softmax(heads, kv_heads, window, kv_dtype, backend):
    """float32 queries over a float32, bfloat16 or float8 cache (`kv_cache_dtype`): the reference
    reads the same rounded values, so both must agree to float32 precision."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    bs, D, num_blocks = 4, 8, 60
    k_cache = torch.randn(num_blocks * bs, kv_heads, D, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks * bs, kv_heads, D, generator=g).to(kv_dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()  # scattered, out-of-order blocks
    # (prompt_len, response_len, new query tokens): decode, chunked prefill, a prompt-only prefill,
    # and a chunk longer than the CPU kernel takes (SDPA in the same call)
    seqs = [(7, 5, 1), (3, 0, 3), (9, 1, 1), (13, 6, 4), (30, 0, 21), (1, 0, 1)]
    p_tables, r_tables, qs, ctx_slots, q_pos = [], [], [0], [], []
    for p, r, n in seqs:
        pb = [free.pop() for _ in range(-(-p // bs))]
        rb = [free.pop() for _ in range(-(-r // bs))]
        p_tables.append(pb + [0] * (8 - len(pb)))
        r_tables.append(rb + [0] * (8 - len(rb)))
        slots = [pb[i // bs] * bs + i % bs for i in range(p)] + [rb[i // bs] * bs + i % bs for i in range(r)]
        ctx_slots.append(slots)
        q_pos.append(torch.arange(p + r - n, p + r))
        qs.append(qs[-1] + n)
    q = torch.randn(qs[-1], heads, D, generator=g)
    positions = torch.cat(q_pos)
    meta = AttentionMetadata(qs, torch.zeros(0, dtype=torch.long), bs, torch.tensor(p_tables),
                             [s[0] for s in seqs], torch.tensor(r_tables), [s[1] for s in seqs])
    if backend == "cpu-kernel":  # (not the torch fallback: the kernel reads this cache itself)
        assert supports(q, k_cache)
    out = paged_attention(q, k_cache, v_cache, positions, meta, D ** -0.5, window)
    assert out.is_contiguous() and torch.isfinite(out).all()
    for b, slots in enumerate(ctx_slots):
        ref = _dense(q[qs[b]:qs[b + 1]], k_cache[slots], v_cache[slots], q_pos[b], window)
        torch.testing.assert_close(out[qs[b]:qs[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def test_cpu_kernel_at_model_scale_matches_reference(monkeypatch):
    """Head size 64, GQA 4, blocks of 16, 33 decode rows with contexts up to 300: the shapes the engine runs."""
    if segment_attention_kernel() is None:
        pytest.skip("the CPU attention kernel could not be built here (no C++ compiler?)")
    g = torch.Generator().manual_seed(3)
    bs, D, heads, kv_heads, rows = 16, 64, 8, 2, 33
    lens = torch.randint(1, 300, (rows, 2), generator=g).tolist()
    need = sum(-(-p // bs) + -(-r // bs) for p, r in lens)
    k_cache, v_cache = torch.randn(2, need * bs, kv_heads, D, generator=g)
    blocks = torch.randperm(need, generator=g).tolist()
    p_tab, r_tab = [], []
    for p, r in lens:
        p_tab.append([blocks.pop() for _ in range(-(-p // bs))])
        r_tab.append([blocks.pop() for _ in range(-(-r // bs))])
    pad = lambda t: torch.tensor([x + [0] * (max(map(len, t)) - len(x)) for x in t])  # noqa: E731
    meta = AttentionMetadata(list(range(rows + 1)), torch.zeros(0, dtype=torch.long), bs, pad(p_tab),
                             [p for p, _ in lens], pad(r_tab), [r for _, r in lens])
    q = torch.randn(rows, heads, D, generator=g)
    positions = torch.tensor([p + r - 1 for p, r in lens])
    fast = paged_attention(q, k_cache, v_cache, positions, meta, D ** -0.5)
    monkeypatch.setenv("LENGTHWISE_KERNELS", "torch")
    ref = paged_attention(q, k_cache, v_cache, positions, meta, D ** -0.5)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("order", ["head", "memory"])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("head_dim, heads, kv_heads, bs, window", [
    (64, 12, 12, 16, None),   # llama-100m's shape (the AVX-512 path's 16-key tiles, several 512-key chunks)
    (128, 8, 2, 32, None),    # blocks longer than a tile: a block is read as two tiles
    (32, 8, 1, 16, 300),      # a sliding window that starts inside a chunk
    (16, 4, 4, 8, None),      # the smallest head the vector path takes
    (24, 4, 2, 16, None),     # not a multiple of 16: the portable path, keys transposed
    (8, 8, 2, 32, 40),        # stories260k's head size, GQA 4, full 32-key tiles, a window
    (40, 4, 2, 16, None),     # the portable path's dot product per key (heads of 32 and more)
])
def test_cpu_kernel_long_contexts_match_dense_reference(head_dim, heads, kv_heads, bs, window, kv_dtype, order,
                                                        monkeypatch):
    """Decode rows whose contexts cross the kernel's 512-key softmax chunks, against float64, over
    a float32 or a bfloat16 cache (every path: vector and portable, by key and transposed; the
    vector path's tiles walked a head at a time and in memory order); float8 caches too."""
    if segment_attention_kernel() is None:
        pytest.skip("the CPU attention kernel could not be built here (no C++ compiler?)")
    monkeypatch.setenv(ATTENTION_ORDER_ENV, order)
    g = torch.Generator().manual_seed(head_dim + bs)
    lens = [(700, 613), (5, 1), (1, 0), (511, 1), (33, 1100), (512, 513)]
    need = sum(-(-p // bs) + -(-r // bs) for p, r in lens)
    k_cache, v_cache = (2 * torch.randn(2, need * bs, kv_heads, head_dim, generator=g)).to(kv_dtype)
    blocks = torch.randperm(need, generator=g).tolist()
    p_tab, r_tab, ctx_slots = [], [], []
    for p, r in lens:
        pb = [blocks.pop() for _ in range(-(-p // bs))]
        rb = [blocks.pop() for _ in range(-(-r // bs))]
        p_tab.append(pb)
        r_tab.append(rb)
        ctx_slots.append([pb[i // bs] * bs + i % bs for i in range(p)] + [rb[i // bs] * bs + i % bs for i in range(r)])
    pad = lambda t: torch.tensor([x + [0] * (max(map(len, t)) - len(x)) for x in t])  # noqa: E731
    meta = AttentionMetadata(list(range(len(lens) + 1)), torch.zeros(0, dtype=torch.long), bs, pad(p_tab),
                             [p for p, _ in lens], pad(r_tab), [r for _, r in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    positions = torch.tensor([p + r - 1 for p, r in lens])
    out = paged_attention(q, k_cache, v_cache, positions, meta, head_dim ** -0.5, window)
    for b, slots in enumerate(ctx_slots):
        ref = _dense(q[b:b + 1], k_cache[slots], v_cache[slots], positions[b:b + 1], window)
        torch.testing.assert_close(out[b:b + 1].double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("order", ["auto", "head", "memory"])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(64, 12, 12), (64, 8, 2), (128, 4, 4), (32, 6, 3)])
def test_cpu_kernel_one_row_splits_its_kv_heads(head_dim, heads, kv_heads, kv_dtype, order, monkeypatch):
    """A lone decode row (batch 1): the kernel splits its KV heads among tasks, so tasks start at
    KV heads other than 0 and read part of each key row, in either order."""
    if segment_attention_kernel() is None:
        pytest.skip("the CPU attention kernel could not be built here (no C++ compiler?)")
    monkeypatch.setenv(ATTENTION_ORDER_ENV, order)
    g = torch.Generator().manual_seed(head_dim + heads)
    bs, p, r = 16, 300, 45
    need = -(-p // bs) + -(-r // bs)
    k_cache, v_cache = torch.randn(2, need * bs, kv_heads, head_dim, generator=g).to(kv_dtype)
    blocks = torch.randperm(need, generator=g).tolist()
    pb, rb = blocks[:-(-p // bs)], blocks[-(-p // bs):]
    slots = [pb[i // bs] * bs + i % bs for i in range(p)] + [rb[i // bs] * bs + i % bs for i in range(r)]
    meta = AttentionMetadata([0, 1], torch.zeros(0, dtype=torch.long), bs, torch.tensor([pb]), [p],
                             torch.tensor([rb]), [r])
    q = torch.randn(1, heads, head_dim, generator=g)
    positions = torch.tensor([p + r - 1])
    for threads in (2, 3):  # kv heads split 2, 3, 4 ... ways (tasks = 4 x threads per row, at most kv_heads)
        torch.set_num_threads(threads)
        try:
            out = paged_attention(q, k_cache, v_cache, positions, meta, head_dim ** -0.5)
        finally:
            torch.set_num_threads(2)
        ref = _dense(q, k_cache[slots], v_cache[slots], positions, None)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_attention_order_switch_names_itself(monkeypatch):
    monkeypatch.setenv(ATTENTION_ORDER_ENV, "sideways")
    with pytest.raises(ValueError, match=f"{ATTENTION_ORDER_ENV} must be one of auto, head, memory"):
        attention_order()



@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("head_dim", [64, 24])
def test_cpu_kernel_reads_every_float8_byte_as_torch_does(fp8, head_dim, backend):
    """Each query row attends to one key only, so its output is that key's value as the kernel
    widens it: every finite byte of the format (subnormals, the largest, both zeros) must read
    back as torch's own conversion gives it, on the vector path (64) and the portable one (24)."""
    values = torch.arange(256, dtype=torch.uint8).view(fp8)
    finite = values[torch.isfinite(values.float())]
    kv_heads = 2
    per_slot = kv_heads * head_dim
    slots = -(-finite.numel() // per_slot)
    v_cache = torch.zeros(slots * per_slot, dtype=fp8)
    v_cache.view(torch.uint8)[:finite.numel()] = finite.view(torch.uint8)
    v_cache = v_cache.view(slots, kv_heads, head_dim)
    k_cache = torch.zeros_like(v_cache)
    # row b: a one-token prompt in block b (block size 1)
    meta = AttentionMetadata(list(range(slots + 1)), torch.zeros(0, dtype=torch.long), 1,
                             torch.arange(slots)[:, None], [1] * slots)
    q = torch.randn(slots, 2 * kv_heads, head_dim)
    out = paged_attention(q, k_cache, v_cache, torch.zeros(slots, dtype=torch.long), meta, head_dim ** -0.5)
    expected = v_cache.float().repeat_interleave(2, 1)
    assert torch.equal(out, expected)
