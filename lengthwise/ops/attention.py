"""Attention over the segment KV cache.

A sequence's context lives in two segments of the paged cache: the *prompt segment* (its
request's prompt, shared by all samples of the request) and its own *response segment*. Logically
the context is the prompt segment followed by the response segment, so a key's position is its
index in that concatenation. Attention runs one softmax across both segments.

The batch is flattened: `T` new tokens from `B` sequences, sequence `b` owning query rows
`query_start[b]:query_start[b + 1]`. This one layout covers prefill, chunked prefill and decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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


def _segment_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    num_blocks = -(-length // block_size)
    offsets = torch.arange(block_size, device=block_table.device)
    slots = block_table[:num_blocks].long()[:, None] * block_size + offsets
    return slots.flatten()[:length]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values `[T, kv_heads, head_dim]` into flat caches `[slots, kv_heads, head_dim]`."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    positions: torch.Tensor, meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of `q [T, heads, head_dim]` over each sequence's cached context.

    Query row `t` sees the keys at positions `<= positions[t]` (and, with a sliding window `w`,
    `> positions[t] - w`, as transformers' Mistral does). The keys and values of the new tokens must
    already be in the cache. Returns `[T, heads, head_dim]`. This is the torch reference: one
    gather and one SDPA call per sequence.
    """
    out = torch.empty_like(q)
    for b in range(meta.num_seqs):
        start, end = meta.query_start[b], meta.query_start[b + 1]
        if start == end:
            continue
        slots = meta.context_slots(b)
        k = k_cache[slots].transpose(0, 1)[None]  # [1, kv_heads, L, D]
        v = v_cache[slots].transpose(0, 1)[None]
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
