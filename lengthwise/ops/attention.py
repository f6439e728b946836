"""Attention over the segment KV cache.

A sequence's context lives in two segments of the paged cache: the *prompt segment* (its
request's prompt, shared by all samples of the request) and its own *response segment*. Logically
the context is the prompt segment followed by the response segment, so a key's position is its
index in that concatenation. Attention runs one softmax across both segments.

The batch is flattened: `T` new tokens from `B` sequences, sequence `b` owning query rows
`query_start[b]:query_start[b + 1]`. This one layout covers prefill, chunked prefill and decode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lengthwise.ops import cpu as cpu_kernels
from lengthwise.ops import triton as triton_ops
from lengthwise.ops.dispatch import kernel_choice, use_triton

# Row-groups with at most this many queries take the CPU kernel (one pass per query row); longer
# prefill chunks are faster as SDPA's blocked matmuls.
CPU_KERNEL_MAX_QUERIES = 16


class KernelTensors(NamedTuple):
    """`AttentionMetadata` as int32 device tensors for fused kernels, plus host-side maxima."""

    query_start: torch.Tensor            # [B + 1]
    prompt_lens: torch.Tensor            # [B]
    response_lens: torch.Tensor          # [B], zeros without response segments
    prompt_block_tables: torch.Tensor    # [B, max_blocks]
    response_block_tables: torch.Tensor  # [B, max_blocks], [B, 1] zeros without response segments
    context_lens: list[int]              # host copy: prompt + response tokens per row-group
    max_query_len: int
    max_context: int
    is_decode: bool                      # every row-group has exactly one query


@dataclass
class AttentionMetadata:
    """Per-step description of where every sequence's keys and values live.

    `*_lens` count the tokens in each segment *after* this step's keys and values are written;
    block tables are `[B, max_blocks]` integer tensors on the cache's device, padded with any
    valid block id.
    """

    query_start: list[int]
    slot_mapping: torch.Tensor
    block_size: int
    prompt_block_tables: torch.Tensor
    prompt_lens: list[int]
    response_block_tables: torch.Tensor | None = None
    response_lens: list[int] | None = None
    # Context slots per sequence, computed once per step and reused by every layer.
    _slots: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    # The same for fused kernels (`kernel_tensors`, `query_tiles`), built on first use.
    _kernel: dict[object, object] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_start) - 1

    def context_slots(self, b: int) -> torch.Tensor:
        """Cache slots of sequence `b`'s whole context, prompt segment first, in position order."""
        if b in self._slots:
            return self._slots[b]
        parts = [_segment_slots(self.prompt_block_tables[b], self.prompt_lens[b], self.block_size)]
        if self.response_block_tables is not None and self.response_lens and self.response_lens[b]:
            parts.append(_segment_slots(self.response_block_tables[b], self.response_lens[b], self.block_size))
        self._slots[b] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._slots[b]

    def kernel_tensors(self) -> KernelTensors:
        """The metadata as device tensors for fused kernels: built once per step, shared by every layer."""
        if "tensors" not in self._kernel:
            b, device = self.num_seqs, self.prompt_block_tables.device
            has_resp = self.response_block_tables is not None and self.response_lens is not None
            resp = list(self.response_lens) if has_resp else [0] * b
            # One host-to-device copy for the three integer vectors.
            ints = torch.tensor([*self.query_start, *self.prompt_lens, *resp], dtype=torch.int32).to(device)
            tables = self.response_block_tables
            if tables is None:
                tables = torch.zeros((b, 1), dtype=torch.int32, device=device)
            qlens = [e - s for s, e in zip(self.query_start[:-1], self.query_start[1:], strict=True)]
            ctx = [p + r for p, r in zip(self.prompt_lens, resp, strict=True)]
            self._kernel["tensors"] = KernelTensors(
                ints[:b + 1], ints[b + 1:2 * b + 1], ints[2 * b + 1:],
                self.prompt_block_tables.to(torch.int32).contiguous(), tables.to(torch.int32).contiguous(),
                ctx, max(qlens, default=0), max(ctx, default=0), all(n == 1 for n in qlens))
        return self._kernel["tensors"]

    def pin_kernel_tensors(self, tensors: KernelTensors) -> None:
        """Use `tensors` as this step's kernel tensors instead of building them from the host lists.

        A CUDA graph does this: its kernels must read the same device buffers at every replay, and
        `max_context` is then the longest context the graph may ever see, which fixes the split-K
        partitioning."""
        self._kernel["tensors"] = tensors

    def query_tiles(self, block_m: int) -> torch.Tensor:
        """`[tiles, 2]` int32 device tensor of (row-group, first query row) for every tile of up to
        `block_m` query rows, the tiles with the most context first; built once per step and size."""
        if ("tiles", block_m) not in self._kernel:
            qs, lens = self.query_start, self.kernel_tensors().context_lens
            tiles = [(b, r) for b in range(self.num_seqs) for r in range(qs[b], qs[b + 1], block_m)]
            # Queries sit at the end of their context: a tile's last key is about `len - rows after it`.
            tiles.sort(key=lambda t: qs[t[0] + 1] - min(t[1] + block_m, qs[t[0] + 1]) - lens[t[0]])
            self._kernel["tiles", block_m] = torch.tensor(tiles or [(0, 0)], dtype=torch.int32).to(
                self.prompt_block_tables.device)
        return self._kernel["tiles", block_m]


def _segment_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    num_blocks = -(-length // block_size)
    offsets = torch.arange(block_size, device=block_table.device)
    slots = block_table[:num_blocks].long()[:, None] * block_size + offsets
    return slots.flatten()[:length]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values `[T, kv_heads, head_dim]` into flat caches `[slots, kv_heads, head_dim]`
    (rounded to the cache's dtype where it is narrower: `EngineConfig.kv_cache_dtype`)."""
    if k_cache.element_size() == 1:  # float8: torch has no index_copy_ for it; copy the bytes
        k_cache.view(torch.uint8).index_copy_(0, slot_mapping, to_fp8(k, k_cache.dtype).view(torch.uint8))
        v_cache.view(torch.uint8).index_copy_(0, slot_mapping, to_fp8(v, v_cache.dtype).view(torch.uint8))
        return
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` rounded to the float8 `dtype`, saturating at its largest finite value as vLLM's fp8 KV
    cache does (torch's own conversion gives infinity in e5m2), NaN kept: the same bytes the CPU
    kernels write (`lengthwise.ops.cpu.kernel_rounding`)."""
    m = torch.finfo(dtype).max
    return x.clamp(-m, m).to(dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    positions: torch.Tensor, meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of `q [T, heads, head_dim]` over each sequence's cached context.

    Query row `t` sees the keys at positions `<= positions[t]` (and, with a sliding window `w`,
    `> positions[t] - w`, as transformers' Mistral does). The keys and values of the new tokens must
    already be in the cache. Returns `[T, heads, head_dim]`. This is the torch reference: one
    gather and one SDPA call per sequence.
    """
    if use_triton(q):
        return triton_ops.paged_attention(q, k_cache, v_cache, positions, meta, scale, sliding_window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    groups: Iterable[int] = range(meta.num_seqs)
    if q.device.type == "cpu" and kernel_choice() != "torch" and cpu_kernels.supports(q, k_cache):
        # Decode rows and short chunks go to the C++ kernel; long prefill chunks keep SDPA's matmuls.
        qs = meta.query_start
        short = [b for b in groups if 0 < qs[b + 1] - qs[b] <= CPU_KERNEL_MAX_QUERIES]
        if short:
            cpu_kernels.segment_attention(q, k_cache, v_cache, positions, meta, scale, sliding_window, out, short)
        groups = [b for b in groups if qs[b + 1] - qs[b] > CPU_KERNEL_MAX_QUERIES]
    for b in groups:
        start, end = meta.query_start[b], meta.query_start[b + 1]
        if start == end:
            continue
        slots = meta.context_slots(b)
        k = k_cache[slots].to(q.dtype).transpose(0, 1)[None]  # [1, kv_heads, L, D]
        v = v_cache[slots].to(q.dtype).transpose(0, 1)[None]
        qb = q[start:end].transpose(0, 1)[None]   # [1, heads, n, D]
        q_pos = positions[start:end, None]
        k_pos = torch.arange(slots.numel(), device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=k.shape[1] != qb.shape[1])
        out[start:end] = o[0].transpose(0, 1)
    return out
