"""Turns a scheduled step into one forward pass: flat tokens, positions, cache slots, block tables.

Every chunk becomes one row-group of `AttentionMetadata`: a prompt chunk's context is its prompt
segment; a sequence chunk's context is the request's prompt segment followed by the sequence's
response segment. Prefill, chunked prefill, recomputation and decode share this one layout, so
a step can mix them freely.
"""

from __future__ import annotations

import torch

from lengthwise.kv.block_manager import KVBlockManager
from lengthwise.model.llama import CausalLM
from lengthwise.ops import AttentionMetadata
from lengthwise.sched.scheduler import ScheduledChunk


class ModelRunner:
    """Owns the KV cache storage (allocated once) and runs the model on scheduled chunks."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.cache = model.new_kv_cache(num_blocks, block_size)
        # Final hidden states of the last step's sampling rows (the probe's features at prefill end).
        self.last_hidden: torch.Tensor | None = None

    def run(self, chunks: list[ScheduledChunk], kv: KVBlockManager) -> torch.Tensor:
        """Run one step; return float32 logits `[num_sampling_chunks, vocab]`, one row per chunk
        with `sample` set, in chunk order."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        prompt_tables: list[list[int]] = []
        prompt_lens: list[int] = []
        resp_tables: list[list[int]] = []
        resp_lens: list[int] = []
        sample_rows: list[int] = []
        for c in chunks:
            req = c.request
            prompt_blocks = kv.prompt_segment(req.request_id).blocks
            if c.seq is None:
                ids.extend(req.prompt_ids[c.start:c.end])
                base, blocks = 0, prompt_blocks
                prompt_lens.append(c.end)
                resp_tables.append([])
                resp_lens.append(0)
            else:
                ids.extend(c.seq.output_ids[c.start:c.end])
                base, blocks = req.prompt_len, kv.response_segment(c.seq.seq_id).blocks
                prompt_lens.append(req.prompt_len)
                resp_tables.append(blocks)
                resp_lens.append(c.end)
            prompt_tables.append(prompt_blocks)
            positions.extend(range(base + c.start, base + c.end))
            slots.extend(blocks[i // bs] * bs + i % bs for i in range(c.start, c.end))
            query_start.append(query_start[-1] + c.end - c.start)
            if c.sample:
                sample_rows.append(query_start[-1] - 1)

        device = self.model.device
        has_response = any(resp_lens)
        meta = AttentionMetadata(
            query_start, torch.tensor(slots, dtype=torch.long, device=device), bs,
            _table(prompt_tables, device), prompt_lens,
            _table(resp_tables, device) if has_response else None, resp_lens if has_response else None)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=device),
                            torch.tensor(positions, dtype=torch.long, device=device), meta, self.cache)
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=device)]
        self.last_hidden = hidden
        return self.model.compute_logits(hidden)


def _table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block ids `[rows, widest]`, padded with block 0 (never read: lengths bound every access)."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)
